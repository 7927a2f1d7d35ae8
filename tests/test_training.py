"""Offline tests of the training engine: transforms, dataset, COCO evaluation, train_one_epoch, fit.

Real training uses fasterrcnn_mobilenet_v3_large_320_fpn (random weights) on a
handful of 128x128 synthetic images with coloured rectangles; the ROI sampler
and RPN proposal counts are lowered in `small_model()` so an epoch takes a
fraction of a second to a few seconds on a 2-core CPU.
"""
import collections
import copy
import csv
import functools
import gc
import logging
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

from utils.training import curves, engine, trainer
from utils.modeling.checkpoints import load_checkpoint
from utils.evaluation.coco_eval import CocoEvaluator
from utils.evaluation.coco_utils import convert_to_coco_api
from utils.core.config import DEFAULTS
from utils.training.curves import COLUMNS, read_csv, write_csv, write_png
from utils.data.detection_dataset import DetectionDataset
from utils.modeling.model_factory import build_model
from utils.core.output_layout import CURVES_CSV, CURVES_PNG
from utils.data.transforms import (Compose, RandomHorizontalFlip, RandomPhotometricDistort, RandomVerticalFlip,
                              get_transform)
from utils.data.data_loading import collate_fn

VARIANT = 'fasterrcnn_mobilenet_v3_large_320_fpn'
SIZE = 128
COLORS = {'red': (220, 30, 30), 'blue': (30, 60, 220)}
LABEL_TO_ID = {'red': 1, 'blue': 2}
ID_TO_LABEL = {1: 'red', 2: 'blue'}
CHECKPOINT_INFO = dict(variant=VARIANT, id_to_label_map=ID_TO_LABEL, min_size=SIZE, max_size=SIZE)
CPU = torch.device('cpu')


