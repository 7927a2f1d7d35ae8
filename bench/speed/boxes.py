"""Row 7: building boxes, dl.Box + collection.add per box against the adapter's bulk builder."""
import dtlpy as dl
import numpy as np
import torch

from bench.speed.common import row
from bench.timing import seconds
from utils.platform.box_collection import boxes_to_collection


def rows():
    rng = np.random.default_rng(0)
    rows = [[*sorted(rng.random(2) * 600), *sorted(rng.random(2) * 400), float(rng.random()), int(rng.integers(1, 91))]
            for _ in range(100)]
    rows = [[r[0], r[2], r[1], r[3], r[4], r[5]] for r in rows]
    labels = {i: f'label-{i}' for i in range(1, 91)}

    def per_box():
        collection = dl.AnnotationCollection()
        for left, top, right, bottom, score, label in rows:
            collection.add(annotation_definition=dl.Box(left=left, top=top, right=right, bottom=bottom,
                                                         label=labels[label]),
                           model_info={'name': 'm', 'model_id': 'id', 'confidence': round(score, 4)})

    cpu = torch.device('cpu')
    add = min(seconds(per_box, cpu) for _ in range(20)) / len(rows) * 1e6
    bulk = min(seconds(lambda: boxes_to_collection(rows, labels, 'm', 'id'), cpu) for _ in range(20)) / len(rows) * 1e6
    print('7. building boxes, 100 per image')
    row('boxes_to_collection vs dl.Box + collection.add per box (us per box)', bulk, add, unit='us')
