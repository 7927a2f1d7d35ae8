"""One training epoch and one COCO evaluation, in the shape of torchvision's detection references.

`train_one_epoch` runs the model in training mode over a loader of
``(images, targets)`` batches (see `utils.utils.collate_fn`): a linear learning
rate warm-up on the first epoch, mixed precision when a GradScaler is given
(CUDA), gradient clipping, and a guard against non-finite losses: such a step
is skipped and logged, and `max_nonfinite` of them in a row raise
`NonFiniteLossError` saying what to change. `evaluate` computes COCO bbox
mAP on a validation loader.
"""
import logging
import math
import time
import warnings
from typing import Dict, Iterable, Optional

import torch
from tqdm.auto import tqdm

from utils import utils
from utils.coco_eval import CocoEvaluator
from utils.coco_utils import get_coco_api_from_dataset

logger = logging.getLogger(__name__)

LOSS_KEYS = ('loss', 'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg')
EVAL_KEYS = ('mAP', 'mAP_50', 'mAP_75', 'AR_100')
#: COCOeval stats index of each evaluation key.
_STAT_INDEX = {'mAP': 0, 'mAP_50': 1, 'mAP_75': 2, 'AR_100': 8}
#: roi_heads settings evaluation uses (COCO protocol), restored afterwards.
EVAL_ROI_SETTINGS = {'score_thresh': 0.05, 'nms_thresh': 0.5, 'detections_per_img': 100}


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf losses too many times in a row."""


def _to_device(images, targets, device: torch.device):
    non_blocking = device.type == 'cuda'
    images = [image.to(device, non_blocking=non_blocking) for image in images]
    targets = [{k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
                for k, v in target.items()} for target in targets]
    return images, targets


def _describe_batch(targets) -> str:
    ids = [t.get('image_id') for t in targets]
    return f'image_id(s) {ids}'


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data_loader: Iterable,
                    device: torch.device, epoch: int, scaler: Optional[torch.amp.GradScaler] = None,
                    warmup_iters: int = 1000, max_grad_norm: float = 10.0, warmup_factor: float = 1.0 / 1000,
                    max_nonfinite: int = 10, print_freq: int = 20, progress: bool = True,
                    total_epochs: Optional[int] = None) -> Dict[str, float]:
    """Train for one pass over `data_loader`; return the epoch's average of each loss and the last lr.

    - `epoch` is 0-based; on epoch 0 the learning rate rises linearly from
      `warmup_factor` x lr to lr over ``min(warmup_iters, len(data_loader) - 1)``
      iterations (a per-iteration scheduler, stepped after every batch).
    - `scaler` (a ``torch.amp.GradScaler``) turns on autocast; pass it on CUDA only.
    - `max_grad_norm` > 0 clips the gradients' total norm.
    - A non-finite loss (or gradient norm) skips the optimizer step with a
      warning; `max_nonfinite` in a row raise `NonFiniteLossError`.

    Returns ``{'loss', 'loss_classifier', 'loss_box_reg', 'loss_objectness',
    'loss_rpn_box_reg', 'lr'}``; losses are averages over the steps taken (NaN
    when none was).
    """
    model.train()
    metric_logger = utils.MetricLogger(delimiter='  ', log=logger)
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    epoch_label = f'{epoch + 1}/{total_epochs}' if total_epochs else f'{epoch + 1}'
    header = f'Epoch: [{epoch_label}]'

    warmup_scheduler = None
    try:
        n_batches = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        n_batches = None
    if epoch == 0 and warmup_iters > 0:
        iters = min(warmup_iters, n_batches - 1) if n_batches else warmup_iters
        if iters > 0:
            warmup_scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=warmup_factor,
                                                                 total_iters=iters)

    use_amp = scaler is not None
    nonfinite_in_a_row = 0
    skipped = 0
    steps = 0
    bar = tqdm(data_loader, total=n_batches, desc=f'epoch {epoch_label}', unit='batch',
               disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for images, targets in metric_logger.log_every(bar, print_freq, header):
            if len(images) == 0:
                logger.warning('%s: skipping a batch in which no image could be read', header)
                step_scheduler(warmup_scheduler)
                continue
            images, targets = _to_device(images, targets, device)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                loss_dict = model(images, targets)
                losses = sum(loss for loss in loss_dict.values())

            loss_dict_reduced = utils.reduce_dict(loss_dict)
            losses_reduced = sum(loss for loss in loss_dict_reduced.values())
            loss_value = float(losses_reduced.item())

            if not math.isfinite(loss_value):
                skipped += 1
                nonfinite_in_a_row += 1
                parts = {k: round(float(v.item()), 4) for k, v in loss_dict_reduced.items()}
                logger.warning('%s: non-finite loss %s (%s) on %s: skipping this step (%d in a row)',
                               header, loss_value, parts, _describe_batch(targets), nonfinite_in_a_row)
                optimizer.zero_grad(set_to_none=True)
                _check_nonfinite(nonfinite_in_a_row, max_nonfinite, optimizer)
                step_scheduler(warmup_scheduler)
                continue

            optimizer.zero_grad(set_to_none=True)
            stepped = True
            if use_amp:
                scaler.scale(losses).backward()
                if max_grad_norm and max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                scaler.step(optimizer)  # skips the step by itself on inf/NaN gradients
                scaler.update()
            else:
                losses.backward()
                if max_grad_norm and max_grad_norm > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                    stepped = bool(torch.isfinite(grad_norm))
                if stepped:
                    optimizer.step()
            if not stepped:
                skipped += 1
                nonfinite_in_a_row += 1
                logger.warning('%s: non-finite gradient norm on %s: skipping this step (%d in a row)',
                               header, _describe_batch(targets), nonfinite_in_a_row)
                optimizer.zero_grad(set_to_none=True)
                _check_nonfinite(nonfinite_in_a_row, max_nonfinite, optimizer)
                step_scheduler(warmup_scheduler)
                continue

            nonfinite_in_a_row = 0
            steps += 1
            step_scheduler(warmup_scheduler)
            metric_logger.update(loss=losses_reduced, **loss_dict_reduced)
            metric_logger.update(lr=optimizer.param_groups[0]['lr'])
            if progress:
                bar.set_postfix(loss=f'{metric_logger.loss.median:.3f}', lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                refresh=False)
    finally:
        bar.close()

    if skipped:
        logger.warning('%s: %d step(s) skipped because of non-finite values', header, skipped)
    result = {}
    for key in LOSS_KEYS:
        meter = metric_logger.meters.get(key)
        result[key] = meter.global_avg if meter is not None else float('nan')
    result['lr'] = float(optimizer.param_groups[0]['lr'])
    return result


def step_scheduler(scheduler) -> None:
    """`scheduler.step()`, without torch's warning when no optimizer step has been taken yet."""
    if scheduler is None:
        return
    with warnings.catch_warnings():
        # Stepping before any optimizer.step() (when the first batches were skipped) is intended.
        warnings.filterwarnings('ignore', message='Detected call of `lr_scheduler.step\\(\\)`')
        scheduler.step()


