"""Checkpoints written off the training thread, every `interval_s`.

Writing ``last.pth`` (weights + optimizer state, with fsync) after every epoch costs
as much as a short epoch on a small dataset. At each epoch end the trainer hands the
epoch's checkpoints to `CheckpointWriter.epoch_end`. When a write is due (every
`interval_s`, and after the final epoch) they are snapshotted to the CPU, so the files
hold exactly that epoch's weights, and written on one background thread while the next
epoch trains. Otherwise they are kept as a copy on the device (a millisecond on a GPU).
Either way ``on_written(epoch)`` follows, once per epoch and in order.

- Never two writes at once: `submit` first waits for the previous job.
- Nothing is lost: an error of a job (the disk is full, non-finite weights, or an
  exception from ``on_written``) is raised on the training thread by the next
  `check`, `submit` or `wait`. A run that stops with an error writes the kept copy
  (`close_quietly`), so its finished epochs survive it.
"""
import logging
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple

import torch

from utils.modeling.checkpoints import cpu_copy, device_copy, save_checkpoint

logger = logging.getLogger(__name__)


class CheckpointWriter:
    def __init__(self, on_written: Optional[Callable[[int], None]] = None, interval_s: float = 0.0):
        self._on_written = on_written
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._interval = float(interval_s)
        self._written_at = time.monotonic()  # the run's start counts as a write: the first comes an interval later
        self._unwritten: Optional[Sequence[Tuple[str, Mapping[str, Any]]]] = None  # on the device

    def epoch_end(self, epoch: int, files: Sequence[Tuple[str, Mapping[str, Any]]], final: bool,
                  snapshots: Iterable[torch.Tensor] = ()) -> bool:
        """Take an epoch's checkpoints (holding live tensors, which training goes on changing): written in
        the background when due, else kept on the device (but for `snapshots`, tensors that are copies
        already: the best epoch's weights). True when they go to disk."""
        self.wait()  # the previous epoch's files are written before this epoch's snapshot takes memory
        if final or time.monotonic() - self._written_at >= self._interval:
            self.submit(epoch, cpu_copy(list(files)))
            self._written_at, self._unwritten = time.monotonic(), None
            return True
        self._unwritten = device_copy(list(files), snapshots)
        self.submit(epoch, [])  # nothing to write: on_written still comes, in order
        return False

    def submit(self, epoch: int, files: Sequence[Tuple[str, Mapping[str, Any]]]) -> None:
        """Write each (path, checkpoint) in order in the background, then call ``on_written(epoch)``.

        The checkpoints must be snapshots (`utils.modeling.checkpoints.cpu_copy`): training goes on meanwhile.
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
        """Wait for the job in progress while another exception is on its way, then write the checkpoints kept
        since the last write; errors are logged."""
        try:
            self.wait()
        except BaseException as err:
            logger.error('writing the checkpoints failed as well: %s: %s', type(err).__name__, err)
        unwritten, self._unwritten = self._unwritten, None
        for path, checkpoint in cpu_copy(list(unwritten or [])):
            try:
                save_checkpoint(checkpoint, path)
                logger.info('wrote %s (epoch %d) before stopping', path, checkpoint.get('epoch', -1) + 1)
            except Exception as err:
                logger.error('could not write %s before stopping: %s: %s', path, type(err).__name__, err)
