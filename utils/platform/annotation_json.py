"""The JSON `item.annotations.upload` sends for a model's predicted boxes, built directly from detection rows.

Why: on the way to the platform the SDK builds a `dl.Box` and a `dl.Annotation` per box, stamps each
(`BaseModelAdapter._update_predictions_metadata`) and turns it back into a dict (`Annotation.to_json`,
an `attr.asdict` with filters). The objects are only an intermediate step there, and on a GPU host they
cost more than the forward pass leaves free (bench/RESULTS.md, bench/annotation_bulk.py). This module
writes the same dicts, key for key and in the same order; tests/test_annotation_json.py compares them with
the SDK's own `to_json()` field by field, so a change in the SDK's layout fails a test, not a deploy.
"""
from typing import Dict, List, Optional, Sequence


def model_confidence(score: float) -> float:
    """The confidence the platform accepts: in [0, 1] (the SDK refuses others), 4 decimals."""
    return round(min(max(score, 0.0), 1.0), 4)


def label_name(labels: Dict[int, str], label_id) -> str:
    """A class id's label; an id the map lacks keeps its number, so a box is never dropped silently."""
    label_id = int(label_id)
    return labels.get(label_id, str(label_id))


def box_annotations(rows: Sequence[Sequence[float]], labels: Dict[int, str], model_name: str,
                    model_id: Optional[str], item_id: Optional[str] = None,
                    dataset_id: Optional[str] = None) -> List[dict]:
    """One image's rows [left, top, right, bottom, score, label id] as the upload's annotation dicts.

    Equal to `Annotation.to_json()` of `box_collection.boxes_to_collection`'s annotations once the SDK's
    predict_items has stamped them (`_update_predictions_metadata`) and `item.annotations.upload` has
    given them their item: model info in `metadata.user.model` and `metadata.system.model`, `itemId`,
    `datasetId`. Each dict is new (nothing shared between annotations).
    """
    out = []
    append = out.append
    for left, top, right, bottom, score, label_id in rows:
        confidence = model_confidence(score)
        append({
            'id': None, 'url': None, 'creator': None,
            'metadata': {'user': {'model': {'confidence': confidence, 'name': model_name, 'model_id': model_id}},
                         'system': {'model': {'model_id': model_id, 'name': model_name, 'confidence': confidence},
                                    'automated': True, 'attributes': {}}},
            'hash': None, 'itemId': item_id, 'item': None, 'label': label_name(labels, label_id), 'dataset': None,
            'createdAt': None, 'updatedBy': None, 'updatedAt': None, 'source': 'sdk', 'datasetId': dataset_id,
            'type': 'box',
            'coordinates': [{'x': float(left), 'y': float(top), 'z': 0},
                            {'x': float(right), 'y': float(bottom), 'z': 0}],
            'attributes': None,
        })
    return out


def batch_box_annotations(items: Sequence, positions: Sequence[int], rows: Sequence[Sequence[Sequence[float]]],
                          labels: Dict[int, str], model_name: str, model_id: Optional[str]) -> List[List[dict]]:
    """Per entry of `items` (a batch of dl.Item), its annotation dicts: `rows[k]` belongs to `items[positions[k]]`;
    an entry without rows (unreadable, or nothing found) gets an empty list, as the SDK uploads an empty
    collection for it."""
    out: List[List[dict]] = [[] for _ in items]
    for position, image_rows in zip(positions, rows):
        item = items[position]
        dataset_id = getattr(item, 'dataset_id', None)  # every dl.Item has it; a bench's stand-in may not
        out[position] = box_annotations(image_rows, labels, model_name, model_id, item.id, dataset_id)
    return out
