"""Issue 8's table in one run: each row of this project beside plain torchvision, measured in the same process.

    python bench/gpu_speed.py                       # on the GPU: resnet50_fpn, 640x480, min_size 800 (3.6 min, H100)
    python bench/gpu_speed.py --device cpu --tiny   # dry run on CPU: mobilenet_320 at 160 px, a couple of minutes
    BENCH_FROZEN_BN=1 python bench/gpu_speed.py     # prediction rows with FrozenBatchNorm2d, as pretrained models

Random weights (no download), entities built offline (no platform calls: the SDK's
annotation upload is the one step left out of "end to end"). Rows:
  1. predict end to end: JPEG bytes -> prepare_item_func -> predict -> AnnotationCollection,
     through the adapter's predict_items (downloading ahead; batch k's annotations built while batch k+1
     runs), batch 1 / 2 / 16, and at batch 16 the SDK's own loop, a shorter GIL switch interval, decoding
     on every core or on the GPU (nvJPEG, with its pixel difference), 10 boxes an image, and uploads that
     take 50 ms; vs plain fp16 (autocast) batch-16 channels_last forward on decoded tensors (and fp32 batch 1);
  2. adapter.predict alone on decoded images vs the bare forward at the same batch (same precision);
  3. training steps on fixed-size vs mixed-size images, with and without grouping + padding buckets
     (steady state, and the first pass with its per-shape start-up costs);
  4. utils.training.engine.train_one_epoch vs a bare torchvision loop at the same precision;
  5. a short train() (adapter.train: evaluation, checkpoints, curves) vs the bare loop, wall clock, and
     how much of it is training, evaluation and the rest (setup, checkpoints, curves between epochs);
     --run-epochs / --run-images change its size (the issue's case: 30 epochs on 40 images);
  6. JPEG decode (prepare_item_func) on 1 thread and on many;
  7. building boxes: collection.add per box vs the adapter's bulk builder;
  8. the defaults: training speed and peak GPU memory per batch size, AMP on and off (is the 'auto' batch
     safe on a 16 GB T4?), and prediction's peak memory at its batch of 16.
Detections are made plentiful (score threshold 0, up to 100 per image) on both sides, so
post-processing and annotation building are priced in. The network has 3 labels, as a model
fine-tuned on a user's dataset would: with COCO's 91 classes at score threshold 0, 90,000
candidate boxes per image send torchvision's batched_nms into its per-class loop (90 NMS calls
per image), which then dominates both sides (19 img/s for either on an H100).
"""
import argparse
import contextlib
import gc
import io
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault('DATALOOP_PATH', tempfile.mkdtemp())
os.environ.setdefault('TQDM_DISABLE', '1')  # the SDK's and the trainer's progress bars
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dtlpy as dl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.io import ImageReadMode, decode_jpeg  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402
from torchvision.transforms.functional import pil_to_tensor  # noqa: E402

from bench.timing import seconds  # noqa: E402
from fasterrcnn_adapter import FasterRCNNAdapter  # noqa: E402
from utils.training import engine  # noqa: E402
from utils.data.group_by_aspect_ratio import build_grouped_batch_sampler  # noqa: E402
from utils.data.images import load_image  # noqa: E402
from utils.inference.prediction import DECODE_THREADS, boxes_to_collection  # noqa: E402
from utils.platform import training_run  # noqa: E402
from utils.platform.local_model import local_model  # noqa: E402
from utils.modeling.model_factory import build_model, cudnn_autotune  # noqa: E402
from utils.data.synthetic import make_synthetic_export  # noqa: E402
from utils.training.trainer import build_optimizer  # noqa: E402

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


class InLoopDecoding(FasterRCNNAdapter):
    """The adapter with the SDK's predict_items loop as it is: each batch downloaded and decoded (this
    project's decoder) just before the network runs it, nothing running beside the network."""

    def predict_items(self, items, batch_size=None, **kwargs):
        return dl.BaseModelAdapter.predict_items(self, items, batch_size=batch_size, **kwargs)


class GpuDecoding(FasterRCNNAdapter):
    """predict_items with each batch's JPEGs decoded on the GPU at once (nvJPEG: torchvision's
    decode_jpeg(device='cuda')): row 1's A/B of taking decoding off the host (JPEGs only, no EXIF here)."""

    def prepare_item_func(self, item):
        return torch.frombuffer(bytearray(item.download().getvalue()), dtype=torch.uint8)

    def _readable(self, batch):
        return decode_jpeg(list(batch), mode=ImageReadMode.RGB, device=self.device), list(range(len(batch)))


