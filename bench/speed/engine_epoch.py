"""Row 4: one epoch of utils.training.engine.train_one_epoch (with the trainer's fused SGD, and with plain SGD)
against a bare torchvision loop at the same precision, on the same synthetic set."""
from bench.speed.common import median_seconds, row
from bench.speed.training import ENGINE_SETTINGS, bare_epoch, fresh_training
from utils.training import engine
from utils.training.trainer import build_optimizer


def rows(cfg, device, cuda, training_set):
    _, loader, num_classes = training_set
    n = len(loader.dataset)
    model, optimizer, scaler = fresh_training(cfg, num_classes, device, cuda, ours=False)
    plain = n / median_seconds(lambda: bare_epoch(model, optimizer, scaler, loader, device, cuda), device, cfg['runs'])
    print(f'4. one epoch, {n} synthetic images {cfg["run_size"]} px, batch {cfg["train_batch"]}, '
          f'{"AMP" if cuda else "fp32"}')
    for label, fused in (('the trainer\'s fused SGD', True), ('plain SGD: a sync per step in fp32', False)):
        model, optimizer, scaler = fresh_training(cfg, num_classes, device, cuda, ours=True)
        if fused:
            optimizer = build_optimizer(model, ENGINE_SETTINGS)
        ours = n / median_seconds(lambda: engine.train_one_epoch(model, optimizer, loader, device, epoch=1,
                                                                 scaler=scaler if cuda else None, warmup_iters=0,
                                                                 progress=False), device, cfg['runs'])
        row(f'utils.training.engine.train_one_epoch ({label}) vs bare torchvision loop', ours, plain)
