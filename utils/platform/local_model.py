"""Build a `dl.Model` entity offline from the manifest's model block (no platform calls)."""
import copy
import json
import os
from typing import Any, Dict, Iterable, Optional

from utils.core.label_map import configuration_entries

MANIFEST_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'dataloop.json')


def load_manifest(path: str = MANIFEST_PATH) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def manifest_model_block(path: str = MANIFEST_PATH) -> Dict[str, Any]:
    """The public model's block (configuration defaults, COCO labels and their 91-slot map)."""
    return copy.deepcopy(load_manifest(path)['components']['models'][0])


def local_model(configuration: Optional[Dict[str, Any]] = None, labels: Optional[Iterable[str]] = None,
                name: str = 'fasterrcnn-local', model_id: str = 'local-model') -> 'dl.Model':
    """A `dl.Model` built from the manifest, with `configuration` merged over its defaults.

    With `labels`, the model is one fine-tuned on those labels: ids 1..K, the
    COCO map dropped. Nothing here talks to the platform.
    """
    import dtlpy as dl
    block = manifest_model_block()
    model_configuration = block['configuration']
    if labels is not None:
        labels = [str(label) for label in labels]
        block['labels'] = labels
        model_configuration.update(configuration_entries({i + 1: label for i, label in enumerate(labels)}))
    model_configuration.update(configuration or {})
    model_json = {
        'id': model_id,
        'name': name,
        'status': 'trained' if labels is not None else block.get('status', 'pre-trained'),
        'inputType': block['inputType'],
        'outputType': block['outputType'],
        'labels': block['labels'],
        'configuration': model_configuration,
        'metadata': {},
        'artifacts': [],
    }
    return dl.Model.from_json(_json=model_json, client_api=dl.client_api, project=None, package=dl.Package())
