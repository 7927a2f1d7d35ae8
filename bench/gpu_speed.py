"""The speed table in one run: each row of this project beside plain torchvision, measured in the same process.

    python bench/gpu_speed.py                       # on the GPU: resnet50_fpn, 640x480, min_size 800 (3.6 min, H100)
    python bench/gpu_speed.py --device cpu --tiny   # dry run on CPU: mobilenet_320 at 160 px, a couple of minutes
    python bench/gpu_speed.py --only 27             # some rows only
    BENCH_FROZEN_BN=1 python bench/gpu_speed.py     # prediction rows with FrozenBatchNorm2d, as pretrained models

Random weights (no download), entities built offline (no platform calls: the SDK's
annotation upload is the one step left out of "end to end"). One module per row, under bench/speed/:
  1. end_to_end: predict end to end through the adapter's predict_items, and its A/Bs at batch 16;
  2. predict_alone: adapter.predict alone on decoded images vs the bare forward at the same batch;
  3. train_steps: training steps on fixed-size vs mixed-size images, with and without grouping + buckets;
  4. engine_epoch: utils.training.engine.train_one_epoch vs a bare torchvision loop at the same precision;
  5. train_run: a short adapter.train (evaluation, checkpoints, curves) vs the bare loop, wall clock;
  6. decode: JPEG decode (prepare_item_func) on 1 thread and on many;
  7. boxes: building boxes, collection.add per box vs the adapter's bulk builder;
  8. defaults: training speed and peak GPU memory per batch size, AMP on and off, and prediction's peak.
Detections are made plentiful (score threshold 0, up to 100 per image) on both sides, so
post-processing and annotation building are priced in. The network has 3 labels, as a model
fine-tuned on a user's dataset would: with COCO's 91 classes at score threshold 0, 90,000
candidate boxes per image send torchvision's batched_nms into its per-class loop (90 NMS calls
per image), which then dominates both sides (figures in bench/RESULTS.md).
"""
import argparse
import logging
import os
import sys
import tempfile
import time

os.environ.setdefault('DATALOOP_PATH', tempfile.mkdtemp())
os.environ.setdefault('TQDM_DISABLE', '1')  # the SDK's and the trainer's progress bars
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.speed import (boxes, decode, defaults, end_to_end, engine_epoch, predict_alone,  # noqa: E402
                         train_run, train_steps)
from bench.speed.common import FULL, TINY, make_adapter, memory_items  # noqa: E402
from bench.speed.training import synthetic_training_set  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--tiny', action='store_true', help='small network and images: a CPU dry run')
    parser.add_argument('--only', default='12345678', help='which rows to run, e.g. 127')
    parser.add_argument('--run-epochs', type=int, help="row 5's epochs (default: 30, or 2 with --tiny)")
    parser.add_argument('--run-images', type=int, help="row 5's training images (default: 40, or 8 with --tiny)")
    return parser.parse_args()


def main():
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger('dtlpy').setLevel(logging.ERROR)
    cfg = dict(TINY if args.tiny else FULL)
    cfg.update({key: value for key, value in (('run_epochs', args.run_epochs), ('run_images', args.run_images))
                if value is not None})
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    name = torch.cuda.get_device_name(device) if cuda else f'CPU x{torch.get_num_threads()} threads'
    print(f'{name}, torch {torch.__version__}; ratio = ours / plain (>1: ours faster)', flush=True)
    start = time.perf_counter()

    def attempt(number, fn, *fn_args):
        """One row; a failure is printed and the next row still runs (one device run, every figure)."""
        if number not in args.only:
            return
        began = time.perf_counter()
        try:
            fn(*fn_args)
        except Exception:  # noqa: BLE001 - a bench prints what broke and goes on
            logging.exception('row %s failed', number)
        finally:
            print(f'   ({time.perf_counter() - began:.0f} s)', flush=True)

    items = adapter = training_set = None
    if set(args.only) & set('1268'):  # the prediction rows share one adapter and its items
        items, adapter = memory_items(cfg), make_adapter(cfg, device)
    attempt('1', end_to_end.rows, cfg, device, cuda, items, adapter)
    attempt('2', predict_alone.rows, cfg, device, cuda, items, adapter)
    attempt('3', train_steps.rows, cfg, device, cuda)
    if set(args.only) & set('45'):  # one synthetic set for both
        training_set = synthetic_training_set(cfg, device)
    attempt('4', engine_epoch.rows, cfg, device, cuda, training_set)
    attempt('5', train_run.rows, cfg, device, cuda, training_set)
    attempt('6', decode.rows, cfg, device, cuda, items, adapter)
    attempt('7', boxes.rows)
    attempt('8', defaults.rows, cfg, device, cuda, items, adapter)
    print(f'total {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
    main()
