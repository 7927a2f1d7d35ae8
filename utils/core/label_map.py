"""The label map in its two shapes: the network's ``{class id: label}`` and the configuration's JSON form.

JSON object keys are strings, so a configuration (and model.json) stores
``id_to_label_map`` as ``{"1": "cat"}`` and ``label_to_id_map`` as
``{"cat": 1}``; code works with int ids. Class id 0 is background and never
appears in a map.
"""
from typing import Any, Dict, Mapping, Optional


def parse_id_to_label(stored: Optional[Mapping[Any, Any]]) -> Dict[int, str]:
    """``{int id: str label}`` from a stored map whose keys may be strings (JSON) or ints (checkpoints)."""
    return {int(k): str(v) for k, v in (stored or {}).items()}


def label_to_id(id_to_label: Mapping[int, str]) -> Dict[str, int]:
    """The inverse map, label -> int class id."""
    return {str(label): int(i) for i, label in id_to_label.items()}


def labels_in_id_order(id_to_label: Mapping[int, str]) -> list:
    return [id_to_label[k] for k in sorted(id_to_label)]


def configuration_entries(id_to_label: Mapping[int, str]) -> Dict[str, Dict[str, Any]]:
    """``{'id_to_label_map': {"1": label}, 'label_to_id_map': {label: 1}}`` for a configuration, ids sorted."""
    ordered = sorted((int(k), str(v)) for k, v in id_to_label.items())
    return {'id_to_label_map': {str(k): v for k, v in ordered},
            'label_to_id_map': {v: k for k, v in ordered}}
