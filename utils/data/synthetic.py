"""A seeded synthetic detection dataset written in Dataloop's download layout.

`make_synthetic_export(root, ...)` writes, for each subset (``train``, ``validation``)::

    root/<subset>/items/<name>.jpg
    root/<subset>/json/<stem>.json      # item JSON as the platform exports it

Each image holds a few well separated shapes of distinct classes ('circle',
'square', 'triangle', ...), each drawn with a class-typical colour, 15-40% of the
image side, on a noisy textured background: easy to learn from random weights,
but not a plain colour threshold. Objects are annotated as ``box`` or, with
``segment_fraction`` > 0, some as ``segment`` polygons (the reader's polygon
path). Everything is a function of ``seed``: the same call writes the same
bytes, and item ``i`` of a subset does not depend on how many items are made.

Used by the tests (tiny sets), the offline demo and the benchmarks under bench/.
"""
import io
import json
import logging
import math
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

#: Shapes the generator can draw, each with its class-typical RGB colour.
SHAPE_COLORS: Dict[str, Tuple[int, int, int]] = {
    'circle': (220, 40, 40),     # red
    'square': (40, 170, 60),     # green
    'triangle': (40, 80, 225),   # blue
    'diamond': (235, 200, 30),   # yellow
    'cross': (160, 50, 200),     # purple
}
DEFAULT_LABELS = ('circle', 'square', 'triangle')
_SUBSET_KEYS = {'train': 1, 'validation': 2}


