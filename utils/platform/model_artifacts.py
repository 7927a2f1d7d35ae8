"""The model's artifacts on the platform: uploads with a deadline, checked afterwards, retried with backoff.

Why: the SDK's folder upload logs a failed file (after its own quick retries) instead of raising, and an
upload whose connection stalls is never answered (no timeout on the SDK's upload session). A run that
trusted it would be marked ``trained`` with no weights among the artifacts, or wait forever. Here every
upload gets `timeout_s`, and what must be there is looked up afterwards among the model's artifacts
(the remote file with the local file's size, in the model's artifact list) before anyone relies on it.
"""
import logging
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import dtlpy as dl

logger = logging.getLogger(__name__)

# Waits between upload attempts: a platform hiccup (a restarting gateway, a full queue) gets about two minutes.
RETRY_DELAYS_S = (10.0, 30.0, 90.0)


class UploadTimeout(TimeoutError):
    """The platform did not answer an upload within its deadline."""


class WeightsNotUploadedError(RuntimeError):
    """The trained weights did not reach the model's artifacts: the run must not be marked trained."""


def bounded(call: Callable[[], object], timeout_s: float, what: str) -> object:
    """`call()` on a thread of its own, waited for at most `timeout_s`: its result, its exception, or an
    UploadTimeout (the thread is left behind: a stalled request cannot be cancelled from here)."""
    outcome: Dict[str, object] = {}

    def target() -> None:
        try:
            outcome['value'] = call()
        except BaseException as err:  # handed to the waiting thread
            outcome['error'] = err

    thread = threading.Thread(target=target, name=f'upload-{what}', daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise UploadTimeout(f'no answer from the platform within {timeout_s:.0f} s (upload_timeout_s) '
                            f'while uploading {what}')
    if 'error' in outcome:
        raise outcome['error']
    return outcome.get('value')


class ModelArtifacts:
    """Upload to, check and delete from one model's artifacts (``<artifacts>/models/<name>/<relative path>``)."""

    def __init__(self, model_entity: dl.Model, timeout_s: float):
        self._model, self.timeout_s = model_entity, float(timeout_s)

    def remote_path(self, relative: str) -> str:
        # the SDK's own builder of the folder `artifacts.upload` writes to
        return f'{self._model.artifacts._build_path_header(model_name=self._model.name)}/{relative}'

    def upload_folder(self, folder: str) -> None:
        """Upload `folder`'s content keeping relative paths; raise when the SDK says it failed or time runs out."""
        def upload():
            if self._model.artifacts.upload(filepath=os.path.join(folder, '*'), overwrite=True) is None:
                raise RuntimeError('the SDK reported the upload as failed (its warning says why)')
        bounded(upload, self.timeout_s, os.path.basename(os.path.normpath(folder)) or folder)

    def missing(self, folder: str, relatives: Sequence[str]) -> List[Tuple[str, str]]:
        """(relative path, why) of each of `relatives` under `folder` that is not among the model's artifacts with
        the local file's size."""
        found = {}
        listed = {getattr(artifact, 'id', None) for artifact in (self._model.model_artifacts or [])}
        for item in self._model.artifacts.list():
            found[item.filename] = (item.id, (item.metadata.get('system') or {}).get('size'))
        problems = []
        for relative in relatives:
            size = os.path.getsize(os.path.join(folder, relative))
            item_id, remote_size = found.get(self.remote_path(relative), (None, None))
            if item_id is None:
                problems.append((relative, 'not among the model\'s artifacts'))
            elif remote_size != size:
                problems.append((relative, f'{remote_size} bytes on the platform, {size} here'))
            elif item_id not in listed:
                problems.append((relative, 'stored, but not in the model\'s artifact list'))
        return problems

    def upload_checked(self, folder: str, required: Sequence[str], delays_s: Optional[Sequence[float]] = None) -> None:
        """Upload `folder` until every one of `required` is among the artifacts, waiting `delays_s` between tries;
        raise WeightsNotUploadedError naming what is missing and where it is on disk."""
        delays = RETRY_DELAYS_S if delays_s is None else delays_s
        problems: List[Tuple[str, str]] = []
        for attempt in range(len(delays) + 1):
            if attempt:
                logger.warning('upload attempt %d of %d did not place %s among the model\'s artifacts; '
                               'retrying in %.0f s', attempt, len(delays) + 1,
                               '; '.join(f'{rel} ({why})' for rel, why in problems), delays[attempt - 1])
                time.sleep(delays[attempt - 1])
            problems = self._try_upload(folder, required)
            if not problems:
                return
        where = ', '.join(os.path.abspath(os.path.join(folder, rel)) for rel, _ in problems)
        raise WeightsNotUploadedError(
            f'the weights were not uploaded to the artifacts of model {self._model.name!r} after {len(delays) + 1} '
            f'attempt(s) ({"; ".join(f"{rel}: {why}" for rel, why in problems)}); they are on this machine at '
            f'{where}')

    def _try_upload(self, folder: str, required: Sequence[str]) -> List[Tuple[str, str]]:
        """One upload and the check after it: what is still missing, and why."""
        try:
            self.upload_folder(folder)
        except Exception as err:  # checked below: a failure that placed the files anyway is no failure
            logger.warning('uploading %s to the model\'s artifacts failed: %s: %s', folder, type(err).__name__, err)
            failure = f'{type(err).__name__}: {err}'
        else:
            failure = None
        try:
            problems = self.missing(folder, required)
        except Exception as err:  # the listing failed too: nothing is known to be there
            return [(relative, f'could not list the artifacts ({type(err).__name__}: {err})') for relative in required]
        return [(rel, f'{why}; the upload said {failure}' if failure else why) for rel, why in problems]

    def delete(self, relative: str, why: str) -> None:
        """Delete one artifact; a failure is a warning naming what it leaves behind."""
        remote = self.remote_path(relative)
        try:
            bounded(lambda: self._model.artifacts.items_repository.delete(
                filters=dl.Filters(field='filename', values=remote)), self.timeout_s, relative)
            logger.info('deleted %s from the model\'s artifacts: %s', remote, why)
        except Exception as err:
            logger.warning('could not delete %s from the model\'s artifacts (%s: %s): a later training run '
                           'would resume from it', remote, type(err).__name__, err)
