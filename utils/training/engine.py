"""One training epoch and one COCO evaluation, in the shape of torchvision's detection references.

`train_one_epoch` runs the model in training mode over a loader of
``(images, targets)`` batches (see `utils.data.data_loading.collate_fn`): a linear learning
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
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from utils.evaluation.coco_eval import CocoEvaluator, Evaluation
from utils.evaluation.coco_utils import get_coco_api_from_dataset
from utils.core.frozen_heap import frozen_heap
from utils.core.metric_names import LOSS_KEYS
from utils.core.progress import Progress
from utils.modeling.detection_outputs import detections_to_host
from utils.training.optimizer_step import OptimizerStep

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


def _warmup_scheduler(optimizer, epoch: int, warmup_iters: int, n_batches: Optional[int], warmup_factor: float):
    """Epoch 0's per-iteration linear warm-up over ``min(warmup_iters, n_batches - 1)`` steps, else None."""
    if epoch != 0 or warmup_iters <= 0:
        return None
    iters = min(warmup_iters, n_batches - 1) if n_batches else warmup_iters
    if iters <= 0:
        return None
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=warmup_factor, total_iters=iters)


class _StepGuard:
    """Finds the skipped steps without a host sync per step, logs them as before, raises on `limit` in a row.

    Each step leaves its loss values and an on-device "step taken" flag here; they
    are read back together (one sync) every `check_every` steps, at the latest when
    the pending steps could complete `limit` in a row, and at the end of the epoch.
    The losses of the steps taken are summed on the device for the epoch's averages.
    """

    def __init__(self, header: str, limit: int, optimizer: torch.optim.Optimizer, device: torch.device,
                 check_every: int):
        self.header, self.limit, self.optimizer = header, limit, optimizer
        self.check_every = max(1, check_every)
        self.total = 0
        self.in_a_row = 0
        self.pending: List[Tuple[List[Any], torch.Tensor, torch.Tensor]] = []
        self.sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=device)
        self.taken = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, targets, values: torch.Tensor, taken: torch.Tensor) -> None:
        """`values`: the step's LOSS_KEYS values; `taken`: bool tensor, False when the step was skipped."""
        self.sums += torch.where(taken, values.double(), 0.0)
        self.taken += taken
        self.pending.append(([t.get('image_id') for t in targets], values, taken))
        due = len(self.pending) >= self.check_every
        if due or (self.limit and self.in_a_row + len(self.pending) >= self.limit):
            self.check()

    def means(self) -> Dict[str, float]:
        """The epoch's average of each loss over the steps taken so far (NaN when none was); syncs."""
        *sums, taken = torch.cat([self.sums, self.taken[None].double()]).tolist()
        return {key: (value / taken if taken else float('nan')) for key, value in zip(LOSS_KEYS, sums)}

    def check(self) -> None:
        """Read the pending flags back (one sync): log each skipped step, raise on `limit` in a row."""
        if not self.pending:
            return
        flags = torch.stack([taken for _, _, taken in self.pending]).tolist()
        values = torch.stack([v for _, v, _ in self.pending]).tolist() if not all(flags) else None
        pending, self.pending = self.pending, []
        for step, ((ids, _, _), taken) in enumerate(zip(pending, flags)):
            if taken:
                self.in_a_row = 0
                continue
            loss = values[step]
            if math.isfinite(loss[0]):
                problem = 'non-finite gradient norm'
            else:
                parts = {key: round(value, 4) for key, value in zip(LOSS_KEYS[1:], loss[1:])}
                problem = f'non-finite loss {loss[0]} ({parts})'
            self.skip(problem, ids)

    def skip(self, problem: str, ids) -> None:
        self.total += 1
        self.in_a_row += 1
        logger.warning('%s: %s on image_id(s) %s: skipping this step (%d in a row)',
                       self.header, problem, ids, self.in_a_row)
        if self.limit and self.in_a_row >= self.limit:
            lr = self.optimizer.param_groups[0]['lr']
            raise NonFiniteLossError(
                f'training stopped: the loss (or its gradient) was NaN/inf in {self.in_a_row} steps in a row. '
                f'Try a lower learning_rate (now {lr:g}), a longer warmup_iters or a smaller max_grad_norm, '
                f'and check the annotations for broken boxes (zero or negative size, outside the image, '
                f'NaN coordinates); with amp on, try amp=false')


