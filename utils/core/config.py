"""The adapter's configuration keys: defaults, types, validation.

One table (`OPTIONS`) is the single source of truth: the adapter reads it, the
manifest's model configuration must equal `DEFAULTS`, and README.md documents
every key. Settings are read from the model's configuration (a plain dict) so
that reading never writes back to the platform, and validated once into a
`Settings`: read-only, typed (a number option holds a float, an int option an
int), passed down as is, so nothing below casts or fills in defaults again.
"""
import dataclasses
import math
import os
import posixpath
import types
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

from utils.core.errors import InputError

VARIANTS = (
    'fasterrcnn_resnet50_fpn',
    'fasterrcnn_resnet50_fpn_v2',
    'fasterrcnn_mobilenet_v3_large_fpn',
    'fasterrcnn_mobilenet_v3_large_320_fpn',
)
DEVICES = ('auto', 'cpu', 'cuda')
CPU_RUNTIMES = ('openvino', 'onnxruntime', 'torch')
# the arithmetic of the compiled CPU runtime (utils/inference/cpu_precision.py); 'auto': bf16 where the CPU has bf16 units
CPU_PRECISIONS = ('f32', 'bf16', 'int8', 'auto')
# Images over `max_image_pixels` are refused from their header, before decoding. The
# network sees at most max_size x min_size (1333 x 800, about 1 MP): beyond that, pixels
# only cost memory. 100 MP takes in every camera up to medium format and costs 300 MB
# decoded as RGB, 1.2 GB as the float32 tensor the network normalizes; past it, a tiny
# compressed file can exhaust a pod. The ceiling is PIL's own bomb limit (utils.data.images).
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
MAX_IMAGE_PIXELS_CEILING = 400_000_000
LR_SCHEDULERS = ('multistep', 'cosine')
VIDEO_TRACKERS = ('bytetrack', 'none')
AUTO = 'auto'
# torchvision's detection reference trains at lr 0.02 for 16 images per step; linear scaling per image
LR_PER_IMAGE = 0.02 / 16
# 'auto' batch sizes (see README "Speed defaults" for the reasoning): training on a GPU with at least
# LARGE_GPU_BYTES of memory, on a smaller one (the platform's 16 GB T4s), on the CPU; prediction on a GPU, on the CPU
TRAIN_BATCH_LARGE_GPU, TRAIN_BATCH_GPU, TRAIN_BATCH_CPU = 8, 4, 2
PREDICT_BATCH_GPU, PREDICT_BATCH_CPU = 16, 1
LARGE_GPU_BYTES = 24 * 2 ** 30
MAX_AUTO_WORKERS = 4


@dataclasses.dataclass(frozen=True)
class Option:
    default: Any
    types: Tuple[type, ...]
    choices: Optional[Tuple] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    nullable: bool = False
    training: bool = False  # may be overridden by `yaml_config`
    auto: bool = False  # may be 'auto': chosen for the device at run time (`for_training`, `prediction_batch_size`)


