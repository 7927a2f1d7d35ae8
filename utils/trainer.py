"""The training loop: epochs of `engine.train_one_epoch` + `engine.evaluate`, checkpoints, resume.

`fit(...)` trains a torchvision Faster R-CNN on reader records and leaves in
``output_path``::

    weights/last.pth   every epoch: weights + optimizer, lr scheduler, GradScaler and
                       RNG state, epoch, best score, history (everything to resume)
    weights/best.pth   whenever validation mAP@[.5:.95] improves: weights + epoch, metrics
    curves.csv/.png    the history so far

Epoch numbers in the history, the checkpoints, `FitResult.best_epoch`,
``publish_metrics`` and ``on_epoch_end`` are 0-based indices; log lines count
from 1 ("epoch 3/10"). When ``weights/last.pth`` exists (or `resume_path` is
given) training continues after its epoch with the same state; a finished run
is not trained again. With no validation records, every epoch counts as the
best so far (best.pth = the latest weights) and early stopping is off. At the
end, the model holds the best epoch's weights.
"""
import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from utils import engine
from utils.config import DEFAULTS
from utils.curves import write_curves
from utils.detection_dataset import DetectionDataset
from utils.images import network_limits
from utils.model_factory import (check_compatible, load_checkpoint, make_checkpoint, num_classes_for,
                                 save_checkpoint)
from utils.transforms import get_transform
from utils.utils import collate_fn, make_generator, seed_everything, seed_worker

logger = logging.getLogger(__name__)

WEIGHTS_DIR = 'weights'
LAST_NAME = 'last.pth'
BEST_NAME = 'best.pth'


@dataclasses.dataclass
class FitResult:
    best_score: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: List[dict]


def lr_milestones(lr_steps: Sequence[float], epochs: int) -> List[int]:
    """Epoch milestones from `lr_steps`: values < 1 are fractions of `epochs`, others epoch numbers."""
    milestones = set()
    for step in lr_steps:
        milestone = int(round(step * epochs)) if step < 1 else int(step)
        milestones.add(max(1, milestone))
    return sorted(milestones)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, settings: Mapping[str, Any]):
    """The per-epoch scheduler: MultiStepLR over `lr_steps` or CosineAnnealingLR over the epochs."""
    name = settings['lr_scheduler']
    if name == 'multistep':
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=lr_milestones(settings['lr_steps'], settings['epochs']), gamma=settings['lr_gamma'])
    if name == 'cosine':
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings['epochs'])
    raise ValueError(f"unknown lr_scheduler {name!r}: use 'multistep' or 'cosine'")


def _loader(dataset, settings, device, shuffle: bool, generator: Optional[torch.Generator]):
    workers = int(settings['num_workers'])
    return torch.utils.data.DataLoader(
        dataset, batch_size=int(settings['batch_size']), shuffle=shuffle, num_workers=workers,
        collate_fn=collate_fn, pin_memory=device.type == 'cuda', generator=generator,
        worker_init_fn=seed_worker if workers > 0 else None, persistent_workers=workers > 0)


def _float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _result_from(checkpoint: Mapping[str, Any]) -> FitResult:
    history = list(checkpoint.get('history') or [])
    return FitResult(best_score=float(checkpoint['best_score']), best_epoch=int(checkpoint['best_epoch']),
                     epochs_run=len(history), stopped_early=bool(checkpoint.get('stopped_early', False)),
                     history=history)


def _summary_line(record: Mapping[str, Any], epochs: int, best_score: float, best_epoch: int) -> str:
    return (f"epoch {record['epoch'] + 1}/{epochs}: loss {record['loss']:.4f} "
            f"(cls {record['loss_classifier']:.4f}, box {record['loss_box_reg']:.4f}, "
            f"obj {record['loss_objectness']:.4f}, rpn_box {record['loss_rpn_box_reg']:.4f}) "
            f"lr {record['lr']:.3g} | val mAP {record['mAP']:.4f} mAP_50 {record['mAP_50']:.4f} "
            f"mAP_75 {record['mAP_75']:.4f} AR_100 {record['AR_100']:.4f} | "
            f"train {record['train_time']:.1f}s ({record['images_per_s']:.2f} img/s), "
            f"eval {record['eval_time']:.1f}s | best mAP {best_score:.4f} at epoch {best_epoch + 1}")


