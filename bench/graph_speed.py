"""Prediction with the host taken out of the forward pass: CUDA graphs and annotation JSON built in bulk, each
beside plain torchvision's fp16 batch-16 channels_last forward on decoded tensors, measured in the same run.

    python bench/graph_speed.py                       # on the GPU: resnet50_fpn, 640x480, min_size 800
    python bench/graph_speed.py --device cpu --tiny   # dry run: mobilenet_320 at 160 px; the graph rows
                                                      # replay through tests/graph_double.py (times mean nothing)

Rows (ratio = ours / plain, >1: ours faster):
  1. the forward pass and its rows (`adapter._detect`) at batch 16 and 2: eager, then replayed from CUDA
     graphs (captured before timing; the graph count and peak GPU memory printed);
  2. predict_items end to end, JPEG bytes to the SDK's annotation objects: batch 16 with graphs and the
     bulk JSON, with the bulk JSON alone, and with the SDK's objects (the path before the bulk JSON);
     batch 2 with graphs and the bulk JSON. The upload is emulated on the host as the SDK does it around
     its HTTP call: each annotation serialised (`to_json` for objects), the body encoded, and the answer
     read back into the SDK's objects (`AnnotationCollection.from_json`), with no network wait;
  3. host time per image (decoding one JPEG, the annotation JSON, reading the answer back) against the
     device time per image of the graphed forward: what a slower GPU (a T4) would hide behind its forward.
Random weights, 3 labels, score threshold 0 and up to 100 boxes an image, as in bench/gpu_speed.py.
"""
import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))

from bench.speed.common import (FULL, TINY, MemoryItem, bare_forward, bare_network, jpeg,  # noqa: E402
                                make_adapter, median_seconds, row)
import dtlpy as dl  # noqa: E402
import torch  # noqa: E402

from fasterrcnn_adapter import FasterRCNNAdapter  # noqa: E402
from utils.inference import cuda_graphs  # noqa: E402


class SdkObjects(FasterRCNNAdapter):
    """predict_items' annotations as the SDK's objects, stamped by the SDK (before the bulk JSON)."""

    def _upload_payloads(self, batch_items, detections):
        collections = self._annotate(list(batch_items), detections)
        for item, collection in zip(batch_items, collections):
            self._update_predictions_metadata(item, collection)
        return collections


def emulated_upload(item, predictions):
    """The SDK's upload less the network: serialise, encode the body, read the answer back into its objects."""
    body = json.dumps([p if isinstance(p, dict) else p.to_json() for p in predictions])
    return dl.AnnotationCollection.from_json(_json=json.loads(body))


def sibling(adapter, cls=FasterRCNNAdapter, **configuration):
    """An adapter of class `cls` on `adapter`'s network and settings, with `configuration` on top."""
    other = cls()
    other.model_entity = adapter.model_entity.__class__.from_json(
        _json={**adapter.model_entity.to_json(), 'configuration': {**adapter.model_entity.configuration,
                                                                   **configuration}},
        client_api=dl.client_api, project=None, package=dl.Package())
    other.model, other.device, other.settings = adapter.model, adapter.device, adapter.settings
    other._upload_model_annotations = emulated_upload
    return other


def graph_api(device):
    """The real API on CUDA; on the CPU (dry run) the test double, so the graph rows run at all."""
    if device.type == 'cuda':
        return None
    from graph_double import HostGraphApi
    return HostGraphApi()


def forward_rows(adapter, graphed, tensors, device, runs, plain16):
    print('1. the forward pass and its rows (adapter._detect) vs plain fp16 b16 channels_last forward')
    for batch in (16, 2):
        chunks = [tensors[i:i + batch] for i in range(0, len(tensors), batch)]
        for name, predictor in (('eager', adapter), ('CUDA graphs', graphed)):
            for _ in range(2):  # seen, then captured: timing starts at replays
                [predictor._detect(c) for c in chunks]
            ours = len(tensors) / median_seconds(lambda: [predictor._detect(c) for c in chunks], device, runs)
            row(f'batch {batch:<2} {name}', ours, plain16)
    graphs = graphed._inference_networks.get(graphed.model, graphed.device).backbone.graphs
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == 'cuda' else float('nan')
    print(f'   {len(graphs)} graphs kept, {graphs.captures} captured, {graphs.replays} replays; '
          f'peak GPU memory {peak:.2f} GB')


