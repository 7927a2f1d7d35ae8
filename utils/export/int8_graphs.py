"""The int8 detector graph (`cpu_precision` "int8"): NNCF's post-training quantization of the exported detector,
calibrated on the model's own training images, written as OpenVINO IR beside the f32 graph.

Made when a trained model is saved: calibration needs images like those the model will meet, and the training
images are on disk then; a deploy downloads the result with the weights and only compiles it. NNCF (Intel's
compression library, OpenVINO's own) picks each layer's int8 ranges from what the calibration images produce
and corrects the biases the rounding shifts; what is not quantized (`F32_LAYERS`, `F32_TYPES`, the box decoding,
NMS and RoI pooling) keeps its float arithmetic (`utils.inference.cpu_precision.openvino_config`).

The calibration runs in a child process (`python -m utils.export.int8_graphs SPEC`): OpenVINO's CPU plugin
was seen to crash the process (SIGSEGV) collecting statistics in a process that had just trained, while the same
calibration in a fresh process ran; a crash there must cost the int8 graph, never the trained model's upload.
"""
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from utils.data.detection_dataset import record_name
from utils.data.images import load_image_tensor
from utils.export import cpu_graphs

logger = logging.getLogger(__name__)

INT8_GRAPH = 'detector_int8.xml'  # with its detector_int8.bin, in the f32 graph's digest folder
#: Calibration images at most: NNCF's own default subset size; evenly spread over the training set
CALIBRATION_IMAGES = 300
#: Layers left in f32 (bf16 where the CPU has the units): the box head's last layer (`box_predictor`), whose
#: quantized MatMuls made OpenVINO 2026.4's CPU plugin return one garbage box (score 1.6e35) an image, and the rest
#: of the heads' arithmetic (box decoding, NMS, RoI pooling); the RPN's objectness and box layers, whose int8 outputs
#: reordered the proposals kept before NMS (half the boxes of a briefly trained model moved, 1 in 49 with them f32);
#: and the element-wise multiplications, upsampling and means (squeeze-excitation scaling, the FPN's top-down path):
#: with them int8 too, the demo's model lost 4.2 points of mAP@.5. The RPN's shared 3x3 convolution, the box head's
#: two fully connected layers and the residual sums are int8: on resnet50 they are a third of the int8 graph's time
#: when left out, and the demo's model keeps its mAP@.5 with them in (bench/RESULTS.md)
F32_LAYERS = ('.*/roi_heads/(?!box_head/fc).*', '.*/rpn/(?!head/conv/).*')
F32_TYPES = ('Multiply', 'Interpolate', 'ReduceMean')
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package's root


def int8_path(folder: str) -> str:
    return os.path.join(folder, INT8_GRAPH)


def calibration_records(records: Sequence[Mapping[str, Any]], limit: int = CALIBRATION_IMAGES) -> List[Mapping]:
    """At most `limit` records, evenly spread (a training set is often ordered by folder or class)."""
    records = list(records)
    if len(records) <= limit:
        return records
    return [records[int(i * len(records) / limit)] for i in range(limit)]


class CalibrationInputs:
    """The detector graph's inputs for the calibration records, decoded as NNCF asks for them (it makes
    several passes; 300 inputs of 800x1066 would hold 3 GB at once). An unreadable image is skipped."""

    def __init__(self, network: nn.Module, records: Sequence[Mapping[str, Any]]):
        self.network, self.records = network, list(records)
        self.unreadable: Dict[int, str] = {}  # record index -> why

    def __iter__(self):
        for index, record in enumerate(self.records):
            try:
                image = load_image_tensor(record['image_path'])
            except Exception as err:  # one bad image costs the calibration one sample
                self.unreadable[index] = f'{type(err).__name__}: {err}'
                continue
            with torch.inference_mode():
                inputs = image.float() / 255  # as prediction.device_inputs on the CPU
                yield cpu_graphs.prepared_image(self.network, inputs).numpy()


def _readable_model(onnx_path: str, work: str):
    """The ONNX graph as OpenVINO reads it, through an IR file: its ONNX reader shares constants between the graph
    and the bodies of its If nodes (the NMS's empty-input branches), which NNCF's graph builder cannot follow."""
    import openvino as ov
    core = ov.Core()
    ir_path = os.path.join(work, 'detector.xml')
    ov.save_model(core.read_model(onnx_path), ir_path, compress_to_fp16=False)
    return core.read_model(ir_path)


