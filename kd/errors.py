"""The errors a user can fix, and how one becomes a single line: which config key, which file and line."""
import contextlib
import difflib
import re
import reprlib
import sysconfig
import traceback
from pathlib import Path


class KDError(Exception):
    """A problem the user can fix (bad config, missing data): printed as one line, exit code 2."""


class ConfigError(KDError):
    def __init__(self, key, message):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 1, 4, 4, 60, 60


def short(value):
    """A value as a one-line message shows it: a few items of a long list, a long text cut."""
    return _SHORT.repr(value)


def did_you_mean(name, choices):
    """The closest choice, whatever its case (`KD` -> `kd`), and all of them."""
    choices = sorted(str(c) for c in choices)
    if not choices:
        return "nothing can be set here"
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(short(name).strip("'").lower(), list(lower), n=1)
    hint = f"did you mean '{lower[close[0]]}'? " if close else ""
    return f"{hint}choose from: {', '.join(choices)}"


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


def first_line(error, limit=160):
    """The reason, in one line: torch's exporter and compiler wrap the error that says why in one that says which
    step failed; terminal escape codes dropped (they would colour or move the user's terminal), cut at a word."""
    error = error.__cause__ or getattr(error, "inner_exception", None) or error  # the latter: a compiler backend's
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", (str(error).strip().splitlines() or [type(error).__name__])[0])
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."
