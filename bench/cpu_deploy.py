"""The CPU deploy's speed: `adapter.predict` with each `cpu_runtime` against plain torchvision eager, same run.

    python bench/cpu_deploy.py [--variant fasterrcnn_resnet50_fpn] [--rounds 5] [--threads 2]

Rows (median seconds per image, calls interleaved round by round so background load hits every row alike):
plain torchvision eager fp32 at batch 1 (the reference), then `adapter.predict` end to end (decoded
HxWx3 uint8 image -> AnnotationCollection) with `cpu_runtime` torch, onnxruntime and openvino at the
CPU's default batch (`batch_size` auto), torch and openvino also at the other of batch 1 and 2, and openvino with
`cpu_precision` bf16 and int8 (calibrated on the run's six images, for speed only: with random weights the
int8 ranges say nothing of accuracy; bench/cpu_int8.py measures that). Images alternate 640x480, 480x640 and 600x400, so the
compiled graph meets several sizes. Then first-call latency (load + first predict of one image, in a
fresh adapter): torch; openvino when the model folder holds no graph (export + compile); openvino and
onnxruntime when it holds the graph written at save (what a deploy of a trained model downloads).
Random weights (no download here), the adapter's default thresholds on both sides. Names the CPU and
prints `uptime`'s load before and after: on a loaded machine read the ratios, not the seconds.
Without the bf16 and int8 rows it took 3 min 19 s on a quiet 2-core machine; with them (and the int8
calibration: 158 s under load 3-4) 9.5 minutes at --rounds 3 under load 3-4, so about 5-6 quiet
(bench/RESULTS.md).
"""
import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault('DATALOOP_PATH', tempfile.mkdtemp())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import torch  # noqa: E402
from torchvision.models import detection  # noqa: E402

from fasterrcnn_adapter import FasterRCNNAdapter  # noqa: E402
from utils.core import config as config_lib  # noqa: E402
from utils.export import cpu_graphs  # noqa: E402
from utils.modeling import model_factory  # noqa: E402
from utils.platform.local_model import local_model  # noqa: E402

SIZES = ((480, 640), (640, 480), (400, 600))  # (height, width)


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        return f'{names[0]} ({len(names)} logical CPUs)'
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def load_average() -> str:
    return ' '.join(f'{value:.2f}' for value in os.getloadavg())


