"""A model entity's label map: the one stored in its configuration, else ids 1..K over its labels.

The network's class 0 is background, so a stored map that uses id 0 is shifted up by one. Training keeps
the stored map when it covers exactly the model's labels (a resumed or re-run fine-tune keeps its ids),
else numbers the labels 1..K in order.
"""
import logging
from typing import Dict, List, Sequence

from utils.core.label_map import parse_id_to_label

logger = logging.getLogger(__name__)


def model_labels(model_entity) -> List[str]:
    """The model's labels as strings (empty when it has none)."""
    return [str(label) for label in (model_entity.labels or [])]


def id_to_label_map(model_entity) -> Dict[int, str]:
    """The network's class ids (1..K; 0 is background) to label names."""
    stored = model_entity.configuration.get('id_to_label_map')
    if stored:
        mapping = parse_id_to_label(stored)
    else:
        mapping = {i + 1: label for i, label in enumerate(model_labels(model_entity))}
    if 0 in mapping:
        logger.warning('id_to_label_map uses id 0, which is the background class: shifting every id by one')
        mapping = {k + 1: v for k, v in mapping.items()}
    return mapping


def training_label_map(model_entity, labels_found: Sequence[str]) -> Dict[int, str]:
    """Keep the stored map when it covers exactly the model's labels (else the labels found in the data,
    sorted), else ids 1..K in label order."""
    labels = model_labels(model_entity) or sorted(labels_found)
    stored = id_to_label_map(model_entity)
    if stored and set(stored.values()) == set(labels):
        return stored
    return {i + 1: label for i, label in enumerate(labels)}
