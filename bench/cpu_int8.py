"""`cpu_precision` on a trained model: mAP@.5 on the validation subset and speed for torch, OpenVINO f32, bf16, int8.

    python bench/cpu_int8.py [--output DIR] [--model MODEL_DIR --data DATA_DIR] [--rounds 5] [--threads 2]

Without --model it makes the demo's synthetic set (`local_runner/demo.py`'s DEMO_DATA) and trains the demo's
model on it (DEMO_SETTINGS, from random weights) with `cpu_precision` int8, so the save at the end of training
calibrates the int8 graph on the training images as on the platform (its cost is printed). With --model (a
`train` output, e.g. demo_output/model) and --data (its export, demo_output/data) it reuses them, calibrating
the int8 graph first if the folder has none. Then each precision predicts every validation image through
`adapter.predict`'s forward (COCO protocol: scores from 0.05, NMS 0.5, 100 boxes) for COCO mAP@.5 and
mAP@[.5:.95], and the median seconds per image of `adapter.predict` end to end (interleaved, round by round)
against plain torchvision eager fp32 at batch 1 in the same run. Names the CPU and the load average.
Run time: the demo's training is 3 minutes on a quiet 2-core machine (bench/RESULTS.md), the calibration on its
250 images took 68 s and the rest 2 minutes under load 3, so about 5-6 minutes quiet; under load 4-5 the
training alone took 20 minutes.
"""
import argparse
import glob
import logging
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault('DATALOOP_PATH', tempfile.mkdtemp())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cpu_deploy import cpu_name, load_average, plain_torchvision  # noqa: E402
from local_runner.demo import DEMO_DATA, DEMO_SETTINGS  # noqa: E402
from local_runner.model_folder import load_model_dir, train_on_folder  # noqa: E402
from utils.core.label_map import label_to_id  # noqa: E402
from utils.data.dataloop_reader import read_dataloop_export  # noqa: E402
from utils.data.detection_dataset import DetectionDataset  # noqa: E402
from utils.data.images import load_image_tensor  # noqa: E402
from utils.data.synthetic import make_synthetic_export  # noqa: E402
from utils.evaluation.coco_eval import Evaluation, rows_evaluation  # noqa: E402
from utils.evaluation.coco_utils import get_coco_api_from_dataset  # noqa: E402
from utils.export import cpu_graphs, int8_graphs  # noqa: E402

ROWS = {'torch (PyTorch eager)': {'cpu_runtime': 'torch'},
        'openvino f32': {'cpu_runtime': 'openvino', 'cpu_precision': 'f32'},
        'openvino bf16': {'cpu_runtime': 'openvino', 'cpu_precision': 'bf16'},
        'openvino int8': {'cpu_runtime': 'openvino', 'cpu_precision': 'int8'}}
COCO_PROTOCOL = {'conf_threshold': 0.05, 'nms_iou_threshold': 0.5, 'max_detections': 100}


def trained_model(args):
    """(model folder, data folder): trained here with cpu_precision int8, or the ones given."""
    if args.model:
        return args.model, args.data
    data, model = os.path.join(args.output, 'data'), os.path.join(args.output, 'model')
    make_synthetic_export(data, **DEMO_DATA)
    started = time.perf_counter()
    train_on_folder(data, model, {**DEMO_SETTINGS, 'device': 'cpu', 'cpu_precision': 'int8'})
    print(f'trained the demo model and calibrated its int8 graph in {time.perf_counter() - started:.0f} s '
          f'(the int8 calibration\'s own cost is the log\'s "int8 graph written" line)', flush=True)
    return model, data


def ensure_int8(adapter, data: str) -> None:
    """A model folder without an int8 graph gets one as training makes it (`save`), calibrated on its training
    subset."""
    if list(glob.glob(os.path.join(adapter.artifacts_path, cpu_graphs.GRAPHS_DIR, '*', int8_graphs.INT8_GRAPH))):
        return
    subsets = read_dataloop_export(data, labels=list(adapter.id_to_label_map().values())).subsets
    adapter._calibration_records, adapter._check_records = subsets['train'], subsets.get('validation', [])
    started = time.perf_counter()
    adapter._save_cpu_graph(os.path.join(adapter.artifacts_path, adapter.settings['weights_filename']),
                            adapter.artifacts_path, adapter.settings)
    print(f'int8 graph calibrated in {time.perf_counter() - started:.0f} s', flush=True)


