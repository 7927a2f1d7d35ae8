"""A video's boxes joined across frames into tracks: one track per object, with a stable object id.

The tracker is Roboflow's `trackers` package (`ByteTrackTracker`, a maintained clean-room ByteTrack on
`supervision` detections; supervision's own ByteTrack moved there). ByteTrack matches boxes to tracks
by IoU against a Kalman prediction, in two passes: boxes scoring `threshold` or more first, then the
weaker ones, which may only extend a track. A box it does not match still becomes a track of its
own (one frame long), so nothing the network found is dropped. One tracker runs per label, so a
track never changes label; object ids are numbered 1, 2, ... in order of first appearance.
"""
import dataclasses
import logging
from typing import Dict, List, Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)

#: seconds-per-frame of the tracker's reference clock: `trackers` counts its lost-track buffer in 30 fps frames
_TRACKER_FPS = 30.0
#: frame rate assumed when the container does not give one
DEFAULT_FPS = 30.0


@dataclasses.dataclass
class Track:
    """One object across frames: its label and, per predicted frame, [left, top, right, bottom, score]."""
    object_id: int
    label_id: int
    boxes: List[Tuple[int, List[float]]] = dataclasses.field(default_factory=list)

    @property
    def confidence(self) -> float:
        """The track's score: the mean of its boxes' (the platform keeps one confidence per annotation)."""
        return float(np.mean([box[4] for _, box in self.boxes]))


class FrameTracker:
    """Feed it each predicted frame's rows in frame order (`update`); `tracks()` gives the result.

    `kind` 'none' makes each box its own one-frame track. `fps` and `stride` set the tracker's
    clock: it sees fps / stride frames a second, so `buffer_s` (how long a lost track may
    come back) is the same time whatever the stride.
    """

    def __init__(self, kind: str = 'bytetrack', fps: float = DEFAULT_FPS, stride: int = 1,
                 threshold: float = 0.5, buffer_s: float = 1.0):
        self.kind = kind
        self._frame_rate = (fps if fps and fps > 0 else DEFAULT_FPS) / stride
        self._threshold, self._buffer_s = float(threshold), float(buffer_s)
        self._trackers: Dict[int, object] = {}  # label id -> its ByteTrackTracker
        self._ids: Dict[Tuple[int, int], Track] = {}  # (label id, tracker's id) -> track
        self._unconfirmed: Dict[int, List[Tuple[object, Track]]] = {}  # label id -> (tracklet, its first box's track)
        self._tracks: List[Track] = []

    def _tracker(self, label_id: int):
        tracker = self._trackers.get(label_id)
        if tracker is None:
            from trackers import ByteTrackTracker  # imported on first video: it pulls in supervision
            tracker = self._trackers[label_id] = ByteTrackTracker(
                lost_track_buffer=int(round(self._buffer_s * _TRACKER_FPS)), frame_rate=self._frame_rate,
                track_activation_threshold=self._threshold, high_conf_det_threshold=self._threshold,
                minimum_consecutive_frames=1)
        return tracker

    def _new_track(self, label_id: int) -> Track:
        track = Track(object_id=len(self._tracks) + 1, label_id=label_id)
        self._tracks.append(track)
        return track

    def update(self, frame: int, rows: List[list]) -> None:
        """One frame's rows [left, top, right, bottom, score, label id]."""
        by_label: Dict[int, List[list]] = {}
        for row in rows:
            by_label.setdefault(int(row[5]), []).append(row)
        if self.kind == 'none':
            for label_id, label_rows in by_label.items():
                for row in label_rows:
                    self._new_track(label_id).boxes.append((frame, [float(v) for v in row[:5]]))
            return
        for label_id in set(by_label) | set(self._trackers):  # trackers of absent labels still age their tracks
            self._update_label(frame, label_id, by_label.get(label_id, []))

    def _update_label(self, frame: int, label_id: int, rows: List[list]) -> None:
        import supervision as sv
        table = np.asarray([row[:5] for row in rows], dtype=np.float32).reshape(-1, 5)
        detections = sv.Detections(xyxy=table[:, :4], confidence=table[:, 4],
                                   data={'row': np.arange(len(rows))})
        tracker = self._tracker(label_id)
        known = {id(tracklet) for tracklet in tracker.tracks}
        result = tracker.update(detections)
        self._confirm(label_id, tracker.tracks)
        spawned = [tracklet for tracklet in tracker.tracks if id(tracklet) not in known]
        untracked = []
        for row_index, tracker_id in zip(result.data.get('row', ()), result.tracker_id):  # empty: no 'row'
            row = rows[int(row_index)]
            if tracker_id < 0:  # not matched: its own short track unless a tracklet starts from it
                track = self._new_track(label_id)
                untracked.append((row, track))
            else:
                track = self._ids.get((label_id, int(tracker_id)))
                if track is None:
                    track = self._ids[(label_id, int(tracker_id))] = self._new_track(label_id)
            track.boxes.append((frame, [float(v) for v in row[:5]]))
        # a tracklet spawned this frame has no id until its next match (then `_confirm` joins them): the
        # tracker spawns from its untracked boxes that score `threshold` or more, in output order
        starters = [track for row, track in untracked if row[4] >= self._threshold]
        self._unconfirmed.setdefault(label_id, []).extend(zip(spawned, starters[-len(spawned):] if spawned else []))

    def _confirm(self, label_id: int, alive: list) -> None:
        """Tracklets given an id by this update continue the track of their first box; dead ones are forgotten."""
        alive_ids = {id(tracklet) for tracklet in alive}
        waiting = []
        for tracklet, track in self._unconfirmed.get(label_id, []):
            if tracklet.tracker_id >= 0:
                self._ids[(label_id, int(tracklet.tracker_id))] = track
            elif id(tracklet) in alive_ids:
                waiting.append((tracklet, track))
        self._unconfirmed[label_id] = waiting

    def tracks(self) -> List[Track]:
        """Every track, in order of first appearance; each one's boxes in frame order."""
        return list(self._tracks)


def make_tracker(settings: Dict, fps: Optional[float]) -> FrameTracker:
    """The tracker the configuration asks for (`video_tracker`, `video_track_threshold`, `video_track_buffer_s`)."""
    return FrameTracker(settings['video_tracker'], fps or DEFAULT_FPS, settings['video_frame_stride'],
                        settings['video_track_threshold'], settings['video_track_buffer_s'])
