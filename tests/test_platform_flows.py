"""The adapter's platform entry points, driven the way the platform drives them.

`FasterRCNNAdapter()` is given a `dl.Model` fetched with the real dtlpy SDK,
which talks HTTP to the in-memory emulator (`tests/dataloop_emulator.py`), and
the inherited SDK functions are called as a deployed service or a training
pod calls them: `train_model`, `predict_items`, `predict_dataset`,
`evaluate_model`. Assertions read the emulator's state (what the platform
would hold afterwards), not the adapter's internals.

A "pod" is a fresh working directory plus a fresh ``DATALOOP_PATH`` (where
`load_from_model` downloads the model's artifacts), so a retried run starts
with nothing on disk but what the platform gives it.
"""
import collections
import io
import logging
import math
import os
import signal
import subprocess
import sys
import time

import dtlpy as dl
import numpy as np
import pytest
import torch
from dtlpy.services import service_defaults
from PIL import Image

from fasterrcnn_adapter import INDEX_FILENAME, FasterRCNNAdapter
from test_local_runner import LIGHT_TRAINING
from utils.training import engine
from utils.data.data_index import load_index
from utils.platform.local_model import manifest_model_block
from utils.modeling.checkpoints import load_checkpoint
from utils.data.synthetic import render_item

LABELS = ['circle', 'square', 'triangle']
SHAPE_MAP = {1: 'circle', 2: 'square', 3: 'triangle'}
SIZE = 128
TINY = {'model_variant': 'fasterrcnn_mobilenet_v3_large_320_fpn', 'pretrained': False, 'device': 'cpu',
        'min_size': SIZE, 'max_size': SIZE, 'epochs': 2, 'batch_size': 2, 'num_workers': 0,
        'learning_rate': 0.01, 'warmup_iters': 2, 'cpu_runtime': 'torch',  # subprocesses too: see conftest.py
        **LIGHT_TRAINING}  # the tests that train check what a run does, not what it learns
