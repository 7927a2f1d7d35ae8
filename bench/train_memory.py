"""Peak host memory of one training step per image, plain torchvision: what `utils.training.batch_bound` bounds by.

Runs one step (forward, backward, SGD) of `fasterrcnn_resnet50_fpn` (random weights) at batch B in a fresh
process per B and prints the peak resident memory above the process's start, per image and per megapixel of
network input. The adapter's training step is torchvision's (`utils.training.engine`), so the figure is the
plain one: `BYTES_PER_TRAIN_MEGAPIXEL` is set at or above the largest per-image figure printed.

    python bench/train_memory.py --batches 1 2 4 --height 800 --width 1333
"""
import argparse
import resource
import subprocess
import sys


def step(batch: int, height: int, width: int) -> float:
    """MiB of peak resident memory added by one training step at `batch` (run in this process)."""
    import torch
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, min_size=height,
                                    max_size=width).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    images = [torch.rand(3, height, width) for _ in range(batch)]
    targets = [{'boxes': torch.tensor([[10.0, 20.0, 200.0, 300.0]]), 'labels': torch.tensor([1])}
               for _ in range(batch)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = sum(model(images, targets).values())
    loss.backward()
    optimizer.step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--height', type=int, default=800)
    parser.add_argument('--width', type=int, default=1333)
    parser.add_argument('--one', type=int, help=argparse.SUPPRESS)  # the child process's batch
    args = parser.parse_args()
    if args.one:
        print(step(args.one, args.height, args.width))
        return
    megapixels = args.height * args.width / 1e6
    for batch in args.batches:
        out = subprocess.run([sys.executable, __file__, '--one', str(batch), '--height', str(args.height),
                              '--width', str(args.width)], capture_output=True, text=True, check=True)
        added = float(out.stdout.strip().splitlines()[-1])
        print(f'batch {batch}: +{added:.0f} MiB, {added / batch:.0f} MiB per image, '
              f'{added / batch / megapixels / 1024:.2f} GiB per megapixel')


if __name__ == '__main__':
    main()
