"""Atomic file writes: a crash or preemption mid-write never leaves a half file behind.

Every file the project writes for later reading (checkpoints, curves, the data
index, model.json, evaluation reports) goes through `atomic_write`: the data
goes to a temporary file in the target's folder (same filesystem, so the final
`os.replace` is atomic), which then replaces the target in one step.

A process killed mid-write leaves its temporary file behind (``.tmp-XXXXXXXX`` plus
the target's extension, as `tempfile.mkstemp` names it); `remove_stale_temporaries`
deletes those on the next run. A full disk (ENOSPC, EDQUOT) is a `DiskFullError`
naming the file, not a traceback.
"""
import contextlib
import errno
import json
import logging
import os
import re
import stat
import shutil
import tempfile
import threading
import time
from typing import IO, Any, Iterator, List, Optional, Set

from utils.core.errors import DiskFullError

logger = logging.getLogger(__name__)

TEMP_PREFIX = '.tmp-'
# exactly what mkstemp(prefix=TEMP_PREFIX, suffix=<extension>) makes: 8 characters of its alphabet
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r'[a-z0-9_]{8}(\.[A-Za-z0-9]+)?$')
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_STARTED = time.time()  # temporaries older than this process cannot be its own writes in progress
_in_flight: Set[str] = set()  # this process's temporaries being written now (any thread)
_in_flight_lock = threading.Lock()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# read once: os.umask can only be read by setting it, and checkpoints are written from a background
# thread while the main thread creates files (a file created in between would get umask 0)
_UMASK = _umask()


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', fsync: bool = False, **open_kwargs) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on a clean exit it replaces `path`.

    `mode` is 'w' (text) or 'wb' (binary); `open_kwargs` go to `open` (e.g.
    ``newline=''``). With `fsync`, the data reaches the disk before the rename
    (for files that must survive a power cut, such as checkpoints). On an
    exception the temporary file is removed and `path` is left as it was; a full disk
    becomes a `DiskFullError` naming `path`.
    """
    if mode not in ('w', 'wb'):
        raise ValueError(f"atomic_write writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=os.path.splitext(path)[1])
    except OSError as err:
        _raise_if_disk_full(err, path)
        raise
    with _in_flight_lock:
        _in_flight.add(tmp)
    try:
        # mkstemp makes the file owner-only (0600); give it the permissions a plain open() would
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        _raise_if_disk_full(err, path)
        raise
    finally:
        with _in_flight_lock:
            _in_flight.discard(tmp)


def _raise_if_disk_full(err: BaseException, path: str) -> None:
    """A DiskFullError for `path` when `err` or what it wraps is ENOSPC / EDQUOT (torch.save turns the
    OSError of its file into a RuntimeError whose context is that OSError)."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL:
            what = 'the disk quota is exceeded' if seen.errno == errno.EDQUOT else 'the disk is full'
            raise DiskFullError(f'cannot write {path}: {what} ({os.path.dirname(os.path.abspath(path))}); free some '
                                f'space there or write to another folder, then run again (the previous '
                                f'{os.path.basename(path)}, if any, is kept)') from err
        seen = seen.__cause__ or seen.__context__


def remove_stale_temporaries(folder: str, recursive: bool = False) -> List[str]:
    """Delete the temporaries that interrupted `atomic_write`s left in `folder` (and below, with
    `recursive`); return their paths.

    Only names `atomic_write` makes, and only files that no write of this process has open and
    that were last written before this process started: another run's write in progress is
    never touched, nor is any other file.
    """
    removed, freed = [], 0
    walk = os.walk(folder) if recursive else [(folder, [], _names_or_empty(folder))]
    with _in_flight_lock:
        busy = set(_in_flight)
    for directory, _, names in walk:
        for name in names:
            path = os.path.join(directory, name)
            if not _TEMP_NAME.match(name) or path in busy:
                continue
            try:
                info = os.lstat(path)
                if not stat.S_ISREG(info.st_mode) or info.st_mtime >= _STARTED:
                    continue
                os.remove(path)
            except OSError as err:  # gone already, or not ours to delete: leave it
                logger.debug('could not remove %s: %s', path, err)
                continue
            removed.append(path)
            freed += info.st_size
    if removed:
        logger.info('removed %d temporary file(s) (%.1f MB) that an interrupted write left in %s',
                    len(removed), freed / 1e6, folder)
    return removed


def _names_or_empty(folder: str) -> List[str]:
    try:
        return os.listdir(folder)
    except OSError:  # no folder yet: nothing to clean
        return []


def copy_file(source: str, path: str) -> str:
    """Copy `source` to `path` atomically: a copy cut off half-way never stands at `path`."""
    with open(source, 'rb') as src, atomic_write(path, 'wb') as f:
        shutil.copyfileobj(src, f)
    return path


def write_json(path: str, document: Any, indent: Optional[int] = None) -> str:
    """`document` as JSON at `path`, atomically; values JSON does not know (paths, numpy numbers) as strings."""
    text = json.dumps(document, indent=indent, default=str)
    with atomic_write(path, 'w') as f:
        f.write(text)
    return path
