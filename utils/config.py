"""The adapter's configuration keys: defaults, types, validation.

One table (`OPTIONS`) is the single source of truth: the adapter reads it, the
manifest's model configuration must equal `DEFAULTS`, and README.md documents
every key. Settings are read from the model's configuration (a plain dict) so
that reading never writes back to the platform.
"""
import dataclasses
import math
import posixpath
from typing import Any, Dict, Optional, Tuple

from utils.errors import InputError

VARIANTS = (
    'fasterrcnn_resnet50_fpn',
    'fasterrcnn_resnet50_fpn_v2',
    'fasterrcnn_mobilenet_v3_large_fpn',
    'fasterrcnn_mobilenet_v3_large_320_fpn',
)
DEVICES = ('auto', 'cpu', 'cuda')
# Images over `max_image_pixels` are refused from their header, before decoding. The
# network sees at most max_size x min_size (1333 x 800, about 1 MP): beyond that, pixels
# only cost memory. 100 MP takes in every camera up to medium format and costs 300 MB
# decoded as RGB, 1.2 GB as the float32 tensor the network normalizes; past it, a tiny
# compressed file can exhaust a pod. The ceiling is PIL's own bomb limit (utils.images).
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
MAX_IMAGE_PIXELS_CEILING = 400_000_000
LR_SCHEDULERS = ('multistep', 'cosine')


@dataclasses.dataclass(frozen=True)
class Option:
    default: Any
    types: Tuple[type, ...]
    choices: Optional[Tuple] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    nullable: bool = False
    training: bool = False  # may be overridden by `yaml_config`


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
    'batch_size': Option(2, (int,), minimum=1),
    # the FPN width: embed always returns 256 values, and the SDK drops vectors of any other length
    'embeddings_size': Option(256, (int,), choices=(256,)),
    'rpn_pre_nms_top_n_test': Option(None, (int,), minimum=1, nullable=True),
    'rpn_post_nms_top_n_test': Option(None, (int,), minimum=1, nullable=True),
    'padding_bucket': Option(128, (int,), minimum=32),
    'max_image_pixels': Option(DEFAULT_MAX_IMAGE_PIXELS, (int,), minimum=1, maximum=MAX_IMAGE_PIXELS_CEILING),
    # training
    'epochs': Option(50, (int,), minimum=1, training=True),
    'learning_rate': Option(0.0025, _NUM, minimum=0.0, training=True),
    'momentum': Option(0.9, _NUM, minimum=0.0, maximum=1.0, training=True),
    'weight_decay': Option(0.0001, _NUM, minimum=0.0, training=True),
    'warmup_iters': Option(1000, (int,), minimum=0, training=True),
    'lr_scheduler': Option('multistep', (str,), choices=LR_SCHEDULERS, training=True),
    'lr_steps': Option([0.62, 0.85], (list,), training=True),
    'lr_gamma': Option(0.1, _NUM, minimum=0.0, maximum=1.0, training=True),
    'max_grad_norm': Option(10.0, _NUM, minimum=0.0, training=True),
    'rpn_post_nms_top_n_train': Option(2000, (int,), minimum=1, training=True),
    'box_batch_size_per_image': Option(512, (int,), minimum=1, training=True),
    'num_workers': Option(2, (int,), minimum=0, training=True),
    'amp': Option(True, (bool,), training=True),
    'early_stopping_patience': Option(0, (int,), minimum=0, training=True),
    'include_background': Option(False, (bool,), training=True),
    'augment_hflip': Option(True, (bool,), training=True),
    'augment_vflip': Option(False, (bool,), training=True),
    'augment_photometric': Option(False, (bool,), training=True),
    'seed': Option(0, (int,), training=True),
    'checkpoint_upload_interval_s': Option(600, (int,), minimum=0, training=True),
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
    if value is None and option.nullable:
        return value
    # bool is an int in Python: never accept True for a number or 1 for a bool.
    wrong_bool = isinstance(value, bool) and bool not in option.types
    if wrong_bool or not isinstance(value, option.types):
        names = ' or '.join(t.__name__ for t in option.types)
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


def resolve(configuration: Optional[dict]) -> Dict[str, Any]:
    """Defaults overlaid with the model's configuration, then with `yaml_config`; validated.

    Unknown keys in the configuration are left alone (the platform and the SDK
    keep their own keys there); unknown keys in `yaml_config` are an error.
    """
    configuration = dict(configuration or {})
    settings = dict(DEFAULTS)
    for key in OPTIONS:
        if key in configuration:
            settings[key] = _check(key, configuration[key])
    extra = settings['yaml_config'] or {}
    unknown = sorted(set(extra) - set(TRAINING_KEYS))
    if unknown:
        raise ConfigError(f'yaml_config has unknown key(s) {unknown}; valid keys are {sorted(TRAINING_KEYS)}')
    for key, value in extra.items():
        settings[key] = _check(key, value)
    if None not in (settings['min_size'], settings['max_size']) and settings['max_size'] < settings['min_size']:
        raise ConfigError(f"configuration key 'max_size' ({settings['max_size']}) must be >= "
                          f"'min_size' ({settings['min_size']})")
    return settings
