"""Build torchvision Faster R-CNN variants and (de)serialize adapter checkpoints."""
import collections
import contextlib
import copy
import functools
import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torchvision
from torchvision.models import detection
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from utils.atomic import atomic_write
from utils.batched_postprocess import batch_postprocessing, host_table
from utils.errors import InputError
from utils.label_map import parse_id_to_label

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 'fasterrcnn-dataloop/1'
PREDICTOR = 'roi_heads.box_predictor.'


class CheckpointError(InputError):
    """A weights file that cannot be used as it is: the message names the file and what is wrong."""

BUILDERS = {
    'fasterrcnn_resnet50_fpn': (detection.fasterrcnn_resnet50_fpn, detection.FasterRCNN_ResNet50_FPN_Weights),
    'fasterrcnn_resnet50_fpn_v2': (detection.fasterrcnn_resnet50_fpn_v2, detection.FasterRCNN_ResNet50_FPN_V2_Weights),
    'fasterrcnn_mobilenet_v3_large_fpn': (detection.fasterrcnn_mobilenet_v3_large_fpn,
                                          detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights),
    'fasterrcnn_mobilenet_v3_large_320_fpn': (detection.fasterrcnn_mobilenet_v3_large_320_fpn,
                                              detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights),
}


def coco_id_to_label_map() -> Dict[int, str]:
    """COCO's 91-slot category ids (1..90 with gaps) as torchvision's COCO heads use them."""
    categories = detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta['categories']
    return {i: name for i, name in enumerate(categories) if i > 0 and name != 'N/A'}


def num_classes_for(id_to_label_map: Mapping[int, str]) -> int:
    """Class count of the network: background slot 0 plus the highest label id."""
    if not id_to_label_map:
        raise InputError('the model has no labels: set the model\'s labels or id_to_label_map')
    return max(int(i) for i in id_to_label_map) + 1


def build_model(variant: str, num_classes: int, min_size: Optional[int] = None, max_size: Optional[int] = None,
                coco_weights: bool = False, keep_coco_head: bool = False, padding_bucket: int = 32,
                batched_postprocess: bool = True, **options: Any) -> torch.nn.Module:
    """Faster R-CNN of `variant` with `num_classes` outputs (background included).

    `min_size` / `max_size` None keep the builder's own input size (800 / 1333, or
    320 / 640 for the 320 variant), as torchvision's builders do.
    With `coco_weights`, torchvision's COCO checkpoint is loaded through its Weights
    API (so a copy cached under TORCH_HOME is used, no download when present); the
    box predictor is then replaced for `num_classes` unless `keep_coco_head`.
    `padding_bucket` > 32 pads batches to `BucketedTransform`'s coarser grid.
    `batched_postprocess`: on CUDA, the RPN and RoI heads post-process the whole batch at once
    (`utils.batched_postprocess`: same results, far fewer host syncs); False: torchvision's as is.
    `options` are further FasterRCNN keyword arguments (e.g. rpn_post_nms_top_n_train).
    """
    builder, weights_enum = BUILDERS[variant]
    sizes = {key: value for key, value in (('min_size', min_size), ('max_size', max_size)) if value is not None}
    sizes.update(options)
    if not coco_weights:
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **sizes)
    else:
        model = builder(weights=weights_enum.COCO_V1, **sizes)
        if not keep_coco_head:
            replace_box_predictor(model, num_classes)
    if padding_bucket > model.transform.size_divisible:
        model.transform = BucketedTransform(model.transform, padding_bucket)
    return batch_postprocessing(model) if batched_postprocess else model


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def bucketed_side(side: int, anchor: int, step: int, cap: int) -> int:
    """The smallest value >= `side` on the grid `anchor + k * step` (k any integer), at most `cap`.

    The grid is anchored at the network's `min_size`: most images are resized so one side is
    exactly `min_size`, and that side then pays no padding at all.
    """
    if side <= anchor:
        value = anchor - ((anchor - side) // step) * step
    else:
        value = anchor + _round_up(side - anchor, step)
    return max(side, min(value, cap))


@contextlib.contextmanager
def cudnn_autotune(device: torch.device, asked: bool):
    """cuDNN's per-shape autotuning (`cudnn.benchmark`) on inside the block on CUDA when `asked` (the
    `cudnn_benchmark` setting; left as it was otherwise), for training epochs and prediction alike.

    Autotuning trials every convolution's kernels once per new input shape: on an H100
    (torch 2.11) 12-17 s per shape for resnet50_fpn at 800 px, then about 14 % saved a
    step. Mixed sizes meet many shapes in epoch 1, so it is off by default; a long run on
    images of one size gains from turning it on (bench/RESULTS.md has the figures).
    """
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=(device.type == 'cuda' and bool(asked)) or cudnn.benchmark,
                     deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32):
        yield


