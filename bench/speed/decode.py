"""Row 6: JPEG decoding (prepare_item_func) on one thread and on many."""
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.speed.common import median_seconds


def rows(cfg, device, cuda, items, adapter):
    one = len(items) / median_seconds(lambda: [adapter.prepare_item_func(i) for i in items],
                                      torch.device('cpu'), cfg['runs'])
    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        many = len(items) / median_seconds(lambda: list(pool.map(adapter.prepare_item_func, items)),
                                           torch.device('cpu'), cfg['runs'])
    print(f'6. JPEG decode (prepare_item_func), {cfg["width"]}x{cfg["height"]}')
    print(f'  {"1 thread":<68} {one:9.1f} img/s')
    print(f'  {f"{workers} threads":<68} {many:9.1f} img/s')
