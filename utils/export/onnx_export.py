"""Export a trained model folder to ONNX at a fixed input size, with its label map and preprocessing beside it.

The classic TorchScript-based exporter (`dynamo=False`) is used: torchvision documents
Faster R-CNN as exportable with it at a fixed input size and opset 11+, while the
dynamo exporter (torch's default) fails on this model. The network's own transform
(normalisation, resize to `min_size`/`max_size`) and postprocessing (score
threshold, NMS, boxes scaled back to the input) are inside the graph; the caller
only resizes the image to the exported size and scales the boxes back.
"""
import importlib.util
import json
import logging
import os
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from utils.core import config as config_lib
from utils.modeling import checkpoints, model_factory
from utils.modeling.network_loading import RPN_TEST_KEYS
from utils.core.atomic import atomic_write, write_json
from utils.core.label_map import configuration_entries, parse_id_to_label
from utils.core.output_layout import MODEL_FILE, SIDECAR_SUFFIX
from utils.export import traced_ops
from utils.export.export_size import ExportError, check_size

logger = logging.getLogger(__name__)

OPSET = 17  # >= 11 (what torchvision's detection export needs); 17 is well supported by onnxruntime
INPUT_NAME = 'image'
OUTPUT_NAMES = ('boxes', 'labels', 'scores')
SIDECAR_FORMAT = 'fasterrcnn-onnx/1'


def sidecar_path(output_path: str) -> str:
    """`model.onnx` -> `model.onnx.json`: never clashes with a model folder's own model.json."""
    return output_path + SIDECAR_SUFFIX


def _read_settings(model_dir: str) -> Tuple[config_lib.Settings, str]:
    """(validated configuration, weights path) of a `local_runner train` folder."""
    if not os.path.isdir(model_dir):
        raise ExportError(f'model folder {model_dir!r} does not exist or is not a folder: give the folder '
                          f'`python -m local_runner train --output` wrote')
    configuration: Dict[str, Any] = {}
    description_path = os.path.join(model_dir, MODEL_FILE)
    if os.path.isfile(description_path):
        try:
            with open(description_path) as f:
                configuration = dict(json.load(f).get('configuration') or {})
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as err:
            raise ExportError(f'{description_path} is not a model description: {err}') from None
    try:
        settings = config_lib.resolve(configuration)
    except config_lib.ConfigError as err:
        raise ExportError(f'{description_path}: {err}') from None
    weights = os.path.join(model_dir, settings['weights_filename'])
    if not os.path.isfile(weights):
        raise ExportError(f'model folder {model_dir!r} has no weights at {weights} (did training finish?)')
    return settings, weights


def load_network(model_dir: str) -> Tuple[torch.nn.Module, config_lib.Settings, Dict[int, str]]:
    """(the trained network in eval mode on CPU, its settings, id -> label) from a model folder.

    The checkpoint describes itself (variant, label map, sizes); model.json adds the
    inference settings (score threshold, NMS, detections per image).
    """
    settings, weights = _read_settings(model_dir)
    try:
        checkpoint = checkpoints.load_checkpoint(weights)
    except ValueError as err:
        raise ExportError(str(err)) from None
    id_to_label = parse_id_to_label(checkpoint.get('id_to_label_map'))
    if not id_to_label:  # (load_checkpoint has checked the weights)
        raise ExportError(f'{weights} is not a checkpoint of this adapter (no label map in it)')
    variant = checkpoint.get('model_variant', settings.model_variant)
    num_classes = model_factory.num_classes_for(id_to_label)
    checkpoints.check_compatible(checkpoint, weights, variant, num_classes)
    settings = settings.replace(model_variant=variant, min_size=int(checkpoint.get('min_size', settings.min_size)),
                                max_size=int(checkpoint.get('max_size', settings.max_size)))
    model = model_factory.build_model(variant, num_classes, settings.min_size, settings.max_size,
                                      box_score_thresh=settings.conf_threshold,
                                      box_nms_thresh=settings.nms_iou_threshold,
                                      box_detections_per_img=settings.max_detections,
                                      **{key: settings[key] for key in RPN_TEST_KEYS if settings[key] is not None})
    try:
        checkpoints.load_state(model, checkpoint, weights)
    except ValueError as err:
        raise ExportError(str(err)) from None
    return model.eval(), settings, id_to_label


