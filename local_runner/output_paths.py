"""Checks of the paths a user names for results (`--output`), before any work is done.

Each problem is an `InputError` naming the option and the path (the command exits 2 with one
line): a file where a folder is meant or the reverse, a symbolic link to nothing (refused: where
it points may be a disk that is not mounted), a folder that cannot be created or written (read-only
mount, permissions; checked by writing a probe file, which also catches what `os.access` misses), a
file name longer than the file system takes. `fitted_name` shortens a result's name that would be
too long, deterministically.
"""
import hashlib
import os
import tempfile
from typing import Sequence

from utils.core.errors import InputError

DEFAULT_NAME_MAX = 255  # bytes per name on ext4, XFS, btrfs, APFS, NTFS (in UTF-16 units there)
PROBE_PREFIX = '.write-test-'


def name_max(folder: str) -> int:
    """The longest file name, in bytes, the file system under `folder` (or its nearest existing parent) takes."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return int(os.pathconf(folder, 'PC_NAME_MAX'))
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def _dangling(path: str) -> str:
    """The first component of `path` that is a symbolic link to nothing, or ''."""
    parts, current = os.path.abspath(path).split(os.sep)[1:], os.sep
    for part in parts:
        current = os.path.join(current, part)
        if os.path.islink(current) and not os.path.exists(current):
            return current
    return ''


def _refuse_dangling(path: str, option: str) -> None:
    link = _dangling(path)
    if link:
        target = os.path.join(os.path.dirname(link), os.readlink(link))
        where = '' if link == os.path.abspath(path) else f' ({link})'
        raise InputError(f'{option} {path}{where} is a symbolic link to {target}, which does not exist: '
                         f'create that, or give another path')


def _blocker(path: str) -> str:
    """The nearest existing parent of `path` when it is not a folder (a file on the way), else ''."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    return parent if not os.path.isdir(parent) else ''


def _kind(path: str) -> str:
    return 'a folder' if os.path.isdir(path) else 'a file' if os.path.isfile(path) else 'a special file'


def writable_folder(path: str, option: str, probe_suffix: str = '') -> str:
    """`path` as a folder this process can write in, created if needed; InputError naming what is wrong.

    The probe file is named like the files that will be written there (`probe_suffix`: their extension)."""
    _refuse_dangling(path, option)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f'{option} {path} is {_kind(path)}, not a folder')
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        blocker = _blocker(path)
        detail = f'{blocker} is {_kind(blocker)}, not a folder' if blocker else (err.strerror or str(err))
        raise InputError(f'{option} {path}: cannot create the folder: {detail}') from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=PROBE_PREFIX, suffix=probe_suffix)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise InputError(f'{option} {path} is not writable: {err.strerror or err}') from None
    return path


def writable_file(path: str, option: str, companions: Sequence[str] = ()) -> str:
    """`path` as a file this process can write (its folder created if needed). `companions`: suffixes of the
    files written beside it (`path + suffix`), whose names must fit the file system too."""
    _refuse_dangling(path, option)
    if os.path.isdir(path) or path.endswith(os.sep):
        raise InputError(f'{option} {path} is a folder: give a file path inside it')
    if os.path.lexists(path) and not os.path.isfile(path):
        raise InputError(f'{option} {path} is {_kind(path)}, not a regular file')
    folder = os.path.dirname(os.path.abspath(path))
    limit = name_max(folder)
    for name in [os.path.basename(path)] + [os.path.basename(path) + suffix for suffix in companions]:
        size = len(os.fsencode(name))
        if size > limit:
            raise InputError(f'{option} {path}: the file name {name[:40]}... is {size} bytes, over the '
                             f'{limit} the file system takes: give a shorter name')
    writable_folder(folder, f'{option} {path}: its folder', probe_suffix=os.path.splitext(path)[1])
    return path


def fitted_name(name: str, longest_suffix: int, limit: int = DEFAULT_NAME_MAX) -> str:
    """`name` (a relative path) whose last part, plus a suffix of `longest_suffix` bytes, fits in `limit`
    bytes: a longer one is cut at a character boundary and given `~` and 10 hex digits of its hash, so
    two long names that start alike stay apart, and the same name always gives the same result."""
    folder, base = os.path.split(name)
    raw = os.fsencode(base)
    if len(raw) + longest_suffix <= limit:
        return name
    tag = '~' + hashlib.sha1(os.fsencode(name)).hexdigest()[:10]
    cut = raw[:max(1, limit - longest_suffix - len(tag))]
    for _ in range(3):  # a UTF-8 character is at most 4 bytes: step back out of one cut in its middle
        try:
            cut.decode('utf-8')
            break
        except UnicodeDecodeError:  # (a name that is not UTF-8 at all stays cut where it was)
            cut = cut[:-1] if len(cut) > 1 else cut
    return os.path.join(folder, os.fsdecode(cut) + tag)