def make_adapter(variant: str, folder: str, runtime: str, precision: str = 'f32') -> FasterRCNNAdapter:
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model({'pretrained': False, 'model_variant': variant, 'device': 'cpu',
                                        'cpu_runtime': runtime, 'cpu_precision': precision})
    adapter.load(folder)
    return adapter


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth gradients and blobs rather than white noise: nearer a photo's statistics."""
    rng = np.random.default_rng(seed)
    small = rng.random((height // 32 + 1, width // 32 + 1, 3))
    image = np.kron(small, np.ones((32, 32, 1)))[:height, :width]
    return (np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1) * 255).astype(np.uint8)


def plain_torchvision(variant: str, adapter: FasterRCNNAdapter):
    """torchvision's own builder with the adapter's weights and input sizes: eager fp32, batch 1."""
    min_size, max_size = model_factory.input_sizes(adapter.model)
    classes = adapter.model.roi_heads.box_predictor.cls_score.out_features  # 91 (COCO's) or a trained model's
    bare = getattr(detection, variant)(weights=None, weights_backbone=None, num_classes=classes, min_size=min_size,
                                       max_size=max_size).eval()
    bare.load_state_dict(adapter.model.state_dict())
    bare.roi_heads.score_thresh = config_lib.DEFAULTS['conf_threshold']

    def forward(image: np.ndarray):
        with torch.inference_mode():
            return bare([torch.from_numpy(image).permute(2, 0, 1).float() / 255])
    return forward


def first_call(variant: str, folder: str, runtime: str, image: np.ndarray) -> float:
    """Seconds from a fresh adapter's load to its first predict's return."""
    start = time.perf_counter()
    make_adapter(variant, folder, runtime).predict([image])
    return time.perf_counter() - start


def calibrate_int8(variant: str, folder: str, images, work: str) -> None:
    """The int8 graph of the folder's (random) weights, as training makes it, calibrated on `images`: for its
    speed only (its mAP change needs trained weights: bench/cpu_int8.py)."""
    records = []
    for index, image in enumerate(images):
        path = os.path.join(work, f'calibration_{index}.png')
        Image.fromarray(image).save(path)
        records.append({'image_path': path, 'name': os.path.basename(path)})
    adapter = make_adapter(variant, folder, 'openvino', 'int8')
    adapter._calibration_records = records
    started = time.perf_counter()
    adapter._save_cpu_graph(os.path.join(folder, adapter.settings['weights_filename']), folder, adapter.settings)
    print(f'int8 graph calibrated on {len(records)} images in {time.perf_counter() - started:.1f} s', flush=True)


def speed_rows(args, folder: str, images):
    """Median seconds per image of each row, interleaved round by round."""
    default_batch = config_lib.prediction_batch_size(config_lib.AUTO, torch.device('cpu'))
    adapters = {runtime: make_adapter(args.variant, folder, runtime) for runtime in config_lib.CPU_RUNTIMES}
    plain = plain_torchvision(args.variant, adapters['torch'])
    rows = {'plain torchvision eager fp32, batch 1': (lambda batch: [plain(image) for image in batch], 1)}
    for runtime in ('torch', 'onnxruntime', 'openvino'):  # the deploy defaults, then the other batch size
        for batch in sorted({default_batch, 3 - default_batch} if runtime != 'onnxruntime' else {default_batch}):
            rows[f'adapter.predict, cpu_runtime {runtime}, batch {batch}'] = (adapters[runtime].predict, batch)
    for precision in ('bf16', 'int8'):  # cpu_precision on OpenVINO, at the CPU's default batch
        predict = make_adapter(args.variant, folder, 'openvino', precision).predict
        rows[f'adapter.predict, openvino {precision}, batch {default_batch}'] = (predict, default_batch)
    for fn, batch in rows.values():  # warm-up: exports and compiles the graphs (cached in the folder)
        fn(images[:batch])
    times = {name: [] for name in rows}
    for round_index in range(args.rounds):
        for name, (fn, batch) in rows.items():
            start = round_index * batch % len(images)
            batch_images = [images[(start + i) % len(images)] for i in range(batch)]
            began = time.perf_counter()
            fn(batch_images)
            times[name].append((time.perf_counter() - began) / batch)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variant', default=config_lib.DEFAULTS['model_variant'])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(), help='torch threads (the pod: 2)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'CPU: {cpu_name()}; torch {torch.__version__} with {torch.get_num_threads()} threads')
    print(f'load average before: {load_average()}', flush=True)
    images = [photo_like(h, w, seed) for seed, (h, w) in enumerate(SIZES * 2)]
    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, 'model')
        torch.manual_seed(0)
        make_adapter(args.variant, '/nonexistent', 'torch').save(folder)  # the weights a deploy downloads (no graph)
        first = {'torch': first_call(args.variant, folder, 'torch', images[0]),
                 'openvino, no graph in the folder (export + compile)':
                     first_call(args.variant, folder, 'openvino', images[0])}
        shutil.rmtree(os.path.join(folder, cpu_graphs.GRAPHS_DIR, os.listdir(os.path.join(
            folder, cpu_graphs.GRAPHS_DIR))[0], 'openvino_cache'))  # a fresh pod: the graph came as an artifact
        first['openvino, graph in the artifacts (compile)'] = first_call(args.variant, folder, 'openvino', images[0])
        first['openvino, graph and compiled cache in the folder'] = first_call(args.variant, folder, 'openvino',
                                                                               images[0])
        first['onnxruntime, graph in the artifacts'] = first_call(args.variant, folder, 'onnxruntime', images[0])
        print('first call (load + first predict of one image, fresh adapter):')
        for name, value in first.items():
            print(f'  {name:55s} {value:7.2f} s', flush=True)
        calibrate_int8(args.variant, folder, images, work)
        medians = speed_rows(args, folder, images)
    reference = medians['plain torchvision eager fp32, batch 1']
    print(f'{args.variant}, images {", ".join(f"{w}x{h}" for h, w in SIZES)} (WxH), median of {args.rounds} '
          f'rounds, seconds per image and speed-up over plain torchvision:')
    for name, value in medians.items():
        print(f'  {name:55s} {value:7.3f} s  {reference / value:5.2f}x  ({1 / value:5.2f} images/s)')
    print(f'load average after: {load_average()}')


if __name__ == '__main__':
    main()
