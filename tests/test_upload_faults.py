"""`train_model` on a platform that fails or stalls artifact uploads, through the real SDK over the emulator.

The emulator's faults (`add_fault`) answer HTTP 500 or never answer the SDK's item uploads into the model's
artifacts. A run must never be marked trained without its weights among the artifacts, must say where the
weights are when they could not be uploaded, and must never wait on an upload without a bound.
"""
import logging
import os
import time

import dtlpy as dl
import pytest

from fasterrcnn_adapter import FasterRCNNAdapter
from tests.test_platform_flows import artifact_files, listed_artifacts, platform, pod  # noqa: F401 (fixtures)
from utils.platform import model_artifacts
from utils.platform.model_artifacts import WeightsNotUploadedError


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(model_artifacts, 'RETRY_DELAYS_S', (0.1, 0.2))


def test_weights_that_never_reach_the_artifacts_fail_the_run_naming_where_they_are(
        platform, pod, quick_retries, caplog):
    emu = platform['emu']
    model_id = platform['add_model']('unlucky', checkpoint_upload_interval_s=0)['id']
    emu.add_fault('error', emu.artifact_upload())  # every artifact upload: HTTP 500
    work = pod('pod-1')
    caplog.set_level(logging.INFO)
    with pytest.raises(WeightsNotUploadedError) as caught:
        FasterRCNNAdapter().train_model(dl.models.get(model_id=model_id))
    message = str(caught.value)
    weights = os.path.join('tmp', model_id, 'output', 'weights', 'best.pth')
    assert 'not uploaded' in message and 'weights/best.pth' in message and "'unlucky'" in message
    assert os.path.join(os.getcwd(), weights) in message and os.path.isfile(work / weights)
    assert emu.models[model_id]['status'] != 'trained'
    assert 'weights/best.pth' not in artifact_files(emu, platform['project']['id'], 'unlucky')
    # the epoch 1 checkpoint upload failed too: logged, and training went on to its last epoch
    assert 'could not upload weights/best.pth of epoch 1' in caplog.text and 'epoch 2/2' in caplog.text
    final = [hit for hit in emu.faults_hit if hit.status == 'error']
    assert len(final) >= 3 * 5  # three attempts of the final save (the SDK tries each file 5 times)
    assert 'upload attempt 2 of 3' in caplog.text
    assert caplog.text.count('not uploading') == 1  # the SDK's save-on-failure does not upload it all again


def test_a_failed_first_upload_of_the_final_save_is_retried_and_the_run_is_trained(platform, pod, quick_retries):
    emu = platform['emu']
    model_id = platform['add_model']('second-try', epochs=1)['id']
    emu.add_fault('error', emu.artifact_upload('weights/best.pth'), times=5)  # the SDK's 5 tries of one upload
    pod('pod-1')
    returned = FasterRCNNAdapter().train_model(dl.models.get(model_id=model_id))
    assert returned.status == 'trained' and emu.models[model_id]['status'] == 'trained'
    artifacts = artifact_files(emu, platform['project']['id'], 'second-try')
    assert 'weights/best.pth' in artifacts
    assert '/artifacts/models/second-try/weights/best.pth' in listed_artifacts(emu, model_id)
    assert len(emu.faults_hit) == 5


def test_a_stalled_checkpoint_upload_is_abandoned_at_its_deadline(platform, pod, caplog):
    """The first checkpoint upload is read and never answered: the run ends without waiting for it, in one
    line, and the final save uploads the weights."""
    emu = platform['emu']
    model_id = platform['add_model']('stalled', epochs=2, checkpoint_upload_interval_s=0, upload_timeout_s=2)['id']
    emu.add_fault('stall', emu.artifact_upload(), times=1)
    pod('pod-1')
    caplog.set_level(logging.INFO)
    tic = time.monotonic()
    returned = FasterRCNNAdapter().train_model(dl.models.get(model_id=model_id))
    assert returned.status == 'trained'
    assert caplog.text.count('abandoning the upload of weights/best.pth of epoch 1: no answer from the platform '
                             'within 2 s (upload_timeout_s)') == 1
    assert 'waiting for the checkpoint upload in flight' not in caplog.text
    assert [hit.status for hit in emu.faults_hit] == ['stall']
    assert 'weights/best.pth' in artifact_files(emu, platform['project']['id'], 'stalled')
    assert time.monotonic() - tic < 600
