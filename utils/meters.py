"""Smoothed meters and a metric logger that reports through `logging` (never `print`).

The shape follows torchvision's detection references (SmoothedValue,
MetricLogger.log_every), single-process: nothing here starts or talks to a
process group.
"""
import datetime
import logging
import time
from collections import defaultdict, deque
from typing import Any, Dict, Iterable, Iterator, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)


class SmoothedValue:
    """Track a series of values: the recent window (median, avg) and the whole series (global_avg)."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or '{median:.4f} ({global_avg:.4f})'

    def update(self, value: float, n: int = 1) -> None:
        value = float(value)
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return float(np.median(self.deque)) if self.deque else float('nan')

    @property
    def avg(self) -> float:
        return float(np.mean(self.deque)) if self.deque else float('nan')

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float('nan')

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else float('nan')

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else float('nan')

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """A named set of SmoothedValues, logged every `log_interval` iterations by `log_every`."""

    def __init__(self, delimiter: str = '  ', log: Optional[logging.Logger] = None):
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.log = log or logger

    def update(self, **kwargs: Any) -> None:
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not isinstance(value, (float, int)):
                raise TypeError(f'meter {name!r} needs a number, got {type(value).__name__}')
            self.meters[name].update(value)

    def __getattr__(self, attr: str) -> SmoothedValue:
        meters = self.__dict__.get('meters', {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f'{type(self).__name__!r} object has no attribute {attr!r}')

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def log_every(self, iterable: Iterable, log_interval: int, header: str = '') -> Iterator:
        """Yield from `iterable`, logging progress, meters, timing and ETA every `log_interval` steps."""
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        start = end = time.time()
        iter_time = SmoothedValue(fmt='{avg:.4f}')
        data_time = SmoothedValue(fmt='{avg:.4f}')
        width = len(str(total)) if total else 1
        i = 0
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            i += 1
            if log_interval > 0 and (i % log_interval == 0 or i == total):
                position = f'[{i:{width}d}/{total}]' if total else f'[{i}]'
                parts = [header, position]
                if total:
                    eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i)))
                    parts.append(f'eta: {eta}')
                parts += [str(self), f'time: {iter_time}', f'data: {data_time}']
                if torch.cuda.is_available():
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB')
                self.log.info(self.delimiter.join(p for p in parts if p))
            end = time.time()
        elapsed = time.time() - start
        per_it = elapsed / max(i, 1)
        self.log.info('%s total time: %s (%.4f s / it)', header, datetime.timedelta(seconds=int(elapsed)), per_it)
