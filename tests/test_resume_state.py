"""Resume state and checkpoint files: what makes a run finished, a full disk, stale temporaries,
and the background checkpoint writer's contract with `on_epoch_end`.

Training is stubbed (the weights change each epoch, no network pass): these are the trainer's
bookkeeping and the files it leaves, which is what the tests look at. curves.png is rendered by the
test of when it is drawn; the others skip matplotlib's quarter of a second a draw, two a run
(`tests.test_training.curves_png_not_drawn`; tests/test_training.py checks the picture).
"""
import contextlib
import errno
import os
import threading
import time

import pytest
import torch

from local_runner.model_folder import check_train_output
from tests.test_training import CHECKPOINT_INFO, CPU, LABEL_TO_ID, make_records, settings, small_model
from tests.test_training import curves_png_not_drawn  # noqa: F401 (a fixture)
from utils.core import atomic
from utils.training import checkpoint_writer, curves, trainer
from utils.training.run_folder import RunFolder
from utils.modeling import checkpoints
from utils.core.atomic import atomic_write, remove_stale_temporaries
from utils.modeling.checkpoints import load_checkpoint, is_finished_run, save_checkpoint
from utils.core.errors import DiskFullError, InputError

OLD = time.time() - 3600  # an mtime from before this test process started


class _Killed(Exception):
    pass


class FullFile:
    """A file whose writes fail with `code` once `room` bytes are written, as on a full disk."""

    def __init__(self, f, room=256, code=errno.ENOSPC):
        self._f, self._room, self._code = f, room, code

    def write(self, data):
        self._room -= len(data)
        if self._room < 0:
            raise OSError(self._code, os.strerror(self._code))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def fail_writes_of(monkeypatch, should_fail, code=errno.ENOSPC):
    """Checkpoint writes for which `should_fail(path)` is true hit a full disk inside torch.save."""
    real = atomic.atomic_write

    @contextlib.contextmanager
    def writing(path, mode='w', fsync=False, **kwargs):
        with real(path, mode, fsync, **kwargs) as f:
            yield FullFile(f, code=code) if should_fail(path) else f

    monkeypatch.setattr(checkpoints, 'atomic_write', writing)


def stub_training(monkeypatch, calls):
    """Each epoch moves the weights (so epochs differ) and reports losses; no validation pass."""
    def fake_train(model, optimizer, data_loader, device, epoch, **kwargs):
        calls.append(epoch)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        return dict(loss=1.0 / (epoch + 1), loss_classifier=0.1, loss_box_reg=0.2, loss_objectness=0.3,
                    loss_rpn_box_reg=0.4, lr=0.01)

    monkeypatch.setattr(trainer.engine, 'train_one_epoch', fake_train)


@pytest.fixture(autouse=True)
def curves_png_drawn_in_its_own_test_only(request):
    """See the module's docstring."""
    if request.function is not test_curves_png_is_drawn_at_most_every_interval_and_at_the_end:
        request.getfixturevalue('curves_png_not_drawn')


@pytest.fixture
def records(tmp_path):
    return make_records(tmp_path / 'train', 2, seed=31)


def fit(records, output, epochs=2, val_records=(), checkpoint_interval_s=0, **kwargs):
    return trainer.fit(small_model(), records, list(val_records), LABEL_TO_ID, str(output),
                       settings(epochs=epochs, checkpoint_interval_s=checkpoint_interval_s), CPU, CHECKPOINT_INFO,
                       **kwargs)


# ----------------------------------------------------------------------------- a full disk

@pytest.mark.parametrize('code, says', [(errno.ENOSPC, 'the disk is full'), (errno.EDQUOT, 'quota')])
def test_a_full_disk_is_one_line_naming_the_file_and_the_old_file_stays(tmp_path, monkeypatch, code, says):
    path = str(tmp_path / 'weights' / 'last.pth')
    save_checkpoint({'state_dict': {'w': torch.zeros(4)}, 'epoch': 0}, path)
    fail_writes_of(monkeypatch, lambda p: True, code)
    with pytest.raises(DiskFullError) as caught:
        save_checkpoint({'state_dict': {'w': torch.ones(100_000)}, 'epoch': 1}, path)
    message = str(caught.value)
    assert isinstance(caught.value, InputError) and '\n' not in message
    assert path in message and says in message and 'free some space' in message
    assert torch.load(path, weights_only=True)['epoch'] == 0
    assert os.listdir(tmp_path / 'weights') == ['last.pth']  # no temporary left behind


