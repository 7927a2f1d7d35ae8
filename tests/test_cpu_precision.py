"""`cpu_precision`: int8 is made at the end of training with the setting (NNCF, calibrated on the training
images), lands in the artifacts, and a deploy predicts with it; a deploy asking for int8 without an int8 graph,
or for a precision its runtime does not compute, runs f32 with one warning; bf16 compiles as bf16."""
import json
import logging
import os
import shutil
import sys

import pytest

from test_cpu_runtime import TINY, boxes_of, make_adapter, predict_twice, shapes_images
from test_local_runner import run_cli
from utils.core.label_map import label_to_id
from utils.data.images import load_image_tensor
from utils.data.synthetic import make_synthetic_export
from utils.export import cpu_graphs
from utils.inference import cpu_precision, int8_check

pytest.importorskip('openvino')
pytest.importorskip('nncf')
pytestmark = pytest.mark.compiled_cpu_runtime

#: int8 against f32: a box the f32 graph scores at least this must be found again by the int8 graph
CLEAR = 0.15


def train_in_process(root, **configuration):
    """An adapter trained on the synthetic shapes in this process (not saved)."""
    data = root / 'data'
    make_synthetic_export(str(data), n_train=8, n_val=2, image_size=(128, 128), seed=4)
    adapter = make_adapter(root / 'none', **configuration)
    adapter.convert_from_dtlpy(str(data))
    adapter.train(str(data), str(root / 'output'))
    return adapter


@pytest.fixture(scope='module')
def int8_run(tmp_path_factory):
    """`python -m local_runner train` with cpu_precision int8 on the synthetic shapes, as a user runs it: the model
    folder it wrote (weights and the CPU runtime's graphs, which a deploy of it loads) and the finished process.
    Trained with the deploys' settings (test_cpu_runtime's TINY): the graphs' digest is the one their adapters
    compute. One epoch: the saved weights are the best epoch's, and a few epochs' validation mAP on two images
    stays 0, so the first epoch is the one kept either way."""
    root = tmp_path_factory.mktemp('int8')
    data, model = root / 'data', root / 'model'
    make_synthetic_export(str(data), n_train=8, n_val=2, image_size=(128, 128), seed=4)
    config = root / 'int8.json'
    config.write_text(json.dumps({**TINY, 'epochs': 1, 'cpu_runtime': 'openvino', 'cpu_precision': 'int8'}))
    done = run_cli('train', '--data', str(data), '--output', str(model), '--config', str(config))
    assert done.returncode == 0, done.stderr
    return model, done


@pytest.fixture(scope='module')
def int8_trained(int8_run):
    return int8_run[0]


def int8_files(artifacts):
    return sorted(p.name for p in (artifacts / cpu_graphs.GRAPHS_DIR).glob('*/detector_int8.*'))


def iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_training_with_int8_saves_the_int8_graph_beside_the_f32_one(int8_trained):
    assert int8_files(int8_trained) == ['detector_int8.bin', 'detector_int8.xml']
    folders = list((int8_trained / cpu_graphs.GRAPHS_DIR).glob('*/detector_int8.xml'))
    assert (folders[0].parent / 'detector.onnx').is_file()  # same digest: the weights it was made from


def test_the_calibration_cost_is_in_the_log(int8_run):
    line = next(line for line in int8_run[1].stderr.splitlines() if 'int8 graph written' in line)
    assert 'calibrated on 8 images in' in line and 's an image' in line


def test_the_int8_graphs_map_against_f32_on_the_validation_images_is_saved_logged_and_told_by_the_deploy(
        int8_run, caplog):
    model = int8_run[0]
    line = next(line for line in int8_run[1].stderr.splitlines() if 'int8 graph against f32' in line)
    assert 'on 2 validation images: mAP@.5' in line and 'points' in line, line
    folder = next((model / cpu_graphs.GRAPHS_DIR).glob('*/detector_int8.xml')).parent
    check = int8_check.read_check(str(folder))
    assert check['images'] == 2 and int8_check.describe(check) in line
    assert all(0 <= check[p][m] <= 1 for p in ('f32', 'int8') for m in ('mAP_50', 'mAP'))
    with caplog.at_level(logging.INFO, logger='utils'):
        make_adapter(model, cpu_precision='int8').predict(shapes_images()[:1])
    assert f'measured against f32 at training {int8_check.describe(check)}' in caplog.text


