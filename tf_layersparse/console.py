"""Quiet command-line entry points: TensorFlow's C++ log lines hidden.

Loading TensorFlow writes lines like `cudart_stub.cc: Could not find cuda
drivers on your machine` and `cpu_feature_guard.cc: This TensorFlow binary
is optimized ...` to stderr, and its first operation on a machine without a
GPU adds `E0000 ... failed call to cuInit`, which reads like a failure. The
package's commands (`python -m tf_layersparse.demo`, `python -m
tf_layersparse.experiments`, and their console scripts) hide them, unless
the user set `TF_CPP_MIN_LOG_LEVEL` (then TensorFlow logs as asked).

`python -m tf_layersparse.demo` imports the package before the demo, so
the package's `__init__` calls `quiet_if_entry_point` before anything loads
Keras. This module imports nothing but the standard library.
"""

import contextlib
import os
import sys

__all__ = ["entry_point", "quiet_if_entry_point", "quiet_tensorflow"]

SCRIPTS = ("tf-layersparse-demo", "tf-layersparse-experiments")


def entry_point(argv=None):
    """The package's command this process runs, or None.

    `argv` is the interpreter's own command line (`sys.orig_argv`, Python
    3.10+; `sys.argv` before that, which names console scripts only). An
    installed console script runs as `python /path/to/tf-layersparse-demo
    ...`, so the script is the first argument after the interpreter's own
    options, not `argv[0]`.

    >>> entry_point(["python", "-m", "tf_layersparse.demo", "--quick"])
    'tf_layersparse.demo'
    >>> entry_point(["/usr/bin/python3", "/venv/bin/tf-layersparse-experiments", "--help"])
    'tf-layersparse-experiments'
    >>> entry_point(["/usr/bin/tf-layersparse-experiments", "--help"])
    'tf-layersparse-experiments'
    >>> entry_point(["python", "-m", "pytest"]) is None
    True
    """
    if argv is None:
        argv = getattr(sys, "orig_argv", None) or sys.argv
    if not argv:
        return None
    if _script_name(argv[0]) in SCRIPTS:  # sys.argv, or a launcher that runs the script itself
        return _script_name(argv[0])
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m" or (arg.startswith("-m") and not arg.startswith("--")):
            module = arg[2:] or (argv[i + 1] if i + 1 < len(argv) else "")
            ours = module == "tf_layersparse" or module.startswith("tf_layersparse.")
            return module if ours else None
        if arg in ("-c", "-") or arg.startswith("-c"):
            return None  # what follows are the command's arguments, not a script
        if not arg.startswith("-"):
            script = _script_name(arg)
            return script if script in SCRIPTS else None
        # an option with its value in the next argument: -W error, -X importtime
        i += 2 if arg in _OPTIONS_WITH_VALUE else 1
    return None


# the interpreter's options whose value may be the next argument
_OPTIONS_WITH_VALUE = ("-W", "-X", "--check-hash-based-pycs")


def _script_name(path):
    script = os.path.basename(path)
    script = script[:-len("-script.py")] if script.endswith("-script.py") else script
    return script[:-len(".exe")] if script.endswith(".exe") else script


@contextlib.contextmanager
def _stderr_to_devnull():
    """Send file descriptor 2 (where C++ code logs) to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_tensorflow():
    """Hide TensorFlow's C++ logging, unless `TF_CPP_MIN_LOG_LEVEL` is set.

    Sets it to 3 and imports Keras (and so its backend) with stderr sent to
    /dev/null: the lines written while TensorFlow loads come before its
    log level applies. An import that fails is left for the caller's own
    import to raise, visibly. Returns True if it did anything.
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "keras" in sys.modules:
        return False
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    try:
        with _stderr_to_devnull():
            import keras  # noqa: F401
    except Exception:  # noqa: BLE001 - raised again where the caller imports it
        pass
    return True


def quiet_if_entry_point():
    """`quiet_tensorflow()` when this process runs one of the package's commands."""
    if entry_point() is not None:
        return quiet_tensorflow()
    return False
