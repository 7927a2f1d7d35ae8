"""CPU time of the non-finite check every checkpoint write and load runs, against the element-wise check.

`utils.modeling.checkpoints._non_finite` sums each floating-point tensor and looks at the values only when
the sum is not finite; the plain way is `torch.isfinite(t).all()` per tensor (a bool tensor as large as each
weight). Prints both on the state dict of each variant asked (random weights, one thread by default, as
the checkpoint writer's thread competes with training for the cores), and the ratio.

    python bench/checkpoint_check.py --variants fasterrcnn_mobilenet_v3_large_320_fpn fasterrcnn_resnet50_fpn
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import best_of  # noqa: E402


def cpu_seconds(fn, rounds: int) -> float:
    return best_of(fn, rounds, clock=time.process_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--variants', nargs='+', default=['fasterrcnn_mobilenet_v3_large_320_fpn',
                                                         'fasterrcnn_resnet50_fpn'])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    import torch
    from utils.modeling import checkpoints, model_factory
    torch.set_num_threads(args.threads)
    for variant in args.variants:
        state = model_factory.build_model(variant, 4, 320, 320).state_dict()
        floats = [v for v in state.values() if v.is_floating_point()]
        plain = cpu_seconds(lambda: [bool(torch.isfinite(v).all()) for v in floats], args.rounds)
        ours = cpu_seconds(lambda: checkpoints._non_finite(state), args.rounds)
        print(f'{variant}: {sum(v.numel() for v in floats) / 1e6:.1f}M values; isfinite(t).all() {plain:.4f} '
              f'CPU s, sum first {ours:.4f} CPU s: {plain / ours:.1f}x less')


if __name__ == '__main__':
    main()
