"""Progress in a service log (not a terminal): bounded log lines, no bar; a bar only on a terminal."""
import io
import logging
import sys

import torch

from utils.training import engine
from utils.core.progress import Progress, route_sdk_bars

BAR_CHARACTERS = ('\r', '█', '|#', '\x1b[')


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _progress_lines(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_without_a_terminal_progress_is_a_bounded_number_of_log_lines(caplog, capsys):
    with caplog.at_level(logging.INFO, logger='utils.core.progress'):
        for _ in Progress(range(1000), desc='work', unit='item', summary=True):
            pass
    lines = _progress_lines(caplog, 'work:')
    assert 9 <= len(lines) <= 11, lines  # every 10%, and one summary line
    assert lines[0].startswith('work: 100/1000 item (10%)') and 'eta' in lines[0]
    assert lines[-1].startswith('work: done, 1000 item in')
    err = capsys.readouterr().err
    assert not any(c in err for c in BAR_CHARACTERS)


def test_a_line_every_interval_when_the_work_is_slow(caplog, monkeypatch):
    clock = iter(range(0, 10_000, 40))  # 40 s per step
    monkeypatch.setattr('utils.core.progress.time.monotonic', lambda: next(clock))
    with caplog.at_level(logging.INFO, logger='utils.core.progress'):
        progress = Progress(total=1000, desc='slow')
        for _ in range(5):
            progress.update()
        progress.close()
    assert len(_progress_lines(caplog, 'slow:')) == 5  # 30 s passed at each step, long before 10%


def test_on_a_terminal_a_bar_and_no_log_lines(caplog, monkeypatch):
    monkeypatch.setattr(sys, 'stderr', _Terminal())
    with caplog.at_level(logging.INFO, logger='utils.core.progress'):
        for _ in Progress(range(50), desc='work', summary=True):
            pass
    assert not _progress_lines(caplog, 'work')
    assert 'work' in sys.stderr.getvalue()  # tqdm drew its bar there


def test_the_sdks_predict_bar_becomes_log_lines(caplog, capsys):
    """dtlpy's predict_items/embed_items call ``tqdm.tqdm(range(0, n, batch), unit='bt', file=sys.stdout)``."""
    from dtlpy.ml import base_model_adapter as sdk

    from utils.core import runtime_setup
    runtime_setup.configure()  # what the adapter's constructor and the local runner call
    route_sdk_bars(sdk)  # idempotent
    with caplog.at_level(logging.INFO, logger='dtlpy.progress'):
        for _ in sdk.tqdm.tqdm(range(0, 400, 4), desc='predicting', unit='bt', leave=None, file=sys.stdout):
            pass
    lines = _progress_lines(caplog, 'predicting:')
    assert 9 <= len(lines) <= 11 and lines[0].startswith('predicting: 10/100 batch (10%)')
    out = capsys.readouterr()
    assert not any(c in out.out + out.err for c in BAR_CHARACTERS)


class _Loss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, images, targets):
        base = self.weight.sum() ** 2
        return {'loss_classifier': base, 'loss_box_reg': base, 'loss_objectness': base, 'loss_rpn_box_reg': base}


def test_a_training_epoch_in_a_service_log(caplog, capsys):
    batch = ((torch.zeros(3, 4, 4),), ({'boxes': torch.zeros((0, 4)), 'labels': torch.zeros(0, dtype=torch.int64),
                                        'image_id': 0},))
    model = _Loss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, fused=True)
    with caplog.at_level(logging.INFO):
        engine.train_one_epoch(model, optimizer, [batch] * 200, torch.device('cpu'), epoch=0, warmup_iters=0,
                               total_epochs=3, log_interval=20)
    lines = _progress_lines(caplog, 'epoch 1/3:')
    assert 8 <= len(lines) <= 10, lines
    assert 'loss' in lines[-1] and 'lr' in lines[-1]  # the running loss, read back at a log interval
    err = capsys.readouterr().err
    assert not any(c in err for c in BAR_CHARACTERS)
