"""What the SDK's `prepare_data` downloads for training: every annotation type the reader turns into boxes.

The SDK's download asks for box annotations only, unless the model's metadata names an annotation filter
per subset (`system.annotationsSubsets`); for the time of one download this sets one that asks for every
type we read and leaves out annotations that models made (predictions are not ground truth).
"""
import contextlib
from typing import Iterator, Sequence

import dtlpy as dl

from utils.data.annotation_boxes import BOX_TYPES

ANNOTATION_TYPES_FOR_TRAINING = list(BOX_TYPES)


@contextlib.contextmanager
def training_annotations(model_entity: dl.Model,
                         types: Sequence[str] = ANNOTATION_TYPES_FOR_TRAINING) -> Iterator[None]:
    """Within the block, each subset of `model_entity` downloads annotations of `types` not made by a model; a
    filter the model already has for a subset wins. The metadata is as it was afterwards."""
    system = model_entity.metadata.setdefault('system', {})
    original = system.get('annotationsSubsets')
    subsets = system.get('subsets') or {}
    wanted = dl.Filters(resource=dl.FiltersResource.ANNOTATION, use_defaults=False)
    wanted.add(field='type', values=list(types), operator=dl.FiltersOperations.IN)
    wanted.add(field='metadata.system.model.name', values=False, operator=dl.FiltersOperations.EXISTS)
    system['annotationsSubsets'] = {**{name: wanted.prepare() for name in subsets}, **(original or {})}
    try:
        yield
    finally:
        if original is None:
            system.pop('annotationsSubsets', None)
        else:
            system['annotationsSubsets'] = original
