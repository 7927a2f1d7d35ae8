"""Video items through the image prediction path: frames streamed in batches, boxes tracked.

A video item stands in a batch as a `VideoEntry` (the downloaded file, not decoded). When the
batch runs, `detect_videos` reads each video's frames with the shared decoder
(`utils.data.video.read_frames`: every `video_frame_stride`-th frame, numbered as the video
numbers them), hands them to `detect` (the adapter's own forward pass for images) in batches
of the configured size, and feeds each frame's rows to the tracker. Only the current batch of
frames is in memory, and the tracks (a few floats a box): memory stays flat in the video's length.
Frame count and rate come from the file, never from the item's metadata.
"""
import dataclasses
import logging
import math
import os
import shutil
import tempfile
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from utils.core.progress import Progress
from utils.data.images import ImageSizeError
from utils.data.video import VideoDecodeError, VideoInfo, every_kth, is_video, probe, read_frames
from utils.inference.prediction import UnreadableItem
from utils.inference.tracking import Track, make_tracker

logger = logging.getLogger(__name__)

#: frames `embed` averages over a video (evenly spaced from first to last)
EMBED_FRAMES = 4

Detect = Callable[[List[np.ndarray]], List[list]]  # frames -> per frame, rows [l, t, r, b, score, label id]


@dataclasses.dataclass
class VideoEntry:
    """Stands in a batch for a video: its file on disk, read when the batch runs; `item` is the
    platform's item (None for a local file). `owned_dir`: a download folder, removed by `discard`
    or, when the entry is never used (a batch that failed, a download nobody took), once it is dropped."""
    path: str
    name: str
    item: Any = None
    info: Optional[VideoInfo] = None
    owned_dir: Optional[str] = None

    def __post_init__(self):
        self._remove = weakref.finalize(self, shutil.rmtree, self.owned_dir, True) if self.owned_dir else None

    @property
    def item_id(self) -> Optional[str]:
        return getattr(self.item, 'id', None)

    def discard(self) -> None:
        """Remove the downloaded file now (a local file is left alone)."""
        if self._remove is not None:
            self._remove()


@dataclasses.dataclass
class VideoDetections:
    """What the network and the tracker found in one video."""
    entry: VideoEntry
    tracks: List[Track]
    frames_predicted: int
    stride: int


def is_video_item(item: Any) -> bool:
    """A platform item holding a video: its mimetype says `video/*` (or, with none, its name's ending)."""
    return is_video(getattr(item, 'mimetype', None) or getattr(item, 'name', None))


def open_video(path: str, name: str, item: Any = None, owned_dir: Optional[str] = None) -> VideoEntry:
    """A `VideoEntry` for a file that opens as a video; VideoDecodeError naming `name` if it does not."""
    try:
        info = probe(path)
    except VideoDecodeError as err:
        if owned_dir:
            shutil.rmtree(owned_dir, ignore_errors=True)
        raise VideoDecodeError(f'{name}: not a video that can be decoded ({err})') from None
    return VideoEntry(path=path, name=name, item=item, info=info, owned_dir=owned_dir)


def download(item: Any) -> VideoEntry:
    """The item's file on disk (a video is streamed from a file, never held in memory), opened."""
    folder = tempfile.mkdtemp(prefix='fasterrcnn-video-')
    try:
        path = item.download(local_path=folder, save_locally=True, overwrite=True)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return open_video(path, getattr(item, 'name', None) or os.path.basename(path), item=item, owned_dir=folder)


def _batches(frames: Iterator[Tuple[int, np.ndarray]], size: int) -> Iterator[Tuple[List[int], List[np.ndarray]]]:
    numbers, batch = [], []
    for number, frame in frames:
        numbers.append(number)
        batch.append(frame)
        if len(batch) == size:
            yield numbers, batch
            numbers, batch = [], []
    if batch:
        yield numbers, batch


