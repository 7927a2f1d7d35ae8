"""The trainer's hooks: their order, the checkpoint interval they ask for, and stopping a run through the SDK's
termination of an execution thread. Training is stubbed as in test_resume_state."""
import threading

import dtlpy as dl
import pytest

from tests.test_resume_state import fit, records, stub_training  # noqa: F401 (fixture)
from utils.modeling.checkpoints import load_checkpoint
from utils.platform.training_run import TerminationHook
from utils.training.hooks import HookBase


class Recording(HookBase):
    def __init__(self, events, checkpoint_every_s):
        self.events, self.checkpoint_every_s = events, checkpoint_every_s

    def before_epoch(self, run, epoch):
        self.events.append(('before', epoch))

    def after_epoch(self, run, record):
        self.events.append(('after', record['epoch']))

    def after_checkpoint(self, epoch, epochs):
        self.events.append(('written', epoch))

    def after_train(self, run):
        self.events.append(('done', run.last_epoch))

    def on_failure(self, run):
        self.events.append(('failed', run.last_epoch))


def test_hooks_run_in_order_and_ask_for_the_checkpoints_they_need(tmp_path, monkeypatch, records):
    stub_training(monkeypatch, [])
    events, written = [], []
    monkeypatch.setattr('utils.training.checkpoint_writer.save_checkpoint',
                        lambda payload, path: written.append((path.rsplit('/', 1)[-1], payload['epoch'])))
    fit(records, tmp_path / 'out', epochs=3, checkpoint_interval_s=3600, hooks=[Recording(events, 0.0)],
        on_epoch_end=lambda epoch, epochs: events.append(('progress', epoch)))
    for name in ('before', 'after', 'written', 'progress'):
        assert [epoch for kind, epoch in events if kind == name] == [0, 1, 2]
    at = events.index
    for epoch in range(3):  # after_checkpoint comes from the writer's thread, in list order, within its epoch
        assert at(('before', epoch)) < at(('after', epoch)) and at(('before', epoch)) < at(('written', epoch))
        assert at(('written', epoch)) < at(('progress', epoch))
        if epoch < 2:
            assert at(('progress', epoch)) < at(('after', epoch + 1))
    assert events[-1] == ('done', 2)
    # the hook asked for every epoch: checkpoint_interval_s 3600 alone would have written the last epoch only
    assert [epoch for name, epoch in written if name == 'last.pth'] == [0, 1, 2]


def test_an_error_reaches_every_hook_after_the_last_good_checkpoint(tmp_path, monkeypatch, records):
    stub_training(monkeypatch, [])
    events = []

    def fails(epoch, epochs):
        if epoch == 1:
            raise ConnectionError('injected')

    with pytest.raises(ConnectionError):
        fit(records, tmp_path / 'out', epochs=4, hooks=[Recording(events, float('inf'))], on_epoch_end=fails)
    assert events[-1][0] == 'failed' and ('done', 3) not in events


def test_a_terminated_execution_thread_stops_at_the_next_epoch_with_a_resumable_checkpoint(
        tmp_path, monkeypatch, records):
    """The SDK's runner terminates an execution by marking its thread (`_terminate`); `kill_event()` then raises
    InterruptedError there. The run stops before its next epoch and leaves the last finished one resumable."""
    calls = []
    stub_training(monkeypatch, calls)
    runner = dl.BaseServiceRunner()
    output, outcome = tmp_path / 'out', {}

    def train():
        try:
            fit(records, output, epochs=4, checkpoint_interval_s=3600, hooks=[TerminationHook(runner.kill_event)],
                on_epoch_end=lambda epoch, epochs: epoch == 0 and runner._terminate(training.ident))
        except BaseException as err:
            outcome['error'] = err

    training = threading.Thread(target=train)
    training.start()
    training.join(timeout=600)
    assert isinstance(outcome.get('error'), InterruptedError), outcome
    assert calls[:1] == [0] and len(calls) <= 2  # stopped at the next epoch boundary at the latest
    last = load_checkpoint(str(output / 'weights' / 'last.pth'))
    assert not last['finished'] and last['epoch'] == len(calls) - 1 and 'optimizer' in last
    calls.clear()
    assert fit(records, output, epochs=4, checkpoint_interval_s=3600).epochs_run == 4
    assert calls and calls[0] == last['epoch'] + 1
