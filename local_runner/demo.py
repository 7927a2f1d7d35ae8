"""`demo`: a seeded synthetic set -> train from random weights -> evaluate -> predict, with a summary."""
import logging
import os
import shutil
import time
from typing import Any, Dict, Optional

from local_runner.inputs import list_images
from local_runner.model_folder import load_model_dir, train_on_folder
from local_runner.predict import predict_images
from local_runner.report import evaluate_on_folder
from utils.core import config as config_lib
from utils.core.errors import InputError

logger = logging.getLogger(__name__)

# `demo` trains from random weights on a synthetic set, on CPU, so a new user sees the
# whole flow (data -> train -> evaluate -> predict) work on any laptop with no download.
# Every knob the demo uses lives in these two dicts and nowhere else, because the values
# are an engineering trade-off that is measured, not guessed: they must reach validation
# mAP@.5 >= 0.5 within 10 minutes on 2 CPU cores from random weights (see
# bench/demo_feasibility.py). Whoever re-measures plugs the winning values in here.
# Measured (bench/RESULTS.md): the 320 mobilenet variant at 256 px with 64 sampled RoIs and
# 500 proposals per image costs ~0.19 s of 2-core CPU per training image (torchvision's
# 512 / 2000 cost ~3x that, for no gain on 1-4 large objects); 4 epochs of 250 images
# (1000 image-passes) with SGD lr 0.02 + cosine reach mAP@.5 0.98-1.0 over 3 seeds.
DEMO_DATA: Dict[str, Any] = {          # utils.data.synthetic.make_synthetic_export arguments
    'n_train': 250,
    'n_val': 60,
    'image_size': (256, 256),          # (width, height)
    'labels': ('circle', 'square', 'triangle'),
    'seed': 0,
}
DEMO_SETTINGS: Dict[str, Any] = {      # model configuration keys (utils/core/config.py), over dataloop.json's
    'model_variant': 'fasterrcnn_mobilenet_v3_large_320_fpn',
    'pretrained': False,               # offline: random weights, no COCO download
    'device': 'auto',                  # CPU unless CUDA is there
    'min_size': 256,
    'max_size': 256,
    'rpn_post_nms_top_n_train': 500,
    'box_batch_size_per_image': 64,
    'epochs': 4,
    'batch_size': 4,
    'learning_rate': 0.02,
    'momentum': 0.9,
    'weight_decay': 0.0001,
    'warmup_iters': 50,
    'lr_scheduler': 'cosine',
    'max_grad_norm': 10.0,
    'num_workers': 0,                  # 2 cores: decoding 256 px JPEGs in-process is cheaper than workers
    'augment_hflip': True,
    'conf_threshold': 0.5,
    'seed': 0,
}

DEMO_MARKER = '.local_runner_demo'


def format_duration(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    return f'{int(minutes)}m{rest:04.1f}s' if minutes else f'{rest:.1f}s'


def prepare_demo_output(path: str) -> None:
    """The demo owns its output folder: a new or empty one, or one an earlier demo wrote (marker file)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f'--output {path} is a file, not a folder')
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, DEMO_MARKER)):
        raise InputError(f'--output {path} is not empty and was not written by the demo: '
                         f'give a new or empty folder')
    os.makedirs(path, exist_ok=True)
    for sub in ('model', 'predictions'):
        shutil.rmtree(os.path.join(path, sub), ignore_errors=True)
    with open(os.path.join(path, DEMO_MARKER), 'w') as f:
        f.write('written by `python -m local_runner demo`; the demo replaces this folder\'s contents\n')


def run_demo(output: str, data_overrides: Optional[Dict[str, Any]] = None,
             settings_overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Synthetic data -> train from random weights -> evaluate -> predict on the validation images."""
    from utils.data.synthetic import make_synthetic_export
    data_settings = {**DEMO_DATA, **(data_overrides or {})}
    settings = {**DEMO_SETTINGS, **(settings_overrides or {})}
    config_lib.resolve(settings)  # a bad setting fails before any data is written
    prepare_demo_output(output)
    data_dir = os.path.join(output, 'data')
    model_dir = os.path.join(output, 'model')
    predictions_dir = os.path.join(output, 'predictions')
    times: Dict[str, float] = {}
    start = time.time()

    tic = time.time()
    logger.info('demo 1/4: writing a synthetic set (%d train / %d validation images) under %s',
                data_settings['n_train'], data_settings['n_val'], data_dir)
    make_synthetic_export(data_dir, overwrite=True, **data_settings)
    times['data'] = time.time() - tic

    tic = time.time()
    logger.info('demo 2/4: training %s from random weights for %d epoch(s)', settings['model_variant'],
                settings['epochs'])
    trained = train_on_folder(data_dir, model_dir, settings, labels=list(data_settings['labels']))
    times['train'] = time.time() - tic

    tic = time.time()
    logger.info('demo 3/4: evaluating on the validation images')
    adapter = load_model_dir(model_dir)
    evaluation = evaluate_on_folder(adapter, data_dir, 'validation', model_dir)
    times['evaluate'] = time.time() - tic

    tic = time.time()
    logger.info('demo 4/4: predicting on the validation images')
    predicted = predict_images(adapter, list_images(os.path.join(data_dir, 'validation', 'items')), predictions_dir)
    times['predict'] = time.time() - tic
    times['total'] = time.time() - start
    return {'output': output, 'data': data_dir, 'data_settings': data_settings, 'settings': settings,
            'train': trained, 'evaluation': evaluation, 'predict': predicted, 'times': times}


def format_demo_summary(result: Dict[str, Any]) -> str:
    times, data, settings = result['times'], result['data_settings'], result['settings']
    predicted, evaluation = result['predict'], result['evaluation']
    width, height = data['image_size']
    pictures = os.path.join(predicted['output'], '*.png')
    lines = [
        '',
        '=' * 72,
        f"Demo done in {format_duration(times['total'])} ({result['output']})",
        '',
        f"  data      {format_duration(times['data']):>9}  {data['n_train']} train / {data['n_val']} validation "
        f"synthetic images, {width}x{height}, labels {', '.join(data['labels'])}",
        f"  train     {format_duration(times['train']):>9}  {result['train']['epochs_run']} epoch(s) of "
        f"{settings['model_variant']} from random weights",
        f"  evaluate  {format_duration(times['evaluate']):>9}  COCO bbox on {evaluation['images']} validation images",
        f"  predict   {format_duration(times['predict']):>9}  {len(predicted['images'])} images, {predicted['boxes']} "
        f"box(es) at conf >= {predicted['conf_threshold']:g}",
        f"  total     {format_duration(times['total']):>9}",
        '',
        'Validation (COCO bbox):',
        *(('  ' + line) if line else '' for line in evaluation['table'].splitlines()),
        '',
        f'Pictures with boxes:     {pictures} (annotation JSON next to each)',
        f"Training curves:         {result['train']['curves']}",
        f"Precision-recall curves: {evaluation['pr_curve']}",
        f"Model:                   {result['train']['output']} (try: python -m local_runner predict "
        f"--model {result['train']['output']} --input IMAGES --output DIR)",
        '=' * 72,
    ]
    return '\n'.join(lines)
