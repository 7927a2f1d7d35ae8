"""The training batch size actually used: the configured one, bounded by the data and by memory.

A `batch_size` over the number of training images cannot be filled without repeating images in
one batch (the same picture twice in a step weighs it double and buys nothing), so it is clamped to
the data. One over what the device's memory holds fails mid-epoch with an out-of-memory error, so it
is clamped to the images that fit: the memory one training image takes grows with the pixels the
network sees (its `min_size` x `max_size` box at most), `BYTES_PER_TRAIN_MEGAPIXEL` per megapixel as
measured (bench/RESULTS.md), against the GPU's memory or the machine's (its cgroup limit in a
container). That is the reasoning `auto` applies with its fixed sizes (`utils.core.config`), extended
to any size. Either clamp is said in one line.
"""
import logging
import os
from typing import Optional

import torch

logger = logging.getLogger(__name__)

# Peak resident memory of one fasterrcnn_resnet50_fpn training step (forward, backward, SGD step) per
# image at 800 x 1333 (1.07 MP), fp32 on the CPU, divided by 1.07: see bench/RESULTS.md. CUDA with
# AMP takes less; the bound stays on the safe side there.
BYTES_PER_TRAIN_MEGAPIXEL = int(2.4 * 2 ** 30)
MEMORY_SHARE = 0.8  # of the device's memory, for the batch's activations; the rest: weights, optimizer, loaders


def _host_memory() -> Optional[int]:
    try:
        total = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        total = None
    for path in ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(int(text), total or int(text))
        break
    return total


def device_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory training on `device` can use: the GPU's, else the machine's; None when unknown."""
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).total_memory
    return _host_memory()


def memory_bound(device: torch.device, input_pixels: int) -> Optional[int]:
    """Images per training batch that fit `device`'s memory at `input_pixels` each (at least 1)."""
    memory = device_memory(device)
    if not memory:
        return None
    per_image = BYTES_PER_TRAIN_MEGAPIXEL * input_pixels / 1e6
    return max(1, int(memory * MEMORY_SHARE // per_image))


def bounded_batch_size(batch_size: int, n_images: int, device: torch.device, input_pixels: int,
                       configured: str = '') -> int:
    """`batch_size` clamped to `n_images` and to `memory_bound`; a clamp of a configured size is a WARNING
    (`configured`: the key that set it, '' for 'auto', whose clamp to a small data set is only INFO)."""
    device = torch.device(device)
    bound_memory = memory_bound(device, input_pixels)
    bounded = min(batch_size, max(1, n_images), bound_memory or batch_size)
    if bounded < batch_size:
        why = (f'the training set has {n_images} image(s)' if bounded == max(1, n_images) else
               f'{bound_memory} image(s) of {input_pixels / 1e6:.2f} MP fit in {MEMORY_SHARE:.0%} of '
               f"{device.type}'s {device_memory(device) / 2 ** 30:.1f} GiB")
        logger.log(logging.WARNING if configured else logging.INFO,
                   'training batch size %d%s lowered to %d: %s', batch_size, configured and f' ({configured})',
                   bounded, why)
    return bounded
