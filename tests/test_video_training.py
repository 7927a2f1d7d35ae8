"""Training on annotated videos: per-frame boxes as the SDK reads them, sampled frames decoded once, counts.

The reference for every frame is dtlpy's own `Annotation.from_json(...).frames`;
the clip and its tracks are in `tests/video_items.py`.
"""
import copy
import io
import json
import os

import dtlpy as dl
import numpy as np
import pytest
from PIL import Image

from utils.data import video_frames
from utils.data.annotation_boxes import ImageCanvas, UnusableData, annotation_boxes, clip_box, mask_blob_boxes
from utils.data.data_index import load_index, save_index
from utils.data.dataloop_reader import read_dataloop_export
from utils.data.video_annotations import BOX_TYPES, Track
from test_local_runner import LIGHT_TRAINING
from video_items import FRAMES, HEIGHT, LABELS, TRACKS, WIDTH, box, video_annotation, write_video

STRIDE = 3
FRAME = ImageCanvas(WIDTH, HEIGHT, 10 ** 8)


# ----------------------------------------------------------------------------- the SDK's reading

def sdk_state(annotation, number):
    """dtlpy's frame `number` of an annotation JSON: None where the object is absent or not visible."""
    frames = dl.Annotation.from_json(_json=copy.deepcopy(annotation), is_video=True).frames
    try:
        frame = frames[number]
    except KeyError:
        return None
    return frame if frame.object_visible else None


def sdk_boxes(frame):
    """Unclipped boxes of one SDK frame, from the SDK's own geometry."""
    definition = frame.annotation_definition
    if frame.type == 'binary':
        return mask_blob_boxes(np.asarray(definition.geo) > 0)
    return [(float(definition.left), float(definition.top), float(definition.right), float(definition.bottom))]


def sdk_span(annotation):
    frames = dl.Annotation.from_json(_json=copy.deepcopy(annotation), is_video=True).frames
    return frames.start, frames.end


def sdk_keyframes(annotation):
    frames = dl.Annotation.from_json(_json=copy.deepcopy(annotation), is_video=True).frames
    return {n for n in frames.actual_keys() if frames[n].fixed}


def expected_frames(tracks, stride, include_background, labels=LABELS):
    """{frame: sorted [(label, clipped box)]} of the frames to train on, derived from the SDK alone."""
    tracks = [a for a in tracks if a['type'] in BOX_TYPES]
    spans = [sdk_span(a) for a in tracks]
    keyframes = set().union(*(sdk_keyframes(a) for a in tracks))
    expected = {}
    for number in range(FRAMES):
        if not any(start <= number <= end for start, end in spans):
            continue
        if number % stride and number not in keyframes:
            continue
        states = [s for s in (sdk_state(a, number) for a in tracks) if s is not None]
        if not states and not include_background:
            continue
        boxes = sorted((s.label, tuple(clip_box(b, WIDTH, HEIGHT)[0])) for s in states for b in sdk_boxes(s)
                       if s.label in labels)
        if boxes or include_background:
            expected[number] = boxes
    return expected


def test_every_frame_of_every_track_is_what_the_sdk_reads():
    for annotation in TRACKS:
        track = Track(copy.deepcopy(annotation))
        for number in range(-1, 33):
            ours, sdk = track.annotation_at(number), sdk_state(annotation, number)
            assert (ours is None) == (sdk is None), (annotation['id'], number)
            if ours is None or annotation['type'] not in BOX_TYPES:
                continue
            assert ours['label'] == sdk.label, (annotation['id'], number)
            ours_boxes, sdk_boxes_ = annotation_boxes(ours, FRAME), sdk_boxes(sdk)
            assert len(ours_boxes) == len(sdk_boxes_), (annotation['id'], number)
            for got, want in zip(ours_boxes, sdk_boxes_):
                assert got == pytest.approx(want), (annotation['id'], number)
        assert set(track.keyframes()) == sdk_keyframes(annotation)
    # the scenario holds what it claims: held frames, a disappearance, a late start
    car = Track(TRACKS[0])
    assert car.annotation_at(5)['coordinates'] == car.annotation_at(4)['coordinates']  # held, not interpolated
    assert car.at(9) is None and car.at(12) is None and car.at(13) is not None and car.at(18) is None
    assert Track(TRACKS[1]).at(10) is None and Track(TRACKS[1]).at(11) is not None


