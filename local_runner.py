"""Run the Faster R-CNN adapter on local folders, without the Dataloop platform.

    python -m local_runner train    --data DIR --output DIR [--config FILE.json] [--labels a,b,c]
    python -m local_runner predict  --model DIR --input FILE_OR_DIR --output DIR [--conf 0.5]
    python -m local_runner evaluate --model DIR --data DIR [--subset validation] [--output DIR]
    python -m local_runner demo     [--output DIR] [--epochs N] [--n-train N] [--n-val N]

Every command drives the same `FasterRCNNAdapter` the platform runs, on a
`dl.Model` built offline from dataloop.json (`utils.local_model.local_model`):
``train`` calls convert_from_dtlpy + train + save on a folder in Dataloop's
download layout (``DIR/train``, ``DIR/validation``, each with ``items/`` and
``json/``); ``predict`` calls the adapter's ``predict`` and writes what
``predict_items`` would upload; ``evaluate`` reuses ``utils.engine.evaluate``.

Expected failures (a missing folder, an empty one, a bad configuration key, a
model folder without weights) end with exit code 2 and one line on stderr;
anything else is a bug and keeps its traceback. Heavy imports (torch, dtlpy)
happen after the arguments and paths are checked, so a wrong path fails fast.
"""
import argparse
import contextlib
import json
import logging
import mimetypes
import os
import shutil
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from utils import config as config_lib
from utils.config import ConfigError

logger = logging.getLogger('local_runner')

# ----------------------------------------------------------------------------- demo settings
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
DEMO_DATA: Dict[str, Any] = {          # utils.synthetic.make_synthetic_export arguments
    'n_train': 250,
    'n_val': 60,
    'image_size': (256, 256),          # (width, height)
    'labels': ('circle', 'square', 'triangle'),
    'seed': 0,
}
DEMO_SETTINGS: Dict[str, Any] = {      # model configuration keys (utils/config.py), over dataloop.json's
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

EXIT_ERROR = 2
MODEL_FILE = 'model.json'
MODEL_FORMAT = 'fasterrcnn-local-model/1'
DEMO_MARKER = '.local_runner_demo'
DEFAULT_WEIGHTS = config_lib.DEFAULTS['weights_filename']

# Distinct, high-contrast colours, one per class id (id 1 gets the first).
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
)


class RunnerError(Exception):
    """An expected failure of a command: reported as one line, exit code 2."""


EXPECTED_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, RunnerError)  # ValueError covers
# ConfigError, ImageDecodeError and json.JSONDecodeError


# ----------------------------------------------------------------------------- checks (no heavy imports)

def _listdir(path: str) -> List[str]:
    return sorted(name for name in os.listdir(path) if not name.startswith('.'))


def check_data_dir(path: str, subsets: Sequence[str], option: str = '--data') -> str:
    """`path` must be a folder holding each of `subsets` (Dataloop download layout)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'{option} {path}: no such folder')
    if not os.path.isdir(path):
        raise NotADirectoryError(f'{option} {path} is a file, not a folder with {"/ and ".join(subsets)}/ inside')
    found = _listdir(path)
    layout = 'Dataloop download layout: <subset>/items/ images and <subset>/json/ item JSONs'
    if not found:
        raise RunnerError(f'{option} {path} is empty: expected {" and ".join(s + "/" for s in subsets)} ({layout})')
    for subset in subsets:
        if not os.path.isdir(os.path.join(path, subset)):
            raise FileNotFoundError(f'{option} {path} has no {subset}/ folder (found: {", ".join(found)}); '
                                    f'expected {" and ".join(s + "/" for s in subsets)} ({layout})')
    return path


def read_config_file(path: Optional[str]) -> Dict[str, Any]:
    """The JSON object of configuration keys in `path`; unknown keys and bad values are ConfigErrors."""
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--config {path}: no such file')
    try:
        with open(path) as f:
            configuration = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f'--config {path} is not valid JSON: {err}') from None
    if not isinstance(configuration, dict):
        raise ConfigError(f'--config {path} must hold a JSON object of configuration keys, '
                          f'got a {type(configuration).__name__}')
    unknown = sorted(set(configuration) - set(config_lib.OPTIONS))
    if unknown:
        raise ConfigError(f'--config {path}: unknown configuration key(s) {unknown}; '
                          f'valid keys are {sorted(config_lib.OPTIONS)}')
    resolve_configuration(configuration)
    return configuration


def resolve_configuration(configuration: Dict[str, Any]) -> Dict[str, Any]:
    """`configuration` over the manifest's defaults, validated by `utils.config.resolve`."""
    from utils.local_model import manifest_model_block
    return config_lib.resolve({**manifest_model_block()['configuration'], **configuration})


def parse_labels(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    labels = [label.strip() for label in text.split(',') if label.strip()]
    if not labels:
        raise ValueError(f'--labels {text!r} names no label: give a comma-separated list such as a,b,c')
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f'--labels names {duplicates} more than once')
    return labels