def _train_step(model, optimizer, params, step: OptimizerStep, images, targets, device, scaler,
                max_grad_norm: float):
    """Forward, backward and (unless a loss or the gradient is non-finite) the optimizer step.

    `params`: the optimizer's parameters; `step`: its `OptimizerStep`, both made once per epoch.
    Returns ``(values, taken)``: the LOSS_KEYS values and a bool tensor, both on the device, read
    later (no sync here). With a GradScaler, or an optimizer that skips on an on-device flag
    (fused SGD), nothing waits for the GPU; a plain optimizer in fp32 needs one sync to decide
    whether to step.
    """
    images, targets = _to_device(images, targets, device)
    with torch.autocast(device_type=device.type, enabled=scaler is not None):
        loss_dict = model(images, targets)
        losses = sum(loss for loss in loss_dict.values())
    values = torch.stack([losses.detach()] + [loss_dict[key].detach() for key in LOSS_KEYS[1:]]).float()
    finite_loss = torch.isfinite(values).all()
    optimizer.zero_grad(set_to_none=True)
    clip = bool(max_grad_norm and max_grad_norm > 0)
    if scaler is not None:  # the scaler skips non-finite gradients itself (an overflow is not our concern)
        scaler.scale(losses).backward()
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        return values, finite_loss
    losses.backward()
    if clip:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, error_if_nonfinite=False)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    taken = finite_loss & torch.isfinite(norm)
    step(taken)
    return values, taken


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
    - `log_interval`: the losses are read back from the device (a host sync)
      every this many batches, for the skipped-step warnings and the progress.
    - `progress`: a bar on a terminal, else a log line every 10% of the epoch or 30 s.

    Returns ``{'loss', 'loss_classifier', 'loss_box_reg', 'loss_objectness',
    'loss_rpn_box_reg', 'lr'}``; losses are averages over the steps taken (NaN
    when none was).
    """
    model.train()
    epoch_label = f'{epoch + 1}/{total_epochs}' if total_epochs else f'{epoch + 1}'
    header = f'Epoch: [{epoch_label}]'
    bar = Progress(data_loader, desc=f'epoch {epoch_label}', unit='batch', log=logger, enabled=progress)
    warmup = _warmup_scheduler(optimizer, epoch, warmup_iters, bar.total, warmup_factor)
    guard = _StepGuard(header, max_nonfinite, optimizer, device, check_every=log_interval)
    params = [p for group in optimizer.param_groups for p in group['params']]
    optimizer_step = OptimizerStep(optimizer)
    for step, (images, targets) in enumerate(bar, 1):
        if len(images) == 0:
            logger.warning('%s: skipping a batch in which no image could be read', header)
            step_scheduler(warmup)
            continue
        values, taken = _train_step(model, optimizer, params, optimizer_step, images, targets, device, scaler,
                                    max_grad_norm)
        guard.record(targets, values, taken)
        step_scheduler(warmup)
        if progress and log_interval > 0 and step % log_interval == 0:
            bar.set_postfix(loss=f"{guard.means()['loss']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    guard.check()
    if guard.total:
        logger.warning('%s: %d step(s) skipped because of non-finite values', header, guard.total)
    result = guard.means()
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
@frozen_heap()  # COCO evaluation makes Python objects by the million: the collector walks those only
def evaluate(model: torch.nn.Module, data_loader: Optional[Iterable], device: torch.device,
             progress: bool = True, backend: Optional[str] = None) -> Evaluation:
    """COCO bbox evaluation: an `Evaluation`, a mapping ``{'mAP', 'mAP_50', 'mAP_75', 'AR_100'}``
    (stats[0], [1], [2], [8]) that also carries what per-class AP and PR curves need.

    The model's roi_heads use COCO's protocol settings (score_thresh 0.05,
    nms_thresh 0.5, detections_per_img 100) for the duration and get their
    own values back afterwards, as does the model's train/eval mode. An empty
    (or missing) validation set, or no detections at all, gives 0.0 for all.
    `backend`: the COCO implementation (see `utils.evaluation.coco_eval`); None picks the fastest installed.
    """
    if data_loader is None or len(data_loader.dataset) == 0:
        logger.warning('no validation images: evaluation metrics are 0.0')
        return Evaluation()

    start = time.time()
    evaluator = CocoEvaluator(get_coco_api_from_dataset(data_loader.dataset), ['bbox'], backend=backend)
    model_time = 0.0
    bar = Progress(data_loader, desc='evaluate', unit='batch', log=logger, enabled=progress)
    with _coco_protocol(model), contextlib.closing(bar):
        for images, targets in bar:
            if len(images) == 0:
                continue
            images = [image.to(device, non_blocking=device.type == 'cuda') for image in images]
            if device.type == 'cuda':
                torch.cuda.synchronize()
            tic = time.time()
            outputs = [{'boxes': t[:, :4], 'scores': t[:, 4], 'labels': t[:, 5].long()}
                       for t in detections_to_host(model(images))]
            model_time += time.time() - tic
            evaluator.update({target['image_id']: output for target, output in zip(targets, outputs)})

    tic = time.time()
    evaluator.accumulate()
    evaluator.summarize()
    coco_time = time.time() - tic
    n_images = len(evaluator.img_ids)  # one entry per image evaluated
    evaluation = Evaluation.of(evaluator, n_images)
    logger.info('evaluated %d image(s) in %.1fs (model %.1fs, COCO %.2fs): %s', n_images, time.time() - start,
                model_time, coco_time, ' '.join(f'{key} {value:.4f}' for key, value in evaluation.items()))
    return evaluation