# ----------------------------------------------------------------------------- helpers
def make_records(root, n, seed=0, negatives=0, size=SIZE, prefix='img'):
    """`n` images of 1-2 non-overlapping coloured rectangles on a light grey background (the
    first `negatives` are empty), saved as PNG under `root`, as reader records."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    records = []
    for i in range(n):
        image = Image.new('RGB', (size, size), (235, 235, 235))
        draw = ImageDraw.Draw(image)
        boxes, labels = [], []
        if i >= negatives:
            for label in rng.sample(sorted(COLORS), rng.randint(1, 2)):
                for _ in range(20):
                    w, h = rng.randint(size // 4, size // 2), rng.randint(size // 4, size // 2)
                    x1, y1 = rng.randint(0, size - w), rng.randint(0, size - h)
                    box = [x1, y1, x1 + w, y1 + h]
                    if all(box[2] <= o[0] or o[2] <= box[0] or box[3] <= o[1] or o[3] <= box[1] for o in boxes):
                        break
                else:
                    continue
                draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=COLORS[label])
                boxes.append([float(v) for v in box])
                labels.append(label)
        path = os.path.join(str(root), f'{prefix}{i}.png')
        image.save(path)
        records.append({'item_id': f'id-{prefix}{i}', 'name': f'{prefix}{i}.png', 'image_path': path,
                        'width': size, 'height': size, 'boxes': boxes, 'labels': labels})
    return records


def small_model(seed=0):
    """The 320 mobilenet at 128 px with fewer sampled RoIs/proposals: same code paths, less compute.

    A copy of the one built for `seed` in this process, and the global RNG left as that build left it: the
    same model and RNG state as a build, without initialising 19M weights at every call."""
    model, rng_state = _small_model_built(seed)
    torch.set_rng_state(rng_state)
    return copy.deepcopy(model)


@functools.lru_cache(maxsize=None)
def _small_model_built(seed):
    torch.manual_seed(seed)
    model = _build_small_model()
    return model, torch.get_rng_state()


def _build_small_model():
    model = build_model(VARIANT, len(LABEL_TO_ID) + 1, SIZE, SIZE)
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 64
    model.rpn._pre_nms_top_n = dict(training=300, testing=150)
    model.rpn._post_nms_top_n = dict(training=150, testing=100)
    # A random-init backbone has no meaningful BatchNorm running statistics (torchvision's momentum of
    # 0.01 needs hundreds of steps, and their errors compound through ~50 layers): normalize with the
    # batch's own statistics in eval mode too, as pretrained backbones' frozen statistics would.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
    return model


def settings(**overrides):
    base = dict(DEFAULTS, epochs=2, batch_size=2, learning_rate=0.01, warmup_iters=4, num_workers=0,
                lr_steps=[0.8], amp=False, seed=0, checkpoint_interval_s=0)  # checkpoints every epoch
    base.update(overrides)
    return base


class _Stop(Exception):
    pass


@pytest.fixture
def curves_png_not_drawn(monkeypatch):
    """curves.png is not rendered (a quarter of a second of matplotlib a draw, two a run), for the runs whose
    tests look at other things: test_fit_writes_curves_and_checkpoints and test_curves_csv_and_png check it."""
    monkeypatch.setattr(curves, 'write_png', lambda history, path: path)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One intra-op thread: at these tiny sizes it is as fast as two, and it does not collapse when
    the machine is shared (two spinning OpenMP threads on a busy 2-core box ran 10-20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- transforms
def _marked_image(height=10, width=20, box=(2, 1, 6, 4)):
    image = torch.zeros(3, height, width)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 1.0
    return image, {'boxes': torch.tensor([list(map(float, box))]), 'labels': torch.tensor([1])}


def test_horizontal_flip_moves_boxes_with_the_pixels():
    image, target = _marked_image()
    flipped, new = RandomHorizontalFlip(p=1.0)(image, target)
    assert new['boxes'].tolist() == [[14.0, 1.0, 18.0, 4.0]]
    x1, y1, x2, y2 = map(int, new['boxes'][0].tolist())
    assert flipped[:, y1:y2, x1:x2].min() == 1.0 and flipped.sum() == image.sum()
    assert target['boxes'].tolist() == [[2.0, 1.0, 6.0, 4.0]]  # input target untouched
    # PIL images too
    pil = Image.new('RGB', (20, 10))
    flipped_pil, new = RandomHorizontalFlip(p=1.0)(pil, target)
    assert new['boxes'].tolist() == [[14.0, 1.0, 18.0, 4.0]] and flipped_pil.size == (20, 10)
    # p=0 leaves both alone
    same, kept = RandomHorizontalFlip(p=0.0)(image, target)
    assert torch.equal(same, image) and kept['boxes'].tolist() == [[2.0, 1.0, 6.0, 4.0]]


def test_vertical_flip_moves_boxes_with_the_pixels():
    image, target = _marked_image()
    flipped, new = RandomVerticalFlip(p=1.0)(image, target)
    assert new['boxes'].tolist() == [[2.0, 6.0, 6.0, 9.0]]
    x1, y1, x2, y2 = map(int, new['boxes'][0].tolist())
    assert flipped[:, y1:y2, x1:x2].min() == 1.0 and flipped.sum() == image.sum()
    # empty targets (negatives) flip fine
    _, empty = RandomVerticalFlip(p=1.0)(image, {'boxes': torch.zeros((0, 4)), 'labels': torch.zeros(0)})
    assert empty['boxes'].shape == (0, 4)


def test_get_transform_switches_and_photometric_keeps_boxes():
    def kinds(pipeline):
        return [type(t).__name__ for t in pipeline.transforms]

    assert 'RandomHorizontalFlip' in kinds(get_transform(True, {}))  # on by default
    assert 'RandomVerticalFlip' not in kinds(get_transform(True, {}))
    everything = get_transform(True, dict(augment_hflip=True, augment_vflip=True, augment_photometric=True))
    assert {'RandomHorizontalFlip', 'RandomVerticalFlip', 'RandomPhotometricDistort'} <= set(kinds(everything))
    nothing = get_transform(True, dict(augment_hflip=False, augment_vflip=False, augment_photometric=False))
    assert not any(k.startswith('Random') for k in kinds(nothing))
    assert not any(k.startswith('Random') for k in kinds(get_transform(False, dict(augment_vflip=True))))

    pil = Image.new('RGB', (32, 16), (200, 40, 40))
    target = {'boxes': torch.tensor([[1.0, 2.0, 10.0, 12.0]]), 'labels': torch.tensor([1])}
    torch.manual_seed(0)
    image, out = Compose([RandomPhotometricDistort(p=1.0, channel_shuffle_p=1.0)] + nothing.transforms)(pil, target)
    assert image.dtype == torch.float32 and image.shape == (3, 16, 32) and 0 <= image.min() <= image.max() <= 1
    assert torch.equal(out['boxes'], target['boxes'])


# ----------------------------------------------------------------------------- dataset
def test_dataset_targets_for_positive_and_negative_images(tmp_path):
    records = make_records(tmp_path, 3, seed=3, negatives=1)
    dataset = DetectionDataset(records, LABEL_TO_ID, get_transform(False, {}))
    image, target = dataset[0]  # negative
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert target['boxes'].shape == (0, 4) and target['boxes'].dtype == torch.float32
    assert target['labels'].shape == (0,) and target['labels'].dtype == torch.int64
    image, target = dataset[2]
    assert target['image_id'] == 2
    assert target['boxes'].tolist() == records[2]['boxes']
    assert target['labels'].tolist() == [LABEL_TO_ID[name] for name in records[2]['labels']]
    expected_area = [(b[2] - b[0]) * (b[3] - b[1]) for b in records[2]['boxes']]
    assert target['area'].tolist() == pytest.approx(expected_area)
    assert target['iscrowd'].tolist() == [0] * len(expected_area)


def test_undecodable_image_is_skipped_with_a_warning_naming_the_item(tmp_path, caplog):
    records = make_records(tmp_path, 3, seed=4)
    with open(records[1]['image_path'], 'w') as f:
        f.write('not an image')
    records[1]['name'] = 'broken.png'
    dataset = DetectionDataset(records, LABEL_TO_ID, get_transform(True, {}))
    with caplog.at_level(logging.WARNING):
        assert dataset[1] is None
    assert 'broken.png' in caplog.text and 'id-img1' in caplog.text
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert len(images) == 2 and [t['image_id'] for t in targets] == [0, 2]
    assert collate_fn([None, None]) == ((), ())


def test_unknown_label_and_degenerate_boxes(tmp_path, caplog):
    records = make_records(tmp_path, 2, seed=5)
    records[1] = dict(records[1], boxes=[[5.0, 5.0, 20.0, 20.0]], labels=['zebra'])
    with pytest.raises(ValueError, match="zebra.*img1"):
        DetectionDataset(records, LABEL_TO_ID)
    records[1] = dict(records[1], boxes=[[5.0, 5.0, 5.0, 20.0], [1.0, 1.0, 9.0, 9.0]], labels=['red', 'blue'])
    with caplog.at_level(logging.WARNING):
        dataset = DetectionDataset(records, LABEL_TO_ID)
    boxes, labels = dataset.annotations(1)
    assert boxes.tolist() == [[1.0, 1.0, 9.0, 9.0]] and labels.tolist() == [2]
    assert 'img1' in caplog.text


# ----------------------------------------------------------------------------- COCO evaluation
class OracleModel(torch.nn.Module):
    """Returns the next queued predictions; records the roi_heads settings it ran with."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)
        self.roi_heads = SimpleNamespace(score_thresh=0.7, nms_thresh=0.3, detections_per_img=7)
        self.seen_settings = []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images, targets=None):
        self.seen_settings.append(vars(self.roi_heads).copy())
        return [self.outputs.pop(0) for _ in images]