def gpu_decoding_rows(sibling, items, tensors, device, runs, plain16):
    """Row 1's nvJPEG A/B, and how far its pixels are from the CPU decoder's (libjpeg-turbo)."""
    try:
        decoder = sibling(GpuDecoding)
        on_gpu, _ = decoder._readable([decoder.prepare_item_func(item) for item in items])
        difference = torch.cat([(g.cpu().int() - t.int()).abs().flatten() for g, t in zip(on_gpu, tensors)])
        row('batch 16, JPEGs decoded on the GPU, the batch at once (nvJPEG; A/B)',
            len(items) / predict_items_seconds(decoder, items, device, runs), plain16)
        print(f'   nvJPEG vs the CPU decoder: pixels differ by {difference.float().mean():.3f} on average, '
              f'{int(difference.max())} at most, {float((difference > 2).float().mean()):.2%} by more than 2')
    except Exception as err:  # noqa: BLE001 - a bench reports and goes on
        print(f'   decoding on the GPU failed: {type(err).__name__}: {err}')


class SdkDecoding(InLoopDecoding):
    """The adapter decoding as it did before the look-ahead: the SDK's predict_items loop, whose pool of 16
    threads decodes each batch with PIL just before the network runs it (the 'before' of row 1's decoding)."""

    def prepare_item_func(self, item):
        return pil_to_tensor(load_image(item.download(save_locally=False), self.image_limits()))


def predict_items_seconds(predictor, items, device, runs, switch_interval=None):
    """Median seconds of `predictor.predict_items(items)` at batch 16, with Python's GIL switch interval
    set to `switch_interval` for the duration (when given)."""
    default = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval or default)
    try:
        return median_seconds(lambda: predictor.predict_items(items, batch_size=16), device, runs)
    finally:
        sys.setswitchinterval(default)


@contextlib.contextmanager
def configured(adapter, **values):
    """`adapter`'s configuration with `values` for the duration."""
    configuration = adapter.model_entity.configuration
    before = {key: configuration[key] for key in values}
    configuration.update(values)
    try:
        yield
    finally:
        configuration.update(before)


@contextlib.contextmanager
def slow_uploads(*adapters, seconds):
    """Their annotation upload waits `seconds` an item, as the platform's round trip does."""
    offline = [a._upload_model_annotations for a in adapters]

    def upload(item, predictions):
        time.sleep(seconds)
        return predictions
    for a in adapters:
        a._upload_model_annotations = upload
    try:
        yield
    finally:
        for a, original in zip(adapters, offline):
            a._upload_model_annotations = original


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