def test_the_int8_check_scores_the_f32_graphs_own_boxes_as_perfect(int8_trained):
    """Ground truth made of the f32 graph's confident boxes (score >= 0.15) on the training images: the check must
    find f32's mAP@.5 and mAP 1.0 (each is a detection, outranking every other), and int8's close to it."""
    paths = sorted((int8_trained.parent / 'data' / 'train' / 'items').iterdir())
    images = [load_image_tensor(p) for p in paths]
    adapter = make_adapter(int8_trained, cpu_precision='f32')
    records = []
    for path, image, collection in zip(paths, images, adapter.predict(images)):
        kept = [box for box in boxes_of(collection) if box[5] >= CLEAR]
        records.append({'image_path': str(path), 'height': image.shape[1], 'width': image.shape[2],
                        'boxes': [list(box[1:5]) for box in kept], 'labels': [box[0] for box in kept]})
    assert sum(len(r['boxes']) for r in records) >= 3
    folder = next((int8_trained / cpu_graphs.GRAPHS_DIR).glob('*/detector_int8.xml')).parent
    check = int8_check.measure(str(folder / 'detector.onnx'), str(folder / 'detector_int8.xml'), adapter.model,
                               records, label_to_id(adapter.id_to_label_map()))
    assert check['images'] == len(paths)
    assert check['f32'] == {'mAP_50': 1.0, 'mAP': 1.0}, check
    assert check['int8']['mAP_50'] >= 0.7, check


def test_a_deploy_predicts_with_the_int8_graph_close_to_f32(int8_trained, caplog):
    """On its training images every box the f32 graph scores >= 0.15 (the few-epoch model's best are 0.2-0.3) has
    an int8 box of the same label at IoU >= 0.5 (mAP@.5's match) scoring within 0.05: quantizing the box head
    instead gave one garbage box an image, which this catches."""
    images = [load_image_tensor(p) for p in sorted((int8_trained.parent / 'data' / 'train' / 'items').iterdir())]
    f32 = [boxes_of(c) for c in make_adapter(int8_trained, cpu_precision='f32').predict(images)]
    with caplog.at_level(logging.INFO, logger='utils'):
        int8 = [boxes_of(c) for c in make_adapter(int8_trained, cpu_precision='int8').predict(images)]
    assert 'predict runs on openvino in int8' in caplog.text and 'detector_int8.xml' in caplog.text
    compared = 0
    for want, got in zip(f32, int8):
        for label, *corners, score in want:
            if score >= CLEAR:
                compared += 1
                assert any(b[0] == label and iou(b[1:5], corners) >= 0.5 and abs(b[5] - score) <= 0.05
                           for b in got), (label, corners, score, got)
    assert compared >= 3, f32  # the comparison has something to compare


def test_int8_without_an_int8_graph_runs_f32_with_one_warning(tmp_path, int8_trained, caplog):
    """A model trained with another precision (its artifacts hold the f32 graph only) deployed with int8."""
    artifacts = tmp_path / 'artifacts'
    os.makedirs(artifacts)
    os.symlink(int8_trained / 'weights', artifacts / 'weights')
    for graph in (int8_trained / cpu_graphs.GRAPHS_DIR).glob('*/detector.onnx'):  # the f32 graph, not the int8 one
        (artifacts / graph.relative_to(int8_trained)).parent.mkdir(parents=True)
        shutil.copy(graph, artifacts / graph.relative_to(int8_trained))
    images = shapes_images()
    expected = [boxes_of(c) for c in make_adapter(artifacts, cpu_precision='f32').predict(images)]
    results, warnings = predict_twice(make_adapter(artifacts, cpu_precision='int8'), images, caplog)
    assert results == [expected, expected]
    assert len(warnings) == 1 and 'no int8 graph' in warnings[0] and 'f32' in warnings[0], warnings


