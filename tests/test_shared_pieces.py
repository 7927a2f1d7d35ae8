"""The shared pieces with one home each: atomic writes, label-map conversion, metric names."""
import os
import stat

import pytest

from utils.core.atomic import atomic_write
from utils.core.label_map import configuration_entries, label_to_id, labels_in_id_order, parse_id_to_label


def test_atomic_write_replaces_the_file_with_plain_permissions(tmp_path):
    path = tmp_path / 'sub' / 'model.json'
    with atomic_write(str(path)) as f:
        f.write('first')
        assert not path.exists()  # nothing at the target until the write is complete
    with atomic_write(str(path)) as f:
        f.write('second')
    assert path.read_text() == 'second'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as open() would, not mkstemp's 0600
    assert os.listdir(path.parent) == ['model.json']


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / 'curves.png'
    path.write_bytes(b'old')
    with pytest.raises(RuntimeError, match='disk full'):
        with atomic_write(str(path), 'wb') as f:
            f.write(b'half')
            raise RuntimeError('disk full')
    assert path.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['curves.png']  # no temporary file left behind
    with pytest.raises(ValueError, match='whole files'):
        with atomic_write(str(path), 'a'):
            pass


def test_label_map_between_configuration_and_int_ids():
    stored = {'3': 'bird', '1': 'cat', '2': 'dog'}  # JSON keys are strings, in any order
    id_to_label = parse_id_to_label(stored)
    assert id_to_label == {1: 'cat', 2: 'dog', 3: 'bird'}
    assert parse_id_to_label({1: 'cat'}) == {1: 'cat'} and parse_id_to_label(None) == {}
    assert label_to_id(id_to_label) == {'cat': 1, 'dog': 2, 'bird': 3}
    assert labels_in_id_order({3: 'bird', 1: 'cat'}) == ['cat', 'bird']
    entries = configuration_entries({3: 'bird', 1: 'cat', 2: 'dog'})
    assert entries == {'id_to_label_map': {'1': 'cat', '2': 'dog', '3': 'bird'},
                       'label_to_id_map': {'cat': 1, 'dog': 2, 'bird': 3}}
    assert list(entries['id_to_label_map']) == ['1', '2', '3']  # sorted by id
    assert parse_id_to_label(entries['id_to_label_map']) == {1: 'cat', 2: 'dog', 3: 'bird'}