def _prediction(boxes, labels, score=0.9):
    return {'boxes': torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            'labels': torch.tensor(labels, dtype=torch.int64), 'scores': torch.full((len(labels),), score)}


def test_coco_ground_truth_from_records(tmp_path):
    records = make_records(tmp_path, 4, seed=6, negatives=1)
    coco = convert_to_coco_api(DetectionDataset(records, LABEL_TO_ID))
    assert sorted(coco.getImgIds()) == [0, 1, 2, 3]
    assert {c['id']: c['name'] for c in coco.loadCats(coco.getCatIds())} == ID_TO_LABEL
    assert coco.getAnnIds(imgIds=[0]) == []
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[2]))
    assert [a['bbox'] for a in anns] == [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in records[2]['boxes']]
    assert min(a['id'] for a in coco.loadAnns(coco.getAnnIds())) == 1  # pycocotools needs ids >= 1


BACKENDS = ['pycocotools', 'faster_coco_eval']


def _need(backend):
    if backend == 'faster_coco_eval':
        pytest.importorskip('faster_coco_eval')


@pytest.mark.parametrize('backend', BACKENDS)
def test_evaluate_perfect_none_and_empty(tmp_path, backend):
    _need(backend)
    evaluate = functools.partial(engine.evaluate, progress=False, backend=backend)
    records = make_records(tmp_path, 4, seed=7, negatives=1)
    dataset = DetectionDataset(records, LABEL_TO_ID, get_transform(False, {}))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    perfect = OracleModel([_prediction(r['boxes'], [LABEL_TO_ID[n] for n in r['labels']]) for r in records])
    perfect.train()
    metrics = evaluate(perfect, loader, CPU)
    assert set(metrics) == {'mAP', 'mAP_50', 'mAP_75', 'AR_100'}
    assert metrics == pytest.approx({'mAP': 1.0, 'mAP_50': 1.0, 'mAP_75': 1.0, 'AR_100': 1.0})
    assert all(s == engine.EVAL_ROI_SETTINGS for s in perfect.seen_settings)
    # the evaluation carries what per-class results need
    assert metrics.n_images == 4 and metrics.coco_stats['AP'] == pytest.approx(1.0)
    per_class = metrics.per_class(ID_TO_LABEL)
    assert set(per_class) == set(ID_TO_LABEL.values())
    for row in per_class.values():
        if row['gt_boxes']:
            assert row['AP'] == pytest.approx(1.0) and row['pr_50']['precision'][0] == pytest.approx(1.0)
    assert vars(perfect.roi_heads) == dict(score_thresh=0.7, nms_thresh=0.3, detections_per_img=7)  # restored
    assert perfect.training  # mode restored

    # every box shifted right by 0.3 of its width: IoU 0.7 / 1.3 = 0.54, a match at IoU .50 only
    shifted = [_prediction([[b[0] + 0.3 * (b[2] - b[0]), b[1], b[2] + 0.3 * (b[2] - b[0]), b[3]] for b in r['boxes']],
                           [LABEL_TO_ID[n] for n in r['labels']]) for r in records]
    metrics = evaluate(OracleModel(shifted), loader, CPU)
    assert metrics['mAP_50'] == pytest.approx(1.0) and metrics['mAP_75'] == 0.0
    assert metrics['mAP'] == pytest.approx(0.1)

    zeros = {'mAP': 0.0, 'mAP_50': 0.0, 'mAP_75': 0.0, 'AR_100': 0.0}
    nothing = OracleModel([_prediction([], []) for _ in records])
    assert evaluate(nothing, loader, CPU) == zeros
    empty = torch.utils.data.DataLoader(DetectionDataset([], LABEL_TO_ID), batch_size=2, collate_fn=collate_fn)
    assert evaluate(nothing, empty, CPU) == zeros
    # only negatives in validation: no ground truth at all -> 0.0, not -1
    negatives = DetectionDataset(make_records(tmp_path / 'neg', 2, negatives=2), LABEL_TO_ID, get_transform(False, {}))
    neg_loader = torch.utils.data.DataLoader(negatives, batch_size=2, collate_fn=collate_fn)
    some = OracleModel([_prediction([[1, 1, 20, 20]], [1]) for _ in range(2)])
    assert evaluate(some, neg_loader, CPU)['mAP'] == 0.0


