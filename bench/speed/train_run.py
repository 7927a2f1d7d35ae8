"""Row 5: a short adapter.train (evaluation, checkpoints, curves each epoch) against the bare loop for as many
epochs, wall clock, and how much of it is training, evaluation and the rest (setup, checkpoints, curves between
epochs). --run-epochs / --run-images change its size (30 epochs on 40 images by default)."""
import os
import tempfile
import time

import torch

from bench.speed.common import row
from bench.speed.training import bare_epoch, fresh_training
from bench.timing import seconds
from fasterrcnn_adapter import FasterRCNNAdapter
from utils.platform import training_run
from utils.platform.local_model import local_model


def trained_adapter(cfg, device, cuda, root):
    """The adapter as train_model sets it up, on the synthetic set at `root`."""
    size = cfg['run_size']
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model({'pretrained': False, 'model_variant': cfg['variant'], 'device': device.type,
                                        'min_size': size, 'max_size': size, 'batch_size': cfg['train_batch'],
                                        'epochs': cfg['run_epochs'], 'num_workers': 2, 'amp': cuda,
                                        'warmup_iters': 0, 'learning_rate': 0.005},
                                       labels=['circle', 'square', 'triangle'])
    torch.manual_seed(0)
    adapter.load('/nonexistent')
    adapter.convert_from_dtlpy(root)
    return adapter


def rows(cfg, device, cuda, training_set):
    root, loader, num_classes = training_set
    n, epochs = len(loader.dataset), cfg['run_epochs']
    model, optimizer, scaler = fresh_training(cfg, num_classes, device, cuda, ours=False)
    plain_wall = seconds(lambda: [bare_epoch(model, optimizer, scaler, loader, device, cuda)
                                  for _ in range(epochs)], device)
    adapter = trained_adapter(cfg, device, cuda, root)
    results, published = [], []
    training_run.PlatformTraining.publish_metrics = \
        lambda self, epoch, metrics: published.append(time.perf_counter())  # each epoch's end
    began = time.perf_counter()
    ours_wall = seconds(lambda: results.append(adapter.train(root, tempfile.mkdtemp())), device)
    print(f'5. {epochs} epochs on {n} images (+{len(os.listdir(os.path.join(root, "validation", "items")))} '
          f'validation), wall clock')
    row('adapter.train (eval, checkpoints, curves each epoch) vs bare loop', ours_wall, plain_wall, unit='s')
    history = results[-1].history
    training = sum(record['train_time'] for record in history)
    evaluation = sum(record['eval_time'] for record in history)
    first = history[0]['train_time'] + history[0]['eval_time']
    setup, tail = published[0] - began - first, began + ours_wall - published[-1]
    print(f'   of which training {training:.1f} s, evaluation {evaluation:.1f} s, the rest '
          f'{ours_wall - training - evaluation:.1f} s: setup {setup:.1f} s, between epochs '
          f'{ours_wall - training - evaluation - setup - tail:.1f} s, after the last (best weights, final '
          f'checkpoints, curves) {tail:.1f} s')
