"""What the prediction rows and the other GPU benches share: the two sizes (full and --tiny), JPEG items in
memory, an adapter of random weights, plain torchvision's network and forward beside it, timing, one printed
row."""
import argparse
import gc
import io
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torchvision.ops.misc import FrozenBatchNorm2d

from bench.timing import seconds
from fasterrcnn_adapter import FasterRCNNAdapter
from utils.modeling.model_factory import build_model
from utils.platform.local_model import local_model

FULL = dict(variant='fasterrcnn_resnet50_fpn', min_size=800, max_size=1333, width=640, height=480, items=128,
            runs=3, train_batch=4, train_steps=12, fixed=(480, 640), mixed=((240, 480), (320, 640)),
            run_images=40, run_size=400, run_epochs=30)
TINY = dict(variant='fasterrcnn_mobilenet_v3_large_320_fpn', min_size=160, max_size=240, width=160, height=120,
            items=16, runs=1, train_batch=2, train_steps=3, fixed=(120, 160), mixed=((60, 120), (80, 160)),
            run_images=8, run_size=128, run_epochs=2)


class MemoryItem:
    """What prepare_item_func reads of a dl.Item, with the bytes in memory instead of on the platform."""

    def __init__(self, index, data):
        self.id, self.name, self.filename, self.mimetype = f'item-{index}', f'{index}.jpg', f'/{index}.jpg', 'image/jpeg'
        self._data = data

    def download(self, save_locally=False, **kwargs):
        return io.BytesIO(self._data)


def jpeg(seed, width, height):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def decoded_batch(cfg, count=16, seed=0):
    """`count` random uint8 images of the configuration's size, as prepare_item_func returns them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 255, (3, cfg['height'], cfg['width']), dtype=torch.uint8, generator=g)
            for _ in range(count)]


def memory_items(cfg):
    """The configuration's `items` random JPEGs, as dl.Items whose bytes are in memory."""
    return [MemoryItem(i, jpeg(i, cfg['width'], cfg['height'])) for i in range(cfg['items'])]


_collector = {'seconds': 0.0, 'began': 0.0}


def _time_collections(phase, info):
    if phase == 'start':
        _collector['began'] = time.perf_counter()
    else:
        _collector['seconds'] += time.perf_counter() - _collector['began']


def collector_seconds():
    """Seconds Python's garbage collector has run so far in this process (from the first call on)."""
    if _time_collections not in gc.callbacks:
        gc.callbacks.append(_time_collections)
    return _collector['seconds']


def forward_bench(description, runs):
    """The start the forward-pass benches share: --device / --tiny / --runs, their configuration, an adapter of
    random weights and a decoded batch of 16. Returns (args, cfg, device, half, adapter, images)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--tiny', action='store_true', help='small network and images: a CPU dry run')
    parser.add_argument('--runs', type=int, default=runs)
    args = parser.parse_args()
    cfg, device = dict(TINY if args.tiny else FULL), torch.device(args.device)
    return args, cfg, device, device.type == 'cuda', make_adapter(cfg, device), decoded_batch(cfg)


def median_seconds(fn, device, runs):
    return first_and_median_seconds(fn, device, runs)[1]


def first_and_median_seconds(fn, device, runs):
    """The first call (cuDNN autotuning, allocator, lazy module loading) and the median of `runs` after it."""
    first = seconds(fn, device)
    return first, statistics.median(seconds(fn, device) for _ in range(runs))


def frozen_batch_norms(module):
    """`module` with every BatchNorm2d swapped for torchvision's FrozenBatchNorm2d (same statistics), as a
    COCO-pretrained network has them: random-weight builds get BatchNorm2d, which cuDNN runs in one pass
    where FrozenBatchNorm2d under autocast makes extra fp32 passes. BENCH_FROZEN_BN=1 benches that kind."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).to(child.weight.device)
            for key in ('weight', 'bias', 'running_mean', 'running_var'):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            frozen_batch_norms(child)
    return module


def as_pretrained(model):
    """The network as users run it when BENCH_FROZEN_BN is set (see `frozen_batch_norms`), else as built."""
    return frozen_batch_norms(model) if os.environ.get('BENCH_FROZEN_BN') else model


def make_adapter(cfg, device, **configuration):
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model({'pretrained': False, 'model_variant': cfg['variant'], 'device': device.type,
                                        'min_size': cfg['min_size'], 'max_size': cfg['max_size'],
                                        'conf_threshold': 0.0, 'max_detections': 100, **configuration},
                                       labels=['circle', 'square', 'triangle'])
    torch.manual_seed(0)
    adapter.load('/nonexistent')
    as_pretrained(adapter.model)
    adapter._upload_model_annotations = lambda item, predictions: predictions  # offline: no upload
    return adapter


def bare_network(adapter, cfg, device):
    network = build_model(cfg['variant'], adapter.model.roi_heads.box_predictor.cls_score.out_features,
                          cfg['min_size'], cfg['max_size'], batched_postprocess=False).to(device).eval()
    as_pretrained(network).load_state_dict(adapter.model.state_dict())
    network.roi_heads.score_thresh, network.roi_heads.detections_per_img = 0.0, 100
    return network


def bare_forward(network, tensors, device, half):
    """Plain torchvision: decoded uint8 tensors -> float on the device -> forward (autocast fp16 when `half`)."""
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=half):
        return network([t.to(device, non_blocking=True).float().div_(255) for t in tensors])


def row(name, ours, plain, unit='img/s'):
    ratio = ours / plain if unit == 'img/s' else plain / ours
    print(f'  {name:<68} {ours:9.2f} {unit:<8} plain {plain:9.2f} {unit:<8} ratio {ratio:5.2f}', flush=True)
