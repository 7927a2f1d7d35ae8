"""The background checkpoint uploader: when it uploads, what, in which order, and what a failure does."""
import logging
import os
import threading

from utils.platform.artifact_sync import CheckpointUploader
from utils.training.run_folder import RunFolder

NAMES = ('best.pth', 'last.pth')


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Recorder:
    """An `upload(folder)` that records (relative path, bytes) of what it was given; can fail or block."""

    def __init__(self, fail_on=(), gate=None):
        self.calls, self.fail_on, self.gate = [], set(fail_on), gate
        self.active, self.max_active = 0, 0
        self._lock = threading.Lock()

    def __call__(self, folder):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                assert self.gate.wait(timeout=30)
            (path,) = [os.path.relpath(os.path.join(root, f), folder)
                       for root, _, files in os.walk(folder) for f in files]
            with open(os.path.join(folder, path), 'rb') as f:
                data = f.read()
            if os.path.basename(path) in self.fail_on:
                raise ConnectionError('injected: the platform is unreachable')
            self.calls.append((path, data))
        finally:
            with self._lock:
                self.active -= 1


def write(weights, name, data):
    """Like the trainer: a new file replaces the old one atomically."""
    weights.mkdir(parents=True, exist_ok=True)
    tmp = weights / ('.tmp-' + name)
    tmp.write_bytes(data)
    os.replace(tmp, weights / name)


def make(tmp_path, upload, interval_s=0, **kwargs):
    clock = Clock()
    uploader = CheckpointUploader(upload, str(tmp_path / 'output' / 'weights'), 'weights', NAMES,
                                  interval_s=interval_s, staging_parent=str(tmp_path), clock=clock, **kwargs)
    return uploader, clock


def round_(uploader, epoch):
    uploader.epoch_end(epoch)
    uploader.close()  # wait for it, as train() does before returning


def test_uploads_changed_files_in_order_at_the_interval(tmp_path):
    weights = tmp_path / 'output' / 'weights'
    upload = Recorder()
    uploader, clock = make(tmp_path, upload, interval_s=600)
    write(weights, 'best.pth', b'best-1')
    write(weights, 'last.pth', b'last-1')
    clock.now = 599
    round_(uploader, 0)
    assert upload.calls == []  # the first round is due 600 s after training started
    clock.now = 600
    round_(uploader, 1)
    assert upload.calls == [('weights/best.pth', b'best-1'), ('weights/last.pth', b'last-1')]  # best first
    write(weights, 'last.pth', b'last-2')  # best.pth unchanged this time
    clock.now = 1000
    round_(uploader, 2)
    assert len(upload.calls) == 2  # not due yet
    clock.now = 1200
    round_(uploader, 3)
    assert upload.calls[2:] == [('weights/last.pth', b'last-2')]
    assert uploader.uploaded_names == set(NAMES)
    assert [p for p in os.listdir(tmp_path) if p.startswith('.checkpoint-upload')] == []  # staging cleaned up


def test_a_staged_copy_is_uploaded_even_if_the_trainer_overwrites_its_file(tmp_path):
    weights = tmp_path / 'output' / 'weights'
    stale = tmp_path / '.checkpoint-upload-killed' / 'epoch3-last.pth' / 'weights'
    stale.mkdir(parents=True)
    (stale / 'last.pth').write_bytes(b'left by a killed run')
    gate = threading.Event()
    upload = Recorder(gate=gate)
    uploader, clock = make(tmp_path, upload)
    assert not (tmp_path / '.checkpoint-upload-killed').exists()
    write(weights, 'last.pth', b'epoch-1')
    uploader.epoch_end(0)
    write(weights, 'last.pth', b'epoch-2')  # the next epoch's checkpoint while the upload still runs
    uploader.epoch_end(1)  # busy: never two uploads at once, this round is skipped
    gate.set()
    uploader.close()
    assert upload.calls == [('weights/last.pth', b'epoch-1')] and upload.max_active == 1
    round_(uploader, 2)
    assert upload.calls[1:] == [('weights/last.pth', b'epoch-2')]


def test_a_failed_upload_is_logged_skips_last_and_is_retried(tmp_path, caplog):
    weights = tmp_path / 'output' / 'weights'
    upload = Recorder(fail_on={'best.pth'})
    uploader, clock = make(tmp_path, upload)
    write(weights, 'best.pth', b'best-1')
    write(weights, 'last.pth', b'last-1')
    with caplog.at_level(logging.WARNING):
        round_(uploader, 0)  # never raises
    assert 'could not upload weights/best.pth of epoch 1' in caplog.text and 'ConnectionError' in caplog.text
    # last.pth names epoch 1 as the best: it must not reach the platform without that best.pth
    assert upload.calls == [] and uploader.uploaded_names == set()
    upload.fail_on.clear()
    round_(uploader, 1)
    assert upload.calls == [('weights/best.pth', b'best-1'), ('weights/last.pth', b'last-1')]


def test_files_that_came_from_the_artifacts_are_not_sent_back(tmp_path):
    weights = tmp_path / 'output' / 'weights'
    write(weights, 'best.pth', b'uploaded-best')
    write(weights, 'last.pth', b'uploaded-last')
    upload = Recorder()
    uploader, clock = make(tmp_path, upload, already_uploaded=NAMES)
    round_(uploader, 0)
    assert upload.calls == []
    write(weights, 'last.pth', b'resumed-epoch')
    round_(uploader, 1)
    assert upload.calls == [('weights/last.pth', b'resumed-epoch')]


def test_a_checkpoint_that_cannot_be_staged_is_logged_not_raised(tmp_path, caplog):
    weights = tmp_path / 'output' / 'weights'
    write(weights, 'last.pth', b'last-1')
    blocked = tmp_path / 'not-a-folder'
    blocked.write_bytes(b'')  # staging under a file fails like a full or read-only disk does
    upload = Recorder()
    uploader = CheckpointUploader(upload, str(weights), 'weights', NAMES, interval_s=0, staging_parent=str(blocked))
    with caplog.at_level(logging.WARNING):
        round_(uploader, 0)
    assert 'epoch 1: could not stage the checkpoints for upload' in caplog.text
    assert upload.calls == []


def test_restore_copies_uploaded_checkpoints_only_without_a_local_resume_file(tmp_path):
    uploaded, local = tmp_path / 'artifacts' / 'weights', tmp_path / 'output' / 'weights'
    folder = RunFolder(str(tmp_path / 'output'))
    assert not folder.restore_from(str(uploaded), NAMES)  # nothing uploaded
    assert not local.exists()
    uploaded.mkdir(parents=True)
    (uploaded / 'best.pth').write_bytes(b'best')
    assert not folder.restore_from(str(uploaded), NAMES)  # best.pth alone cannot resume
    (uploaded / 'last.pth').write_bytes(b'last')
    assert folder.restore_from(str(uploaded), NAMES)
    assert (local / 'best.pth').read_bytes() == b'best' and (local / 'last.pth').read_bytes() == b'last'
    (uploaded / 'last.pth').write_bytes(b'older')
    assert not folder.restore_from(str(uploaded), NAMES)  # the local resume file is newer
    assert (local / 'last.pth').read_bytes() == b'last'
