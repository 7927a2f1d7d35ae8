"""One training epoch and one COCO evaluation, in the shape of torchvision's detection references.

`train_one_epoch` runs the model in training mode over a loader of
``(images, targets)`` batches (see `utils.data_loading.collate_fn`): a linear learning
rate warm-up on the first epoch, mixed precision when a GradScaler is given
(CUDA), gradient clipping, and a guard against non-finite losses: such a step
is skipped and logged, and `max_nonfinite` of them in a row raise
`NonFiniteLossError` saying what to change. `evaluate` computes COCO bbox
mAP on a validation loader and returns the `Evaluation` (per-class AP and PR
curves come from it).
"""
import contextlib
import logging
import math
import time
import warnings
from typing import Dict, Iterable, Optional

import torch
from tqdm.auto import tqdm

from utils.coco_eval import CocoEvaluator, Evaluation
from utils.coco_utils import get_coco_api_from_dataset
from utils.meters import MetricLogger, SmoothedValue
from utils.metric_names import LOSS_KEYS

logger = logging.getLogger(__name__)

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


def _length(data_loader) -> Optional[int]:
    try:
        return len(data_loader)
    except TypeError:
        return None


def _warmup_scheduler(optimizer, epoch: int, warmup_iters: int, n_batches: Optional[int], warmup_factor: float):
    """Epoch 0's per-iteration linear warm-up over ``min(warmup_iters, n_batches - 1)`` steps, else None."""
    if epoch != 0 or warmup_iters <= 0:
        return None
    iters = min(warmup_iters, n_batches - 1) if n_batches else warmup_iters
    if iters <= 0:
        return None
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=warmup_factor, total_iters=iters)


class _SkippedSteps:
    """Counts skipped steps; each is logged, and `limit` in a row raise `NonFiniteLossError`."""

    def __init__(self, header: str, limit: int, optimizer: torch.optim.Optimizer):
        self.header, self.limit, self.optimizer = header, limit, optimizer
        self.total = 0
        self.in_a_row = 0

    def skip(self, problem: str, targets) -> None:
        self.total += 1
        self.in_a_row += 1
        ids = [t.get('image_id') for t in targets]
        logger.warning('%s: %s on image_id(s) %s: skipping this step (%d in a row)',
                       self.header, problem, ids, self.in_a_row)
        self.optimizer.zero_grad(set_to_none=True)
        if self.limit and self.in_a_row >= self.limit:
            lr = self.optimizer.param_groups[0]['lr']
            raise NonFiniteLossError(
                f'training stopped: the loss (or its gradient) was NaN/inf in {self.in_a_row} steps in a row. '
                f'Try a lower learning_rate (now {lr:g}), a longer warmup_iters or a smaller max_grad_norm, '
                f'and check the annotations for broken boxes (zero or negative size, outside the image, '
                f'NaN coordinates); with amp on, try amp=false')


