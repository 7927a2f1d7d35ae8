"""Logging for the command line: stderr, INFO by default (-q warnings, -v debug), other libraries quieter."""
import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (tests swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _ThirdPartyFilter(logging.Filter):
    """Records of other libraries' loggers (dtlpy logs its cookie file at DEBUG) pass from `level` up."""

    OWN = ('local_runner', 'utils', 'fasterrcnn_adapter', '__main__')
    LEVELS = {'ModelAdapter': logging.ERROR}  # dtlpy's adapter base: platform-only notes at WARNING

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        top = record.name.split('.', 1)[0]
        if top in self.OWN:
            return True
        return record.levelno >= max(self.level, self.LEVELS.get(top, logging.NOTSET))


def setup_logging(quiet: bool = False, verbose: bool = False):
    """Log to stderr at INFO (WARNING with `quiet`, DEBUG with `verbose`); other libraries at WARNING.

    Returns a function that puts the root logger back as it was (main calls it on the way out,
    so calling `main` in-process leaves logging alone)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    for handler in saved_handlers:
        if getattr(handler, '_local_runner', False):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler._local_runner = True
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s', '%H:%M:%S'))
    handler.addFilter(_ThirdPartyFilter(logging.DEBUG if verbose else logging.WARNING))
    root.addHandler(handler)
    root.setLevel(level)

    def restore():
        root.removeHandler(handler)
        for previous in saved_handlers:
            if previous not in root.handlers:
                root.addHandler(previous)
        root.setLevel(saved_level)
    return restore
