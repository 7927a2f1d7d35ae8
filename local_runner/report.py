"""COCO bbox evaluation of a loaded model on one subset of a local export, and its report.

Writes ``evaluation_<subset>.json`` / ``.txt`` (mAP@[.5:.95], mAP@.5, mAP@.75,
AR@100, per-class AP and AP@.5) and ``pr_curve_<subset>.png`` (precision-recall
per class at IoU .5), all from the `Evaluation` that `utils.training.engine.evaluate` returns.
"""
import logging
import os
from typing import Any, Dict, Optional

from local_runner.draw import class_color
from utils.core.atomic import atomic_write, write_json
from utils.core.errors import InputError
from utils.core.label_map import label_to_id
from utils.core.metric_names import EVAL_KEYS, LEGENDS

logger = logging.getLogger(__name__)


def write_pr_plot(per_class: Dict[str, Dict[str, Any]], path: str, title: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(7, 6), dpi=100, layout='constrained')
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    plotted = 0
    for label, row in per_class.items():
        color = tuple(c / 255 for c in class_color(row['id']))
        if row['pr_50']:
            ax.plot(row['pr_50']['recall'], row['pr_50']['precision'], color=color, linewidth=2,
                    label=f"{label} (AP@.5 {row['AP_50']:.3f}, {row['gt_boxes']} boxes)")
            plotted += 1
        elif row['gt_boxes']:
            ax.plot([], [], color=color, label=f"{label} (no detection, {row['gt_boxes']} boxes)")
    if not plotted:
        ax.text(0.5, 0.5, 'no detections', ha='center', va='center', transform=ax.transAxes, fontsize=14)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel('recall')
    ax.set_ylabel('precision')
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc='best', fontsize='small')
    with atomic_write(path, 'wb') as f:
        figure.savefig(f, format='png')
    return path


def format_metrics_table(metrics: Dict[str, float], per_class: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    lines = [f'{"metric":<14}{"value":>8}']
    lines += [f'{LEGENDS[key]:<14}{metrics.get(key, 0.0):>8.4f}' for key in EVAL_KEYS]
    if per_class:
        width = max(5, max(len(label) for label in per_class)) + 2
        lines += ['', f'{"class":<{width}}{"AP":>8}{"AP@.5":>8}{"boxes":>7}']

        def number(value):
            return f'{value:>8.4f}' if value is not None else f'{"n/a":>8}'
        lines += [f'{label:<{width}}{number(row["AP"])}{number(row["AP_50"])}{row["gt_boxes"]:>7}'
                  for label, row in per_class.items()]
    return '\n'.join(lines)


def _subset_dataset(adapter, data_dir: str, subset: str):
    """The subset's records as a DetectionDataset over the model's labels; InputError when there are none."""
    from utils.data.dataloop_reader import read_dataloop_export
    from utils.data.detection_dataset import DetectionDataset
    from utils.data.transforms import get_transform

    id_to_label = adapter.id_to_label_map()
    export = read_dataloop_export(data_dir, labels=list(id_to_label.values()),
                                  include_background=adapter.settings['include_background'],
                                  limits=adapter.image_limits(),
                                  video_frame_stride=adapter.settings['video_train_frame_stride'])
    if subset not in export.subsets:
        raise InputError(f'--data {data_dir} has no {subset}/ subset with items/ or json/ '
                         f'(found: {", ".join(sorted(export.subsets)) or "none"})')
    records = export.subsets[subset]
    if not records:
        report = export.reports[subset]
        raise InputError(f'no usable item in {data_dir}/{subset} ({report.summary()}); '
                         f'the model knows the labels {sorted(id_to_label.values())}')
    dropped = export.reports[subset].dropped.get('label not in model', 0)
    if dropped:
        logger.warning('%s: %d box(es) with labels the model does not know were left out of the evaluation '
                       '(labels in the data: %s)', subset, dropped, export.labels_found)
    return DetectionDataset(records, label_to_id(id_to_label), get_transform(False, adapter.settings))


def evaluate_on_folder(adapter, data_dir: str, subset: str, output_dir: str) -> Dict[str, Any]:
    """COCO bbox metrics of the model on `data_dir/subset` via `utils.training.engine.evaluate`, per-class AP and a
    precision-recall plot; writes evaluation_<subset>.json/.txt and pr_curve_<subset>.png in `output_dir`."""
    import torch

    from utils.training import engine
    from utils.core.config import prediction_batch_size, worker_count
    from utils.data.data_loading import collate_fn

    settings = adapter.settings
    dataset = _subset_dataset(adapter, data_dir, subset)
    device = adapter.device
    loader = torch.utils.data.DataLoader(dataset, batch_size=prediction_batch_size(settings['batch_size'], device),
                                         shuffle=False, num_workers=worker_count(settings['num_workers'], device),
                                         collate_fn=collate_fn)
    logger.info('evaluating on %d %s image(s) from %s', len(dataset), subset, data_dir)
    evaluation = engine.evaluate(adapter.model, loader, adapter.device)
    metrics = dict(evaluation)
    per_class = evaluation.per_class(adapter.id_to_label_map())

    os.makedirs(output_dir, exist_ok=True)
    table = format_metrics_table(metrics, per_class)
    json_path = os.path.join(output_dir, f'evaluation_{subset}.json')
    txt_path = os.path.join(output_dir, f'evaluation_{subset}.txt')
    png_path = os.path.join(output_dir, f'pr_curve_{subset}.png')
    write_json(json_path, {'data': os.path.abspath(data_dir), 'subset': subset, 'images': len(dataset),
                           'metrics': metrics, 'coco_stats': evaluation.coco_stats, 'per_class': per_class}, indent=1)
    with atomic_write(txt_path, 'w') as f:
        f.write(f'COCO bbox evaluation on {len(dataset)} {subset} image(s) of {data_dir}\n\n{table}\n')
    write_pr_plot(per_class, png_path, f'Precision-recall at IoU 0.5 ({subset}, {len(dataset)} images)')
    return {'metrics': metrics, 'per_class': per_class, 'table': table, 'json': json_path, 'txt': txt_path,
            'pr_curve': png_path, 'images': len(dataset)}
