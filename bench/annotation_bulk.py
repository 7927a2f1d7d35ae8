"""Host time per box from detection rows to the upload's request body: the SDK's objects vs the JSON built in bulk.

    python bench/annotation_bulk.py                  # 16 images x 100 boxes, best of 20
    python bench/annotation_bulk.py --boxes 10       # fewer boxes an image

Both sides end where `item.annotations.upload` hands the batch to HTTP: its serialisation
(`_create_batches_for_upload`) and the request body (`json.dumps`), on real `dl.Item` entities built offline.
  SDK path:  box_collection.boxes_to_collection (dl.Box + dl.Annotation per box), the SDK's stamp
             (`_update_predictions_metadata`), `Annotation.to_json` inside the upload's serialisation;
  bulk:      annotation_json.batch_box_annotations, the same serialisation (dicts pass through).
Also printed: what both still pay after the upload, the SDK reading the platform's answer back into its
objects (`AnnotationCollection.from_json`: what predict_items returns). There is no torchvision
counterpart to building annotations: the ratio is against the SDK's own path (>1: bulk faster).
"""
import argparse
import copy
import json
import os
import sys
import tempfile

os.environ.setdefault('DATALOOP_PATH', tempfile.mkdtemp())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dtlpy as dl  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import best_of  # noqa: E402
from fasterrcnn_adapter import FasterRCNNAdapter  # noqa: E402
from utils.platform.box_collection import boxes_to_collection  # noqa: E402
from utils.platform.annotation_json import batch_box_annotations  # noqa: E402
from utils.platform.local_model import local_model  # noqa: E402

LABELS = {i: f'label-{i}' for i in range(1, 91)}


def detection_rows(images, boxes, seed=0):
    """Per image, rows [left, top, right, bottom, score, label id] as `detection_rows` returns them (floats)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(images):
        xs, ys = np.sort(rng.random((boxes, 2)) * 640, axis=1), np.sort(rng.random((boxes, 2)) * 480, axis=1)
        table = np.column_stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1], rng.random(boxes),
                                 rng.integers(1, 91, boxes)])
        out.append(table.tolist())
    return out


def offline_items(count):
    return [dl.Item.from_json(_json={'id': f'{i:024x}', 'datasetId': 'd' * 24, 'filename': f'/{i}.jpg',
                                     'name': f'{i}.jpg', 'metadata': {'system': {'width': 640, 'height': 480}}},
                              client_api=dl.client_api, dataset=None, project=None) for i in range(count)]


def request_bodies(items, per_item):
    """What `item.annotations.upload` does before HTTP: serialise, batch, encode each request body."""
    return [json.dumps(batch) for item, annotations in zip(items, per_item)
            for batch in item.annotations._create_batches_for_upload(annotations)]


def sdk_path(adapter, items, rows):
    collections = [boxes_to_collection(r, LABELS, adapter.model_entity.name, adapter.model_entity.id) for r in rows]
    for item, collection in zip(items, collections):
        adapter._update_predictions_metadata(item, collection)
    return request_bodies(items, [collection.annotations for collection in collections])


def bulk_path(adapter, items, rows):
    per_item = batch_box_annotations(items, range(len(items)), rows, LABELS, adapter.model_entity.name,
                                     adapter.model_entity.id)
    return request_bodies(items, per_item)


def best_seconds(fn, repeats):
    return best_of(fn, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=16)
    parser.add_argument('--boxes', type=int, default=100, help='boxes an image')
    parser.add_argument('--repeats', type=int, default=20)
    args = parser.parse_args()
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model({'pretrained': False, 'device': 'cpu'}, labels=list(LABELS.values()))
    items, rows = offline_items(args.images), detection_rows(args.images, args.boxes)
    assert sdk_path(adapter, items, rows) == bulk_path(adapter, items, rows), 'the two paths sent different bodies'
    boxes = args.images * args.boxes
    sdk = best_seconds(lambda: sdk_path(adapter, items, rows), args.repeats) / boxes * 1e6
    bulk = best_seconds(lambda: bulk_path(adapter, items, rows), args.repeats) / boxes * 1e6
    answers = [json.loads(body) for body in bulk_path(adapter, items, rows)]  # one body an item at <= 100 boxes
    read_back = best_seconds(lambda: [dl.AnnotationCollection.from_json(_json=copy.deepcopy(a), item=item)
                                      for item, a in zip(items, answers)], args.repeats) / boxes * 1e6
    copying = best_seconds(lambda: [copy.deepcopy(a) for a in answers], args.repeats) / boxes * 1e6
    print(f'{args.images} images x {args.boxes} boxes, best of {args.repeats}; host us per box')
    print(f'  rows -> upload request body: SDK objects {sdk:7.2f} us, bulk JSON {bulk:7.2f} us, '
          f'ratio {sdk / bulk:5.2f}')
    print(f'  per image of {args.boxes} boxes:          SDK objects {sdk * args.boxes / 1e3:7.2f} ms, '
          f'bulk JSON {bulk * args.boxes / 1e3:7.2f} ms')
    print(f'  both, after the upload: the answer read back into SDK objects {read_back - copying:7.2f} us a box')


if __name__ == '__main__':
    main()
