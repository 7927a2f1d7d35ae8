"""Upload the trainer's checkpoints to the model's artifacts while training runs.

Why: the SDK uploads a run's files only once `train` returns or raises. A pod
reset or a preemption kills the process before either, and the retried
execution starts on a fresh pod that has nothing but the model's artifacts.
With the resume checkpoint uploaded every `interval_s`, such a retry resumes
from it and loses at most that interval plus the epoch in progress
(`utils.training.run_folder.RunFolder.restore_from` copies them back).

How: at an epoch end (the checkpoints of the epoch are written by then) the
files that changed since their last upload are copied to a staging folder on
the training thread, so the trainer may overwrite its own copies at once, and
one background thread uploads them in order. Never two uploads at once: an
epoch end that finds the previous upload still running leaves it to the next.
A failed upload is logged and retried at the next due epoch end; it never
stops training. An upload that times out (`upload` raises a TimeoutError: a
stalled connection is never answered) is abandoned, said in one line: the next
round, or the run's final save, uploads the same files.
"""
import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from utils.training.hooks import HookBase

logger = logging.getLogger(__name__)

Signature = Tuple[int, int, int]
STAGING_PREFIX = '.checkpoint-upload-'


def _signature(path: str) -> Optional[Signature]:
    """Identity of a file's current version: checkpoints are replaced atomically, so a new write is a new inode."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class CheckpointUploader(HookBase):
    """Uploads `names` from `weights_dir` to `<artifacts>/<remote_dir>/<name>` at most every `interval_s` seconds.

    Staged copies live in a temporary folder under `staging_parent`: put it beside
    the output folder, never in it (the SDK uploads the output folder's content).

    `upload(folder)` must upload the contents of `folder` to the model's artifacts
    keeping their relative paths, and raise when it fails. `names` are uploaded
    in order, each only when it changed, and a failure skips the rest of the
    round: with ('best.pth', 'last.pth'), an uploaded last.pth (the file a retry
    resumes from) never names a best epoch whose best.pth did not reach the
    platform. `already_uploaded` names files whose current local copy came from
    the artifacts (a resumed run), so they are not sent back unchanged.
    """

    def __init__(self, upload: Callable[[str], object], weights_dir: str, remote_dir: str, names: Sequence[str],
                 interval_s: float, staging_parent: str, already_uploaded: Iterable[str] = (),
                 clock: Callable[[], float] = time.monotonic):
        self._upload, self._weights_dir, self._remote_dir = upload, weights_dir, remote_dir
        self._staging_parent = staging_parent
        for stale in glob.glob(os.path.join(staging_parent, STAGING_PREFIX + '*')):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        self._names, self._interval_s, self._clock = tuple(names), float(interval_s), clock
        self.checkpoint_every_s = self._interval_s  # an upload needs files written since the last round
        self._uploaded: Dict[str, Signature] = {}
        for name in already_uploaded:
            signature = _signature(os.path.join(weights_dir, name))
            if signature is not None:
                self._uploaded[name] = signature
        self._last_round = clock()  # the first round is due `interval_s` after training starts
        self._thread: Optional[threading.Thread] = None
        self._staging_root: Optional[str] = None
        self.uploaded_names = set()  # names this run uploaded at least once

    def after_checkpoint(self, epoch: int, epochs: int) -> None:
        if epoch + 1 < epochs:  # the last epoch's files go up with the run's own save
            self.epoch_end(epoch)

    def after_train(self, run) -> None:
        self.close()

    def on_failure(self, run) -> None:
        self.close()

    def epoch_end(self, epoch: int) -> None:
        """Start an upload round when one is due and the previous one has finished; returns at once, never raises."""
        try:
            self._start_round(epoch)
        except Exception as err:  # the checkpoints stay on disk; training must not die for their upload
            logger.warning('epoch %d: could not start the checkpoint upload (%s: %s); the next epoch end tries again',
                           epoch + 1, type(err).__name__, err)

    def _start_round(self, epoch: int) -> None:
        if self._thread is not None and self._thread.is_alive():
            logger.info('epoch %d: the previous checkpoint upload is still running; the next epoch end retries',
                        epoch + 1)
            return
        if self._clock() - self._last_round < self._interval_s:
            return
        files = self._stage(epoch)
        if not files:
            return
        self._last_round = self._clock()
        self._thread = threading.Thread(target=self._run, args=(epoch, files), name='checkpoint-upload', daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Wait for the upload in flight (so nothing lands after the caller's own uploads or deletes; `upload`'s
        deadline bounds it); clean up."""
        thread = self._thread
        while thread is not None and thread.is_alive():
            thread.join(timeout=60)
            if thread.is_alive():
                logger.info('waiting for the checkpoint upload in flight to finish')
        if self._staging_root is not None:
            shutil.rmtree(self._staging_root, ignore_errors=True)
            self._staging_root = None

    def _stage(self, epoch: int) -> List[Tuple[str, str, Signature]]:
        """Copy each changed file to its own staging folder: (name, folder to upload, signature of the copy)."""
        staged: List[Tuple[str, str, Signature]] = []
        try:
            if self._staging_root is None:
                os.makedirs(self._staging_parent, exist_ok=True)
                self._staging_root = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self._staging_parent)
            for name in self._names:
                source = os.path.join(self._weights_dir, name)
                signature = _signature(source)
                if signature is None or self._uploaded.get(name) == signature:
                    continue
                folder = os.path.join(self._staging_root, f'epoch{epoch + 1}-{name}')
                staged.append((name, folder, signature))
                os.makedirs(os.path.join(folder, self._remote_dir), exist_ok=True)
                shutil.copyfile(source, os.path.join(folder, self._remote_dir, name))
        except OSError as err:  # e.g. a full disk: training goes on, the next due epoch end tries again
            logger.warning('epoch %d: could not stage the checkpoints for upload (%s: %s); the next epoch end '
                           'tries again', epoch + 1, type(err).__name__, err)
            for _, folder, _ in staged:
                shutil.rmtree(folder, ignore_errors=True)
            return []
        return staged

    def _run(self, epoch: int, files: List[Tuple[str, str, Signature]]) -> None:
        try:
            for name, folder, signature in files:
                remote = f'{self._remote_dir}/{name}'
                tic = time.monotonic()
                try:
                    self._upload(folder)
                except TimeoutError as err:  # a stalled upload: its thread is left to the SDK
                    logger.warning('abandoning the upload of %s of epoch %d: %s; the same files go up with the next '
                                   'upload (the run\'s final save at the latest)', remote, epoch + 1, err)
                    return
                except Exception as err:  # never fatal: the checkpoint stays on disk and the next round retries
                    logger.warning('could not upload %s of epoch %d to the model\'s artifacts (%s: %s); '
                                   'training goes on and retries at the next due epoch end',
                                   remote, epoch + 1, type(err).__name__, err,
                                   exc_info=logger.isEnabledFor(logging.DEBUG))
                    return
                self._uploaded[name] = signature
                self.uploaded_names.add(name)
                logger.info('uploaded %s of epoch %d to the model\'s artifacts (%.1f s)', remote, epoch + 1,
                            time.monotonic() - tic)
        finally:
            for _, folder, _ in files:
                shutil.rmtree(folder, ignore_errors=True)