def test_a_crashed_calibration_leaves_f32_and_says_so(tmp_path, monkeypatch, caplog):
    """Calibration runs in a child process: one that dies of a signal costs the int8 graph, not the run (the
    trained adapter saves its artifacts, as train_model's save does after training)."""
    trained = train_in_process(tmp_path, cpu_precision='int8', epochs=1)
    crashing = tmp_path / 'crashing-python'
    crashing.write_text('#!/bin/sh\nkill -SEGV $$\n')
    crashing.chmod(0o755)
    monkeypatch.setattr(sys, 'executable', str(crashing))
    artifacts = tmp_path / 'artifacts'
    with caplog.at_level(logging.WARNING, logger='fasterrcnn'):
        trained.save(str(artifacts))
    assert 'the int8 graph was not made (RuntimeError: the calibration process ended with signal SIGSEGV' \
        in caplog.text
    assert int8_files(artifacts) == [] and list((artifacts / cpu_graphs.GRAPHS_DIR).glob('*/detector.onnx'))
    assert (artifacts / 'weights' / 'best.pth').is_file()


def test_onnxruntime_computes_f32_whatever_is_asked(int8_trained, caplog):
    images = shapes_images()
    expected = [boxes_of(c) for c in make_adapter(int8_trained, cpu_runtime='onnxruntime').predict(images)]
    results, warnings = predict_twice(make_adapter(int8_trained, cpu_runtime='onnxruntime', cpu_precision='int8'),
                                      images, caplog)
    assert results == [expected, expected]
    assert len(warnings) == 1 and "cpu_runtime 'onnxruntime' computes in f32" in warnings[0], warnings


@pytest.mark.skipif(not cpu_precision.cpu_has_bf16(), reason='this CPU has no bf16 units')
def test_bf16_compiles_in_bf16_and_auto_picks_it_on_this_cpu(int8_trained, caplog):
    assert cpu_precision.choose('auto', 'openvino') == ('bf16', None)
    with caplog.at_level(logging.INFO, logger='utils'):
        collections = make_adapter(int8_trained, cpu_precision='bf16').predict(shapes_images())
    assert 'predict runs on openvino in bf16' in caplog.text and len(collections) == 3


def test_without_bf16_units_bf16_and_auto_run_f32(monkeypatch):
    monkeypatch.setattr(cpu_precision, 'cpu_has_bf16', lambda: False)
    assert cpu_precision.choose('auto', 'openvino') == ('f32', None)
    precision, note = cpu_precision.choose('bf16', 'openvino')
    assert precision == 'f32' and 'no bf16 units' in note
    assert cpu_precision.openvino_config('bf16')['INFERENCE_PRECISION_HINT'] == 'bf16'
    assert cpu_precision.openvino_config('int8')['INFERENCE_PRECISION_HINT'] == 'f32'  # its f32 remainder
    monkeypatch.setattr(cpu_precision, 'cpu_has_bf16', lambda: True)
    assert cpu_precision.openvino_config('int8')['INFERENCE_PRECISION_HINT'] == 'bf16'


def test_the_local_runners_train_makes_the_int8_graph_and_its_predict_uses_it(int8_run, tmp_path):
    model, train = int8_run
    assert 'int8 graph written' in train.stderr and list(model.glob('cpu_runtime/*/detector_int8.xml'))
    done = run_cli('predict', '--model', str(model), '--input', str(model.parent / 'data' / 'validation' / 'items'),
                   '--output', str(tmp_path / 'predictions'))
    assert done.returncode == 0, done.stderr
    assert 'predict runs on openvino in int8' in done.stderr
