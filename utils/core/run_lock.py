"""One training run per output folder: an OS lock on a file in the folder.

`fcntl.flock` on ``<folder>/.run.lock``, taken without waiting: a second run on the same folder
gets a `RunInUseError` at once instead of interleaving its checkpoints with the first's. The kernel
releases the lock when the holding process dies, however it dies (kill -9 included), so a crashed
run never leaves a stale lock; the file itself stays, empty of meaning, and is reused. The holder's
pid is written in it for the message only. Linux and macOS (flock); on NFS, Linux emulates flock
with a whole-file POSIX lock, which the server arbitrates.
"""
import contextlib
import errno
import fcntl
import logging
import os
from typing import Iterator

from utils.core.errors import InputError

LOCK_NAME = '.run.lock'
# what flock raises where the file system keeps no locks (some FUSE and network mounts): run unguarded
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

logger = logging.getLogger(__name__)


class RunInUseError(InputError):
    """Another live process holds the folder's run lock."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode('ascii', 'replace').strip()
    except OSError:
        return ''
    return f' (pid {text})' if text.isdigit() else ''


def _lock(fd: int, path: str, what: str) -> bool:
    """Take the lock without waiting; False where the file system keeps no locks (said in a warning)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in _NO_LOCKS:
            logger.warning('%s: the file system does not support locks (%s): nothing keeps another run '
                           'from using the folder at the same time', what, err.strerror or err)
            return False
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise InputError(f'{what}: cannot lock {path}: {err.strerror or err}') from None
        raise RunInUseError(f'{what} is in use by another run{_holder(fd)}: wait for it to finish, or '
                            f'choose another folder') from None


@contextlib.contextmanager
def run_lock(folder: str, what: str = 'folder') -> Iterator[str]:
    """Hold the run lock of `folder` (which must exist) for the block; `what` names it in the error
    (e.g. ``--output /runs/a``). Yields the lock file's path."""
    path = os.path.join(folder, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise InputError(f'{what}: cannot create the run lock {path}: {err.strerror or err}') from None
    try:
        if _lock(fd, path, what):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode('ascii'), 0)
        yield path
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
