"""`cpu_runtime`: predict and embed on the CPU through OpenVINO / ONNX Runtime give PyTorch's results on a
model trained on the synthetic set, at any image size, and every failure falls back to torch with a warning."""
import logging
import shutil
import sys

import numpy as np
import pytest
import torch

from fasterrcnn_adapter import FasterRCNNAdapter
from utils.data.synthetic import make_synthetic_export, render_item
from utils.export import cpu_graphs
from utils.inference import cpu_runtime
from utils.platform.local_model import local_model

pytest.importorskip('openvino')
pytest.importorskip('onnxruntime')
pytestmark = pytest.mark.compiled_cpu_runtime

LABELS = ['circle', 'square', 'triangle']
TINY = {'pretrained': False, 'model_variant': 'fasterrcnn_mobilenet_v3_large_320_fpn', 'device': 'cpu',
        'min_size': 128, 'max_size': 192, 'batch_size': 4, 'num_workers': 0, 'epochs': 2, 'learning_rate': 0.02,
        'warmup_iters': 2, 'box_batch_size_per_image': 64, 'rpn_post_nms_top_n_train': 300, 'conf_threshold': 0.05,
        # above the 150 proposals x 3 classes this variant can return: no cut among near-equal scores
        'max_detections': 500}


def make_adapter(artifacts, **configuration):
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model(configuration={**TINY, **configuration}, labels=LABELS)
    adapter.load(str(artifacts))
    return adapter


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A model folder trained on the synthetic shapes: its saved artifacts (weights and the CPU runtime's graph),
    as a deploy downloads them. One epoch: the saved weights are the best epoch's, and a few epochs' validation mAP
    on two images stays 0, so the first epoch is the one kept either way."""
    root = tmp_path_factory.mktemp('cpu_runtime')
    data = root / 'data'
    make_synthetic_export(str(data), n_train=8, n_val=2, image_size=(128, 128), seed=4)
    adapter = make_adapter(root / 'none', epochs=1)
    adapter.convert_from_dtlpy(str(data))
    adapter.train(str(data), str(root / 'output'))
    adapter.save(str(root / 'artifacts'))
    return root / 'artifacts'


def shapes_images():
    """Synthetic-set images of three sizes and aspects (uint8 CHW), for one mixed batch."""
    rng = np.random.default_rng(11)
    images = []
    for size in ((128, 128), (200, 120), (96, 176)):
        image, _ = render_item(rng, size, LABELS)
        images.append(torch.from_numpy(np.asarray(image.convert('RGB'))).permute(2, 0, 1).contiguous())
    return images


def boxes_of(collection):
    return [(a.label, a.left, a.top, a.right, a.bottom, a.metadata['user']['model']['confidence'])
            for a in collection.annotations]


def assert_same_detections(expected, actual, threshold=TINY['conf_threshold']):
    """Each PyTorch box has one of the same label, corners within 1 px, score within 0.01, and the other way
    round; only a box scoring within 0.01 of the threshold may be on one side alone."""
    unused = list(actual)
    for label, *corners, score in expected:
        match = next((b for b in unused if b[0] == label and abs(b[5] - score) <= 0.01
                      and max(abs(x - y) for x, y in zip(b[1:5], corners)) <= 1.0), None)
        assert match is not None or score - threshold <= 0.01, (label, corners, score, actual)
        if match is not None:
            unused.remove(match)
    assert all(b[5] - threshold <= 0.01 for b in unused), (unused, expected)


@pytest.mark.parametrize('runtime', ['openvino', 'onnxruntime'])
def test_compiled_runtime_predicts_pytorchs_boxes_on_a_mixed_size_batch(trained, runtime, caplog):
    images = shapes_images()
    # each image alone: in a batch, torch pads the smaller images to the largest, which shifts their
    # features a little (the FPN's upsampling meets other sizes); the compiled runtime runs each at its own size
    reference = make_adapter(trained, cpu_runtime='torch')
    expected = [boxes_of(reference.predict([image])[0]) for image in images]
    assert sum(map(len, expected)) >= 3  # the trained model finds shapes: the comparison has something to compare
    with caplog.at_level(logging.INFO, logger='utils'):
        actual = [boxes_of(c) for c in make_adapter(trained, cpu_runtime=runtime).predict(images)]
    assert f'predict runs on {runtime}' in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith('utils')]
    for want, got in zip(expected, actual):
        assert_same_detections(want, got)


def test_embed_through_openvino_gives_pytorchs_vectors(trained):
    images = shapes_images()
    expected = np.array(make_adapter(trained, cpu_runtime='torch').embed(images))
    actual = np.array(make_adapter(trained, cpu_runtime='openvino').embed(images))
    assert actual.shape == expected.shape == (3, 256)
    assert np.abs(actual - expected).max() < 1e-3


def test_training_saves_the_graph_a_deploy_compiles_without_exporting(trained, caplog):
    """save() after training writes the detector graph into the artifacts under the digest a deploy of those
    weights computes: a new adapter on them (a new replica) compiles it without exporting."""
    images = shapes_images()[:1]
    with caplog.at_level(logging.INFO, logger='utils'):
        make_adapter(trained, cpu_runtime='openvino').predict(images)
    assert 'predict runs on openvino' in caplog.text and 'exporting' not in caplog.text
    assert [p for p in (trained / cpu_graphs.GRAPHS_DIR).glob('*/detector.onnx')]


def predict_twice(adapter, images, caplog):
    """Two predict calls on `images`: each one's boxes, and the warnings the runtime logged during them."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        results = [[boxes_of(c) for c in adapter.predict(images)] for _ in range(2)]
    return results, [r.getMessage() for r in caplog.records
                     if r.levelno == logging.WARNING and r.name.startswith('utils')]


def test_missing_runtime_falls_back_to_torch_with_one_warning(trained, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, 'openvino', None)  # `import openvino` raises ModuleNotFoundError
    images = shapes_images()
    expected = [boxes_of(c) for c in make_adapter(trained, cpu_runtime='torch').predict(images)]
    results, warnings = predict_twice(make_adapter(trained, cpu_runtime='openvino'), images, caplog)
    assert results == [expected, expected]
    assert len(warnings) == 1 and 'running on torch' in warnings[0] and 'ModuleNotFoundError' in warnings[0], warnings


def test_a_graph_that_fails_to_compile_falls_back_to_torch(trained, tmp_path, caplog):
    folder = tmp_path / 'artifacts'
    shutil.copytree(trained / 'weights', folder / 'weights')
    adapter = make_adapter(folder, cpu_runtime='torch')
    images = shapes_images()
    expected = [boxes_of(c) for c in adapter.predict(images)]  # (also applies the settings the digest covers)
    broken = folder / cpu_graphs.GRAPHS_DIR / cpu_graphs.digest(adapter.model) / 'detector.onnx'
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b'not an onnx file')
    adapter.model_entity.configuration['cpu_runtime'] = 'openvino'
    results, warnings = predict_twice(adapter, images, caplog)
    assert results == [expected, expected]
    assert len(warnings) == 1 and 'running on torch' in warnings[0], warnings


def test_a_batch_the_runtime_refuses_runs_on_torch(trained, monkeypatch, caplog):
    """The runtime raising on an input (a shape or type it does not take) costs that batch the compiled
    speed, never its result: the batch runs on torch, with one warning line for repeated failures."""
    images = shapes_images()
    expected = [boxes_of(c) for c in make_adapter(trained, cpu_runtime='torch').predict(images)]

    def refuse(graph, array):
        raise RuntimeError(f'cannot take an input of shape {array.shape}')
    monkeypatch.setattr(cpu_runtime.OpenVinoGraph, '__call__', refuse)
    results, warnings = predict_twice(make_adapter(trained, cpu_runtime='openvino'), images, caplog)
    assert results == [expected, expected]
    assert len(warnings) == 1 and 'cannot take an input' in warnings[0] and 'runs on torch' in warnings[0], warnings
