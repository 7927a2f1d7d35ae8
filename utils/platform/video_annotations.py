"""A video's tracks as the platform stores them: one box annotation per track, one box per predicted frame.

`tracks_to_collection` builds them with the SDK itself (`AnnotationCollection.add(..., object_id=,
frame_num=, model_info=)` for a track's first box, `Annotation.add_frame` for each later one, which is
what `add` does for a known object id without scanning the collection): what `predict` returns, and
what the platform keeps: `metadata.system.frame` (first frame), `endFrame` (last predicted frame),
`objectId` and `snapshots_`, every snapshot `fixed`. The SDK needs the item entity for that (its frames
and the dataset's labels). `tracks_to_json` writes the same JSON directly, as `annotation_json` does for
images: predict_items uploads it (`batch_payloads`), and the local runner writes it with no platform.

Between two predicted frames (`video_frame_stride` > 1) the platform's video studio shows the box of
the last snapshot before the frame, held, not interpolated. Where a track misses predicted frames
(the object was not detected, and the tracker found it again later), a snapshot at the first missed
frame marks the object not visible, so the studio does not hold a stale box over the gap.
"""
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import dtlpy as dl

from utils.inference.tracking import Track
from utils.inference.video import VideoDetections
from utils.platform.annotation_json import batch_box_annotations, model_confidence


def _model_info(track: Track, model_name: str, model_id: Optional[str]) -> Dict:
    """The annotation's model stamp; its confidence is the track's mean score."""
    return {'name': model_name, 'model_id': model_id, 'confidence': model_confidence(track.confidence)}


def _later_frames(track: Track, stride: int) -> Iterator[Tuple[int, List[float], bool]]:
    """(frame, box, visible) after the first box; a gap in the track starts with a hidden copy of the box before it."""
    previous_frame, previous_box = track.boxes[0]
    for frame, box in track.boxes[1:]:
        if frame > previous_frame + stride:  # missed predicted frames: hidden from the first of them
            yield previous_frame + stride, previous_box, False
        yield frame, box, True
        previous_frame, previous_box = frame, box


def _box(values: List[float], label: str) -> dl.Box:
    left, top, right, bottom = values[:4]
    return dl.Box(left=left, top=top, right=right, bottom=bottom, label=label)


def tracks_to_collection(found: VideoDetections, labels: Dict[int, str], model_name: str,
                         model_id: Optional[str]) -> dl.AnnotationCollection:
    """One annotation per track of `found`, for its item (`found.entry.item`, a `dl.Item`)."""
    collection = dl.AnnotationCollection(item=found.entry.item)
    for track in found.tracks:
        label = labels.get(track.label_id, str(track.label_id))
        first_frame, first_box = track.boxes[0]
        collection.add(annotation_definition=_box(first_box, label), object_id=track.object_id,
                       frame_num=first_frame, model_info=_model_info(track, model_name, model_id))
        annotation = collection.annotations[-1]
        for frame, box, visible in _later_frames(track, found.stride):
            annotation.add_frame(annotation_definition=_box(box, label), frame_num=frame, fixed=True,
                                 object_visible=visible)
    return collection


def _coordinates(values: List[float]) -> List[Dict[str, float]]:
    left, top, right, bottom = (float(v) for v in values[:4])
    return [{'x': left, 'y': top, 'z': 0}, {'x': right, 'y': bottom, 'z': 0}]


def track_json(track: Track, label: str, stride: int, model: Dict, item: Any = None,
               fps: Optional[float] = None) -> Dict:
    """One track as the JSON `item.annotations.upload` sends for `tracks_to_collection`'s annotation once
    predict_items has stamped it: `Annotation.to_json()`'s keys, with `model` in both metadata scopes."""
    snapshots = [{'frame': frame, 'fixed': True, 'label': label, 'type': 'box', 'objectVisible': visible,
                  'data': _coordinates(box), 'namedAttributes': {}}
                 for frame, box, visible in _later_frames(track, stride)]
    first, last = track.boxes[0][0], track.boxes[-1][0]
    system = {'model': dict(model), 'automated': True, 'objectId': str(track.object_id), 'attributes': {},
              'frame': first, 'startTime': first / fps if fps else 0, 'endTime': last / fps if fps else 0,
              'endFrame': last, 'snapshots_': snapshots}
    return {'id': None, 'url': None, 'creator': None, 'metadata': {'user': {'model': dict(model)}, 'system': system},
            'hash': None, 'itemId': getattr(item, 'id', None), 'item': None, 'label': label,
            'dataset': getattr(item, 'dataset_url', None), 'createdAt': None, 'updatedBy': None, 'updatedAt': None,
            'source': 'sdk', 'datasetId': getattr(item, 'dataset_id', None), 'type': 'box',
            'coordinates': _coordinates(track.boxes[0][1]), 'attributes': None}


def tracks_to_json(found: VideoDetections, labels: Dict[int, str], model_name: str,
                   model_id: Optional[str]) -> List[Dict]:
    """`tracks_to_collection`'s annotations as that JSON, built without the SDK objects: for the upload
    (as `utils.platform.annotation_json` does for images) and off the platform (the local runner), where
    the SDK cannot build frames without an item entity. tests/test_video_predict.py checks it equals the
    SDK's own."""
    item = found.entry.item
    fps = getattr(item, 'fps', None) if item is not None else (found.entry.info.fps if found.entry.info else None)
    return [track_json(track, labels.get(track.label_id, str(track.label_id)), found.stride,
                       _model_info(track, model_name, model_id), item, fps)
            for track in found.tracks]


def batch_payloads(items: Sequence, positions: Sequence[int], rows: Sequence, labels: Dict[int, str],
                   model_name: str, model_id: Optional[str]) -> List[List[dict]]:
    """`annotation_json.batch_box_annotations` for a batch that may hold videos: an image's rows as its
    boxes, a video's `VideoDetections` as its tracks."""
    images = [(position, found) for position, found in zip(positions, rows) if not isinstance(found, VideoDetections)]
    payloads = batch_box_annotations(items, [position for position, _ in images], [found for _, found in images],
                                     labels, model_name, model_id)
    for position, found in zip(positions, rows):
        if isinstance(found, VideoDetections):
            payloads[position] = tracks_to_json(found, labels, model_name, model_id)
    return payloads
