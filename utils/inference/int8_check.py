"""The int8 graph's mAP against the f32 graph's on the validation subset, measured when the int8 graph is made.

Whether int8 costs a model accuracy depends on the model and its data, so each int8 graph carries its own answer:
after the calibration, a child process (`python -m utils.inference.int8_check SPEC`, kept out of the process that
trained, as the calibration is) runs both graphs on up to `CHECK_IMAGES` validation images under the COCO protocol
(boxes from score 0.05, the model's NMS and detections per image) and writes the result beside the graph
(`detector_int8_check.json`, uploaded with it). Training logs it, and so does a deploy that predicts with the
graph. The f32 graph gives PyTorch's detections to rounding (tests/test_cpu_runtime.py), so its mAP is the
trained model's.
"""
import json
import logging
import os
import sys
import tempfile
import types
from typing import Any, Dict, Mapping, Optional, Sequence

from torchvision.models.detection.transform import GeneralizedRCNNTransform

from utils.core.atomic import write_json
from utils.data.detection_dataset import DetectionDataset
from utils.data.images import load_image_tensor
from utils.evaluation.coco_eval import rows_evaluation
from utils.evaluation.coco_utils import get_coco_api_from_dataset
from utils.export import cpu_graphs, int8_graphs
from utils.inference import cpu_precision

logger = logging.getLogger(__name__)

CHECK_FILE = 'detector_int8_check.json'  # beside detector_int8.xml
#: Validation images at most, evenly spread: both graphs run on each (resnet50 at 800 px: about 2.6 s an image)
CHECK_IMAGES = 100
METRICS = ('mAP_50', 'mAP')


def check_path(folder: str) -> str:
    return os.path.join(folder, CHECK_FILE)


def measure(onnx_path: str, int8_path: str, network, records: Sequence[Mapping[str, Any]],
            label_to_id: Mapping[str, int]) -> Optional[Dict[str, Any]]:
    """mAP@.5 and mAP@[.5:.95] of the f32 and int8 graphs on `records` ({'images', 'f32': {...}, 'int8': {...}}),
    or None when none of them can be read. `network` needs only the network's `transform`."""
    from utils.inference.cpu_runtime import OpenVinoGraph, graph_rows  # which imports this module
    # no compiled cache: one made on the training machine must not travel to the deploys with the artifacts
    graphs = {cpu_precision.F32: OpenVinoGraph(onnx_path, cpu_precision.F32, cache=False),
              cpu_precision.INT8: OpenVinoGraph(int8_path, cpu_precision.INT8, cache=False)}
    ground_truth = get_coco_api_from_dataset(DetectionDataset(records, label_to_id))
    found: Dict[str, Dict[int, list]] = {precision: {} for precision in graphs}
    for index, record in enumerate(records):
        try:
            image = load_image_tensor(record['image_path'])
        except Exception:  # an unreadable image costs the check one sample
            continue
        for precision, graph in graphs.items():
            found[precision][index] = graph_rows(graph, network, image, cpu_graphs.SCORE_FLOOR)
    used = len(found[cpu_precision.F32])
    if not used:
        return None
    result: Dict[str, Any] = {'images': used}
    for precision, rows in found.items():
        evaluation = rows_evaluation(ground_truth, rows)
        result[precision] = {name: float(evaluation[name]) for name in METRICS}
    return result


def write_check(folder: str, check: Mapping[str, Any]) -> None:
    write_json(check_path(folder), dict(check))


def read_check(folder: str) -> Optional[Dict[str, Any]]:
    """The check written beside the int8 graph in `folder`, or None (a graph made without one, an unreadable file)."""
    try:
        with open(check_path(folder)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def describe(check: Mapping[str, Any]) -> str:
    """One line: int8's mAP against f32's, and the change in points."""
    f32, int8 = check[cpu_precision.F32], check[cpu_precision.INT8]
    return (f'on {check["images"]} validation images: mAP@.5 {int8["mAP_50"]:.4f} against f32\'s {f32["mAP_50"]:.4f} '
            f'({100 * (int8["mAP_50"] - f32["mAP_50"]):+.2f} points), mAP@[.5:.95] {int8["mAP"]:.4f} against '
            f'{f32["mAP"]:.4f} ({100 * (int8["mAP"] - f32["mAP"]):+.2f} points)')


def _check_record(record: Mapping[str, Any]) -> Dict[str, Any]:
    """What the check needs of a validation record (its image and boxes), as JSON."""
    keys = ('image_path', 'width', 'height', 'boxes', 'labels', 'name', 'item_id', 'frame')
    return {key: record[key] for key in keys if key in record}


def save_check(network, folder: str, records: Sequence[Mapping[str, Any]], label_to_id: Mapping[str, int]) -> None:
    """Measure the int8 graph in `folder` against its f32 graph on up to `CHECK_IMAGES` of `records` (evenly
    spread), in a child process; the result goes beside the graph and to the log. A failure costs the figure only."""
    chosen = int8_graphs.calibration_records(records, CHECK_IMAGES)
    if not chosen:
        logger.warning('the int8 graph\'s accuracy was not measured: no validation images')
        return
    try:
        with tempfile.TemporaryDirectory(dir=folder) as work:
            result = int8_graphs.run_in_child('utils.inference.int8_check', {
                'folder': folder, 'transform': int8_graphs.transform_spec(network),
                'records': [_check_record(r) for r in chosen], 'label_to_id': dict(label_to_id)},
                work, 'the int8 check\'s process')
    except Exception as err:
        logger.warning('the int8 graph\'s accuracy was not measured (%s: %s); the graph is kept',
                       type(err).__name__, err)
        return
    if result:
        logger.info('int8 graph against f32 %s', describe(result))
    else:
        logger.warning('the int8 graph\'s accuracy was not measured: none of the validation images could be read')


def main(spec_path: str) -> None:
    """The child process: measure as `spec_path` says, write the check beside the graph, print it as one JSON line."""
    with open(spec_path) as f:
        spec = json.load(f)
    network = types.SimpleNamespace(transform=GeneralizedRCNNTransform(**spec['transform']).eval())
    folder = spec['folder']
    check = measure(os.path.join(folder, f'{cpu_graphs.DETECTOR}.onnx'), int8_graphs.int8_path(folder), network,
                    spec['records'], spec['label_to_id'])
    if check:
        write_check(folder, check)
    print(json.dumps(check))


if __name__ == '__main__':
    main(sys.argv[1])
