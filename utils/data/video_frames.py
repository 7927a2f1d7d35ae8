"""Training frames from an annotated video: which frames, decoded once into images, and their records.

Which frames (`FramePlan`): every `stride`-th frame of the video (frame numbers
0, k, 2k, ...) that lies inside some annotation's span, plus every keyframe a
person fixed. Frames outside every span are never sampled: nobody looked at them,
so an object there may be unannotated rather than absent. Without
``include_background`` only frames where some object is visible are decoded.

Decoding (`extract_frames`) streams through the video once, in frame order
(`utils.data.video.read_frames`: one frame in memory), and writes each sampled frame
as ``<frames folder>/<item>/<frame number>.jpg``, so training epochs read small
images and never the video. A memo next to them (the video's size and mtime, the
plan) lets a later conversion of the same files (the local runner reads the data
twice; `train` converts again when the index is missing) reuse them without decoding.

Each kept frame becomes one record, as an image item does, plus its ``frame``
number; its boxes are made by the image reader's own box step (``boxes_of``), so
labels, clipping and every drop reason are counted exactly as for images, once
per sampled frame.
"""
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from typing import Callable, List, Optional, Sequence, Tuple

from PIL import Image

from utils.core.atomic import atomic_write
from utils.data.annotation_boxes import ImageCanvas, UnusableData
from utils.data.images import ImageLimits, ImageSizeError
from utils.data.video import VideoDecodeError, read_frames
from utils.data.video_annotations import Track, read_tracks

logger = logging.getLogger(__name__)

FRAMES_DIR = 'frames'  # <data_path>/<subset>/frames/<item>/<frame>.jpg
MEMO_FILE = 'frames.json'
MEMO_FORMAT = 'fasterrcnn-video-frames/1'
PROGRESS_EVERY_S = 30  # a long video logs where its decoding is at this often
JPEG_QUALITY = 95  # the video is lossy already: 95 adds little loss at a fraction of PNG's size and write time


@dataclasses.dataclass
class VideoCounts:
    """A subset's videos: how many, the frames sampled from them, what was kept and the boxes made."""
    videos: int = 0          # video items read
    videos_used: int = 0     # videos that gave at least one training frame
    frames_sampled: int = 0  # frames decoded (or reused from an earlier conversion)
    frames_kept: int = 0     # records made (negatives included)
    negatives: int = 0       # kept frames without boxes (only with include_background)
    boxes: int = 0

    def summary(self) -> str:
        return (f'videos: {self.videos} read, {self.videos_used} used, {self.frames_sampled} frames sampled, '
                f'{self.frames_kept} kept ({self.negatives} negatives), {self.boxes} boxes')

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Optional[dict]) -> 'VideoCounts':
        return cls(**{k: int(v) for k, v in (d or {}).items() if k in cls.__dataclass_fields__})


class FramePlan:
    """Which frame numbers to decode: a predicate for `read_frames`, plus `last` (where reading may stop)."""

    def __init__(self, tracks: Sequence[Track], stride: int, keep_empty: bool):
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
            raise ValueError(f'video frame stride must be an integer >= 1, got {stride!r}')
        self.tracks, self.stride, self.keep_empty = list(tracks), stride, keep_empty
        self.keyframes = frozenset(n for track in self.tracks for n in track.keyframes())
        self.spans: List[List[int]] = []
        for start, end in sorted((track.start, track.end) for track in self.tracks):
            if self.spans and start <= self.spans[-1][1] + 1:
                self.spans[-1][1] = max(self.spans[-1][1], end)
            else:
                self.spans.append([start, end])
        self.last = self.spans[-1][1] if self.spans else -1

    def _in_span(self, number: int) -> bool:
        return any(start <= number <= end for start, end in self.spans)

    def __call__(self, number: int) -> bool:
        if number not in self.keyframes and (number % self.stride or not self._in_span(number)):
            return False
        return self.keep_empty or any(track.visible_at(number) for track in self.tracks)

    def signature(self) -> str:
        """Changes whenever the frames this plan picks could change."""
        doc = [self.stride, self.keep_empty, [[t.start, t.end, [[s.frame, s.fixed, s.visible] for s in t.states]]
                                              for t in self.tracks]]
        return hashlib.sha1(json.dumps(doc).encode()).hexdigest()


def _source_stamp(video_path: str) -> List[int]:
    stat = os.stat(video_path)
    return [stat.st_size, stat.st_mtime_ns]


def _read_memo(folder: str, stamp: List[int], signature: str) -> Optional[Tuple[List[List[int]], int]]:
    """The frames an earlier run wrote for this video and plan, if every one is still there."""
    try:
        with open(os.path.join(folder, MEMO_FILE)) as f:
            memo = json.load(f)
        if memo.get('format') != MEMO_FORMAT or memo['source'] != stamp or memo['plan'] != signature:
            return None
        frames = [[int(n), int(w), int(h)] for n, w, h in memo['frames']]
        if all(os.path.isfile(frame_path(folder, n)) for n, _, _ in frames):
            return frames, int(memo['reached'])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def frame_path(folder: str, number: int) -> str:
    return os.path.join(folder, f'{number:08d}.jpg')


