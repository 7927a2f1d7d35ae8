"""Videos as a stream of frames: OpenCV's FFmpeg decoder, one frame in memory at a time.

Prediction and training both read videos through `read_frames`: it walks the
file once, in order, and hands out only the frames asked for, so memory stays
flat in the video's length. Frame numbers are the video's own (0-based, in
decoding order), counted while reading: a container's frame count and an item's
metadata can both be wrong, so neither decides where the video ends.
"""
import dataclasses
import logging
import math
import os
from typing import Callable, Iterator, Optional, Tuple, Union

import cv2
import numpy as np

from utils.core.errors import InputError

logger = logging.getLogger(__name__)

#: File name endings read as videos when no mimetype says so (local folders).
VIDEO_EXTENSIONS = frozenset({'.mp4', '.m4v', '.mov', '.avi', '.mkv', '.webm', '.mpg', '.mpeg', '.wmv', '.flv',
                              '.3gp', '.ts', '.mts'})


class VideoDecodeError(InputError):
    """The file cannot be opened or decoded as a video; the message names it."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video. `frame_count` is the container's estimate (0 when it
    does not say); the true count is known only after reading to the end."""
    width: int
    height: int
    fps: float
    frame_count: int


def is_video(name_or_mimetype: Optional[str]) -> bool:
    """True for a `video/*` mimetype or a file name with a video ending."""
    if not name_or_mimetype:
        return False
    if name_or_mimetype.lower().startswith('video/'):
        return True
    return os.path.splitext(name_or_mimetype)[1].lower() in VIDEO_EXTENSIONS


def _open(path: Union[str, os.PathLike]) -> 'cv2.VideoCapture':
    if not os.path.isfile(path):
        raise VideoDecodeError(f'{path}: not a file')
    capture = cv2.VideoCapture(os.fspath(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise VideoDecodeError(f'{path}: not a video OpenCV/FFmpeg can open')
    return capture


def _info(capture: 'cv2.VideoCapture') -> VideoInfo:
    fps = capture.get(cv2.CAP_PROP_FPS)
    count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    return VideoInfo(width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                     height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                     fps=float(fps) if math.isfinite(fps) and fps > 0 else 0.0,
                     frame_count=int(count) if math.isfinite(count) and count > 0 else 0)


def probe(path: Union[str, os.PathLike]) -> VideoInfo:
    """The container's size, frame rate and frame-count estimate; VideoDecodeError if it cannot be opened."""
    capture = _open(path)
    try:
        return _info(capture)
    finally:
        capture.release()


def read_frames(path: Union[str, os.PathLike], wanted: Callable[[int], bool] = lambda index: True,
                last: Optional[int] = None) -> Iterator[Tuple[int, np.ndarray]]:
    """Yield ``(frame_number, RGB uint8 HxWx3 array)`` for each frame where ``wanted(number)`` is true.

    The file is read once, in order; frames not wanted are only demuxed and decoded
    (`grab`), never converted. Reading stops at the end of the stream, or after
    frame `last` when given. A file that cannot be opened, or whose first frame
    cannot be decoded, raises VideoDecodeError; a stream that breaks later ends
    there, with a warning naming the frame, and the frames read so far stand.
    """
    capture = _open(path)
    try:
        number = 0
        while last is None or number <= last:
            if not capture.grab():
                if number == 0:
                    raise VideoDecodeError(f'{path}: no frame could be decoded')
                break
            if wanted(number):
                ok, frame = capture.retrieve()
                if not ok or frame is None:
                    logger.warning('%s: frame %d could not be decoded; the video ends there for this run',
                                   path, number)
                    break
                yield number, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            number += 1
    finally:
        capture.release()


def every_kth(stride: int) -> Callable[[int], bool]:
    """`read_frames`' selector for frames 0, k, 2k, ..."""
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise InputError(f'video frame stride must be an integer >= 1, got {stride!r}')
    return lambda number: number % stride == 0
