"""Read what `prepare_data` downloaded (item JSONs + images) into plain box records.

Layout, per subset (``train``, ``validation``, ...)::

    data_path/<subset>/items/<remote path>          # the image
    data_path/<subset>/json/<remote dir>/<stem>.json  # item JSON with an `annotations` list

Every JSON is read once. Each becomes one record::

    {'item_id': str, 'name': str, 'image_path': str, 'width': int, 'height': int,
     'boxes': [[x1, y1, x2, y2], ...], 'labels': [str, ...]}

Boxes are floats in the pixel frame of the image *as displayed* (EXIF orientation
applied), because that is the frame Dataloop's annotation studio draws in; the
size comes from the image header (`image_size`), never from item metadata, which
can be stale or missing. Coordinates are read from the JSON directly (the SDK's
`AnnotationCollection.from_json` silently drops what it cannot parse).

Annotation types become boxes as `utils.data.annotation_boxes` says (box, polygon, ellipse, mask
blobs; other types are counted as ``type <t>``), clipped to the image; those under 1 px
wide or high after clipping are dropped.

Video items (a `video/*` mimetype, a video file, or annotations with ``snapshots_``)
become one record per sampled frame, with its ``frame`` number, as
`utils.data.video_frames` says; their counts are the report's ``video`` part.

Bad items (unparseable JSON, missing/undecodable image, an image refused by the
`ImageLimits` (too large, too thin for the network), a path leaving data_path,
an unreadable video) are skipped with a WARNING naming them; every drop is counted in the
subset's `SubsetReport`, logged as one INFO summary per subset.
"""
import collections
import dataclasses
import json
import logging
import os
import stat
from typing import Dict, Iterable, List, Optional, Tuple

from PIL import Image

from utils.data.annotation_boxes import ImageCanvas, UnusableData, annotation_boxes, clip_box
from utils.core.config import DEFAULTS
from utils.data.image_files import image_extensions
from utils.data.images import ImageDecodeError, ImageLimits, ImageSizeError, image_size
from utils.data.video import is_video
from utils.data.video_frames import FRAMES_DIR, VideoCounts, VideoItemReader

logger = logging.getLogger(__name__)

PROGRESS_EVERY = 2000