def check_train_output(path: str) -> None:
    """Refuse to overwrite a finished run; an interrupted one (weights/last.pth) is resumed."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f'--output {path} is a file, not a folder')
    best = os.path.join(path, 'weights', 'best.pth')
    last = os.path.join(path, 'weights', 'last.pth')
    if os.path.isfile(best) and not os.path.isfile(last):
        raise RunnerError(f'--output {path} already holds a finished training run ({best}): '
                          f'choose a new --output folder, or delete that one to train again')


def find_model_files(model_dir: str) -> Tuple[Optional[str], str]:
    """(model.json path or None, weights path); FileNotFoundError naming what is missing."""
    if not os.path.exists(model_dir):
        raise FileNotFoundError(f'--model {model_dir}: no such folder')
    if not os.path.isdir(model_dir):
        raise NotADirectoryError(f'--model {model_dir} is a file: give the folder `train` wrote '
                                 f'(with {MODEL_FILE} and {DEFAULT_WEIGHTS})')
    model_json = os.path.join(model_dir, MODEL_FILE)
    if os.path.isfile(model_json):
        try:
            with open(model_json) as f:
                weights_filename = json.load(f).get('configuration', {}).get('weights_filename', DEFAULT_WEIGHTS)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f'--model {model_dir}: {MODEL_FILE} is not a model description: {err}') from None
        config_lib.resolve({'weights_filename': weights_filename})  # a path inside the folder, or ConfigError
        weights = os.path.join(model_dir, weights_filename)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f'--model {model_dir} has {MODEL_FILE} but no weights at {weights} '
                                    f'(did training finish?)')
        return model_json, weights
    weights = os.path.join(model_dir, DEFAULT_WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f'--model {model_dir} has no {MODEL_FILE} and no {DEFAULT_WEIGHTS}: '
                                f'not a folder written by `local_runner train`')
    return None, weights


def image_extensions() -> frozenset:
    from PIL import Image
    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def list_images(path: str, exclude: Optional[str] = None) -> List[Tuple[str, str]]:
    """(path, path relative to the input) of the images to predict on: a file, or a folder's image files
    (recursively; hidden files and the folder `exclude`, where results go, are left out)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'--input {path}: no such file or folder')
    if os.path.isfile(path):
        return [(path, os.path.basename(path))]
    extensions = image_extensions()
    excluded = os.path.realpath(exclude) if exclude else None
    found, others = [], 0
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.')
                         and os.path.realpath(os.path.join(folder, d)) != excluded)
        for name in sorted(files):
            if name.startswith('.'):
                continue
            if os.path.splitext(name)[1].lower() in extensions:
                full = os.path.join(folder, name)
                found.append((full, os.path.relpath(full, path)))
            else:
                others += 1
    if not found:
        what = f'{others} file(s), none with an image extension' if others else 'nothing'
        raise RunnerError(f'--input {path} has no image files ({what}; looked for .jpg, .jpeg, .png, .bmp, .tif, ...)')
    if others:
        logger.info('--input %s: %d file(s) without an image extension ignored', path, others)
    return found


def output_names(inputs: Sequence[Tuple[str, str]]) -> List[str]:
    """Per input, the output path stem (relative): `dir/stem`, or `dir/name` when two inputs share a stem."""
    stems = [os.path.splitext(rel)[0] for _, rel in inputs]
    counts: Dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return [stem if counts[stem] == 1 else rel for stem, (_, rel) in zip(stems, inputs)]


# ----------------------------------------------------------------------------- the adapter, offline

def _local_adapter_class():
    from fasterrcnn_adapter import FasterRCNNAdapter

    class LocalFasterRCNNAdapter(FasterRCNNAdapter):
        """The platform adapter, unchanged except that per-epoch metrics are not sent to the platform
        (there is none here): they are in the trainer's curves.csv / curves.png and the log."""

        def _publish_metrics(self, epoch: int, metrics: Dict[str, float]) -> None:
            return None

    return LocalFasterRCNNAdapter


def _new_adapter(configuration: Dict[str, Any], labels: Optional[Sequence[str]], name: str):
    from utils.local_model import local_model
    adapter = _local_adapter_class()()
    adapter.model_entity = local_model(configuration=configuration, labels=labels, name=name)
    return adapter


def _load(adapter, local_path: Optional[str]) -> None:
    """adapter.load, with a download failure of COCO weights turned into an expected error."""
    settings = config_lib.resolve(adapter.model_entity.configuration)
    weights = os.path.join(local_path or '', settings['weights_filename'])
    try:
        adapter.load(local_path)
    except OSError as err:  # urllib's URLError and socket errors are OSErrors
        if not settings['pretrained'] or (local_path and os.path.isfile(weights)):
            raise
        raise RunnerError(f"cannot get torchvision's COCO weights for {settings['model_variant']} ({err}): "
                          f'put them under $TORCH_HOME/hub/checkpoints, or set "pretrained": false in --config '
                          f'to start from random weights') from None


