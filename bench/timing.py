"""Wall time of one call, with the GPU's queued work included (shared by the bench scripts)."""
import time

import torch


def seconds(fn, device: torch.device) -> float:
    """Seconds `fn()` takes; on CUDA, synchronized before and after so asynchronous kernels count."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_of(fn, rounds: int, clock=time.perf_counter) -> float:
    """The fewest seconds (of `clock`) of `rounds` calls of `fn()`: the run least disturbed by a shared machine."""
    best = float('inf')
    for _ in range(rounds):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best
