"""Time `FasterRCNNAdapter.predict` against a bare torchvision forward of the same network, same run.

    python bench/predict_speed.py [--variant fasterrcnn_resnet50_fpn] [--device cpu] [--batch 1] [--runs 5]

Random weights (no download here); the thresholds are the adapter's defaults,
so both sides run NMS on the same candidate set. Prints medians and the ratio.
"""
import argparse
import os
import statistics
import sys
import tempfile

os.environ.setdefault('DATALOOP_PATH', tempfile.mkdtemp())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.models import detection  # noqa: E402

from fasterrcnn_adapter import FasterRCNNAdapter  # noqa: E402
from utils.modeling import model_factory  # noqa: E402
from utils.platform.local_model import local_model  # noqa: E402
from bench.timing import seconds  # noqa: E402


def timed(fns, runs, device):
    """Median time of each function, calls interleaved so background load hits both alike."""
    times = [[seconds(fn, device) for fn in fns] for _ in range(runs)]
    return [statistics.median(column) for column in zip(*times)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variant', default='fasterrcnn_resnet50_fpn')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=480)
    args = parser.parse_args()
    device = torch.device(args.device)

    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model({'pretrained': False, 'model_variant': args.variant, 'device': args.device})
    torch.manual_seed(0)
    adapter.load('/nonexistent')
    images = [(np.random.default_rng(i).random((args.height, args.width, 3)) * 255).astype(np.uint8)
              for i in range(args.batch)]

    min_size, max_size = model_factory.input_sizes(adapter.model)  # same input resolution on both sides
    sizes = dict(min_size=min_size, max_size=max_size)
    bare = getattr(detection, args.variant)(weights=None, weights_backbone=None, num_classes=91, **sizes).to(device).eval()
    bare.load_state_dict(adapter.model.state_dict())
    bare.roi_heads.score_thresh = adapter.model.roi_heads.score_thresh = 0.5

    def torchvision_forward():
        tensors = [torch.from_numpy(im).permute(2, 0, 1).to(device).float() / 255 for im in images]
        with torch.inference_mode():
            return bare(tensors)

    def adapter_predict():
        return adapter.predict(images)

    for fn in (torchvision_forward, adapter_predict):  # warm-up (cudnn autotune, allocator)
        fn()
    t_bare, t_adapter = timed([torchvision_forward, adapter_predict], args.runs, device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU x{torch.get_num_threads()} threads'
    print(f'{args.variant} on {name}, batch {args.batch} of {args.width}x{args.height}, median of {args.runs}:')
    print(f'  torchvision forward   {t_bare * 1000:8.1f} ms')
    print(f'  adapter.predict       {t_adapter * 1000:8.1f} ms')
    print(f'  ratio adapter/bare    {t_adapter / t_bare:8.2f}')


if __name__ == '__main__':
    main()