def test_evaluator_ignores_images_it_was_not_given(tmp_path):
    """An image skipped (undecodable) at evaluation time does not count as missed."""
    records = make_records(tmp_path, 3, seed=8)
    coco = convert_to_coco_api(DetectionDataset(records, LABEL_TO_ID))
    evaluator = CocoEvaluator(coco)
    for i in (0, 2):
        evaluator.update({i: _prediction(records[i]['boxes'], [LABEL_TO_ID[n] for n in records[i]['labels']])})
    evaluator.accumulate()
    assert evaluator.summarize()[0] == pytest.approx(1.0)


def test_per_class_ap_reads_the_cocoeval_precision_array():
    from utils.evaluation.coco_eval import per_class_ap
    from utils.evaluation.coco_utils import coco_from_dict
    gt = {'images': [{'id': 0, 'width': 100, 'height': 100}, {'id': 1, 'width': 100, 'height': 100}],
          'annotations': [
              {'id': 1, 'image_id': 0, 'category_id': 1, 'bbox': [10, 10, 30, 30], 'area': 900, 'iscrowd': 0},
              {'id': 2, 'image_id': 1, 'category_id': 1, 'bbox': [50, 50, 20, 40], 'area': 800, 'iscrowd': 0},
              {'id': 3, 'image_id': 1, 'category_id': 2, 'bbox': [5, 60, 30, 30], 'area': 900, 'iscrowd': 0}],
          'categories': [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}, {'id': 3, 'name': 'c'}]}
    coco_gt = coco_from_dict(gt)
    evaluator = CocoEvaluator(coco_gt)
    # class a: both boxes found exactly; class b: nothing found; class c: no ground truth at all
    evaluator.update({0: {'boxes': torch.tensor([[10., 10., 40., 40.]]), 'scores': torch.tensor([0.9]),
                          'labels': torch.tensor([1])},
                      1: {'boxes': torch.tensor([[50., 50., 70., 90.], [0., 0., 10., 10.]]),
                          'scores': torch.tensor([0.8, 0.3]), 'labels': torch.tensor([1, 3])}})
    evaluator.accumulate()
    rows = per_class_ap(evaluator.coco_eval['bbox'], coco_gt, {1: 'a', 2: 'b', 3: 'c'})
    assert rows['a']['AP'] == pytest.approx(1.0) and rows['a']['AP_50'] == pytest.approx(1.0)
    assert rows['a']['gt_boxes'] == 2 and min(rows['a']['pr_50']['precision']) == pytest.approx(1.0)
    assert rows['b']['AP'] == 0.0 and rows['b']['gt_boxes'] == 1
    assert rows['c']['AP'] is None and rows['c']['gt_boxes'] == 0


@pytest.mark.parametrize('backend', BACKENDS)
def test_coco_backends_agree(tmp_path, backend):
    """The optional faster-coco-eval backend gives pycocotools' numbers (skipped when not installed)."""
    _need(backend)
    records = make_records(tmp_path, 6, seed=9, negatives=1)
    coco = convert_to_coco_api(DetectionDataset(records, LABEL_TO_ID))
    rng = random.Random(0)
    predictions = {}
    for i, record in enumerate(records):
        boxes = [[v + rng.uniform(-6, 6) for v in box] for box in record['boxes']] + [[5.0, 5.0, 60.0, 70.0]]
        labels = [LABEL_TO_ID[n] for n in record['labels']] + [1]
        predictions[i] = dict(_prediction(boxes, labels), scores=torch.rand(len(labels)))
    stats = {}
    for name in ('pycocotools', backend):
        evaluator = CocoEvaluator(coco, backend=name)
        evaluator.update(predictions)
        evaluator.accumulate()
        stats[name] = evaluator.summarize().tolist()
    assert 0.0 < stats['pycocotools'][0] < 1.0
    assert stats[backend] == pytest.approx(stats['pycocotools'], abs=1e-12)


# ----------------------------------------------------------------------------- train_one_epoch
class LossModel(torch.nn.Module):
    """Returns torchvision's four losses from one parameter; NaN on the calls listed in `nan_calls`."""

    def __init__(self, nan_calls=()):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.nan_calls = set(nan_calls)
        self.calls = 0
        self.lrs = []
        self.optimizer = None

    def forward(self, images, targets):
        if self.optimizer is not None:
            self.lrs.append(self.optimizer.param_groups[0]['lr'])
        bad = self.calls in self.nan_calls or 'all' in self.nan_calls
        self.calls += 1
        base = self.weight.sum() ** 2
        if bad:
            base = base * float('nan')
        return {'loss_classifier': base, 'loss_box_reg': base * 0.5, 'loss_objectness': base * 0.25,
                'loss_rpn_box_reg': base * 0.125}


def _dummy_loader(n_batches):
    batch = ((torch.zeros(3, 4, 4),), ({'boxes': torch.zeros((0, 4)), 'labels': torch.zeros(0, dtype=torch.int64),
                                        'image_id': 0},))
    return [batch] * n_batches


