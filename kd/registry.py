"""Name -> constructor registries, so a model, dataset or loss is added by registering one function or class."""
import contextlib
import difflib
import inspect
import sysconfig
import traceback
import types
import typing
from pathlib import Path


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
        """Call the constructor with config kwargs checked against its signature, so typos fail before training.
        Anything else the constructor (the user's own code, for a plugin) raises is this key's problem too."""
        fn = self.get(name, key)
        check_kwargs(kwargs, key, *keyword_params(fn, skip=context))
        try:
            return fn(**context, **kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(key, f"{self.kind} '{name}': {e}") from None
        except Exception as e:
            raise ConfigError(key, f"{self.kind} '{name}' failed: {describe(e)}") from None


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


def check_kwargs(kwargs, key, params, hints):
    """Reject unknown (with a did-you-mean), missing or wrongly typed keyword arguments."""
    for k, v in kwargs.items():
        if k not in params:
            raise ConfigError(f"{key}.{k}", f"unknown key ({did_you_mean(k, params)})")
        if k in hints:
            kwargs[k] = coerce(v, hints[k], f"{key}.{k}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ConfigError(key, f"missing required key(s): {', '.join(missing)}")


@contextlib.contextmanager
def blame(parts, key, what):
    """Turn an exception raised by a model's or method's code into one ConfigError naming the config key of the
    innermost of `parts` ((module, key) pairs) whose code was running, else `key`; `what` says what was tried."""
    try:
        yield
    except KDError:
        raise
    except Exception as e:
        owners, found, tb = {id(m): k for m, k in parts}, key, e.__traceback__
        while tb is not None:
            found = owners.get(id(tb.tb_frame.f_locals.get("self")), found)
            tb = tb.tb_next
        raise ConfigError(found, f"{what}: {describe(e)}") from None


def describe(exc):
    """`Type: message (file:line)`, the line being the innermost one outside torch and Python's own library:
    where the user's code (a plugin, a model) raised it or called what did."""
    frames = traceback.extract_tb(exc.__traceback__)
    stdlib = sysconfig.get_paths()["stdlib"]
    own = [f for f in frames if not f.filename.startswith(stdlib)
           and not {"site-packages", "dist-packages"} & set(Path(f.filename).parts)] or frames
    where = ""
    if own:
        path = Path(own[-1].filename)
        try:
            path = path.relative_to(Path.cwd())
        except ValueError:
            pass
        where = f" ({path}:{own[-1].lineno})"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}{where}"


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
    if not isinstance(hint, type):  # Callable, Type[...]: nothing a YAML value could be checked against
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(key, f"expected {hint.__name__}, got {value!r}")
    return value
