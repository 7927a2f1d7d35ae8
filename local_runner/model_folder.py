"""A model folder: what `train` writes, and how `predict` / `evaluate` load it back.

    OUT/weights/best.pth   the adapter's checkpoint (self-describing: variant, labels, sizes)
    OUT/model.json         configuration + label map (what the model is rebuilt from), how it was trained
    OUT/curves.csv/.png    the trainer's curves

The adapter is the platform's `FasterRCNNAdapter` on a `dl.Model` built offline;
its `settings` (the validated `Settings`) are what every step here reads.
"""
import json
import logging
import os
from typing import Any, Dict, Optional, Sequence, Tuple

from utils.core import config as config_lib
from utils.core.atomic import write_json
from utils.core.errors import InputError
from utils.core.label_map import configuration_entries, labels_in_id_order, parse_id_to_label
from utils.core.metric_names import EVAL_KEYS
from utils.core.output_layout import CURVES_PNG, MODEL_FILE, WEIGHTS_DIR
from utils.core.run_lock import run_lock
from utils.training.run_folder import RunFolder

logger = logging.getLogger(__name__)

MODEL_FORMAT = 'fasterrcnn-local-model/1'
DEFAULT_WEIGHTS = config_lib.DEFAULTS['weights_filename']


def check_train_output(path: str) -> None:
    """Refuse a file or a complete run as `--output` (`RunFolder.check_new_output`); an interrupted one resumes."""
    RunFolder(path).check_new_output('--output')


def find_model_files(model_dir: str) -> Tuple[Optional[str], str]:
    """(model.json path or None, weights path); InputError naming what is missing."""
    if not os.path.exists(model_dir):
        raise InputError(f'--model {model_dir}: no such folder')
    if not os.path.isdir(model_dir):
        raise InputError(f'--model {model_dir} is a file: give the folder `train` wrote '
                         f'(with {MODEL_FILE} and {DEFAULT_WEIGHTS})')
    model_json = os.path.join(model_dir, MODEL_FILE)
    if os.path.isfile(model_json):
        try:
            with open(model_json) as f:
                weights_filename = json.load(f).get('configuration', {}).get('weights_filename', DEFAULT_WEIGHTS)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise InputError(f'--model {model_dir}: {MODEL_FILE} is not a model description: {err}') from None
        config_lib.resolve({'weights_filename': weights_filename})  # a path inside the folder, or ConfigError
        weights = os.path.join(model_dir, weights_filename)
        if not os.path.isfile(weights):
            raise InputError(f'--model {model_dir} has {MODEL_FILE} but no weights at {weights} '
                             f'(did training finish?)')
        return model_json, weights
    weights = os.path.join(model_dir, DEFAULT_WEIGHTS)
    if not os.path.isfile(weights):
        raise InputError(f'--model {model_dir} has no {MODEL_FILE} and no {DEFAULT_WEIGHTS}: '
                         f'not a folder written by `local_runner train`')
    return None, weights


def new_adapter(configuration: Dict[str, Any], labels: Optional[Sequence[str]], name: str,
                local_path: Optional[str]):
    """A loaded adapter on an offline model entity; weights from `local_path` (a model folder), else
    pretrained or random. A failed download of COCO weights is an InputError saying what to do."""
    from fasterrcnn_adapter import FasterRCNNAdapter
    from utils.platform.local_model import local_model
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model(configuration=configuration, labels=labels, name=name)
    try:
        adapter.load(local_path)
    except OSError as err:  # urllib's URLError and socket errors are OSErrors
        settings = adapter.settings  # resolved by load() before it reached for the weights
        weights = os.path.join(local_path or '', settings['weights_filename'])
        if not settings['pretrained'] or (local_path and os.path.isfile(weights)):
            raise
        raise InputError(f"cannot get torchvision's COCO weights for {settings['model_variant']} ({err}): "
                         f'put them under $TORCH_HOME/hub/checkpoints, or set "pretrained": false in --config '
                         f'to start from random weights') from None
    return adapter


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
        from utils.modeling import checkpoints
        checkpoint = checkpoints.load_checkpoint(weights)
        id_to_label = parse_id_to_label(checkpoint.get('id_to_label_map'))
        if not id_to_label or 'model_variant' not in checkpoint:
            raise InputError(f'--model {model_dir}: no {MODEL_FILE}, and {weights} does not say its variant '
                             f'and labels')
        logger.warning('%s has no %s: rebuilding the model from %s (variant %s, %d labels)', model_dir,
                       MODEL_FILE, weights, checkpoint['model_variant'], len(id_to_label))
        saved = {'model_variant': checkpoint['model_variant'], 'pretrained': False,
                 'min_size': checkpoint.get('min_size'), 'max_size': checkpoint.get('max_size'),
                 **configuration_entries(id_to_label)}
        labels = labels_in_id_order(id_to_label)
        name = os.path.basename(os.path.abspath(model_dir))
    saved.update(configuration or {})
    return new_adapter(saved, labels, name, model_dir)