def _check_size(size: Optional[Sequence[int]], settings: Dict[str, Any]) -> Tuple[int, int]:
    if size is None:
        return settings['min_size'], settings['min_size']
    return check_size(size)


def sidecar_document(model: torch.nn.Module, settings: Dict[str, Any], id_to_label: Dict[int, str],
             height: int, width: int) -> Dict[str, Any]:
    """The sidecar JSON: what a caller needs to feed the graph and read its outputs."""
    transform = model.transform
    return {
        'format': SIDECAR_FORMAT,
        'model_variant': settings['model_variant'],
        'input': {'name': INPUT_NAME, 'shape': [3, height, width], 'dtype': 'float32', 'layout': 'CHW',
                  'color': 'RGB', 'scale': 'pixel values divided by 255 (0..1)'},
        'resize': {'height': height, 'width': width, 'keep_aspect_ratio': False, 'interpolation': 'bilinear',
                   'boxes': 'in input pixels: multiply x by original_width / width, y by original_height / height'},
        'normalization': {'mean': [float(v) for v in transform.image_mean],
                          'std': [float(v) for v in transform.image_std], 'applied_in_graph': True},
        'network_resize': {'min_size': settings['min_size'], 'max_size': settings['max_size'],
                           'applied_in_graph': True},
        'score_threshold': settings['conf_threshold'],
        'nms_iou_threshold': settings['nms_iou_threshold'],
        'max_detections': settings['max_detections'],
        'outputs': {'boxes': '[N, 4] float32 x1, y1, x2, y2', 'labels': '[N] int64 class ids (id_to_label_map)',
                    'scores': '[N] float32, descending per class'},
        'id_to_label_map': configuration_entries(id_to_label)['id_to_label_map'],
        'opset': OPSET,
    }


def write_graph(model: torch.nn.Module, args: tuple, f, output_names: Sequence[str] = OUTPUT_NAMES,
                dynamic_axes: Optional[Dict[str, Dict[int, str]]] = None) -> None:
    """Trace `model(*args)` into ONNX at `f` (a path or a binary file), input named `image`.

    `dynamic_axes` (ONNX's): the axes left free; default only the detection count, so the input size
    is fixed. The CPU runtime (`utils.export.cpu_graphs`) also frees the input's height and width:
    torchvision's transform and postprocessing take their traceable path, and one file takes any size.
    """
    if dynamic_axes is None:
        dynamic_axes = {name: {0: 'detections'} for name in output_names}
    with warnings.catch_warnings():
        # the tracer warns about every Python-side shape computation it freezes, and torchvision's
        # box code about tensor copies: expected in a traced export, noise to a user
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', message='To copy construct from a tensor', category=UserWarning)
        warnings.filterwarnings('ignore', message='Exporting aten::index operator', category=UserWarning)
        warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
        with traced_ops.lean_detector_ops():
            torch.onnx.export(model, args, f, dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME],
                              output_names=list(output_names), dynamic_axes=dynamic_axes)


def export_onnx(model_dir: str, output_path: str, size: Optional[Sequence[int]] = None) -> str:
    """Write `output_path` (ONNX, input `image` [3, H, W]) and `output_path + '.json'`; return `output_path`.

    `size` is (height, width); default: a `min_size` square. Raises ExportError for a bad
    model folder or size.
    """
    if importlib.util.find_spec('onnx') is None:  # torch's exporter needs it
        raise ExportError('ONNX export needs the onnx package: pip install -r requirements.txt')
    if size is not None:
        _check_size(size, {})  # before the network is built
    model, settings, id_to_label = load_network(model_dir)
    height, width = _check_size(size, settings)
    example = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    with atomic_write(output_path, 'wb') as f:
        write_graph(model, ([example],), f)
    write_json(sidecar_path(output_path), sidecar_document(model, settings, id_to_label, height, width), indent=2)
    logger.info('exported %s at %dx%d (HxW) to %s (+ %s)', settings['model_variant'], height, width,
                output_path, os.path.basename(sidecar_path(output_path)))
    return output_path
