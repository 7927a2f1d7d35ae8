"""The synthetic Dataloop-layout dataset: layout, JSON shape, geometry, determinism."""
import hashlib
import json
import os
import re

import pytest
from PIL import Image

from utils.data.synthetic import SHAPE_COLORS, make_synthetic_export


def _digest(root):
    """Hash of every file's relative path and bytes under root."""
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, 'rb') as f:
                h.update(f.read())
    return h.hexdigest()


def test_layout_and_item_json(tmp_path):
    summary = make_synthetic_export(str(tmp_path), n_train=6, n_val=3, image_size=(96, 80), seed=1)
    assert summary['subsets']['train']['items'] == 6
    assert summary['subsets']['validation']['items'] == 3
    for subset, count in (('train', 6), ('validation', 3)):
        items = sorted(os.listdir(tmp_path / subset / 'items'))
        jsons = sorted(os.listdir(tmp_path / subset / 'json'))
        assert len(items) == len(jsons) == count
        assert [os.path.splitext(n)[0] for n in items] == [os.path.splitext(n)[0] for n in jsons]
        n_annotations = 0
        for name in jsons:
            with open(tmp_path / subset / 'json' / name) as f:
                item = json.load(f)
            image_path = tmp_path / subset / 'items' / item['name']
            assert item['filename'] == '/' + item['name']
            assert re.fullmatch(r'[0-9a-f]{24}', item['id'])
            system = item['metadata']['system']
            assert system['mimetype'] == 'image/jpeg'
            assert system['size'] == os.path.getsize(image_path)
            with Image.open(image_path) as image:
                assert image.format == 'JPEG'
                assert image.size == (system['width'], system['height']) == (96, 80)
            assert 1 <= len(item['annotations']) <= 3
            labels = [a['label'] for a in item['annotations']]
            assert len(set(labels)) == len(labels), 'objects of one image have distinct classes'
            for ann in item['annotations']:
                assert ann['type'] == 'box'
                assert ann['label'] in ('circle', 'square', 'triangle')
                assert re.fullmatch(r'[0-9a-f]{24}', ann['id'])
                (p1, p2) = ann['coordinates']
                assert p1['z'] == 0 and p2['z'] == 0
                assert 0 <= p1['x'] < p2['x'] <= 96 and 0 <= p1['y'] < p2['y'] <= 80
                # 15-40% of the shorter side (80 px), shape-dependent aspect and tilt.
                assert 0.1 * 80 <= max(p2['x'] - p1['x'], p2['y'] - p1['y']) <= 0.5 * 80
            n_annotations += len(item['annotations'])
        assert summary['subsets'][subset]['annotations'] == n_annotations
        assert sum(summary['subsets'][subset]['per_label'].values()) == n_annotations


def test_boxes_do_not_overlap(tmp_path):
    make_synthetic_export(str(tmp_path), n_train=20, n_val=0, image_size=(128, 128), seed=3)
    for name in os.listdir(tmp_path / 'train' / 'json'):
        with open(tmp_path / 'train' / 'json' / name) as f:
            boxes = [(a['coordinates'][0]['x'], a['coordinates'][0]['y'],
                      a['coordinates'][1]['x'], a['coordinates'][1]['y']) for a in json.load(f)['annotations']]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (name, a, b)
    assert not os.path.exists(tmp_path / 'validation' / 'items')


def test_deterministic_given_seed(tmp_path):
    kwargs = dict(n_train=4, n_val=2, image_size=(64, 64), segment_fraction=0.5)
    make_synthetic_export(str(tmp_path / 'a'), seed=7, **kwargs)
    make_synthetic_export(str(tmp_path / 'b'), seed=7, **kwargs)
    make_synthetic_export(str(tmp_path / 'c'), seed=8, **kwargs)
    assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b')
    assert _digest(tmp_path / 'a') != _digest(tmp_path / 'c')
    # Item i does not depend on how many items are made.
    make_synthetic_export(str(tmp_path / 'd'), seed=7, n_train=2, n_val=0, image_size=(64, 64),
                          segment_fraction=0.5)
    for name in ('train_000000.json', 'train_000001.json'):
        assert (tmp_path / 'a' / 'train' / 'json' / name).read_bytes() == \
            (tmp_path / 'd' / 'train' / 'json' / name).read_bytes()


def test_segments_are_polygons_inside_image(tmp_path):
    summary = make_synthetic_export(str(tmp_path), n_train=10, n_val=0, image_size=(100, 70),
                                    segment_fraction=1.0, labels=('circle', 'triangle', 'cross', 'diamond'))
    assert summary['subsets']['train']['per_type']['box'] == 0
    assert summary['subsets']['train']['per_type']['segment'] > 0
    for name in os.listdir(tmp_path / 'train' / 'json'):
        with open(tmp_path / 'train' / 'json' / name) as f:
            item = json.load(f)
        for ann in item['annotations']:
            assert ann['type'] == 'segment'
            (ring,) = ann['coordinates']
            assert len(ring) >= 3
            assert all(0 <= p['x'] <= 100 and 0 <= p['y'] <= 70 for p in ring)


def test_refuses_to_mix_with_existing_files_unless_overwrite(tmp_path):
    make_synthetic_export(str(tmp_path), n_train=3, n_val=1, image_size=(64, 64))
    with pytest.raises(FileExistsError):
        make_synthetic_export(str(tmp_path), n_train=2, n_val=1, image_size=(64, 64))
    make_synthetic_export(str(tmp_path), n_train=2, n_val=1, image_size=(64, 64), overwrite=True)
    assert len(os.listdir(tmp_path / 'train' / 'items')) == 2


@pytest.mark.parametrize('kwargs', [dict(labels=('circle', 'hexagon')), dict(labels=()),
                                    dict(image_size=(16, 16)), dict(size_range=(0.5, 0.2)),
                                    dict(segment_fraction=1.5)])
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic_export(str(tmp_path), n_train=1, n_val=0, **kwargs)


def test_known_shapes_have_colors():
    assert {'circle', 'square', 'triangle'} <= set(SHAPE_COLORS)