class BucketedTransform(GeneralizedRCNNTransform):
    """torchvision's transform, padding each batch to a coarse grid of sizes instead of the next 32 px.

    With images of many sizes, padding to 32 px makes nearly every batch a new input
    shape, and every new shape pays again for cuDNN's autotuning (`cudnn.benchmark`)
    and for fresh blocks from the CUDA allocator. Rounding the padded height and
    width up to `min_size + k * padding_bucket` (capped at `max_size`) leaves a handful
    of shapes per orientation. GPU only: CPU batches get torchvision's padding. Padding is zeros after normalisation and lies outside
    every image's `image_sizes`, so proposals and detections are clipped to the real
    image as before; only features near the bottom/right edge see a little more zero
    context, as with any batch padding.
    """

    def __init__(self, transform: GeneralizedRCNNTransform, padding_bucket: int):
        super().__init__(transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
                         size_divisible=transform.size_divisible, fixed_size=transform.fixed_size,
                         _skip_resize=transform._skip_resize)
        if padding_bucket % transform.size_divisible:
            raise ValueError(f'padding_bucket must be a multiple of {transform.size_divisible}, got {padding_bucket}')
        self.padding_bucket = int(padding_bucket)

    def padded_size(self, height: int, width: int, size_divisible: int) -> List[int]:
        """The padded (height, width) of a batch whose largest image is height x width."""
        anchor = _round_up(max(self.min_size), size_divisible)
        cap = max(anchor, _round_up(self.max_size, size_divisible))
        return [bucketed_side(_round_up(side, size_divisible), anchor, self.padding_bucket, cap)
                for side in (height, width)]

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """torchvision's normalisation, with the mean and std kept on the device: torchvision copies them
        there for every image, and each such copy from pageable memory waits for the GPU."""
        if not image.is_floating_point():
            return super().normalize(image)  # its error message
        key = (image.dtype, image.device)
        if getattr(self, '_statistics', (None,))[0] != key:
            self._statistics = (key,) + tuple(torch.as_tensor(values, dtype=image.dtype, device=image.device)
                                              [:, None, None] for values in (self.image_mean, self.image_std))
        _, mean, std = self._statistics
        return (image - mean) / std

    def postprocess(self, result, image_shapes, original_image_sizes):
        """torchvision's postprocess (boxes back to the original image sizes), the ratios computed on the
        host in fp32 as torchvision computes them on the device, and sent there in one copy."""
        if self.training or torchvision._is_tracing() or not result or any(
                set(r) - {'boxes', 'scores', 'labels'} or r['boxes'].dtype != torch.float32 for r in result):
            return super().postprocess(result, image_shapes, original_image_sizes)
        ratios = []
        for (height, width), (new_height, new_width) in zip(image_shapes, original_image_sizes):
            across = float(np.float32(new_width) / np.float32(width))
            down = float(np.float32(new_height) / np.float32(height))
            ratios.append([across, down, across, down])
        ratios = host_table(ratios, result[0]['boxes'])
        for detections, ratio in zip(result, ratios):
            detections['boxes'] = detections['boxes'] * ratio
        return result

    def batch_images(self, images: List[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        # ONNX export takes torchvision's traceable path; on the CPU there is no autotuner to feed and
        # extra padding is only extra work, so CPU batches are padded exactly as torchvision does
        if torchvision._is_tracing() or images[0].device.type != 'cuda':
            return super().batch_images(images, size_divisible)
        return self.pad(images, size_divisible)

    def pad(self, images: List[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        """The batch, zero-padded to `padded_size`, images in the top-left corner."""
        channels = max(image.shape[0] for image in images)
        height, width = self.padded_size(max(image.shape[1] for image in images),
                                         max(image.shape[2] for image in images), size_divisible)
        batched = images[0].new_zeros((len(images), channels, height, width))
        for slot, image in zip(batched, images):
            slot[:image.shape[0], :image.shape[1], :image.shape[2]].copy_(image)
        return batched


def replace_box_predictor(model: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    """A fresh classification/regression layer for `num_classes`; backbone, RPN and box head stay."""
    predictor = model.roi_heads.box_predictor
    if predictor.cls_score.out_features != num_classes:
        in_features = predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes).to(predictor.cls_score.weight.device)
    return model


def input_sizes(model: torch.nn.Module) -> Tuple[int, int]:
    """(min_size, max_size) the network resizes its inputs to."""
    transform = model.transform
    min_size = transform.min_size[-1] if isinstance(transform.min_size, (tuple, list)) else transform.min_size
    return int(min_size), int(transform.max_size)


def cpu_copy(value: Any) -> Any:
    """`value` with every tensor (in dicts, lists, tuples) copied to the CPU: a snapshot that training,
    which goes on updating the originals in place, does not change (what a background write needs).

    GPU tensors (a resnet50's weights and momentum: ~600 tensors, 320 MB) are all queued for
    copying first and waited for once, rather than one host sync per tensor.
    """
    devices = set()

    def to_cpu(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_cuda:
            devices.add(tensor.device)
            return tensor.detach().to('cpu', non_blocking=True)  # complete once `devices` are synchronized
        return tensor.detach().to('cpu', copy=True)

    snapshot = _map_tensors(value, to_cpu)
    for device in devices:
        torch.cuda.synchronize(device)
    return snapshot


def device_copy(value: Any) -> Any:
    """`value` with every tensor (in dicts, lists, tuples) cloned where it is: a snapshot kept on the GPU
    costs a device-to-device copy (a millisecond for a resnet50's training state) instead of a host one."""
    return _map_tensors(value, lambda tensor: tensor.detach().clone())


def _map_tensors(value: Any, copy_tensor) -> Any:
    """`value` with `copy_tensor(t)` for every tensor t in its dicts, lists and tuples; the rest deep-copied."""
    if isinstance(value, torch.Tensor):
        return copy_tensor(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, copy_tensor) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, copy_tensor) for item in value)
    return copy.deepcopy(value)


def make_checkpoint(model: torch.nn.Module, variant: str, id_to_label_map: Mapping[int, str],
                    min_size: Optional[int] = None, max_size: Optional[int] = None,
                    state_dict: Optional[Mapping[str, torch.Tensor]] = None, **extra: Any) -> Dict[str, Any]:
    """Everything needed to rebuild the network without the platform: weights, variant, labels, sizes.

    The sizes recorded are the network's own unless given. The weights are a CPU copy of the
    model's (`state_dict`, when given, is used as it is: a snapshot already taken).
    """
    own_min, own_max = input_sizes(model)
    return {
        'format': CHECKPOINT_FORMAT,
        'model_variant': variant,
        'num_classes': num_classes_for(id_to_label_map),
        'id_to_label_map': parse_id_to_label(id_to_label_map),
        'min_size': int(own_min if min_size is None else min_size),
        'max_size': int(own_max if max_size is None else max_size),
        'state_dict': dict(state_dict) if state_dict is not None else cpu_copy(model.state_dict()),
        **extra,
    }


def _non_finite(state_dict: Mapping[str, Any]) -> List[str]:
    """Names of the floating-point tensors holding NaN or Infinity."""
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(payload: Mapping[str, Any], path: str) -> str:
    """Write atomically: a crash or preemption mid-write never leaves a half file at `path`.

    Weights holding NaN or Infinity are refused before anything is written, so the
    previous good file at `path` stays (and is what gets shipped).
    """
    bad = _non_finite(payload.get('state_dict') or {})
    if bad:
        raise CheckpointError(f'refusing to write checkpoint {path!r}: {len(bad)} weight tensor(s) hold NaN or '
                              f'Infinity (first: {bad[0]!r}); training diverged: lower learning_rate or '
                              f'max_grad_norm. The previous file there, if any, is kept')
    with atomic_write(path, 'wb', fsync=True) as f:
        torch.save(dict(payload), f)
    return path


def load_checkpoint(path: str, map_location: Optional[str] = 'cpu') -> Dict[str, Any]:
    """Load with `weights_only=True` (a checkpoint carrying code to execute is refused), then
    `validate_checkpoint`: what comes back is a checkpoint dict whose metadata agrees with its tensors."""
    try:
        loaded = _torch_load(path, map_location=map_location)
    except Exception as err:
        raise CheckpointError(f'refusing to load checkpoint {path!r}: it is not a plain weights file '
                              f'(only tensors and plain containers are accepted): {err}') from err
    return validate_checkpoint(loaded, path)


def _torch_load(path: str, **kwargs) -> Any:
    """`torch.load` with `weights_only=True`: a checkpoint carrying code to execute is refused."""
    # MultiStepLR keeps its milestones in a Counter: allow that one plain container.
    with torch.serialization.safe_globals([collections.Counter]):
        return torch.load(path, weights_only=True, **kwargs)


# BatchNorm statistics a checkpoint may lack: torchvision's frozen-BN files have no counter, and
# a BatchNorm built without running statistics has none of them.
_OPTIONAL_SUFFIXES = ('.running_mean', '.running_var', '.num_batches_tracked')


@functools.lru_cache(maxsize=None)
def _variant_shapes(variant: str) -> Dict[str, tuple]:
    """Tensor name -> shape of `variant`, the box predictor left out (its shape is the class count).
    Built on the meta device: no memory, a few milliseconds."""
    builder, _ = BUILDERS[variant]
    with torch.device('meta'):
        model = builder(weights=None, weights_backbone=None, num_classes=2)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(PREDICTOR)}


def _tensor_mismatch(state_dict: Mapping[str, torch.Tensor], variant: str) -> List[str]:
    """What keeps `state_dict` from filling `variant`, one phrase per problem (empty: it fits)."""
    expected = _variant_shapes(variant)
    names = {k for k in state_dict if not k.startswith(PREDICTOR)}
    missing = sorted(k for k in set(expected) - names if not k.endswith(_OPTIONAL_SUFFIXES))
    unexpected = sorted(names - set(expected))
    wrong = [k for k in sorted(names & set(expected)) if tuple(state_dict[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing tensor(s) (first: {missing[0]!r})')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected tensor(s) (first: {unexpected[0]!r})')
    if wrong:
        problems.append(f'{len(wrong)} tensor(s) of another shape (first: {wrong[0]!r} is '
                        f'{list(state_dict[wrong[0]].shape)}, expected {list(expected[wrong[0]])})')
    return problems


def _state_dict_of(loaded: Any, path: str) -> Dict[str, Any]:
    """The checkpoint dict of what torch.load returned; a bare torchvision state dict is wrapped."""
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f'checkpoint {path!r} holds a {type(loaded).__name__}, not a checkpoint '
                              f'(a dict with a state_dict, or a torchvision state dict)')
    if 'state_dict' in loaded:
        checkpoint = dict(loaded)
    elif loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        checkpoint = {'state_dict': dict(loaded)}  # a bare state dict, as torchvision saves its weights
    else:
        raise CheckpointError(f'checkpoint {path!r} lacks the expected keys: no state_dict, and it is not a '
                              f'state dict (its keys: {sorted(map(str, loaded))[:6]})')
    state = checkpoint['state_dict']
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f'checkpoint {path!r} has a state_dict that is not a mapping of names to tensors')
    return checkpoint


def validate_checkpoint(loaded: Any, path: str) -> Dict[str, Any]:
    """Check a loaded checkpoint's structure and that its metadata agrees with its tensors.

    Returns the checkpoint dict with `num_classes` (from the box predictor) and
    `variants` (those its tensors fit; the two MobileNet variants share every shape)
    filled in. Raises CheckpointError naming the file and what is wrong.
    """
    checkpoint = _state_dict_of(loaded, path)
    state = checkpoint['state_dict']
    if checkpoint.get('format', CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise CheckpointError(f'checkpoint {path!r} has format {checkpoint["format"]!r}, '
                              f'not {CHECKPOINT_FORMAT!r}')
    cls_score, bbox_pred = state.get(PREDICTOR + 'cls_score.weight'), state.get(PREDICTOR + 'bbox_pred.weight')
    if cls_score is None or bbox_pred is None or cls_score.ndim != 2 or bbox_pred.shape[0] != 4 * cls_score.shape[0]:
        raise CheckpointError(f'checkpoint {path!r} lacks a Faster R-CNN box predictor '
                              f'({PREDICTOR}cls_score.weight and bbox_pred.weight with 4 rows per class)')
    problems = {variant: _tensor_mismatch(state, variant) for variant in BUILDERS}
    variants = [variant for variant, found in problems.items() if not found]
    declared = checkpoint.get('model_variant')
    if not variants:
        closest = declared if declared in problems else min(problems, key=lambda v: len(problems[v]))
        raise CheckpointError(f'checkpoint {path!r} holds no supported Faster R-CNN: against {closest}, '
                              f'{"; ".join(problems[closest])}')
    if declared is not None and declared not in variants:
        raise CheckpointError(f'checkpoint {path!r} says model_variant {declared!r}, but its tensors are those of '
                              f'{" / ".join(variants)}')
    classes = int(cls_score.shape[0])
    if checkpoint.get('num_classes', classes) != classes:
        raise CheckpointError(f'checkpoint {path!r} says num_classes {checkpoint["num_classes"]!r}, but its box '
                              f'predictor has {classes} classes')
    labels = checkpoint.get('id_to_label_map')
    if labels is not None:
        try:
            top = max((int(k) for k in labels), default=0)
        except (TypeError, ValueError):
            raise CheckpointError(f'checkpoint {path!r} has an id_to_label_map whose keys are not class ids') from None
        if top >= classes:
            raise CheckpointError(f'checkpoint {path!r} has label id {top} in its id_to_label_map, but its box '
                                  f'predictor has {classes} classes (ids 0..{classes - 1})')
    bad = _non_finite(state)
    if bad:
        raise CheckpointError(f'checkpoint {path!r} holds NaN or Infinity in {len(bad)} weight tensor(s) '
                              f'(first: {bad[0]!r}): it was saved from a diverged run')
    checkpoint.update(num_classes=classes, variants=variants)
    return checkpoint


def load_state(model: torch.nn.Module, checkpoint: Mapping[str, Any], path: str) -> None:
    """Fill `model` from a validated checkpoint; what validation cannot foresee still gets one line."""
    try:
        model.load_state_dict(checkpoint['state_dict'])
    except RuntimeError as err:
        raise CheckpointError(f'checkpoint {path!r} does not fit the network: '
                              f"{' '.join(str(err).split())}") from err


def marks_finished_run(path: str) -> bool:
    """True when `path` is the last.pth of a run that finished: written after its final epoch (or its
    early stop), it says ``finished`` (checkpoints from before that flag: its epoch is the last planned).

    A missing or unreadable file is no finished run. Memory-mapped: the tensors are not read.
    """
    try:
        checkpoint = _torch_load(path, map_location='cpu', mmap=True)
    except Exception:
        return False
    if not isinstance(checkpoint, dict):
        return False
    if 'finished' in checkpoint:
        return bool(checkpoint['finished'])
    try:
        return bool(checkpoint.get('stopped_early')) or int(checkpoint['epoch']) + 1 >= int(checkpoint['epochs'])
    except (KeyError, TypeError, ValueError):
        return False


def check_compatible(checkpoint: Mapping[str, Any], path: str, variant: str, num_classes: int) -> None:
    """Fail with both sides named when a (validated) checkpoint cannot fill this network."""
    declared = checkpoint.get('model_variant')
    fits = [declared] if declared else checkpoint['variants']
    if variant not in fits or checkpoint['num_classes'] != num_classes:
        raise CheckpointError(
            f'checkpoint {path!r} holds {" / ".join(fits)!r} with {checkpoint["num_classes"]} classes, but the '
            f'model is configured as {variant!r} with {num_classes} classes (labels + background): '
            f'fix model_variant / the label map, or remove weights_filename to start from pretrained weights')