def quantize_detector(onnx_path: str, inputs: CalibrationInputs, target: str) -> int:
    """Write the int8 IR of `onnx_path` at `target` (.xml then .bin beside it; the .xml last, so a found .xml is
    whole); returns the number of calibration images used."""
    import nncf
    import openvino as ov
    folder = os.path.dirname(target)
    with tempfile.TemporaryDirectory(dir=folder) as work:
        model = _readable_model(onnx_path, work)
        quantized = nncf.quantize(model, nncf.Dataset(inputs), subset_size=len(inputs.records),
                                  ignored_scope=nncf.IgnoredScope(patterns=list(F32_LAYERS), types=list(F32_TYPES),
                                                                  validate=False))  # a variant may lack a type
        written = os.path.join(work, 'int8', INT8_GRAPH)
        ov.save_model(quantized, written, compress_to_fp16=False)
        weights = os.path.splitext(INT8_GRAPH)[0] + '.bin'
        os.replace(os.path.join(os.path.dirname(written), weights), os.path.join(folder, weights))
        os.replace(written, target)
    return len(inputs.records) - len(inputs.unreadable)


def transform_spec(network: nn.Module) -> Dict[str, Any]:
    """What `cpu_graphs.prepared_image` needs of the network (its resize and normalisation), as JSON."""
    transform = network.transform
    return {'min_size': list(transform.min_size), 'max_size': transform.max_size,
            'image_mean': list(transform.image_mean), 'image_std': list(transform.image_std)}


def run_in_child(module: str, spec: Mapping[str, Any], work: str, what: str) -> dict:
    """`python -m module SPEC_FILE` in a fresh Python process (OpenVINO's statistics and inference are kept out of
    the process that trained), `spec` written as JSON under `work`; the JSON object its last stdout line prints, or
    RuntimeError saying how `what` ended (a crash included)."""
    path = os.path.join(work, 'spec.json')
    with open(path, 'w') as f:
        json.dump(spec, f, default=str)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
    done = subprocess.run([sys.executable, '-m', module, path], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors='replace')
    if done.returncode:
        ended = f'signal {signal.Signals(-done.returncode).name}' if done.returncode < 0 else \
            f'exit code {done.returncode}'
        tail = ' | '.join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f'{what} ended with {ended}: {tail}')
    return json.loads(done.stdout.strip().splitlines()[-1])


def quantize_in_child(onnx_path: str, network: nn.Module, records: Sequence[Mapping[str, Any]], target: str) -> dict:
    """`quantize_detector` in a fresh Python process; its result ({'used', 'unreadable'}), or RuntimeError
    saying how it ended (a crash included)."""
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as work:
        return run_in_child('utils.export.int8_graphs', {
            'onnx': onnx_path, 'target': target, 'transform': transform_spec(network),
            'records': [{'image_path': r['image_path'], 'name': record_name(r)} for r in records]},
            work, 'the calibration process')


def save_int8_graph(network: nn.Module, folder: str, records: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """The int8 graph of `network` (`folder` holds its f32 detector graph, `cpu_graphs.graph_folder`), calibrated
    on up to `CALIBRATION_IMAGES` of `records`; the cost goes to the log. None when there is nothing to calibrate on."""
    chosen = calibration_records(records)
    if not chosen:
        logger.warning('no training image to calibrate the int8 graph on: a deploy asking for int8 runs f32')
        return None
    onnx_path = cpu_graphs.ensure_graph(network, cpu_graphs.DETECTOR, folder)
    logger.info('int8 graph: calibrating on %d of the %d training images (NNCF post-training quantization)',
                len(chosen), len(records))
    started = time.perf_counter()
    result = quantize_in_child(onnx_path, network, chosen, int8_path(folder))
    seconds = time.perf_counter() - started
    for name, reason in result['unreadable']:
        logger.warning('int8 calibration skipped %s: %s', name, reason)
    logger.info('int8 graph written to %s: calibrated on %d images in %.1f s (%.2f s an image)',
                int8_path(folder), result['used'], seconds, seconds / max(result['used'], 1))
    return int8_path(folder)


def main(spec_path: str) -> None:
    """The child process: quantize as `spec_path` says, print the result as one JSON line."""
    with open(spec_path) as f:
        spec = json.load(f)
    network = types.SimpleNamespace(transform=GeneralizedRCNNTransform(**spec['transform']).eval())
    inputs = CalibrationInputs(network, spec['records'])
    used = quantize_detector(spec['onnx'], inputs, spec['target'])
    unreadable = [(spec['records'][i]['name'], reason) for i, reason in sorted(inputs.unreadable.items())]
    print(json.dumps({'used': used, 'unreadable': unreadable}))


if __name__ == '__main__':
    main(sys.argv[1])
