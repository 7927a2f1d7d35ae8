"""COCO bbox evaluation of detections against a pycocotools ground truth.

`CocoEvaluator(coco_gt)` collects the model's outputs per image (`update`),
then `accumulate()` runs COCOeval over exactly the images it was given (an
image skipped because it could not be decoded is not counted as missed) and
`summarize()` logs the standard 12 numbers and returns them. With no
detections at all, or no ground truth, the numbers are 0.0 rather than
pycocotools' -1 ("undefined"). `Evaluation` is what `engine.evaluate` returns:
the summary metrics, plus the COCOeval state that `per_class_ap` (AP and the
precision-recall curve of each class) reads.

Backend: `faster-coco-eval` (a C++ port of COCOeval giving the same numbers)
when it is installed, else pycocotools. Measured on identical inputs the
stats agree to 1e-16 and the COCO step is 4.6-6.7x faster (0.26 s -> 0.04 s
for 50 images x 100 detections, 26.5 s -> 5.2 s for 5000 images x 100), which
matters on a GPU, where that step was ~40% of an evaluation.
"""
import collections.abc
import copy
import logging
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.evaluation.coco_utils import quiet_stdout
from utils.core.metric_names import EVAL_KEYS

logger = logging.getLogger(__name__)

BACKENDS = ('faster_coco_eval', 'pycocotools')


def available_backend() -> str:
    """'faster_coco_eval' when that package imports, else 'pycocotools'."""
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return 'pycocotools'
    return 'faster_coco_eval'


def _api(backend: str):
    """(COCO class, COCOeval class) of a backend."""
    if backend == 'faster_coco_eval':
        from faster_coco_eval import COCO as FastCOCO, COCOeval_faster
        return FastCOCO, COCOeval_faster
    if backend == 'pycocotools':
        return COCO, COCOeval
    raise ValueError(f'unknown COCO evaluation backend {backend!r}; use one of {BACKENDS}')


#: Names of COCOeval's 12 summary numbers, in `stats` order.
STAT_NAMES = ('AP', 'AP_50', 'AP_75', 'AP_small', 'AP_medium', 'AP_large',
              'AR_1', 'AR_10', 'AR_100', 'AR_small', 'AR_medium', 'AR_large')
#: COCOeval stats index of each summary metric (`metric_names.EVAL_KEYS`).
EVAL_STAT_INDEX = {'mAP': 0, 'mAP_50': 1, 'mAP_75': 2, 'AR_100': 8}


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=1)


def prediction_to_coco(image_id: int, prediction: Mapping[str, torch.Tensor]) -> List[Dict[str, Any]]:
    """One image's ``{'boxes', 'scores', 'labels'}`` as COCO result dicts (xywh boxes)."""
    boxes = prediction['boxes']
    if len(boxes) == 0:
        return []
    boxes = xyxy_to_xywh(boxes.detach().float().cpu()).tolist()
    scores = prediction['scores'].detach().float().cpu().tolist()
    labels = prediction['labels'].detach().cpu().tolist()
    return [{'image_id': int(image_id), 'category_id': int(label), 'bbox': box, 'score': score}
            for box, score, label in zip(boxes, scores, labels)]


class CocoEvaluator:
    """Collect detections, then compute COCO bbox AP/AR (only the ``bbox`` IoU type is supported).

    `backend`: 'faster_coco_eval', 'pycocotools' or None for the fastest one installed.
    """

    def __init__(self, coco_gt: COCO, iou_types: Sequence[str] = ('bbox',), backend: Optional[str] = None):
        unsupported = [t for t in iou_types if t != 'bbox']
        if unsupported:
            raise ValueError(f'only bbox evaluation is supported, got {unsupported}')
        self.backend = backend or available_backend()
        self._coco_cls, self._eval_cls = _api(self.backend)
        self.coco_gt = coco_gt
        self.iou_types = list(iou_types)
        self.img_ids: List[int] = []
        self.results: List[Dict[str, Any]] = []
        self.coco_eval: Dict[str, COCOeval] = {}
        self._stats = np.zeros(len(STAT_NAMES))

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Add ``{image_id: {'boxes': [N, 4] xyxy, 'scores': [N], 'labels': [N]}}``."""
        for image_id, prediction in predictions.items():
            self.img_ids.append(int(image_id))
            self.results.extend(prediction_to_coco(image_id, prediction))

    def accumulate(self) -> None:
        img_ids = sorted(set(self.img_ids))
        self.coco_eval = {}
        if not img_ids or not self.results:
            self._stats = np.zeros(len(STAT_NAMES))
            return
        with quiet_stdout():
            coco_gt = self._ground_truth()
            coco_dt = coco_gt.loadRes(copy.deepcopy(self.results))
            evaluator = self._eval_cls(coco_gt, coco_dt, iouType='bbox')
            evaluator.params.imgIds = img_ids
            evaluator.evaluate()
            evaluator.accumulate()
        self.coco_eval['bbox'] = evaluator

    def _ground_truth(self):
        """The ground truth as this backend's COCO object (converted once from the dataset dict)."""
        if isinstance(self.coco_gt, self._coco_cls):
            return self.coco_gt
        cache = getattr(self.coco_gt, '_backend_copies', None)
        if cache is None:
            cache = {}
            setattr(self.coco_gt, '_backend_copies', cache)
        if self.backend not in cache:
            converted = self._coco_cls()
            converted.dataset = self.coco_gt.dataset
            converted.createIndex()
            cache[self.backend] = converted
        return cache[self.backend]

    def summarize(self) -> np.ndarray:
        """Log the summary table; return the 12 stats with "undefined" (-1) reported as 0.0."""
        evaluator = self.coco_eval.get('bbox')
        if evaluator is None:
            self._stats = np.zeros(len(STAT_NAMES))
            logger.info('COCO bbox: no detections (or no images) to evaluate: all metrics 0.0')
            return self._stats
        with quiet_stdout():
            evaluator.summarize()
        logger.info('COCO bbox (%s): %s', self.backend, '  '.join(
            f'{name} {value:.4f}' for name, value in zip(STAT_NAMES, evaluator.stats)))
        self._stats = np.maximum(np.asarray(evaluator.stats, dtype=np.float64), 0.0)
        return self._stats

    @property
    def stats(self) -> np.ndarray:
        return self._stats


