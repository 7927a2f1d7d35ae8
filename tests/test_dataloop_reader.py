"""The Dataloop-data reader on a crafted export holding every annotation type and every bad case."""
import base64
import collections
import io
import json
import logging
import math
import os

import numpy as np
import pytest
from PIL import Image

from utils.data.annotation_boxes import mask_blob_boxes
from utils.data.data_index import load_index, save_index
from utils.data.dataloop_reader import DataloopExport, read_dataloop_export
from utils.data.training_checks import require_training_subsets

LABELS = ['car', 'person']
W, H = 100, 80


# ----------------------------------------------------------------------------- builders

def _image_bytes(size=(W, H), fmt='JPEG', exif_orientation=None):
    image = Image.new('RGB', size, (90, 120, 150))
    buffer = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(buffer, format=fmt, exif=exif)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb' if isinstance(data, bytes) else 'w') as f:
        f.write(data)


def _item(root, subset, remote, annotations, image=None, json_rel=None, **fields):
    """Write items/<remote> (when `image` is given) and json/<remote dir>/<stem>.json."""
    if image is not None:
        _write(os.path.join(root, subset, 'items', remote.lstrip('/')), image)
    json_rel = json_rel or os.path.splitext(remote.lstrip('/'))[0] + '.json'
    body = annotations if fields.get('bare') else dict(
        {'id': 'id-' + os.path.basename(remote), 'filename': remote, 'name': os.path.basename(remote),
         'metadata': {'system': {'width': W, 'height': H, 'mimetype': 'image/jpeg'}}},
        **{k: v for k, v in fields.items() if k != 'drop_keys'}, annotations=annotations)
    for key in fields.get('drop_keys', ()):
        body.pop(key)
    _write(os.path.join(root, subset, 'json', json_rel), json.dumps(body))


def _pt(x, y, z=True):
    return {'x': x, 'y': y, 'z': 0} if z else {'x': x, 'y': y}


def _box(label, p1, p2, z=True, **extra):
    return dict({'type': 'box', 'label': label, 'coordinates': [_pt(*p1, z=z), _pt(*p2, z=z)]}, **extra)