def extract_frames(video_path: str, plan: FramePlan, folder: str,
                   limits: ImageLimits) -> Tuple[List[List[int]], int]:
    """Decode the plan's frames once into `folder`: ([[frame, width, height], ...], last frame number reached).

    A video that cannot be read, whose frames the `limits` refuse, or whose frames cannot be
    written (a read-only data folder) raises UnusableData.
    """
    stamp, signature = _source_stamp(video_path), plan.signature()
    if plan.last < 0:  # no annotated span: nothing to decode
        return [], -1
    memo = _read_memo(folder, stamp, signature)
    if memo is not None:
        return memo
    written, reached, logged = [], -1, time.monotonic()

    def wanted(number: int) -> bool:
        nonlocal reached, logged
        reached = number
        if time.monotonic() - logged > PROGRESS_EVERY_S:
            logged = time.monotonic()
            logger.info('%s: decoding, at frame %d of at most %d; %d frames sampled so far', video_path, number,
                        plan.last, len(written))
        return plan(number)

    try:
        os.makedirs(folder, exist_ok=True)
        for number, rgb in read_frames(video_path, wanted, last=plan.last):
            height, width = rgb.shape[:2]
            limits.check(width, height)
            with atomic_write(frame_path(folder, number), 'wb') as f:
                Image.fromarray(rgb).save(f, format='JPEG', quality=JPEG_QUALITY)
            written.append([number, width, height])
    except VideoDecodeError as err:
        raise UnusableData('unreadable video', str(err)) from None
    except ImageSizeError as err:
        raise UnusableData(err.reason, str(err)) from None
    except OSError as err:  # the folder, not the video: a full disk is a DiskFullError and ends the run
        raise UnusableData('frames not writable', f'{folder}: {err.strerror or err}') from None
    try:
        with atomic_write(os.path.join(folder, MEMO_FILE), 'w') as f:
            json.dump({'format': MEMO_FORMAT, 'source': stamp, 'plan': signature, 'frames': written,
                       'reached': reached}, f)
    except OSError as err:  # the frames stand; only the next conversion decodes again
        logger.info('%s: memo not written (%s): a later conversion decodes the video again', folder, err)
    return written, reached


BoxesOf = Callable[[str, list, ImageCanvas], Tuple[List[List[float]], List[str]]]


class VideoItemReader:
    """Turns one subset's video items into frame records, counting into the subset's report.

    `boxes_of(name, annotations, frame)` is the image reader's box step: clipped boxes
    and labels of image annotations on one frame, every drop counted in the report.
    """

    def __init__(self, report, subset: str, frames_root: str, stride: int, include_background: bool,
                 limits: ImageLimits, boxes_of: BoxesOf):
        self.report, self.counts = report, report.video
        self.subset, self.frames_root, self.stride = subset, frames_root, stride
        self.include_background, self.limits, self.boxes_of = include_background, limits, boxes_of

    def _folder(self, item_id: str, video_path: str) -> str:
        key = item_id if re.fullmatch(r'[A-Za-z0-9_-]{1,64}', item_id or '') else \
            hashlib.sha1(video_path.encode()).hexdigest()[:24]
        return os.path.join(self.frames_root, key)

    def read(self, name: str, item_id: str, annotations: list, video_path: str) -> List[dict]:
        """The video's training frames as records; UnusableData when the video itself cannot be used."""
        self.counts.videos += 1
        tracks, skipped = read_tracks(annotations)
        plan = FramePlan(tracks, self.stride, self.include_background)
        folder = self._folder(item_id, video_path)
        frames, reached = extract_frames(video_path, plan, folder, self.limits)
        for annotation_id, skip in skipped:
            self.report.dropped[skip.reason] += 1
            if skip.detail:
                logger.warning('%s: video %s: dropping annotation %s (%s): %s', self.subset, name, annotation_id,
                               skip.reason, skip.detail)
        cut = [track for track in tracks if track.end > reached]
        if cut:
            self.report.dropped['annotation past the end of the video'] += len(cut)
            logger.info('%s: video %s ends at frame %d; %d annotation(s) run past it (to frame %d)', self.subset,
                        name, reached, len(cut), max(track.end for track in cut))
        records = [r for r in (self._record(name, item_id, tracks, frame, folder) for frame in frames) if r is not None]
        self.counts.frames_sampled += len(frames)
        if records:
            self.counts.videos_used += 1
        else:  # as for an image without boxes
            self.report.dropped['no usable boxes'] += 1
            self.report.skipped_items.append((name, 'no usable boxes'))
            logger.debug('%s: video %s gave no training frame', self.subset, name)
        return records

    def _record(self, name: str, item_id: str, tracks: List[Track], frame: List[int],
                folder: str) -> Optional[dict]:
        number, width, height = frame
        objects = [a for a in (track.annotation_at(number) for track in tracks) if a is not None]
        canvas = ImageCanvas(width, height, self.limits.max_pixels)
        boxes, labels = self.boxes_of(f'{name} frame {number}', objects, canvas)
        if not boxes:
            if not self.include_background:
                self.report.dropped['frame without usable boxes'] += 1
                return None
            self.counts.negatives += 1
        self.counts.frames_kept += 1
        self.counts.boxes += len(boxes)
        return {'item_id': item_id, 'name': name, 'image_path': frame_path(folder, number), 'frame': number,
                'width': int(width), 'height': int(height), 'boxes': boxes, 'labels': labels}

