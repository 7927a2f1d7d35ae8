"""Checks of the command line's arguments and paths, before anything heavy is imported.

Each check raises `InputError` with a message naming the option and the path,
so a wrong path fails in a fraction of a second with one line.
"""
import json
import logging
import os
import stat
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

from local_runner.output_paths import DEFAULT_NAME_MAX, fitted_name
from utils.core import config as config_lib
from utils.core.config import ConfigError
from utils.core.errors import InputError
from utils.data.image_files import image_extensions

logger = logging.getLogger(__name__)

RESULT_EXTENSIONS = ('.json', '.png')  # what `predict` writes per input: <name>.json, <name>.png


def _visible_names(path: str) -> List[str]:
    return sorted(name for name in os.listdir(path) if not name.startswith('.'))


def check_data_dir(path: str, subsets: Sequence[str], option: str = '--data') -> str:
    """`path` must be a folder holding each of `subsets` (Dataloop download layout)."""
    if not os.path.exists(path):
        raise InputError(f'{option} {path}: no such folder')
    if not os.path.isdir(path):
        raise InputError(f'{option} {path} is a file, not a folder with {"/ and ".join(subsets)}/ inside')
    found = _visible_names(path)
    layout = 'Dataloop download layout: <subset>/items/ images and <subset>/json/ item JSONs'
    if not found:
        raise InputError(f'{option} {path} is empty: expected {" and ".join(s + "/" for s in subsets)} ({layout})')
    for subset in subsets:
        if not os.path.isdir(os.path.join(path, subset)):
            raise InputError(f'{option} {path} has no {subset}/ folder (found: {", ".join(found)}); '
                             f'expected {" and ".join(s + "/" for s in subsets)} ({layout})')
    return path


def read_config_file(path: Optional[str]) -> Dict[str, Any]:
    """The JSON object of configuration keys in `path`; unknown keys and bad values are ConfigErrors."""
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise InputError(f'--config {path}: no such file')
    try:
        with open(path) as f:
            configuration = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f'--config {path} is not valid JSON: {err}') from None
    if not isinstance(configuration, dict):
        raise ConfigError(f'--config {path} must hold a JSON object of configuration keys, '
                          f'got a {type(configuration).__name__}')
    unknown = sorted(set(configuration) - set(config_lib.OPTIONS))
    if unknown:
        raise ConfigError(f'--config {path}: unknown configuration key(s) {unknown}; '
                          f'valid keys are {sorted(config_lib.OPTIONS)}')
    config_lib.resolve(configuration)  # a bad key or value fails before any work starts
    return configuration


def parse_labels(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    labels = [label.strip() for label in text.split(',') if label.strip()]
    if not labels:
        raise InputError(f'--labels {text!r} names no label: give a comma-separated list such as a,b,c')
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise InputError(f'--labels names {duplicates} more than once')
    return labels


def list_images(path: str, exclude: Optional[str] = None) -> List[Tuple[str, str]]:
    """(path, path relative to the input) of the images to predict on: a file, or a folder's image files
    (recursively; hidden files and the folder `exclude`, where results go, are left out)."""
    if not os.path.lexists(path):
        raise InputError(f'--input {path}: no such file or folder')
    if os.path.isfile(path):
        return [(path, os.path.basename(path))]
    if not os.path.isdir(path):
        raise InputError(f'--input {path} is {_file_kind(path)}, not an image file or a folder')
    from utils.data.video import VIDEO_EXTENSIONS
    extensions = image_extensions() | VIDEO_EXTENSIONS
    excluded = os.path.realpath(exclude) if exclude else None
    found, others, special = [], 0, []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.')
                         and os.path.realpath(os.path.join(folder, d)) != excluded)
        for name in sorted(files):
            if name.startswith('.'):
                continue
            full = os.path.join(folder, name)
            if os.path.splitext(name)[1].lower() not in extensions:
                others += 1
            elif os.path.isfile(full):  # a regular file, or a link to one
                found.append((full, os.path.relpath(full, path)))
            else:
                special.append(full)
    for full in special:
        # opening a FIFO blocks until someone writes to it, a device can stream forever: never read them
        logger.warning('--input: %s is %s, not a regular file: skipped', full, _file_kind(full))
    if not found:
        what = f'{others} file(s), none with an image extension' if others else 'nothing'
        what += f', {len(special)} not a regular file' if special else ''
        raise InputError(f'--input {path} has no image files or video files ({what}; looked for .jpg, .jpeg, .png, '
                         f'.bmp, .tif, ..., .mp4, .mov, .avi, ...)')
    if others:
        logger.info('--input %s: %d file(s) without an image extension ignored', path, others)
    return found


def _file_kind(path: str) -> str:
    """What a path that is not a regular file or a folder is, for a message."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # a link to nothing, or to a place we may not look into
        return 'a broken symbolic link' if os.path.islink(path) else 'unreadable'
    kinds = ((stat.S_ISFIFO, 'a named pipe (FIFO)'), (stat.S_ISSOCK, 'a socket'),
             (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'))
    return next((kind for test, kind in kinds if test(mode)), 'a special file')


def output_names(inputs: Sequence[Tuple[str, str]], name_limit: int = DEFAULT_NAME_MAX) -> List[str]:
    """Per input, a distinct output path stem (relative; results are `<stem>.json` and `<stem>.png`).

    The natural stem (`dir/c` for `dir/c.jpg`) where no other input claims it; inputs whose stems
    clash keep their extension (`c.png`, `c.jpg`), repeated until nothing clashes (`c.png.jpg`'s stem
    `c.png` then clashes with `c.png`'s name, so it becomes `c.png.jpg`). Names are compared without
    case (the results may land on a case-insensitive disk); what still clashes after that (names that
    differ only in case, a result file where another result needs a folder) gets `~2`, `~3`, ... in
    input order. A name whose result file would pass `name_limit` bytes is shortened (`fitted_name`).
    Deterministic: the same inputs always give the same names.
    """
    rels = [rel for _, rel in inputs]
    names = [os.path.splitext(rel)[0] for rel in rels]
    while True:
        counts = Counter(name.casefold() for name in names)
        clashing = [i for i, name in enumerate(names) if counts[name.casefold()] > 1 and name != rels[i]]
        if not clashing:
            break
        for i in clashing:
            names[i] = rels[i]
    folders = {os.path.dirname(name).casefold() for name in names}
    folders = {parent for folder in folders for parent in _parents(folder)}
    taken = set()
    for i, name in enumerate(names):
        final, k = name, 1
        while final.casefold() in taken or any((final + ext).casefold() in folders for ext in RESULT_EXTENSIONS):
            k += 1
            final = f'{name}~{k}'
        taken.add(final.casefold())
        names[i] = final
    longest = max(len(ext) for ext in RESULT_EXTENSIONS)
    return [fitted_name(name, longest, name_limit) for name in names]


def _parents(folder: str) -> List[str]:
    """`a/b/c` -> [`a/b/c`, `a/b`, `a`]; `` -> []."""
    parents = []
    while folder:
        parents.append(folder)
        folder = os.path.dirname(folder)
    return parents
