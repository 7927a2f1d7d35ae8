"""The platform's side of a training run: what the adapter's `train` and `save_to_model` do beyond training.

- Before: a retried run on a fresh pod copies the checkpoints an earlier run uploaded back into its folder
  (`RunFolder.restore_from`).
- During: the trainer's hooks upload the checkpoints by interval (`artifact_sync.CheckpointUploader`),
  publish each epoch's metrics to the model, and stop the run when the platform terminates the execution.
- After: a finished run deletes the resume checkpoint it (or a failed run) uploaded; the final save uploads
  the folder with a deadline and checks that the weights the model needs are among its artifacts.

Off the platform (a model without a project: the local runner, tests) only the termination check is left.
"""
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional

import dtlpy as dl

from utils.core.metric_names import EVAL_KEYS, LEGENDS, LOSS_KEYS
from utils.core.output_layout import LAST_NAME, WEIGHTS_DIR
from utils.platform.artifact_sync import CheckpointUploader
from utils.platform.model_artifacts import ModelArtifacts
from utils.training.hooks import HookBase
from utils.training.run_folder import CHECKPOINT_NAMES, RunFolder

logger = logging.getLogger(__name__)


class TerminationHook(HookBase):
    """Stops the run at an epoch boundary when the platform terminated this execution: the SDK's runner marks an
    execution's thread and `kill_event()` raises InterruptedError in it. The trainer then writes the last
    finished epoch's checkpoints, and the SDK's save-on-failure uploads them."""

    def __init__(self, kill_event: Callable[[], None]):
        self._kill_event = kill_event

    def before_epoch(self, run, epoch: int) -> None:
        self._kill_event()


class PlatformTraining:
    """One training run of `model_entity`; `artifacts_path`: where `load` found the model's artifacts (or None)."""

    def __init__(self, model_entity: dl.Model, settings: Mapping[str, Any], artifacts_path: Optional[str]):
        self._model, self._settings, self._artifacts_path = model_entity, settings, artifacts_path
        on_platform = bool(model_entity.project_id)
        self.artifacts = ModelArtifacts(model_entity, settings['upload_timeout_s']) if on_platform else None
        self._uploader: Optional[CheckpointUploader] = None

    def hooks(self, folder: RunFolder, kill_event: Callable[[], None]) -> List[HookBase]:
        """The run's platform hooks (after restoring an uploaded run into `folder`): upload, termination check."""
        hooks: List[HookBase] = [TerminationHook(kill_event)]
        if self.artifacts is None:
            return hooks
        resumed = bool(self._artifacts_path) and folder.restore_from(os.path.join(self._artifacts_path, WEIGHTS_DIR))
        self._uploader = CheckpointUploader(
            self.artifacts.upload_folder, folder.weights_dir, WEIGHTS_DIR, names=CHECKPOINT_NAMES,
            interval_s=self._settings['checkpoint_upload_interval_s'],
            staging_parent=os.path.dirname(os.path.abspath(folder.path)),
            already_uploaded=CHECKPOINT_NAMES if resumed else ())
        return [self._uploader] + hooks

    def finished(self) -> None:
        """After a finished run, delete the last.pth this run or a failed one uploaded (the SDK's upload never
        deletes): left among the artifacts, the next train_model (or a clone's) would resume from it."""
        if self.artifacts is None:
            return
        uploaded_now = self._uploader is not None and LAST_NAME in self._uploader.uploaded_names
        uploaded_before = bool(self._artifacts_path) and os.path.isfile(
            os.path.join(self._artifacts_path, WEIGHTS_DIR, LAST_NAME))
        if uploaded_now or uploaded_before:
            self.artifacts.delete(RunFolder.relative(LAST_NAME), 'the run is complete')

    def publish_metrics(self, epoch: int, metrics: Dict[str, float]) -> None:
        """One call per epoch: loss components on one figure, validation mAP / AR on another."""
        if self.artifacts is None:  # a local model (local_runner, benches): no platform to plot them
            return
        x = epoch + 1
        samples = [dl.PlotSample(figure='training loss', legend=key, x=x, y=float(metrics[key]))
                   for key in LOSS_KEYS if key in metrics]
        samples += [dl.PlotSample(figure='validation', legend=LEGENDS[key], x=x, y=float(metrics[key]))
                    for key in EVAL_KEYS if key in metrics]
        self._model.metrics.create(samples=samples, dataset_id=self._model.dataset_id)


def upload_run_folder(model_entity: dl.Model, settings: Mapping[str, Any], local_path: str,
                      weights_required: bool) -> None:
    """The final save's upload of `local_path` (what must not become an artifact removed first). With
    `weights_required` (training succeeded) the weights file must be among the artifacts afterwards, else
    WeightsNotUploadedError; a failed run's upload is checked for its resume checkpoint, logged, never raised."""
    folder = RunFolder(local_path)
    folder.clean_for_upload()
    artifacts = ModelArtifacts(model_entity, settings['upload_timeout_s'])
    if weights_required:
        artifacts.upload_checked(local_path, [settings['weights_filename']])
        return
    resume = [RunFolder.relative(LAST_NAME)] if folder.has_checkpoint() else []
    try:
        artifacts.upload_checked(local_path, resume, delays_s=())
    except Exception as err:  # the run's own error is on its way; this one is said, not raised
        logger.error('the failed run\'s checkpoints did not reach the model\'s artifacts: %s', err)
