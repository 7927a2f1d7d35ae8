"""Checkpoints written off the training thread.

Writing ``last.pth`` (weights + optimizer state, with fsync) after every epoch costs
as much as a short epoch on a small dataset. The trainer takes a CPU snapshot of the
state at the end of the epoch (so the files hold exactly that epoch's weights) and
hands it to a `CheckpointWriter`, which writes the files on one background thread
while the next epoch trains, then calls ``on_written(epoch)``.

- Never two writes at once: `submit` first waits for the previous job.
- Nothing is lost: an error of a job (the disk is full, non-finite weights, or an
  exception from ``on_written``) is raised on the training thread by the next
  `check`, `submit` or `wait`.
"""
import logging
import threading
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

from utils.model_factory import save_checkpoint

logger = logging.getLogger(__name__)


class CheckpointWriter:
    def __init__(self, on_written: Optional[Callable[[int], None]] = None):
        self._on_written = on_written
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, epoch: int, files: Sequence[Tuple[str, Mapping[str, Any]]]) -> None:
        """Write each (path, checkpoint) in order in the background, then call ``on_written(epoch)``.

        The checkpoints must be snapshots (`utils.model_factory.cpu_copy`): training goes on meanwhile.
        """
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(epoch, list(files)), daemon=True,
                                        name=f'checkpoint-writer-epoch-{epoch + 1}')
        self._thread.start()

    def _write(self, epoch: int, files) -> None:
        try:
            for path, checkpoint in files:
                save_checkpoint(checkpoint, path)
            if self._on_written is not None:
                self._on_written(epoch)
        except BaseException as err:  # handed to the training thread, which raises it
            self._error = err

    def check(self) -> None:
        """Raise the error of a job that has ended, without waiting for one still running."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Wait for the job in progress (if any); raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close_quietly(self) -> None:
        """Wait for the job in progress while another exception is on its way: its error is logged."""
        try:
            self.wait()
        except BaseException as err:
            logger.error('writing the checkpoints failed as well: %s: %s', type(err).__name__, err)
