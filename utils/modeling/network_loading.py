"""The network `load` builds from the configuration: the artifact's weights, else COCO-pretrained, else random.

A random start (a new box predictor, or a whole random network) is drawn from the configured `seed`, so the
same configuration gives the same starting network.
"""
import contextlib
import logging
import os
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
