"""Checks on the training data, once read and before anything trains: each with what to fix.

Both subsets must hold usable items, the 'train' subset boxes, and the model's labels must be the
data's (`utils.data.label_check`: a typo is refused, a deliberate difference is a warning).
"""
from typing import Optional, Sequence

from utils.core.errors import InputError
from utils.data.label_check import check_label_names


def check_training_data(export, model_labels: Optional[Sequence[str]]) -> None:
    """Refuse an export (a `DataloopExport`) that cannot train the model with `model_labels` (None: the
    labels found in the data become the model's)."""
    if model_labels and not set(model_labels) & set(export.labels_found):
        raise InputError(f'none of the labels in the data {export.labels_found} is one of the model\'s labels '
                         f'{list(model_labels)}: set the model\'s labels to the dataset\'s (model.labels = [...]; '
                         f'model.update()) or clone the model with labels=')
    require_training_subsets(export)
    if model_labels:
        check_label_names(model_labels, export)


def require_training_subsets(export) -> None:
    """Fail before training, with what to fix, when there is nothing to train or validate on."""
    fix = ("set the model's train/validation subsets (model.metadata['system']['subsets'], e.g. "
           "with dl.Filters on a folder or tag) so that both select annotated image items")
    found = sorted(export.subsets)
    for subset in ('train', 'validation'):
        if subset not in export.subsets:
            raise InputError(f'no {subset!r} subset in the downloaded data (found {found}): {fix}')
    train = export.reports['train']
    if not any(record['boxes'] for record in export.subsets['train']):
        raise InputError(
            f"no box at all in the 'train' subset ({train.summary()}). Labels found in usable "
            f'annotations: {export.labels_found or "none"}. Annotate objects as box, polygon, mask or '
            f"ellipse, with labels in the model's label map; see the warnings above for skipped items")
    if not export.subsets['validation']:
        raise InputError(f"no usable item in the 'validation' subset ({export.reports['validation'].summary()}): "
                         f'{fix}; see the warnings above for skipped items')