def _mask_png(alpha):
    rgba = np.zeros(alpha.shape + (4,), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = alpha
    buffer = io.BytesIO()
    Image.fromarray(rgba, 'RGBA').save(buffer, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode()


ELLIPSE = {'center': {'x': 90, 'y': 40, 'z': 0}, 'rx': 20, 'ry': 10, 'angle': 30}


def _sampled_ellipse_box(e):
    """Tight box by dense sampling of the rotated ellipse: an independent check of the closed form."""
    t = np.linspace(0, 2 * np.pi, 200001)
    a = math.radians(e['angle'])
    x = e['center']['x'] + e['rx'] * np.cos(t) * math.cos(a) - e['ry'] * np.sin(t) * math.sin(a)
    y = e['center']['y'] + e['rx'] * np.cos(t) * math.sin(a) + e['ry'] * np.sin(t) * math.cos(a)
    return [x.min(), y.min(), x.max(), y.max()]


def build_export(root, outside):
    """The crafted export; returns {item name: expected (boxes, labels)} for the train items used."""
    jpg, expected = _image_bytes(), {}

    # Current format, boxes of every shape plus every kind of annotation that is not a box.
    _item(root, 'train', '/boxes.jpg', image=jpg, annotations=[
        _box('car', (10, 20), (30, 40), id='a1'),
        _box('car', (50, 60), (40, 45), z=False, attributes=None),              # reversed corners
        _box('person', (60.5, 5), (100.00032, 79.9), attributes=['occluded']),  # right edge overshoots
        _box('car', ('1', '2'), ('11.5', '12')),                                 # numeric strings
        {'type': 'box', 'label': 'person', 'coordinates': [_pt(20, 10), _pt(40, 20), 90]},  # rotated 90
        _box('car', (5, 5), (5.5, 30)),                                          # 0.5 px wide
        _box('car', (120, 10), (140, 20)),                                       # right of the image
        _box('car', (10, 20), (30, 40), id='a1-clone'),                          # exact duplicate
        _box('dog', (0, 0), (10, 10)),                                           # not in the label map
        {'type': 'point', 'label': 'car', 'coordinates': _pt(5, 5)},
        {'type': 'polyline', 'label': 'car', 'coordinates': [_pt(1, 1), _pt(9, 9)]},
        {'type': 'class', 'label': 'car'},
        {'type': 'class', 'label': 'car', 'coordinates': []},
        {'type': 'text', 'label': 'car', 'coordinates': 'a plate number'},
        {'type': 'box', 'label': 'car', 'coordinates': [{'x': 'abc', 'y': 1}, _pt(2, 3)]},
        {'type': 'box', 'coordinates': [_pt(1, 1), _pt(9, 9)]},                  # no label
    ])
    expected['/boxes.jpg'] = ([[10, 20, 30, 40], [40, 45, 50, 60], [60.5, 5, 100, 79.9], [1, 2, 11.5, 12],
                               [25, 5, 35, 25]], ['car', 'car', 'person', 'car', 'person'])

    # Old format: _id + itemMetadata; polygons with two rings and one past the edge.
    _item(root, 'train', '/poly.png', image=_image_bytes(fmt='PNG'), drop_keys=('id', 'metadata'),
          _id='id-poly', itemMetadata={'system': {'width': W, 'height': H, 'mimetype': 'image/png'}},
          annotations=[
              {'type': 'segment', 'label': 'car', 'coordinates': [[_pt(10, 10), _pt(20, 5), _pt(30, 15)],
                                                                   [_pt(50, 40), _pt(60, 70), _pt(55, 30)]]},
              {'type': 'segment', 'label': 'person', 'coordinates': [[_pt(-5, 10), _pt(20, 90), _pt(15, 20)]]},
          ])
    expected['/poly.png'] = ([[10, 5, 60, 70], [0, 10, 20, 80]], ['car', 'person'])

    # Binary masks: two blobs (one with a diagonal-only neighbour), a soft mask, an empty and a broken one.
    two = np.zeros((H, W), np.uint8)
    two[10:20, 5:15] = 255
    two[20, 15] = 255          # touches (19, 14) diagonally: same blob
    two[50:60, 70:90] = 255
    soft = np.full((H, W), 0, np.uint8)
    soft[30:40, :] = 127       # just under the threshold: outside
    soft[30:40, 40:60] = np.linspace(128, 255, 20).astype(np.uint8)
    _item(root, 'train', '/mask.jpg', image=jpg, annotations=[
        {'type': 'binary', 'label': 'car', 'coordinates': _mask_png(two)},
        {'type': 'binary', 'label': 'person', 'coordinates': _mask_png(soft), 'attributes': []},
        {'type': 'binary', 'label': 'car', 'coordinates': _mask_png(np.zeros((H, W), np.uint8))},
        {'type': 'binary', 'label': 'car', 'coordinates': 'data:image/png;base64,bm90IGEgcG5n'},
    ])
    expected['/mask.jpg'] = ([[5, 10, 16, 21], [70, 50, 90, 60], [40, 30, 60, 40]], ['car', 'car', 'person'])

    # Ellipses: rotated and past the right edge; axis-aligned.
    _item(root, 'train', '/ellipse.jpg', image=jpg, annotations=[
        {'type': 'ellipse', 'label': 'person', 'coordinates': ELLIPSE},
        {'type': 'ellipse', 'label': 'car', 'coordinates': {'center': _pt(20, 20), 'rx': 10, 'ry': 5, 'angle': 0}},
    ])
    x1, y1, _, y2 = _sampled_ellipse_box(ELLIPSE)
    expected['/ellipse.jpg'] = ([[x1, y1, 100, y2], [10, 15, 30, 25]], ['person', 'car'])

    # EXIF orientation 6: stored 60x40, displayed 40x60; metadata has the stored (stale) size.
    _item(root, 'train', '/exif.jpg', image=_image_bytes((60, 40), exif_orientation=6),
          metadata={'system': {'width': 60, 'height': 40}},
          annotations=[_box('person', (5, 10), (50, 55))])
    expected['/exif.jpg'] = ([[5, 10, 40, 55]], ['person'])

    # A .jpg that holds a PNG.
    _item(root, 'train', '/pngjpg.jpg', image=_image_bytes((64, 48), fmt='PNG'),
          annotations=[_box('car', (1, 2), (63, 47))])
    expected['/pngjpg.jpg'] = ([[1, 2, 63, 47]], ['car'])

    # A bare list of annotations in a sub folder; the image has another extension than the usual .jpg.
    _write(os.path.join(root, 'train', 'items', 'sub', 'dir', 'bare.png'), _image_bytes(fmt='PNG'))
    _item(root, 'train', '/sub/dir/bare', bare=True, annotations=[
        dict(_box('person', (0, 0), (20, 20)), itemId='id-bare'), _box('car', (30, 30), (40, 50))])
    expected['/sub/dir/bare.png'] = ([[0, 0, 20, 20], [30, 30, 40, 50]], ['person', 'car'])

    # _id + filename only (no size anywhere), in a folder.
    _item(root, 'train', '/folder/idonly.jpg', image=jpg, drop_keys=('id', 'metadata', 'name'), _id='id-only',
          annotations=[_box('car', (2, 3), (4, 5))])
    expected['/folder/idonly.jpg'] = ([[2, 3, 4, 5]], ['car'])

    # Bad items.
    _write(os.path.join(root, 'train', 'json', 'broken.json'), '{"id": "x", "annotations": [')
    _item(root, 'train', '/missing.jpg', annotations=[_box('car', (1, 1), (9, 9))])
    _item(root, 'train', '../../etc/passwd', json_rel='evil.json', annotations=[_box('car', (1, 1), (9, 9))])
    _write(outside, jpg)
    os.makedirs(os.path.join(root, 'train', 'items'), exist_ok=True)
    os.symlink(outside, os.path.join(root, 'train', 'items', 'link.jpg'))
    _item(root, 'train', '/link.jpg', annotations=[_box('car', (1, 1), (9, 9))])
    _item(root, 'train', '/video.mp4', image=b'\x00\x00\x00\x18ftypmp42', annotations=[_box('car', (1, 1), (9, 9))],
          metadata={'system': {'mimetype': 'video/mp4'}})
    # annotations with snapshots make a video item, whatever its name says
    _item(root, 'train', '/video2.jpg', image=b'neither an image nor a video', metadata={'system': {}}, annotations=[
        dict(_box('car', (1, 1), (9, 9)), metadata={'system': {'snapshots_': [{'frame': 1}]}})])
    _item(root, 'train', '/text.jpg', image=b'this is not an image', annotations=[_box('car', (1, 1), (9, 9))])

    # No usable box: a negative only with include_background.
    _item(root, 'train', '/empty.jpg', image=jpg, annotations=[
        {'type': 'point', 'label': 'car', 'coordinates': _pt(5, 5)}, {'type': 'class', 'label': 'person'}])

    _item(root, 'validation', '/val.jpg', image=jpg, annotations=[_box('person', (1, 1), (50, 50))])
    return expected


EXPECTED_DROPPED = collections.Counter({
    'smaller than 1px': 1, 'outside the image': 1, 'duplicate annotation': 1, 'label not in model': 1,
    'type point': 2, 'type polyline': 1, 'type class': 3, 'type text': 1, 'bad coordinates': 2, 'no label': 1,
    'empty mask': 1, 'unparseable json': 1, 'missing image': 1, 'path outside data_path': 2, 'unreadable video': 2,
    'undecodable image': 1, 'no usable boxes': 1})


@pytest.fixture
def export_dir(tmp_path):
    root = str(tmp_path / 'data')
    expected = build_export(root, str(tmp_path / 'outside' / 'secret.jpg'))
    return root, expected


def _by_name(records):
    return {r['name']: r for r in records}


# ----------------------------------------------------------------------------- tests

def test_boxes_and_labels_of_every_item(export_dir, caplog):
    root, expected = export_dir
    with caplog.at_level(logging.INFO, logger='utils.data.dataloop_reader'):
        export = read_dataloop_export(root, labels=LABELS)
    records = _by_name(export.subsets['train'])
    assert sorted(records) == sorted(expected)
    for name, (boxes, labels) in expected.items():
        assert records[name]['labels'] == labels, name
        assert len(records[name]['boxes']) == len(boxes), name
        for got, want in zip(records[name]['boxes'], boxes):
            assert got == pytest.approx(want, abs=1e-4), name
    assert records['/exif.jpg']['width'] == 40 and records['/exif.jpg']['height'] == 60
    assert (records['/pngjpg.jpg']['width'], records['/pngjpg.jpg']['height']) == (64, 48)
    assert all((r['width'], r['height']) == (W, H) for n, r in records.items() if n not in ('/exif.jpg', '/pngjpg.jpg'))
    assert records['/boxes.jpg']['item_id'] == 'id-boxes.jpg'
    assert records['/poly.png']['item_id'] == 'id-poly'
    assert records['/folder/idonly.jpg']['item_id'] == 'id-only'
    assert records['/sub/dir/bare.png']['item_id'] == 'id-bare'
    for record in records.values():
        assert os.path.isabs(record['image_path']) and os.path.isfile(record['image_path'])
        assert record['image_path'].endswith(record['name'].replace('/', os.sep))
        assert all(isinstance(v, float) for box in record['boxes'] for v in box)
    assert export.labels_found == ['car', 'dog', 'person']
    # a record is plain JSON
    json.dumps(export.subsets)
    # each skipped item is named in a WARNING; one INFO summary per subset
    warnings = '\n'.join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in ('broken', 'missing.jpg', '../../etc/passwd', '/link.jpg', '/video.mp4', '/video2.jpg', '/text.jpg'):
        assert name in warnings, name
    summaries = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and 'dropped' in r.getMessage()]
    assert len(summaries) == 2
    assert "'train'" in summaries[0] and 'path outside data_path: 2' in summaries[0] and "'validation'" in summaries[1]


def test_counts_reported(export_dir):
    root, expected = export_dir
    export = read_dataloop_export(root, labels=LABELS)
    report = export.reports['train']
    assert report.items == 16
    assert report.items_used == 8 and report.negatives == 0
    assert report.boxes_per_label == collections.Counter({'car': 10, 'person': 7})
    assert report.dropped == EXPECTED_DROPPED
    assert sorted(report.skipped_items) == sorted([
        ('/broken', 'unparseable json'), ('/missing.jpg', 'missing image'),
        ('../../etc/passwd', 'path outside data_path'), ('/link.jpg', 'path outside data_path'),
        ('/video.mp4', 'unreadable video'), ('/video2.jpg', 'unreadable video'), ('/text.jpg', 'undecodable image'),
        ('/empty.jpg', 'no usable boxes')])
    val = export.reports['validation']
    assert (val.items, val.items_used, val.boxes_per_label, val.dropped) == (1, 1, {'person': 1}, {})
    text = report.summary()
    assert '16 items, 8 used (0 negatives), 17 boxes (car 10, person 7)' in text
    assert 'type class: 3' in text and 'no usable boxes: 1' in text


def test_background_items_kept_as_negatives(export_dir):
    root, _ = export_dir
    export = read_dataloop_export(root, labels=LABELS, include_background=True)
    report = export.reports['train']
    assert report.items_used == 9 and report.negatives == 1
    assert report.dropped == EXPECTED_DROPPED - collections.Counter({'no usable boxes': 1})
    empty = _by_name(export.subsets['train'])['/empty.jpg']
    assert empty['boxes'] == [] and empty['labels'] == [] and (empty['width'], empty['height']) == (W, H)


def test_no_label_map_keeps_every_label(export_dir):
    root, _ = export_dir
    export = read_dataloop_export(root)
    record = _by_name(export.subsets['train'])['/boxes.jpg']
    assert record['labels'] == ['car', 'car', 'person', 'car', 'person', 'dog']
    assert record['boxes'][-1] == pytest.approx([0, 0, 10, 10])
    assert 'label not in model' not in export.reports['train'].dropped
    assert export.reports['train'].boxes_per_label['dog'] == 1


def test_mask_blobs_match_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((23, 31)) < 0.25
        want, seen = set(), np.zeros_like(mask)
        for r0, c0 in zip(*np.nonzero(mask)):
            if seen[r0, c0]:
                continue
            stack, cells = [(r0, c0)], []
            seen[r0, c0] = True
            while stack:
                r, c = stack.pop()
                cells.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            stack.append((rr, cc))
            rows, cols = zip(*cells)
            want.add((min(cols), min(rows), max(cols) + 1, max(rows) + 1))
        got = mask_blob_boxes(mask)
        assert len(got) == len(want) and set(got) == want
    assert mask_blob_boxes(np.zeros((4, 4), bool)) == []


def test_require_training_subsets(export_dir, tmp_path):
    root, _ = export_dir
    require_training_subsets(read_dataloop_export(root, labels=LABELS))  # the full export is fine
    with pytest.raises(ValueError, match="no box at all in the 'train' subset"):
        require_training_subsets(read_dataloop_export(root, labels=['zebra'], include_background=True))
    with pytest.raises(ValueError, match="no box at all in the 'train' subset"):
        require_training_subsets(read_dataloop_export(root, labels=['zebra']))
    only_train = str(tmp_path / 'only_train')
    _item(only_train, 'train', '/a.jpg', image=_image_bytes(), annotations=[_box('car', (1, 1), (9, 9))])
    with pytest.raises(ValueError, match="no 'validation' subset .*found \\['train'\\]"):
        require_training_subsets(read_dataloop_export(only_train))
    _item(only_train, 'validation', '/b.jpg', annotations=[_box('car', (1, 1), (9, 9))])  # image missing
    with pytest.raises(ValueError, match="no usable item in the 'validation' subset .*missing image: 1"):
        require_training_subsets(read_dataloop_export(only_train))
    with pytest.raises(ValueError, match="no 'train' subset"):
        require_training_subsets(DataloopExport(subsets={}, reports={}, labels_found=[]))
    os.makedirs(tmp_path / 'nothing')
    with pytest.raises(ValueError, match="no 'train' subset"):
        require_training_subsets(read_dataloop_export(str(tmp_path / 'nothing')))
    with pytest.raises(FileNotFoundError):
        read_dataloop_export(str(tmp_path / 'absent'))
    with pytest.raises(TypeError):
        read_dataloop_export(root, labels='car')


def test_index_round_trip_survives_moving_the_folder(export_dir, tmp_path):
    root, _ = export_dir
    export = read_dataloop_export(root, labels=LABELS, include_background=True)
    index = os.path.join(root, 'fasterrcnn_index.json')
    save_index(export, index)
    assert read_dataloop_export(root, labels=LABELS, include_background=True).reports == export.reports  # index ignored
    loaded = load_index(index)
    assert loaded == export
    assert isinstance(loaded.reports['train'].dropped, collections.Counter)
    moved = os.path.realpath(str(tmp_path / 'moved'))
    os.rename(root, moved)
    loaded = load_index(os.path.join(moved, 'fasterrcnn_index.json'))
    for record in loaded.subsets['train']:
        assert record['image_path'].startswith(moved + os.sep) and os.path.isfile(record['image_path'])
    with open(os.path.join(moved, 'fasterrcnn_index.json')) as f:
        assert root not in f.read()
    bogus = tmp_path / 'bogus.json'
    bogus.write_text('{"subsets": {}}')
    with pytest.raises(ValueError, match='not a .* index'):
        load_index(str(bogus))
