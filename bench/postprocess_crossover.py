"""Prediction forward by batch size: plain torchvision, ours with batched post-processing, ours without it.

    python bench/postprocess_crossover.py                      # on the GPU (under a minute on an H100)
    python bench/postprocess_crossover.py --device cpu --tiny  # dry run

`utils.modeling.batched_postprocess` post-processes the whole batch at once; its fixed cost per call (a
few sync rounds) pays from some batch size on. This prints the forward's time per batch size
for the three, same run, to choose `MIN_IMAGES`.
"""
import os
import statistics
import sys
import tempfile

os.environ.setdefault('DATALOOP_PATH', tempfile.mkdtemp())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.speed.common import bare_forward, bare_network, forward_bench  # noqa: E402
from bench.timing import seconds  # noqa: E402
from utils.modeling import batched_postprocess  # noqa: E402
from utils.inference.prediction import detection_rows, set_postprocess  # noqa: E402


def main():
    args, cfg, device, half, adapter, images = forward_bench(__doc__.splitlines()[0], runs=7)
    network = adapter._inference_networks.get(adapter.model, device)
    set_postprocess(network, 0.0, adapter.settings['nms_iou_threshold'], 100)
    plain = bare_network(adapter, cfg, device)

    def ms(fn):
        fn()
        return statistics.median(seconds(fn, device) for _ in range(args.runs)) * 1000

    print(f'{torch.cuda.get_device_name(device) if half else "CPU"}: forward ms per batch (img/s), '
          f'{cfg["variant"]} at {cfg["min_size"]} px, score threshold 0, 100 detections', flush=True)
    default = batched_postprocess.MIN_IMAGES
    for batch in (1, 2, 4, 8, 16):
        chunk = images[:batch]
        times = {'plain': ms(lambda: bare_forward(plain, chunk, device, half))}
        for name, least in (('ours batched', 1), ('ours per image', 10 ** 9)):
            batched_postprocess.MIN_IMAGES = least
            times[name] = ms(lambda: detection_rows(network, chunk, device))
        batched_postprocess.MIN_IMAGES = default
        print(f'  batch {batch:2}: ' + '  '.join(f'{name} {t:7.1f} ({batch / t * 1000:5.0f})'
                                                for name, t in times.items()), flush=True)


if __name__ == '__main__':
    main()
