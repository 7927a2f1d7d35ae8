"""One Dataloop video annotation (its JSON) as the object's state on each frame, read as the SDK reads it.

The platform writes a video annotation as its first frame (top-level ``coordinates``
and ``label``, at ``metadata.system.frame``), a last frame (``endFrame``) and
``metadata.system.snapshots_``: later states ``{frame, data, fixed, objectVisible,
label, type}``. dtlpy's ``Annotation.from_json(...).frames`` reads them this way,
and so does `Track`:

* the first frame is a fixed, visible state (its own ``objectVisible`` is not read);
* each snapshot is a state at its ``frame`` (one without a frame follows the latest
  state so far); a later state at the same frame replaces the earlier one;
* a frame without a state holds the latest state before it: the box is held, not
  interpolated, and so is ``objectVisible: false`` until a visible state follows;
* the object exists from the earliest state to ``max(endFrame, latest state)``,
  nowhere else.

A snapshot's geometry is ``coordinates`` if present, else ``data``; its label is its
own (labels can change along a track), falling back to the annotation's. Turning a
state into boxes is `utils.data.annotation_boxes`' job, as for images.
"""
import bisect
import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

from utils.data.annotation_boxes import BOX_TYPES, UnusableData


@dataclasses.dataclass(frozen=True)
class State:
    """The object as drawn on one keyframe: held on the frames after it until the next state."""
    frame: int
    label: Any
    coordinates: Any
    fixed: bool
    visible: bool


def _frame_number(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 0:
        raise UnusableData('bad frame number', f'{what} is {value!r}, not a frame number')
    return int(value)


class Track:
    """An annotated object through a video: `at(frame)` is its state there, or None where it is absent."""

    def __init__(self, annotation: dict):
        if not isinstance(annotation, dict):
            raise UnusableData('bad annotation', f'not an object: {annotation!r:.80}')
        self.id = annotation.get('id') or annotation.get('_id') or '?'
        self.type = annotation.get('type')
        metadata = annotation.get('metadata') or {}
        system = (metadata.get('system') if isinstance(metadata, dict) else None) or {}
        if not isinstance(system, dict):
            raise UnusableData('bad annotation', '`metadata.system` is not an object')
        states: Dict[int, State] = {}
        first = _frame_number(system.get('frame', 0), 'metadata.system.frame')
        states[first] = State(first, annotation.get('label'), annotation.get('coordinates'), True, True)
        snapshots = system.get('snapshots_') or []
        if not isinstance(snapshots, list):
            raise UnusableData('bad annotation', '`snapshots_` is not a list')
        for k, snapshot in enumerate(snapshots):
            if not isinstance(snapshot, dict):
                raise UnusableData('bad annotation', f'snapshot {k} is not an object')
            number = _frame_number(snapshot['frame'], f'snapshot {k} frame') if 'frame' in snapshot \
                else max(states) + 1
            geometry = snapshot['coordinates'] if 'coordinates' in snapshot else snapshot.get('data')
            states[number] = State(number, snapshot.get('label', annotation.get('label')), geometry,
                                   bool(snapshot.get('fixed', False)), bool(snapshot.get('objectVisible', True)))
        end = system.get('endFrame')
        self.start = min(states)
        self.end = max([*states, _frame_number(end, 'metadata.system.endFrame')] if end is not None else states)
        self._frames = sorted(states)
        self.states = [states[n] for n in self._frames]

    def at(self, frame: int) -> Optional[State]:
        """The state held on `frame` when the object is there and visible, else None."""
        if frame < self.start or frame > self.end:
            return None
        state = self.states[bisect.bisect_right(self._frames, frame) - 1]
        return state if state.visible else None

    def visible_at(self, frame: int) -> bool:
        return self.at(frame) is not None

    def keyframes(self) -> List[int]:
        """The frames a person fixed (the first frame among them), visible or not."""
        return [state.frame for state in self.states if state.fixed]

    def annotation_at(self, frame: int) -> Optional[dict]:
        """The object on `frame` as an image annotation (type, label, coordinates), or None where absent."""
        state = self.at(frame)
        if state is None:
            return None
        return {'id': self.id, 'type': self.type, 'label': state.label, 'coordinates': state.coordinates}


def read_tracks(annotations: list) -> Tuple[List[Track], List[Tuple[Any, UnusableData]]]:
    """The tracks of a video item's annotations that can yield boxes, and (annotation id, UnusableData) for the
    others."""
    tracks, skipped = [], []
    for annotation in annotations:
        try:
            track = Track(annotation)
            if track.type not in BOX_TYPES:
                raise UnusableData(f'type {track.type}' if track.type else 'type missing')
        except UnusableData as skip:
            skipped.append((annotation.get('id', '?') if isinstance(annotation, dict) else '?', skip))
            continue
        tracks.append(track)
    return tracks, skipped
