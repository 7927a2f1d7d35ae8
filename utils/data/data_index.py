"""The data index `convert_from_dtlpy` leaves beside the data and `train` reads: a read export as one JSON file.

Image paths under the index's folder are stored relative to it, so the folder can be moved.
"""
import json
import os

from utils.core.atomic import atomic_write
from utils.core.errors import InputError
from utils.data.dataloop_reader import DataloopExport, SubsetReport, is_inside

INDEX_FORMAT = 'fasterrcnn-dataloop-index/1'


def save_index(export: DataloopExport, path) -> None:
    """Write the export as JSON; image paths under the index's folder are stored relative to it
    so the folder can be moved. Written atomically: a reader never sees half a file."""
    base = os.path.realpath(os.path.dirname(os.path.abspath(path)))

    def rel(p):
        return os.path.relpath(p, base) if is_inside(os.path.realpath(p), base) else p

    doc = {'format': INDEX_FORMAT, 'labels_found': export.labels_found,
           'subsets': {s: [dict(r, image_path=rel(r['image_path'])) for r in records]
                       for s, records in export.subsets.items()},
           'reports': {s: rep.to_json() for s, rep in export.reports.items()}}
    with atomic_write(path, 'w') as f:
        json.dump(doc, f)


def load_index(path) -> DataloopExport:
    """Read a file written by save_index; image paths come back absolute."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get('format') != INDEX_FORMAT:
        raise InputError(f'{path} is not a {INDEX_FORMAT} index: rerun convert_from_dtlpy')
    base = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    subsets = {s: [dict(r, image_path=os.path.normpath(os.path.join(base, r['image_path'])))
                   for r in records] for s, records in doc['subsets'].items()}
    reports = {s: SubsetReport.from_json(r) for s, r in doc['reports'].items()}
    return DataloopExport(subsets=subsets, reports=reports, labels_found=list(doc['labels_found']))