def test_nonfinite_losses_skip_steps_then_raise_a_clear_error(caplog):
    model = LossModel(nan_calls={0, 2})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.WARNING):
        result = engine.train_one_epoch(model, optimizer, _dummy_loader(5), CPU, epoch=1, warmup_iters=0,
                                        progress=False)
    assert 'non-finite loss' in caplog.text
    assert math.isfinite(result['loss'])  # averaged over the 3 finite steps only
    assert set(result) == {'loss', 'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg', 'lr'}
    assert result['loss'] == pytest.approx(1.875 * sum((1 - 0.02 * 1.875) ** (2 * k) for k in range(3)) / 3, rel=1e-4)

    model = LossModel(nan_calls={'all'})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with pytest.raises(RuntimeError, match='learning_rate') as info:
        engine.train_one_epoch(model, optimizer, _dummy_loader(30), CPU, epoch=0, warmup_iters=5,
                               max_nonfinite=10, progress=False)
    assert 'boxes' in str(info.value) and '10 steps in a row' in str(info.value)
    assert model.calls == 10
    assert model.weight.item() == 1.0 and not optimizer.state  # no step was taken


def test_fused_sgd_skips_on_the_device_exactly_like_a_plain_step(caplog):
    """Fused SGD is told to skip by an on-device flag (no sync per step); a skipped first step must
    leave the momentum as if it never happened (torch would leave uninitialised buffers)."""
    results = {}
    for fused in (False, True):
        model = LossModel(nan_calls={0, 1, 3})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01, fused=fused)
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            result = engine.train_one_epoch(model, optimizer, _dummy_loader(6), CPU, epoch=1, warmup_iters=0,
                                            log_interval=4, progress=False)
        results[fused] = (model.weight.item(), result, caplog.text.count('skipping this step'))
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6) and results[True][0] != 1.0
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-6)
    assert results[True][2] == results[False][2] == 3

    model = LossModel(nan_calls={'all'})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    with pytest.raises(engine.NonFiniteLossError, match='10 steps in a row'):
        engine.train_one_epoch(model, optimizer, _dummy_loader(30), CPU, epoch=0, warmup_iters=5,
                               max_nonfinite=10, log_interval=20, progress=False)
    assert model.calls == 10 and model.weight.item() == 1.0  # checked in time, and no step was taken
    assert all(not state['momentum_buffer'].any() for state in optimizer.state.values())


def test_linear_warmup_on_the_first_epoch_only():
    model = LossModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.optimizer = optimizer
    result = engine.train_one_epoch(model, optimizer, _dummy_loader(6), CPU, epoch=0, warmup_iters=1000,
                                    progress=False)
    # min(1000, len - 1) = 5 warm-up iterations from 0.1 / 1000 up to 0.1
    expected = [0.1 * (0.001 + (1 - 0.001) * i / 5) for i in range(6)]
    assert model.lrs == pytest.approx(expected)
    assert result['lr'] == pytest.approx(0.1)
    model.lrs.clear()
    engine.train_one_epoch(model, optimizer, _dummy_loader(3), CPU, epoch=1, warmup_iters=1000, progress=False)
    assert model.lrs == pytest.approx([0.1] * 3)


def test_lr_milestones_and_schedulers():
    assert trainer.lr_milestones([0.62, 0.85], 50) == [31, 42]
    assert trainer.lr_milestones([8, 11], 12) == [8, 11]
    assert trainer.lr_milestones([0.1], 3) == [1]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = trainer.build_lr_scheduler(opt, dict(lr_scheduler='cosine', epochs=4, lr_steps=[], lr_gamma=0.1))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2])


# ----------------------------------------------------------------------------- curves
def test_curves_csv_and_png(tmp_path):
    history = [dict(epoch=e, loss=1.0 / (e + 1), loss_classifier=0.5, loss_box_reg=0.2, loss_objectness=0.1,
                    loss_rpn_box_reg=0.05, lr=0.01, mAP=0.1 * e, mAP_50=0.2 * e, mAP_75=0.05 * e, AR_100=0.3,
                    train_time=1.0) for e in range(3)]
    csv_path = write_csv(history, str(tmp_path / CURVES_CSV))
    png_path = write_png(history, str(tmp_path / CURVES_PNG))
    rows = read_csv(csv_path)
    assert [row['epoch'] for row in rows] == [0, 1, 2] and rows[2]['mAP'] == pytest.approx(0.2)
    with open(csv_path) as f:
        assert next(csv.reader(f)) == list(COLUMNS)
    with Image.open(png_path) as image:
        assert image.format == 'PNG' and image.size[0] >= 800 and image.size[1] >= 400


