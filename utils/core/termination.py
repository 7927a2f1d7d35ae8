"""SIGTERM as an exception on the main thread, so a preempted run ends the way an error does: the trainer writes
the last finished epoch's checkpoints (`HookBase.on_failure`) and its caller saves what it can.

Kubernetes preempts a pod with SIGTERM and kills it about 30 s later; Python's default is to die at once.
Python runs signal handlers on the main thread only, so this acts only there, and only when the process has
no SIGTERM handler of its own (a runner that handles the signal keeps doing so).
"""
import contextlib
import signal
import threading
from typing import Callable, Iterator

EXIT_CODE = 128 + signal.SIGTERM  # 143: what a shell reports for a process SIGTERM ended


class TrainingTerminated(RuntimeError):
    """SIGTERM stopped training (a preemption): an error the platform's save-on-failure handles."""


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped a command: handled like Ctrl-C, with its own exit code."""


@contextlib.contextmanager
def sigterm_raises(make_error: Callable[[], BaseException]) -> Iterator[bool]:
    """Within the block, SIGTERM raises `make_error()` wherever the main thread is; yields whether it could
    (on the main thread, and no other handler installed). The previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield False
        return

    def handler(signum, frame):
        raise make_error()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield True
    finally:
        signal.signal(signal.SIGTERM, previous)