@dataclasses.dataclass
class SubsetReport:
    """What happened to one subset's items and annotations, so users can see why data is missing."""
    items: int = 0                 # item JSON files read
    items_used: int = 0            # records produced (negatives included)
    negatives: int = 0             # records without boxes (only with include_background)
    boxes_per_label: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped_items: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    video: VideoCounts = dataclasses.field(default_factory=VideoCounts)

    def summary(self) -> str:
        boxes = sum(self.boxes_per_label.values())
        per_label = ', '.join(f'{k} {v}' for k, v in sorted(self.boxes_per_label.items()))
        dropped = ', '.join(f'{k}: {v}' for k, v in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0])))
        return (f'{self.items} items, {self.items_used} used ({self.negatives} negatives), '
                f'{boxes} boxes ({per_label or "none"}); '
                + (f'{self.video.summary()}; ' if self.video.videos else '')
                + f'dropped: {dropped or "nothing"}')

    def to_json(self) -> dict:
        return {'items': self.items, 'items_used': self.items_used, 'negatives': self.negatives,
                'boxes_per_label': dict(self.boxes_per_label), 'dropped': dict(self.dropped),
                'skipped_items': [list(s) for s in self.skipped_items], 'video': self.video.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> 'SubsetReport':
        return cls(items=int(d['items']), items_used=int(d['items_used']), negatives=int(d['negatives']),
                   boxes_per_label=collections.Counter(d['boxes_per_label']),
                   dropped=collections.Counter(d['dropped']),
                   skipped_items=[tuple(s) for s in d['skipped_items']], video=VideoCounts.from_json(d.get('video')))


@dataclasses.dataclass
class DataloopExport:
    subsets: Dict[str, List[dict]]
    reports: Dict[str, SubsetReport]
    labels_found: List[str]  # sorted names seen in usable boxes, before filtering by the label map


# ----------------------------------------------------------------------------- helpers

def _get(d, *keys):
    """d[k1][k2]... or None when any level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a named pipe (FIFO)'), (stat.S_ISSOCK, 'a socket'),
             (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'))
    return next((kind for test, kind in kinds if test(mode)), 'a special file')


def is_inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


# ----------------------------------------------------------------------------- items

def _item_id(item: dict, annotations: list) -> str:
    return str(item.get('id') or item.get('_id') or next(
        (a.get('itemId') for a in annotations if isinstance(a, dict) and a.get('itemId')), ''))


def _is_video_item(metadata, annotations: list, path: str) -> bool:
    mimetype = _get(metadata, 'system', 'mimetype')
    return is_video(mimetype if isinstance(mimetype, str) else None) or is_video(path) or any(
        _get(a, 'metadata', 'system', 'snapshots_') for a in annotations)


# Drops worth a line each (the data can be fixed); the others (types, duplicates, empty masks) are only counted.
_WARNED_ANNOTATION_DROPS = ('bad coordinates', 'bad annotation', 'no label', 'bad label', 'mask too large',
                            'mask size differs from image')


def _labelled_boxes(annotation, canvas: ImageCanvas, seen: set) -> Tuple[str, List[Tuple[float, float, float, float]]]:
    """(label, unclipped boxes) of one annotation; `seen` keys catch exact duplicates within the item."""
    if not isinstance(annotation, dict):
        raise UnusableData('bad annotation', f'not an object: {annotation!r:.80}')
    label = annotation.get('label')
    # as JSON text: any label, type or coordinates (objects included) make a key
    key = json.dumps([label, annotation.get('type'), annotation.get('coordinates', annotation.get('data'))],
                     sort_keys=True, default=repr)
    if key in seen:
        raise UnusableData('duplicate annotation')
    seen.add(key)
    raw = annotation_boxes(annotation, canvas)
    if label is None or label == '':
        raise UnusableData('no label', 'annotation without a label')
    if not isinstance(label, str):
        raise UnusableData('bad label', f'label is a {type(label).__name__}, not a string: {label!r:.80}')
    return label, raw


class _SubsetReader:
    """Reads one subset; keeps the per-directory listing cache used to find images by stem."""

    def __init__(self, data_root: str, subset: str, labels: Optional[frozenset], include_background: bool,
                 labels_found: set, limits: ImageLimits, video_frame_stride: int):
        self.root = data_root
        self.subset = subset
        self.items_dir = os.path.join(data_root, subset, 'items')
        self.json_dir = os.path.join(data_root, subset, 'json')
        self.labels, self.include_background, self.labels_found = labels, include_background, labels_found
        self.limits = limits
        self.report = SubsetReport()
        self._listing = {}
        self.videos = VideoItemReader(self.report, subset, os.path.join(data_root, subset, FRAMES_DIR),
                                      video_frame_stride, include_background, limits, self._item_boxes)

    def _checked(self, path: str) -> str:
        """The real path of a regular file inside data_path: opening a FIFO would block the reader
        until someone writes to it, and a device can stream forever."""
        real = os.path.realpath(path)
        if not is_inside(real, self.root):
            raise UnusableData('path outside data_path', f'{path} resolves to {real}')
        try:
            mode = os.stat(real).st_mode
        except OSError as err:
            raise UnusableData('missing image', f'{path}: {err.strerror or err}') from None
        if not stat.S_ISREG(mode):
            raise UnusableData('not a regular file', f'{path} is {_file_kind(mode)}, not a regular file')
        return real

    def _by_stem(self, rel_json: str) -> Optional[str]:
        """items/<dir>/<stem>.<any ext> for json/<dir>/<stem>.json, image extensions first."""
        rel_dir, stem = os.path.split(os.path.splitext(rel_json)[0])
        folder = os.path.join(self.items_dir, rel_dir)
        names = self._listing.get(folder)
        if names is None:
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            self._listing[folder] = names
        candidates = [n for n in names if n == stem or os.path.splitext(n)[0] == stem]
        candidates.sort(key=lambda n: os.path.splitext(n)[1].lower() not in image_extensions())
        for name in candidates:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        return None

    def _find_image(self, filename: Optional[str], rel_json: str) -> str:
        if isinstance(filename, str) and filename.strip('/'):
            # A remote path names a file inside items/: any '..' that leaves it is an attack or a bug.
            path = os.path.normpath(os.path.join(self.items_dir, filename.lstrip('/')))
            if not is_inside(path, self.items_dir):
                raise UnusableData('path outside data_path', f'filename {filename!r} leaves {self.items_dir}')
            if os.path.lexists(path):
                return self._checked(path)
        path = self._by_stem(rel_json)
        if path is None:
            raise UnusableData('missing image', f'no file under {self.items_dir} for {filename or rel_json!r}')
        return self._checked(path)

    def read_item(self, json_path: str):
        """One record for an image item, a list of frame records for a video, None for a skipped item."""
        rel_json = os.path.relpath(json_path, self.json_dir)
        name = '/' + os.path.splitext(rel_json)[0].replace(os.sep, '/')  # until the item names itself
        try:
            item, annotations = self._parse_item(json_path)
            filename = item.get('filename')
            named = isinstance(filename, str) and bool(filename)
            if named:
                name = filename
            metadata = item.get('metadata') if isinstance(item.get('metadata'), dict) else item.get('itemMetadata')
            image_path = self._find_image(filename, rel_json)
            if not named:
                name = '/' + os.path.relpath(image_path, os.path.realpath(self.items_dir)).replace(os.sep, '/')
            if _is_video_item(metadata, annotations, image_path):
                return self.videos.read(name, _item_id(item, annotations), annotations, image_path)
            width, height = self._image_size(image_path)
        except UnusableData as skip:
            self._skip_item(name, skip)
            return None
        self._note_stale_size(name, metadata, width, height)
        boxes, labels = self._item_boxes(name, annotations, ImageCanvas(width, height, self.limits.max_pixels))
        if not boxes:
            if not self.include_background:
                self.report.dropped['no usable boxes'] += 1
                self.report.skipped_items.append((name, 'no usable boxes'))
                logger.debug('%s: item %s has no usable boxes: skipped (include_background is off)',
                             self.subset, name)
                return None
            self.report.negatives += 1
        self.report.items_used += 1
        return {'item_id': _item_id(item, annotations), 'name': name, 'image_path': image_path,
                'width': int(width), 'height': int(height), 'boxes': boxes, 'labels': labels}

    def _parse_item(self, json_path: str) -> Tuple[dict, list]:
        """The item JSON (``{}`` for a bare list of annotations) and its annotations list."""
        self._checked(json_path)
        try:
            with open(json_path, 'rb') as f:
                item = json.load(f)
        # JSONDecodeError and UnicodeDecodeError are ValueErrors; nesting thousands deep is a RecursionError
        except (OSError, ValueError, RecursionError) as err:
            raise UnusableData('unparseable json', str(err) or type(err).__name__) from None
        if isinstance(item, list):  # a bare list of annotations
            annotations, item = item, {}
        elif isinstance(item, dict):
            annotations = item.get('annotations') or []
        else:
            raise UnusableData('unparseable json', f'top level is a {type(item).__name__}')
        if not isinstance(annotations, list):
            raise UnusableData('unparseable json', '`annotations` is not a list')
        return item, annotations

    def _image_size(self, image_path: str) -> Tuple[int, int]:
        """(width, height) as displayed; an image the limits refuse or that does not decode is a skip."""
        try:
            return image_size(image_path, self.limits)
        except ImageSizeError as err:
            raise UnusableData(err.reason, str(err)) from None
        except (ImageDecodeError, Image.DecompressionBombError) as err:
            raise UnusableData('undecodable image', str(err)) from None

    def _skip_item(self, name: str, skip: UnusableData) -> None:
        self.report.dropped[skip.reason] += 1
        self.report.skipped_items.append((name, skip.reason))
        logger.warning('%s: skipping item %s (%s): %s', self.subset, name, skip.reason, skip.detail)

    def _note_stale_size(self, name: str, metadata, width: int, height: int) -> None:
        meta_size = (_get(metadata, 'system', 'width'), _get(metadata, 'system', 'height'))
        if meta_size[0] and meta_size != (width, height):
            logger.debug('%s: %s metadata says %sx%s, the image is %dx%d: using the image', self.subset, name,
                         meta_size[0], meta_size[1], width, height)

    def _item_boxes(self, name: str, annotations: list, canvas: ImageCanvas) -> Tuple[List[List[float]], List[str]]:
        """Clipped boxes and their labels; every annotation or box left out is counted by reason."""
        boxes, labels, seen = [], [], set()
        for annotation in annotations:
            try:
                label, raw = _labelled_boxes(annotation, canvas, seen)
            except UnusableData as skip:
                self.report.dropped[skip.reason] += 1
                if skip.detail and skip.reason in _WARNED_ANNOTATION_DROPS:
                    logger.warning('%s: item %s: dropping annotation %s (%s): %s', self.subset, name,
                                   _get(annotation, 'id') or '?', skip.reason, skip.detail)
                continue
            for box in raw:
                clipped, reason = clip_box(box, canvas.width, canvas.height)
                if clipped is None:
                    self.report.dropped[reason] += 1
                    continue
                self.labels_found.add(label)
                if self.labels is not None and label not in self.labels:
                    self.report.dropped['label not in model'] += 1
                    continue
                boxes.append(clipped)
                labels.append(label)
                self.report.boxes_per_label[label] += 1
        return boxes, labels

    def json_files(self) -> List[str]:
        found = []
        for folder, dirs, files in os.walk(self.json_dir):
            dirs.sort()
            found.extend(os.path.join(folder, f) for f in sorted(files) if f.lower().endswith('.json'))
        return found

    def read(self) -> List[dict]:
        files = self.json_files()
        logger.info('%s: reading %d item files under %s', self.subset, len(files), self.json_dir)
        records = []
        for k, path in enumerate(files, 1):
            self.report.items += 1
            record = self.read_item(path)
            if isinstance(record, list):  # a video's frames
                records.extend(record)
                self.report.items_used += bool(record)
            elif record is not None:
                records.append(record)
            if k % PROGRESS_EVERY == 0:
                logger.info('%s: %d/%d items read', self.subset, k, len(files))
        return records


def read_dataloop_export(data_path, labels: Optional[Iterable[str]] = None, include_background: bool = False,
                         limits: Optional[ImageLimits] = None,
                         video_frame_stride: int = DEFAULTS['video_train_frame_stride']) -> DataloopExport:
    """Read every subset under `data_path` (each folder with a `json/` or `items/` inside).

    labels: the names the model knows; boxes with other labels are dropped and counted.
    None keeps every label found. include_background keeps items without usable
    boxes as negatives (records with empty boxes). limits: the image sizes the
    network takes (default: the default pixel limit only); other items are skipped and counted.
    video_frame_stride: every k-th frame of a video's annotated spans is sampled (and every fixed keyframe).
    """
    root = os.path.realpath(data_path)
    if not os.path.isdir(root):
        raise FileNotFoundError(f'data_path {data_path!r} is not a folder: nothing was downloaded there')
    if isinstance(labels, str):
        raise TypeError(f'labels must be an iterable of label names, not the string {labels!r}')
    label_set = None if labels is None else frozenset(labels)
    subsets, reports, found = {}, {}, set()
    for subset in sorted(os.listdir(root)):
        base = os.path.join(root, subset)
        if not os.path.isdir(base) or not (os.path.isdir(os.path.join(base, 'json'))
                                           or os.path.isdir(os.path.join(base, 'items'))):
            continue
        reader = _SubsetReader(root, subset, label_set, include_background, found, limits or ImageLimits(),
                               video_frame_stride)
        if not os.path.isdir(reader.json_dir):
            logger.warning('%s: no json/ folder under %s: the subset has no item files', subset, base)
        subsets[subset] = reader.read()
        reports[subset] = reader.report
    for subset, report in reports.items():
        logger.info('subset %r: %s', subset, report.summary())
    if not reports:
        logger.warning('no subset folder (<subset>/json, <subset>/items) under %s', root)
    return DataloopExport(subsets=subsets, reports=reports, labels_found=sorted(found))
