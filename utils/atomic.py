"""Atomic file writes: a crash or preemption mid-write never leaves a half file behind.

Every file the project writes for later reading (checkpoints, curves, the data
index, model.json, evaluation reports) goes through `atomic_write`: the data
goes to a temporary file in the target's folder (same filesystem, so the final
`os.replace` is atomic), which then replaces the target in one step.
"""
import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterator, Optional


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', fsync: bool = False, **open_kwargs) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on a clean exit it replaces `path`.

    `mode` is 'w' (text) or 'wb' (binary); `open_kwargs` go to `open` (e.g.
    ``newline=''``). With `fsync`, the data reaches the disk before the rename
    (for files that must survive a power cut, such as checkpoints). On an
    exception the temporary file is removed and `path` is left as it was.
    """
    if mode not in ('w', 'wb'):
        raise ValueError(f"atomic_write writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=os.path.splitext(path)[1])
    try:
        # mkstemp makes the file owner-only (0600); give it the permissions a plain open() would
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, document: Any, indent: Optional[int] = None) -> str:
    """`document` as JSON at `path`, atomically; values JSON does not know (paths, numpy numbers) as strings."""
    text = json.dumps(document, indent=indent, default=str)
    with atomic_write(path, 'w') as f:
        f.write(text)
    return path
