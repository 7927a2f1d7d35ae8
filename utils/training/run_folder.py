"""A training run's output folder and its states, owned by one object (as fvcore's `Checkpointer` owns
has_checkpoint / resume_or_load / tag_last_checkpoint).

    OUT/weights/last.pth   everything to resume; after the final epoch it says ``finished``
    OUT/weights/best.pth   the best epoch's weights: what the model ships
    OUT/model.json         the local runner's description, written once the run is complete

The states, in the order a run goes through them:

- *resumable*: last.pth exists and does not say finished; the trainer continues after its epoch.
- *finished*: last.pth says finished (`utils.modeling.checkpoints.is_finished_run`): nothing is
  trained again; the run's own settings can finish it early (`tag_finished`).
- *uploaded* (platform): a copy of the checkpoints among the model's artifacts; `restore_from`
  brings it back on a fresh pod when the folder has no last.pth of its own.
- *discarded*: a finished run's last.pth deleted (`discard_finished_state`): its optimizer state doubles
  the size and must not be shipped or resumed from.
- *complete* (local runner): model.json written; a complete run is never overwritten.

Checks of a folder (`check_new_output`) import no torch unless a model.json is there.
"""
import logging
import os
from typing import Any, Mapping, Optional, Sequence

from utils.core.atomic import copy_file, remove_stale_temporaries
from utils.core.errors import InputError
from utils.core.output_layout import BEST_NAME, LAST_NAME, MODEL_FILE, WEIGHTS_DIR

logger = logging.getLogger(__name__)

CHECKPOINT_NAMES = (BEST_NAME, LAST_NAME)  # the resume checkpoint last: it names the best epoch


class RunFolder:
    def __init__(self, path: str):
        self.path = path
        self.weights_dir = os.path.join(path, WEIGHTS_DIR)
        self.last_path = os.path.join(self.weights_dir, LAST_NAME)
        self.best_path = os.path.join(self.weights_dir, BEST_NAME)
        self.model_json = os.path.join(path, MODEL_FILE)

    @staticmethod
    def relative(name: str) -> str:
        """A checkpoint's path relative to the folder (and to the model's artifacts): weights/<name>."""
        return f'{WEIGHTS_DIR}/{name}'

    def prepare(self) -> None:
        """Create weights/ and remove the temporaries that interrupted writes left there (or in the folder)."""
        os.makedirs(self.weights_dir, exist_ok=True)
        remove_stale_temporaries(self.path)
        remove_stale_temporaries(self.weights_dir)

    def has_checkpoint(self) -> bool:
        """A last.pth is there (resumable or finished)."""
        return os.path.exists(self.last_path)

    def resume_source(self, resume_path: Optional[str] = None) -> Optional[str]:
        """The last.pth a run continues from: `resume_path` when given, else this folder's, else None."""
        if resume_path:
            return resume_path
        if self.has_checkpoint():
            return self.last_path
        if os.path.exists(self.best_path):
            logger.warning('%s has no %s: the run that wrote it stopped before its first epoch was saved; '
                           'starting over', self.best_path, LAST_NAME)
        return None

    def is_finished(self) -> bool:
        from utils.modeling.checkpoints import is_finished_run  # torch: only when a folder is really read
        return is_finished_run(self.last_path)

    def tag_finished(self, checkpoint: Mapping[str, Any], source: str) -> None:
        """Say ``finished`` in last.pth when this folder's `checkpoint` (read from `source`) ended by the settings
        of this call (fewer epochs than it had planned): for the adapter and the runner that read the flag."""
        if checkpoint.get('finished') or os.path.abspath(source) != os.path.abspath(self.last_path):
            return
        from utils.modeling.checkpoints import save_checkpoint
        save_checkpoint({**{k: v for k, v in checkpoint.items() if k != 'variants'}, 'finished': True},
                        self.last_path)

    def discard_finished_state(self) -> bool:
        """Delete a finished run's last.pth (nothing is left to resume); True when it did. A resumable one is kept."""
        if not self.is_finished():
            return False
        os.remove(self.last_path)
        return True

    def clean_for_upload(self) -> None:
        """What must not become an artifact goes: a finished run's last.pth and the temporaries of interrupted
        writes. A failed run's last.pth stays: the retry resumes from it."""
        self.discard_finished_state()
        remove_stale_temporaries(self.path, recursive=True)

    def restore_from(self, uploaded_dir: str, names: Sequence[str] = CHECKPOINT_NAMES) -> bool:
        """Copy `names` from `uploaded_dir` (an earlier run's uploaded weights/) into weights/; True when it did.

        The last name is the resume checkpoint: nothing is copied unless it was uploaded and this folder
        has none of its own (a local one is newer). The others come along: a resumed run must still know
        (and ship) the earlier run's best epoch when its own epochs do not beat it.
        """
        resume = names[-1]
        if os.path.isfile(os.path.join(self.weights_dir, resume)) or \
                not os.path.isfile(os.path.join(uploaded_dir, resume)):
            return False
        os.makedirs(self.weights_dir, exist_ok=True)
        for name in names:  # the resume checkpoint last (and whole, or not at all): it marks a complete copy
            if os.path.isfile(os.path.join(uploaded_dir, name)):
                copy_file(os.path.join(uploaded_dir, name), os.path.join(self.weights_dir, name))
        logger.info('resuming from the checkpoint uploaded by an earlier run: %s', os.path.join(uploaded_dir, resume))
        return True

    def is_complete(self) -> bool:
        """model.json is written: after the final last.pth said ``finished``, which is deleted only after
        model.json. A best.pth alone (a run killed before its first last.pth) is no complete run."""
        return os.path.isfile(self.model_json) and (not self.has_checkpoint() or self.is_finished())

    def check_new_output(self, option: str = '--output') -> None:
        """Refuse a file, or a complete run (never overwritten); an interrupted one is resumed (or, stopped
        before its first last.pth, started over), and a finished one whose model.json is missing gets it."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise InputError(f'{option} {self.path} is a file, not a folder')
        if self.is_complete():
            raise InputError(f'{option} {self.path} already holds a finished training run ({self.model_json}): '
                             f'choose a new {option} folder, or delete that one to train again')
