"""Training data that lies, and a batch size larger than the data, through `python -m local_runner train`.

- label names: a `--labels` name no annotation has while a label of the data goes unused (a typo)
  is refused with exit 2 before training; only an unannotated label, or only an unused one, is
  a warning naming it, and training goes on;
- annotations whose label is not a string, whose type is not a string, whose coordinates are not
  finite numbers of sane size (400-digit integers, 1e999 written as a JSON number, booleans, 1e300)
  are dropped with a warning naming the item; the item's good boxes are kept;
- items whose image path is a FIFO, a folder or a device, item JSONs that are a FIFO or nested past
  Python's recursion limit, are skipped with a warning; nothing blocks (the subprocess has a timeout);
- `batch_size` over the training set is lowered to it, said in one line, and no batch repeats an image.

The tests that train read one run (`hostile_run`) that meets all three at once.
"""
import json
import logging
import os
import shutil
import stat

import pytest
import torch

from test_local_runner import LIGHT_TRAINING, TINY, run_cli
from utils.data.dataloop_reader import read_dataloop_export
from utils.data.label_check import check_label_names
from utils.data.synthetic import make_synthetic_export
from utils.training.batch_bound import bounded_batch_size, memory_bound

BIG_INT = '9' * 400


@pytest.fixture
def export(tmp_path):
    root = tmp_path / 'data'
    make_synthetic_export(str(root), n_train=4, n_val=2, image_size=(96, 96), seed=7)
    return root


@pytest.fixture
def config(tmp_path):
    path = tmp_path / 'tiny.json'
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope='module')
def hostile_run(tmp_path_factory):
    """One `local_runner train` that meets everything the tests below check, so they share its log and output:
    lying annotations and special files in the export, a label no box has (`--labels ... hexagon`) and a
    batch size over the training set (64, with 5 images: the 4 synthetic ones and the lying item's good box).
    """
    root = tmp_path_factory.mktemp('hostile')
    export = root / 'data'
    make_synthetic_export(str(export), n_train=4, n_val=2, image_size=(96, 96), seed=7)
    hostile = _write_hostile_item(export)
    special = _write_special_files(export)
    config = root / 'big_batch.json'
    config.write_text(json.dumps({**TINY, **LIGHT_TRAINING, 'batch_size': 64}))
    output = root / 'model'
    result = run_cli('train', '--data', str(export), '--output', str(output), '--config', str(config),
                     '--labels', 'circle,square,triangle,hexagon',
                     timeout=240)  # a FIFO opened for reading would block forever
    return dict(result=result, output=output, hostile=hostile, special=special)


def _an_image(root):
    items = root / 'train' / 'items'
    return next(p for p in sorted(items.rglob('*')) if p.is_file())


def _box_text(label_json, x1='4', y1='4', x2='60', y2='60', kind='"box"', extra=''):
    return ('{"type": %s, "label": %s, "coordinates": [{"x": %s, "y": %s}, {"x": %s, "y": %s}%s]}'
            % (kind, label_json, x1, y1, x2, y2, extra))


HOSTILE_ANNOTATIONS = [
    _box_text('{"name": "circle"}'),            # label: an object
    _box_text('5'),                             # label: a number
    _box_text('["circle"]', x1='5'),            # label: a list
    _box_text('true', x1='6'),                  # label: a boolean
    _box_text('"circle"', kind='{"t": 1}'),     # type: an object
    _box_text('"circle"', x1=BIG_INT),          # a 400-digit integer
    _box_text('"circle"', y1='1e999'),          # a JSON number past float's range
    _box_text('"circle"', x2='-1e999'),
    _box_text('"circle"', y2='true'),           # a boolean coordinate
    _box_text('"circle"', x1='1e300'),          # finite, of no sane size
    _box_text('"circle"', x1='null'),
    _box_text('"circle"', extra=', 1e999'),     # a rotation angle past float's range
    '{"type": "ellipse", "label": "circle", "coordinates": {"center": {"x": 40, "y": 40, "z": 0}, '
    '"rx": 1e200, "ry": 5, "angle": 0}}',       # an ellipse whose radius squared overflows
]
GOOD = _box_text('"circle"', x1='10', y1='10', x2='50', y2='50')


def _write_hostile_item(root, name='lies'):
    """train/items/hostile/<name>.jpg with the hostile annotations above plus one good box."""
    image = root / 'train' / 'items' / 'hostile' / f'{name}.jpg'
    image.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(_an_image(root), image)
    text = ('{"id": "hostile-1", "filename": "/hostile/%s.jpg", "annotations": [%s]}'
            % (name, ', '.join(HOSTILE_ANNOTATIONS + [GOOD])))
    json_path = root / 'train' / 'json' / 'hostile' / f'{name}.json'
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(text)
    return f'/hostile/{name}.jpg'


def _item_json(root, name, filename):
    path = root / 'train' / 'json' / 'odd' / f'{name}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'id': name, 'filename': filename, 'annotations': [json.loads(GOOD)]}))


def _write_special_files(root):
    """Items whose image is a FIFO, a folder, a device; JSONs that are a FIFO or nested too deep.
    Returns the names the warnings must mention."""
    items = root / 'train' / 'items' / 'odd'
    items.mkdir(parents=True, exist_ok=True)
    os.mkfifo(items / 'pipe.jpg')
    _item_json(root, 'pipe', '/odd/pipe.jpg')
    (items / 'folder.jpg').mkdir()
    _item_json(root, 'folder', '/odd/folder.jpg')
    names = ['/odd/pipe.jpg', '/odd/folder.jpg', '/odd/pipe_json', '/odd/deep']
    try:
        os.mknod(items / 'device.jpg', stat.S_IFCHR | 0o600, os.makedev(1, 5))  # like /dev/zero: endless
        _item_json(root, 'device', '/odd/device.jpg')
        names.append('/odd/device.jpg')
    except (PermissionError, OSError):  # not root, or no CAP_MKNOD: the FIFO and the folder still stand
        pass
    os.mkfifo(root / 'train' / 'json' / 'odd' / 'pipe_json.json')
    (root / 'train' / 'json' / 'odd' / 'deep.json').write_text('[' * 200_000 + ']' * 200_000)
    return names