def prediction_rows(cfg, device, cuda):
    adapter = make_adapter(cfg, device)
    blobs = [jpeg(i, cfg['width'], cfg['height']) for i in range(cfg['items'])]
    items = [MemoryItem(i, data) for i, data in enumerate(blobs)]
    tensors = [adapter.prepare_item_func(item) for item in items]
    network = bare_network(adapter, cfg, device)
    channels_last = bare_network(adapter, cfg, device).to(memory_format=torch.channels_last)
    n, runs = len(items), cfg['runs']
    plain16 = n / median_seconds(lambda: [bare_forward(channels_last, tensors[i:i + 16], device, cuda)
                                          for i in range(0, n, 16)], device, runs)
    plain1 = n / median_seconds(lambda: [bare_forward(network, [t], device, False) for t in tensors], device, runs)
    print(f'1. predict end to end, {n} JPEGs {cfg["width"]}x{cfg["height"]}, {cfg["variant"]} at {cfg["min_size"]} px')
    for batch in (16, 2, 1)[:1 if os.environ.get('BENCH_E2E_QUICK') else 3]:
        gc_before = collector_seconds()
        first, steady = first_and_median_seconds(lambda: adapter.predict_items(items, batch_size=batch), device, runs)
        gc_share = (collector_seconds() - gc_before) / (first + steady * runs)  # roughly: the median is one of them
        plain, what = (plain1, 'fp32 batch 1') if batch == 1 else (plain16, f'{"fp16" * cuda or "fp32"} batch-16 '
                                                                            'channels_last')
        row(f'batch {batch:<2} vs plain {what} forward on decoded tensors', n / steady, plain)
        if batch == 16:
            print(f'   first call (one new input shape) {first:.2f} s; garbage collector {gc_share:.1%} of the time')
    def sibling(cls):
        """An adapter of class `cls` running `adapter`'s network, settings and offline upload."""
        other = cls()
        other.model_entity, other.model, other.device, other.settings = (
            adapter.model_entity, adapter.model, adapter.device, adapter.settings)
        other._inference_networks = adapter._inference_networks
        other._upload_model_annotations = adapter._upload_model_annotations
        return other

    sdk_loop = sibling(InLoopDecoding)
    for name, predictor, interval in (
            ("batch 16, the SDK's loop (no pipeline): this project's decoder, no look-ahead", sdk_loop, None),
            ("batch 16, decoding as before: the SDK's 16 threads, PIL, no look-ahead", sibling(SdkDecoding), None),
            ("batch 16, Python's GIL switch interval 0.5 ms (default 5 ms)", adapter, 0.0005),
            ("batch 16, the SDK's loop, GIL switch interval 0.5 ms", sdk_loop, 0.0005)):
        row(name, n / predict_items_seconds(predictor, items, device, runs, interval), plain16)
    wide, cores = sibling(FasterRCNNAdapter), min(16, os.cpu_count() or 1)
    wide._decode_slots = threading.BoundedSemaphore(cores)
    row(f'batch 16, decoding in the loop on {cores} threads (default {DECODE_THREADS}; A/B)',
        n / predict_items_seconds(wide, items, device, runs), plain16)
    if cuda:
        gpu_decoding_rows(sibling, items, tensors, device, runs, plain16)
    with configured(adapter, max_detections=10):
        row('batch 16, at most 10 boxes an image (100 above)', n / predict_items_seconds(adapter, items, device, runs),
            plain16)
    with slow_uploads(adapter, sdk_loop, seconds=0.05):
        for name, predictor in (('pipeline', adapter), ("the SDK's loop", sdk_loop)):
            row(f'batch 16, uploads taking 50 ms an item (16 at once): {name}',
                n / predict_items_seconds(predictor, items, device, runs), plain16)
    if cuda and not os.environ.get('BENCH_E2E_QUICK'):
        tuned = make_adapter(cfg, device, cudnn_benchmark=True)
        first, steady = first_and_median_seconds(lambda: tuned.predict_items(items, batch_size=16), device, runs)
        row('batch 16, cudnn_benchmark on', n / steady, plain16)
        print(f'   first call (one new input shape, autotuned) {first:.2f} s')
    print('2. adapter.predict alone (decoded images) vs bare forward, same batch and precision')
    for batch in (2, 16):
        chunks = [tensors[i:i + batch] for i in range(0, n, batch)]
        ours = n / median_seconds(lambda: [adapter.predict(c) for c in chunks], device, runs)
        plain = n / median_seconds(lambda: [bare_forward(network, c, device, cuda) for c in chunks], device, runs)
        row(f'batch {batch}', ours, plain)
        if batch == 16:  # predict less its annotations: the ceiling of the rows above
            ours = n / median_seconds(lambda: [adapter._detect(c) for c in chunks], device, runs)
            row('batch 16, the forward pass and its rows only (no annotations)', ours, plain)
    return items, adapter


def mixed_sizes(count, cfg, seed):
    rng = np.random.default_rng(seed)
    (h0, h1), (w0, w1) = cfg['mixed']
    sizes = [(int(rng.integers(h0, h1 + 1)), int(rng.integers(w0, w1 + 1))) for _ in range(count)]
    return [size if rng.random() < 0.7 else size[::-1] for size in sizes]  # some portrait images too


def training_rows(cfg, device, cuda):
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


def step_times(cfg, data, batches, bucket, device, amp, runs, batched=False):
    """Bare training steps over `batches` of `data`: (first pass, median steady pass) in ms/step, and peak GB
    (`batched`: with this project's batched RPN post-processing, else torchvision's)."""
    torch.manual_seed(0)
    model = build_model(cfg['variant'], 3, cfg['min_size'], cfg['max_size'], padding_bucket=bucket,
                        batched_postprocess=batched).to(device)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9)
    scaler = torch.amp.GradScaler('cuda', enabled=amp)

    def epoch():
        for indices in batches:
            bare_step(model, optimizer, scaler, [data[i][0] for i in indices], [data[i][1] for i in indices],
                      device, amp)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    first = seconds(epoch, device)
    steady = statistics.median(seconds(epoch, device) for _ in range(runs)) if runs else first
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else 0.0
    return first / len(batches) * 1000, steady / len(batches) * 1000, peak


def default_rows(cfg, device, items, adapter):
    """Item 4 of the issue: which batch and precision, measured on mixed-size images at the variant's sizes."""
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


