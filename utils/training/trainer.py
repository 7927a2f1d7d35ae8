"""The training loop: epochs of `engine.train_one_epoch` + `engine.evaluate`, checkpoints, resume.

`fit(...)` trains a torchvision Faster R-CNN on reader records and leaves in
``output_path``::

    weights/last.pth   at the first epoch end `checkpoint_interval_s` after the last write
                       (0: every epoch) and after the final epoch (or early stop): weights +
                       optimizer, lr scheduler, GradScaler and RNG state, epoch, best score,
                       history (everything to resume); the final one says ``finished``
    weights/best.pth   with last.pth when validation mAP@[.5:.95] improved since the last
                       write: the best epoch's exact weights (kept in memory meanwhile) +
                       epoch, metrics
    curves.csv         the history so far, every epoch
    curves.png         the same drawn, at most every `curves.PNG_INTERVAL_S` and at the end

Epoch numbers in the history, the checkpoints, `FitResult.best_epoch`,
``publish_metrics`` and ``on_epoch_end`` are 0-based indices; log lines count
from 1 ("epoch 3/10"). When ``weights/last.pth`` exists (or `resume_path` is
given) training continues after its epoch with the same state; a finished run
is not trained again (only a last.pth that says so is a finished run: a
best.pth alone is not). The checkpoints are written on a background thread
(`utils.training.checkpoint_writer`) from a CPU snapshot taken at the end of the epoch, so
the next epoch trains meanwhile; by interval, because on a small dataset a GPU
epoch takes less than a resnet50's 320 MB last.pth does to snapshot and write
(a crash loses at most that interval of training). The loop only trains and evaluates: metrics,
checkpoints, curves, uploads and progress are hooks (`utils.training.hooks`), and the folder's states
(resumable, finished) belong to `utils.training.run_folder.RunFolder`. With no validation records, every
epoch counts as the best so far (best.pth = the latest weights) and early stopping is off. At the
end, the model holds the best epoch's weights.
"""
import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from utils.training import engine
from utils.training.hooks import HookBase, build_hooks
from utils.training.run_folder import RunFolder
from utils.modeling.checkpoints import check_compatible, device_copy, load_checkpoint
from utils.core.config import for_training
from utils.training.batch_bound import bounded_batch_size
from utils.data.data_loading import collate_fn, make_generator, seed_everything, seed_worker
from utils.data.detection_dataset import DetectionDataset
from utils.core.errors import InputError
from utils.core.frozen_heap import frozen_heap
from utils.data.group_by_aspect_ratio import GroupedBatchSampler, build_grouped_batch_sampler
from utils.data.images import network_limits
from utils.core.label_map import parse_id_to_label
from utils.core.metric_names import EVAL_KEYS, LOSS_KEYS
from utils.core.output_layout import LAST_NAME
from utils.modeling.model_factory import cudnn_autotune, num_classes_for
from utils.data.transforms import get_transform

logger = logging.getLogger(__name__)

# A validation set whose decoded images fit in this many bytes (float32) is decoded once and kept in
# memory: a small set's evaluation otherwise spends as long waking loader workers as evaluating.
VALIDATION_CACHE_BYTES = 256 * 2 ** 20


@dataclasses.dataclass
class FitResult:
    best_score: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: List[dict]

    @property
    def best_record(self) -> Dict[str, Any]:
        """The history row of the best epoch ({} when there is none)."""
        return next((row for row in self.history if row.get('epoch') == self.best_epoch), {})


