"""Row 1: predict end to end, JPEG bytes -> prepare_item_func -> predict -> AnnotationCollection through the
adapter's predict_items, against plain torchvision's forward on decoded tensors; and the A/Bs at batch 16 (the
SDK's own loop, decoding as the SDK does, a shorter GIL switch interval, decoding on every core or on the GPU,
10 boxes an image, uploads that take 50 ms)."""
import contextlib
import os
import sys
import time

import dtlpy as dl
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from bench.speed.common import (bare_forward, bare_network, collector_seconds, first_and_median_seconds,
                                make_adapter, median_seconds, row)
from fasterrcnn_adapter import FasterRCNNAdapter
from utils.data.images import load_image
from utils.inference.item_reading import ItemReader
from utils.inference.prediction import DECODE_THREADS


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


def sibling(adapter, cls):
    """An adapter of class `cls` running `adapter`'s network, settings and offline upload."""
    other = cls()
    other.model_entity, other.model, other.device, other.settings = (
        adapter.model_entity, adapter.model, adapter.device, adapter.settings)
    other._inference_networks = adapter._inference_networks
    other._upload_model_annotations = adapter._upload_model_annotations
    return other


def plain_speeds(adapter, cfg, tensors, device, cuda):
    """Plain torchvision's images/s: fp16 (on CUDA) batch-16 channels_last, and fp32 batch 1."""
    network = bare_network(adapter, cfg, device)
    channels_last = bare_network(adapter, cfg, device).to(memory_format=torch.channels_last)
    n, runs = len(tensors), cfg['runs']
    plain16 = n / median_seconds(lambda: [bare_forward(channels_last, tensors[i:i + 16], device, cuda)
                                          for i in range(0, n, 16)], device, runs)
    plain1 = n / median_seconds(lambda: [bare_forward(network, [t], device, False) for t in tensors], device, runs)
    return plain16, plain1


def batch_rows(adapter, items, cfg, device, plain16, plain1):
    """predict_items at batch 16, 2 and 1 (16 only with BENCH_E2E_QUICK)."""
    n, runs, cuda = len(items), cfg['runs'], device.type == 'cuda'
    for batch in (16, 2, 1)[:1 if os.environ.get('BENCH_E2E_QUICK') else 3]:
        gc_before = collector_seconds()
        first, steady = first_and_median_seconds(lambda: adapter.predict_items(items, batch_size=batch), device, runs)
        gc_share = (collector_seconds() - gc_before) / (first + steady * runs)  # roughly: the median is one of them
        plain, what = (plain1, 'fp32 batch 1') if batch == 1 else (plain16, f'{"fp16" * cuda or "fp32"} batch-16 '
                                                                            'channels_last')
        row(f'batch {batch:<2} vs plain {what} forward on decoded tensors', n / steady, plain)
        if batch == 16:
            print(f'   first call (one new input shape) {first:.2f} s; garbage collector {gc_share:.1%} of the time')


def rows(cfg, device, cuda, items, adapter):
    tensors = [adapter.prepare_item_func(item) for item in items]
    plain16, plain1 = plain_speeds(adapter, cfg, tensors, device, cuda)
    n, runs = len(items), cfg['runs']
    print(f'1. predict end to end, {n} JPEGs {cfg["width"]}x{cfg["height"]}, {cfg["variant"]} at {cfg["min_size"]} px')
    batch_rows(adapter, items, cfg, device, plain16, plain1)
    sdk_loop = sibling(adapter, InLoopDecoding)
    for name, predictor, interval in (
            ("batch 16, the SDK's loop (no pipeline): this project's decoder, no look-ahead", sdk_loop, None),
            ("batch 16, decoding as before: the SDK's 16 threads, PIL, no look-ahead",
             sibling(adapter, SdkDecoding), None),
            ("batch 16, Python's GIL switch interval 0.5 ms (default 5 ms)", adapter, 0.0005),
            ("batch 16, the SDK's loop, GIL switch interval 0.5 ms", sdk_loop, 0.0005)):
        row(name, n / predict_items_seconds(predictor, items, device, runs, interval), plain16)
    wide, cores = sibling(adapter, FasterRCNNAdapter), min(16, os.cpu_count() or 1)
    wide._items = ItemReader(wide.image_limits, decode_threads=cores)
    row(f'batch 16, decoding in the loop on {cores} threads (default {DECODE_THREADS}; A/B)',
        n / predict_items_seconds(wide, items, device, runs), plain16)
    if cuda:
        gpu_decoding_rows(lambda cls: sibling(adapter, cls), items, tensors, device, runs, plain16)
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
