"""Adapter checkpoint files: what they hold, written atomically, loaded safely, validated against the variants.

`make_checkpoint` gathers what rebuilds a network without the platform (weights, variant, labels,
sizes), `save_checkpoint` writes it atomically and refuses non-finite weights, `load_checkpoint`
loads with `weights_only` and `validate_checkpoint` checks its metadata against its tensors;
`cpu_copy` / `device_copy` snapshot training state for the background writer.
"""
import collections
import copy
import functools
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch

from utils.core.atomic import atomic_write
from utils.core.errors import InputError
from utils.core.label_map import parse_id_to_label
from utils.modeling.model_factory import BUILDERS, input_sizes, num_classes_for

CHECKPOINT_FORMAT = 'fasterrcnn-dataloop/1'
PREDICTOR = 'roi_heads.box_predictor.'


class CheckpointError(InputError):
    """A weights file that cannot be used as it is: the message names the file and what is wrong."""


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


def device_copy(value: Any, snapshots: Iterable[torch.Tensor] = ()) -> Any:
    """`value` with every tensor (in dicts, lists, tuples) cloned where it is: a snapshot kept on the GPU
    costs a device-to-device copy (a millisecond for a resnet50's training state) instead of a host one.
    Tensors among `snapshots` (copies already, which nothing changes) are kept as they are."""
    shared = {id(tensor) for tensor in snapshots}
    return _map_tensors(value, lambda tensor: tensor if id(tensor) in shared else tensor.detach().clone())


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
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not _finite(v)]


def _finite(tensor: torch.Tensor) -> bool:
    """A NaN or an Infinity anywhere makes the sum non-finite: one reduction, far cheaper on the CPU than
    `isfinite(t).all()` (a bool tensor per weight; every checkpoint write and load pays it, bench/RESULTS.md).
    Only a sum that is not finite (overflow included) is checked element by element."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


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
    `variants` (those its tensors fit, only the declared `model_variant` when it fits; the two MobileNet
    variants share every shape) filled in. Raises CheckpointError naming the file and what is wrong.
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
    declared = checkpoint.get('model_variant')
    if declared in BUILDERS and not _tensor_mismatch(state, declared):
        variants = [declared]  # it is what it says: the other variants' shapes (a model build each) are not needed
        problems = {}
    else:
        problems = {variant: _tensor_mismatch(state, variant) for variant in BUILDERS}
        variants = [variant for variant, found in problems.items() if not found]
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


def is_finished_run(path: str) -> bool:
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