def sdk_track(item, object_id, states, end_frame):
    """A track built with the SDK's own AnnotationCollection.add, written out by its to_json."""
    builder = item.annotations.builder()
    for frame, definition, fixed, visible in states:
        builder.add(annotation_definition=definition, object_id=object_id, frame_num=frame, fixed=fixed,
                    object_visible=visible)
    last_frame, last_definition, _, last_visible = states[-1]
    if end_frame > last_frame:  # held to the end: a frame equal to the one before writes no snapshot
        builder.add(annotation_definition=last_definition, object_id=object_id, frame_num=end_frame, fixed=False,
                    object_visible=last_visible)
    (annotation,) = builder.annotations
    return annotation.to_json()


def test_the_tracks_here_are_written_as_the_sdk_writes_them(dataloop_env):
    """TRACKS' car and person, rebuilt with the SDK over the emulator (it needs the item and its labels)."""
    emu = dataloop_env
    project = emu.seed_project('p')
    dataset = emu.seed_dataset(project['id'], 'clips', labels=LABELS)
    seeded = emu.seed_item(dataset['id'], 'clip.avi', b'bytes', mimetype='video/x-msvideo', width=WIDTH,
                           height=HEIGHT, metadata={'fps': 10})
    item = dl.items.get(item_id=seeded['id'])

    def car(x1, y1, x2, y2):
        return dl.Box(left=x1, top=y1, right=x2, bottom=y2, label='car')

    def person(x1, y1, x2, y2):
        return dl.Polygon(geo=np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], float), label='person')

    built = [
        sdk_track(item, 1, [(0, car(10, 10, 30, 30), True, True), (4, car(14, 10, 34, 30), True, True),
                            (6, car(16, 10, 36, 30), False, True), (9, car(16, 10, 36, 30), True, False),
                            (13, car(20, 12, 40, 32), True, True), (14, car(21, 12, 41, 32), False, True)], 17),
        sdk_track(item, 2, [(11, person(50, 20, 60, 50), True, True), (15, person(52, 22, 62, 52), True, True)], 20),
    ]
    for sdk_json, ours_json in zip(built, TRACKS[:2]):
        sdk, ours = Track(sdk_json), Track(ours_json)
        assert (sdk.start, sdk.end, sdk.keyframes()) == (ours.start, ours.end, ours.keyframes())
        for number in range(-1, 25):
            a, b = sdk.annotation_at(number), ours.annotation_at(number)
            assert (a is None) == (b is None), number
            if a is not None:
                assert a['label'] == b['label'] and annotation_boxes(a, FRAME) == annotation_boxes(b, FRAME), number


def test_a_snapshot_changes_the_label_and_bad_frame_numbers_are_refused():
    relabelled = video_annotation(9, 'car', 'box', 0, box(1, 1, 9, 9), 5,
                                  [{'frame': 3, 'fixed': True, 'label': 'person', 'type': 'box',
                                    'objectVisible': True, 'data': box(2, 2, 9, 9)}])
    track = Track(relabelled)
    for number in range(6):
        assert track.annotation_at(number)['label'] == sdk_state(relabelled, number).label
    for first, end in ((-3, 5), (1.5, 5), (float('nan'), 5), ('2', 5), (0, float('inf'))):
        with pytest.raises(UnusableData, match='bad frame number'):
            Track(video_annotation(9, 'car', 'box', first, box(1, 1, 9, 9), end))
    weird = dict(video_annotation(9, 'car', 'box', 0, box(1, 1, 9, 9), 5), metadata=['not', 'a', 'dict'])
    assert Track(weird).annotation_at(0)['label'] == 'car'  # no metadata: an image-like single frame


# ----------------------------------------------------------------------------- a data folder

def write_item(root, subset, remote, annotations, data=None, mimetype='video/x-msvideo', item_id=None):
    """items/<remote> and json/<stem>.json as prepare_data downloads them."""
    if data is not None:
        path = os.path.join(root, subset, 'items', remote.lstrip('/'))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(data, bytes):
            with open(path, 'wb') as f:
                f.write(data)
        else:
            write_video(path)
    json_path = os.path.join(root, subset, 'json', os.path.splitext(remote.lstrip('/'))[0] + '.json')
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, 'w') as f:
        json.dump({'id': item_id or 'id' + remote.replace('/', '-').replace('.', '-'), 'filename': remote,
                   'metadata': {'system': {'mimetype': mimetype, 'width': WIDTH, 'height': HEIGHT}, 'fps': 10},
                   'annotations': annotations}, f)


