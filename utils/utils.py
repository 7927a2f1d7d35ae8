"""Small training helpers: smoothed meters, a logging metric logger, collate, reductions, seeding.

The shape follows torchvision's detection references (SmoothedValue,
MetricLogger, collate_fn, reduce_dict and the distributed helpers), but
everything reports through `logging`, never `print`.
"""
import datetime
import logging
import os
import random
import time
from collections import defaultdict, deque
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- distributed
def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_gather(data: Any) -> List[Any]:
    """Gather any picklable object from every process (a one-element list when not distributed)."""
    world_size = get_world_size()
    if world_size == 1:
        return [data]
    gathered: List[Any] = [None] * world_size
    dist.all_gather_object(gathered, data)
    return gathered


def reduce_dict(input_dict: Dict[str, torch.Tensor], average: bool = True) -> Dict[str, torch.Tensor]:
    """Sum (or average) each scalar tensor over all processes; the dict itself when not distributed."""
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.inference_mode():
        names = sorted(input_dict.keys())
        values = torch.stack([input_dict[k] for k in names], dim=0)
        dist.all_reduce(values)
        if average:
            values /= world_size
        return dict(zip(names, values))


# ----------------------------------------------------------------------------- meters
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

    def synchronize_between_processes(self) -> None:
        """Sum count and total over processes (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64,
                         device='cuda' if torch.cuda.is_available() else 'cpu')
        dist.barrier()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

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
    """A named set of SmoothedValues, logged every `print_freq` iterations by `log_every`."""

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

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def log_every(self, iterable: Iterable, print_freq: int, header: str = '') -> Iterator:
        """Yield from `iterable`, logging progress, meters, timing and ETA every `print_freq` steps."""
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
            if print_freq > 0 and (i % print_freq == 0 or i == total):
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


# ----------------------------------------------------------------------------- batching
def collate_fn(batch: Sequence[Optional[Tuple[Any, Any]]]) -> Tuple[Tuple[Any, ...], Tuple[Any, ...]]:
    """Detection batches: ``(images, targets)`` tuples of varying sizes; ``None`` samples dropped.

    A sample is ``None`` when its image could not be decoded (the dataset has
    already logged which item); a batch where every sample failed comes back as
    ``((), ())`` and the engine skips it.
    """
    samples = [sample for sample in batch if sample is not None]
    if not samples:
        return (), ()
    images, targets = zip(*samples)
    return tuple(images), tuple(targets)


# ----------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    os.environ.setdefault('PYTHONHASHSEED', str(seed))


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: derive Python and NumPy seeds from the worker's torch seed."""
    worker_seed = torch.initial_seed() % 2 ** 32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_generator(seed: int) -> torch.Generator:
    """A seeded torch.Generator for a DataLoader's shuffling and worker seeds."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
