"""Batches of images with similar aspect ratios (torchvision's detection reference, in our words).

The network resizes every image so its shorter side is `min_size`, then pads the
batch to its largest height and width. A batch mixing a portrait and a landscape
image is padded to a square nearly twice the size of either, and every new mix is
a new input shape. Drawing each batch from one aspect-ratio group keeps padding
small and the padded shapes few (see `model_factory.BucketedTransform` for the
other half: rounding those shapes to a coarse grid).
"""
import bisect
import logging
from collections import defaultdict
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


def aspect_ratio_bins(group_factor: int) -> List[float]:
    """Width/height bin edges spaced evenly in log2 between 1/2 and 2 (2 * factor + 1 edges).

    The reference's default factor 3 gives 8 groups: ratios within 2**(1/3) (26 %) of each
    other share a group, so their resized long sides differ by at most that much.
    """
    if group_factor <= 0:
        return [1.0]
    count = 2 * group_factor + 1
    return [2.0 ** (-1.0 + 2.0 * i / (count - 1)) for i in range(count)]


def aspect_ratio_groups(image_sizes: Sequence[Tuple[int, int]], group_factor: int = 3) -> List[int]:
    """Group id of each (height, width): the index of its width/height ratio among `aspect_ratio_bins`."""
    bins = aspect_ratio_bins(group_factor)
    groups = []
    for index, (height, width) in enumerate(image_sizes):
        if height <= 0 or width <= 0:
            raise ValueError(f'image {index} has size {height}x{width} (height x width): both must be positive')
        groups.append(bisect.bisect_right(bins, width / height))
    return groups


class GroupedBatchSampler(Sampler[List[int]]):
    """Shuffled batches of `batch_size` indices, each batch from one group.

    Indices are drawn in a seeded random order and collected per group; a group's
    buffer is yielded when it is full. At the end of the epoch each group's partial
    buffer is topped up with other indices of the same group (as the reference does),
    so batches have the same size (one input shape fewer for cuDNN's autotuner)
    and every index is seen at least once per epoch; unlike the reference, no
    leftover is dropped, which matters on the small datasets this model is tuned on,
    and no image is in one batch twice: a group smaller than the batch makes a smaller batch.
    `set_epoch` makes the order a function of (seed, epoch), so a resumed run replays it.
    """

    def __init__(self, group_ids: Sequence[int], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        self.group_ids = list(group_ids)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        sizes: Dict[int, int] = defaultdict(int)
        for group in self.group_ids:
            sizes[group] += 1
        self._length = sum(-(-count // self.batch_size) for count in sizes.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[List[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(len(self.group_ids), generator=generator).tolist()
        buffers: Dict[int, List[int]] = defaultdict(list)
        seen: Dict[int, List[int]] = defaultdict(list)
        for index in order:
            group = self.group_ids[index]
            buffers[group].append(index)
            seen[group].append(index)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
        for group, buffer in sorted(buffers.items(), key=lambda entry: (-len(entry[1]), entry[0])):
            in_batch = set(buffer)
            filler = [index for index in seen[group] if index not in in_batch][:self.batch_size - len(buffer)]
            yield buffer + filler


def build_grouped_batch_sampler(image_sizes: Sequence[Tuple[int, int]], batch_size: int, seed: int = 0,
                                group_factor: int = 3) -> GroupedBatchSampler:
    """The batch sampler for a DataLoader (`batch_sampler=`) over images of these (height, width) sizes."""
    groups = aspect_ratio_groups(image_sizes, group_factor)
    counts: Dict[int, int] = defaultdict(int)
    for group in groups:
        counts[group] += 1
    logger.info('grouping %d images into %d aspect-ratio group(s) of sizes %s', len(groups), len(counts),
                dict(sorted(counts.items())))
    return GroupedBatchSampler(groups, batch_size, seed=seed)
