"""Start a few local worker processes and wait for all of them, boundedly.

Used by tests/test_distributed.py and benchmarks/two_process.py. Each
worker runs in its own process group, so that whatever it starts (XLA's or
gloo's helper threads live in the worker itself, but a worker may fork)
goes with it. The first worker that fails, or the deadline, ends the whole
run: a collective whose peer has died would otherwise wait forever.
"""

import os
import signal
import socket
import subprocess
import tempfile
import time

__all__ = ["WorkerFailure", "free_port", "run_workers"]


class WorkerFailure(RuntimeError):
    """A worker exited with an error, or the run passed its deadline.

    `outputs` holds `(returncode, combined stdout and stderr)` per worker;
    the message shows the end of each.
    """

    def __init__(self, why, outputs):
        self.outputs = outputs
        shown = "\n".join(f"--- worker {i} (exit {code}):\n{text[-4000:]}"
                          for i, (code, text) in enumerate(outputs))
        super().__init__(f"{why}\n{shown}")


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Example:

    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs):
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in procs:
        proc.wait()


def run_workers(commands, env=None, timeout=300, cwd=None):
    """Run `commands` (argument lists) at once; `[(returncode, output)]`.

    Raises `WorkerFailure` as soon as one exits non-zero (the others are
    killed, their process groups with them) or when `timeout` seconds
    pass. `env` is one mapping for all, or one per command.

    Example:

    >>> import sys
    >>> [code for code, _ in run_workers([[sys.executable, "-c", "print(1)"]] * 2)]
    [0, 0]
    """
    envs = env if isinstance(env, (list, tuple)) else [env] * len(commands)
    procs, logs = [], []
    try:
        for command, environment in zip(commands, envs):
            # a file, not a pipe: a chatty worker cannot block on a full pipe
            log = tempfile.TemporaryFile("w+")
            logs.append(log)
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                          env=environment, cwd=cwd, text=True,
                                          start_new_session=True))
        deadline = time.monotonic() + timeout
        why = None
        while why is None:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                break
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                why = f"worker {failed[0]} exited with {codes[failed[0]]}"
            elif time.monotonic() > deadline:
                why = f"workers still running after {timeout} s"
            else:
                time.sleep(0.2)
        _stop(procs)
        outputs = []
        for proc, log in zip(procs, logs):
            log.seek(0)
            outputs.append((proc.returncode, log.read()))
        if why is not None:
            raise WorkerFailure(why, outputs)
        return outputs
    finally:
        _stop(procs)
        for log in logs:
            log.close()
