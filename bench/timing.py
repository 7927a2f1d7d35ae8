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
