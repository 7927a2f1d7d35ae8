"""Video items in prediction: frames streamed through the images' forward pass, tracked, uploaded as the
platform stores video annotations, beside images in one call.

Platform flows use the real dtlpy SDK over the emulator (`tests/dataloop_emulator.py`), with videos
written here by OpenCV (MJPEG AVI). The network has random weights with `conf_threshold` 0, so it
always returns boxes, and the same boxes for the same pixels: a still video gives every object the
same box on every frame, which the tracker must join into one annotation. The tracker's following
of a moving object is checked on its own, with the real ByteTrack, in the first tests.
"""
import copy
import json
import math
import os
import subprocess
import sys
import tempfile

import cv2
import dtlpy as dl
import numpy as np
import pytest
from dtlpy.services import service_defaults

from fasterrcnn_adapter import FasterRCNNAdapter
from utils.core.label_map import configuration_entries
from utils.data.video import read_frames
from utils.inference.tracking import FrameTracker, Track
from utils.inference.video import VideoDetections, VideoEntry
from utils.platform.local_model import local_model, manifest_model_block
from utils.platform.video_annotations import tracks_to_collection, tracks_to_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ['circle', 'square', 'triangle']
TINY = {'model_variant': 'fasterrcnn_mobilenet_v3_large_320_fpn', 'pretrained': False, 'device': 'cpu',
        'min_size': 96, 'max_size': 160, 'batch_size': 2, 'conf_threshold': 0.0, 'max_detections': 3,
        'video_track_threshold': 0.1}
FRAMES, STRIDE, FPS = 13, 3, 10.0


def write_video(path, frames=FRAMES, size=(160, 96), fps=FPS, still=True, seed=0):
    """An MJPEG AVI of textured frames: the same frame repeated (`still`), or a new texture every frame."""
    width, height = size
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), fps, (width, height))
    assert writer.isOpened()
    frame = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    for _ in range(frames):
        writer.write(frame)
        if not still:
            frame = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    writer.release()
    return path


def png(seed=1, size=(80, 60)):
    buffer = cv2.imencode('.png', np.random.default_rng(seed).integers(0, 255, size[::-1] + (3,), dtype=np.uint8))[1]
    return buffer.tobytes()


# ----------------------------------------------------------------------------- the tracker alone

def moving_box(frame, speed=6.0, jitter=0.0, rng=None):
    x = 10 + speed * frame + (rng.normal(0, jitter) if rng is not None else 0.0)
    return [x, 20.0, x + 40, 60.0]


def test_bytetrack_follows_a_moving_object_as_one_track_and_keeps_strays():
    rng = np.random.default_rng(0)
    tracker = FrameTracker('bytetrack', fps=30, stride=STRIDE, threshold=0.5, buffer_s=1.0)
    frames = list(range(0, 60, STRIDE))
    for frame in frames:
        rows = [moving_box(frame / STRIDE, jitter=1.0, rng=rng) + [0.9, 1],  # an object moving right
                [300.0 - frame, 200.0, 340.0 - frame, 240.0, 0.8, 2]]  # another, of another label, moving left
        if frame == 30:
            rows.append([150.0, 150.0, 160.0, 160.0, 0.3, 1])  # a weak stray box no track matches
        tracker.update(frame, rows)
    tracks = tracker.tracks()
    mover, other, stray = (next(t for t in tracks if t.label_id == 1 and len(t.boxes) > 1),
                           next(t for t in tracks if t.label_id == 2),
                           next(t for t in tracks if t.label_id == 1 and len(t.boxes) == 1))
    assert len(tracks) == 3  # never dropped, never split
    assert [frame for frame, _ in mover.boxes] == frames and [frame for frame, _ in other.boxes] == frames
    assert stray.boxes == [(30, [150.0, 150.0, 160.0, 160.0, 0.3])]
    assert len({t.object_id for t in tracks}) == 3 and math.isclose(mover.confidence, 0.9, rel_tol=1e-6)


def test_a_track_survives_a_short_miss_and_none_makes_every_box_its_own():
    tracker = FrameTracker('bytetrack', fps=10, stride=1, threshold=0.5, buffer_s=1.0)
    for frame in range(8):
        tracker.update(frame, [] if frame in (3, 4) else [moving_box(frame, speed=2) + [0.9, 1]])
    (track,) = tracker.tracks()
    assert [frame for frame, _ in track.boxes] == [0, 1, 2, 5, 6, 7]
    untracked = FrameTracker('none')
    for frame in range(3):
        untracked.update(frame, [moving_box(frame) + [0.9, 1], [0, 0, 5, 5, 0.7, 1]])
    assert [[f for f, _ in t.boxes] for t in untracked.tracks()] == [[0], [0], [1], [1], [2], [2]]


# ----------------------------------------------------------------------------- platform flows