def image_bytes(size=(WIDTH, HEIGHT)):
    buffer = io.BytesIO()
    Image.new('RGB', size, (90, 120, 150)).save(buffer, format='JPEG')
    return buffer.getvalue()


def image_box(label, x1, y1, x2, y2):
    return {'type': 'box', 'label': label, 'coordinates': box(x1, y1, x2, y2)}


def mixed_export(root):
    """train: an image, the clip, a broken video; validation: the clip and an image."""
    write_item(root, 'train', '/photo.jpg', [image_box('car', 1, 1, 20, 20)], image_bytes(), 'image/jpeg')
    write_item(root, 'train', '/clips/clip.avi', TRACKS, 'video', item_id='clipid')
    write_item(root, 'train', '/broken.mp4', TRACKS[:1], b'\x00\x00\x00\x18ftypmp42 not a video' * 20,
               'video/mp4')
    write_item(root, 'validation', '/clip.avi', TRACKS, 'video', item_id='valclip')
    write_item(root, 'validation', '/photo.jpg', [image_box('person', 5, 5, 30, 40)], image_bytes(), 'image/jpeg')


def frame_records(records):
    return {r['frame']: r for r in records if 'frame' in r}


def test_a_mixed_subset_trains_on_images_and_sampled_frames(tmp_path, caplog):
    root = str(tmp_path / 'data')
    mixed_export(root)
    caplog.set_level('INFO')
    export = read_dataloop_export(root, labels=LABELS, video_frame_stride=STRIDE)

    expected = expected_frames(TRACKS, STRIDE, include_background=False)
    assert 9 not in expected and 12 in expected and 0 in expected  # nothing visible on 9; a keyframe on 0
    records = export.subsets['train']
    assert [r['name'] for r in records if 'frame' not in r] == ['/photo.jpg']
    frames = frame_records(records)
    assert sorted(frames) == sorted(expected)
    for number, record in frames.items():
        assert record['item_id'] == 'clipid' and record['name'] == '/clips/clip.avi'
        assert (record['width'], record['height']) == (WIDTH, HEIGHT)
        got = sorted((label, tuple(b)) for label, b in zip(record['labels'], record['boxes']))
        assert [g[0] for g in got] == [e[0] for e in expected[number]], number
        for (_, got_box), (_, want_box) in zip(got, expected[number]):
            assert got_box == pytest.approx(want_box, abs=1e-4), number
        with Image.open(record['image_path']) as image:  # the frame itself, decoded from the video
            assert image.size == (WIDTH, HEIGHT)
            assert abs(float(np.asarray(image).mean()) - 8 * number % 256) < 3, number

    report = export.reports['train']
    sampled = [n for n in range(FRAMES) if n in expected]
    counts = report.video
    assert (counts.videos, counts.videos_used, counts.frames_sampled, counts.frames_kept, counts.negatives) == \
        (2, 1, len(sampled), len(sampled), 0)
    assert counts.boxes == sum(len(v) for v in expected.values())
    assert report.items == 3 and report.items_used == 2
    assert report.dropped['unreadable video'] == 1 and ('/broken.mp4', 'unreadable video') in report.skipped_items
    assert report.dropped['type point'] == 1
    assert report.dropped['annotation past the end of the video'] == 1
    assert report.dropped['label not in model'] == sum(1 for n in sampled if n <= 2)  # the dog, frames 0..2
    assert report.boxes_per_label['car'] + report.boxes_per_label['person'] == counts.boxes + 1  # + the photo's
    assert frame_records(export.subsets['validation']).keys() == expected.keys()
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("subset 'train'"))
    assert f'videos: 2 read, 1 used, {len(sampled)} frames sampled' in summary and 'unreadable video: 1' in summary
    assert any('broken.mp4' in r.getMessage() and r.levelname == 'WARNING' for r in caplog.records)

    # the index keeps where each frame came from, and the counts
    save_index(export, os.path.join(root, 'index.json'))
    loaded = load_index(os.path.join(root, 'index.json'))
    assert frame_records(loaded.subsets['train']).keys() == frames.keys()
    assert all(os.path.isfile(r['image_path']) for r in loaded.subsets['train'])
    assert loaded.reports['train'].video == counts


def test_include_background_keeps_frames_without_a_visible_object(tmp_path):
    root = str(tmp_path / 'data')
    mixed_export(root)
    export = read_dataloop_export(root, labels=LABELS, include_background=True, video_frame_stride=STRIDE)
    expected = expected_frames(TRACKS, STRIDE, include_background=True)
    frames = frame_records(export.subsets['train'])
    assert sorted(frames) == sorted(expected) and frames[9]['boxes'] == []
    assert export.reports['train'].video.negatives == sum(1 for v in expected.values() if not v) >= 1


