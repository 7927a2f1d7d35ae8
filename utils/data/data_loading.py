"""What every DataLoader of the project shares: the detection collate function and seeding.

`collate_fn` keeps variable-size images apart (a list, not a stacked tensor)
and drops samples whose image could not be decoded; the seeding helpers make
shuffling and augmentation repeatable, in worker processes too.
"""
import os
import random
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch


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
