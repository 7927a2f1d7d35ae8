"""Training throughput of `utils.training.engine.train_one_epoch` against a bare torchvision loop, same run.

    python bench/train_speed.py [--variant fasterrcnn_mobilenet_v3_large_320_fpn] [--device cpu]
                                [--images 24] [--size 320] [--batch 2]

Both loops train the same freshly initialised network on the same synthetic
images (utils/data/synthetic.py) and DataLoader; the bare loop is torchvision's
tutorial step (sum of losses, backward, SGD step). On CUDA our loop runs with
autocast + GradScaler (the `amp` default) and the bare loop is timed both in
fp32 and under autocast. Prints images/s and the ratios.
"""
import argparse
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from utils.training import engine  # noqa: E402
from utils.data.dataloop_reader import read_dataloop_export  # noqa: E402
from utils.data.detection_dataset import DetectionDataset  # noqa: E402
from utils.modeling.model_factory import build_model  # noqa: E402
from utils.data.synthetic import make_synthetic_export  # noqa: E402
from utils.data.transforms import get_transform  # noqa: E402
from utils.data.data_loading import collate_fn  # noqa: E402
from bench.timing import seconds  # noqa: E402


def bare_epoch(model, optimizer, loader, device, amp):
    """torchvision's detection tutorial step, nothing else."""
    model.train()
    scaler = torch.amp.GradScaler('cuda') if amp else None
    for images, targets in loader:
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, enabled=amp):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()


def timed_images_per_s(fn, n_images, device):
    return n_images / seconds(fn, device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variant', default='fasterrcnn_mobilenet_v3_large_320_fpn')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--images', type=int, default=24)
    parser.add_argument('--size', type=int, default=320)
    parser.add_argument('--batch', type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    root = tempfile.mkdtemp()
    make_synthetic_export(root, n_train=args.images, n_val=0, image_size=(args.size, args.size), seed=0)
    export = read_dataloop_export(root)
    label_to_id = {label: i + 1 for i, label in enumerate(export.labels_found)}
    dataset = DetectionDataset(export.subsets['train'], label_to_id, get_transform(train=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=False, num_workers=2,
                                         collate_fn=collate_fn, pin_memory=device.type == 'cuda')
    n = len(dataset)

    def fresh():
        torch.manual_seed(0)
        model = build_model(args.variant, len(label_to_id) + 1, args.size, args.size).to(device)
        return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)

    amp = device.type == 'cuda'
    results = {}
    for name, amp_bare in [('bare fp32', False)] + ([('bare amp', True)] if amp else []):
        model, optimizer = fresh()
        bare_epoch(model, optimizer, loader, device, amp_bare)  # warm-up epoch
        results[name] = timed_images_per_s(lambda: bare_epoch(model, optimizer, loader, device, amp_bare), n, device)
    model, optimizer = fresh()
    scaler = torch.amp.GradScaler('cuda') if amp else None

    def ours(epoch):
        engine.train_one_epoch(model, optimizer, loader, device, epoch=epoch, scaler=scaler,
                               warmup_iters=0, progress=False)
    ours(1)  # warm-up epoch
    results['engine' + (' amp' if amp else '')] = timed_images_per_s(lambda: ours(2), n, device)

    name = torch.cuda.get_device_name(device) if amp else f'CPU x{torch.get_num_threads()} threads'
    print(f'{args.variant} training on {name}, {n} images {args.size}x{args.size}, batch {args.batch}:')
    for key, value in results.items():
        print(f'  {key:<12} {value:8.2f} images/s')
    ours_key = 'engine amp' if amp else 'engine'
    same_precision = 'bare amp' if amp else 'bare fp32'
    print(f'  ratio engine/bare (same precision) {results[ours_key] / results[same_precision]:.2f}')
    if amp:
        print(f'  ratio engine amp / bare fp32       {results[ours_key] / results["bare fp32"]:.2f}')


if __name__ == '__main__':
    main()
