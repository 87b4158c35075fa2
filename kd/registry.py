"""Name -> constructor registries, so a model, dataset or loss is added by registering one function or class."""
import difflib
import inspect
import types
import typing


class KDError(Exception):
    """A problem the user can fix (bad config, missing data): printed as one line, exit code 2."""


class ConfigError(KDError):
    def __init__(self, key, message):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def did_you_mean(name, choices):
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}choose from: {', '.join(sorted(choices))}"


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._items = {}

    def register(self, name):
        def add(obj):
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj
        return add

    def names(self):
        return sorted(self._items)

    def get(self, name, key):
        if name not in self._items:
            raise ConfigError(key, f"unknown {self.kind} '{name}' ({did_you_mean(name, self._items)})")
        return self._items[name]

    def build(self, name, key, kwargs, **context):
        """Call the constructor with config kwargs checked against its signature, so typos fail before training."""
        fn = self.get(name, key)
        check_kwargs(fn, kwargs, key, skip=context)
        try:
            return fn(**context, **kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(key, f"{self.kind} '{name}': {e}") from None


def check_kwargs(fn, kwargs, key, skip=()):
    """Reject unknown or wrongly typed keyword arguments using the constructor's annotations."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    allowed = [p for p in sig.parameters if p not in skip and p != "self"
               and sig.parameters[p].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for k, v in kwargs.items():
        if k not in allowed:
            raise ConfigError(f"{key}.{k}", f"unknown key ({did_you_mean(k, allowed)})")
        if k in hints:
            kwargs[k] = coerce(v, hints[k], f"{key}.{k}")
    missing = [p for p in allowed if sig.parameters[p].default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ConfigError(key, f"missing required key(s): {', '.join(missing)}")


def coerce(value, hint, key):
    """Check a YAML value against a type hint (int, float, bool, str, list[...], dict, Optional); ints pass as floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(key, f"expected {hint.__name__}, got {value!r}")
    return value