# ----------------------------------------------------------------------------- fit
FIT_EPOCHS = 6  # the mAP leaves 0 in the fourth and fifth epochs, at the full rate (lr_steps=[0.9] lowers the sixth's)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One real run: FIT_EPOCHS epochs on 9 images (one negative), validation on 4 others; publish_metrics
    always raises; checkpoints at the default interval, as a user's short epochs get them (the best epoch's
    weights kept meanwhile, all written after the final epoch)."""
    root = tmp_path_factory.mktemp('fit')
    train_records = make_records(root / 'train', 9, seed=1, negatives=1)
    val_records = make_records(root / 'val', 4, seed=2)
    val_loader = torch.utils.data.DataLoader(
        DetectionDataset(val_records, LABEL_TO_ID, get_transform(False, {})), batch_size=2, collate_fn=collate_fn)
    model = small_model()
    untrained = engine.evaluate(model, val_loader, CPU, progress=False)
    logging.getLogger(__name__).info('untrained: %s', untrained)
    published, progress = [], []

    def publish(epoch, metrics):
        published.append((epoch, dict(metrics), gc.get_freeze_count()))
        raise ConnectionError('platform unreachable')

    output = str(root / 'out')
    result = trainer.fit(model, train_records, val_records, LABEL_TO_ID, output,
                         settings(epochs=FIT_EPOCHS, batch_size=2, learning_rate=0.01, warmup_iters=3, lr_steps=[0.9],
                                  checkpoint_interval_s=DEFAULTS['checkpoint_interval_s'],
                                  augment_hflip=False), CPU, CHECKPOINT_INFO,
                         on_epoch_end=lambda e, n: progress.append((e, n)), publish_metrics=publish)
    return SimpleNamespace(result=result, untrained=untrained, published=published, progress=progress,
                           output=output, model=model)


def test_training_lowers_the_loss_and_beats_the_untrained_model(trained):
    history = trained.result.history
    assert len(history) == trained.result.epochs_run == FIT_EPOCHS and not trained.result.stopped_early
    assert history[-1]['loss'] < history[0]['loss']
    assert trained.result.best_score == max(row['mAP'] for row in history)
    assert trained.result.best_score > trained.untrained['mAP'] + 0.005
    assert max(row['mAP_50'] for row in history) > max(trained.untrained['mAP_50'], 0.05)
    assert trained.progress == [(e, FIT_EPOCHS) for e in range(FIT_EPOCHS)]


def test_publish_metrics_gets_every_epoch_and_its_errors_do_not_stop_training(trained):
    keys = {'loss', 'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg', 'lr',
            'mAP', 'mAP_50', 'mAP_75', 'AR_100'}
    assert [epoch for epoch, _, _ in trained.published] == list(range(FIT_EPOCHS))  # it raised every time
    for epoch, metrics, _ in trained.published:
        assert set(metrics) == keys
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
        assert metrics['mAP'] == trained.result.history[epoch]['mAP']


def test_training_keeps_the_garbage_collector_off_the_heap_and_gives_it_back(trained):
    """utils.core.frozen_heap around the epochs: frozen while they run, nothing frozen after fit."""
    assert all(frozen > 1000 for _, _, frozen in trained.published)
    assert gc.get_freeze_count() == 0


def test_fit_writes_curves_and_checkpoints(trained):
    rows = read_csv(os.path.join(trained.output, 'curves.csv'))
    assert [row['epoch'] for row in rows] == list(range(FIT_EPOCHS))
    assert set(COLUMNS) <= set(rows[0])
    for row, record in zip(rows, trained.result.history):
        assert row['loss'] == pytest.approx(record['loss']) and row['mAP'] == pytest.approx(record['mAP'])
    with Image.open(os.path.join(trained.output, 'curves.png')) as image:
        image.verify()

    last = load_checkpoint(os.path.join(trained.output, 'weights', 'last.pth'))
    best = load_checkpoint(os.path.join(trained.output, 'weights', 'best.pth'))
    assert last['epoch'] == FIT_EPOCHS - 1 and last['model_variant'] == VARIANT and last['id_to_label_map'] == ID_TO_LABEL
    assert {'optimizer', 'lr_scheduler', 'scaler', 'best_score', 'best_epoch', 'history'} <= set(last)
    assert best['epoch'] == trained.result.best_epoch == last['best_epoch']
    assert best['metrics']['mAP'] == trained.result.best_score
    # the model is left holding the best epoch's weights
    state = trained.model.state_dict()
    assert all(torch.equal(state[k].cpu(), v) for k, v in best['state_dict'].items())


def _sized_records(root, sizes):
    os.makedirs(root, exist_ok=True)
    records = []
    for i, (height, width) in enumerate(sizes):
        path = os.path.join(str(root), f'img{i}.png')
        Image.new('RGB', (width, height), (200, 200, 200)).save(path)
        records.append({'item_id': f'id{i}', 'name': f'img{i}.png', 'image_path': path, 'width': width,
                        'height': height, 'boxes': [[2.0, 2.0, 20.0, 20.0]], 'labels': ['red']})
    return records


def test_the_training_loader_groups_batches_by_aspect_ratio_and_replays_an_epoch(tmp_path):
    sizes = [(48, 96), (96, 48), (64, 64)] * 5  # landscape, portrait, square: three groups
    records = _sized_records(tmp_path, sizes)
    config = settings(batch_size=2, seed=3)
    loader, _, _ = trainer._build_loaders(records, [], LABEL_TO_ID, trainer.for_training(config, CPU), CPU, None)

    def epoch_batches(epoch):
        loader.batch_sampler.set_epoch(epoch)
        return [[(image.shape[1], image.shape[2]) for image in images] for images, _ in loader]

    batches = epoch_batches(0)
    assert len(batches) == len(loader) == 3 * 3 and all(len(batch) == 2 for batch in batches)
    assert all(len(set(batch)) == 1 for batch in batches)  # one shape per batch: no mixed padding
    orders = [[target['image_id'] for _, targets in loader for target in targets] for _ in range(2)]
    assert orders[0] == orders[1]  # the same epoch replays the same order (as a resumed run does)
    loader.batch_sampler.set_epoch(1)
    assert [t['image_id'] for _, targets in loader for t in targets] != orders[0]


def test_resume_continues_with_the_saved_state(tmp_path, monkeypatch, curves_png_not_drawn):
    train_records = make_records(tmp_path / 'train', 2, seed=11)
    val_records = make_records(tmp_path / 'val', 2, seed=12)
    config = settings(epochs=3, batch_size=1, lr_steps=[2], lr_gamma=0.5, warmup_iters=1)  # two steps an epoch

    # reference: an uninterrupted run
    reference_model = small_model()
    reference = trainer.fit(reference_model, train_records, val_records, LABEL_TO_ID, str(tmp_path / 'ref'),
                            config, CPU, CHECKPOINT_INFO)

    output = str(tmp_path / 'out')

    def stop_after_first(epoch, total):
        if epoch == 0:
            raise _Stop()

    with pytest.raises(_Stop):
        trainer.fit(small_model(), train_records, val_records, LABEL_TO_ID, output, config, CPU, CHECKPOINT_INFO,
                    on_epoch_end=stop_after_first)
    saved = load_checkpoint(os.path.join(output, 'weights', 'last.pth'))
    assert saved['epoch'] == 0 and len(saved['history']) == 1

    seen = []
    real_train = engine.train_one_epoch

    def spy(model, optimizer, data_loader, device, epoch, **kwargs):
        if not seen:  # the optimizer as the resumed run starts its first epoch
            state = optimizer.state_dict()
            buffers = {i: s['momentum_buffer'].clone() for i, s in state['state'].items()}
            seen.append((epoch, buffers, optimizer.param_groups[0]['lr'],
                         {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return real_train(model, optimizer, data_loader, device, epoch, **kwargs)

    monkeypatch.setattr(trainer.engine, 'train_one_epoch', spy)
    epochs_seen = []
    result = trainer.fit(small_model(seed=99), train_records, val_records, LABEL_TO_ID, output, config, CPU,
                         CHECKPOINT_INFO, on_epoch_end=lambda e, n: epochs_seen.append(e))
    epoch, buffers, lr, weights = seen[0]
    assert epoch == 1 and epochs_seen == [1, 2]
    saved_buffers = saved['optimizer']['state']
    assert buffers.keys() == saved_buffers.keys() and len(buffers) > 0
    assert all(torch.equal(buffers[i], saved_buffers[i]['momentum_buffer']) for i in buffers)
    assert lr == pytest.approx(0.01)  # warm-up done, milestone (epoch 2) not reached yet
    assert all(torch.equal(weights[k], v) for k, v in saved['state_dict'].items())
    assert result.epochs_run == 3 and [row['epoch'] for row in result.history] == [0, 1, 2]
    assert result.history[0] == saved['history'][0]
    last = load_checkpoint(os.path.join(output, 'weights', 'last.pth'))
    assert last['optimizer']['param_groups'][0]['lr'] == pytest.approx(0.005)  # the schedule continued
    # same weights and scores as the uninterrupted run
    for key in ('loss', 'mAP'):
        assert [row[key] for row in result.history] == pytest.approx([row[key] for row in reference.history],
                                                                     rel=1e-4, abs=1e-6)
    ref_last = load_checkpoint(os.path.join(str(tmp_path / 'ref'), 'weights', 'last.pth'))
    assert all(torch.allclose(ref_last['state_dict'][k].float(), v.float(), rtol=1e-4, atol=1e-6)
               for k, v in last['state_dict'].items())

    # a finished run resumed trains nothing more and returns the saved result
    calls = []
    again = trainer.fit(small_model(), train_records, val_records, LABEL_TO_ID, output, config, CPU,
                        CHECKPOINT_INFO, on_epoch_end=lambda e, n: calls.append(e))
    assert calls == [] and again == result


def test_best_checkpoint_and_early_stopping(tmp_path, monkeypatch, curves_png_not_drawn):
    scores = iter([0.10, 0.30, 0.20, 0.25, 0.90, 0.95])
    snapshots = {}

    def evaluate(model, loader, device, **kw):  # at the end of each epoch: the weights the epoch ends with
        snapshots[len(snapshots)] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {'mAP': next(scores), 'mAP_50': 0.5, 'mAP_75': 0.1, 'AR_100': 0.2}

    monkeypatch.setattr(trainer.engine, 'evaluate', evaluate)
    train_records = make_records(tmp_path / 'train', 2, seed=21)
    val_records = make_records(tmp_path / 'val', 1, seed=22)
    model = small_model()
    result = trainer.fit(model, train_records, val_records, LABEL_TO_ID, str(tmp_path / 'out'),
                         settings(epochs=6, early_stopping_patience=2), CPU, CHECKPOINT_INFO)
    assert result.stopped_early and result.epochs_run == 4 and sorted(snapshots) == [0, 1, 2, 3]
    assert result.best_epoch == 1 and result.best_score == pytest.approx(0.30)
    assert [row['mAP'] for row in result.history] == pytest.approx([0.10, 0.30, 0.20, 0.25])
    best = load_checkpoint(str(tmp_path / 'out' / 'weights' / 'best.pth'))
    assert best['epoch'] == max(result.history, key=lambda row: row['mAP'])['epoch'] == 1
    assert all(torch.equal(best['state_dict'][k], v) for k, v in snapshots[1].items())
    assert not all(torch.equal(best['state_dict'][k], v) for k, v in snapshots[3].items())
    last = load_checkpoint(str(tmp_path / 'out' / 'weights' / 'last.pth'))
    assert last['stopped_early'] and last['epoch'] == 3 and last['finished']
    # resuming an early-stopped run does nothing more
    again = trainer.fit(small_model(), train_records, val_records, LABEL_TO_ID, str(tmp_path / 'out'),
                        settings(epochs=6, early_stopping_patience=2), CPU, CHECKPOINT_INFO)
    assert again.stopped_early and again.epochs_run == 4 and again.best_epoch == 1


def test_fit_without_validation_and_with_an_explicit_resume_path(tmp_path, monkeypatch, curves_png_not_drawn):
    """No validation images: no evaluation, best.pth follows the latest epoch, early stopping stays off.
    `resume_path` continues another run's last.pth in a new output_path. (Training is stubbed: this is
    the trainer's bookkeeping.)"""
    calls = []

    def fake_train(model, optimizer, data_loader, device, epoch, **kwargs):
        calls.append(epoch)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # weights change every epoch
        return dict(loss=1.0 / (epoch + 1), loss_classifier=0.1, loss_box_reg=0.2, loss_objectness=0.3,
                    loss_rpn_box_reg=0.4, lr=0.01)

    def no_evaluation(*args, **kwargs):
        raise AssertionError('evaluate must not run without validation images')

    monkeypatch.setattr(trainer.engine, 'train_one_epoch', fake_train)
    monkeypatch.setattr(trainer.engine, 'evaluate', no_evaluation)
    train_records = make_records(tmp_path / 'train', 2, seed=31)
    first = str(tmp_path / 'first')
    result = trainer.fit(small_model(), train_records, [], LABEL_TO_ID, first,
                         settings(epochs=2, early_stopping_patience=1), CPU, CHECKPOINT_INFO)
    assert calls == [0, 1] and result.epochs_run == 2 and not result.stopped_early
    assert result.best_epoch == 1 and all(row['mAP'] == 0.0 for row in result.history)
    best = load_checkpoint(os.path.join(first, 'weights', 'best.pth'))
    last = load_checkpoint(os.path.join(first, 'weights', 'last.pth'))
    assert best['epoch'] == 1 and all(torch.equal(best['state_dict'][k], v) for k, v in last['state_dict'].items())

    calls.clear()
    second = str(tmp_path / 'second')
    resumed = trainer.fit(small_model(seed=5), train_records, [], LABEL_TO_ID, second, settings(epochs=3), CPU,
                          CHECKPOINT_INFO, resume_path=os.path.join(first, 'weights', 'last.pth'))
    assert calls == [2] and resumed.epochs_run == 3 and resumed.history[:2] == result.history
    assert load_checkpoint(os.path.join(second, 'weights', 'last.pth'))['epoch'] == 2

    other_labels = dict(CHECKPOINT_INFO, id_to_label_map={1: 'red', 2: 'green'})
    with pytest.raises(ValueError, match='labels'):
        trainer.fit(small_model(), train_records, [], LABEL_TO_ID, str(tmp_path / 'third'), settings(epochs=3), CPU,
                    other_labels, resume_path=os.path.join(first, 'weights', 'last.pth'))