def _train_step(model, optimizer, images, targets, device, scaler, max_grad_norm: float):
    """Forward, backward and optimizer step: ``(loss_dict, total loss, None)``, or a reason (str)
    in the last place when the step was not taken because of a non-finite loss or gradient."""
    images, targets = _to_device(images, targets, device)
    with torch.autocast(device_type=device.type, enabled=scaler is not None):
        loss_dict = model(images, targets)
        losses = sum(loss for loss in loss_dict.values())
    optimizer.zero_grad(set_to_none=True)
    loss_value = float(losses.item())
    if not math.isfinite(loss_value):
        parts = {k: round(float(v.item()), 4) for k, v in loss_dict.items()}
        return loss_dict, losses, f'non-finite loss {loss_value} ({parts})'
    clip = bool(max_grad_norm and max_grad_norm > 0)
    if scaler is not None:
        scaler.scale(losses).backward()
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(optimizer)  # skips the step by itself on inf/NaN gradients
        scaler.update()
        return loss_dict, losses, None
    losses.backward()
    if clip and not torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)):
        return loss_dict, losses, 'non-finite gradient norm'
    optimizer.step()
    return loss_dict, losses, None


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data_loader: Iterable,
                    device: torch.device, epoch: int, scaler: Optional[torch.amp.GradScaler] = None,
                    warmup_iters: int = 1000, max_grad_norm: float = 10.0, warmup_factor: float = 1.0 / 1000,
                    max_nonfinite: int = 10, log_interval: int = 20, progress: bool = True,
                    total_epochs: Optional[int] = None) -> Dict[str, float]:
    """Train for one pass over `data_loader`; return the epoch's average of each loss and the last lr.

    - `epoch` is 0-based; on epoch 0 the learning rate rises linearly from
      `warmup_factor` x lr to lr over ``min(warmup_iters, len(data_loader) - 1)``
      iterations (a per-iteration scheduler, stepped after every batch).
    - `scaler` (a ``torch.amp.GradScaler``) turns on autocast; pass it on CUDA only.
    - `max_grad_norm` > 0 clips the gradients' total norm.
    - A non-finite loss (or gradient norm) skips the optimizer step with a
      warning; `max_nonfinite` in a row raise `NonFiniteLossError`.
    - `log_interval`: a progress line in the log every this many batches.

    Returns ``{'loss', 'loss_classifier', 'loss_box_reg', 'loss_objectness',
    'loss_rpn_box_reg', 'lr'}``; losses are averages over the steps taken (NaN
    when none was).
    """
    model.train()
    metric_logger = MetricLogger(delimiter='  ', log=logger)
    metric_logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    epoch_label = f'{epoch + 1}/{total_epochs}' if total_epochs else f'{epoch + 1}'
    header = f'Epoch: [{epoch_label}]'
    n_batches = _length(data_loader)
    warmup = _warmup_scheduler(optimizer, epoch, warmup_iters, n_batches, warmup_factor)
    skipped = _SkippedSteps(header, max_nonfinite, optimizer)
    bar = tqdm(data_loader, total=n_batches, desc=f'epoch {epoch_label}', unit='batch',
               disable=not progress, leave=False, dynamic_ncols=True)
    with contextlib.closing(bar):
        for images, targets in metric_logger.log_every(bar, log_interval, header):
            if len(images) == 0:
                logger.warning('%s: skipping a batch in which no image could be read', header)
                step_scheduler(warmup)
                continue
            loss_dict, losses, problem = _train_step(model, optimizer, images, targets, device, scaler,
                                                     max_grad_norm)
            if problem:
                skipped.skip(problem, targets)
            else:
                skipped.in_a_row = 0
            step_scheduler(warmup)
            if problem:
                continue
            lr = optimizer.param_groups[0]['lr']
            metric_logger.update(loss=losses, **loss_dict)
            metric_logger.update(lr=lr)
            if progress:
                bar.set_postfix(loss=f'{metric_logger.loss.median:.3f}', lr=f'{lr:.2e}', refresh=False)

    if skipped.total:
        logger.warning('%s: %d step(s) skipped because of non-finite values', header, skipped.total)
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


@contextlib.contextmanager
def _coco_protocol(model: torch.nn.Module):
    """Eval mode and COCO's roi_heads settings for the duration; the model's own come back afterwards."""
    roi_heads = getattr(model, 'roi_heads', None)
    saved = {name: getattr(roi_heads, name) for name in EVAL_ROI_SETTINGS} if roi_heads is not None else {}
    was_training = model.training
    model.eval()
    try:
        for name, value in (EVAL_ROI_SETTINGS.items() if roi_heads is not None else ()):
            setattr(roi_heads, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(roi_heads, name, value)
        model.train(was_training)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data_loader: Optional[Iterable], device: torch.device,
             progress: bool = True, log_interval: int = 50, backend: Optional[str] = None) -> Evaluation:
    """COCO bbox evaluation: an `Evaluation`, a mapping ``{'mAP', 'mAP_50', 'mAP_75', 'AR_100'}``
    (stats[0], [1], [2], [8]) that also carries what per-class AP and PR curves need.

    The model's roi_heads use COCO's protocol settings (score_thresh 0.05,
    nms_thresh 0.5, detections_per_img 100) for the duration and get their
    own values back afterwards, as does the model's train/eval mode. An empty
    (or missing) validation set, or no detections at all, gives 0.0 for all.
    `backend`: the COCO implementation (see `utils.coco_eval`); None picks the fastest installed.
    """
    if data_loader is None or len(data_loader.dataset) == 0:
        logger.warning('no validation images: evaluation metrics are 0.0')
        return Evaluation()

    start = time.time()
    evaluator = CocoEvaluator(get_coco_api_from_dataset(data_loader.dataset), ['bbox'], backend=backend)
    n_images = 0
    model_time = 0.0
    metric_logger = MetricLogger(delimiter='  ', log=logger)
    bar = tqdm(data_loader, desc='evaluate', unit='batch', disable=not progress, leave=False, dynamic_ncols=True)
    with _coco_protocol(model), contextlib.closing(bar):
        for images, targets in metric_logger.log_every(bar, log_interval, 'Test:'):
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

    tic = time.time()
    evaluator.accumulate()
    evaluator.summarize()
    coco_time = time.time() - tic
    evaluation = Evaluation.of(evaluator, n_images)
    logger.info('evaluated %d image(s) in %.1fs (model %.1fs, COCO %.2fs): %s', n_images, time.time() - start,
                model_time, coco_time, ' '.join(f'{key} {value:.4f}' for key, value in evaluation.items()))
    return evaluation