# ----------------------------------------------------------------------------- labels

def test_a_typo_in_labels_is_refused_before_training_naming_both_names(export, config, tmp_path):
    output = tmp_path / 'model'
    result = run_cli('-q', 'train', '--data', str(export), '--output', str(output), '--config', str(config),
                     '--labels', 'circle,sqaure,triangle')
    assert result.returncode == 2, result.stderr
    assert 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the note that training starts from random weights
    assert last.startswith('local_runner train: error:')
    for fragment in ("'sqaure'", "'square'", 'have no box', 'would be dropped'):
        assert fragment in last, last
    assert not (output / 'weights').exists()


@pytest.mark.parametrize('labels, warned', [
    (['circle', 'square', 'triangle', 'hexagon'], "['hexagon'] have no box in the 'train' subset"),
    (['circle', 'square'], "['triangle'] of the data are not among the model's labels"),
])
def test_an_unannotated_or_an_unused_label_alone_is_a_warning_naming_it(export, caplog, labels, warned):
    read = read_dataloop_export(str(export), labels=labels)
    with caplog.at_level(logging.WARNING, logger='utils.data.label_check'):
        check_label_names(labels, read)  # no error
    assert [r.getMessage() for r in caplog.records if warned in r.getMessage()]


def test_a_typo_among_many_labels_is_refused_by_the_adapter_too(export):
    read = read_dataloop_export(str(export), labels=['circle', 'square', 'tringle'])
    with pytest.raises(ValueError, match=r"\['tringle'\].*\['triangle'\].*'tringle' -> 'triangle'"):
        check_label_names(['circle', 'square', 'tringle'], read)


def test_training_with_an_unannotated_label_warns_and_trains(hostile_run):
    result, output = hostile_run['result'], hostile_run['output']
    assert result.returncode == 0, result.stderr
    assert "['hexagon'] have no box in the 'train' subset" in result.stderr
    assert json.loads((output / 'model.json').read_text())['labels'] == ['circle', 'square', 'triangle', 'hexagon']


# ----------------------------------------------------------------------------- annotations and files

def test_hostile_annotations_are_dropped_one_by_one_naming_the_item(export, caplog):
    name = _write_hostile_item(export)
    with caplog.at_level(logging.WARNING, logger='utils.data.dataloop_reader'):
        read = read_dataloop_export(str(export))
    [record] = [r for r in read.subsets['train'] if r['name'] == name]
    assert record['boxes'] == [[10.0, 10.0, 50.0, 50.0]] and record['labels'] == ['circle']
    report = read.reports['train']
    assert report.dropped['bad label'] == 4
    assert report.dropped['bad annotation'] == 1
    assert report.dropped['bad coordinates'] == len(HOSTILE_ANNOTATIONS) - 5
    lines = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(lines) == len(HOSTILE_ANNOTATIONS)
    assert any('label is a dict' in line for line in lines) and any('beyond 1e+09' in line for line in lines)
    assert any('999999' in line for line in lines)


def test_train_skips_lying_annotations_and_special_files_and_finishes(hostile_run):
    result, output = hostile_run['result'], hostile_run['output']
    hostile, special = hostile_run['hostile'], hostile_run['special']
    assert result.returncode == 0, result.stderr
    assert 'Traceback' not in result.stderr
    assert result.stderr.count(hostile) >= len(HOSTILE_ANNOTATIONS)
    for name in special:
        assert name in result.stderr, name
    assert 'is a named pipe (FIFO), not a regular file' in result.stderr
    assert 'is a folder, not a regular file' in result.stderr
    assert (output / 'weights' / 'best.pth').is_file()


# ----------------------------------------------------------------------------- batch size

def test_a_batch_size_over_the_training_set_is_lowered_to_it_in_one_line(hostile_run):
    result = hostile_run['result']
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if 'lowered to' in line]
    assert len(lines) == 1 and 'WARNING' in lines[0], result.stderr
    assert 'training batch size 64 (batch_size) lowered to 5: the training set has 5 image(s)' in lines[0]
    assert 'batch 5,' in result.stderr


def test_the_batch_size_is_bounded_by_memory_too(monkeypatch, caplog):
    from utils.training import batch_bound
    monkeypatch.setattr(batch_bound, 'device_memory', lambda device: 64 * 2 ** 30)
    per_image = batch_bound.BYTES_PER_TRAIN_MEGAPIXEL * 800 * 1333 / 1e6
    expected = int(64 * 2 ** 30 * batch_bound.MEMORY_SHARE // per_image)
    assert memory_bound(torch.device('cpu'), 800 * 1333) == expected
    with caplog.at_level(logging.INFO, logger='utils.training.batch_bound'):
        assert bounded_batch_size(500, 10_000, torch.device('cpu'), 800 * 1333, 'batch_size') == expected
        assert bounded_batch_size(2, 10_000, torch.device('cpu'), 800 * 1333, 'batch_size') == 2
        assert bounded_batch_size(8, 3, torch.device('cpu'), 800 * 1333) == 3  # 'auto' on a tiny set: INFO
    levels = [record.levelno for record in caplog.records]
    assert levels == [logging.WARNING, logging.INFO]
    assert 'fit in 80% of' in caplog.records[0].getMessage()
