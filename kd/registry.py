"""Name -> constructor registries, so a model, dataset or loss is added by registering one function or class."""
import inspect
import math
import types
import typing

from kd.errors import ConfigError, describe, did_you_mean, short


class Registry:
    """`context`: the arguments the project passes to every constructor (not config keys)."""

    def __init__(self, kind, context=()):
        self.kind, self.context = kind, tuple(context)
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

    def listing(self):
        """One line per entry: `name(parameter: type = default, ...)` and the first paragraph of its docstring."""
        lines = []
        for name in self.names():
            fn = self._items[name]
            params, hints = keyword_params(fn, skip=self.context)
            args = ", ".join(n + (f": {type_name(hints[n])}" if n in hints else "")
                             + ("" if p.default is p.empty else f" = {p.default!r}") for n, p in params.items())
            doc = " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())
            lines.append(f"{name}({args})" + (f"  {doc}" if doc else ""))
        return lines

    def get(self, name, key):
        if name not in self._items:
            raise ConfigError(key, f"unknown {self.kind} '{name}' ({did_you_mean(name, self._items)})")
        return self._items[name]

    def call(self, name, key, *args, **optional):
        """The constructor called with `args` and those of the `optional` context arguments it declares: one
        written before an optional argument was added (a plugin's dataset taking only `cfg`) still works."""
        fn = self.get(name, key)
        declared = inspect.signature(fn).parameters
        return fn(*args, **{k: v for k, v in optional.items() if k in declared})

    def build(self, name, key, kwargs, siblings=(), **context):
        """Call the constructor with config kwargs checked against its signature, so typos fail before training.
        `siblings`: the other keys valid beside the parameters (a method's `name`, `student`, ...), offered when
        a key is unknown. Anything else the constructor (the user's own code, for a plugin) raises is this key's
        problem too."""
        fn = self.get(name, key)
        check_kwargs(kwargs, key, *keyword_params(fn, skip=context), siblings)
        try:
            return fn(**context, **kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(key, f"{self.kind} '{name}': {e}") from None
        except Exception as e:
            raise ConfigError(key, f"{self.kind} '{name}' failed: {describe(e)}") from None


def type_name(hint):
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def keyword_params(fn, skip=()):
    """The parameters of a function or class that a config may set by name, and their type hints."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # annotations that do not resolve (forward references): names are still checked
        hints = {}
    params = {n: p for n, p in sig.parameters.items() if n not in skip and n != "self"
              and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return params, hints


def check_kwargs(kwargs, key, params, hints, siblings=()):
    """Reject unknown (with a did-you-mean among the parameters and `siblings`), missing or wrongly typed keyword
    arguments."""
    for k, v in kwargs.items():
        if k not in params:
            raise ConfigError(f"{key}.{k}", f"unknown key ({did_you_mean(k, [*params, *siblings])})")
        if k in hints:
            kwargs[k] = coerce(v, hints[k], f"{key}.{k}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ConfigError(key, f"missing required key(s): {', '.join(missing)}")


def coerce(value, hint, key):
    """Check a YAML value against a type hint (int, float, bool, str, list[...], dict, Optional); ints pass as
    floats."""
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
            raise ConfigError(key, f"expected a list, got {short(value)}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {short(value)}")
        return dict(value)
    if hint is typing.Any:
        return value
    if not isinstance(hint, type):  # Callable, Type[...]: nothing a YAML value could be checked against
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(key, f"expected {hint.__name__}, got {short(value)}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(key, f"expected a finite number, got {short(value)}")
    return value
