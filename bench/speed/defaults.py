"""Row 8: the defaults, training speed and peak GPU memory per batch size with AMP on and off (is the 'auto'
batch safe on a 16 GB T4?), and prediction's peak memory at its batch of 16."""
import torch

from bench.speed.training import mixed_sizes, step_times
from utils.data.group_by_aspect_ratio import build_grouped_batch_sampler


def rows(cfg, device, cuda, items, adapter):
    """Which batch and precision, measured on mixed-size images at the variant's sizes."""
    steps = max(2, cfg['train_steps'] // 3)
    g = torch.Generator().manual_seed(0)
    print(f'8. defaults: {cfg["variant"]} at {cfg["min_size"]}/{cfg["max_size"]} px, mixed sizes, grouped + '
          'padding_bucket 128; training ms per image and peak GPU memory (T4: 15 GB usable)')
    for batch in (2, 4, 8):
        sizes = mixed_sizes(batch * steps, cfg, seed=2)
        data = [(torch.rand(3, h, w, generator=g), {'boxes': torch.tensor([[w * .2, h * .2, w * .6, h * .7]]),
                                                    'labels': torch.tensor([1])}) for h, w in sizes]
        batches = list(build_grouped_batch_sampler(sizes, batch, seed=0))
        for amp in (True, False) if device.type == 'cuda' else (False,):
            _, steady, peak = step_times(cfg, data, batches, 128, device, amp, 1, batched=True)
            name = f'train batch {batch}, {"AMP" if amp else "fp32"}'
            print(f'  {name:<68} {steady / batch:9.1f} ms/img  '
                  f'peak {peak:5.1f} GB', flush=True)
    if device.type != 'cuda':
        return
    torch.cuda.reset_peak_memory_stats(device)
    adapter.predict_items(items, batch_size=16)
    print(f'  {"predict_items batch 16 (fp16 copy + the fp32 network)":<68} {"":9} {"":6}  '
          f'peak {torch.cuda.max_memory_allocated(device) / 2**30:5.1f} GB', flush=True)