def load_model_dir(model_dir: str, configuration: Optional[Dict[str, Any]] = None):
    """A loaded `FasterRCNNAdapter` from a `train` output folder; `configuration` overrides model.json's."""
    model_json, weights = find_model_files(model_dir)
    if model_json is not None:
        with open(model_json) as f:
            description = json.load(f)
        saved = dict(description.get('configuration') or {})
        labels = description.get('labels')
        name = description.get('name') or os.path.basename(os.path.abspath(model_dir))
    else:
        # weights without model.json (e.g. artifacts downloaded from the platform): the checkpoint
        # describes itself (variant, label map, sizes)
        from utils import model_factory
        checkpoint = model_factory.load_checkpoint(weights)
        id_to_label = {int(k): str(v) for k, v in (checkpoint.get('id_to_label_map') or {}).items()}
        if not id_to_label or 'model_variant' not in checkpoint:
            raise ValueError(f'--model {model_dir}: no {MODEL_FILE}, and {weights} does not say its variant '
                             f'and labels')
        logger.warning('%s has no %s: rebuilding the model from %s (variant %s, %d labels)', model_dir,
                       MODEL_FILE, weights, checkpoint['model_variant'], len(id_to_label))
        saved = {'model_variant': checkpoint['model_variant'], 'pretrained': False,
                 'min_size': int(checkpoint.get('min_size', config_lib.DEFAULTS['min_size'])),
                 'max_size': int(checkpoint.get('max_size', config_lib.DEFAULTS['max_size'])),
                 'id_to_label_map': {str(k): v for k, v in sorted(id_to_label.items())},
                 'label_to_id_map': {v: k for k, v in sorted(id_to_label.items())}}
        labels = [id_to_label[k] for k in sorted(id_to_label)]
        name = os.path.basename(os.path.abspath(model_dir))
    saved.update(configuration or {})
    adapter = _new_adapter(saved, labels, name)
    _load(adapter, model_dir)
    return adapter


def _json_safe(value):
    return json.loads(json.dumps(value, default=str))


def write_model_description(adapter, output_dir: str, data_dir: str, result) -> str:
    """OUT/model.json: everything `load_model_dir` needs to rebuild the model, plus how it was trained."""
    configuration = adapter.model_entity.configuration
    saved = {key: configuration[key] for key in config_lib.OPTIONS if key in configuration}
    saved['id_to_label_map'] = {str(k): v for k, v in sorted(adapter.id_to_label_map().items())}
    saved['label_to_id_map'] = {v: int(k) for k, v in sorted(adapter.id_to_label_map().items())}
    training = {'data': os.path.abspath(data_dir)}
    if result is not None:
        best = next((row for row in result.history if row.get('epoch') == result.best_epoch), {})
        training.update(epochs_run=result.epochs_run, stopped_early=result.stopped_early,
                        best_epoch=result.best_epoch,
                        best_metrics={k: best[k] for k in ('mAP', 'mAP_50', 'mAP_75', 'AR_100') if k in best})
    description = {'format': MODEL_FORMAT, 'name': adapter.model_entity.name,
                   'labels': [adapter.id_to_label_map()[k] for k in sorted(adapter.id_to_label_map())],
                   'configuration': saved, 'training': training}
    path = os.path.join(output_dir, MODEL_FILE)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(_json_safe(description), f, indent=2)
    os.replace(tmp, path)
    return path


def train_model(data_dir: str, output_dir: str, configuration: Dict[str, Any],
                labels: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """convert_from_dtlpy + train + save on a local export; returns paths and the best epoch's metrics."""
    settings = resolve_configuration(configuration)
    if labels is None:
        from utils.dataloop_reader import read_dataloop_export
        export = read_dataloop_export(data_dir, include_background=settings['include_background'])
        labels = export.labels_found
        if not labels:
            raise ValueError(f'--data {data_dir}: no usable box, polygon, mask or ellipse annotation with a label '
                             f'in any subset; see the warnings above for skipped items')
        logger.info('labels found in the data (ids 1..%d in this order): %s', len(labels), labels)
    adapter = _new_adapter(configuration, labels, name=os.path.basename(os.path.abspath(output_dir)) or 'fasterrcnn')
    # no artifacts folder: pretrained or random weights; an interrupted run in output_dir
    # (weights/last.pth) is resumed by the trainer itself
    _load(adapter, None)
    os.makedirs(output_dir, exist_ok=True)
    adapter.convert_from_dtlpy(data_dir)
    from utils.engine import NonFiniteLossError
    try:
        result = adapter.train(data_dir, output_dir)
    except NonFiniteLossError as err:  # a settings problem, explained in the message: no traceback
        raise RunnerError(f'{err} (checkpoints of the finished epochs are in {output_dir}/weights)') from err
    adapter.save(output_dir)
    model_json = write_model_description(adapter, output_dir, data_dir, result)
    best = next((row for row in result.history if row.get('epoch') == result.best_epoch), {})
    return {'output': output_dir, 'model_json': model_json,
            'weights': os.path.join(output_dir, settings['weights_filename']),
            'curves': os.path.join(output_dir, 'curves.png'), 'labels': list(labels),
            'epochs_run': result.epochs_run, 'best_epoch': result.best_epoch, 'metrics': best}


# ----------------------------------------------------------------------------- drawing

def class_color(class_id: int) -> Tuple[int, int, int]:
    if 1 <= class_id <= len(PALETTE):
        return PALETTE[class_id - 1]
    import colorsys
    hue = (class_id * 0.618033988749895) % 1.0  # golden-ratio hues stay apart
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.95))


