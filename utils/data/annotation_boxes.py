"""One Dataloop annotation (its JSON) as tight boxes in the pixel frame of the image it is drawn on.

Types:
  * ``box``: its two corners, in either order (normalized); an optional third
    coordinate is a rotation angle in degrees about the box centre -> tight box.
  * ``segment`` (polygon, one or more rings): one tight box over every vertex.
  * ``binary`` (``data:image/png;base64,...`` mask): pixels whose alpha is >= 128
    (more than half opaque; soft model-made masks are thresholded there; a mask
    without alpha uses its grey level) -> one box per 8-connected blob, since one
    mask can hold several objects. A pixel (c, r) covers [c, c+1) x [r, r+1).
    The mask's size is read from its header first: one over the pixel limit is
    counted as ``mask too large``, one of another size than the image as ``mask
    size differs from image`` (there is no telling which frame it was drawn in).
  * ``ellipse`` (centre, rx, ry, angle in degrees): exact tight box of the rotated ellipse.
  * anything else (point, polyline, class, text, ...) is skipped and counted as ``type <t>``.
Boxes are clipped to the image; those under 1 px wide or high after clipping are dropped.

`annotation_boxes` gives an annotation's boxes unclipped, `clip_box` clips one to the image.
Whatever cannot be used raises `UnusableData`, whose `reason` is the counter key a `SubsetReport`
counts it under (`utils.data.dataloop_reader`).
"""
import base64
import binascii
import io
import math
from typing import List, NamedTuple, Tuple

import numpy as np
from PIL import Image

MASK_THRESHOLD = 128  # alpha >= 128 is inside: more than half opaque
# The largest coordinate taken, in pixels: far past any image the pixel limit allows (400 MP is at
# most 400 million px along a side), yet small enough that squaring it (rotated ellipses) stays finite.
MAX_COORDINATE = 1e9


