"""ONNX export of a trained model folder: onnxruntime on CPU gives PyTorch's detections."""
import json

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from utils.modeling import checkpoints, model_factory
from utils.export.onnx_export import ExportError, export_onnx, sidecar_path
from utils.data.synthetic import render_item

ort = pytest.importorskip('onnxruntime')

LABELS = {1: 'circle', 2: 'square', 3: 'triangle'}
CONFIGURATION = {'model_variant': 'fasterrcnn_mobilenet_v3_large_320_fpn', 'pretrained': False,
                 'min_size': 160, 'max_size': 160, 'conf_threshold': 0.3, 'max_detections': 80}


def write_model_folder(folder):
    """A folder as `local_runner train` leaves it (weights/best.pth: seeded random init, and model.json);
    returns the network written, set up as model.json says (the PyTorch reference)."""
    torch.manual_seed(0)
    model = model_factory.build_model(CONFIGURATION['model_variant'], 4, 160, 160, box_score_thresh=0.3,
                                      box_detections_per_img=80).eval()
    # torchvision's init leaves this untrained network's features ~1e-9 and every score equal; fan-in
    # scaled weights and random biases give varied boxes and scores, so the comparison can tell them apart
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, mode='fan_in', nonlinearity='linear')
            if module.bias is not None:
                torch.nn.init.normal_(module.bias, std=0.1)
    checkpoint = checkpoints.make_checkpoint(model, CONFIGURATION['model_variant'], LABELS, 160, 160)
    checkpoints.save_checkpoint(checkpoint, str(folder / 'weights' / 'best.pth'))
    configuration = dict(CONFIGURATION, id_to_label_map={str(k): v for k, v in LABELS.items()},
                         label_to_id_map={v: k for k, v in LABELS.items()})
    (folder / 'model.json').write_text(json.dumps({'name': 'shapes', 'configuration': configuration}))
    return model


@pytest.fixture(scope='module')
def model_folder(tmp_path_factory):
    """One model folder for the module's exports (nothing writes into it): (folder, the PyTorch reference)."""
    folder = tmp_path_factory.mktemp('onnx') / 'model'
    return folder, write_model_folder(folder)


def same_detections(expected, actual):
    """Every PyTorch detection has an onnxruntime one of the same label, box within 1 px, score within 0.01."""
    boxes, labels, scores = actual
    assert len(boxes) == len(expected['boxes']), (len(boxes), len(expected['boxes']))
    unused = set(range(len(boxes)))
    for box, label, score in zip(expected['boxes'].numpy(), expected['labels'].numpy(), expected['scores'].numpy()):
        match = next((j for j in sorted(unused) if labels[j] == label and abs(scores[j] - score) <= 0.01
                      and np.abs(boxes[j] - box).max() <= 1.0), None)
        assert match is not None, (box, label, score)
        unused.remove(match)


def test_exported_model_matches_pytorch_on_three_images(model_folder, tmp_path):
    folder, model = model_folder
    output = str(tmp_path / 'export' / 'model.onnx')
    assert export_onnx(str(folder), output, size=(128, 160)) == output
    sidecar = json.loads(open(sidecar_path(output)).read())
    assert sidecar['input']['shape'] == [3, 128, 160] and sidecar['resize'] == dict(sidecar['resize'], height=128,
                                                                                     width=160)
    assert sidecar['id_to_label_map'] == {str(k): v for k, v in LABELS.items()}
    assert sidecar['score_threshold'] == 0.3 and len(sidecar['normalization']['mean']) == 3

    session = ort.InferenceSession(output, providers=['CPUExecutionProvider'])
    detections = 0
    for index, size in enumerate([(200, 150), (96, 128), (160, 160)]):
        image, _ = render_item(np.random.default_rng([3, index]), size, list(LABELS.values()))
        resized = image.resize((sidecar['resize']['width'], sidecar['resize']['height']), resample=2)  # bilinear
        tensor = pil_to_tensor(resized).float() / 255
        with torch.no_grad():
            expected = model([tensor])[0]
        actual = session.run(None, {sidecar['input']['name']: tensor.numpy()})
        same_detections(expected, actual)
        detections += len(expected['boxes'])
    assert 3 <= detections < 3 * 80  # the comparison compared something, and the threshold took some away


def test_default_size_and_bad_inputs(model_folder, tmp_path):
    folder, _ = model_folder
    output = export_onnx(str(folder), str(tmp_path / 'square.onnx'))
    session = ort.InferenceSession(output, providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape == [3, 160, 160]  # a min_size square
    with pytest.raises(ExportError, match='nowhere'):
        export_onnx(str(tmp_path / 'nowhere'), str(tmp_path / 'x.onnx'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ExportError, match='no weights'):
        export_onnx(str(tmp_path / 'empty'), str(tmp_path / 'x.onnx'))
    with pytest.raises(ExportError, match='size'):
        export_onnx(str(folder), str(tmp_path / 'x.onnx'), size=(128,))
    assert not (tmp_path / 'x.onnx').exists()


def test_local_runner_export_command(model_folder, tmp_path, capsys):
    """`python -m local_runner export`: the files it names exist and run; bad input is one line, exit 2."""
    from local_runner.cli import main
    from test_local_runner import assert_one_line_error, run_cli
    folder, _ = model_folder
    output = tmp_path / 'out' / 'model.onnx'
    assert main(['export', '--model', str(folder), '--output', str(output), '--size', '96', '128']) == 0
    assert str(output) in capsys.readouterr().out
    with open(sidecar_path(str(output))) as f:
        sidecar = json.load(f)
    assert sidecar['input']['shape'] == [3, 96, 128]
    assert sidecar['id_to_label_map'] == {str(k): v for k, v in LABELS.items()}
    session = ort.InferenceSession(str(output), providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape == [3, 96, 128]
    boxes, labels, scores = session.run(None, {'image': np.full((3, 96, 128), 0.5, dtype=np.float32)})
    assert boxes.shape == (len(labels), 4) and len(scores) == len(labels)

    assert main(['export', '--model', str(folder), '--output', str(tmp_path / 'x.onnx'), '--size', '16', '16']) == 2
    assert_one_line_error(capsys.readouterr().err, 'local_runner export: error:', 'each from 32 to 8192', '(16, 16)')
    assert not (tmp_path / 'x.onnx').exists()
    missing = run_cli('export', '--model', str(tmp_path / 'nope'), '--output', str(tmp_path / 'x.onnx'))
    assert missing.returncode == 2
    assert_one_line_error(missing.stderr, 'no such folder')