def validation_images(adapter, data: str):
    """The validation subset as (dataset for the COCO ground truth, decoded uint8 CHW images)."""
    id_to_label = adapter.id_to_label_map()
    records = read_dataloop_export(data, labels=list(id_to_label.values())).subsets['validation']
    dataset = DetectionDataset(records, label_to_id(id_to_label))
    return dataset, [load_image_tensor(record['image_path']) for record in records]


def detections(adapter, images) -> list:
    """Each image's rows [x1, y1, x2, y2, score, label id] from `adapter.predict`'s forward pass."""
    return [adapter._detect([image])[1][0] for image in images]


def coco_map(dataset, found) -> Evaluation:
    return rows_evaluation(get_coco_api_from_dataset(dataset), dict(enumerate(found)))


def parity(reference, found, threshold: float = DEMO_SETTINGS['conf_threshold']) -> str:
    """How many of the reference's boxes scoring >= `threshold` the other rows hold within the CPU runtime's
    parity bar (same label, corners within 1 px, score within 0.01), and the worst corner and score change
    of each such box against the same-label box nearest to it."""
    matched = total = 0
    worst_px = worst_score = 0.0
    for want, got in zip(reference, found):
        for *corners, score, label in (row for row in want if row[4] >= threshold):
            total += 1
            same = [row for row in got if row[5] == label] or [[np.inf] * 6]
            nearest = min(same, key=lambda row: max(abs(a - b) for a, b in zip(row[:4], corners)))
            px, change = max(abs(a - b) for a, b in zip(nearest[:4], corners)), abs(nearest[4] - score)
            matched += px <= 1 and change <= 0.01
            worst_px, worst_score = max(worst_px, px), max(worst_score, change)
    return f'{matched}/{total} boxes within 1 px and 0.01 (worst {worst_px:.1f} px, {worst_score:.3f})'


def speeds(adapters, plain, images, rounds: int):
    """Median seconds per image of each row's `predict` (batch 1), interleaved round by round."""
    rows = {'plain torchvision eager fp32, batch 1': plain, **{name: a.predict for name, a in adapters.items()}}
    times = {name: [] for name in rows}
    for round_index in range(rounds):
        image = images[round_index % len(images)]
        for name, fn in rows.items():
            began = time.perf_counter()
            fn([image])
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--output', default=None, help='where the synthetic set and model go (default: a temp dir)')
    parser.add_argument('--model', help='a `train` output folder to reuse (with --data)')
    parser.add_argument('--data', help='the export --model was trained on')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(), help='torch threads (the pod: 2)')
    args = parser.parse_args()
    if bool(args.model) != bool(args.data):
        parser.error('--model and --data go together')
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    logging.getLogger(int8_graphs.__name__).setLevel(logging.INFO)  # the calibration's cost
    print(f'CPU: {cpu_name()}; torch {torch.__version__} with {torch.get_num_threads()} threads')
    print(f'load average before: {load_average()}', flush=True)
    args.output = args.output or tempfile.mkdtemp()
    model, data = trained_model(args)
    adapters = {name: load_model_dir(model, {**COCO_PROTOCOL, 'device': 'cpu', **row}) for name, row in ROWS.items()}
    ensure_int8(adapters['openvino int8'], data)
    dataset, images = validation_images(adapters['torch (PyTorch eager)'], data)
    found = {name: detections(adapter, images) for name, adapter in adapters.items()}
    maps = {name: coco_map(dataset, rows) for name, rows in found.items()}
    plain = plain_torchvision(adapters['torch (PyTorch eager)'].settings['model_variant'],
                              adapters['torch (PyTorch eager)'])
    medians = speeds(adapters, lambda batch: [plain(np.ascontiguousarray(i.permute(1, 2, 0).numpy())) for i in batch],
                     images, args.rounds)
    reference = medians.pop('plain torchvision eager fp32, batch 1')
    variant = adapters['torch (PyTorch eager)'].settings['model_variant']
    print(f'{variant} trained on the synthetic set; {len(images)} validation images; speed: median of '
          f'{args.rounds} images, adapter.predict end to end at batch 1 against plain torchvision eager fp32 '
          f'({reference:.3f} s an image):')
    base, torch_rows = maps['torch (PyTorch eager)']['mAP_50'], found['torch (PyTorch eager)']
    for name, evaluation in maps.items():
        print(f'  {name:24s} mAP@.5 {evaluation["mAP_50"]:.4f} ({100 * (evaluation["mAP_50"] - base):+5.2f} points)  '
              f'mAP {evaluation["mAP"]:.4f}  {medians[name]:7.3f} s  {reference / medians[name]:5.2f}x  '
              f'against torch: {parity(torch_rows, found[name])}')
    print(f'load average after: {load_average()}')


if __name__ == '__main__':
    main()
