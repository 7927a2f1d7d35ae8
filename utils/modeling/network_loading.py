"""The network `load` builds from the configuration: the artifact's weights, else COCO-pretrained, else random.

A random start (a new box predictor, or a whole random network) is drawn from the configured `seed`, so the
same configuration gives the same starting network.
"""
import contextlib
import logging
import os
import threading
from typing import Any, Dict, Mapping, Optional

import torch

from utils.core.label_map import parse_id_to_label
from utils.modeling import checkpoints, model_factory

logger = logging.getLogger(__name__)

RPN_TEST_KEYS = ('rpn_pre_nms_top_n_test', 'rpn_post_nms_top_n_test')


@contextlib.contextmanager
def seeded_init(seed: int):
    """Random initialisation drawn from `seed` (same seed, same starting network), leaving the caller's RNG as it was.

    Networks are built on the CPU, so forking the CPU generator covers every init.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


#: `torch.nn.init`'s in-place initialisers, the ones torchvision's and torch's layers call while they are built
_INITIALISERS = ('uniform_', 'normal_', 'trunc_normal_', 'constant_', 'ones_', 'zeros_', 'eye_', 'dirac_',
                 'xavier_uniform_', 'xavier_normal_', 'kaiming_uniform_', 'kaiming_normal_', 'orthogonal_', 'sparse_')
_skipping = threading.local()  # .active: this thread's builds skip the initialisers
_skip_lock = threading.Lock()
_originals: Dict[str, Any] = {}  # the initialisers while the wrappers are installed
_skip_users = 0


def _initialiser(original):
    def initialise(tensor, *args, **kwargs):
        return tensor if getattr(_skipping, 'active', False) else original(tensor, *args, **kwargs)
    return initialise


@contextlib.contextmanager
def skipped_init():
    """Networks built in this thread under it keep their parameters as allocated: for a network a checkpoint is
    about to fill (a strict `load_state_dict`: every parameter and buffer), the random draws are wasted, and they
    were nearly all of a resnet50's build (0.47 of 0.49 s, at every load). Other threads initialise as usual."""
    global _skip_users
    with _skip_lock:
        if not _skip_users:
            for name in _INITIALISERS:
                _originals[name] = getattr(torch.nn.init, name)
                setattr(torch.nn.init, name, _initialiser(_originals[name]))
        _skip_users += 1
    was_active, _skipping.active = getattr(_skipping, 'active', False), True
    try:
        yield
    finally:
        _skipping.active = was_active
        with _skip_lock:
            _skip_users -= 1
            if not _skip_users:
                for name, original in _originals.items():
                    setattr(torch.nn.init, name, original)
                _originals.clear()


def network_sizes(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """The builder's size and sampling arguments from the configuration (unset RPN test sizes: the variant's)."""
    return dict(min_size=settings['min_size'], max_size=settings['max_size'],
                rpn_post_nms_top_n_train=settings['rpn_post_nms_top_n_train'],
                box_batch_size_per_image=settings['box_batch_size_per_image'],
                padding_bucket=settings['padding_bucket'],
                **{key: settings[key] for key in RPN_TEST_KEYS if settings[key] is not None})


def load_network(settings: Mapping[str, Any], id_to_label_map: Dict[int, str],
                 local_path: Optional[str]) -> torch.nn.Module:
    """The configured variant for `id_to_label_map`, with the weights at `local_path`/`weights_filename` when
    that file exists (checked against the variant and class count), else COCO's when `pretrained`, else random."""
    variant = settings['model_variant']
    num_classes = model_factory.num_classes_for(id_to_label_map)
    sizes = network_sizes(settings)
    weights_path = os.path.join(local_path or '', settings['weights_filename'])
    if local_path and os.path.isfile(weights_path):
        checkpoint = checkpoints.load_checkpoint(weights_path)
        checkpoints.check_compatible(checkpoint, weights_path, variant, num_classes)
        saved_labels = parse_id_to_label(checkpoint.get('id_to_label_map'))
        if saved_labels and saved_labels != id_to_label_map:
            logger.warning('the label map saved with %s differs from the model\'s; using the model\'s: %s',
                           weights_path, id_to_label_map)
        with skipped_init():  # every tensor comes from the checkpoint
            model = model_factory.build_model(variant, num_classes, **sizes)
        checkpoints.load_state(model, checkpoint, weights_path)
        logger.info('loaded %s weights from %s', variant, weights_path)
    elif settings['pretrained']:
        keep_head = id_to_label_map == model_factory.coco_id_to_label_map()
        with seeded_init(settings['seed']):  # the new box predictor's random start
            model = model_factory.build_model(variant, num_classes, coco_weights=True, keep_coco_head=keep_head,
                                              **sizes)
        logger.info('loaded COCO-pretrained %s (%s)', variant,
                    'COCO head kept' if keep_head else f'new box predictor for {num_classes} classes')
    else:
        logger.warning('no weights at %s and pretrained is off: %s starts from random weights',
                       weights_path, variant)
        with seeded_init(settings['seed']):
            model = model_factory.build_model(variant, num_classes, **sizes)
    return model
