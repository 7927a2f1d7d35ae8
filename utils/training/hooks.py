"""What happens around the epochs, as hooks (detectron2's `HookBase` / `build_hooks`): the trainer's loop
only trains and evaluates; publishing the metrics, writing the checkpoints and the curves, uploading and
reporting progress are hooks, assembled in one ordered list by `build_hooks`.

The loop calls, for every hook in list order:

- ``before_epoch(run, epoch)``: before an epoch trains (a failed background write stops the run here).
- ``after_epoch(run, record)``: once the epoch's history row is in `run` (`run.add`).
- ``after_checkpoint(epoch, epochs)``: on the checkpoint writer's thread, once the checkpoints due at
  that epoch (none between intervals) are whole on disk; once per epoch, in order, never overlapping.
  It must not read the model (the next epoch trains meanwhile); an exception stops the run at the next
  epoch boundary.
- ``after_train(run)``: the loop ended normally; ``on_failure(run)``: an exception is on its way (save
  what can be saved, raise nothing).

``checkpoint_every_s``: the longest a hook lets the checkpoints go unwritten (an upload needs files
written since its last round); the checkpoints come at the smallest of these and `checkpoint_interval_s`.
"""
import logging
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from utils.core.metric_names import EVAL_KEYS, LOSS_KEYS
from utils.modeling.checkpoints import make_checkpoint
from utils.training.checkpoint_writer import CheckpointWriter
from utils.training.curves import CurvesWriter
from utils.training.run_folder import RunFolder

logger = logging.getLogger(__name__)


def epoch_metrics(record: Mapping[str, Any]) -> Dict[str, float]:
    """What an epoch publishes and best.pth records: the loss components, lr and the validation scores."""
    return {key: record[key] for key in LOSS_KEYS + ('lr',) + EVAL_KEYS}


class HookBase:
    checkpoint_every_s = math.inf

    def before_epoch(self, run, epoch: int) -> None:
        pass

    def after_epoch(self, run, record: Mapping[str, Any]) -> None:
        pass

    def after_checkpoint(self, epoch: int, epochs: int) -> None:
        pass

    def after_train(self, run) -> None:
        pass

    def on_failure(self, run) -> None:
        pass


class MetricsHook(HookBase):
    """``publish(epoch, metrics)`` once per epoch; an exception from it is logged and training goes on."""

    def __init__(self, publish: Callable[[int, Dict[str, float]], None]):
        self._publish = publish

    def after_epoch(self, run, record) -> None:
        try:
            self._publish(record['epoch'], epoch_metrics(record))
        except Exception as err:  # the platform's metrics are nice to have, the run is not at stake
            logger.warning('could not publish the metrics of epoch %d: %s: %s', record['epoch'] + 1,
                           type(err).__name__, err, exc_info=logger.isEnabledFor(logging.DEBUG))


class ProgressHook(HookBase):
    """``on_epoch_end(epoch, epochs)`` once that epoch's checkpoints are on disk (the platform's progress bar)."""

    def __init__(self, on_epoch_end: Callable[[int, int], None]):
        self._on_epoch_end = on_epoch_end

    def after_checkpoint(self, epoch: int, epochs: int) -> None:
        self._on_epoch_end(epoch, epochs)


class CurvesHook(HookBase):
    """curves.csv every epoch, curves.png by interval and at the end, drawn whatever way the run ends."""

    def __init__(self, folder: RunFolder):
        self._curves = CurvesWriter(folder.path)

    def after_epoch(self, run, record) -> None:
        finished = run.stopped_early or record['epoch'] + 1 >= run.epochs
        self._curves.write(run.history, draw=finished)  # drawn while the writer's thread writes the checkpoints

    def after_train(self, run) -> None:
        self._curves.draw(run.history)

    on_failure = after_train


class CheckpointHook(HookBase):
    """best.pth and last.pth through the background `CheckpointWriter`, every `interval_s` and at the end;
    then every hook's ``after_checkpoint`` (`hooks`, filled by `build_hooks`), on the writer's thread."""

    def __init__(self, folder: RunFolder, interval_s: float, epochs: int):
        self._folder, self._epochs = folder, epochs
        self.hooks: Sequence[HookBase] = ()
        self._writer = CheckpointWriter(self._written, interval_s=interval_s)
        self._best: Optional[Tuple[int, Dict[str, float]]] = None  # a best epoch not yet in best.pth

    def _written(self, epoch: int) -> None:
        for hook in self.hooks:
            hook.after_checkpoint(epoch, self._epochs)

    def before_epoch(self, run, epoch) -> None:
        self._writer.check()  # a failed write (or after_checkpoint) of the previous epoch stops the run here

    def after_epoch(self, run, record) -> None:
        epoch = record['epoch']
        if run.best_epoch == epoch:
            self._best = (epoch, epoch_metrics(record))
        finished = run.stopped_early or epoch + 1 >= run.epochs
        if self._writer.epoch_end(epoch, self._files(run, epoch, finished), final=finished,
                                  snapshots=run.best_weights.values() if self._best else ()):
            self._best = None

    def after_train(self, run) -> None:
        self._writer.wait()  # the final checkpoints are on disk (and after_checkpoint saw them)

    def on_failure(self, run) -> None:
        self._writer.close_quietly()  # the last good checkpoints, and those kept since, land before the error

    def _files(self, run, epoch: int, finished: bool) -> List[Tuple[str, Dict[str, Any]]]:
        """[(best.pth, the best epoch's weights (`run.best_weights`) + metrics) when a best epoch came since
        the last write, (last.pth, everything to resume)], holding the live tensors: the writer snapshots
        them (best.pth first: last.pth names it as the best)."""
        files = []
        if self._best is not None:
            best_epoch, metrics = self._best
            files.append((self._folder.best_path, make_checkpoint(
                run.model, **run.checkpoint_info, state_dict=run.best_weights, epoch=best_epoch,
                metrics=dict(metrics))))
        files.append((self._folder.last_path, make_checkpoint(
            run.model, **run.checkpoint_info, state_dict=run.model.state_dict(),
            optimizer=run.optimizer.state_dict(), lr_scheduler=run.lr_scheduler.state_dict(),
            scaler=run.scaler.state_dict() if run.scaler is not None else None,
            epoch=epoch, epochs=run.epochs, best_score=run.best_score, best_epoch=run.best_epoch,
            history=list(run.history), stopped_early=run.stopped_early, finished=finished,
            rng={'torch': torch.get_rng_state(), 'loader': run.generator.get_state()})))
        return files


def build_hooks(folder: RunFolder, settings: Mapping[str, Any], epochs: int,
                on_epoch_end: Optional[Callable[[int, int], None]] = None,
                publish_metrics: Optional[Callable[[int, Dict[str, float]], None]] = None,
                extra: Sequence[HookBase] = ()) -> List[HookBase]:
    """The run's hooks, in the order they act: metrics, checkpoints, curves, the caller's `extra` (an upload
    after each write), then progress (the platform's bar moves once the epoch's files are safe)."""
    interval = min([settings['checkpoint_interval_s']] + [hook.checkpoint_every_s for hook in extra])
    checkpoints = CheckpointHook(folder, interval, epochs)
    hooks: List[HookBase] = [MetricsHook(publish_metrics)] if publish_metrics is not None else []
    hooks += [checkpoints, CurvesHook(folder), *extra]
    if on_epoch_end is not None:
        hooks.append(ProgressHook(on_epoch_end))
    checkpoints.hooks = hooks
    return hooks
