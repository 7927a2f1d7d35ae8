"""Video prediction: frames per second against plain torchvision's forward on the same decoded frames, same
run, and peak memory (RSS) on a short and a long 720p video.

    python bench/video_predict.py speed  [--variant fasterrcnn_resnet50_fpn] [--frames 8] [--batch 2] [--runs 3]
    python bench/video_predict.py memory [--variant fasterrcnn_mobilenet_v3_large_320_fpn] [--short 150]
                                         [--long 1500] [--stride 5]

`speed`: the adapter's video path (`utils.inference.video.detect_video`: decoding, the images' forward
pass in batches, tracking) against a bare torchvision model of the same weights running the same frames,
decoded beforehand, in batches of the same size; medians of interleaved runs. Random weights with
`conf_threshold` 0.05 so both sides post-process a realistic number of boxes.
`memory`: each video predicted in a process of its own; its peak RSS, and that of the same process
before the video (the network loaded), so the growth with the video's length shows.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('DATALOOP_PATH', tempfile.mkdtemp())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

SIZE = (1280, 720)
FPS = 30.0


def write_video(path, frames, size=SIZE):
    """A 720p MJPEG AVI: a smooth background with a few shapes crossing it (JPEG-friendly, like real footage)."""
    width, height = size
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'MJPG'), FPS, (width, height))
    gradient = np.linspace(40, 200, width, dtype=np.float32)[None, :, None].repeat(height, 0).repeat(3, 2)
    for index in range(frames):
        frame = gradient.astype(np.uint8).copy()
        for k, color in enumerate(((220, 40, 40), (40, 170, 60), (40, 80, 225))):
            x = int((index * (4 + 3 * k) + 300 * k) % (width - 200))
            cv2.rectangle(frame, (x, 150 + 150 * k), (x + 160, 270 + 150 * k), color, -1)
        writer.write(frame)
    writer.release()
    return path


def make_adapter(variant, batch, **configuration):
    from fasterrcnn_adapter import FasterRCNNAdapter
    from utils.platform.local_model import local_model
    import torch
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model({'pretrained': False, 'model_variant': variant, 'device': 'cpu',
                                        'batch_size': batch, 'conf_threshold': 0.05, **configuration})
    torch.manual_seed(0)
    adapter.load('/nonexistent')
    return adapter


def speed(args):
    import torch
    from torchvision.models import detection
    from utils.data.video import read_frames
    from utils.inference import video as video_inference
    from utils.modeling import model_factory
    from bench.timing import seconds
    path = write_video(os.path.join(tempfile.mkdtemp(), 'speed.avi'), args.frames)
    adapter = make_adapter(args.variant, args.batch)
    device = torch.device('cpu')
    min_size, max_size = model_factory.input_sizes(adapter.model)
    bare = getattr(detection, args.variant)(weights=None, weights_backbone=None, num_classes=91,
                                            min_size=min_size, max_size=max_size).eval()
    bare.load_state_dict(adapter.model.state_dict())
    bare.roi_heads.score_thresh = 0.05
    frames = [frame for _, frame in read_frames(path)]  # decoded once, before timing: plain's input

    def plain():
        with torch.inference_mode():
            for start in range(0, len(frames), args.batch):
                bare([torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in frames[start:start + args.batch]])

    def ours():
        entry = video_inference.open_video(path, 'speed.avi')
        found = video_inference.detect_videos(adapter, [entry])
        assert found and found[0][1].frames_predicted == len(frames)

    for fn in (plain, ours):
        fn()  # warm-up
    times = [[seconds(fn, device) for fn in (plain, ours)] for _ in range(args.runs)]
    t_plain, t_ours = (statistics.median(column) for column in zip(*times))
    print(f'{args.variant}, CPU x{torch.get_num_threads()} threads, {len(frames)} frames of {SIZE[0]}x{SIZE[1]}, '
          f'batch {args.batch}, median of {args.runs}:')
    print(f'  plain torchvision forward (frames decoded beforehand) {len(frames) / t_plain:7.3f} frames/s')
    print(f'  adapter video path (decode + forward + track)         {len(frames) / t_ours:7.3f} frames/s')
    print(f'  ratio adapter/plain (frames/s)                         {t_plain / t_ours:7.3f}')


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 1024


def one_video(args):
    """Child process: predict one video, print peak RSS before (network loaded) and after, and the
    highest RSS seen in each quarter of the run (sampled every 0.2 s): flat quarters mean no growth."""
    import threading
    from utils.inference import video as video_inference
    adapter = make_adapter(args.variant, args.batch, video_frame_stride=args.stride, max_detections=20,
                           conf_threshold=0.0)  # boxes on every frame: the tracks grow as they would
    before = _rss_mb()
    samples, done = [], threading.Event()

    def sample():
        while not done.wait(0.2):
            samples.append((time.perf_counter(), _current_rss_mb()))
    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    ((_, found),) = video_inference.detect_videos(adapter, [video_inference.open_video(args.path, 'memory.avi')])
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    quarters = [max([rss for t, rss in samples if q <= 4 * (t - start) / elapsed < q + 1] or [0]) for q in range(4)]
    boxes = sum(len(track.boxes) for track in found.tracks)
    print(f'{before:.0f} {_rss_mb():.0f} {found.frames_predicted} {len(found.tracks)} {boxes} {elapsed:.1f} '
          + '/'.join(f'{q:.0f}' for q in quarters))


def memory(args):
    folder = tempfile.mkdtemp()
    print(f'{args.variant}, stride {args.stride}, batch {args.batch}, {SIZE[0]}x{SIZE[1]} MJPEG at {FPS:g} fps:')
    for frames in (args.short, args.long):
        path = write_video(os.path.join(folder, f'{frames}.avi'), frames)
        run = subprocess.run([sys.executable, __file__, 'one', '--path', path, '--variant', args.variant,
                              '--stride', str(args.stride), '--batch', str(args.batch)],
                             capture_output=True, text=True, check=True)
        before, after, predicted, tracks, boxes, elapsed, quarters = run.stdout.split()
        print(f'  {frames:6d} frames ({os.path.getsize(path) / 2 ** 20:6.1f} MB file): peak RSS {after} MB '
              f'(network loaded: {before} MB, growth {float(after) - float(before):.0f} MB; highest RSS per '
              f'quarter of the run {quarters} MB); {predicted} frames predicted in {elapsed} s, {tracks} tracks, '
              f'{boxes} boxes')
        os.remove(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('mode', choices=('speed', 'memory', 'one'))
    parser.add_argument('--variant', default=None)
    parser.add_argument('--frames', type=int, default=8)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--short', type=int, default=150)
    parser.add_argument('--long', type=int, default=1500)
    parser.add_argument('--stride', type=int, default=5)
    parser.add_argument('--path')
    args = parser.parse_args()
    if args.variant is None:
        args.variant = 'fasterrcnn_resnet50_fpn' if args.mode == 'speed' else 'fasterrcnn_mobilenet_v3_large_320_fpn'
    {'speed': speed, 'memory': memory, 'one': one_video}[args.mode](args)


if __name__ == '__main__':
    main()
