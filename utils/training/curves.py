"""Training curves: ``curves.csv`` (one row per epoch) and ``curves.png`` (losses and mAP panels).

The trainer writes the csv after every epoch and draws the png at most every
``PNG_INTERVAL_S`` and at the end (`CurvesWriter`), from its history, so an interrupted
run still leaves its curves behind. Both files are replaced atomically. The
``epoch`` column is the 0-based epoch index used everywhere in the trainer.
"""
import csv
import logging
import math
import os
import time
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from utils.core.atomic import atomic_write
from utils.core.metric_names import EVAL_KEYS, LEGENDS, LOSS_KEYS
from utils.core.output_layout import CURVES_CSV, CURVES_PNG

logger = logging.getLogger(__name__)

COLUMNS = ('epoch',) + LOSS_KEYS + ('lr',) + EVAL_KEYS
# Drawing curves.png takes longer than a short epoch: redraw it at most this often (and at the end);
# curves.csv has every epoch as soon as it ends.
PNG_INTERVAL_S = 30.0


def write_csv(history: Sequence[Mapping[str, Any]], path: str) -> str:
    with atomic_write(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction='ignore')
        writer.writeheader()
        for row in history:
            writer.writerow({key: row.get(key, '') for key in COLUMNS})
    return path


def _series(history: Sequence[Mapping[str, Any]], key: str) -> Tuple[List[float], List[float]]:
    xs, ys = [], []
    for row in history:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(row['epoch'] + 1)  # people count epochs from 1, as the log lines do
            ys.append(float(value))
    return xs, ys


def write_png(history: Sequence[Mapping[str, Any]], path: str) -> str:
    # Imported here: matplotlib costs about half a second of every process that imports the adapter (a
    # deployed model, each local-runner command) and only training draws. The Agg canvas directly (no
    # pyplot): no global backend switch, no GUI, safe in any thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.8), dpi=100, layout='constrained')
    FigureCanvasAgg(figure)
    loss_ax, map_ax = figure.subplots(1, 2)
    for key in LOSS_KEYS:
        xs, ys = _series(history, key)
        if xs:
            loss_ax.plot(xs, ys, marker='o', markersize=3, linewidth=2.2 if key == 'loss' else 1.3,
                         label=LEGENDS[key])
    loss_ax.set_title('Training losses')
    loss_ax.set_xlabel('epoch')
    loss_ax.set_ylabel('loss (epoch average)')
    for key in EVAL_KEYS:
        xs, ys = _series(history, key)
        if xs:
            map_ax.plot(xs, ys, marker='o', markersize=3, linewidth=2.2 if key == 'mAP' else 1.3,
                        label=LEGENDS[key])
    best = max((row for row in history if isinstance(row.get('mAP'), (int, float))),
               key=lambda row: row['mAP'], default=None)
    if best is not None:
        map_ax.axvline(best['epoch'] + 1, color='grey', linestyle=':', linewidth=1,
                       label=f"best mAP {best['mAP']:.3f} (epoch {best['epoch'] + 1})")
    map_ax.set_title('Validation (COCO bbox)')
    map_ax.set_xlabel('epoch')
    map_ax.set_ylabel('score')
    map_ax.set_ylim(0.0, 1.0)
    for ax in (loss_ax, map_ax):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc='best', fontsize='small')
    with atomic_write(path, 'wb') as f:
        figure.savefig(f, format='png')
    return path


def read_csv(path: str) -> List[Dict[str, float]]:
    """Rows of a curves.csv as numbers (``epoch`` an int)."""
    with open(path, newline='') as f:
        rows = []
        for row in csv.DictReader(f):
            parsed: Dict[str, float] = {}
            for key, value in row.items():
                if value in ('', None):
                    continue
                parsed[key] = int(value) if key == 'epoch' else float(value)
            rows.append(parsed)
    return rows


class CurvesWriter:
    """curves.csv after every epoch; curves.png at most every PNG_INTERVAL_S, when asked, and at the
    end. Failures are warnings: the curves are a view of the history, which last.pth keeps."""

    def __init__(self, output_path: str):
        self.csv_path = os.path.join(output_path, CURVES_CSV)
        self.png_path = os.path.join(output_path, CURVES_PNG)
        self.drawn_epochs = -1  # how many epochs curves.png shows
        self.drawn_at = -math.inf

    def write(self, history: Sequence[Mapping[str, Any]], draw: bool) -> None:
        self._try(write_csv, history, self.csv_path)
        if draw or time.monotonic() - self.drawn_at >= PNG_INTERVAL_S:
            self.draw(history)

    def draw(self, history: Sequence[Mapping[str, Any]]) -> None:
        if history and len(history) != self.drawn_epochs:
            self._try(write_png, history, self.png_path)
            self.drawn_epochs, self.drawn_at = len(history), time.monotonic()

    @staticmethod
    def _try(write, history, path) -> None:
        try:
            write(history, path)
        except Exception as err:
            logger.warning('could not write %s: %s: %s', path, type(err).__name__, err)
