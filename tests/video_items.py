"""Builders for tests on video items: a generated video and its annotations as the platform writes them.

`write_video` makes an MJPEG AVI whose frame n is grey level 8 * n (readable back
within JPEG's error), so a frame written as an image can be traced to its number.
`video_annotation` writes one track the way the platform (and dtlpy's
`Annotation.to_json`) does: the first frame's geometry at the top level and
``metadata.system.{frame, endFrame, objectId, snapshots_}``.
`TRACKS` is one clip's annotations: keyframes and held frames, an object that
disappears (``objectVisible: false``) and comes back, a second object starting
later, a mask, an ellipse, a snapshot without a frame number, a track of a type
that is not a box and one running past the end of the video.
"""
import base64
import io

import numpy as np
from PIL import Image

from test_video_decoding import write_video as write_grey_video

FRAMES, WIDTH, HEIGHT = 24, 96, 64
LABELS = ['car', 'person']


def write_video(path, frames=FRAMES, size=(WIDTH, HEIGHT), fps=10.0):
    return write_grey_video(path, frames=frames, size=size, fps=fps)


def box(x1, y1, x2, y2):
    return [{'x': x1, 'y': y1, 'z': 0}, {'x': x2, 'y': y2, 'z': 0}]


def polygon(x1, y1, x2, y2):
    return [[{'x': x1, 'y': y1}, {'x': x2, 'y': y1}, {'x': x2, 'y': y2}, {'x': x1, 'y': y2}]]


def mask(x1, y1, x2, y2, size=(WIDTH, HEIGHT)):
    """An RGBA PNG data URL of the frame's size, opaque on [x1, x2) x [y1, y2)."""
    alpha = np.zeros((size[1], size[0]), np.uint8)
    alpha[y1:y2, x1:x2] = 255
    rgba = np.dstack([np.full_like(alpha, 200), np.zeros_like(alpha), np.zeros_like(alpha), alpha])
    buffer = io.BytesIO()
    Image.fromarray(rgba, 'RGBA').save(buffer, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode()


def snapshot(frame, label, kind, data, fixed=True, visible=True):
    state = {'fixed': fixed, 'label': label, 'type': kind, 'objectVisible': visible, 'data': data,
             'attributes': []}
    if frame is not None:
        state['frame'] = frame
    return state


def video_annotation(object_id, label, kind, first_frame, coordinates, end_frame, snapshots=()):
    """One track as the platform stores it (ids and timestamps included: the SDK's from_json reads them)."""
    return {'id': f'ann-{object_id}', 'type': kind, 'label': label, 'coordinates': coordinates,
            'attributes': [], 'creator': 'tester@emulator.local', 'createdAt': '2026-12-03T00:00:00.000Z',
            'updatedBy': 'tester@emulator.local', 'updatedAt': '2026-12-03T00:00:00.000Z',
            'metadata': {'system': {'frame': first_frame, 'endFrame': end_frame, 'objectId': str(object_id),
                                    'snapshots_': list(snapshots), 'status': None, 'automated': False},
                         'user': {}}}


TRACKS = [
    # a car drawn at 0, moved at 4 (fixed), a held change at 6, gone at 9, back at 13, one more state
    # without a frame number (it follows the latest: 14); the track ends at 17
    video_annotation(1, 'car', 'box', 0, box(10, 10, 30, 30), 17, [
        snapshot(4, 'car', 'box', box(14, 10, 34, 30)),
        snapshot(6, 'car', 'box', box(16, 10, 36, 30), fixed=False),
        snapshot(9, 'car', 'box', box(16, 10, 36, 30), visible=False),
        snapshot(13, 'car', 'box', box(20, 12, 40, 32)),
        snapshot(None, 'car', 'box', box(21, 12, 41, 32), fixed=False)]),
    # a person that enters at 11 as a polygon, moves at 15, ends at 20
    video_annotation(2, 'person', 'segment', 11, polygon(50, 20, 60, 50), 20, [
        snapshot(15, 'person', 'segment', polygon(52, 22, 62, 52))]),
    # a mask from 18 to 22, changed at 20
    video_annotation(3, 'car', 'binary', 18, mask(70, 40, 90, 60), 22, [
        snapshot(20, 'car', 'binary', mask(72, 40, 92, 60))]),
    # an ellipse on frames 2-3, hanging over the left edge (clipped)
    video_annotation(4, 'person', 'ellipse', 2, {'center': {'x': 4, 'y': 30, 'z': 0}, 'rx': 10, 'ry': 6,
                                                 'angle': 0}, 3),
    # a point: not a box, dropped once for the whole track
    video_annotation(5, 'car', 'point', 0, {'x': 5, 'y': 5, 'z': 0}, 23),
    # runs past the video's 24 frames (0..23)
    video_annotation(6, 'car', 'box', 22, box(40, 40, 60, 60), 30),
]
# a dog is not one of LABELS: its boxes are dropped as 'label not in model' on each sampled frame
TRACKS.append(video_annotation(7, 'dog', 'box', 0, box(60, 5, 80, 25), 2))
