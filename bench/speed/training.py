"""What the training rows and the profiler share: the tutorial's bare step and epoch, mixed image sizes, steps
timed over batches, and rows 4-5's synthetic set and fresh starting point."""
import statistics
import tempfile

import numpy as np
import torch

from bench.timing import seconds
from utils.data.synthetic import make_synthetic_export
from utils.modeling.model_factory import build_model


def mixed_sizes(count, cfg, seed):
    rng = np.random.default_rng(seed)
    (h0, h1), (w0, w1) = cfg['mixed']
    sizes = [(int(rng.integers(h0, h1 + 1)), int(rng.integers(w0, w1 + 1))) for _ in range(count)]
    return [size if rng.random() < 0.7 else size[::-1] for size in sizes]  # some portrait images too


def step_times(cfg, data, batches, bucket, device, amp, runs, batched=False):
    """Bare training steps over `batches` of `data`: (first pass, median steady pass) in ms/step, and peak GB
    (`batched`: with this project's batched RPN post-processing, else torchvision's)."""
    torch.manual_seed(0)
    model = build_model(cfg['variant'], 3, cfg['min_size'], cfg['max_size'], padding_bucket=bucket,
                        batched_postprocess=batched).to(device)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9)
    scaler = torch.amp.GradScaler('cuda', enabled=amp)

    def epoch():
        for indices in batches:
            bare_step(model, optimizer, scaler, [data[i][0] for i in indices], [data[i][1] for i in indices],
                      device, amp)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    first = seconds(epoch, device)
    steady = statistics.median(seconds(epoch, device) for _ in range(runs)) if runs else first
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else 0.0
    return first / len(batches) * 1000, steady / len(batches) * 1000, peak


def synthetic_loader(cfg, device, root):
    from utils.data.dataloop_reader import read_dataloop_export
    from utils.data.detection_dataset import DetectionDataset
    from utils.data.transforms import get_transform
    from utils.data.data_loading import collate_fn
    export = read_dataloop_export(root)
    label_to_id = {label: i + 1 for i, label in enumerate(export.labels_found)}
    dataset = DetectionDataset(export.subsets['train'], label_to_id, get_transform(train=False))
    return torch.utils.data.DataLoader(dataset, batch_size=cfg['train_batch'], shuffle=True, num_workers=2,
                                       collate_fn=collate_fn, pin_memory=device.type == 'cuda',
                                       persistent_workers=True), len(label_to_id) + 1


def bare_step(model, optimizer, scaler, images, targets, device, amp):
    """torchvision's detection tutorial step, nothing else."""
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    with torch.autocast(device.type, enabled=amp):
        loss = sum(model(images, targets).values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def bare_epoch(model, optimizer, scaler, loader, device, amp):
    """One pass of the tutorial step over `loader`."""
    model.train()
    for images, targets in loader:
        bare_step(model, optimizer, scaler, images, targets, device, amp)


#: the optimizer settings of rows 4-5 (the tutorial's lr, no weight decay on either side)
ENGINE_SETTINGS = dict(learning_rate=0.005, momentum=0.9, weight_decay=0.0)


def synthetic_training_set(cfg, device):
    """Rows 4-5's data: a synthetic export of `run_images` square images, and a loader over its training subset."""
    root = tempfile.mkdtemp()
    make_synthetic_export(root, n_train=cfg['run_images'], n_val=max(4, cfg['run_images'] // 5),
                          image_size=(cfg['run_size'], cfg['run_size']), seed=0)
    loader, num_classes = synthetic_loader(cfg, device, root)
    return root, loader, num_classes


def fresh_training(cfg, num_classes, device, cuda, ours):
    """Rows 4-5's starting point, the same each time: (network, the tutorial's SGD, GradScaler); `ours`: the
    network as this project builds it (batched post-processing on CUDA), else plain torchvision's."""
    torch.manual_seed(0)
    model = build_model(cfg['variant'], num_classes, cfg['run_size'], cfg['run_size'],
                        batched_postprocess=ours).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=ENGINE_SETTINGS['learning_rate'], momentum=ENGINE_SETTINGS['momentum'])
    return model, optimizer, torch.amp.GradScaler('cuda', enabled=cuda)