def _text_color(background: Tuple[int, int, int]) -> Tuple[int, int, int]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed small bitmap font
        return ImageFont.load_default()


def draw_detections(image, detections: Sequence[Dict[str, Any]], label_to_id: Dict[str, int]):
    """A copy of `image` with each detection's box and a `label score` tag (class colour, contrasting text).

    The font and line width scale with the image's shorter side, so tags stay legible on large photos.
    `detections`: ``{'box': (x1, y1, x2, y2), 'label': str, 'score': float}``.
    """
    from PIL import ImageDraw
    canvas = image.convert('RGB')  # a copy
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    side = min(width, height)
    font = _font(max(12, round(side * 0.028)))
    line = max(2, round(side / 250))
    pad = max(2, line)
    ordered = sorted(detections, key=lambda d: d['score'])  # best drawn last, on top
    for det in ordered:
        color = class_color(label_to_id.get(det['label'], 0))
        draw.rectangle(det['box'], outline=color, width=line)
    for det in ordered:
        color = class_color(label_to_id.get(det['label'], 0))
        x1, y1 = det['box'][0], det['box'][1]
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
        tx = min(max(0.0, x1), max(0.0, width - tag_w))
        ty = y1 - tag_h if y1 - tag_h >= 0 else y1  # above the box, else inside its top edge
        ty = min(max(0.0, ty), max(0.0, height - tag_h))
        draw.rectangle((tx, ty, tx + tag_w, ty + tag_h), fill=color)
        draw.text((tx + pad - left, ty + pad - top), text, fill=_text_color(color), font=font)
    return canvas


def _confidence(annotation_json: Dict[str, Any]) -> float:
    metadata = annotation_json.get('metadata') or {}
    for scope in ('user', 'system'):
        model = (metadata.get(scope) or {}).get('model') or {}
        if 'confidence' in model:
            return float(model['confidence'])
    return float('nan')