def per_class_ap(coco_eval, coco_gt, id_to_label: Mapping[int, str]) -> Dict[str, Dict[str, Any]]:
    """Per label: AP@[.5:.95], AP@.5 (area all, 100 detections) from COCOeval's precision array
    ``[T iou, R recall, K class, A area, M maxDets]``, the number of ground-truth boxes and the
    precision-recall curve at IoU .5. AP is None for a class without ground truth; 0.0 when it
    has ground truth but no detection (or `coco_eval` is None: no detection at all)."""
    rows: Dict[str, Dict[str, Any]] = {}
    index = {}
    if coco_eval is not None:
        index = {int(cat): k for k, cat in enumerate(coco_eval.params.catIds)}
        precision = coco_eval.eval['precision']
        recall_thresholds = [float(r) for r in coco_eval.params.recThrs]
        iou50 = int(np.argmin(np.abs(np.asarray(coco_eval.params.iouThrs) - 0.5)))
    for class_id, label in sorted(id_to_label.items()):
        n_gt = len(coco_gt.getAnnIds(catIds=[int(class_id)])) if coco_gt is not None else 0
        row: Dict[str, Any] = {'id': int(class_id), 'gt_boxes': n_gt, 'AP': None, 'AP_50': None, 'pr_50': None}
        if n_gt:
            row['AP'] = row['AP_50'] = 0.0
            k = index.get(int(class_id))
            if k is not None:
                p = precision[:, :, k, 0, -1]
                if (p > -1).any():
                    row['AP'] = float(p[p > -1].mean())
                p50 = precision[iou50, :, k, 0, -1]
                if (p50 > -1).any():
                    row['AP_50'] = float(p50[p50 > -1].mean())
                    row['pr_50'] = {'recall': recall_thresholds, 'precision': [max(0.0, float(v)) for v in p50]}
        rows[label] = row
    return rows


class Evaluation(collections.abc.Mapping):
    """One COCO bbox evaluation: a read-only mapping of the summary metrics (``mAP``, ``mAP_50``,
    ``mAP_75``, ``AR_100``), plus what per-class results need.

    - `stats`: COCOeval's 12 numbers (`STAT_NAMES` order), "undefined" as 0.0;
    - `coco_gt` / `coco_eval`: the ground truth and the accumulated COCOeval (None when there
      was nothing to evaluate); `n_images`: images evaluated;
    - `per_class(id_to_label)`: `per_class_ap` of this evaluation.
    """

    def __init__(self, stats: Optional[np.ndarray] = None, coco_gt=None, coco_eval=None, n_images: int = 0):
        self.stats = np.zeros(len(STAT_NAMES)) if stats is None else np.asarray(stats, dtype=np.float64)
        self.coco_gt = coco_gt
        self.coco_eval = coco_eval
        self.n_images = int(n_images)
        self.metrics: Dict[str, float] = {key: float(self.stats[EVAL_STAT_INDEX[key]]) for key in EVAL_KEYS}

    @classmethod
    def of(cls, evaluator: CocoEvaluator, n_images: int) -> 'Evaluation':
        """The result of an evaluator after `accumulate()` and `summarize()`."""
        return cls(evaluator.stats, evaluator.coco_gt, evaluator.coco_eval.get('bbox'), n_images)

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def __repr__(self) -> str:
        return f'Evaluation({self.metrics}, n_images={self.n_images})'

    @property
    def coco_stats(self) -> Dict[str, float]:
        return dict(zip(STAT_NAMES, (float(v) for v in self.stats)))

    def per_class(self, id_to_label: Mapping[int, str]) -> Dict[str, Dict[str, Any]]:
        return per_class_ap(self.coco_eval, self.coco_gt, id_to_label)


def rows_evaluation(coco_gt: COCO, rows_by_image: Mapping[int, Sequence[Sequence[float]]]) -> Evaluation:
    """COCO bbox evaluation of detection rows [x1, y1, x2, y2, score, label id] (the prediction paths' rows) per
    image id of `coco_gt`, on those images only."""
    evaluator = CocoEvaluator(coco_gt, ['bbox'])
    for image_id, rows in rows_by_image.items():
        rows = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
        evaluator.update({image_id: {'boxes': rows[:, :4], 'scores': rows[:, 4], 'labels': rows[:, 5].long()}})
    evaluator.accumulate()
    evaluator.summarize()
    return Evaluation.of(evaluator, len(rows_by_image))