def test_frames_are_decoded_once_and_again_only_when_the_plan_changes(tmp_path, monkeypatch):
    root = str(tmp_path / 'data')
    mixed_export(root)
    calls = []
    real = video_frames.read_frames

    def counting(path, wanted, last=None):
        calls.append(os.path.basename(path))
        return real(path, wanted, last)

    monkeypatch.setattr(video_frames, 'read_frames', counting)
    first = read_dataloop_export(root, labels=LABELS, video_frame_stride=STRIDE)
    assert sorted(calls) == ['broken.mp4', 'clip.avi', 'clip.avi']
    calls.clear()
    again = read_dataloop_export(root, labels=LABELS, video_frame_stride=STRIDE)
    assert calls == ['broken.mp4']  # the unreadable one is retried; the clips come from their frames
    assert again.subsets == first.subsets and again.reports['train'].video == first.reports['train'].video
    calls.clear()
    other = read_dataloop_export(root, labels=LABELS, video_frame_stride=2)
    assert sorted(calls) == ['broken.mp4', 'clip.avi', 'clip.avi']
    assert sorted(frame_records(other.subsets['train'])) == sorted(expected_frames(TRACKS, 2, False))


def test_a_long_decoding_says_where_it_is(tmp_path, monkeypatch, caplog):
    root = str(tmp_path / 'data')
    write_item(root, 'train', '/clip.avi', TRACKS, 'video')
    monkeypatch.setattr(video_frames, 'PROGRESS_EVERY_S', -1)  # as if every frame took long
    with caplog.at_level('INFO', logger='utils.data.video_frames'):
        read_dataloop_export(root, labels=LABELS, video_frame_stride=STRIDE)
    lines = [r.getMessage() for r in caplog.records if 'decoding, at frame' in r.getMessage()]
    assert len(lines) == FRAMES and 'clip.avi: decoding, at frame 23 of at most 30' in lines[-1]


