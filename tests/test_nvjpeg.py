"""Whether JPEGs decoded on the GPU (nvJPEG: torchvision's `decode_jpeg(device='cuda')`) can stand in for the
CPU decoder's pixels (libjpeg-turbo, what models are trained on): a model trained on CPU-decoded images must
find the same detections on GPU-decoded ones, within the fp16 parity test's tolerance (tests/test_cuda.py:
1 px, 0.01 in score). The images look like photographs to a JPEG codec: smooth colour fields with sharp
edges, where the two decoders' chroma upsampling differs most at the edges. Random 8x8 blocks (the
worst case, bench/RESULTS.md) are not what users predict on. Skipped without a GPU; GPU decoding stays
out of the product until this passes on one (README, CUDA graphs section).
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from local_runner.demo import DEMO_DATA, DEMO_SETTINGS
from utils.data.images import load_image_tensor
from utils.data.synthetic import SHAPE_COLORS, make_synthetic_export

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def natural_jpeg(seed: int, size=(256, 256)) -> bytes:
    """Low-frequency colour gradients, 1-3 of the demo's shapes with anti-aliased edges, sensor-like noise;
    JPEG at quality 90 with 4:2:0 chroma subsampling, as cameras and phones write them."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(size)
    field = np.zeros((height, width, 3))
    for channel in range(3):
        for _ in range(3):
            fx, fy, phase = rng.uniform(0.3, 2.0), rng.uniform(0.3, 2.0), rng.uniform(0, 2 * np.pi)
            field[..., channel] += np.cos(2 * np.pi * (fx * x + fy * y) + phase)
    field = 128 + 80 * field / 3
    image = Image.fromarray(field.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for label in rng.choice(['circle', 'square', 'triangle'], size=rng.integers(1, 4), replace=False):
        side = rng.uniform(0.2, 0.35) * width
        left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
        box = [left, top, left + side, top + side]
        if label == 'circle':
            draw.ellipse(box, fill=SHAPE_COLORS[label])
        elif label == 'square':
            draw.rectangle(box, fill=SHAPE_COLORS[label])
        else:
            draw.polygon([(left + side / 2, top), (left + side, top + side), (left, top + side)],
                         fill=SHAPE_COLORS[label])
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float64)
    pixels += rng.normal(0, 2.0, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, 'JPEG', quality=90, subsampling=2)
    return buffer.getvalue()


def _rows(collection):
    return [(a.label, a.metadata['user']['model']['confidence'], (a.left, a.top, a.right, a.bottom))
            for a in collection.annotations]


def _unmatched(one, other, threshold):
    """Detections of `one` (above the threshold's 0.01 margin) with no same-label box on `other` within 1 px
    and 0.01 in score."""
    return [(label, score, box) for label, score, box in one if score >= threshold + 0.01 and not any(
        label == o_label and abs(score - o_score) <= 0.01 and max(abs(a - b) for a, b in zip(box, o_box)) <= 1.0
        for o_label, o_score, o_box in other)]


def test_a_model_trained_on_cpu_decoded_pixels_finds_the_same_on_gpu_decoded_ones(tmp_path):
    from fasterrcnn_adapter import FasterRCNNAdapter
    from torchvision.io import ImageReadMode, decode_jpeg
    from utils.platform.local_model import local_model

    data = tmp_path / 'data'
    make_synthetic_export(str(data), **DEMO_DATA)
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model(configuration={**DEMO_SETTINGS, 'device': 'cuda', 'num_workers': 2},
                                       labels=list(DEMO_DATA['labels']))
    adapter.load('/nonexistent')
    adapter.convert_from_dtlpy(str(data))
    adapter.train(str(data), str(tmp_path / 'output'))

    blobs = [natural_jpeg(seed) for seed in range(24)]
    on_cpu = [load_image_tensor(blob) for blob in blobs]
    on_gpu = decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], mode=ImageReadMode.RGB,
                         device='cuda')
    difference = torch.cat([(g.cpu().int() - c.int()).abs().flatten() for g, c in zip(on_gpu, on_cpu)]).float()
    print(f'nvJPEG vs libjpeg-turbo on natural-looking images: {difference.mean():.3f} on average, '
          f'{int(difference.max())} at most, {float((difference > 2).float().mean()):.2%} by more than 2')
    from_cpu, from_gpu = adapter.predict(on_cpu), adapter.predict(list(on_gpu))
    threshold = DEMO_SETTINGS['conf_threshold']
    assert sum(len(c) for c in from_cpu) >= len(blobs) // 2  # something to compare
    for index, (a, b) in enumerate(zip(from_cpu, from_gpu)):
        rows_a, rows_b = _rows(a), _rows(b)
        assert _unmatched(rows_a, rows_b, threshold) == [] and _unmatched(rows_b, rows_a, threshold) == [], (
            f'image {index}: CPU-decoded {rows_a} vs GPU-decoded {rows_b}')
