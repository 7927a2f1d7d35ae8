"""Progress that reads well both in a terminal and in a service log.

On a terminal (stderr is a TTY) a tqdm bar redraws in place. A platform
service log is not a terminal: there every redraw of a bar becomes another
line, so `Progress` logs one line instead when another `fraction` of the
total is done or `interval_s` seconds have passed, whichever comes first,
and (with `summary`) one line at the end. Training, evaluation, prediction,
embedding and the local runner all report through it, and `route_sdk_bars`
sends the SDK's own predict/embed bars here too.
"""
import datetime
import logging
import sys
import time
import types
from typing import Any, Iterable, Iterator, Optional

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: a progress line at least every this share of the total ...
FRACTION = 0.1
#: ... and at least every this many seconds
INTERVAL_S = 30.0


def is_terminal(stream: Any = None) -> bool:
    """True when `stream` (default: stderr, where tqdm draws) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class Progress:
    """Count work done towards `total`: a bar on a terminal, else bounded log lines.

    Use it as an iterable wrapper (``for x in Progress(loader, ...)``) or call
    `update(n)` by hand. `set_postfix` adds values (a loss, say) to the bar or
    to the next log line. `enabled=False` shows nothing at all.
    """

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = '',
                 unit: str = 'it', log: Optional[logging.Logger] = None, enabled: bool = True,
                 summary: bool = False, terminal: Optional[bool] = None, fraction: float = FRACTION,
                 interval_s: float = INTERVAL_S):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.log = log or logger
        self.enabled, self.summary = enabled, summary
        self.terminal = is_terminal() if terminal is None else terminal
        self.step = max(1, int(total * fraction)) if total else None
        self.interval_s = interval_s
        self.n = 0
        self.postfix: dict = {}
        self.start = self._last_line = time.monotonic()
        self._next_count = self.step
        self._closed = False
        self.bar = None
        if enabled and self.terminal:
            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def __iter__(self) -> Iterator:
        try:
            for obj in self.iterable:
                yield obj
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> 'Progress':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if not self.enabled:
            return
        now = time.monotonic()
        due_by_count = self._next_count is not None and self.n >= self._next_count
        if (due_by_count or now - self._last_line >= self.interval_s) and self.n != self.total:
            self.log.info(self._line(now))
            self._last_line = now
            if self.step:
                self._next_count = (self.n // self.step + 1) * self.step

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f'{self.desc}: {self.n}/{self.total} {self.unit}' if self.total else f'{self.desc}: {self.n} {self.unit}']
        if self.total:
            parts[0] += f' ({100.0 * self.n / self.total:.0f}%)'
        parts.append(f'{rate:.2f} {self.unit}/s')
        if self.total and rate > 0:
            parts.append(f'eta {_duration((self.total - self.n) / rate)}')
        parts += [f'{key} {value}' for key, value in self.postfix.items()]
        return ', '.join(parts)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.summary:
            elapsed = time.monotonic() - self.start
            rate = self.n / elapsed if elapsed > 0 else 0.0
            extra = ''.join(f', {key} {value}' for key, value in self.postfix.items())
            self.log.info('%s: done, %d %s in %s (%.2f %s/s)%s', self.desc, self.n, self.unit, _duration(elapsed),
                          rate, self.unit, extra)


def _sdk_bar(iterable: Optional[Iterable] = None, desc: str = '', unit: str = 'it', file: Any = None,
             total: Optional[int] = None, **_ignored: Any) -> Progress:
    """What the SDK's ``tqdm.tqdm(range(0, n, batch_size), desc=..., unit='bt', file=sys.stdout)`` becomes."""
    return Progress(iterable, total=total, desc=desc, unit='batch' if unit == 'bt' else unit,
                    log=logging.getLogger('dtlpy.progress'), summary=True, terminal=is_terminal(file))


def route_sdk_bars(sdk_module: Any) -> None:
    """Make `sdk_module` (dtlpy's base_model_adapter, which calls ``tqdm.tqdm(...)`` in predict_items and
    embed_items and offers no switch) report through `Progress`: the same bar on a terminal,
    bounded log lines in a service log. Idempotent."""
    current = getattr(sdk_module, 'tqdm', None)
    if getattr(current, 'routed_to_progress', False):
        return
    sdk_module.tqdm = types.SimpleNamespace(tqdm=_sdk_bar, routed_to_progress=True)