@pytest.fixture
def clips(dataloop_env, tmp_path, monkeypatch):
    """A project and dataset on the emulator; `service(name, **configuration)` a deployed adapter for a new model."""
    emu = dataloop_env
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(service_defaults, 'DATALOOP_PATH', str(tmp_path / 'dataloop'))
    (tmp_path / 'tmp').mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))  # where videos are downloaded to
    project = emu.seed_project('video-project')
    dataset = emu.seed_dataset(project['id'], 'clips', labels=LABELS)

    def service(name, **configuration):
        settings = manifest_model_block()['configuration']
        settings.update(TINY, **configuration_entries({i + 1: label for i, label in enumerate(LABELS)}))
        settings.update(configuration)
        model = emu.seed_model(project['id'], dataset['id'], name, configuration=settings, labels=LABELS)
        return FasterRCNNAdapter(dl.models.get(model_id=model['id'])), model

    def seed(name, data, **kwargs):
        return emu.seed_item(dataset['id'], name, data, dir='/clips', **kwargs)
    return dict(emu=emu, dataset=dataset, service=service, seed=seed, tmp=tmp_path)


def downloads_left(clips):
    return [name for name in os.listdir(clips['tmp'] / 'tmp') if name.startswith('fasterrcnn-video-')]


def made_by(emu, item_id, model_name):
    return [a for a in emu.item_annotations(item_id)
            if (a['metadata'].get('system') or {}).get('model', {}).get('name') == model_name]


def first_boxes(annotations):
    return sorted((a['label'],) + tuple(round(a['coordinates'][i][k], 2) for i in (0, 1) for k in 'xy')
                  for a in annotations)


def test_video_item_tracks_land_on_true_frames_parse_back_and_are_replaced(clips):
    emu = clips['emu']
    path = write_video(clips['tmp'] / 'clip.avi')
    # the item's metadata is wrong on purpose: frames and rate come from the file
    video = clips['seed']('clip.avi', path.read_bytes(), metadata={'fps': 99, 'system': {'ffmpeg': {'nb_frames': 2}}})
    assert video['metadata']['system']['mimetype'].startswith('video/')
    service, model = clips['service']('tracker', video_frame_stride=STRIDE)
    item = dl.items.get(item_id=video['id'])

    service.predict_items([item])
    made = made_by(emu, video['id'], 'tracker')
    # the frame as an image through the same network: the boxes of every predicted frame
    frame0 = next(frame for _, frame in read_frames(path))
    expected = service.predict([frame0])[0].to_json()['annotations']
    assert made and len(made) == len(expected)  # one annotation per object, not one per frame
    assert first_boxes(made) == first_boxes(expected)
    predicted = list(range(0, FRAMES, STRIDE))  # 0, 3, 6, 9, 12: true frame numbers, the last frame reached
    for annotation in made:
        system = annotation['metadata']['system']
        assert system['frame'] == 0 and system['endFrame'] == predicted[-1]
        assert [s['frame'] for s in system['snapshots_']] == predicted[1:]
        assert all(s['fixed'] and s['objectVisible'] and s['data'] == annotation['coordinates']
                   for s in system['snapshots_'])
        assert system['model']['model_id'] == model['id'] and 0 <= system['model']['confidence'] <= 1
    assert len({a['metadata']['system']['objectId'] for a in made}) == len(made)

    # what the platform's readers see: every predicted frame, the box held in between
    parsed = dl.AnnotationCollection.from_json(_json=made, item=item)
    assert len(parsed.annotations) == len(made)
    for annotation in parsed.annotations:
        assert sorted(annotation.frames.actual_keys()) == predicted
        held, snapshot = annotation.frames[4], annotation.frames[3]
        assert (held.left, held.top, held.right, held.bottom) == (snapshot.left, snapshot.top, snapshot.right,
                                                                  snapshot.bottom)

    assert downloads_left(clips) == []
    # again: replaced, not doubled
    service.predict_items([item])
    again = made_by(emu, video['id'], 'tracker')
    assert len(again) == len(made) and not {a['id'] for a in again} & {a['id'] for a in made}

    # no tracker: each box its own one-frame annotation
    untracked, _ = clips['service']('untracked', video_frame_stride=STRIDE, video_tracker='none')
    untracked.predict_items([item])
    single = made_by(emu, video['id'], 'untracked')
    assert len(single) == len(made) * len(predicted)
    assert sorted(a['metadata']['system']['frame'] for a in single) == sorted(predicted * len(made))
    assert all(a['metadata']['system']['endFrame'] == a['metadata']['system']['frame']
               and a['metadata']['system']['snapshots_'] == [] for a in single)
    assert emu.missing == [] and emu.errors == []


def test_a_mixed_call_and_a_broken_video_beside_good_items(clips):
    emu = clips['emu']
    service, model = clips['service']('mixed')  # batch_size 2: videos share batches with images
    good_video = clips['seed']('walk.avi', write_video(clips['tmp'] / 'walk.avi', frames=5).read_bytes())
    broken = clips['seed']('broken.mp4', b'\x00\x00\x00\x18ftypmp42' + b'not really a video' * 50)
    images = [clips['seed'](f'still{k}.png', png(k)) for k in range(2)]
    assert broken['metadata']['system']['mimetype'] == 'video/mp4'
    items = [dl.items.get(item_id=i['id']) for i in (images[0], broken, good_video, images[1])]

    with pytest.raises(ValueError) as err:
        service.predict_items(items)
    message = str(err.value)
    assert 'broken.mp4' in message and broken['id'] in message and message.startswith('1 of 4 items')
    assert not any(i['id'] in message for i in (good_video, *images))
    for image in images:  # images as images: one-frame-less boxes
        made = made_by(emu, image['id'], 'mixed')
        assert made and all('frame' not in a['metadata']['system'] for a in made)
    tracked = made_by(emu, good_video['id'], 'mixed')
    assert tracked and all(a['metadata']['system']['endFrame'] == 4 for a in tracked)
    assert made_by(emu, broken['id'], 'mixed') == []
    assert downloads_left(clips) == []  # each video's download removed once predicted
    assert emu.missing == [] and emu.errors == []