def detections_from_json(annotations: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Boxes read from annotation JSON (coordinates [{x, y}, {x, y}]), the way the platform stores them."""
    detections = []
    for ann in annotations:
        if ann.get('type') != 'box':
            continue
        (a, b) = ann['coordinates'][:2]
        detections.append({'box': (float(a['x']), float(a['y']), float(b['x']), float(b['y'])),
                           'label': ann.get('label'), 'score': _confidence(ann)})
    return detections


# ----------------------------------------------------------------------------- predict

def predict_images(adapter, inputs: Sequence[Tuple[str, str]], output_dir: str) -> Dict[str, Any]:
    """Per readable image: ``<stem>.json`` (Dataloop item JSON with the predicted annotations) and
    ``<stem>.png`` (the image with the boxes drawn). Unreadable images are logged and skipped."""
    from torchvision.transforms.functional import pil_to_tensor
    from tqdm.auto import tqdm

    from utils.images import ImageDecodeError, load_image

    settings = config_lib.resolve(adapter.model_entity.configuration)
    label_to_id = {label: int(i) for i, label in adapter.id_to_label_map().items()}
    names = output_names(inputs)
    targets = [(os.path.join(output_dir, name + '.json'), os.path.join(output_dir, name + '.png')) for name in names]
    sources = {os.path.realpath(path) for path, _ in inputs}
    clash = [t for pair in targets for t in pair if os.path.realpath(t) in sources]
    if clash:
        raise RunnerError(f'--output {output_dir} would overwrite input image {clash[0]}: choose another --output')
    os.makedirs(output_dir, exist_ok=True)

    written, unreadable, n_boxes = [], [], 0
    batch: List[Tuple[int, Any]] = []

    def flush():
        nonlocal n_boxes
        if not batch:
            return
        collections = adapter.predict([pil_to_tensor(image) for _, image in batch])
        for (index, image), collection in zip(batch, collections):
            path, rel = inputs[index]
            json_path, png_path = targets[index]
            os.makedirs(os.path.dirname(json_path), exist_ok=True)
            annotations = collection.to_json()['annotations']
            item_json = {'filename': '/' + rel.replace(os.sep, '/'), 'name': os.path.basename(rel),
                         'metadata': {'system': {'width': image.width, 'height': image.height,
                                                 'mimetype': mimetypes.guess_type(path)[0] or 'image/unknown'}},
                         'annotations': annotations}
            with open(json_path, 'w') as f:
                json.dump(_json_safe(item_json), f, indent=1)
            detections = detections_from_json(annotations)
            draw_detections(image, detections, label_to_id).save(png_path, format='PNG')
            n_boxes += len(detections)
            written.append({'image': path, 'json': json_path, 'png': png_path, 'boxes': len(detections)})
        bar.update(len(batch))
        batch.clear()

    limits = adapter.image_limits()
    bar = tqdm(total=len(inputs), desc='predict', unit='image', dynamic_ncols=True)
    try:
        for index, (path, _) in enumerate(inputs):
            try:
                image = load_image(path, limits)
            except (ImageDecodeError, OSError) as err:  # ImageSizeError too: too large, too thin
                logger.warning('cannot read image %s: %s: skipped', path, err)
                unreadable.append((path, str(err)))
                bar.update(1)
                continue
            batch.append((index, image))
            if len(batch) >= settings['batch_size']:
                flush()
        flush()
    finally:
        bar.close()
    if unreadable:
        logger.warning('%d of %d image(s) could not be read: %s', len(unreadable), len(inputs),
                       ', '.join(path for path, _ in unreadable))
    if not written:
        raise RunnerError(f'none of the {len(inputs)} image file(s) could be read (see the warnings above)')
    logger.info('predicted %d box(es) on %d image(s) at conf >= %g; results in %s', n_boxes, len(written),
                settings['conf_threshold'], output_dir)
    return {'output': output_dir, 'images': written, 'unreadable': unreadable, 'boxes': n_boxes,
            'conf_threshold': settings['conf_threshold']}


# ----------------------------------------------------------------------------- evaluate

METRIC_NAMES = (('mAP', 'mAP@[.5:.95]'), ('mAP_50', 'mAP@.5'), ('mAP_75', 'mAP@.75'), ('AR_100', 'AR@100'))


@contextlib.contextmanager
def _recording_coco_evaluator():
    """Keep the `CocoEvaluator` that `utils.engine.evaluate` builds, for its per-class precision array."""
    from utils import engine
    original = engine.CocoEvaluator
    captured: list = []

    class RecordingCocoEvaluator(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captured.append(self)

    engine.CocoEvaluator = RecordingCocoEvaluator
    try:
        yield captured
    finally:
        engine.CocoEvaluator = original


def per_class_ap(coco_eval, coco_gt, id_to_label: Dict[int, str]) -> Dict[str, Dict[str, Any]]:
    """Per label: AP@[.5:.95], AP@.5 (area all, 100 detections) from COCOeval's precision array
    ``[T iou, R recall, K class, A area, M maxDets]``, the number of ground-truth boxes and the
    precision-recall curve at IoU .5. AP is None for a class without ground truth; 0.0 when it
    has ground truth but no detection (or `coco_eval` is None: no detection at all)."""
    import numpy as np
    rows: Dict[str, Dict[str, Any]] = {}
    index = {}
    if coco_eval is not None:
        index = {int(cat): k for k, cat in enumerate(coco_eval.params.catIds)}
        precision = coco_eval.eval['precision']
        recall_thresholds = [float(r) for r in coco_eval.params.recThrs]
        iou50 = int(np.argmin(np.abs(np.asarray(coco_eval.params.iouThrs) - 0.5)))
    for class_id, label in sorted(id_to_label.items()):
        n_gt = len(coco_gt.getAnnIds(catIds=[int(class_id)])) if coco_gt is not None else 0
        row: Dict[str, Any] = {'id': int(class_id), 'gt_boxes': n_gt, 'AP': None, 'AP_50': None, 'pr_50': None}
        if n_gt:
            row['AP'] = row['AP_50'] = 0.0
            k = index.get(int(class_id))
            if k is not None:
                p = precision[:, :, k, 0, -1]
                if (p > -1).any():
                    row['AP'] = float(p[p > -1].mean())
                p50 = precision[iou50, :, k, 0, -1]
                if (p50 > -1).any():
                    row['AP_50'] = float(p50[p50 > -1].mean())
                    row['pr_50'] = {'recall': recall_thresholds, 'precision': [max(0.0, float(v)) for v in p50]}
        rows[label] = row
    return rows


def write_pr_plot(per_class: Dict[str, Dict[str, Any]], path: str, title: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(7, 6), dpi=100, layout='constrained')
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    label_to_id = {label: row['id'] for label, row in per_class.items()}
    plotted = 0
    for label, row in per_class.items():
        color = tuple(c / 255 for c in class_color(label_to_id[label]))
        if row['pr_50']:
            ax.plot(row['pr_50']['recall'], row['pr_50']['precision'], color=color, linewidth=2,
                    label=f"{label} (AP@.5 {row['AP_50']:.3f}, {row['gt_boxes']} boxes)")
            plotted += 1
        elif row['gt_boxes']:
            ax.plot([], [], color=color, label=f"{label} (no detection, {row['gt_boxes']} boxes)")
    if not plotted:
        ax.text(0.5, 0.5, 'no detections', ha='center', va='center', transform=ax.transAxes, fontsize=14)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel('recall')
    ax.set_ylabel('precision')
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc='best', fontsize='small')
    figure.savefig(path, format='png')
    return path


def format_metrics_table(metrics: Dict[str, float], per_class: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    lines = [f'{"metric":<14}{"value":>8}']
    lines += [f'{name:<14}{metrics.get(key, 0.0):>8.4f}' for key, name in METRIC_NAMES]
    if per_class:
        width = max(5, max(len(label) for label in per_class)) + 2
        lines += ['', f'{"class":<{width}}{"AP":>8}{"AP@.5":>8}{"boxes":>7}']

        def number(value):
            return f'{value:>8.4f}' if value is not None else f'{"n/a":>8}'
        lines += [f'{label:<{width}}{number(row["AP"])}{number(row["AP_50"])}{row["gt_boxes"]:>7}'
                  for label, row in per_class.items()]
    return '\n'.join(lines)


def evaluate_model(adapter, data_dir: str, subset: str, output_dir: str) -> Dict[str, Any]:
    """COCO bbox metrics of the model on `data_dir/subset` via `utils.engine.evaluate`, per-class AP and a
    precision-recall plot; writes evaluation_<subset>.json/.txt and pr_curve_<subset>.png in `output_dir`."""
    import torch

    from utils import engine
    from utils.coco_eval import STAT_NAMES
    from utils.coco_utils import get_coco_api_from_dataset
    from utils.dataloop_reader import read_dataloop_export
    from utils.detection_dataset import DetectionDataset
    from utils.transforms import get_transform
    from utils.utils import collate_fn

    settings = config_lib.resolve(adapter.model_entity.configuration)
    id_to_label = adapter.id_to_label_map()
    export = read_dataloop_export(data_dir, labels=list(id_to_label.values()),
                                  include_background=settings['include_background'], limits=adapter.image_limits())
    if subset not in export.subsets:
        raise RunnerError(f'--data {data_dir} has no {subset}/ subset with items/ or json/ '
                          f'(found: {", ".join(sorted(export.subsets)) or "none"})')
    records = export.subsets[subset]
    if not records:
        report = export.reports[subset]
        raise ValueError(f'no usable item in {data_dir}/{subset} ({report.summary()}); '
                         f'the model knows the labels {sorted(id_to_label.values())}')
    dropped = export.reports[subset].dropped.get('label not in model', 0)
    if dropped:
        logger.warning('%s: %d box(es) with labels the model does not know were left out of the evaluation '
                       '(labels in the data: %s)', subset, dropped, export.labels_found)
    label_to_id = {label: int(i) for i, label in id_to_label.items()}
    dataset = DetectionDataset(records, label_to_id, get_transform(False, settings))
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings['batch_size'], shuffle=False,
                                         num_workers=settings['num_workers'], collate_fn=collate_fn)
    logger.info('evaluating on %d %s image(s) from %s', len(dataset), subset, data_dir)
    with _recording_coco_evaluator() as captured:
        metrics = engine.evaluate(adapter.model, loader, adapter.device)
    evaluator = captured[-1] if captured else None
    if evaluator is None:
        logger.warning('utils.engine.evaluate did not build a CocoEvaluator this runner could read: '
                       'per-class AP and the precision-recall plot are left empty')
    coco_eval = evaluator.coco_eval.get('bbox') if evaluator is not None else None
    per_class = per_class_ap(coco_eval, get_coco_api_from_dataset(dataset), id_to_label)

    os.makedirs(output_dir, exist_ok=True)
    table = format_metrics_table(metrics, per_class)
    json_path = os.path.join(output_dir, f'evaluation_{subset}.json')
    txt_path = os.path.join(output_dir, f'evaluation_{subset}.txt')
    png_path = os.path.join(output_dir, f'pr_curve_{subset}.png')
    stats = evaluator.stats.tolist() if evaluator is not None else [0.0] * len(STAT_NAMES)
    document = {'data': os.path.abspath(data_dir), 'subset': subset, 'images': len(dataset),
                'metrics': metrics, 'coco_stats': dict(zip(STAT_NAMES, stats)), 'per_class': per_class}
    with open(json_path, 'w') as f:
        json.dump(_json_safe(document), f, indent=1)
    with open(txt_path, 'w') as f:
        f.write(f'COCO bbox evaluation on {len(dataset)} {subset} image(s) of {data_dir}\n\n{table}\n')
    write_pr_plot(per_class, png_path, f'Precision-recall at IoU 0.5 ({subset}, {len(dataset)} images)')
    return {'metrics': metrics, 'per_class': per_class, 'table': table, 'json': json_path, 'txt': txt_path,
            'pr_curve': png_path, 'images': len(dataset)}


# ----------------------------------------------------------------------------- commands

def cmd_train(args) -> int:
    check_data_dir(args.data, ('train', 'validation'))
    configuration = read_config_file(args.config)
    labels = parse_labels(args.labels)
    check_train_output(args.output)
    start = time.time()
    result = train_model(args.data, args.output, configuration, labels)
    metrics = result['metrics']
    print(f"trained {result['epochs_run']} epoch(s) in {_duration(time.time() - start)}; "
          f"best epoch {result['best_epoch'] + 1}: validation mAP {metrics.get('mAP', 0.0):.4f}, "
          f"mAP@.5 {metrics.get('mAP_50', 0.0):.4f}")
    print(f"model:   {result['output']} (weights {result['weights']}, description {result['model_json']})")
    print(f"curves:  {result['curves']}")
    print(f"predict: python -m local_runner predict --model {result['output']} --input IMAGES --output DIR")
    return 0


def cmd_predict(args) -> int:
    find_model_files(args.model)
    if os.path.isdir(args.input) and os.path.realpath(args.output) == os.path.realpath(args.input):
        raise RunnerError(f'--output {args.output} is the --input folder: give a separate folder for the results')
    inputs = list_images(args.input, exclude=args.output)
    overrides = {'conf_threshold': args.conf} if args.conf is not None else {}
    adapter = load_model_dir(args.model, overrides)
    result = predict_images(adapter, inputs, args.output)
    print(f"{len(result['images'])} image(s), {result['boxes']} box(es) at conf >= {result['conf_threshold']:g} "
          f"-> {args.output} (<name>.json annotations, <name>.png pictures)"
          + (f"; {len(result['unreadable'])} unreadable image(s) skipped" if result['unreadable'] else ''))
    return 0


def cmd_evaluate(args) -> int:
    find_model_files(args.model)
    check_data_dir(args.data, (args.subset,))
    adapter = load_model_dir(args.model)
    result = evaluate_model(adapter, args.data, args.subset, args.output or args.model)
    print(f"COCO bbox evaluation on {result['images']} {args.subset} image(s) of {args.data}\n")
    print(result['table'])
    print(f"\nwritten: {result['json']}, {result['txt']}, {result['pr_curve']}")
    return 0


def _duration(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    return f'{int(minutes)}m{rest:04.1f}s' if minutes else f'{rest:.1f}s'


def prepare_demo_output(path: str) -> None:
    """The demo owns its output folder: a new or empty one, or one an earlier demo wrote (marker file)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f'--output {path} is a file, not a folder')
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, DEMO_MARKER)):
        raise RunnerError(f'--output {path} is not empty and was not written by the demo: '
                          f'give a new or empty folder')
    os.makedirs(path, exist_ok=True)
    for sub in ('model', 'predictions'):
        shutil.rmtree(os.path.join(path, sub), ignore_errors=True)
    with open(os.path.join(path, DEMO_MARKER), 'w') as f:
        f.write('written by `python -m local_runner demo`; the demo replaces this folder\'s contents\n')


