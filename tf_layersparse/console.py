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
    3.10+; `sys.argv` before that, which names console scripts only).

    >>> entry_point(["python", "-m", "tf_layersparse.demo", "--quick"])
    'tf_layersparse.demo'
    >>> entry_point(["/usr/bin/tf-layersparse-experiments", "--help"])
    'tf-layersparse-experiments'
    >>> entry_point(["python", "-m", "pytest"]) is None
    True
    """
    if argv is None:
        argv = getattr(sys, "orig_argv", None) or sys.argv
    for i, arg in enumerate(argv):
        module = argv[i + 1] if arg == "-m" and i + 1 < len(argv) else (
            arg[2:] if arg.startswith("-m") and len(arg) > 2 else None)
        if module is not None:  # the first -m is the interpreter's
            ours = module == "tf_layersparse" or module.startswith("tf_layersparse.")
            return module if ours else None
    script = os.path.basename(argv[0]) if argv else ""
    script = script[:-len("-script.py")] if script.endswith("-script.py") else script
    script = script[:-len(".exe")] if script.endswith(".exe") else script
    return script if script in SCRIPTS else None


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