def test_embed_items_gives_a_video_the_mean_of_its_sampled_frames(clips):
    emu = clips['emu']
    service, _ = clips['service']('embedder')
    path = write_video(clips['tmp'] / 'varied.avi', frames=9, still=False)
    video = clips['seed']('varied.avi', path.read_bytes())
    image = clips['seed']('still.png', png(3))
    service.embed_items([dl.items.get(item_id=video['id']), dl.items.get(item_id=image['id'])])
    vectors = {f['entityId']: np.asarray(f['value']) for f in emu.features.values()}
    assert set(vectors) == {video['id'], image['id']}
    frames = [frame for number, frame in read_frames(path) if number in (0, 3, 5, 8)]  # 4 evenly over 0..8
    mean = np.mean(service.embed(frames), axis=0)
    assert np.allclose(vectors[video['id']], mean / np.linalg.norm(mean), atol=1e-5)


def test_the_uploaded_json_is_what_the_sdk_builds(clips):
    """`tracks_to_json` (what predict_items uploads and the local runner writes) against the SDK's own objects,
    stamped as predict_items does."""
    path = write_video(clips['tmp'] / 'json.avi', frames=10)
    video = clips['seed']('json.avi', path.read_bytes())
    service, model = clips['service']('json')
    item = dl.items.get(item_id=video['id'])
    tracks = [Track(1, 1, [(0, [1, 2, 30, 40, 0.9]), (2, [3, 2, 32, 40, 0.7]), (8, [9, 2, 38, 40, 0.8])]),  # a gap
              Track(2, 3, [(4, [50, 5, 70, 25, 0.6])])]
    found = VideoDetections(VideoEntry(str(path), 'json.avi', item=item), tracks, frames_predicted=5, stride=2)
    labels = {1: 'circle', 2: 'square', 3: 'triangle'}
    collection = tracks_to_collection(found, labels, model['name'], model['id'])
    service._update_predictions_metadata(item, collection)
    sdk = collection.to_json()['annotations']
    ours = tracks_to_json(found, labels, model['name'], model['id'])
    for mine, theirs in zip(ours, sdk):
        for key in theirs:
            assert mine.get(key) == theirs[key], (key, json.dumps(mine.get(key)), json.dumps(theirs[key]))
    assert ours == sdk  # what predict_items uploads is what the SDK's own objects would upload
    hidden = [s for s in ours[0]['metadata']['system']['snapshots_'] if not s['objectVisible']]
    assert [s['frame'] for s in hidden] == [4]  # the first missed predicted frame after frame 2


# ----------------------------------------------------------------------------- local runner

def test_local_runner_predicts_on_a_video(tmp_path):
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model(configuration=copy.deepcopy(TINY), labels=LABELS)
    adapter.load('/nonexistent')
    adapter.save(str(tmp_path / 'model'))  # a self-describing checkpoint: what `predict --model` reads
    inputs = tmp_path / 'inputs'
    inputs.mkdir()
    write_video(inputs / 'clip.avi')
    (inputs / 'still.png').write_bytes(png())
    overrides = {'video_frame_stride': 3, 'max_detections': 3, 'video_track_threshold': TINY['video_track_threshold'],
                 'cpu_runtime': 'torch'}  # subprocesses too: see conftest.py
    (tmp_path / 'config.json').write_text(json.dumps(overrides))
    run = subprocess.run([sys.executable, '-m', 'local_runner', 'predict', '--model', str(tmp_path / 'model'),
                          '--input', str(inputs), '--output', str(tmp_path / 'out'), '--conf', '0',
                          '--config', str(tmp_path / 'config.json')],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith('1 image(s), 1 video(s)'), run.stdout
    with open(tmp_path / 'out' / 'clip.json') as f:
        item = json.load(f)
    assert item['metadata']['system']['mimetype'].startswith('video/') and item['metadata']['fps'] == FPS
    annotations = item['annotations']
    assert annotations and all(a['metadata']['system']['frame'] == 0 and a['metadata']['system']['endFrame'] == 12
                               and [s['frame'] for s in a['metadata']['system']['snapshots_']] == [3, 6, 9, 12]
                               for a in annotations)
    sheet = cv2.imread(str(tmp_path / 'out' / 'clip.png'))
    assert sheet is not None and sheet.shape[1] == 4 * 320  # 5 predicted frames: a row of 4, then 1
    assert (tmp_path / 'out' / 'still.json').is_file() and (tmp_path / 'out' / 'still.png').is_file()