_NUM = (int, float)
OPTIONS: Dict[str, Option] = {
    # network and inference
    'model_variant': Option('fasterrcnn_resnet50_fpn', (str,), choices=VARIANTS),
    'pretrained': Option(True, (bool,)),
    'weights_filename': Option('weights/best.pth', (str,)),
    'device': Option('auto', (str,), choices=DEVICES),
    'conf_threshold': Option(0.5, _NUM, minimum=0.0, maximum=1.0),
    'nms_iou_threshold': Option(0.5, _NUM, minimum=0.0, maximum=1.0),
    'max_detections': Option(100, (int,), minimum=1),
    # None: the variant's own input size (the builder's default), as torchvision does
    'min_size': Option(None, (int,), minimum=32, nullable=True),
    'max_size': Option(None, (int,), minimum=32, nullable=True),
    'batch_size': Option(AUTO, (int,), minimum=1, auto=True),
    # the FPN width: embed always returns 256 values, and the SDK drops vectors of any other length
    'embeddings_size': Option(256, (int,), choices=(256,)),
    'rpn_pre_nms_top_n_test': Option(None, (int,), minimum=1, nullable=True),
    'rpn_post_nms_top_n_test': Option(None, (int,), minimum=1, nullable=True),
    'padding_bucket': Option(64, (int,), minimum=32),
    # cuDNN's per-shape autotuning: measured on an H100 it costs seconds per new input shape (bench/RESULTS.md)
    'cudnn_benchmark': Option(False, (bool,)),
    'max_image_pixels': Option(DEFAULT_MAX_IMAGE_PIXELS, (int,), minimum=1, maximum=MAX_IMAGE_PIXELS_CEILING),
    # CUDA graphs for the network's fixed-shape parts (utils/inference/cuda_graphs.py); off until measured on a GPU
    'cuda_graphs': Option(False, (bool,)),
    # video items (utils/inference/video.py): predict every k-th frame; tracker and its thresholds
    'video_frame_stride': Option(1, (int,), minimum=1),
    'video_tracker': Option('bytetrack', (str,), choices=VIDEO_TRACKERS),
    'video_track_threshold': Option(0.5, _NUM, minimum=0.0, maximum=1.0),
    'video_track_buffer_s': Option(1.0, _NUM, minimum=0.0),
    # predict / embed on the CPU: a compiled runtime, torch as its fallback (utils/inference/cpu_runtime.py)
    'cpu_runtime': Option('openvino', (str,), choices=CPU_RUNTIMES),
    # its precision: f32 keeps PyTorch's detections; bf16 / int8 trade a measured mAP change for speed (README)
    'cpu_precision': Option('f32', (str,), choices=CPU_PRECISIONS),
    # training
    'epochs': Option(50, (int,), minimum=1, training=True),
    'learning_rate': Option(AUTO, _NUM, minimum=0.0, training=True, auto=True),
    'momentum': Option(0.9, _NUM, minimum=0.0, maximum=1.0, training=True),
    'weight_decay': Option(0.0001, _NUM, minimum=0.0, training=True),
    'warmup_iters': Option(1000, (int,), minimum=0, training=True),
    'lr_scheduler': Option('multistep', (str,), choices=LR_SCHEDULERS, training=True),
    'lr_steps': Option([0.62, 0.85], (list,), training=True),
    'lr_gamma': Option(0.1, _NUM, minimum=0.0, maximum=1.0, training=True),
    'max_grad_norm': Option(10.0, _NUM, minimum=0.0, training=True),
    'rpn_post_nms_top_n_train': Option(2000, (int,), minimum=1, training=True),
    'box_batch_size_per_image': Option(512, (int,), minimum=1, training=True),
    'num_workers': Option(AUTO, (int,), minimum=0, training=True, auto=True),
    'amp': Option(True, (bool,), training=True),
    'early_stopping_patience': Option(0, (int,), minimum=0, training=True),
    'include_background': Option(False, (bool,), training=True),
    'augment_hflip': Option(True, (bool,), training=True),
    'augment_vflip': Option(False, (bool,), training=True),
    'augment_photometric': Option(False, (bool,), training=True),
    'seed': Option(0, (int,), training=True),
    'checkpoint_upload_interval_s': Option(600, (int,), minimum=0, training=True),
    'checkpoint_interval_s': Option(60, _NUM, minimum=0, training=True),
    'upload_timeout_s': Option(1200, _NUM, minimum=1, training=True),
    # every k-th frame of a video's annotated spans (plus fixed keyframes); README "Training on videos" says why 5
    'video_train_frame_stride': Option(5, (int,), minimum=1, training=True),
    'yaml_config': Option({}, (dict,)),
}
DEFAULTS: Dict[str, Any] = {key: option.default for key, option in OPTIONS.items()}
TRAINING_KEYS = tuple(key for key, option in OPTIONS.items() if option.training)

# The SDK's bookkeeping, not settings of this adapter: dtlpy's BaseModelAdapter writes these
# keys into the configuration (1.126 acts on neither upload_annotations nor clean_annotations);
# having them present up front keeps the SDK from PATCHing the model because one is missing.
SDK_KEYS = {
    'upload_annotations': True,
    'clean_annotations': True,
    'overwrite_annotations': True,
    'upload_features': None,
    'root_path': None,
    'data_path': None,
    'output_path': None,
}