LOSS_LEGENDS = {'loss', 'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
VALIDATION_LEGENDS = {'mAP@[.5:.95]', 'mAP@.5', 'mAP@.75', 'AR@100'}


# ----------------------------------------------------------------------------- helpers

def model_configuration(shape_map=False, **overrides):
    """The manifest's configuration (COCO label map included) with the tiny, fast settings on top."""
    configuration = manifest_model_block()['configuration']
    configuration.update(TINY)
    if shape_map:  # a model already fine-tuned on the shapes
        configuration['id_to_label_map'] = {str(k): v for k, v in SHAPE_MAP.items()}
        configuration['label_to_id_map'] = {v: k for k, v in SHAPE_MAP.items()}
    configuration.update(overrides)
    return configuration


def encode(image, fmt, **params):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def synthetic(seed, index, segment_fraction=0.5):
    """One 128x128 JPEG of shapes and its platform annotations (boxes and polygons)."""
    rng = np.random.default_rng([seed, index])
    image, annotations = render_item(rng, (SIZE, SIZE), LABELS, max_objects=3, segment_fraction=segment_fraction)
    for annotation in annotations:
        annotation.pop('id')  # the platform gives ids
    return encode(image, 'JPEG', quality=90), annotations


def other_model_box(name='other-model'):
    """An annotation another model made: training must ignore it and predicting must keep it."""
    return {'type': 'box', 'label': 'circle', 'attributes': [],
            'coordinates': [{'x': 3, 'y': 3, 'z': 0}, {'x': 20, 'y': 20, 'z': 0}],
            'metadata': {'system': {'model': {'name': name, 'model_id': 'x', 'confidence': 0.9}},
                         'user': {'model': {'name': name, 'model_id': 'x', 'confidence': 0.9}}}}


def expected_box(annotation):
    """xyxy of a seeded box or polygon, rounded (the reader's job, computed here from the JSON)."""
    if annotation['type'] == 'box':
        (a, b) = annotation['coordinates']
        xs, ys = (a['x'], b['x']), (a['y'], b['y'])
    else:
        points = [p for ring in annotation['coordinates'] for p in ring]
        xs, ys = [p['x'] for p in points], [p['y'] for p in points]
    return tuple(round(v, 1) for v in (min(xs), min(ys), max(xs), max(ys)))


def made_by(emu, item_id, model_name):
    return [a for a in emu.item_annotations(item_id)
            if (a['metadata'].get('system') or {}).get('model', {}).get('name') == model_name]


def patches(emu, start=0):
    return [r for r in emu.requests[start:] if r.method == 'PATCH' and r.path.startswith('/api/v1/ml/models/')]


def artifact_files(emu, project_id, model_name):
    """{relative path: bytes} of the model's artifacts in the project's Binaries dataset."""
    prefix = '/artifacts/models/{}/'.format(model_name)
    binaries = emu.binaries_dataset(project_id)
    return {item['filename'][len(prefix):]: emu.blobs[item['id']]
            for item in emu.find_items(binaries['id']) if item['filename'].startswith(prefix)}


def listed_artifacts(emu, model_id):
    """The model entity's artifact list (what the platform shows), as remote paths."""
    items = [emu.items.get(a['itemId']) for a in emu.models[model_id]['artifacts']]
    return {item['filename'] if item else '<deleted item>' for item in items}


def checkpoint_from(data, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(data)
    return load_checkpoint(str(path))


def metric_points(emu, model_id):
    """{(figure, legend): [x, ...]} in publishing order."""
    points = collections.defaultdict(list)
    for sample in emu.metrics:
        assert sample['modelId'] == model_id
        assert math.isfinite(sample['data']['y']), sample
        points[(sample['figure'], sample['legend'])].append(sample['data']['x'])
    return dict(points)


def assert_no_gaps(emu):
    assert emu.missing == [], 'the SDK called endpoints the emulator lacks: {}'.format(emu.missing)
    assert emu.errors == [], emu.errors[0]


class RecordingProgress(dl.Progress):
    """What a FaaS execution's progress bar receives."""

    def __init__(self):
        self.updates = []

    def update(self, status=None, progress=0, message=None, output=None, duration=None, action=None):
        self.updates.append((progress, message))


@pytest.fixture
def pod(tmp_path, monkeypatch):
    """`pod(name)` moves the test into a fresh pod: its own working dir and DATALOOP_PATH."""
    def enter(name):
        root = tmp_path / name
        (root / 'work').mkdir(parents=True)
        monkeypatch.chdir(root / 'work')  # train_model writes to the relative tmp/<model id>
        monkeypatch.setattr(service_defaults, 'DATALOOP_PATH', str(root / 'dataloop'))
        return root / 'work'
    return enter


@pytest.fixture
def platform(dataloop_env):
    """A project, a dataset of synthetic shapes (4 train, 2 validation; boxes and polygons)."""
    emu = dataloop_env
    project = emu.seed_project('shapes-project')
    dataset = emu.seed_dataset(project['id'], 'shapes', labels=LABELS)
    seeded = {}
    for subset, count, seed in (('train', 4, 11), ('validation', 2, 12)):
        for index in range(count):
            data, annotations = synthetic(seed, index)
            extra = [other_model_box()] if index == 0 else []
            item = emu.seed_item(dataset['id'], '{}_{}.jpg'.format(subset, index), data, dir='/' + subset,
                                 annotations=annotations + extra)
            seeded[item['id']] = annotations
    types = collections.Counter(a['type'] for anns in seeded.values() for a in anns)
    assert types['segment'] >= 2 and types['box'] >= 2, types  # both paths are exercised

    def add_model(name, **configuration):
        return emu.seed_model(project['id'], dataset['id'], name, configuration=model_configuration(**configuration),
                              labels=LABELS, subsets={'train': emu.dir_filter('/train'),
                                                      'validation': emu.dir_filter('/validation')})
    return dict(emu=emu, project=project, dataset=dataset, seeded=seeded, add_model=add_model)


# ----------------------------------------------------------------------------- training

def test_train_model_trains_uploads_publishes_and_reloads(platform, pod, tmp_path):
    emu = platform['emu']
    seeded_model = platform['add_model']('shapes-frcnn')  # the manifest's COCO label map, to be rewritten
    assert len(seeded_model['configuration']['id_to_label_map']) == 80
    work = pod('pod-1')
    progress = RecordingProgress()

    adapter = FasterRCNNAdapter()
    returned = adapter.train_model(dl.models.get(model_id=seeded_model['id']), progress=progress)

    stored = emu.models[seeded_model['id']]
    assert stored['status'] == 'trained' and returned.status == 'trained'
    # the label map was rewritten to the model's labels, ids 1..K, as the SDK stores JSON (string keys)
    assert stored['configuration']['id_to_label_map'] == {'1': 'circle', '2': 'square', '3': 'triangle'}
    assert stored['configuration']['label_to_id_map'] == {'circle': 1, 'square': 2, 'triangle': 3}
    assert dl.models.get(model_id=seeded_model['id']).id_to_label_map == SHAPE_MAP

    # artifacts: the best weights, self-describing, and no resumable last.pth of a finished run
    artifacts = artifact_files(emu, platform['project']['id'], 'shapes-frcnn')
    assert 'weights/best.pth' in artifacts and 'weights/last.pth' not in artifacts, sorted(artifacts)
    assert listed_artifacts(emu, seeded_model['id']) == {'/artifacts/models/shapes-frcnn/' + p for p in artifacts}
    best = checkpoint_from(artifacts['weights/best.pth'], tmp_path, 'best.pth')
    assert best['id_to_label_map'] == SHAPE_MAP
    assert best['model_variant'] == TINY['model_variant'] and best['num_classes'] == 4

    # metrics: one point per epoch and legend, x = 1..epochs
    points = metric_points(emu, seeded_model['id'])
    assert {legend for figure, legend in points if figure == 'training loss'} == LOSS_LEGENDS
    assert {legend for figure, legend in points if figure == 'validation'} == VALIDATION_LEGENDS
    assert all(xs == [1, 2] for xs in points.values()), points
    assert {s['datasetId'] for s in emu.metrics} == {platform['dataset']['id']}

    # the platform's progress bar saw each epoch end
    assert [p for p, m in progress.updates if m and m.startswith('finished epoch')] == [50, 100]

    # the data trained on: boxes AND polygons, the other model's annotation left out
    index = load_index(str(work / 'tmp' / seeded_model['id'] / 'datasets' / platform['dataset']['id'] / INDEX_FILENAME))
    got = {}
    for subset in ('train', 'validation'):
        for record in index.subsets[subset]:
            got[record['item_id']] = sorted((label, tuple(round(v, 1) for v in box))
                                            for label, box in zip(record['labels'], record['boxes']))
    expected = {item_id: sorted((a['label'], expected_box(a)) for a in annotations)
                for item_id, annotations in platform['seeded'].items()}
    assert got == expected

    # a new adapter built from the updated model (a deployed service) runs the trained weights
    pod('service')
    service_model = dl.models.get(model_id=seeded_model['id'])
    service = FasterRCNNAdapter(service_model)
    state = service.model.state_dict()
    assert state.keys() == best['state_dict'].keys()
    assert all(torch.equal(state[k], best['state_dict'][k]) for k in state)
    assert service.id_to_label_map() == SHAPE_MAP
    service.model_entity.configuration['conf_threshold'] = 0.0  # a local override: a plain dict, no PATCH
    item = dl.items.get(item_id=next(iter(platform['seeded'])))
    start = len(emu.requests)
    _, annotations = service.predict_items([item])
    assert annotations and {a.label for a in annotations} <= set(LABELS)
    assert patches(emu, start) == []
    assert_no_gaps(emu)


class FailingLoader:
    """Yields `good` batches of a DataLoader, then fails the way a killed worker or an OOM does."""

    def __init__(self, loader, good):
        self.loader, self.good = loader, good

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for k, batch in enumerate(self.loader):
            if k == self.good:
                raise RuntimeError('injected failure: DataLoader worker (pid 4242) is killed by signal: Killed')
            yield batch


def test_failed_run_uploads_its_checkpoint_and_a_new_pod_resumes(platform, pod, tmp_path, monkeypatch, caplog):
    emu = platform['emu']
    model_id = platform['add_model']('resumable')['id']
    real_train_one_epoch = engine.train_one_epoch
    calls, fail = [], [True]

    def train_one_epoch(model, optimizer, data_loader, device, epoch, **kwargs):
        calls.append(epoch)
        if fail[0] and epoch == 1:  # epoch 2 dies after one optimizer step
            data_loader = FailingLoader(data_loader, good=1)
            # and a temporary that a write killed in an earlier run left (fit cleaned the folder before)
            stale = os.path.join('tmp', model_id, 'output', 'weights', '.tmp-k1ll3d00.pth')
            with open(stale, 'wb') as f:
                f.write(b'half a checkpoint')
            os.utime(stale, (time.time() - 3600,) * 2)
        return real_train_one_epoch(model, optimizer, data_loader, device, epoch, **kwargs)

    monkeypatch.setattr(engine, 'train_one_epoch', train_one_epoch)

    # pod 1: epoch 1 completes, epoch 2 fails
    pod('pod-1')
    with pytest.raises(RuntimeError, match='injected failure'):
        FasterRCNNAdapter().train_model(dl.models.get(model_id=model_id))
    assert calls == [0, 1]
    assert emu.models[model_id]['status'] != 'trained'
    artifacts = artifact_files(emu, platform['project']['id'], 'resumable')
    assert {'weights/last.pth', 'weights/best.pth'} <= set(artifacts), sorted(artifacts)
    assert not any('.tmp-' in path for path in artifacts), sorted(artifacts)  # temporaries are never shipped
    last = checkpoint_from(artifacts['weights/last.pth'], tmp_path, 'last-1.pth')
    assert last['epoch'] == 0 and len(last['history']) == 1 and 'optimizer' in last
    best = checkpoint_from(artifacts['weights/best.pth'], tmp_path, 'best-1.pth')
    # the uploaded best.pth is epoch 1's (the only finished one), not the half-trained weights of epoch 2
    assert all(torch.equal(best['state_dict'][k], last['state_dict'][k]) for k in last['state_dict'])
    assert all(xs == [1] for xs in metric_points(emu, model_id).values())

    # pod 2: a retry on a fresh machine resumes at epoch 2 from the uploaded checkpoint
    fail[0] = False
    calls.clear()
    pod('pod-2')
    caplog.set_level(logging.INFO)
    returned = FasterRCNNAdapter().train_model(dl.models.get(model_id=model_id))
    assert calls == [1]
    assert 'continuing at epoch 2/2' in caplog.text
    assert emu.models[model_id]['status'] == 'trained' and returned.status == 'trained'
    points = metric_points(emu, model_id)
    assert len(points) == len(LOSS_LEGENDS) + len(VALIDATION_LEGENDS)
    assert all(xs == [1, 2] for xs in points.values()), points
    artifacts = artifact_files(emu, platform['project']['id'], 'resumable')
    assert 'weights/last.pth' not in artifacts, sorted(artifacts)  # a finished run leaves nothing to resume
    assert listed_artifacts(emu, model_id) == {'/artifacts/models/resumable/' + p for p in artifacts}
    final = checkpoint_from(artifacts['weights/best.pth'], tmp_path, 'best-2.pth')
    assert final['id_to_label_map'] == SHAPE_MAP
    assert_no_gaps(emu)


def wait_for_artifact(emu, model_id, remote, process, log_path, timeout_s=600):
    """Poll until `remote` is among the model's artifacts; fail if the process ends first.

    Stored is not enough: `load_from_model` downloads what the model's artifact
    list names, which `artifacts.upload` PATCHes after storing the file.
    """
    deadline = time.monotonic() + timeout_s
    while remote not in listed_artifacts(emu, model_id):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError('{} never reached the platform (exit code {}):\n{}'.format(
                remote, process.poll(), open(log_path).read()[-5000:]))
        time.sleep(0.02)


def test_killed_training_pod_is_rerun_and_resumes_from_checkpoints_uploaded_during_training(
        platform, pod, tmp_path, caplog):
    """A pod reset (SIGKILL: no exception, no save-on-failure) loses at most the upload interval.

    The platform never answers pod 1's metrics of epoch 2, so pod 1 is still in its second epoch (training it,
    or held at its end) when epoch 1's checkpoints reach the platform and it is killed, however fast it runs."""
    emu, project_id = platform['emu'], platform['project']['id']
    epochs = 3
    model_id = platform['add_model']('preempted', epochs=epochs, checkpoint_upload_interval_s=0)['id']
    prefix = '/artifacts/models/preempted/'
    emu.add_fault('stall', emu.metrics_publish(2), times=1)

    # pod 1: `train_model` in a process of its own, killed for real once a checkpoint reached the platform
    work = pod('pod-1')
    log_path = str(tmp_path / 'pod-1.log')
    env = dict(os.environ, DATALOOP_PATH=str(work.parent / 'dataloop'), OMP_NUM_THREADS='1')
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_model_process.py')
    with open(log_path, 'w') as log:
        process = subprocess.Popen([sys.executable, script, emu.api_url, model_id], cwd=str(work), env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_artifact(emu, model_id, prefix + 'weights/last.pth', process, log_path)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    emu.clear_faults()  # pod 1 may have died before publishing epoch 2: pod 2's are answered
    time.sleep(0.5)  # requests the dead process had in flight are dropped, not half stored
    assert emu.models[model_id]['status'] == 'training'  # nobody told the platform: the pod just vanished
    artifacts = artifact_files(emu, project_id, 'preempted')
    assert {'weights/best.pth', 'weights/last.pth'} <= set(artifacts), sorted(artifacts)
    assert not [p for p in artifacts if 'checkpoint-upload' in p or '.tmp' in p], sorted(artifacts)
    uploaded = checkpoint_from(artifacts['weights/last.pth'], tmp_path, 'uploaded-last.pth')
    done = int(uploaded['epoch']) + 1  # epochs the uploaded checkpoint holds
    assert 1 <= done < epochs and len(uploaded['history']) == done and 'optimizer' in uploaded
    published = len(emu.metrics)

    # pod 2: the platform reruns the execution (onReset: rerun) on a fresh pod: it resumes after epoch `done`
    pod('pod-2')
    caplog.set_level(logging.INFO)
    returned = FasterRCNNAdapter().train_model(dl.models.get(model_id=model_id))
    assert 'resuming from the checkpoint uploaded by an earlier run' in caplog.text
    assert 'continuing at epoch {}/{}'.format(done + 1, epochs) in caplog.text
    assert emu.models[model_id]['status'] == 'trained' and returned.status == 'trained'
    rerun_points = collections.defaultdict(list)
    for sample in emu.metrics[published:]:
        rerun_points[sample['legend']].append(sample['data']['x'])
    assert rerun_points and all(xs == list(range(done + 1, epochs + 1)) for xs in rerun_points.values()), rerun_points

    # one best model, nothing left to resume from, the model's artifact list matches what is stored
    artifacts = artifact_files(emu, project_id, 'preempted')
    assert [p for p in artifacts if p.endswith('.pth')] == ['weights/best.pth'], sorted(artifacts)
    assert not [p for p in artifacts if 'checkpoint-upload' in p], sorted(artifacts)
    assert listed_artifacts(emu, model_id) == {prefix + p for p in artifacts}
    final = checkpoint_from(artifacts['weights/best.pth'], tmp_path, 'final-best.pth')
    assert final['id_to_label_map'] == SHAPE_MAP and 'optimizer' not in final
    assert_no_gaps(emu)


# ----------------------------------------------------------------------------- prediction

def predicting_model(platform, name, **configuration):
    """A model with random weights (pretrained off, no artifacts) that always outputs a few boxes."""
    settings = dict(shape_map=True, conf_threshold=0.0, max_detections=3)  # the random weights follow `seed`
    settings.update(configuration)
    return platform['add_model'](name, **settings)


def assert_model_boxes(annotations, model, width, height):
    assert annotations, 'no predictions'
    for ann in annotations:
        assert ann['type'] == 'box' and ann['label'] in LABELS
        system = ann['metadata']['system']['model']
        assert system['name'] == model['name'] and system['model_id'] == model['id']
        assert 0.0 <= system['confidence'] <= 1.0
        (a, b) = ann['coordinates']
        assert 0 <= a['x'] <= b['x'] <= width and 0 <= a['y'] <= b['y'] <= height, (ann['coordinates'], width, height)


def test_predict_items_uploads_replaces_and_reports_unreadable_items(platform, pod):
    emu, dataset = platform['emu'], platform['dataset']
    model = predicting_model(platform, 'predictor')
    good = [emu.seed_item(dataset['id'], 'p{}.jpg'.format(k), synthetic(21, k)[0], dir='/predict',
                          annotations=[other_model_box(), synthetic(21, k)[1][0]]) for k in range(3)]
    corrupt = emu.seed_item(dataset['id'], 'broken.jpg', synthetic(21, 9)[0][:600], dir='/predict')
    pod('service')
    service = FasterRCNNAdapter(dl.models.get(model_id=model['id']))
    items = [dl.items.get(item_id=i['id']) for i in (good[0], corrupt, good[1], good[2])]
    before = {i['id']: {a['id'] for a in emu.item_annotations(i['id'])} for i in good}

    start = len(emu.requests)
    with pytest.raises(ValueError) as err:
        service.predict_items(items)
    message = str(err.value)
    assert 'broken.jpg' in message and corrupt['id'] in message
    assert not any(i['id'] in message for i in good)
    first = {}
    for item in good:
        made = made_by(emu, item['id'], 'predictor')
        assert_model_boxes(made, model, SIZE, SIZE)
        first[item['id']] = {a['id'] for a in made}
        assert before[item['id']] <= {a['id'] for a in emu.item_annotations(item['id'])}  # GT + other model kept
    assert made_by(emu, corrupt['id'], 'predictor') == []

    # again: the model's earlier annotations are replaced, not doubled; everything else stays
    with pytest.raises(ValueError, match='broken.jpg'):
        service.predict_items(items)
    for item in good:
        made = made_by(emu, item['id'], 'predictor')
        assert len(made) == len(first[item['id']]) and not {a['id'] for a in made} & first[item['id']]
        assert {a['id'] for a in emu.item_annotations(item['id'])} == before[item['id']] | {a['id'] for a in made}
    assert patches(emu, start) == []  # reading the configuration never writes to the platform
    assert_no_gaps(emu)


def test_predict_items_decodes_ahead_keeps_order_and_reports_unreadable_items(platform, pod):
    """The next items are downloaded while the current batch is predicted; results stay per item, in order."""
    emu, dataset = platform['emu'], platform['dataset']
    model = predicting_model(platform, 'ahead', batch_size=1)
    images = [synthetic(31, k)[0] for k in range(5)]
    images[2] = images[2][:500]  # truncated JPEG: its own error, the rest go on
    seeded = [emu.seed_item(dataset['id'], 'a{}.jpg'.format(k), data, dir='/ahead') for k, data in enumerate(images)]
    pod('service')
    service = FasterRCNNAdapter(dl.models.get(model_id=model['id']))
    items = [dl.items.get(item_id=item['id']) for item in seeded]
    start = len(emu.requests)
    with pytest.raises(ValueError) as err:
        service.predict_items(items)
    assert 'a2.jpg' in str(err.value) and seeded[2]['id'] in str(err.value)
    assert sum(item['id'] in str(err.value) for item in seeded) == 1

    # batch k+1 was downloaded before batch k's annotations were uploaded (the SDK alone does it after)
    order = [r.path for r in emu.requests[start:]]
    def first(suffix, item):
        return order.index('/api/v1/items/{}/{}'.format(item['id'], suffix))
    for current, following in zip(seeded, seeded[1:]):
        if current is not seeded[2]:  # the unreadable item gets no upload
            assert first('stream', following) < first('annotations', current), order

    # each item got the boxes of its own image: the same as predicting it alone, without prefetching
    for item, data in zip(seeded, images):
        made = made_by(emu, item['id'], 'ahead')
        if item is seeded[2]:
            assert made == []
            continue
        alone = service.predict([service._decode_item(dl.items.get(item_id=item['id']))])[0]
        expected = sorted((a.label, round(a.left, 2), round(a.top, 2)) for a in alone.annotations)
        assert sorted((a['label'], round(a['coordinates'][0]['x'], 2), round(a['coordinates'][0]['y'], 2))
                      for a in made) == expected
    assert service._prefetchers == []  # released, threads included
    assert_no_gaps(emu)


def _exif_jpeg(pixels, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(pixels), 'JPEG', quality=95, exif=exif.tobytes())


def bad_inputs():
    """(name, bytes, displayed (width, height) or None when undecodable) for a list of odd files."""
    rng = np.random.default_rng(5)
    base = np.asarray(render_item(rng, (64, 48), LABELS, max_objects=2)[0])
    rgb = Image.fromarray(base)
    exif_stored = np.asarray(render_item(rng, (60, 40), LABELS, max_objects=2)[0])  # stored 60x40
    exif_bytes = _exif_jpeg(exif_stored, 6)
    # the same pixels physically rotated to the displayed view: orientation 6 = rotate 90 degrees clockwise
    decoded = np.asarray(Image.open(io.BytesIO(exif_bytes)).convert('RGB'))  # raw decode, EXIF ignored
    rotated_png = encode(Image.fromarray(np.ascontiguousarray(np.rot90(decoded, k=-1))), 'PNG')
    deep = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    rgba = np.dstack([base, np.full(base.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0
    return [
        ('exif6.jpg', exif_bytes, (40, 60)),
        ('exif6_rotated.png', rotated_png, (40, 60)),
        ('truncated.jpg', encode(rgb, 'JPEG', quality=90)[:400], None),
        ('deep16.png', encode(Image.fromarray(deep), 'PNG'), (64, 48)),
        ('cmyk.jpg', encode(rgb.convert('CMYK'), 'JPEG', quality=90), (64, 48)),
        ('rgba.png', encode(Image.fromarray(rgba, 'RGBA'), 'PNG'), (64, 48)),
        ('gray.png', encode(rgb.convert('L'), 'PNG'), (64, 48)),
        ('palette.png', encode(rgb.convert('P', palette=Image.Palette.ADAPTIVE), 'PNG'), (64, 48)),
        ('notes.txt', b'this is not an image\n', None),
    ]


def test_predict_items_on_odd_files(platform, pod):
    emu, dataset = platform['emu'], platform['dataset']
    model = predicting_model(platform, 'odd-files')
    cases = bad_inputs()
    seeded = [(emu.seed_item(dataset['id'], name, data, dir='/odd', mimetype='text/plain' if name.endswith('.txt')
                             else None), size) for name, data, size in cases]
    assert Image.open(io.BytesIO(cases[3][1])).mode.startswith('I')  # really 16-bit
    pod('service')
    service = FasterRCNNAdapter(dl.models.get(model_id=model['id']))
    items = [dl.items.get(item_id=item['id']) for item, _ in seeded]
    with pytest.raises(ValueError) as err:
        service.predict_items(items, batch_size=2)  # the two EXIF cases share the first batch
    message = str(err.value)
    for item, size in seeded:
        made = made_by(emu, item['id'], 'odd-files')
        if size is None:
            assert item['name'] in message and item['id'] in message
            assert made == []
        else:
            assert item['id'] not in message
            assert_model_boxes(made, model, *size)

    # EXIF: the boxes follow the displayed (rotated) view, exactly as on the physically rotated pixels
    def boxes(item):
        return sorted((a['label'], [v for p in a['coordinates'] for v in (p['x'], p['y'])])
                      for a in made_by(emu, item['id'], 'odd-files'))
    exif, rotated = boxes(seeded[0][0]), boxes(seeded[1][0])
    assert [label for label, _ in exif] == [label for label, _ in rotated]
    assert np.allclose([xy for _, xy in exif], [xy for _, xy in rotated], atol=0.05), (exif, rotated)
    assert_no_gaps(emu)


def test_predict_items_refuses_huge_and_thin_images_per_item(platform, pod):
    """A 70-byte file claiming 200 MP, and an image the resize would make 0 px high, in the same
    batch as good items: those two are named with their dimensions, the others are annotated."""
    from test_bad_inputs import png, png_header
    emu, dataset = platform['emu'], platform['dataset']
    model = predicting_model(platform, 'guarded')
    good = [emu.seed_item(dataset['id'], 'g{}.jpg'.format(k), synthetic(31, k)[0], dir='/guard') for k in range(2)]
    huge = emu.seed_item(dataset['id'], 'huge.png', png_header(20000, 10000), dir='/guard')
    thin = emu.seed_item(dataset['id'], 'thin.png', png(2000, 1), dir='/guard')
    pod('service')
    service = FasterRCNNAdapter(dl.models.get(model_id=model['id']))
    items = [dl.items.get(item_id=i['id']) for i in (good[0], huge, thin, good[1])]
    with pytest.raises(ValueError) as err:
        service.predict_items(items, batch_size=4)  # one batch: the refused items must not cost the others
    message = str(err.value)
    assert '2 of 4 items' in message
    assert huge['id'] in message and '20000x10000' in message and 'max_image_pixels' in message
    assert thin['id'] in message and '2000x1' in message and 'under one pixel' in message
    for item in good:
        assert item['id'] not in message
        assert_model_boxes(made_by(emu, item['id'], 'guarded'), model, SIZE, SIZE)
    assert made_by(emu, huge['id'], 'guarded') == [] and made_by(emu, thin['id'], 'guarded') == []
    assert_no_gaps(emu)


# ----------------------------------------------------------------------------- dataset-level functions

def test_predict_dataset_and_evaluate_model(platform, pod):
    emu, dataset = platform['emu'], platform['dataset']
    model = predicting_model(platform, 'evaluated')
    pod('service')
    service = FasterRCNNAdapter(dl.models.get(model_id=model['id']))
    validation = [i for i in emu.find_items(dataset['id']) if i['dir'] == '/validation']
    others = [i for i in emu.find_items(dataset['id']) if i['dir'] != '/validation']
    filters = dl.Filters(field='dir', values='/validation')

    start = len(emu.requests)
    service.predict_dataset(dataset=dl.datasets.get(dataset_id=dataset['id']), filters=filters.prepare())
    for item in validation:
        assert_model_boxes(made_by(emu, item['id'], 'evaluated'), model, SIZE, SIZE)
    assert not any(made_by(emu, i['id'], 'evaluated') for i in others)

    evaluated, _ = service.evaluate_model(model=dl.models.get(model_id=model['id']),
                                          dataset=dl.datasets.get(dataset_id=dataset['id']),
                                          filters=filters.prepare())
    assert evaluated.id == model['id']
    assert patches(emu, start) == []  # the SDK's .get(key, default) reads found every key present
    scores = {i['name']: emu.blobs[i['id']] for i in emu.find_items(dataset['id']) if i['dir'] == '/.modelscores'}
    assert set(scores) == {'{}.csv'.format(model['id']), '{}-interpolated.json'.format(model['id'])}
    csv = scores['{}.csv'.format(model['id'])].decode()
    assert all(item['id'] in csv for item in validation) and not any(i['id'] in csv for i in others)
    # every prediction of the evaluation's own predict pass is scored
    predictions = [a['id'] for item in validation for a in made_by(emu, item['id'], 'evaluated')]
    assert predictions and all(a in csv for a in predictions)
    assert_no_gaps(emu)


# ----------------------------------------------------------------------------- feature vectors

def test_embed_items_and_embed_dataset_fill_the_models_feature_set(platform, pod):
    emu, dataset = platform['emu'], platform['dataset']
    model = predicting_model(platform, 'embedder')
    train = sorted((i for i in emu.find_items(dataset['id']) if i['dir'] == '/train'), key=lambda i: i['id'])
    corrupt = emu.seed_item(dataset['id'], 'broken.jpg', synthetic(21, 9)[0][:600], dir='/embed')
    pod('service')
    service = FasterRCNNAdapter(dl.models.get(model_id=model['id']))

    start = len(emu.requests)
    items = [dl.items.get(item_id=i['id']) for i in (train[0], corrupt, train[1], train[2])]
    with pytest.raises(ValueError) as err:
        service.embed_items(items)
    message = str(err.value)
    assert 'broken.jpg' in message and corrupt['id'] in message
    assert not any(i['id'] in message for i in train)
    (feature_set,) = emu.feature_sets.values()  # created on first use, for this model, at the configured size
    assert feature_set['modelId'] == model['id'] and feature_set['project'] == platform['project']['id']
    assert feature_set['size'] == 256 and feature_set['entityType'] == 'item'
    vectors = {f['entityId']: f['value'] for f in emu.features.values()}
    assert set(vectors) == {i['id'] for i in train[:3]}  # one per readable item, none for the broken one
    for value in vectors.values():
        assert len(value) == 256 and math.isclose(float(np.linalg.norm(value)), 1.0, abs_tol=1e-5)
    assert all(f['featureSetId'] == feature_set['id'] and f['datasetId'] == dataset['id']
               for f in emu.features.values())

    # the dataset-level function reuses the model's set and embeds every item the filter selects
    service.embed_dataset(dataset=dl.datasets.get(dataset_id=dataset['id']),
                          filters=dl.Filters(field='dir', values='/validation').prepare())
    assert len(emu.feature_sets) == 1
    validation = {i['id'] for i in emu.find_items(dataset['id']) if i['dir'] == '/validation'}
    listed = dl.feature_sets.get(feature_set_id=feature_set['id'])
    assert listed.size == 256
    read_back = {f.entity_id: f.value for f in listed.features.list().all()}  # what similarity search sees
    assert set(read_back) == {i['id'] for i in train[:3]} | validation
    assert all(len(value) == 256 for value in read_back.values())
    assert patches(emu, start) == []  # embeddings_size and friends are read, never written back
    assert_no_gaps(emu)
