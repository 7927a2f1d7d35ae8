"""Row 3: bare torchvision training steps (AMP on CUDA) over images of one size against many, grouped by aspect
ratio and bucketed or not: the steady state, and the first pass with its per-shape start-up costs."""
import torch

from bench.speed.training import mixed_sizes, step_times
from utils.data.group_by_aspect_ratio import build_grouped_batch_sampler
from utils.modeling.model_factory import cudnn_autotune


def rows(cfg, device, cuda):
    """Bare torchvision steps (AMP on CUDA) over images of one size vs many, grouped + bucketed or not."""
    batch, steps = cfg['train_batch'], cfg['train_steps']
    count = batch * steps

    def images_of(sizes):
        g = torch.Generator().manual_seed(0)
        return [(torch.rand(3, h, w, generator=g), {'boxes': torch.tensor([[w * .2, h * .2, w * .6, h * .7]]),
                                                     'labels': torch.tensor([1])}) for h, w in sizes]

    def run(data, batches, bucket, benchmark=False):
        with cudnn_autotune(device, benchmark):
            first, steady, _ = step_times(cfg, data, batches, bucket, device, cuda, cfg['runs'])
        return first, steady

    fixed = images_of([cfg['fixed']] * count)
    sizes = mixed_sizes(count, cfg, seed=1)
    mixed = images_of(sizes)
    plain_batches = [list(range(i, i + batch)) for i in range(0, count, batch)]
    grouped = list(build_grouped_batch_sampler(sizes, batch, seed=0))
    base_first, base = run(fixed, plain_batches, 32)
    print(f'3. training step, {cfg["variant"]} batch {batch} {"AMP" if cuda else "fp32"}, {steps} steps a pass; '
          f'fixed {cfg["fixed"][0]}x{cfg["fixed"][1]} vs mixed sizes {cfg["mixed"]} (30 % portrait)')
    print(f'  {"fixed size, padding to 32 (torchvision)":<68} {base:9.1f} ms/step  first pass {base_first:9.1f}')
    for name, data, batches, bucket, benchmark in (
            ('fixed size, padding to 32, cudnn_benchmark on', fixed, plain_batches, 32, cuda),
            ('fixed size, padding_bucket 128', fixed, plain_batches, 128, False),
            ('mixed, random batches, padding to 32', mixed, plain_batches, 32, False),
            ('mixed, grouped by aspect ratio, padding to 32', mixed, grouped, 32, False),
            ('mixed, grouped + padding_bucket 64', mixed, grouped, 64, False),
            ('mixed, grouped + padding_bucket 128', mixed, grouped, 128, False)):
        first, steady = run(data, batches, bucket, benchmark)
        print(f'  {name:<68} {steady:9.1f} ms/step  first pass {first:9.1f}  '
              f'throughput vs fixed/32 {base / steady:5.2f}', flush=True)
    if cuda:  # epoch 1 against the CPU: the same mixed batches, fp32 on this machine's cores
        cpu_first, _, _ = step_times(cfg, mixed, grouped[:2], 32, torch.device('cpu'), False, 0)
        name = f'the CPU ({torch.get_num_threads()} threads, fp32), first 2 mixed batches'
        print(f'  {name:<68} {cpu_first:9.1f} ms/step', flush=True)