def write_model_description(adapter, output_dir: str, data_dir: str, result) -> str:
    """OUT/model.json: everything `load_model_dir` needs to rebuild the model, plus how it was trained."""
    configuration = adapter.model_entity.configuration
    id_to_label = adapter.id_to_label_map()
    saved = {key: configuration[key] for key in config_lib.OPTIONS if key in configuration}
    saved.update(configuration_entries(id_to_label))
    training: Dict[str, Any] = {'data': os.path.abspath(data_dir)}
    if result is not None:
        best = result.best_record
        training.update(epochs_run=result.epochs_run, stopped_early=result.stopped_early,
                        best_epoch=result.best_epoch,
                        best_metrics={k: best[k] for k in EVAL_KEYS if k in best})
    description = {'format': MODEL_FORMAT, 'name': adapter.model_entity.name,
                   'labels': labels_in_id_order(id_to_label), 'configuration': saved, 'training': training}
    return write_json(os.path.join(output_dir, MODEL_FILE), description, indent=2)


def train_on_folder(data_dir: str, output_dir: str, configuration: Dict[str, Any],
                    labels: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """convert_from_dtlpy + train + save on a local export; returns paths and the best epoch's metrics.

    One run per folder (`utils.core.run_lock`): another run on it is refused; the folder is checked
    again once locked, so a run that finished while this one waited to start is not done over."""
    os.makedirs(output_dir, exist_ok=True)
    with run_lock(output_dir, f'--output {output_dir}'):
        check_train_output(output_dir)
        return _train_locked(data_dir, output_dir, configuration, labels)


def _train_locked(data_dir: str, output_dir: str, configuration: Dict[str, Any],
                  labels: Optional[Sequence[str]]) -> Dict[str, Any]:
    if labels is None:
        from utils.data.dataloop_reader import read_dataloop_export
        resolved = config_lib.resolve(configuration)
        labels = read_dataloop_export(data_dir, include_background=resolved['include_background'],
                                      video_frame_stride=resolved['video_train_frame_stride']).labels_found
        if not labels:
            raise InputError(f'--data {data_dir}: no usable box, polygon, mask or ellipse annotation with a label '
                             f'in any subset; see the warnings above for skipped items')
        logger.info('labels found in the data (ids 1..%d in this order): %s', len(labels), labels)
    # no artifacts folder: pretrained or random weights; an interrupted run in output_dir
    # (weights/last.pth) is resumed by the trainer itself
    adapter = new_adapter(configuration, labels, os.path.basename(os.path.abspath(output_dir)) or 'fasterrcnn', None)
    os.makedirs(output_dir, exist_ok=True)
    adapter.convert_from_dtlpy(data_dir)
    from utils.training.engine import NonFiniteLossError
    try:
        result = adapter.train(data_dir, output_dir)
    except NonFiniteLossError as err:  # a settings problem, explained in the message: no traceback
        raise InputError(f'{err} (checkpoints of the finished epochs are in {output_dir}/{WEIGHTS_DIR})') from err
    adapter.save(output_dir)
    model_json = write_model_description(adapter, output_dir, data_dir, result)
    RunFolder(output_dir).discard_finished_state()  # only now: until model.json, its last.pth says "finished"
    return {'output': output_dir, 'model_json': model_json,
            'weights': os.path.join(output_dir, adapter.settings['weights_filename']),
            'curves': os.path.join(output_dir, CURVES_PNG), 'labels': list(labels),
            'epochs_run': result.epochs_run, 'best_epoch': result.best_epoch, 'metrics': result.best_record}
