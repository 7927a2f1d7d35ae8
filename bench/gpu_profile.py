"""Where ours and plain torchvision differ on the GPU: torch.profiler tables for the rows that missed their targets.

    python bench/gpu_profile.py                      # on the GPU (about a minute on an H100)
    python bench/gpu_profile.py --device cpu --tiny  # dry run on CPU

bench/gpu_speed.py found adapter.predict at 0.78x the bare fp16 forward (row 2) and
train_one_epoch at 0.93x the bare loop (row 4) on an H100; neither gap shows on the CPU.
For each pair this prints the profiler's top operators by device time and by host time,
and the host syncs (cudaStreamSynchronize, cudaMemcpy*), ours and plain in the same run.
"""
import argparse
import os
import sys
import tempfile

os.environ.setdefault('DATALOOP_PATH', tempfile.mkdtemp())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.speed.common import FULL, TINY, bare_forward, bare_network, decoded_batch, make_adapter  # noqa: E402
from bench.speed.training import (ENGINE_SETTINGS, bare_step, fresh_training,  # noqa: E402
                                  synthetic_training_set)
from utils.training import engine  # noqa: E402
from utils.training.trainer import build_optimizer  # noqa: E402


def profile_call(fn, device):
    """The profiler's per-operator averages of one call of `fn`, its device work included."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
    return prof.key_averages()


def profiled(name, fn, device, rows=12):
    fn()  # warm-up
    events = profile_call(fn, device)
    syncs = {e.key: e.count for e in events if e.key.startswith(('cudaStreamSynchronize', 'cudaMemcpy',
                                                                   'cudaDeviceSynchronize'))}
    launches = sum(e.count for e in events if e.key.startswith(('cudaLaunchKernel', 'cuLaunchKernel')))
    print(f'== {name}: {launches} kernel launches, syncs/copies {syncs}')
    sort = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    print(events.table(sort_by=sort, row_limit=rows, max_name_column_width=48))
    if device.type == 'cuda':
        print(events.table(sort_by='self_cpu_time_total', row_limit=rows, max_name_column_width=48))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--tiny', action='store_true')
    args = parser.parse_args()
    cfg, device = dict(TINY if args.tiny else FULL), torch.device(args.device)
    cuda = device.type == 'cuda'

    adapter = make_adapter(cfg, device)
    images = decoded_batch(cfg)
    network = bare_network(adapter, cfg, device)
    profiled('row 2: adapter.predict, batch 16', lambda: adapter.predict(images), device)
    profiled('row 2: bare forward, batch 16, same precision', lambda: bare_forward(network, images, device, cuda),
             device)

    _, loader, num_classes = synthetic_training_set(cfg, device)
    batches = [batch for _, batch in zip(range(5), loader)]

    model, _, scaler = fresh_training(cfg, num_classes, device, cuda, ours=True)
    optimizer = build_optimizer(model, ENGINE_SETTINGS)
    profiled('row 4: utils.training.engine.train_one_epoch, 5 steps',
             lambda: engine.train_one_epoch(model, optimizer, batches, device, epoch=1, scaler=scaler if cuda else None,
                                            warmup_iters=0, progress=False), device)
    model, optimizer, scaler = fresh_training(cfg, num_classes, device, cuda, ours=False)
    profiled('row 4: bare tutorial loop, 5 steps',
             lambda: [bare_step(model, optimizer, scaler, batch_images, targets, device, cuda)
                      for batch_images, targets in batches],
             device)


if __name__ == '__main__':
    main()