def _polygon(shape: str, cx: float, cy: float, size: float, angle: float) -> List[Tuple[float, float]]:
    """Outline of `shape` centred at (cx, cy) whose bounding box side is about `size`."""
    half = size / 2.0
    if shape == 'circle':
        n = 48
        return [(cx + half * math.cos(2 * math.pi * k / n), cy + half * math.sin(2 * math.pi * k / n))
                for k in range(n)]
    if shape == 'square':
        # Axis-aligned with a small tilt so it stays a square to the eye.
        corners = [(-half, -half), (half, -half), (half, half), (-half, half)]
    elif shape == 'diamond':
        corners = [(0, -half), (half * 0.75, 0), (0, half), (-half * 0.75, 0)]
    elif shape == 'triangle':
        # Equilateral with circumradius `half`: any rotation stays inside the circle.
        corners = [(half * math.cos(math.radians(a)), half * math.sin(math.radians(a)))
                   for a in (-90, 30, 150)]
    elif shape == 'cross':
        t = half / 3.0
        corners = [(-t, -half), (t, -half), (t, -t), (half, -t), (half, t), (t, t), (t, half),
                   (-t, half), (-t, t), (-half, t), (-half, -t), (-t, -t)]
    else:
        raise ValueError(f'unknown shape {shape!r}; known shapes: {sorted(SHAPE_COLORS)}')
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Muted low-frequency colour field + distractor strokes + pixel noise, float HxWx3."""
    grid = rng.uniform(70, 190, size=(int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3))
    gray = grid.mean(axis=2, keepdims=True)
    grid = gray + 0.35 * (grid - gray)  # desaturate so object colours stand out
    field = Image.fromarray(grid.clip(0, 255).astype(np.uint8), 'RGB').resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(4, 10))):  # thin grey-ish strokes: texture, not objects
        x0, x1 = rng.uniform(0, width, 2)
        y0, y1 = rng.uniform(0, height, 2)
        tone = int(rng.integers(60, 200))
        tint = rng.integers(-20, 21, 3)
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(v) for v in np.clip(tone + tint, 0, 255)),
                  width=int(rng.integers(1, 4)))
    field = field.filter(ImageFilter.GaussianBlur(0.8))
    return np.asarray(field, dtype=np.float32)


def _place(rng: np.random.Generator, sizes: Sequence[float], width: int, height: int,
           gap: float, tries: int = 200) -> Optional[List[Tuple[float, float]]]:
    """Centres for objects of nominal side `sizes` inside the image, pairwise `gap` px apart, or None.

    Each object reserves a square of side 1.15 * size: a tilted square or cross reaches
    at most that far from its centre.
    """
    centres: List[Tuple[float, float]] = []
    boxes: List[Tuple[float, float, float, float]] = []
    for size in sizes:
        half = 1.15 * size / 2.0
        for _ in range(tries):
            cx = rng.uniform(half + 1, width - half - 1)
            cy = rng.uniform(half + 1, height - half - 1)
            box = (cx - half - gap, cy - half - gap, cx + half + gap, cy + half + gap)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                centres.append((cx, cy))
                boxes.append((cx - half, cy - half, cx + half, cy + half))
                break
        else:
            return None
    return centres


def _hex_id(rng: np.random.Generator) -> str:
    return ''.join(f'{int(b):02x}' for b in rng.integers(0, 256, 12))


def render_item(rng: np.random.Generator, image_size: Tuple[int, int], labels: Sequence[str],
                max_objects: int = 4, size_range: Tuple[float, float] = (0.15, 0.40),
                segment_fraction: float = 0.0) -> Tuple[Image.Image, List[dict]]:
    """One image and its annotations (Dataloop annotation dicts) drawn from `rng`."""
    width, height = image_size
    side = min(width, height)
    n_objects = int(rng.integers(1, min(max_objects, len(labels)) + 1))
    while True:
        classes = [labels[int(k)] for k in rng.choice(len(labels), size=n_objects, replace=False)]
        sizes = [float(rng.uniform(*size_range)) * side for _ in classes]
        centres = _place(rng, sizes, width, height, gap=0.03 * side)
        if centres is not None:
            break
        n_objects = max(1, n_objects - 1)  # too crowded: fewer objects, fresh draw

    canvas = Image.fromarray(_background(rng, width, height).clip(0, 255).astype(np.uint8), 'RGB')
    draw = ImageDraw.Draw(canvas)
    annotations = []
    for label, size, (cx, cy) in zip(classes, sizes, centres):
        angle = float(rng.uniform(-0.15, 0.15)) if label in ('square', 'diamond', 'cross') \
            else float(rng.uniform(-math.pi, math.pi)) if label == 'triangle' else 0.0
        points = _polygon(label, cx, cy, size, angle)
        base = np.array(SHAPE_COLORS[label], dtype=np.float64)
        color = tuple(int(v) for v in np.clip(base * rng.uniform(0.8, 1.1) + rng.integers(-20, 21, 3), 0, 255))
        draw.polygon(points, fill=color, outline=tuple(max(0, v - 60) for v in color))
        xs = [min(max(p[0], 0.0), width) for p in points]
        ys = [min(max(p[1], 0.0), height) for p in points]
        as_segment = segment_fraction > 0 and float(rng.uniform()) < segment_fraction
        if as_segment:
            ann_type = 'segment'
            coordinates = [[{'x': round(x, 2), 'y': round(y, 2)} for x, y in zip(xs, ys)]]
        else:
            ann_type = 'box'
            coordinates = [{'x': round(min(xs), 2), 'y': round(min(ys), 2), 'z': 0},
                           {'x': round(max(xs), 2), 'y': round(max(ys), 2), 'z': 0}]
        annotations.append({'id': _hex_id(rng), 'type': ann_type, 'label': label,
                            'coordinates': coordinates, 'attributes': [], 'metadata': {}})

    # Pixel noise over everything, objects included, so no colour is flat.
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels += rng.normal(0.0, 12.0, size=pixels.shape).astype(np.float32)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), 'RGB')
    return image, annotations


def _prepare_dir(path: str, overwrite: bool) -> None:
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise FileExistsError(f'{path} is not empty: pass overwrite=True to replace its contents')
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)


def _check_arguments(labels: List[str], image_size: Tuple[int, int], size_range: Tuple[float, float],
                     max_objects: int, segment_fraction: float) -> Tuple[int, int]:
    """(width, height) as ints; ValueError naming the first bad argument."""
    if not labels:
        raise ValueError('labels must not be empty')
    unknown = [label for label in labels if label not in SHAPE_COLORS]
    if unknown:
        raise ValueError(f'unknown label(s) {unknown}: labels must be shapes from {sorted(SHAPE_COLORS)}')
    if len(set(labels)) != len(labels):
        raise ValueError(f'labels must be distinct, got {labels}')
    width, height = (int(v) for v in image_size)
    if min(width, height) < 32:
        raise ValueError(f'image_size must be at least 32x32, got {image_size}')
    if not 0 < size_range[0] <= size_range[1] <= 0.9:
        raise ValueError(f'size_range must satisfy 0 < low <= high <= 0.9, got {size_range}')
    if max_objects < 1:
        raise ValueError(f'max_objects must be >= 1, got {max_objects}')
    if not 0.0 <= segment_fraction <= 1.0:
        raise ValueError(f'segment_fraction must be in [0, 1], got {segment_fraction}')
    return width, height


def _write_item(rng: np.random.Generator, image: Image.Image, annotations: List[dict], stem: str,
                items_dir: str, json_dir: str, jpeg_quality: int) -> None:
    """items/<stem>.jpg and json/<stem>.json as the platform exports them; the item id is drawn from `rng`."""
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=int(jpeg_quality))
    data = buffer.getvalue()
    name = f'{stem}.jpg'
    with open(os.path.join(items_dir, name), 'wb') as f:
        f.write(data)
    item_json = {
        'id': _hex_id(rng),
        'filename': f'/{name}',
        'name': name,
        'type': 'file',
        'metadata': {'system': {'width': image.width, 'height': image.height, 'mimetype': 'image/jpeg',
                                'size': len(data)}},
        'annotations': annotations,
    }
    with open(os.path.join(json_dir, f'{stem}.json'), 'w') as f:
        json.dump(item_json, f, indent=1)


def make_synthetic_export(root: str, n_train: int = 200, n_val: int = 50,
                          image_size: Tuple[int, int] = (320, 320),
                          labels: Sequence[str] = DEFAULT_LABELS, seed: int = 0,
                          max_objects: int = 4, size_range: Tuple[float, float] = (0.15, 0.40),
                          segment_fraction: float = 0.0, jpeg_quality: int = 90,
                          overwrite: bool = False) -> dict:
    """Write a synthetic detection dataset under `root` in Dataloop's download layout.

    Args:
        root: output folder; ``root/train`` and ``root/validation`` are created.
        n_train, n_val: number of items per subset (0 skips writing the subset's files).
        image_size: (width, height) in pixels.
        labels: class names, a subset of ``SHAPE_COLORS`` (each label is its shape).
        seed: everything written is a function of it.
        max_objects: at most this many objects per image (and at most len(labels):
            the objects of one image have distinct classes); at least one.
        size_range: object side as a fraction of the shorter image side.
        segment_fraction: probability that an object is written as a ``segment``
            polygon instead of a ``box``.
        jpeg_quality: JPEG quality of the written images.
        overwrite: replace the subset folders' contents if they are not empty
            (otherwise FileExistsError).

    Returns:
        a summary dict: ``root``, ``labels``, ``image_size``, ``seed`` and, per subset,
        ``{'items': n, 'annotations': n, 'per_label': {label: n}, 'per_type': {type: n}}``
        under ``summary['subsets'][subset]``.
    """
    labels = list(labels)
    width, height = _check_arguments(labels, image_size, size_range, max_objects, segment_fraction)
    summary = {'root': os.path.abspath(root), 'labels': labels, 'image_size': [width, height],
               'seed': int(seed), 'subsets': {}}
    for subset, count in (('train', int(n_train)), ('validation', int(n_val))):
        if count < 0:
            raise ValueError(f'number of {subset} items must be >= 0, got {count}')
        items_dir = os.path.join(root, subset, 'items')
        json_dir = os.path.join(root, subset, 'json')
        stats = {'items': count, 'annotations': 0, 'per_label': {label: 0 for label in labels},
                 'per_type': {'box': 0, 'segment': 0}}
        summary['subsets'][subset] = stats
        if count == 0:
            continue
        _prepare_dir(items_dir, overwrite)
        _prepare_dir(json_dir, overwrite)
        for index in range(count):
            rng = np.random.default_rng([int(seed), _SUBSET_KEYS[subset], index])
            image, annotations = render_item(rng, (width, height), labels, max_objects=max_objects,
                                             size_range=size_range, segment_fraction=segment_fraction)
            _write_item(rng, image, annotations, f'{subset}_{index:06d}', items_dir, json_dir, jpeg_quality)
            stats['annotations'] += len(annotations)
            for ann in annotations:
                stats['per_label'][ann['label']] += 1
                stats['per_type'][ann['type']] += 1
        logger.info('synthetic %s: %d items, %d annotations under %s', subset, count,
                    stats['annotations'], os.path.join(root, subset))
    return summary