@dataclasses.dataclass
class _Run:
    """The state of one run: what the epochs update and what weights/last.pth holds to resume it."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    generator: torch.Generator
    checkpoint_info: Dict[str, Any]
    epochs: int
    patience: int
    has_val: bool
    history: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    last_epoch: int = -1  # the last finished epoch
    best_score: float = -math.inf
    best_epoch: int = -1
    stopped_early: bool = False
    best_weights: Optional[Dict[str, torch.Tensor]] = None  # a device copy of this run's best epoch, if any

    @property
    def stale(self) -> int:
        """Epochs since the best one (what early stopping counts)."""
        return max(0, self.last_epoch - self.best_epoch)

    def add(self, record: Dict[str, Any]) -> bool:
        """Append an epoch's record; True when it is the best so far (every epoch, without validation): its
        weights are then kept as a device copy (what best.pth and the end of the run take)."""
        self.history.append(record)
        self.last_epoch = record['epoch']
        improved = (not self.has_val) or record['mAP'] > self.best_score
        if improved:
            self.best_score, self.best_epoch = record['mAP'], record['epoch']
            self.best_weights = device_copy(self.model.state_dict())
        self.stopped_early = bool(self.has_val and self.patience and self.stale >= self.patience)
        return improved

    def result(self) -> FitResult:
        return FitResult(best_score=self.best_score, best_epoch=self.best_epoch, epochs_run=len(self.history),
                         stopped_early=self.stopped_early, history=self.history)


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


def _loader(dataset, settings, device, generator: Optional[torch.Generator], batch_sampler=None):
    """A DataLoader over `dataset`: batches from `batch_sampler` when given, else in order."""
    workers = settings.num_workers
    batching = dict(batch_sampler=batch_sampler) if batch_sampler is not None else \
        dict(batch_size=settings.batch_size, shuffle=False)
    return torch.utils.data.DataLoader(
        dataset, num_workers=workers, collate_fn=collate_fn, pin_memory=device.type == 'cuda', generator=generator,
        worker_init_fn=seed_worker if workers > 0 else None, persistent_workers=workers > 0, **batching)


def _grouped_batches(records: Sequence[Mapping[str, Any]], settings) -> GroupedBatchSampler:
    """Training batches drawn from one aspect-ratio group each (sizes from the records: no decoding),
    in an order that depends on (seed, epoch) only: `set_epoch` before each epoch, and a resumed
    run replays the order the uninterrupted one would have seen."""
    sizes = [(int(record['height']), int(record['width'])) for record in records]
    return build_grouped_batch_sampler(sizes, settings.batch_size, seed=settings.seed)


def _summary_line(record: Mapping[str, Any], epochs: int, best_score: float, best_epoch: int) -> str:
    return (f"epoch {record['epoch'] + 1}/{epochs}: loss {record['loss']:.4f} "
            f"(cls {record['loss_classifier']:.4f}, box {record['loss_box_reg']:.4f}, "
            f"obj {record['loss_objectness']:.4f}, rpn_box {record['loss_rpn_box_reg']:.4f}) "
            f"lr {record['lr']:.3g} | val mAP {record['mAP']:.4f} mAP_50 {record['mAP_50']:.4f} "
            f"mAP_75 {record['mAP_75']:.4f} AR_100 {record['AR_100']:.4f} | "
            f"train {record['train_time']:.1f}s ({record['images_per_s']:.2f} img/s), "
            f"eval {record['eval_time']:.1f}s | best mAP {best_score:.4f} at epoch {best_epoch + 1}")


def fit(model: torch.nn.Module, train_records: Sequence[Mapping[str, Any]], val_records: Sequence[Mapping[str, Any]],
        label_to_id: Dict[str, int], output_path: str, settings: Mapping[str, Any], device: torch.device,
        checkpoint_info: dict,
        on_epoch_end: Optional[Callable[[int, int], None]] = None,
        publish_metrics: Optional[Callable[[int, Dict[str, float]], None]] = None,
        resume_path: Optional[str] = None, hooks: Sequence[HookBase] = ()) -> FitResult:
    """Train `model` for ``settings['epochs']`` epochs (or until early stopping); see the module doc.

    - `settings`: the `Settings` (`utils.core.config.resolve`); a dict of some keys is resolved over the defaults.
    - `checkpoint_info`: `make_checkpoint` kwargs: variant, id_to_label_map (and optionally
      min_size, max_size; by default the network's own).
    - `on_epoch_end(epoch, epochs)`: called once per epoch, in order, as soon as the checkpoints
      due at that epoch (none between intervals) are complete on disk (`utils.training.hooks.ProgressHook`).
    - `publish_metrics(epoch, metrics)`: once per epoch with the loss components, lr,
      mAP, mAP_50, mAP_75 and AR_100; an exception from it is logged and training goes on.
    - `hooks`: more `HookBase`s (an upload of the checkpoints), placed by `build_hooks`.
    """
    device = torch.device(device)
    input_pixels = max(model.transform.min_size) * model.transform.max_size
    settings = for_training(settings, device, lambda batch_size, key: bounded_batch_size(
        batch_size, len(train_records), device, input_pixels, key))
    folder = RunFolder(output_path)
    folder.prepare()
    limits = network_limits(model, settings['max_image_pixels'])  # the item is skipped, not the run
    train_loader, val_loader, generator = _build_loaders(train_records, val_records, label_to_id, settings, device,
                                                         limits)
    run = _new_run(model, settings, device, generator, checkpoint_info, has_val=val_loader is not None)
    source = folder.resume_source(resume_path)
    if source and _resume(run, source, folder):
        return run.result()  # that run had finished
    logger.info('training %s for %d epoch(s) on %s: %d train / %d validation image(s), batch %d, %d batch(es)/epoch',
                checkpoint_info.get('variant'), run.epochs, device, len(train_records), len(val_records or []),
                settings['batch_size'], len(train_loader))
    hooks = build_hooks(folder, settings, run.epochs, on_epoch_end, publish_metrics, hooks)
    try:
        with frozen_heap():  # the collector walks each step's objects, not the process's heap (utils.core.frozen_heap)
            _run_epochs(run, (train_loader, val_loader), device, settings, hooks)
        for hook in hooks:
            hook.after_train(run)
    except BaseException:
        for hook in hooks:
            hook.on_failure(run)
        raise
    _load_best(model, folder.best_path, run.best_epoch, run.last_epoch, None, run.best_weights)
    logger.info('training done: %d epoch(s)%s, best mAP %.4f at epoch %d; weights in %s', len(run.history),
                ' (stopped early)' if run.stopped_early else '', run.best_score, run.best_epoch + 1,
                folder.weights_dir)
    return run.result()


def _run_epochs(run: _Run, loaders, device, settings, hooks: Sequence[HookBase]) -> None:
    """The epochs left: each trains and evaluates; the hooks do the rest."""
    train_loader, val_loader = loaders
    for epoch in range(run.last_epoch + 1, run.epochs):
        for hook in hooks:
            hook.before_epoch(run, epoch)
        record = _train_and_evaluate(run, train_loader, val_loader, device, epoch, settings)
        run.add(record)  # keeps a copy of the weights of a best epoch
        for hook in hooks:
            hook.after_epoch(run, record)
        logger.info(_summary_line(record, run.epochs, run.best_score, run.best_epoch))
        if run.stopped_early:
            logger.info('early stopping: validation mAP has not improved for %d epoch(s) (patience %d); '
                        'stopping after epoch %d/%d, best mAP %.4f at epoch %d', run.stale, run.patience,
                        epoch + 1, run.epochs, run.best_score, run.best_epoch + 1)
            break


def _build_loaders(train_records, val_records, label_to_id, settings, device, limits):
    """(train loader, validation loader or None, the seeded generator that shuffles the training set)."""
    if not train_records:
        raise InputError('no training images: the train subset is empty (check the dataset filters '
                         'and that the items have box/polygon/mask annotations with known labels)')
    if not val_records:
        logger.warning('no validation images: mAP is reported as 0.0, best.pth follows the latest epoch'
                       + (' and early stopping is off' if settings.early_stopping_patience else ''))
    seed_everything(settings.seed)
    train_set = DetectionDataset(train_records, label_to_id, get_transform(True, settings), limits)
    generator = make_generator(settings.seed)
    train_loader = _loader(train_set, settings, device, generator, _grouped_batches(train_records, settings))
    val_loader = None
    if val_records:
        val_set = DetectionDataset(val_records, label_to_id, get_transform(False, settings), limits)
        if sum(int(r['width']) * int(r['height']) for r in val_records) * 3 * 4 <= VALIDATION_CACHE_BYTES:
            val_set.keep_samples()  # decoded once; then no workers to wake and feed every epoch
            settings = settings.replace(num_workers=0)
        val_loader = _loader(val_set, settings, device, generator=None)
    return train_loader, val_loader, generator


def build_optimizer(model: torch.nn.Module, settings: Mapping[str, Any]) -> torch.optim.SGD:
    """SGD over the trainable parameters, fused: one kernel per step, and a non-finite step is
    skipped on an on-device flag (`engine.train_one_epoch` then needs no host sync per step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=settings['learning_rate'], momentum=settings['momentum'],
                           weight_decay=settings['weight_decay'], fused=True)


def _new_run(model, settings, device, generator, checkpoint_info, has_val: bool) -> _Run:
    """The model on `device` with a fresh SGD optimizer, lr scheduler and (CUDA + amp) GradScaler."""
    model.to(device)
    optimizer = build_optimizer(model, settings)
    scaler = torch.amp.GradScaler('cuda') if settings['amp'] and device.type == 'cuda' else None
    return _Run(model=model, optimizer=optimizer, lr_scheduler=build_lr_scheduler(optimizer, settings),
                scaler=scaler, generator=generator, checkpoint_info=checkpoint_info,
                epochs=settings.epochs, patience=settings.early_stopping_patience, has_val=has_val)


def _resume(run: _Run, source: str, folder: RunFolder) -> bool:
    """Continue the run saved in `source` (a last.pth); True when that run had already finished
    (the model then holds its best weights and `run` its history, and the folder's last.pth says finished)."""
    checkpoint = load_checkpoint(source)
    info = run.checkpoint_info
    check_compatible(checkpoint, source, info['variant'], num_classes_for(info['id_to_label_map']))
    saved_map = parse_id_to_label(checkpoint.get('id_to_label_map'))
    wanted_map = parse_id_to_label(info['id_to_label_map'])
    if saved_map != wanted_map:
        raise InputError(f'cannot resume from {source!r}: it was trained with labels {saved_map}, '
                         f'this model has {wanted_map}; use a new output_path to start over')
    if 'optimizer' not in checkpoint:
        raise InputError(f'cannot resume from {source!r}: it holds weights only (no optimizer state); '
                         f'resume from a weights/{LAST_NAME}')
    run.history = list(checkpoint.get('history') or [])
    run.last_epoch = int(checkpoint['epoch'])
    run.best_score, run.best_epoch = float(checkpoint['best_score']), int(checkpoint['best_epoch'])
    # finished by the plan of this call: a finished run asked for more epochs goes on
    if checkpoint.get('stopped_early') or int(checkpoint['epoch']) + 1 >= run.epochs:
        run.stopped_early = bool(checkpoint.get('stopped_early', False))
        folder.tag_finished(checkpoint, source)
        logger.info('%s: training already finished (%d epoch(s)%s, best mAP %.4f at epoch %d): nothing to do',
                    source, len(run.history), ', stopped early' if run.stopped_early else '',
                    run.best_score, run.best_epoch + 1)
        _load_best(run.model, folder.best_path, run.best_epoch, run.last_epoch, checkpoint)
        return True
    run.model.load_state_dict(checkpoint['state_dict'])
    run.optimizer.load_state_dict(checkpoint['optimizer'])
    run.lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
    if run.scaler is not None and checkpoint.get('scaler'):
        run.scaler.load_state_dict(checkpoint['scaler'])
    rng = checkpoint.get('rng') or {}
    if 'torch' in rng:
        torch.set_rng_state(rng['torch'])
    if 'loader' in rng:
        run.generator.set_state(rng['loader'])
    if int(checkpoint.get('epochs', run.epochs)) != run.epochs:
        logger.warning('resuming a run planned for %s epochs with epochs=%d: the learning rate schedule '
                       'keeps its saved milestones', checkpoint.get('epochs'), run.epochs)
    logger.info('resumed from %s: continuing at epoch %d/%d (best mAP so far %.4f at epoch %d)',
                source, run.last_epoch + 2, run.epochs, run.best_score, run.best_epoch + 1)
    return False


def _train_and_evaluate(run: _Run, train_loader, val_loader, device, epoch: int, settings) -> Dict[str, Any]:
    """One epoch of training, the lr scheduler's step and the validation: the epoch's history record."""
    tic = time.time()
    train_loader.batch_sampler.set_epoch(epoch)
    with cudnn_autotune(device, settings['cudnn_benchmark']):
        losses = engine.train_one_epoch(run.model, run.optimizer, train_loader, device, epoch, scaler=run.scaler,
                                        warmup_iters=settings.warmup_iters,
                                        max_grad_norm=settings.max_grad_norm, total_epochs=run.epochs)
    train_time = time.time() - tic
    lr_used = float(losses.pop('lr'))
    engine.step_scheduler(run.lr_scheduler)  # (quiet if every step of the epoch was skipped)

    tic = time.time()
    scores = engine.evaluate(run.model, val_loader, device) if val_loader is not None else {}
    eval_time = time.time() - tic

    record: Dict[str, Any] = {'epoch': epoch}
    record.update({key: float(losses[key]) for key in LOSS_KEYS})
    record['lr'] = lr_used
    record.update({key: float(scores.get(key, 0.0)) for key in EVAL_KEYS})
    n_train = len(train_loader.dataset)
    record.update(train_time=train_time, eval_time=eval_time,
                  images_per_s=n_train / train_time if train_time > 0 else 0.0)
    return record


def _load_best(model: torch.nn.Module, best_path: str, best_epoch: int, last_epoch: int,
               last_checkpoint: Optional[Mapping[str, Any]],
               best_weights: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Leave the best epoch's weights in `model` (the last ones when best.pth is missing); `best_weights`:
    the copy of them this run kept on the device, which best.pth on disk holds too."""
    if best_epoch != last_epoch and best_weights is not None:
        model.load_state_dict(best_weights)
        logger.info('the model now holds the weights of the best epoch (%d), as in %s', best_epoch + 1, best_path)
    elif best_epoch != last_epoch and os.path.exists(best_path):
        model.load_state_dict(load_checkpoint(best_path)['state_dict'])
        logger.info('the model now holds the weights of the best epoch (%d) from %s', best_epoch + 1, best_path)
    elif last_checkpoint is not None:
        model.load_state_dict(last_checkpoint['state_dict'])
