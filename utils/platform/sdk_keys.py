"""The SDK's own configuration keys, put in a model's configuration before the SDK reads them.

The SDK reads its keys with ``configuration.get(key, default)`` and writes a missing one back, which PATCHes
the model on the platform (offline: an error). Filling them first keeps reading a read.
"""
import dtlpy as dl
from dtlpy.ml import base_model_adapter as _sdk_adapter

from utils.core import config as config_lib


def fill_sdk_keys(model_entity: dl.Model) -> None:
    """Put the SDK's adapter keys in the configuration up front: a missing one makes the SDK PATCH the model."""
    configuration = model_entity.configuration
    for key, value in config_lib.SDK_KEYS.items():
        configuration.setdefault(key, value)
    configuration.setdefault('batch_size', config_lib.DEFAULTS['batch_size'])
    configuration.setdefault('include_background', config_lib.DEFAULTS['include_background'])
    # read with .get('embeddings_size', 256) by embed_items and the feature set's creation
    configuration.setdefault('embeddings_size', config_lib.DEFAULTS['embeddings_size'])
    # read with .get(key, default) by the SDK's predict_dataset / evaluate_model: missing, each is a PATCH
    configuration.setdefault('predict_embed_subset_limit', _sdk_adapter.PREDICT_EMBED_DEFAULT_SUBSET_LIMIT)
    configuration.setdefault('predict_embed_timeout', _sdk_adapter.PREDICT_EMBED_DEFAULT_TIMEOUT)