def end_to_end_rows(adapter, graphed, items, device, runs, plain16):
    print('2. predict_items end to end (upload emulated on the host) vs plain fp16 b16 channels_last forward')
    objects = sibling(adapter, SdkObjects)
    for name, predictor, batch in (('batch 16, CUDA graphs + bulk JSON', graphed, 16),
                                   ('batch 16, eager + bulk JSON', adapter, 16),
                                   ("batch 16, eager + the SDK's objects", objects, 16),
                                   ('batch 2,  CUDA graphs + bulk JSON', graphed, 2)):
        predictor.predict_items(items, batch_size=batch)  # shapes seen and captured before timing
        ours = len(items) / median_seconds(lambda: predictor.predict_items(items, batch_size=batch), device, runs)
        row(name, ours, plain16)


def host_rows(adapter, graphed, items, tensors, device, runs):
    """Host milliseconds per image beside the graphed forward's device milliseconds per image."""
    n = len(items)
    decode = median_seconds(lambda: [adapter.prepare_item_func(item) for item in items], device, runs) / n
    detections = adapter._detect(tensors[:16])
    batch_items = [dl.Item.from_json(_json={'id': f'{i:024x}', 'datasetId': 'd' * 24, 'filename': f'/{i}.jpg'},
                                     client_api=dl.client_api, dataset=None, project=None) for i in range(16)]
    payloads = adapter._upload_payloads(batch_items, detections)
    build = median_seconds(lambda: adapter._upload_payloads(batch_items, detections), device, runs) / 16
    upload = median_seconds(lambda: [emulated_upload(i, p) for i, p in zip(batch_items, payloads)], device,
                            runs) / 16
    forward = median_seconds(lambda: graphed._detect(tensors[:16]), device, runs) / 16
    boxes = sum(len(p) for p in payloads) / 16
    print(f'3. per image ({boxes:.0f} boxes): host: decode {decode * 1e3:.2f} ms, annotation JSON '
          f'{build * 1e3:.2f} ms, upload serialised + read back {upload * 1e3:.2f} ms; '
          f'device: graphed forward {forward * 1e3:.2f} ms')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--tiny', action='store_true', help='small network and images: a CPU dry run')
    args = parser.parse_args()
    cfg, device = dict(TINY if args.tiny else FULL), torch.device(args.device)
    cuda = device.type == 'cuda'
    print(f'{torch.cuda.get_device_name(device) if cuda else "CPU"}, torch {torch.__version__}', flush=True)
    start = time.perf_counter()
    adapter = make_adapter(cfg, device)
    adapter._upload_model_annotations = emulated_upload
    graphed = sibling(adapter, cuda_graphs=True)
    if not cuda:  # the CPU predicts with the model itself: the double's wrappers go on a copy of it
        graphed.model = copy.deepcopy(adapter.model)
    cuda_graphs.use_graphs(graphed._inference_networks.get(graphed.model, graphed.device), True,
                           api=graph_api(device))
    items = [MemoryItem(i, jpeg(i, cfg['width'], cfg['height'])) for i in range(cfg['items'])]
    tensors = [adapter.prepare_item_func(item) for item in items]
    channels_last = bare_network(adapter, cfg, device).to(memory_format=torch.channels_last)
    plain16 = len(tensors) / median_seconds(lambda: [bare_forward(channels_last, tensors[i:i + 16], device, cuda)
                                                     for i in range(0, len(tensors), 16)], device, cfg['runs'])
    forward_rows(adapter, graphed, tensors, device, cfg['runs'], plain16)
    end_to_end_rows(adapter, graphed, items, device, cfg['runs'], plain16)
    host_rows(adapter, graphed, items, tensors, device, cfg['runs'])
    print(f'total {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
    main()