class ConfigError(InputError):
    """A configuration value has the wrong type or is out of range."""


def _check_artifact_path(key: str, value: str) -> None:
    """An artifact path names a file inside its folder: relative, no '..', not empty."""
    path = value.replace('\\', '/')
    if not path.strip() or path.endswith('/') or posixpath.isabs(path) or path[1:2] == ':' \
            or '..' in path.split('/') or posixpath.normpath(path) == '.':
        raise ConfigError(f'configuration key {key!r} must be a file path relative to the model\'s artifacts '
                          f'(like "weights/best.pth": not empty, not absolute, no ".."), got {value!r}')


def _check(key: str, value: Any) -> Any:
    option = OPTIONS[key]
    if (value is None and option.nullable) or (option.auto and value == AUTO):
        return value
    # bool is an int in Python: never accept True for a number or 1 for a bool.
    wrong_bool = isinstance(value, bool) and bool not in option.types
    if wrong_bool or not isinstance(value, option.types):
        names = ' or '.join([t.__name__ for t in option.types] + ([repr(AUTO)] if option.auto else []))
        raise ConfigError(f'configuration key {key!r} must be {names}, got {value!r} ({type(value).__name__})')
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise ConfigError(f'configuration key {key!r} must be a finite number, got {value!r}')
    if option.choices is not None and value not in option.choices:
        raise ConfigError(f'configuration key {key!r} must be one of {list(option.choices)}, got {value!r}')
    if option.minimum is not None and value < option.minimum:
        raise ConfigError(f'configuration key {key!r} must be >= {option.minimum}, got {value!r}')
    if option.maximum is not None and value > option.maximum:
        raise ConfigError(f'configuration key {key!r} must be <= {option.maximum}, got {value!r}')
    if key == 'weights_filename':
        _check_artifact_path(key, value)
    if key == 'lr_steps' and not all(isinstance(v, _NUM) and not isinstance(v, bool) and 0 < v < math.inf
                                     for v in value):
        raise ConfigError(f"configuration key 'lr_steps' must be a list of positive numbers "
                          f"(epoch fractions < 1 or epoch numbers), got {value!r}")
    if key == 'padding_bucket' and value % 32:
        raise ConfigError(f"configuration key 'padding_bucket' must be a multiple of 32 (the network's stride), "
                          f"got {value!r}")
    return value


class Settings(Mapping):
    """The configuration validated once: every `OPTIONS` key with a typed value, read-only.

    Read as `settings['key']` or `settings.key`; `replace(**changes)` gives a new, validated
    object (the 'auto' values chosen for a device, a checkpoint's sizes). Lists are tuples and
    dicts read-only, so nothing that receives it can change it under another reader.
    """
    __slots__ = ('_values',)

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, '_values', types.MappingProxyType({k: _frozen(v) for k, v in values.items()}))

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f'no configuration key {name!r}') from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f'settings are read-only: use settings.replace({name}=...)')

    def __eq__(self, other: Any) -> bool:
        """Equal to a mapping of the same values, lists or tuples alike (the manifest's JSON has lists)."""
        return isinstance(other, Mapping) and self.to_dict() == _thawed(dict(other))

    __hash__ = None

    def __repr__(self) -> str:
        return f'Settings({self.to_dict()!r})'

    def __reduce__(self):  # a DataLoader worker's copy: rebuilt from plain values
        return Settings, (self.to_dict(),)

    def replace(self, **changes: Any) -> 'Settings':
        """A copy with `changes` applied, each validated as a configuration value."""
        unknown = sorted(set(changes) - set(self._values))
        if unknown:
            raise ConfigError(f'unknown configuration key(s) {unknown}')
        changed = {key: _typed(key, _check(key, _thawed(value))) for key, value in changes.items()}
        return Settings(_check_sizes({**self._values, **changed}))

    def to_dict(self) -> Dict[str, Any]:
        """Plain, mutable values (lists and dicts), as in a JSON configuration."""
        return _thawed(dict(self._values))


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _frozen(v) for k, v in value.items()})
    return value