def run_demo(output: str, data_overrides: Optional[Dict[str, Any]] = None,
             settings_overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Synthetic data -> train from random weights -> evaluate -> predict on the validation images."""
    from utils.synthetic import make_synthetic_export
    data_settings = {**DEMO_DATA, **(data_overrides or {})}
    settings = {**DEMO_SETTINGS, **(settings_overrides or {})}
    resolve_configuration(settings)
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
    trained = train_model(data_dir, model_dir, settings, labels=list(data_settings['labels']))
    times['train'] = time.time() - tic

    tic = time.time()
    logger.info('demo 3/4: evaluating on the validation images')
    adapter = load_model_dir(model_dir)
    evaluation = evaluate_model(adapter, data_dir, 'validation', model_dir)
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
        f"Demo done in {_duration(times['total'])} ({result['output']})",
        '',
        f"  data      {_duration(times['data']):>9}  {data['n_train']} train / {data['n_val']} validation "
        f"synthetic images, {width}x{height}, labels {', '.join(data['labels'])}",
        f"  train     {_duration(times['train']):>9}  {result['train']['epochs_run']} epoch(s) of "
        f"{settings['model_variant']} from random weights",
        f"  evaluate  {_duration(times['evaluate']):>9}  COCO bbox on {evaluation['images']} validation images",
        f"  predict   {_duration(times['predict']):>9}  {len(predicted['images'])} images, {predicted['boxes']} "
        f"box(es) at conf >= {predicted['conf_threshold']:g}",
        f"  total     {_duration(times['total']):>9}",
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


def cmd_demo(args) -> int:
    settings_overrides = {'epochs': args.epochs} if args.epochs is not None else {}
    data_overrides = {}
    if args.n_train is not None:
        data_overrides['n_train'] = args.n_train
    if args.n_val is not None:
        data_overrides['n_val'] = args.n_val
    result = run_demo(args.output, data_overrides, settings_overrides)
    print(format_demo_summary(result))
    return 0


# ----------------------------------------------------------------------------- CLI

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not an integer: {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not a number: {text!r}') from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'must be between 0 and 1, got {value}')
    return value


def build_parser() -> argparse.ArgumentParser:
    def logging_options(default):
        options = argparse.ArgumentParser(add_help=False)
        options.add_argument('-q', '--quiet', action='store_true', default=default,
                             help='log warnings and errors only (default: INFO)')
        options.add_argument('-v', '--verbose', action='store_true', default=default, help='log debug messages too')
        return options

    # the options work before and after the command; SUPPRESS keeps the subcommand from resetting them
    common = logging_options(argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog='python -m local_runner', parents=[logging_options(False)],
        description='Train, evaluate and predict with the Faster R-CNN Dataloop adapter on local folders, '
                    'offline (no Dataloop account, no platform calls).')
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    p = commands.add_parser('train', parents=[common], help='fine-tune on a local export (DIR/train, DIR/validation)',
                            description='convert_from_dtlpy + train + save on a folder in Dataloop\'s download '
                                        'layout. Writes OUT/weights/best.pth, OUT/model.json, OUT/curves.csv/png. '
                                        'An interrupted run (OUT/weights/last.pth) resumes.')
    p.add_argument('--data', required=True, metavar='DIR',
                   help='export folder with train/ and validation/ (each: items/ images, json/ item JSONs)')
    p.add_argument('--output', required=True, metavar='DIR', help='where the model is written')
    p.add_argument('--config', metavar='FILE.json',
                   help="JSON object of configuration keys merged over dataloop.json's defaults "
                        '(see README "Configuration"); offline, set "pretrained": false unless the COCO weights '
                        'are under $TORCH_HOME')
    p.add_argument('--labels', metavar='a,b,c',
                   help='class labels in id order (ids 1..K); default: the labels found in the data, sorted')
    p.set_defaults(func=cmd_train)

    p = commands.add_parser('predict', parents=[common], help='boxes on images: Dataloop annotation JSON + PNG',
                            description='One <name>.json (Dataloop item JSON with the box annotations '
                                        'predict_items would upload) and one <name>.png (boxes, labels, scores '
                                        'drawn) per image.')
    p.add_argument('--model', required=True, metavar='DIR', help='a folder written by `train`')
    p.add_argument('--input', required=True, metavar='FILE_OR_DIR', help='an image, or a folder (searched recursively)')
    p.add_argument('--output', required=True, metavar='DIR', help='where the JSON and PNG files go')
    p.add_argument('--conf', type=_probability, default=None,
                   help="keep boxes with score >= this (default: the model's conf_threshold, 0.5 unless configured)")
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser('evaluate', parents=[common], help='COCO mAP, per-class AP, precision-recall plot',
                            description='COCO bbox evaluation of a trained model on one subset of a local export. '
                                        'Writes evaluation_<subset>.json/.txt and pr_curve_<subset>.png.')
    p.add_argument('--model', required=True, metavar='DIR', help='a folder written by `train`')
    p.add_argument('--data', required=True, metavar='DIR', help='export folder holding the subset')
    p.add_argument('--subset', default='validation', help='subset folder to evaluate on (default: validation)')
    p.add_argument('--output', metavar='DIR', help='where to write the results (default: the model folder)')
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser('demo', parents=[common],
                            help='synthetic data -> train from random weights -> evaluate -> predict',
                            description='Writes a seeded synthetic detection set, trains on it from random '
                                        'weights (CPU is enough), evaluates, predicts on the validation images '
                                        'and prints a summary. Settings: DEMO_SETTINGS / DEMO_DATA in local_runner.py.')
    p.add_argument('--output', default='demo_output', metavar='DIR',
                   help='folder for data/, model/ and predictions/ (default: demo_output)')
    p.add_argument('--epochs', type=_positive_int, default=None, help=f"default {DEMO_SETTINGS['epochs']}")
    p.add_argument('--n-train', type=_positive_int, default=None,
                   help=f"training images (default {DEMO_DATA['n_train']})")
    p.add_argument('--n-val', type=_positive_int, default=None,
                   help=f"validation images (default {DEMO_DATA['n_val']})")
    p.set_defaults(func=cmd_demo)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (tests swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _ThirdPartyFilter(logging.Filter):
    """Records of other libraries' loggers (dtlpy logs its cookie file at DEBUG) pass from `level` up."""

    OWN = ('local_runner', 'utils', 'fasterrcnn', '__main__')
    LEVELS = {'ModelAdapter': logging.ERROR}  # dtlpy's adapter base: platform-only notes at WARNING

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        top = record.name.split('.', 1)[0]
        if top in self.OWN:
            return True
        return record.levelno >= max(self.level, self.LEVELS.get(top, logging.NOTSET))


def setup_logging(quiet: bool = False, verbose: bool = False):
    """Log to stderr at INFO (WARNING with `quiet`, DEBUG with `verbose`); other libraries at WARNING.

    Returns a function that puts the root logger back as it was (main calls it on the way out,
    so calling `main` in-process leaves logging alone)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    for handler in saved_handlers:
        if getattr(handler, '_local_runner', False):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler._local_runner = True
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s', '%H:%M:%S'))
    handler.addFilter(_ThirdPartyFilter(logging.DEBUG if verbose else logging.WARNING))
    root.addHandler(handler)
    root.setLevel(level)

    def restore():
        root.removeHandler(handler)
        for previous in saved_handlers:
            if previous not in root.handlers:
                root.addHandler(previous)
        root.setLevel(saved_level)
    return restore


def _one_line(err: BaseException) -> str:
    text = ' '.join(str(err).split()) or type(err).__name__
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    restore_logging = setup_logging(quiet=args.quiet, verbose=args.verbose)
    from tqdm.contrib.logging import logging_redirect_tqdm
    try:
        with logging_redirect_tqdm():
            return args.func(args)
    except EXPECTED_ERRORS as err:
        logger.debug('%s failed', args.command, exc_info=True)
        print(f'local_runner {args.command}: error: {_one_line(err)}', file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        again = ' (run the same command again to resume from the last finished epoch)' \
            if args.command == 'train' else ''
        print(f'local_runner {args.command}: interrupted{again}', file=sys.stderr)
        return 130
    finally:
        restore_logging()


if __name__ == '__main__':
    sys.exit(main())
