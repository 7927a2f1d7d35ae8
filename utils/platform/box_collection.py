"""One image's detection rows as the SDK's `dl.AnnotationCollection`: what `predict` returns to dtlpy."""
from typing import Dict, List, Optional

import dtlpy as dl

from utils.platform.annotation_json import label_name, model_confidence


def boxes_to_collection(rows: List[list], labels: Dict[int, str], model_name: str,
                        model_id: Optional[str]) -> dl.AnnotationCollection:
    """One image's rows [left, top, right, bottom, score, label id] as an AnnotationCollection of boxes.

    Same annotations as `collection.add(annotation_definition=dl.Box(...), model_info=...)` per box,
    built with `dl.Annotation.new` directly: `add`'s per-call checks (video frames, object ids,
    model_info validation) do not apply to image boxes whose confidences are already in [0, 1].
    The box's reference back to its annotation, which `Annotation.new` writes and nothing in dtlpy
    reads, is cleared: with it each annotation is a reference cycle, freed only by a full collection
    of the process's heap once the caller drops it (`utils.core.frozen_heap`); without it, at once.
    """
    collection = dl.AnnotationCollection()
    new, box, append = dl.Annotation.new, dl.Box, collection.annotations.append
    for left, top, right, bottom, score, label_id in rows:
        confidence = model_confidence(score)
        metadata = {'user': {'model': {'confidence': confidence, 'name': model_name, 'model_id': model_id}}}
        annotation = new(annotation_definition=box(left=left, top=top, right=right, bottom=bottom,
                                                    label=label_name(labels, label_id)),
                         automated=True, metadata=metadata)
        annotation.annotation_definition._annotation = None
        append(annotation)
    return collection