def synthetic_loader(cfg, device, root):
    from utils.data.dataloop_reader import read_dataloop_export
    from utils.data.detection_dataset import DetectionDataset
    from utils.data.transforms import get_transform
    from utils.data.data_loading import collate_fn
    export = read_dataloop_export(root)
    label_to_id = {label: i + 1 for i, label in enumerate(export.labels_found)}
    dataset = DetectionDataset(export.subsets['train'], label_to_id, get_transform(train=False))
    return torch.utils.data.DataLoader(dataset, batch_size=cfg['train_batch'], shuffle=True, num_workers=2,
                                       collate_fn=collate_fn, pin_memory=device.type == 'cuda',
                                       persistent_workers=True), len(label_to_id) + 1


def bare_step(model, optimizer, scaler, images, targets, device, amp):
    """torchvision's detection tutorial step, nothing else."""
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    with torch.autocast(device.type, enabled=amp):
        loss = sum(model(images, targets).values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def bare_epoch(model, optimizer, scaler, loader, device, amp):
    """One pass of the tutorial step over `loader`."""
    model.train()
    for images, targets in loader:
        bare_step(model, optimizer, scaler, images, targets, device, amp)


#: the optimizer settings of rows 4-5 (the tutorial's lr, no weight decay on either side)
ENGINE_SETTINGS = dict(learning_rate=0.005, momentum=0.9, weight_decay=0.0)


def synthetic_training_set(cfg, device):
    """Rows 4-5's data: a synthetic export of `run_images` square images, and a loader over its training subset."""
    root = tempfile.mkdtemp()
    make_synthetic_export(root, n_train=cfg['run_images'], n_val=max(4, cfg['run_images'] // 5),
                          image_size=(cfg['run_size'], cfg['run_size']), seed=0)
    loader, num_classes = synthetic_loader(cfg, device, root)
    return root, loader, num_classes


def fresh_training(cfg, num_classes, device, cuda, ours):
    """Rows 4-5's starting point, the same each time: (network, the tutorial's SGD, GradScaler); `ours`: the
    network as this project builds it (batched post-processing on CUDA), else plain torchvision's."""
    torch.manual_seed(0)
    model = build_model(cfg['variant'], num_classes, cfg['run_size'], cfg['run_size'],
                        batched_postprocess=ours).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=ENGINE_SETTINGS['learning_rate'], momentum=ENGINE_SETTINGS['momentum'])
    return model, optimizer, torch.amp.GradScaler('cuda', enabled=cuda)


def engine_rows(cfg, device, cuda):
    size = cfg['run_size']
    root, loader, num_classes = synthetic_training_set(cfg, device)
    n = len(loader.dataset)

    model, optimizer, scaler = fresh_training(cfg, num_classes, device, cuda, ours=False)
    plain = n / median_seconds(lambda: bare_epoch(model, optimizer, scaler, loader, device, cuda), device, cfg['runs'])
    print(f'4. one epoch, {n} synthetic images {size} px, batch {cfg["train_batch"]}, {"AMP" if cuda else "fp32"}')
    for label, fused in (('the trainer\'s fused SGD', True), ('plain SGD: a sync per step in fp32', False)):
        model, optimizer, scaler = fresh_training(cfg, num_classes, device, cuda, ours=True)
        if fused:
            optimizer = build_optimizer(model, ENGINE_SETTINGS)
        ours = n / median_seconds(lambda: engine.train_one_epoch(model, optimizer, loader, device, epoch=1,
                                                                 scaler=scaler if cuda else None, warmup_iters=0,
                                                                 progress=False), device, cfg['runs'])
        row(f'utils.training.engine.train_one_epoch ({label}) vs bare torchvision loop', ours, plain)

    model, optimizer, scaler = fresh_training(cfg, num_classes, device, cuda, ours=False)
    epochs = cfg['run_epochs']
    plain_wall = seconds(lambda: [bare_epoch(model, optimizer, scaler, loader, device, cuda)
                                  for _ in range(epochs)], device)
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model({'pretrained': False, 'model_variant': cfg['variant'], 'device': device.type,
                                        'min_size': size, 'max_size': size, 'batch_size': cfg['train_batch'],
                                        'epochs': epochs, 'num_workers': 2, 'amp': cuda, 'warmup_iters': 0,
                                        'learning_rate': 0.005}, labels=['circle', 'square', 'triangle'])
    torch.manual_seed(0)
    adapter.load('/nonexistent')
    adapter.convert_from_dtlpy(root)
    results, published = [], []
    training_run.PlatformTraining.publish_metrics = \
        lambda self, epoch, metrics: published.append(time.perf_counter())  # each epoch's end
    began = time.perf_counter()
    ours_wall = seconds(lambda: results.append(adapter.train(root, tempfile.mkdtemp())), device)
    print(f'5. {epochs} epochs on {n} images (+{len(os.listdir(os.path.join(root, "validation", "items")))} '
          f'validation), wall clock')
    row('adapter.train (eval, checkpoints, curves each epoch) vs bare loop', ours_wall, plain_wall, unit='s')
    history = results[-1].history
    training = sum(record['train_time'] for record in history)
    evaluation = sum(record['eval_time'] for record in history)
    first = history[0]['train_time'] + history[0]['eval_time']
    setup, tail = published[0] - began - first, began + ours_wall - published[-1]
    print(f'   of which training {training:.1f} s, evaluation {evaluation:.1f} s, the rest '
          f'{ours_wall - training - evaluation:.1f} s: setup {setup:.1f} s, between epochs '
          f'{ours_wall - training - evaluation - setup - tail:.1f} s, after the last (best weights, final '
          f'checkpoints, curves) {tail:.1f} s')


def decode_rows(items, adapter, cfg):
    one = len(items) / median_seconds(lambda: [adapter.prepare_item_func(i) for i in items],
                                      torch.device('cpu'), cfg['runs'])
    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        many = len(items) / median_seconds(lambda: list(pool.map(adapter.prepare_item_func, items)),
                                           torch.device('cpu'), cfg['runs'])
    print(f'6. JPEG decode (prepare_item_func), {cfg["width"]}x{cfg["height"]}')
    print(f'  {"1 thread":<68} {one:9.1f} img/s')
    print(f'  {f"{workers} threads":<68} {many:9.1f} img/s')


def box_rows():
    rng = np.random.default_rng(0)
    rows = [[*sorted(rng.random(2) * 600), *sorted(rng.random(2) * 400), float(rng.random()), int(rng.integers(1, 91))]
            for _ in range(100)]
    rows = [[r[0], r[2], r[1], r[3], r[4], r[5]] for r in rows]
    labels = {i: f'label-{i}' for i in range(1, 91)}

    def per_box():
        collection = dl.AnnotationCollection()
        for left, top, right, bottom, score, label in rows:
            collection.add(annotation_definition=dl.Box(left=left, top=top, right=right, bottom=bottom,
                                                         label=labels[label]),
                           model_info={'name': 'm', 'model_id': 'id', 'confidence': round(score, 4)})

    cpu = torch.device('cpu')
    add = min(seconds(per_box, cpu) for _ in range(20)) / len(rows) * 1e6
    bulk = min(seconds(lambda: boxes_to_collection(rows, labels, 'm', 'id'), cpu) for _ in range(20)) / len(rows) * 1e6
    print('7. building boxes, 100 per image')
    row('boxes_to_collection vs dl.Box + collection.add per box (us per box)', bulk, add, unit='us')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--tiny', action='store_true', help='small network and images: a CPU dry run')
    parser.add_argument('--only', default='12345678', help='which rows to run, e.g. 127')
    parser.add_argument('--run-epochs', type=int, help="row 5's epochs (default: 30, or 2 with --tiny)")
    parser.add_argument('--run-images', type=int, help="row 5's training images (default: 40, or 8 with --tiny)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger('dtlpy').setLevel(logging.ERROR)
    cfg = dict(TINY if args.tiny else FULL)
    cfg.update({key: value for key, value in (('run_epochs', args.run_epochs), ('run_images', args.run_images))
                if value is not None})
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    name = torch.cuda.get_device_name(device) if cuda else f'CPU x{torch.get_num_threads()} threads'
    print(f'{name}, torch {torch.__version__}; ratio = ours / plain (>1: ours faster)', flush=True)
    start = time.perf_counter()

    def attempt(rows, fn, *fn_args):
        """One group of rows; a failure is printed and the next group still runs (one device run, every figure)."""
        if not any(r in args.only for r in rows):
            return None
        began = time.perf_counter()
        try:
            return fn(*fn_args)
        except Exception:  # noqa: BLE001 - a bench prints what broke and goes on
            logging.exception('rows %s failed', rows)
            return None
        finally:
            print(f'   ({time.perf_counter() - began:.0f} s)', flush=True)

    items, adapter = attempt('1268', prediction_rows, cfg, device, cuda) or (None, None)
    attempt('3', training_rows, cfg, device, cuda)
    attempt('45', engine_rows, cfg, device, cuda)
    if items:
        attempt('6', decode_rows, items, adapter, cfg)
    attempt('7', box_rows)
    if items:
        attempt('8', default_rows, cfg, device, items, adapter)
    print(f'total {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
    main()
