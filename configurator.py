"""
One config mechanism for every script: defaults live in the script, overrides come from argv.

    # train.py
    from configurator import configure_or_exit
    defaults = dict(batch_size=8, block_size=2048, learning_rate=6.7e-5, compile=False)
    config = configure_or_exit(defaults)  # parses sys.argv[1:]; on a bad argument: message, exit 2

    $ python train.py config/lrc_qwen.py --learning_rate=1e-4 --compile=true

Arguments are applied left to right, so a later one wins:
- `path.py`      a config file, executed as Python in a namespace that already holds the current
                 values, so it can compute one key from another
                 (`tokens = batch_size * block_size`).
                 Every top-level name it leaves behind must be an existing key; helpers must start
                 with `_` (imported modules are ignored).
- `--key=value`  value parsed with ast.literal_eval (`1e-4`, `True`, `(0.9, 0.95)`), else kept as a
                 str. A key whose default is a list collects values instead: each `--key=value`
                 appends the text as given (`--source=a.txt --source=b.txt`), and a config file may
                 assign the whole list.
Unlike nanoGPT's configurator, a typo is an error naming the closest key instead of a silent new
global, and every value is checked against the default's type (an int is fine where a float is due).
Ranges are checked where a script reads its values (check_ranges), and every script runs its main
through run_or_exit, so that an expected failure reaches the user as one line, not a traceback:

    if __name__ == "__main__":
        run_or_exit(main)  # "error: ..." on stderr, exit 1; NANOLRC_DEBUG=1 shows the traceback
"""
import ast
import difflib
import os
import sys
import traceback
import types


class ConfigError(ValueError):
    """A bad config argument; scripts print it and exit with status 2 (configure_or_exit,
    run_or_exit)."""


# the failures a user can cause and fix (bad paths and files, bad values, a missing package, a
# non-finite loss, out of memory); anything else is a bug in nanoLRC and keeps its traceback
EXPECTED = (OSError, ValueError, KeyError, FloatingPointError, RuntimeError, ImportError,
            MemoryError)


def run_or_exit(main, *args, **kwargs):
    """Run a script's main: an EXPECTED failure is printed as one line `error: ...` on stderr with
    exit status 1 (2 for a ConfigError, as configure_or_exit), Ctrl-C exits 130 quietly.
    NANOLRC_DEBUG=1 re-raises instead, for the traceback. The messages name the file or key and say
    what to do, so they are all a user needs."""
    try:
        return main(*args, **kwargs)
    except KeyboardInterrupt:
        if os.environ.get("NANOLRC_DEBUG"):
            raise
        sys.exit(130)
    except EXPECTED as e:
        if os.environ.get("NANOLRC_DEBUG"):
            raise
        # a KeyError's str() is its repr
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
            message += f": {e.filename}"
        # one line, however the library wrote it
        message = " ".join(str(message).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)


# ranges for check_ranges: (test, what the value must be)
AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
POSITIVE = (lambda v: v > 0, "> 0")
PROBABILITY = (lambda v: 0 < v <= 1, "in (0, 1]")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")


def check_ranges(cfg: dict, ranges: dict, choices: dict | None = None):
    """Raise a ConfigError naming the first key whose value is out of its range (key -> (test,
    what), e.g. AT_LEAST_1) or not one of its choices (key -> allowed values)."""
    for key, (ok, what) in ranges.items():
        if not ok(cfg[key]):
            raise ConfigError(f"--{key}={cfg[key]!r}: {key} must be {what}")
    for key, allowed in (choices or {}).items():
        if cfg[key] not in allowed:
            raise ConfigError(f"--{key}={cfg[key]!r}: {key} must be one of {list(allowed)}")


def _unknown(key, keys, where):
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    if where.endswith(".py"):
        hint += " (helpers in a config file must start with '_')"
    return ConfigError(f"{where}: unknown config key '{key}'{hint}")


def _check(key, value, default, where):
    """Return value, converted where harmless, if it fits the type of the default; else raise."""
    if default is None:  # no type to check against
        return value
    if isinstance(default, bool):  # before int: bool is a subclass of int
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in ("true", "1", "false", "0"):
            return str(value).lower() in ("true", "1")
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # --grad_clip=1 means 1.0
    elif isinstance(value, type(default)) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: config key '{key}' expects {type(default).__name__}, "
                      f"got {type(value).__name__} {value!r}")


def _run_file(path, config):
    """Execute a config file; return the top-level names it defines, as a dict."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from e
    namespace = dict(config)
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as e:  # report the config file's line, not configurator's
        lines = [fs.lineno for fs in traceback.extract_tb(e.__traceback__) if fs.filename == path]
        where = f"{path}:{e.lineno if isinstance(e, SyntaxError) else lines[-1] if lines else '?'}"
        raise ConfigError(f"{where}: {type(e).__name__}: {e}") from e
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, types.ModuleType)}


def configure(defaults: dict, argv: list[str]) -> dict:
    """Apply config files and --key=value arguments to a copy of defaults; raise ConfigError."""
    # lists copied: a config file's `source += [...]` must not change the defaults' own list
    config = {k: list(v) if isinstance(v, list) else v for k, v in defaults.items()}
    for arg in argv:
        if arg.endswith(".py") and not arg.startswith("--"):
            for key, value in _run_file(arg, config).items():
                if key not in defaults:
                    raise _unknown(key, defaults, arg)
                config[key] = _check(key, value, defaults[key], arg)
        elif arg.startswith("--") and "=" in arg:
            key, raw = arg[2:].split("=", 1)
            if key not in defaults:
                raise _unknown(key, defaults, arg)
            if isinstance(defaults[key], list):  # a new list, never the default's own
                config[key] = [*config[key], raw]  # --source=a.txt --source=b.txt: both
                continue
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word such as --init_from=resume
            if isinstance(defaults[key], str):
                value = raw  # a str key takes the text as given: --out_dir=2024 is '2024'
            config[key] = _check(key, value, defaults[key], arg)
        else:
            raise ConfigError(f"bad argument '{arg}': expected a config file ending in .py or "
                              "--key=value")
    return config


def configure_or_exit(defaults: dict, argv: list[str] | None = None) -> dict:
    """configure() for scripts: on a ConfigError print it to stderr and exit with status 2.
    -h / --help: the script's docstring and every key with its default, then exit 0."""
    argv = sys.argv[1:] if argv is None else argv
    # log lines reach a redirected stdout (a cluster job's log) at once
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    if {"-h", "--help"} & set(argv):
        print((sys.modules["__main__"].__doc__ or "").strip())
        print("\nkeys (--key=value, or assigned in a config/*.py file):")
        for key, value in defaults.items():
            print(f"  --{key}={value!r}")
        sys.exit(0)
    try:
        return configure(defaults, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