class UnusableData(Exception):
    """An item or annotation cannot be used; `reason` is the counter key."""

    def __init__(self, reason: str, detail: str = ''):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _num(v) -> float:
    """A finite float of sane size (at most `MAX_COORDINATE` either way) from an int, float or numeric
    string; anything else (a bool, null, an object, a 400-digit integer, 1e999) is bad coordinates."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise UnusableData('bad coordinates', f'not a number: {v!r:.80}')
    try:
        f = float(v)
    except (ValueError, OverflowError):  # OverflowError: an integer past float's range
        raise UnusableData('bad coordinates', f'not a number of sane size: {v!r:.80}') from None
    if not math.isfinite(f):
        raise UnusableData('bad coordinates', f'not finite: {v!r:.80}')
    if abs(f) > MAX_COORDINATE:
        raise UnusableData('bad coordinates', f'{v!r:.80} is beyond {MAX_COORDINATE:.0e} px')
    return f


def _xy(point) -> Tuple[float, float]:
    if not isinstance(point, dict) or 'x' not in point or 'y' not in point:
        raise UnusableData('bad coordinates', f'not a point: {point!r:.80}')
    return _num(point['x']), _num(point['y'])


def _box_from_box(coords) -> List[Tuple[float, float, float, float]]:
    if not isinstance(coords, list) or len(coords) < 2:
        raise UnusableData('bad coordinates', 'box needs two corner points')
    (xa, ya), (xb, yb) = _xy(coords[0]), _xy(coords[1])
    x1, x2, y1, y2 = min(xa, xb), max(xa, xb), min(ya, yb), max(ya, yb)
    # as the SDK reads it: a number in third place is the angle, anything else none
    angle = _num(coords[2]) if len(coords) > 2 and type(coords[2]) in (int, float) else 0.0
    if angle % 180.0:  # rotated box: tight box of the rectangle rotated about its centre
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
        ex, ey = hw * c + hh * s, hw * s + hh * c
        return [(cx - ex, cy - ey, cx + ex, cy + ey)]
    return [(x1, y1, x2, y2)]


def _box_from_segment(coords) -> List[Tuple[float, float, float, float]]:
    if not isinstance(coords, list) or not coords:
        raise UnusableData('bad coordinates', 'polygon without rings')
    rings = [coords] if isinstance(coords[0], dict) else coords  # tolerate a single flat ring
    points = [_xy(p) for ring in rings if isinstance(ring, list) for p in ring]
    if len(points) < 2:
        raise UnusableData('bad coordinates', 'polygon with fewer than 2 points')
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [(min(xs), min(ys), max(xs), max(ys))]


def _box_from_ellipse(coords) -> List[Tuple[float, float, float, float]]:
    if not isinstance(coords, dict):
        raise UnusableData('bad coordinates', 'ellipse is not an object')
    cx, cy = _xy(coords.get('center'))
    rx, ry = abs(_num(coords.get('rx'))), abs(_num(coords.get('ry')))
    theta = math.radians(_num(coords.get('angle', 0)))
    ex = math.sqrt((rx * math.cos(theta)) ** 2 + (ry * math.sin(theta)) ** 2)
    ey = math.sqrt((rx * math.sin(theta)) ** 2 + (ry * math.cos(theta)) ** 2)
    return [(cx - ex, cy - ey, cx + ex, cy + ey)]


def _decode_mask(coords, canvas: 'ImageCanvas') -> np.ndarray:
    """The mask's 'inside' pixels as a bool array: alpha (or grey level) >= MASK_THRESHOLD.

    Its size comes from the header and is checked before decoding: a few bytes of
    PNG can claim gigapixels, and a mask of another size than the image has no frame.
    """
    data = coords.get('data') if isinstance(coords, dict) else coords
    if not isinstance(data, str):
        raise UnusableData('bad coordinates', 'binary mask is not a string')
    if data.startswith('data:'):
        data = data.partition(',')[2]
    try:
        with Image.open(io.BytesIO(base64.b64decode(data))) as mask:
            width, height = mask.size
            if width * height > canvas.max_pixels:
                raise UnusableData('mask too large', f'mask is {width}x{height}, over the limit of '
                                                     f'{canvas.max_pixels:,} pixels (max_image_pixels)')
            if (width, height) != (canvas.width, canvas.height):
                raise UnusableData('mask size differs from image',
                            f'mask is {width}x{height}, the image {canvas.width}x{canvas.height}')
            mask.load()
            if mask.mode in ('RGBA', 'LA', 'PA') or 'transparency' in mask.info:
                channel = mask.convert('RGBA').getchannel('A')
            else:
                channel = mask.convert('L')
    except Image.DecompressionBombError as err:  # past PIL's own limit, refused while reading the header
        raise UnusableData('mask too large', str(err)) from None
    except (binascii.Error, OSError, ValueError, SyntaxError) as err:
        raise UnusableData('bad coordinates', f'binary mask does not decode: {err}') from None
    return np.asarray(channel) >= MASK_THRESHOLD


def mask_blob_boxes(mask: np.ndarray) -> List[Tuple[float, float, float, float]]:
    """Tight box (pixel edges) of each 8-connected blob of a bool mask, via runs + union-find.

    Pure numpy/Python (no scipy/cv2 in the runtime); cost grows with the number of
    horizontal runs, not pixels.
    """
    rows_any, cols_any = mask.any(axis=1), mask.any(axis=0)
    if not rows_any.any():
        return []
    r0, c0 = int(rows_any.argmax()), int(cols_any.argmax())
    r1, c1 = len(rows_any) - int(rows_any[::-1].argmax()), len(cols_any) - int(cols_any[::-1].argmax())
    crop = mask[r0:r1, c0:c1].astype(np.int8)
    edges = np.diff(np.pad(crop, ((0, 0), (1, 1))), axis=1)
    start_r, start_c = np.nonzero(edges == 1)  # row-major order: starts and ends pair up
    _, end_c = np.nonzero(edges == -1)        # end is exclusive
    n = len(start_r)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(start_r, np.arange(crop.shape[0] + 1))
    sc, ec = start_c.tolist(), end_c.tolist()
    for r in range(1, crop.shape[0]):
        i, i_end = int(row_first[r - 1]), int(row_first[r])   # runs of the row above
        j, j_end = i_end, int(row_first[r + 1])               # runs of this row
        while i < i_end and j < j_end:
            if sc[i] <= ec[j] and sc[j] <= ec[i]:  # overlap or diagonal touch: 8-connected
                a, b = find(i), find(j)
                if a != b:
                    parent[b] = a
            if ec[i] < ec[j]:
                i += 1
            else:
                j += 1
    blobs = {}
    for k, r in enumerate(start_r.tolist()):
        root = find(k)
        b = blobs.get(root)
        if b is None:
            blobs[root] = [sc[k], r, ec[k], r + 1]
        else:
            b[0], b[2], b[3] = min(b[0], sc[k]), max(b[2], ec[k]), r + 1
    return [(float(x1 + c0), float(y1 + r0), float(x2 + c0), float(y2 + r0))
            for x1, y1, x2, y2 in sorted(blobs.values(), key=lambda b: (b[1], b[0]))]


class ImageCanvas(NamedTuple):
    """The image an annotation is drawn on: its size and the pixel limit a mask may claim (masks are the one
    type that brings its own pixels). Not a video frame: those are `utils.data.video_frames`."""
    width: int
    height: int
    max_pixels: int


def _box_from_binary(coords, canvas: ImageCanvas) -> List[Tuple[float, float, float, float]]:
    boxes = mask_blob_boxes(_decode_mask(coords, canvas))
    if not boxes:
        raise UnusableData('empty mask')
    return boxes


_CONVERTERS = {'box': _box_from_box, 'segment': _box_from_segment, 'ellipse': _box_from_ellipse}
#: Annotation types `annotation_boxes` turns into boxes (masks are decoded apart: they need the image's size).
BOX_TYPES = ('box', 'segment', 'binary', 'ellipse')


def annotation_boxes(annotation: dict, canvas: ImageCanvas) -> List[Tuple[float, float, float, float]]:
    """Unclipped xyxy boxes of one annotation; raises UnusableData for types that are not boxes."""
    kind = annotation.get('type')
    if kind is not None and not isinstance(kind, str):
        raise UnusableData('bad annotation', f'type is not a string: {kind!r:.80}')
    coords = annotation['coordinates'] if 'coordinates' in annotation else annotation.get('data')
    if kind == 'binary':
        return _box_from_binary(coords, canvas)
    if kind not in _CONVERTERS:
        raise UnusableData(f'type {kind}' if kind else 'type missing')
    return _CONVERTERS[kind](coords)


def clip_box(box, width: int, height: int):
    """Clip to the image; None with the reason when less than 1 px is left either way."""
    x1, y1, x2, y2 = box
    width, height = float(width), float(height)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    if cx2 - cx1 >= 1.0 and cy2 - cy1 >= 1.0:
        return [cx1, cy1, cx2, cy2], None
    if (cx2 <= cx1 or cy2 <= cy1) and x2 - x1 >= 1.0 and y2 - y1 >= 1.0:
        return None, 'outside the image'
    return None, 'smaller than 1px'
