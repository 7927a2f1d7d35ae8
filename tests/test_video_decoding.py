"""utils.data.video: frames streamed with their true numbers, strides reaching the end, bad files named."""
import cv2
import numpy as np
import pytest

from utils.data.video import VideoDecodeError, every_kth, is_video, probe, read_frames


def write_video(path, frames=25, size=(96, 64), fps=10.0):
    """An MJPEG AVI whose frame i is filled with grey level 8 * i (readable back within JPEG's error)."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), fps, (width, height))
    assert writer.isOpened()
    for index in range(frames):
        writer.write(np.full((height, width, 3), 8 * index % 256, np.uint8))
    writer.release()
    return path


def test_probe_reads_the_container(tmp_path):
    info = probe(write_video(tmp_path / 'a.avi', frames=12, size=(96, 64), fps=10.0))
    assert (info.width, info.height, info.fps, info.frame_count) == (96, 64, 10.0, 12)


def test_frames_come_with_their_true_numbers_and_pixels(tmp_path):
    path = write_video(tmp_path / 'a.avi', frames=25)
    frames = list(read_frames(path, every_kth(4)))
    assert [number for number, _ in frames] == [0, 4, 8, 12, 16, 20, 24]  # the last frame is reached
    for number, frame in frames:
        assert frame.shape == (64, 96, 3) and frame.dtype == np.uint8
        assert abs(float(frame.mean()) - 8 * number) < 3


def test_last_stops_early_and_a_selector_picks_frames(tmp_path):
    path = write_video(tmp_path / 'a.avi', frames=25)
    assert [n for n, _ in read_frames(path, lambda n: n in {3, 7, 30}, last=7)] == [3, 7]
    assert [n for n, _ in read_frames(path, lambda n: n in {3, 30})] == [3]


@pytest.mark.parametrize('content', [b'', b'not a video at all' * 100])
def test_a_file_that_is_not_a_video_is_named(tmp_path, content):
    path = tmp_path / 'broken.mp4'
    path.write_bytes(content)
    with pytest.raises(VideoDecodeError, match='broken.mp4'):
        list(read_frames(path))


def test_a_missing_file_and_bad_strides(tmp_path):
    with pytest.raises(VideoDecodeError, match='not a file'):
        probe(tmp_path / 'missing.mp4')
    for stride in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match='stride'):
            every_kth(stride)


def test_is_video():
    assert is_video('video/mp4') and is_video('clip.MOV') and is_video('a/b.webm')
    assert not is_video('image/jpeg') and not is_video('a.jpg') and not is_video(None)
