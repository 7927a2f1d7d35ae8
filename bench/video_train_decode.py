"""What decoding a video's training frames costs: per sampled frame, and against decoding every frame.

    python bench/video_train_decode.py [--width 1280 --height 720 --frames 300 --stride 5 --codec mp4v]

Writes a synthetic clip (moving shapes over noise, so the codec has real work),
one box track over the whole clip with a keyframe every 30 frames, then times in
one run:
  * plain: OpenCV reading every frame (`read` + BGR->RGB), nothing written: what a
    loader that decodes the whole video does, and the floor for any pass over it;
  * `extract_frames` at the stride (every k-th frame decoded, fixed keyframes too,
    each written as a JPEG): its total, per sampled frame, and its ratio to plain;
  * `extract_frames` at stride 1 (every frame written);
  * the same extraction again, found in its memo (a later conversion of the data).
torchvision 0.29 has no video reader (torchvision.io's was removed), so plain is OpenCV's own loop.
Each time is the best of --repeat runs.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from utils.data.images import ImageLimits  # noqa: E402
from utils.data.video_annotations import read_tracks  # noqa: E402
from utils.data.video_frames import FramePlan, extract_frames  # noqa: E402


def write_clip(path, width, height, frames, codec):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), 30.0, (width, height))
    if not writer.isOpened():
        raise SystemExit(f'OpenCV cannot write {codec} here')
    for n in range(frames):
        frame = noise.copy()
        x = (n * 7) % max(1, width - 200)
        cv2.rectangle(frame, (x, height // 3), (x + 200, height // 3 + 150), (40, 180, 220), -1)
        cv2.circle(frame, (width - 1 - x, height // 2), 60, (200, 60, 90), -1)
        writer.write(frame)
    writer.release()


def track(frames, width, height):
    """One box track over the whole clip, fixed every 30 frames, held in between."""
    def box(n):
        x = (n * 7) % max(1, width - 200)
        return [{'x': x, 'y': height // 3}, {'x': x + 200, 'y': height // 3 + 150}]
    snapshots = [{'frame': n, 'fixed': True, 'objectVisible': True, 'label': 'car', 'type': 'box', 'data': box(n)}
                 for n in range(30, frames, 30)]
    return {'id': 'a', 'type': 'box', 'label': 'car', 'coordinates': box(0),
            'metadata': {'system': {'frame': 0, 'endFrame': frames - 1, 'snapshots_': snapshots}}}


def plain_read_all(path):
    capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    count = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        count += 1
    capture.release()
    return count


def best(fn, repeat, before=None):
    times, result = [], None
    for _ in range(repeat):
        if before:
            before()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--width', type=int, default=1280)
    parser.add_argument('--height', type=int, default=720)
    parser.add_argument('--frames', type=int, default=300)
    parser.add_argument('--stride', type=int, default=5)
    parser.add_argument('--codec', default='mp4v', help='mp4v (inter-frame, like H.264) or MJPG (every frame a JPEG)')
    parser.add_argument('--repeat', type=int, default=2)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix='video_bench_')
    try:
        path = os.path.join(work, 'clip.avi' if args.codec == 'MJPG' else 'clip.mp4')
        write_clip(path, args.width, args.height, args.frames, args.codec)
        tracks, _ = read_tracks([track(args.frames, args.width, args.height)])
        folder = os.path.join(work, 'frames')

        def fresh():
            shutil.rmtree(folder, ignore_errors=True)

        plain_s, decoded = best(lambda: plain_read_all(path), args.repeat)
        rows = [('plain: OpenCV reads every frame', plain_s, decoded)]
        for stride in (args.stride, 1):
            plan = FramePlan(tracks, stride, keep_empty=False)
            seconds, (written, _) = best(lambda: extract_frames(path, plan, folder, ImageLimits()), args.repeat, fresh)
            rows.append((f'extract_frames, stride {stride}', seconds, len(written)))
        plan = FramePlan(tracks, args.stride, keep_empty=False)
        extract_frames(path, plan, folder, ImageLimits())
        seconds, (written, _) = best(lambda: extract_frames(path, plan, folder, ImageLimits()), args.repeat)
        rows.append((f'extract_frames, stride {args.stride}, from its memo', seconds, len(written)))
        print(f'{args.width}x{args.height}, {args.frames} frames, {args.codec}; cv2 {cv2.__version__}; '
              f'best of {args.repeat}')
        print(f'{"what":<44}{"total s":>9}{"frames":>8}{"ms/frame":>10}{"vs plain":>10}')
        for name, seconds, count in rows:
            print(f'{name:<44}{seconds:>9.3f}{count:>8}{1000 * seconds / max(count, 1):>10.2f}'
                  f'{seconds / plain_s:>10.2f}')
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