def test_a_video_cut_short_keeps_the_frames_before_the_cut(tmp_path):
    root = str(tmp_path / 'data')
    write_item(root, 'train', '/clip.avi', TRACKS, 'video', item_id='cut')
    path = os.path.join(root, 'train', 'items', 'clip.avi')
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:  # a download cut off half way
        f.write(data[:len(data) // 2])
    export = read_dataloop_export(root, labels=LABELS, video_frame_stride=STRIDE)
    frames = frame_records(export.subsets['train'])
    assert frames and max(frames) < FRAMES - 1
    assert all(abs(float(np.asarray(Image.open(r['image_path'])).mean()) - 8 * n) < 3 for n, r in frames.items())
    live = [Track(a) for a in TRACKS if a['type'] in BOX_TYPES]
    assert export.reports['train'].dropped['annotation past the end of the video'] == \
        sum(1 for t in live if t.end > max(frames))


def test_a_video_whose_frames_the_limits_refuse_is_skipped(tmp_path):
    from utils.data.images import ImageLimits
    root = str(tmp_path / 'data')
    mixed_export(root)
    export = read_dataloop_export(root, labels=LABELS, limits=ImageLimits(max_pixels=WIDTH * HEIGHT - 1))
    report = export.reports['train']
    assert report.dropped['image too large'] == 2  # the photo and the clip
    assert ('/clips/clip.avi', 'image too large') in report.skipped_items


# ----------------------------------------------------------------------------- training runs

TINY = {'pretrained': False, 'model_variant': 'fasterrcnn_mobilenet_v3_large_320_fpn', 'device': 'cpu',
        'min_size': 128, 'max_size': 128, 'batch_size': 2, 'num_workers': 0, 'epochs': 1,
        'learning_rate': 0.01, 'warmup_iters': 2, 'video_train_frame_stride': STRIDE,
        'cpu_runtime': 'torch',  # subprocesses too: see conftest.py
        **LIGHT_TRAINING}


def test_local_runner_trains_and_validates_on_videos(tmp_path):
    """`python -m local_runner train` on a download holding videos with their JSONs, as a user runs it."""
    import subprocess
    import sys
    root = str(tmp_path / 'data')
    write_item(root, 'train', '/photo.jpg', [image_box('car', 1, 1, 20, 20)], image_bytes(), 'image/jpeg')
    write_item(root, 'train', '/clips/clip.avi', TRACKS, 'video', item_id='clipid')
    write_item(root, 'train', '/broken.mp4', TRACKS[:1], b'not a video' * 50, 'video/mp4')
    write_item(root, 'validation', '/clip.avi', TRACKS, 'video', item_id='valclip')
    config = tmp_path / 'tiny.json'
    config.write_text(json.dumps(TINY))
    output = tmp_path / 'model'
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, '-m', 'local_runner', 'train', '--data', root, '--output', str(output),
                          '--config', str(config)], cwd=repo, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    frames = len(expected_frames(TRACKS, STRIDE, include_background=False))
    assert f'videos: 2 read, 1 used, {frames} frames sampled' in run.stderr, run.stderr[-3000:]
    assert 'skipping item /broken.mp4 (unreadable video)' in run.stderr  # named, and the rest trained
    with open(output / 'model.json') as f:
        description = json.load(f)
    assert description['labels'] == ['car', 'dog', 'person']  # every label found, the dog's included
    assert set(description['training']['best_metrics']) >= {'mAP', 'mAP_50'}  # validated on the clip's frames
    index = load_index(os.path.join(root, 'fasterrcnn_index.json'))
    assert {r['frame'] for r in index.subsets['validation']} == set(expected_frames(TRACKS, STRIDE, False,
                                                                                    ['car', 'dog', 'person']))


def test_train_model_over_the_platform_with_a_video_in_the_train_subset(dataloop_env, tmp_path, monkeypatch):
    """The SDK's train_model (prepare_data's download, convert_from_dtlpy, train, upload) over the emulator."""
    from dtlpy.services import service_defaults

    from fasterrcnn_adapter import INDEX_FILENAME, FasterRCNNAdapter
    from utils.platform.local_model import manifest_model_block
    emu = dataloop_env
    project = emu.seed_project('video-project')
    dataset = emu.seed_dataset(project['id'], 'clips', labels=LABELS)
    clip = write_video(tmp_path / 'clip.avi').read_bytes()
    video = emu.seed_item(dataset['id'], 'clip.avi', clip, dir='/train', annotations=TRACKS,
                          mimetype='video/x-msvideo', width=WIDTH, height=HEIGHT, metadata={'fps': 10})
    emu.seed_item(dataset['id'], 'photo.jpg', image_bytes(), dir='/train', annotations=[image_box('car', 1, 1, 20, 20)])
    emu.seed_item(dataset['id'], 'photo.jpg', image_bytes(), dir='/validation',
                  annotations=[image_box('person', 5, 5, 30, 40), image_box('car', 40, 10, 80, 50)])
    held_out = emu.seed_item(dataset['id'], 'clip.avi', clip, dir='/validation', annotations=TRACKS,
                             mimetype='video/x-msvideo', width=WIDTH, height=HEIGHT, metadata={'fps': 10})
    configuration = dict(manifest_model_block()['configuration'], **TINY)
    model = emu.seed_model(project['id'], dataset['id'], 'video-frcnn', configuration=configuration, labels=LABELS,
                           subsets={'train': emu.dir_filter('/train'), 'validation': emu.dir_filter('/validation')})
    (tmp_path / 'pod').mkdir()
    monkeypatch.chdir(tmp_path / 'pod')
    monkeypatch.setattr(service_defaults, 'DATALOOP_PATH', str(tmp_path / 'dataloop'))

    FasterRCNNAdapter().train_model(dl.models.get(model_id=model['id']))

    assert emu.models[model['id']]['status'] == 'trained'
    assert emu.missing == [] and emu.errors == []
    data_path = tmp_path / 'pod' / 'tmp' / model['id'] / 'datasets' / dataset['id']
    index = load_index(str(data_path / INDEX_FILENAME))
    frames = frame_records(index.subsets['train'])
    expected = expected_frames(TRACKS, STRIDE, include_background=False)
    assert sorted(frames) == sorted(expected)
    assert {r['item_id'] for r in frames.values()} == {video['id']}
    for number, record in frames.items():
        assert sorted(record['labels']) == [label for label, _ in expected[number]], number
    assert index.reports['train'].video.frames_kept == len(expected)
    validation = frame_records(index.subsets['validation'])  # mAP is computed over these frames and the photo
    assert sorted(validation) == sorted(expected) and {r['item_id'] for r in validation.values()} == {held_out['id']}
    assert any(s['figure'] == 'validation' for s in emu.metrics)
