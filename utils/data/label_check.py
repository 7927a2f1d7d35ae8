"""The model's labels against the labels the training data has: a typo must not train a dead class.

Two sets matter: *missing* labels (the model's, with no box in the 'train' subset: their class is
never learned) and *unused* labels (the data's, not among the model's: their boxes are dropped).

- both at once is what a typo looks like (``--labels cat,dgo`` on cat/dog data trains a dead
  ``dgo`` while dropping every ``dog`` box): refused with an `InputError` naming both sets and the
  closest names, before any training;
- only missing labels (an ontology label nobody annotated yet) or only unused ones (training on a
  chosen subset of the labels) are deliberate often enough: a WARNING names them and training goes on.
"""
import difflib
import logging
from typing import Iterable, List

from utils.core.errors import InputError

logger = logging.getLogger(__name__)


def _suggestions(missing: Iterable[str], unused: List[str]) -> str:
    pairs = []
    for label in missing:
        close = difflib.get_close_matches(label, unused, n=1, cutoff=0.5)
        if close:
            pairs.append(f'{label!r} -> {close[0]!r}?')
    return f' (closest: {", ".join(pairs)})' if pairs else ''


def check_label_names(model_labels: Iterable[str], export) -> None:
    """Refuse a likely typo in the model's labels, warn about labels that cannot be learned or are dropped.

    `export` is a `DataloopExport` read with those labels (its 'train' report counts boxes per kept label).
    """
    model_labels = list(model_labels)
    train = export.reports.get('train')
    trained = set(train.boxes_per_label) if train is not None else set()
    missing = [label for label in model_labels if label not in trained]
    unused = sorted(set(export.labels_found) - set(model_labels))
    if missing and unused:
        raise InputError(f"the model's label(s) {missing} have no box in the 'train' subset while the data's "
                         f"label(s) {unused} are not among the model's labels and would be dropped"
                         f'{_suggestions(missing, unused)}: fix the label names (--labels in the local runner, '
                         f'the model\'s labels on the platform); the labels in the data: {export.labels_found}')
    if missing:
        logger.warning("label(s) %s have no box in the 'train' subset: their classes are kept but cannot be "
                       'learned (labels in the data: %s)', missing, export.labels_found)
    if unused:
        logger.warning("label(s) %s of the data are not among the model's labels %s: their boxes are dropped",
                       unused, model_labels)
