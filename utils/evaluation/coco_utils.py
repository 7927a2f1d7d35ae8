"""COCO ground truth for pycocotools, built from our dataset's prepared targets (no image decoding).

Image ids are the dataset indices (what `DetectionDataset` puts in
``target['image_id']``); annotation ids start at 1 (pycocotools treats a
matched ground-truth id of 0 as "no match"); categories are the label map's
ids; ``area`` is the box area (we have no masks), ``iscrowd`` is 0.
"""
import contextlib
import io
import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
from pycocotools.coco import COCO

from utils.data.detection_dataset import DetectionDataset

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_stdout():
    """pycocotools prints progress to stdout; keep library output in the logs instead."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield buffer
    text = buffer.getvalue().strip()
    if text:
        logger.debug('pycocotools: %s', text)


def _base_dataset(dataset):
    """Unwrap `torch.utils.data.Subset`s down to the DetectionDataset, composing the indices."""
    indices = None
    while isinstance(dataset, torch.utils.data.Subset):
        indices = list(dataset.indices) if indices is None else [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def coco_dict_from_dataset(dataset: DetectionDataset, indices: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """The COCO-format dict (images, annotations, categories) of `dataset` (or of `indices` of it)."""
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    ann_id = 1
    for index in (range(len(dataset)) if indices is None else indices):
        record = dataset.records[index]
        height, width = dataset.get_height_and_width(index)
        images.append({'id': int(index), 'width': int(width), 'height': int(height),
                       'file_name': str(record.get('name') or record.get('image_path', ''))})
        boxes, labels = dataset.annotations(index)
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
            w, h = x2 - x1, y2 - y1
            annotations.append({'id': ann_id, 'image_id': int(index), 'category_id': int(label),
                                'bbox': [x1, y1, w, h], 'area': w * h, 'iscrowd': 0})
            ann_id += 1
    categories = [{'id': int(i), 'name': name, 'supercategory': 'object'}
                  for name, i in sorted(dataset.label_to_id.items(), key=lambda kv: kv[1])]
    return {'images': images, 'annotations': annotations, 'categories': categories}


def coco_from_dict(dataset_dict: Dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset_dict
    with quiet_stdout():
        coco.createIndex()
    return coco


def convert_to_coco_api(dataset) -> COCO:
    """A pycocotools COCO ground truth of a DetectionDataset (or a Subset of one)."""
    base, indices = _base_dataset(dataset)
    if not isinstance(base, DetectionDataset):
        raise TypeError(f'expected a DetectionDataset (or a Subset of one), got {type(base).__name__}')
    return coco_from_dict(coco_dict_from_dataset(base, indices))


def get_coco_api_from_dataset(dataset) -> COCO:
    """The dataset's COCO ground truth, built once and cached on the dataset object."""
    base, indices = _base_dataset(dataset)
    if indices is None and isinstance(base, DetectionDataset):
        cached = getattr(base, '_coco_gt', None)
        if cached is None:
            cached = convert_to_coco_api(base)
            base._coco_gt = cached
        return cached
    return convert_to_coco_api(dataset)