def test_a_full_disk_at_fsync_is_a_disk_full_error_too(tmp_path, monkeypatch):
    def no_room(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(atomic.os, 'fsync', no_room)
    with pytest.raises(DiskFullError, match='curves.csv'):
        with atomic_write(str(tmp_path / 'curves.csv'), 'w', fsync=True) as f:
            f.write('epoch\n')
    assert os.listdir(tmp_path) == []


def test_last_pth_on_a_full_disk_in_the_first_epoch_is_no_finished_run(tmp_path, monkeypatch, records):
    """best.pth written, last.pth not (a full disk here; a kill there leaves the same files): the run
    fails with one line, and the same command starts the run again instead of calling it finished."""
    calls = []
    stub_training(monkeypatch, calls)
    output = tmp_path / 'out'
    fail_writes_of(monkeypatch, lambda p: p.endswith('last.pth'))
    with pytest.raises(DiskFullError, match='last.pth'):
        fit(records, output)
    assert calls[0] == 0 and len(calls) <= 2  # stopped at the latest at the next epoch boundary
    assert os.path.isfile(output / 'weights' / 'best.pth') and not os.path.exists(output / 'weights' / 'last.pth')
    check_train_output(str(output))  # the local runner does not take it for a finished run

    monkeypatch.undo()
    calls.clear()
    stub_training(monkeypatch, calls)
    result = fit(records, output)
    assert calls == [0, 1] and result.epochs_run == 2
    assert is_finished_run(str(output / 'weights' / 'last.pth'))


def test_a_full_disk_later_keeps_the_last_good_checkpoint_and_the_run_resumes(tmp_path, monkeypatch, records):
    calls, written = [], []
    stub_training(monkeypatch, calls)
    output = tmp_path / 'out'

    def second_last(path):
        written.append(path)
        return path.endswith('last.pth') and sum(p.endswith('last.pth') for p in written) == 2

    fail_writes_of(monkeypatch, second_last)
    with pytest.raises(DiskFullError):
        fit(records, output, epochs=3)
    last = load_checkpoint(str(output / 'weights' / 'last.pth'))
    assert last['epoch'] == 0 and not last['finished']
    assert not is_finished_run(str(output / 'weights' / 'last.pth'))

    monkeypatch.undo()
    calls.clear()
    stub_training(monkeypatch, calls)
    assert fit(records, output, epochs=3).epochs_run == 3 and calls == [1, 2]


# ----------------------------------------------------------------------------- finished runs

def test_only_the_last_checkpoint_of_the_final_epoch_says_finished(tmp_path, monkeypatch, records):
    calls, seen = [], []
    stub_training(monkeypatch, calls)
    output = tmp_path / 'out'
    last_path = str(output / 'weights' / 'last.pth')
    fit(records, output, epochs=3, on_epoch_end=lambda e, n: seen.append(is_finished_run(last_path)))
    assert seen == [False, False, True]
    # a finished run is not trained again; the finished state is dropped only on request
    calls.clear()
    assert fit(records, output, epochs=3).epochs_run == 3 and calls == []
    assert RunFolder(str(output)).discard_finished_state() and not os.path.exists(last_path)
    assert not RunFolder(str(output)).discard_finished_state()


def test_a_run_resumed_with_fewer_epochs_than_it_has_run_is_marked_finished(tmp_path, monkeypatch, records):
    calls = []
    stub_training(monkeypatch, calls)
    with pytest.raises(_Killed):
        fit(records, tmp_path / 'out', epochs=3, on_epoch_end=lambda e, n: e == 1 and (_ for _ in ()).throw(_Killed()))
    last_path = str(tmp_path / 'out' / 'weights' / 'last.pth')
    assert load_checkpoint(last_path)['epoch'] == 1 and not is_finished_run(last_path)
    calls.clear()
    assert fit(records, tmp_path / 'out', epochs=2).epochs_run == 2 and calls == []
    assert is_finished_run(last_path)


def test_a_resumable_last_pth_is_never_discarded(tmp_path, monkeypatch, records):
    calls = []
    stub_training(monkeypatch, calls)
    fit(records, tmp_path / 'out', epochs=1)
    last_path = str(tmp_path / 'out' / 'weights' / 'last.pth')
    checkpoint = load_checkpoint(last_path)
    save_checkpoint({**checkpoint, 'finished': False, 'epochs': 5}, last_path)
    assert not RunFolder(str(tmp_path / "out")).discard_finished_state() and os.path.isfile(last_path)
    # an older last.pth without the flag: finished when its epoch was the last planned
    legacy = {k: v for k, v in checkpoint.items() if k != 'finished'}
    save_checkpoint({**legacy, 'epoch': 4, 'epochs': 5}, last_path)
    assert is_finished_run(last_path)
    save_checkpoint({**legacy, 'epoch': 3, 'epochs': 5}, last_path)
    assert not is_finished_run(last_path)


# ----------------------------------------------------------------------------- temporaries

def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    def touch(name, mtime=OLD, size=10):
        path = tmp_path / name
        path.write_bytes(b'x' * size)
        os.utime(path, (mtime, mtime))
        return path

    stale = [touch('.tmp-abcd_123.pth', size=1000), touch('.tmp-zz9xk0qw')]
    kept = [touch('.tmp-abcd_124.pth', mtime=time.time() + 5),  # written after this process started
            touch('.tmp-notes.txt'), touch('tmp-abcd_125.pth'), touch('last.pth'), touch('.tmp-ABCDEFGH.pth')]
    (tmp_path / '.tmp-dirdirdi').mkdir()
    os.utime(tmp_path / '.tmp-dirdirdi', (OLD, OLD))
    with atomic_write(str(tmp_path / 'best.pth'), 'wb') as f:  # a write of this process in progress
        in_flight = [tmp_path / n for n in os.listdir(tmp_path) if n.startswith('.tmp-') and
                     (tmp_path / n).stat().st_mtime > OLD + 60 and (tmp_path / n) not in kept]
        assert len(in_flight) == 1
        os.utime(in_flight[0], (OLD, OLD))
        removed = remove_stale_temporaries(str(tmp_path))
        assert in_flight[0].exists()
        f.write(b'weights')
    assert sorted(removed) == sorted(str(p) for p in stale)
    assert all(p.exists() for p in kept) and (tmp_path / '.tmp-dirdirdi').is_dir()
    assert (tmp_path / 'best.pth').read_bytes() == b'weights'
    nested = tmp_path / 'weights'
    nested.mkdir()
    deep = nested / '.tmp-q1w2e3r4.pth'
    deep.write_bytes(b'x')
    os.utime(deep, (OLD, OLD))
    assert remove_stale_temporaries(str(tmp_path)) == [] and deep.exists()
    assert remove_stale_temporaries(str(tmp_path), recursive=True) == [str(deep)]


def test_fit_removes_the_temporaries_a_killed_write_left(tmp_path, monkeypatch, records):
    stub_training(monkeypatch, [])
    weights = tmp_path / 'out' / 'weights'
    weights.mkdir(parents=True)
    for path in (weights / '.tmp-k1ll3d00.pth', tmp_path / 'out' / '.tmp-k1ll3d01.png'):
        path.write_bytes(b'half a checkpoint')
        os.utime(path, (OLD, OLD))
    fit(records, tmp_path / 'out', epochs=1)
    assert sorted(os.listdir(weights)) == ['best.pth', 'last.pth']
    assert not any(name.startswith('.tmp-') for name in os.listdir(tmp_path / 'out'))


# ----------------------------------------------------------------------------- the background writer

def test_on_epoch_end_sees_that_epochs_checkpoints_complete(tmp_path, monkeypatch, records):
    """The contract with an uploader in on_epoch_end: when it is called for an epoch, last.pth (and
    best.pth when it improved) on disk are that epoch's, whole; calls come in order and never overlap."""
    stub_training(monkeypatch, [])
    real_save = checkpoints.save_checkpoint

    def slow_save(payload, path):
        time.sleep(0.2)  # the next epoch trains meanwhile: on_epoch_end must still wait for this write
        return real_save(payload, path)

    monkeypatch.setattr('utils.training.checkpoint_writer.save_checkpoint', slow_save)
    output = tmp_path / 'out'
    seen, active = [], []

    def on_epoch_end(epoch, epochs):
        active.append(epoch)
        assert len(active) == 1
        last = load_checkpoint(str(output / 'weights' / 'last.pth'))
        best = load_checkpoint(str(output / 'weights' / 'best.pth'))
        seen.append((epoch, epochs, last['epoch'], best['epoch'], threading.current_thread().name))
        active.pop()

    result = fit(records, output, epochs=3, on_epoch_end=on_epoch_end)
    assert [s[:4] for s in seen] == [(0, 3, 0, 0), (1, 3, 1, 1), (2, 3, 2, 2)]
    assert result.epochs_run == 3


def test_an_error_in_the_background_is_raised_not_lost(tmp_path, monkeypatch, records):
    calls = []
    stub_training(monkeypatch, calls)

    def fails_once(epoch, epochs):
        if epoch == 0:
            raise ConnectionError('upload failed')

    with pytest.raises(ConnectionError, match='upload failed'):
        fit(records, tmp_path / 'out', epochs=4, on_epoch_end=fails_once)
    assert calls[0] == 0 and len(calls) <= 2
    with pytest.raises(ConnectionError, match='at the end'):  # the final epoch's: fit fails
        fit(records, tmp_path / 'other', epochs=1,
            on_epoch_end=lambda e, n: (_ for _ in ()).throw(ConnectionError('at the end')))


def test_the_checkpoint_is_a_snapshot_of_its_epoch(tmp_path, monkeypatch, records):
    """Training goes on while the writer writes: the files must hold the weights the epoch ended with."""
    stub_training(monkeypatch, [])
    ends = {}
    real_add = trainer._Run.add

    def add(run, record):  # the weights as the epoch ends (before its checkpoints are handed over)
        name, parameter = next(iter(run.model.named_parameters()))
        ends[record['epoch']] = (name, parameter.detach().clone())
        return real_add(run, record)

    monkeypatch.setattr(trainer._Run, 'add', add)
    real_save = checkpoints.save_checkpoint
    monkeypatch.setattr('utils.training.checkpoint_writer.save_checkpoint',
                        lambda payload, path: (time.sleep(0.3), real_save(payload, path))[1])
    seen = {}
    output = tmp_path / 'out'

    def on_epoch_end(epoch, epochs):
        state = load_checkpoint(str(output / 'weights' / 'best.pth'))['state_dict']
        seen[epoch] = state[ends[epoch][0]]

    fit(records, output, epochs=3, on_epoch_end=on_epoch_end)
    assert all(torch.equal(seen[e], ends[e][1]) for e in range(3)) and not torch.equal(ends[0][1], ends[2][1])


def test_curves_png_is_drawn_at_most_every_interval_and_at_the_end(tmp_path, monkeypatch, records):
    stub_training(monkeypatch, [])
    drawn = []
    real_png = curves.write_png
    monkeypatch.setattr(curves, 'write_png', lambda history, path: drawn.append(len(history)) or
                        real_png(history, path))
    monkeypatch.setattr(curves, 'PNG_INTERVAL_S', 3600.0)
    fit(records, tmp_path / 'out', epochs=4, checkpoint_interval_s=3600)  # (the curves do not wait for checkpoints)
    assert drawn == [1, 4]  # the first epoch (nothing drawn yet), then the final one
    assert [row['epoch'] for row in curves.read_csv(str(tmp_path / 'out' / 'curves.csv'))] == [0, 1, 2, 3]
    monkeypatch.setattr(curves, 'PNG_INTERVAL_S', 0.0)
    drawn.clear()
    fit(records, tmp_path / 'again', epochs=3, checkpoint_interval_s=3600)
    assert drawn == [1, 2, 3]


# ----------------------------------------------------------------------------- checkpoints by interval

class Clock:
    """trainer's `time`, with a monotonic clock the test moves (each stubbed epoch takes `epoch_s`)."""

    def __init__(self, epoch_s):
        self.now, self.epoch_s = 0.0, epoch_s

    def monotonic(self):
        return self.now

    def time(self):
        return time.time()


def clocked_training(monkeypatch, epoch_s, scores=None):
    """stub_training whose epochs each take `epoch_s` on a fake clock; `scores`: validation mAP per epoch."""
    clock, calls = Clock(epoch_s), []
    stub_training(monkeypatch, calls)
    stubbed = trainer.engine.train_one_epoch

    def timed(*args, **kwargs):
        clock.now += clock.epoch_s
        return stubbed(*args, **kwargs)

    monkeypatch.setattr(trainer.engine, 'train_one_epoch', timed)
    monkeypatch.setattr(trainer, 'time', clock)
    monkeypatch.setattr(checkpoint_writer, 'time', clock)
    if scores is not None:
        monkeypatch.setattr(trainer.engine, 'evaluate', lambda *args, **kwargs: {'mAP': scores[len(calls) - 1]})
    return calls


def test_checkpoints_come_every_interval_and_after_the_final_epoch(tmp_path, monkeypatch, records):
    clocked_training(monkeypatch, epoch_s=25.0)
    output, written = tmp_path / 'out', []
    real_save = checkpoints.save_checkpoint
    monkeypatch.setattr('utils.training.checkpoint_writer.save_checkpoint',
                        lambda payload, path: written.append((os.path.basename(path), payload['epoch'])) or
                        real_save(payload, path))
    seen = []
    fit(records, output, epochs=7, checkpoint_interval_s=60,
        on_epoch_end=lambda epoch, epochs: seen.append(epoch))
    # epochs end at 25, 50, 75, ... s: due at 75 s (epoch 2), 150 s (epoch 5), and the final epoch 6
    assert [epoch for name, epoch in written if name == 'last.pth'] == [2, 5, 6]
    assert seen == list(range(7))  # on_epoch_end still comes once per epoch, in order
    assert load_checkpoint(str(output / 'weights' / 'last.pth'))['finished']


def test_best_pth_holds_the_best_epochs_exact_weights_written_later(tmp_path, monkeypatch, records):
    """The best epoch (1) ends between writes: its weights wait on the device and go into best.pth at the final
    write; the model then holds them. Each stubbed epoch adds 1.0 to the first parameter."""
    clocked_training(monkeypatch, epoch_s=1.0, scores=[0.1, 0.5, 0.3, 0.2])
    start = next(small_model().parameters()).detach().clone()
    output = tmp_path / 'out'
    model = small_model()
    result = trainer.fit(model, records, make_records(tmp_path / 'val', 1, seed=2), LABEL_TO_ID, str(output),
                         settings(epochs=4, checkpoint_interval_s=3600), CPU, CHECKPOINT_INFO)
    assert result.best_epoch == 1
    best = load_checkpoint(str(output / 'weights' / 'best.pth'))
    name = next(iter(dict(model.named_parameters())))
    assert best['epoch'] == 1 and best['metrics']['mAP'] == 0.5
    after = [start + 1.0]
    for _ in range(3):
        after.append(after[-1] + 1.0)  # the weights after each epoch, rounded as training rounds them
    assert torch.equal(best['state_dict'][name], after[1])
    assert torch.equal(load_checkpoint(str(output / 'weights' / 'last.pth'))['state_dict'][name], after[3])
    assert torch.equal(next(model.parameters()).detach(), after[1])


def test_between_writes_the_best_weights_are_kept_once_not_copied_at_every_epoch(tmp_path, monkeypatch, records):
    """The best epoch (0) waits for the final write: the copies kept at the epochs between share its weights
    (a snapshot already) and clone only the live training state."""
    clocked_training(monkeypatch, epoch_s=1.0, scores=[0.5, 0.1, 0.1, 0.1])
    kept = []
    real_copy = checkpoint_writer.device_copy
    monkeypatch.setattr(checkpoint_writer, 'device_copy',
                        lambda files, snapshots=(): kept.append(real_copy(files, snapshots)) or kept[-1])
    output = tmp_path / 'out'
    model = small_model()
    trainer.fit(model, records, make_records(tmp_path / 'val', 1, seed=2), LABEL_TO_ID, str(output),
                settings(epochs=4, checkpoint_interval_s=3600), CPU, CHECKPOINT_INFO)
    name = next(iter(dict(model.named_parameters())))
    best_path, last_path = str(output / 'weights' / 'best.pth'), str(output / 'weights' / 'last.pth')
    bests = [dict(files)[best_path]['state_dict'][name] for files in kept]
    lasts = [dict(files)[last_path]['state_dict'][name] for files in kept]
    assert len(kept) == 3  # epochs 0-2; epoch 3 is written
    assert all(best is bests[0] for best in bests)
    assert len({id(last) for last in lasts} | {id(bests[0])}) == 4


def test_a_run_that_fails_between_writes_keeps_its_finished_epochs(tmp_path, monkeypatch, records):
    """Epochs 0-1 end between writes (their state waits on the device); epoch 2 fails: epoch 1's last.pth is
    written before the error goes on, and the next run resumes at epoch 2."""
    calls = clocked_training(monkeypatch, epoch_s=1.0)
    stubbed = trainer.engine.train_one_epoch

    def fails_in_epoch_2(model, optimizer, data_loader, device, epoch, **kwargs):
        if epoch == 2:
            raise _Killed()
        return stubbed(model, optimizer, data_loader, device, epoch, **kwargs)

    monkeypatch.setattr(trainer.engine, 'train_one_epoch', fails_in_epoch_2)
    output = tmp_path / 'out'
    with pytest.raises(_Killed):
        fit(records, output, epochs=4, checkpoint_interval_s=3600)
    last = load_checkpoint(str(output / 'weights' / 'last.pth'))
    assert last['epoch'] == 1 and not last['finished'] and 'optimizer' in last
    assert load_checkpoint(str(output / 'weights' / 'best.pth'))['epoch'] == 1
    calls.clear()
    monkeypatch.setattr(trainer.engine, 'train_one_epoch', stubbed)
    assert fit(records, output, epochs=4, checkpoint_interval_s=3600).epochs_run == 4
    assert calls == [2, 3]