def test_a_small_validation_set_is_decoded_once_for_the_whole_run(tmp_path, monkeypatch, curves_png_not_drawn):
    """Evaluation every epoch over a set that fits in memory (VALIDATION_CACHE_BYTES) decodes each image once,
    with the same metrics as a set read by the loader every epoch."""
    import utils.data.detection_dataset as detection_dataset
    decoded = []
    real_load = detection_dataset.load_image
    monkeypatch.setattr(detection_dataset, 'load_image', lambda path, *args: decoded.append(path) or
                        real_load(path, *args))
    train, val = make_records(tmp_path / 'train', 2, seed=5), make_records(tmp_path / 'val', 2, seed=6)

    def run(output, cache_bytes):
        monkeypatch.setattr(trainer, 'VALIDATION_CACHE_BYTES', cache_bytes)
        decoded.clear()
        result = trainer.fit(small_model(), train, val, LABEL_TO_ID, str(tmp_path / output), settings(epochs=2),
                             CPU, CHECKPOINT_INFO)
        reads = collections.Counter(path for path in decoded if path in {r['image_path'] for r in val})
        return sorted(reads.values()), [(row['mAP'], row['AR_100']) for row in result.history]

    kept_reads, kept_scores = run('kept', trainer.VALIDATION_CACHE_BYTES)
    read_reads, read_scores = run('read', 0)
    assert kept_reads == [1, 1] and read_reads == [2, 2]
    assert kept_scores == read_scores
