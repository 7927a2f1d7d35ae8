"""A torch Dataset over the reader's records, in the form torchvision's detection models train on.

A record (from `utils.data.dataloop_reader`) is::

    {'item_id': str, 'name': str, 'image_path': str, 'width': int, 'height': int,
     'boxes': [[x1, y1, x2, y2], ...], 'labels': [label name, ...]}

and an empty ``boxes`` list marks a negative (background) image. Item ``i``
returns ``(image, target)`` with ``target`` holding ``boxes`` (float32 ``[N, 4]``,
``[0, 4]`` for a negative), ``labels`` (int64 ``[N]``), ``image_id`` (``i``),
``area`` and ``iscrowd``. Targets are prepared once, up front, so the COCO ground
truth (`utils.evaluation.coco_utils`) is built from them without decoding any image.

An image that cannot be decoded at training time, or whose size the `limits`
refuse (too many pixels, too thin for the network's resize), is logged (naming
the item) and the sample comes back as ``None``; `utils.data.data_loading.collate_fn` drops
it. The reader already skips and counts such items; this guards records from an
older index or from elsewhere.
"""
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from utils.core.errors import InputError
from utils.data.images import ImageDecodeError, ImageLimits, load_image

logger = logging.getLogger(__name__)


def record_name(record: Mapping[str, Any]) -> str:
    """How log lines name a record: its item name and id."""
    frame = f" frame {record['frame']}" if 'frame' in record else ''  # a video's sampled frame
    return f"item {record.get('name') or record.get('image_path')!r}{frame} (id {record.get('item_id')})"


class DetectionDataset(torch.utils.data.Dataset):
    """Records + label map + paired transforms -> (image tensor, target dict) samples.

    Raises ValueError at construction when a record's label is missing from
    `label_to_id` (a configuration problem, reported before any training).
    Boxes without positive width and height are dropped with a warning, since
    torchvision refuses them for the whole batch.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], label_to_id: Mapping[str, int],
                 transforms: Optional[Callable] = None, limits: Optional[ImageLimits] = None):
        self.records = list(records)
        self.limits = limits
        self.label_to_id = {str(k): int(v) for k, v in label_to_id.items()}
        self.transforms = transforms
        self._kept: Optional[Dict[int, Any]] = None  # the samples made so far, once `keep_samples` asks
        self._boxes: List[np.ndarray] = []
        self._labels: List[np.ndarray] = []
        unknown: Dict[str, List[str]] = {}
        dropped = 0
        for record in self.records:
            boxes = np.asarray(record.get('boxes') or [], dtype=np.float32).reshape(-1, 4)
            names = [str(name) for name in (record.get('labels') or [])]
            if len(names) != len(boxes):
                raise InputError(f'{record_name(record)} has {len(boxes)} boxes but {len(names)} labels')
            for name in names:
                if name not in self.label_to_id:
                    unknown.setdefault(name, []).append(record_name(record))
            ids = np.asarray([self.label_to_id.get(name, -1) for name in names], dtype=np.int64)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & np.isfinite(boxes).all(axis=1)
            if not keep.all():
                dropped += int((~keep).sum())
                logger.warning('%s: dropping %d box(es) without positive width and height: %s',
                               record_name(record), int((~keep).sum()), boxes[~keep].tolist())
            self._boxes.append(boxes[keep])
            self._labels.append(ids[keep])
        if unknown:
            details = '; '.join(f'{name!r} on {items[0]}' + (f' and {len(items) - 1} more' if len(items) > 1 else '')
                                for name, items in sorted(unknown.items()))
            raise InputError(f'label(s) not in the model\'s label map {sorted(self.label_to_id)}: {details}. '
                             f'Add them to the model\'s labels / label_to_id_map or remove those annotations')
        if dropped:
            logger.warning('dropped %d degenerate box(es) in total', dropped)

    def __len__(self) -> int:
        return len(self.records)

    def annotations(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """(boxes float32 [N, 4] xyxy, label ids int64 [N]) of item `index`, as trained on; no decoding."""
        return self._boxes[index], self._labels[index]

    def get_height_and_width(self, index: int) -> Tuple[int, int]:
        record = self.records[index]
        return int(record['height']), int(record['width'])

    def keep_samples(self) -> None:
        """Keep each sample once made (for deterministic transforms: a validation set that fits in memory)."""
        self._kept = {}

    def __getitem__(self, index: int):
        if self._kept is None:
            return self._sample(index)
        if index not in self._kept:
            self._kept[index] = self._sample(index)
        return self._kept[index]

    def _sample(self, index: int):
        record = self.records[index]
        try:
            image = load_image(record['image_path'], self.limits)
        except (ImageDecodeError, OSError) as err:
            logger.warning('skipping %s: cannot read image %r: %s', record_name(record), record.get('image_path'), err)
            return None
        boxes = torch.from_numpy(self._boxes[index].copy())
        target = {
            'boxes': boxes,
            'labels': torch.from_numpy(self._labels[index].copy()),
            'image_id': index,
            'area': (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            'iscrowd': torch.zeros((len(boxes),), dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