def _thawed(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_thawed(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    return value


def _typed(key: str, value: Any) -> Any:
    """A number option's value as a float (1 and 1.0 are the same setting); the others as given."""
    if OPTIONS[key].types == _NUM and isinstance(value, int):
        return float(value)
    return value


def resolve(configuration: Optional[Mapping[str, Any]]) -> Settings:
    """Defaults overlaid with the model's configuration, then with `yaml_config`; validated, typed.

    Unknown keys in the configuration are left alone (the platform and the SDK
    keep their own keys there); unknown keys in `yaml_config` are an error.
    A `Settings` is returned as it is.
    """
    if isinstance(configuration, Settings):
        return configuration
    configuration = dict(configuration or {})
    settings = dict(DEFAULTS)
    for key in OPTIONS:
        if key in configuration:
            settings[key] = _check(key, configuration[key])
    training_overrides = settings['yaml_config'] or {}  # a dict (JSON object) of training keys, not YAML text
    unknown = sorted(set(training_overrides) - set(TRAINING_KEYS))
    if unknown:
        raise ConfigError(f'yaml_config has unknown key(s) {unknown}; valid keys are {sorted(TRAINING_KEYS)}')
    for key, value in training_overrides.items():
        settings[key] = _check(key, value)
    return Settings(_check_sizes({key: _typed(key, value) for key, value in settings.items()}))


def _check_sizes(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The one check across keys: the network's resize needs max_size >= min_size."""
    if None not in (settings['min_size'], settings['max_size']) and settings['max_size'] < settings['min_size']:
        raise ConfigError(f"configuration key 'max_size' ({settings['max_size']}) must be >= "
                          f"'min_size' ({settings['min_size']})")
    return settings


#: The defaults as `Settings`: what an adapter holds before it has a model
DEFAULT_SETTINGS = resolve({})


def _is_cuda(device: Any) -> bool:
    return str(getattr(device, 'type', device)).startswith('cuda')


def training_batch_size(value: Any, device: Any) -> int:
    """`batch_size` for training: 'auto' is 8 on a GPU of 24 GB or more, 4 on a smaller one (a T4), 2 on the CPU."""
    if value != AUTO:
        return value
    if not _is_cuda(device):
        return TRAIN_BATCH_CPU
    import torch
    memory = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return TRAIN_BATCH_LARGE_GPU if memory >= LARGE_GPU_BYTES else TRAIN_BATCH_GPU


def prediction_batch_size(value: Any, device: Any) -> int:
    """`batch_size` for prediction and embedding (a call's argument, or the setting): 'auto' is 16 on a GPU,
    1 on the CPU."""
    if value != AUTO:
        return int(value)
    return PREDICT_BATCH_GPU if _is_cuda(device) else PREDICT_BATCH_CPU


def worker_count(value: Any, device: Any) -> int:
    """`num_workers`: 'auto' is min(4, CPU cores - 1) (at least 1) on a GPU, 0 on the CPU."""
    if value != AUTO:
        return value
    if not _is_cuda(device):
        return 0
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 1) - 1))


def for_training(settings: Mapping[str, Any], device: Any,
                 bound: Optional[Callable[[int, str], int]] = None) -> Settings:
    """`settings` with the 'auto' training values chosen for `device`; an 'auto' learning_rate follows
    the batch size linearly (`LR_PER_IMAGE` per image). `bound(batch_size, key)` may lower the batch size
    before the learning rate follows it (the trainer's bound by the data and the memory,
    `utils.training.batch_bound`); `key` is 'batch_size' when the user set it, '' for 'auto'."""
    settings = resolve(settings)
    batch_size = training_batch_size(settings.batch_size, device)
    if bound is not None:
        batch_size = bound(batch_size, '' if settings.batch_size == AUTO else 'batch_size')
    learning_rate = LR_PER_IMAGE * batch_size if settings.learning_rate == AUTO else settings.learning_rate
    return settings.replace(batch_size=batch_size, num_workers=worker_count(settings.num_workers, device),
                            learning_rate=learning_rate)