def _check_nonfinite(count: int, limit: int, optimizer: torch.optim.Optimizer) -> None:
    if limit and count >= limit:
        lr = optimizer.param_groups[0]['lr']
        raise NonFiniteLossError(
            f'training stopped: the loss (or its gradient) was NaN/inf in {count} steps in a row. '
            f'Try a lower learning_rate (now {lr:g}), a longer warmup_iters or a smaller max_grad_norm, '
            f'and check the annotations for broken boxes (zero or negative size, outside the image, '
            f'NaN coordinates); with amp on, try amp=false')


def _model_roi_heads(model: torch.nn.Module):
    inner = model.module if hasattr(model, 'module') else model
    return getattr(inner, 'roi_heads', None)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data_loader: Optional[Iterable], device: torch.device,
             progress: bool = True, print_freq: int = 50, backend: Optional[str] = None) -> Dict[str, float]:
    """COCO bbox evaluation: ``{'mAP', 'mAP_50', 'mAP_75', 'AR_100'}`` (stats[0], [1], [2], [8]).

    The model's roi_heads use COCO's protocol settings (score_thresh 0.05,
    nms_thresh 0.5, detections_per_img 100) for the duration and get their
    own values back afterwards, as does the model's train/eval mode. An empty
    (or missing) validation set, or no detections at all, gives 0.0 for all.
    `backend`: the COCO implementation (see `utils.coco_eval`); None picks the fastest installed.
    """
    zeros = {key: 0.0 for key in EVAL_KEYS}
    if data_loader is None or len(data_loader.dataset) == 0:
        logger.warning('no validation images: evaluation metrics are 0.0')
        return zeros

    start = time.time()
    coco_gt = get_coco_api_from_dataset(data_loader.dataset)
    evaluator = CocoEvaluator(coco_gt, ['bbox'], backend=backend)
    roi_heads = _model_roi_heads(model)
    saved = {name: getattr(roi_heads, name) for name in EVAL_ROI_SETTINGS} if roi_heads is not None else {}
    was_training = model.training
    model.eval()
    n_images = 0
    model_time = 0.0
    try:
        if roi_heads is not None:
            for name, value in EVAL_ROI_SETTINGS.items():
                setattr(roi_heads, name, value)
        metric_logger = utils.MetricLogger(delimiter='  ', log=logger)
        bar = tqdm(data_loader, desc='evaluate', unit='batch', disable=not progress, leave=False,
                   dynamic_ncols=True)
        try:
            for images, targets in metric_logger.log_every(bar, print_freq, 'Test:'):
                if len(images) == 0:
                    continue
                images = [image.to(device, non_blocking=device.type == 'cuda') for image in images]
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                tic = time.time()
                outputs = model(images)
                outputs = [{k: v.to('cpu') for k, v in output.items()} for output in outputs]
                model_time += time.time() - tic
                evaluator.update({target['image_id']: output for target, output in zip(targets, outputs)})
                n_images += len(images)
        finally:
            bar.close()
    finally:
        for name, value in saved.items():
            setattr(roi_heads, name, value)
        model.train(was_training)

    evaluator.synchronize_between_processes()
    tic = time.time()
    evaluator.accumulate()
    stats = evaluator.summarize()
    coco_time = time.time() - tic
    metrics = {key: float(stats[index]) for key, index in _STAT_INDEX.items()}
    logger.info('evaluated %d image(s) in %.1fs (model %.1fs, COCO %.2fs): mAP %.4f mAP_50 %.4f mAP_75 %.4f AR_100 %.4f',
                n_images, time.time() - start, model_time, coco_time,
                metrics['mAP'], metrics['mAP_50'], metrics['mAP_75'], metrics['AR_100'])
    return metrics
