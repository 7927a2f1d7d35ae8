"""Pictures of detections: boxes, `label score` tags, one colour per class id."""
import colorsys
from typing import Any, Dict, Iterable, List, Sequence, Tuple

# Distinct, high-contrast colours, one per class id (id 1 gets the first).
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
)


def class_color(class_id: int) -> Tuple[int, int, int]:
    if 1 <= class_id <= len(PALETTE):
        return PALETTE[class_id - 1]
    hue = (class_id * 0.618033988749895) % 1.0  # golden-ratio hues stay apart
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.95))


def _text_color(background: Tuple[int, int, int]) -> Tuple[int, int, int]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def text_font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed small bitmap font
        return ImageFont.load_default()


def draw_detections(image, detections: Sequence[Dict[str, Any]], label_to_id: Dict[str, int]):
    """A copy of `image` with each detection's box and a `label score` tag (class colour, contrasting text).

    The font and line width scale with the image's shorter side, so tags stay legible on large photos.
    `detections`: ``{'box': (x1, y1, x2, y2), 'label': str, 'score': float}``.
    """
    from PIL import ImageDraw
    canvas = image.convert('RGB')  # a copy
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    side = min(width, height)
    font = text_font(max(12, round(side * 0.028)))
    line = max(2, round(side / 250))
    pad = max(2, line)
    ordered = sorted(detections, key=lambda d: d['score'])  # best drawn last, on top
    for det in ordered:
        color = class_color(label_to_id.get(det['label'], 0))
        draw.rectangle(det['box'], outline=color, width=line)
    for det in ordered:
        color = class_color(label_to_id.get(det['label'], 0))
        x1, y1 = det['box'][0], det['box'][1]
        text = det.get('tag') or f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
        tx = min(max(0.0, x1), max(0.0, width - tag_w))
        ty = y1 - tag_h if y1 - tag_h >= 0 else y1  # above the box, else inside its top edge
        ty = min(max(0.0, ty), max(0.0, height - tag_h))
        draw.rectangle((tx, ty, tx + tag_w, ty + tag_h), fill=color)
        draw.text((tx + pad - left, ty + pad - top), text, fill=_text_color(color), font=font)
    return canvas


def _confidence(annotation_json: Dict[str, Any]) -> float:
    metadata = annotation_json.get('metadata') or {}
    for scope in ('user', 'system'):
        model = (metadata.get(scope) or {}).get('model') or {}
        if 'confidence' in model:
            return float(model['confidence'])
    return float('nan')


def detections_from_json(annotations: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Boxes read from annotation JSON (coordinates [{x, y}, {x, y}]), the way the platform stores them."""
    detections = []
    for ann in annotations:
        if ann.get('type') != 'box':
            continue
        (a, b) = ann['coordinates'][:2]
        detections.append({'box': (float(a['x']), float(a['y']), float(b['x']), float(b['y'])),
                           'label': ann.get('label'), 'score': _confidence(ann)})
    return detections
