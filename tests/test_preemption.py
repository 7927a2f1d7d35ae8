"""SIGTERM (Kubernetes' preemption) sent to a real training process, and the resume from what it saved.

The checkpoints are written by interval (`checkpoint_interval_s` 3600 here), so the last finished epoch's
last.pth exists only if the process wrote it on its way out.
"""
import json
import os
import signal
import subprocess
import sys
import time

import dtlpy as dl

from fasterrcnn_adapter import FasterRCNNAdapter
from tests.test_local_runner import LIGHT_TRAINING, REPO, TINY
from tests.test_platform_flows import artifact_files, checkpoint_from, platform, pod  # noqa: F401 (fixtures)
from utils.core.termination import EXIT_CODE
from utils.data.synthetic import make_synthetic_export
from utils.modeling.checkpoints import load_checkpoint

EPOCHS = 4  # the SIGTERM lands after epoch 1: three more epochs of margin before the run could finish
GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds


def start(args, log_path, **kwargs):
    with open(log_path, 'w') as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, **kwargs)


def wait_for_line(process, log_path, fragment, timeout_s=600):
    """Poll the process's log until `fragment` appears; fail if the process ends first."""
    deadline = time.monotonic() + timeout_s
    while fragment not in open(log_path).read():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError('{!r} never logged (exit code {}):\n{}'.format(
                fragment, process.poll(), open(log_path).read()[-5000:]))
        time.sleep(0.05)


def terminate(process):
    """SIGTERM, then the seconds until the process ended (it must end within the grace period)."""
    tic = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    return time.monotonic() - tic


def test_local_runner_saves_a_resumable_last_pth_on_sigterm_and_resumes(tmp_path):
    data, output = str(tmp_path / 'data'), str(tmp_path / 'out')
    make_synthetic_export(data, n_train=4, n_val=2, image_size=(96, 96), seed=5)
    config = tmp_path / 'config.json'
    config.write_text(json.dumps({**TINY, **LIGHT_TRAINING, 'epochs': EPOCHS, 'checkpoint_interval_s': 3600}))
    command = [sys.executable, '-m', 'local_runner', 'train', '--data', data, '--output', output,
               '--config', str(config)]
    log_path = str(tmp_path / 'train.log')
    process = start(command, log_path, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'))
    wait_for_line(process, log_path, 'epoch 1/{}: loss'.format(EPOCHS))  # its summary: it finished
    assert terminate(process) < GRACE_S
    log = open(log_path).read()
    assert process.returncode == EXIT_CODE == 143, log[-3000:]
    assert 'Traceback' not in log
    said = [line for line in log.splitlines() if 'SIGTERM' in line]
    assert said == ['local_runner train: interrupted by SIGTERM (run the same command again to resume from the '
                    'last finished epoch)'], said
    last = load_checkpoint(os.path.join(output, 'weights', 'last.pth'))
    done = int(last['epoch']) + 1
    assert 1 <= done < EPOCHS and not last['finished'] and 'optimizer' in last
    assert not os.path.exists(os.path.join(output, 'model.json'))

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'continuing at epoch {}/{}'.format(done + 1, EPOCHS) in again.stderr
    assert os.path.isfile(os.path.join(output, 'model.json'))


def test_sigterm_to_a_training_pod_uploads_its_last_epoch_and_the_rerun_resumes(platform, pod, tmp_path, caplog):
    emu = platform['emu']
    model_id = platform['add_model']('terminated', epochs=EPOCHS, checkpoint_upload_interval_s=3600,
                                     checkpoint_interval_s=3600)['id']
    work = pod('pod-1')
    log_path = str(tmp_path / 'pod-1.log')
    env = dict(os.environ, DATALOOP_PATH=str(work.parent / 'dataloop'), OMP_NUM_THREADS='1')
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_model_process.py')
    process = start([sys.executable, script, emu.api_url, model_id], log_path, cwd=str(work), env=env)
    wait_for_line(process, log_path, 'epoch 1/{}: loss'.format(EPOCHS))  # its summary: it finished
    assert terminate(process) < GRACE_S
    log = open(log_path).read()
    assert process.returncode == 1, log[-3000:]  # the run failed (an error, not a kill): the platform retries it
    assert 'SIGTERM (a preemption) stopped training' in log
    assert emu.models[model_id]['status'] != 'trained'
    artifacts = artifact_files(emu, platform['project']['id'], 'terminated')
    uploaded = checkpoint_from(artifacts['weights/last.pth'], tmp_path, 'uploaded-last.pth')
    done = int(uploaded['epoch']) + 1
    assert 1 <= done < EPOCHS and not uploaded['finished'] and 'optimizer' in uploaded

    pod('pod-2')
    caplog.set_level('INFO')
    returned = FasterRCNNAdapter().train_model(dl.models.get(model_id=model_id))
    assert 'continuing at epoch {}/{}'.format(done + 1, EPOCHS) in caplog.text
    assert returned.status == 'trained'
    assert 'weights/last.pth' not in artifact_files(emu, platform['project']['id'], 'terminated')