def fit(model: torch.nn.Module, train_records: Sequence[Mapping[str, Any]], val_records: Sequence[Mapping[str, Any]],
        label_to_id: Dict[str, int], output_path: str, settings: dict, device: torch.device,
        checkpoint_info: dict,
        on_epoch_end: Optional[Callable[[int, int], None]] = None,
        publish_metrics: Optional[Callable[[int, Dict[str, float]], None]] = None,
        resume_path: Optional[str] = None) -> FitResult:
    """Train `model` for ``settings['epochs']`` epochs (or until early stopping); see the module doc.

    - `settings`: the resolved configuration (`utils.config.resolve`); missing keys take defaults.
    - `checkpoint_info`: `make_checkpoint` kwargs: variant, id_to_label_map, min_size, max_size.
    - `on_epoch_end(epoch, epochs)`: called last in each epoch, after the checkpoints are
      written; an exception from it stops training (and `fit` can resume later).
    - `publish_metrics(epoch, metrics)`: once per epoch with the loss components, lr,
      mAP, mAP_50, mAP_75 and AR_100; an exception from it is logged and training goes on.
    """
    settings = {**DEFAULTS, **(settings or {})}
    device = torch.device(device)
    epochs = int(settings['epochs'])
    patience = int(settings['early_stopping_patience'])
    weights_dir = os.path.join(output_path, WEIGHTS_DIR)
    last_path = os.path.join(weights_dir, LAST_NAME)
    best_path = os.path.join(weights_dir, BEST_NAME)
    os.makedirs(weights_dir, exist_ok=True)

    if not train_records:
        raise ValueError('no training images: the train subset is empty (check the dataset filters '
                         'and that the items have box/polygon/mask annotations with known labels)')
    has_val = bool(val_records)
    if not has_val:
        logger.warning('no validation images: mAP is reported as 0.0, best.pth follows the latest epoch'
                       + (' and early stopping is off' if patience else ''))

    seed_everything(int(settings['seed']))
    limits = network_limits(model, settings['max_image_pixels'])
    train_set = DetectionDataset(train_records, label_to_id, get_transform(True, settings), limits)
    val_set = DetectionDataset(val_records or [], label_to_id, get_transform(False, settings), limits)
    generator = make_generator(int(settings['seed']))
    train_loader = _loader(train_set, settings, device, shuffle=True, generator=generator)
    val_loader = _loader(val_set, settings, device, shuffle=False, generator=None) if has_val else None

    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings['learning_rate'], momentum=settings['momentum'],
                                weight_decay=settings['weight_decay'])
    lr_scheduler = build_lr_scheduler(optimizer, settings)
    scaler = torch.amp.GradScaler('cuda') if settings['amp'] and device.type == 'cuda' else None

    history: List[Dict[str, Any]] = []
    best_score, best_epoch, start_epoch = -math.inf, -1, 0
    source = resume_path or (last_path if os.path.exists(last_path) else None)
    if source:
        checkpoint = load_checkpoint(source)
        num_classes = num_classes_for(checkpoint_info['id_to_label_map'])
        check_compatible(checkpoint, source, checkpoint_info['variant'], num_classes)
        saved_map = {int(k): str(v) for k, v in (checkpoint.get('id_to_label_map') or {}).items()}
        wanted_map = {int(k): str(v) for k, v in checkpoint_info['id_to_label_map'].items()}
        if saved_map != wanted_map:
            raise ValueError(f'cannot resume from {source!r}: it was trained with labels {saved_map}, '
                             f'this model has {wanted_map}; use a new output_path to start over')
        if 'optimizer' not in checkpoint:
            raise ValueError(f'cannot resume from {source!r}: it holds weights only (no optimizer state); '
                             f'resume from a weights/{LAST_NAME}')
        if checkpoint.get('stopped_early') or int(checkpoint['epoch']) + 1 >= epochs:
            result = _result_from(checkpoint)
            logger.info('%s: training already finished (%d epoch(s)%s, best mAP %.4f at epoch %d): nothing to do',
                        source, result.epochs_run, ', stopped early' if result.stopped_early else '',
                        result.best_score, result.best_epoch + 1)
            _load_best(model, best_path, result.best_epoch, int(checkpoint['epoch']), checkpoint)
            return result
        model.load_state_dict(checkpoint['state_dict'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
        if scaler is not None and checkpoint.get('scaler'):
            scaler.load_state_dict(checkpoint['scaler'])
        rng = checkpoint.get('rng') or {}
        if 'torch' in rng:
            torch.set_rng_state(rng['torch'])
        if 'loader' in rng:
            generator.set_state(rng['loader'])
        history = list(checkpoint.get('history') or [])
        best_score, best_epoch = float(checkpoint['best_score']), int(checkpoint['best_epoch'])
        start_epoch = int(checkpoint['epoch']) + 1
        if int(checkpoint.get('epochs', epochs)) != epochs:
            logger.warning('resuming a run planned for %s epochs with epochs=%d: the learning rate schedule '
                           'keeps its saved milestones', checkpoint.get('epochs'), epochs)
        logger.info('resumed from %s: continuing at epoch %d/%d (best mAP so far %.4f at epoch %d)',
                    source, start_epoch + 1, epochs, best_score, best_epoch + 1)

    stale = _epochs_since_best(history, best_epoch)
    stopped_early = False
    logger.info('training %s for %d epoch(s) on %s: %d train / %d validation image(s), batch %d, %d batch(es)/epoch',
                checkpoint_info.get('variant'), epochs, device, len(train_set), len(val_set),
                settings['batch_size'], len(train_loader))
    last_epoch = start_epoch - 1
    for epoch in range(start_epoch, epochs):
        tic = time.time()
        losses = engine.train_one_epoch(model, optimizer, train_loader, device, epoch, scaler=scaler,
                                        warmup_iters=int(settings['warmup_iters']),
                                        max_grad_norm=float(settings['max_grad_norm']), total_epochs=epochs)
        train_time = time.time() - tic
        lr_used = float(losses.pop('lr'))
        engine.step_scheduler(lr_scheduler)  # (quiet if every step of the epoch was skipped)

        tic = time.time()
        if has_val:
            scores = engine.evaluate(model, val_loader, device)
        else:
            scores = {key: 0.0 for key in engine.EVAL_KEYS}
        eval_time = time.time() - tic

        record: Dict[str, Any] = {'epoch': epoch}
        record.update({key: _float(losses[key]) for key in engine.LOSS_KEYS})
        record['lr'] = lr_used
        record.update({key: _float(scores[key]) for key in engine.EVAL_KEYS})
        record.update(train_time=train_time, eval_time=eval_time,
                      images_per_s=len(train_set) / train_time if train_time > 0 else 0.0)
        history.append(record)

        score = record['mAP']
        improved = (not has_val) or score > best_score
        if improved:
            best_score, best_epoch, stale = score, epoch, 0
        else:
            stale += 1

        metrics = {key: record[key] for key in engine.LOSS_KEYS + ('lr',) + engine.EVAL_KEYS}
        if publish_metrics is not None:
            try:
                publish_metrics(epoch, dict(metrics))
            except Exception as err:  # the platform's metrics are nice to have, the run is not at stake
                logger.warning('could not publish the metrics of epoch %d: %s: %s', epoch + 1,
                               type(err).__name__, err, exc_info=logger.isEnabledFor(logging.DEBUG))
        try:
            write_curves(history, output_path)
        except Exception as err:
            logger.warning('could not write the training curves: %s: %s', type(err).__name__, err)

        if improved:
            save_checkpoint(make_checkpoint(model, **checkpoint_info, epoch=epoch, metrics=metrics), best_path)
        if has_val and patience and stale >= patience:
            stopped_early = True
        save_checkpoint(make_checkpoint(
            model, **checkpoint_info,
            optimizer=optimizer.state_dict(), lr_scheduler=lr_scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            epoch=epoch, epochs=epochs, best_score=best_score, best_epoch=best_epoch, history=history,
            stopped_early=stopped_early,
            rng={'torch': torch.get_rng_state(), 'loader': generator.get_state()}), last_path)
        last_epoch = epoch
        logger.info(_summary_line(record, epochs, best_score, best_epoch))
        if on_epoch_end is not None:
            on_epoch_end(epoch, epochs)
        if stopped_early:
            logger.info('early stopping: validation mAP has not improved for %d epoch(s) (patience %d); '
                        'stopping after epoch %d/%d, best mAP %.4f at epoch %d',
                        stale, patience, epoch + 1, epochs, best_score, best_epoch + 1)
            break

    _load_best(model, best_path, best_epoch, last_epoch, None)
    logger.info('training done: %d epoch(s)%s, best mAP %.4f at epoch %d; weights in %s',
                len(history), ' (stopped early)' if stopped_early else '', best_score, best_epoch + 1, weights_dir)
    return FitResult(best_score=best_score, best_epoch=best_epoch, epochs_run=len(history),
                     stopped_early=stopped_early, history=history)


def _epochs_since_best(history: Sequence[Mapping[str, Any]], best_epoch: int) -> int:
    if not history:
        return 0
    return max(0, int(history[-1]['epoch']) - best_epoch)


def _load_best(model: torch.nn.Module, best_path: str, best_epoch: int, last_epoch: int,
               last_checkpoint: Optional[Mapping[str, Any]]) -> None:
    """Leave the best epoch's weights in `model` (the last ones when best.pth is missing)."""
    if best_epoch != last_epoch and os.path.exists(best_path):
        model.load_state_dict(load_checkpoint(best_path)['state_dict'])
        logger.info('the model now holds the weights of the best epoch (%d) from %s', best_epoch + 1, best_path)
    elif last_checkpoint is not None:
        model.load_state_dict(last_checkpoint['state_dict'])