def detect_video(entry: VideoEntry, detect: Detect, batch_size: int, settings: Dict[str, Any],
                 limits=None) -> VideoDetections:
    """Every `video_frame_stride`-th frame of `entry` through `detect`, `batch_size` at a time, tracked.

    Logs frames done / total and frames per second (`Progress`: a bar on a terminal, lines in a log).
    """
    info = entry.info or probe(entry.path)
    if limits is not None:
        try:
            limits.check(info.width, info.height)
        except ImageSizeError as err:
            raise VideoDecodeError(f'{entry.name}: {err}') from None
    stride = settings['video_frame_stride']
    tracker = make_tracker(settings, info.fps)
    expected = math.ceil(info.frame_count / stride) if info.frame_count else None
    predicted = 0
    with Progress(total=expected, desc=f'video {entry.name}', unit='frame', log=logger, summary=True) as progress:
        for numbers, frames in _batches(read_frames(entry.path, every_kth(stride)), batch_size):
            for number, rows in zip(numbers, detect(frames)):
                tracker.update(number, rows)
            predicted += len(numbers)
            progress.update(len(numbers))
    return VideoDetections(entry=entry, tracks=tracker.tracks(), frames_predicted=predicted, stride=stride)


def _each_video(batch: Sequence[Any], work: Callable[[VideoEntry], Any], unreadable: list) -> List[Tuple[int, Any]]:
    """(position, work(entry)) for each `VideoEntry` of `batch`, its download removed after. A video that
    cannot be decoded is appended to `unreadable`, named, and the rest go on."""
    done = []
    for position, entry in enumerate(batch):
        if not isinstance(entry, VideoEntry):
            continue
        try:
            done.append((position, work(entry)))
        except VideoDecodeError as err:
            logger.error('cannot read video %s (id %s): %s', entry.name, entry.item_id, err)
            unreadable.append(UnreadableItem(entry.item_id, entry.name, str(err)))
        finally:
            entry.discard()
    return done


def detect_videos(adapter, batch: Sequence[Any]) -> List[Tuple[int, VideoDetections]]:
    """`detect_video` for each video of `batch` through `adapter._detect` (the images' forward pass),
    at the configured batch size; undecodable videos join `adapter.unreadable_items`."""
    settings, limits = adapter.settings, adapter.image_limits()
    size = adapter._prediction_batch(None)

    def detect(frames: List[np.ndarray]) -> List[list]:
        positions, rows = adapter._detect(frames)
        per_frame = [[] for _ in frames]
        for position, frame_rows in zip(positions, rows):
            per_frame[position] = frame_rows
        return per_frame

    return _each_video(batch, lambda entry: detect_video(entry, detect, size, settings, limits),
                       adapter.unreadable_items)


def embed_videos(adapter, batch: Sequence[Any], embed_frames: Callable[[List[np.ndarray]], List[List[float]]]
                 ) -> List[Tuple[int, List[float]]]:
    """One vector per video of `batch`: `embed_frames` (the images' embedding) over `EMBED_FRAMES` frames
    evenly spaced through it, averaged (`mean_vector`); undecodable videos join `adapter.unreadable_items`."""
    return _each_video(batch, lambda entry: mean_vector(embed_frames(sampled_frames(entry))),
                       adapter.unreadable_items)


def sampled_frames(entry: VideoEntry, count: int = EMBED_FRAMES) -> List[np.ndarray]:
    """`count` frames evenly spaced over the video (by the container's frame count; the first frame
    when it gives none): what `embed` describes a video by."""
    info = entry.info or probe(entry.path)
    last = max(info.frame_count - 1, 0)
    wanted = sorted({int(round(k * last / max(count - 1, 1))) for k in range(count)}) if last else [0]
    return [frame for _, frame in read_frames(entry.path, set(wanted).__contains__, last=wanted[-1])]


def mean_vector(vectors: List[List[float]]) -> List[float]:
    """The L2-normalised mean of L2-normalised vectors: one vector for a video's sampled frames."""
    mean = np.mean(np.asarray(vectors, dtype=np.float64), axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else mean).tolist()
