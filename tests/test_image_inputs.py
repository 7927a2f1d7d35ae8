"""Every image an item can hold reaches the network the way a viewer shows it.

Each case uploads one file to the emulator and decodes it through
`FasterRCNNAdapter.prepare_item_func` (the real `dl.Item.download`): the
result must be an 8-bit RGB CHW tensor of the displayed size, with the
displayed colours. The expectations are computed here from the file formats'
definitions (EXIF orientation table, ITU-R 601 luma, alpha over white),
never with the code under test.
"""
import io

import dtlpy as dl
import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn_adapter import FasterRCNNAdapter, UnreadableItem
from utils.data.images import image_size, load_image

W, H = 48, 32
QUADRANTS = {'tl': (220, 30, 30), 'tr': (30, 200, 60), 'bl': (40, 60, 220), 'br': (230, 210, 40)}


def quadrants(values):
    """An HxW(xC) array of four flat quadrants, values in tl, tr, bl, br order."""
    tl, tr, bl, br = (np.asarray(v) for v in values)
    top = np.concatenate([np.broadcast_to(tl, (H // 2, W // 2) + tl.shape),
                          np.broadcast_to(tr, (H // 2, W // 2) + tr.shape)], axis=1)
    bottom = np.concatenate([np.broadcast_to(bl, (H // 2, W // 2) + bl.shape),
                             np.broadcast_to(br, (H // 2, W // 2) + br.shape)], axis=1)
    return np.ascontiguousarray(np.concatenate([top, bottom], axis=0))


BASE = quadrants(QUADRANTS.values()).astype(np.uint8)  # what the viewer shows, HxWx3

# EXIF orientation -> how a viewer turns the stored pixels into the displayed ones
DISPLAY = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                      # mirror horizontally
    3: lambda a: np.rot90(a, 2),                  # rotate 180
    4: lambda a: a[::-1],                         # mirror vertically
    5: lambda a: a.transpose(1, 0, 2),            # mirror along the top-left/bottom-right diagonal
    6: lambda a: np.rot90(a, -1),                 # rotate 90 clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # mirror along the other diagonal
    8: lambda a: np.rot90(a, 1),                  # rotate 90 counter-clockwise
}
STORE = {**DISPLAY, 6: DISPLAY[8], 8: DISPLAY[6]}  # the inverse of each display operation


def encode(image, fmt, **params):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def exif_jpeg(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(STORE[orientation](BASE))
    return encode(Image.fromarray(stored), 'JPEG', quality=95, subsampling=0, exif=exif.tobytes())


def luma(rgb):
    """ITU-R 601-2 luma, as viewers (and the PNG/JPEG grey models) define grey."""
    r, g, b = (np.asarray(rgb, dtype=np.float64)[..., k] for k in range(3))
    return r * 0.299 + g * 0.587 + b * 0.114


def over_white(rgb, alpha):
    a = np.asarray(alpha, dtype=np.float64)[..., None] / 255.0
    return np.asarray(rgb, dtype=np.float64) * a + 255.0 * (1 - a)


def rgba_png():
    alpha = quadrants([255, 0, 128, 255]).astype(np.uint8)
    return encode(Image.fromarray(np.dstack([BASE, alpha]), 'RGBA'), 'PNG'), over_white(BASE, alpha)


def palette_png(transparent):
    image = Image.fromarray(BASE).quantize(colors=4)  # four flat colours: an exact palette
    expected = BASE.astype(np.float64)
    if transparent:
        index = image.getpixel((W - 1, 0))  # the top-right quadrant's palette entry
        image.info['transparency'] = index
        expected = over_white(BASE, quadrants([255, 0, 255, 255]))
        return encode(image, 'PNG', transparency=index), expected
    return encode(image, 'PNG'), expected


def deep_png():
    """16-bit grey spanning the full range: a viewer shows value / 257."""
    values = quadrants([0, 21845, 43690, 65535]).astype(np.uint16)
    return encode(Image.fromarray(values), 'PNG'), np.repeat((values / 257.0)[..., None], 3, axis=2)


def cases():
    gray = luma(BASE)
    yield 'rgb.png', encode(Image.fromarray(BASE), 'PNG'), BASE, 0
    for orientation in range(1, 9):
        yield 'exif{}.jpg'.format(orientation), exif_jpeg(orientation), BASE, 8
    yield 'gray.png', encode(Image.fromarray(BASE).convert('L'), 'PNG'), np.repeat(gray[..., None], 3, axis=2), 1
    yield 'gray1bit.png', encode(Image.fromarray(quadrants([255, 0, 0, 255]).astype(np.uint8)).convert('1'), 'PNG'), \
        np.repeat(quadrants([255, 0, 0, 255])[..., None], 3, axis=2), 0
    yield ('rgba.png',) + rgba_png() + (1,)
    yield ('palette.png',) + palette_png(False) + (0,)
    yield ('palette_transparent.png',) + palette_png(True) + (0,)
    yield 'cmyk.jpg', encode(Image.fromarray(BASE).convert('CMYK'), 'JPEG', quality=95), BASE, 10
    yield ('deep16.png',) + deep_png() + (1,)


CASES = list(cases())


def center_means(array):
    """Mean colour of each quadrant's central 8x8 patch (away from JPEG block and chroma edges)."""
    array = np.asarray(array, dtype=np.float64)
    out = []
    for cy in (H // 4, 3 * H // 4):
        for cx in (W // 4, 3 * W // 4):
            out.append(array[cy - 4:cy + 4, cx - 4:cx + 4].reshape(-1, array.shape[-1]).mean(axis=0))
    return np.stack(out)


@pytest.mark.parametrize('name, data, expected, tolerance', CASES, ids=[c[0] for c in CASES])
def test_prepare_item_func_decodes_as_displayed(dataloop_env, name, data, expected, tolerance):
    emu = dataloop_env
    project = emu.seed_project('images')
    dataset = emu.seed_dataset(project['id'], 'images')
    seeded = emu.seed_item(dataset['id'], name, data, dir='/odd')
    item = dl.items.get(item_id=seeded['id'])

    tensor = FasterRCNNAdapter().prepare_item_func(item)

    assert not isinstance(tensor, UnreadableItem), tensor
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8
    assert tuple(tensor.shape) == (3, H, W), 'expected the displayed size 3x{}x{}, got {}'.format(H, W, tensor.shape)
    got = center_means(tensor.permute(1, 2, 0).numpy())
    want = center_means(expected)
    assert np.abs(got - want).max() <= tolerance + 0.5, '{}: quadrant colours {} != {}'.format(
        name, got.round(1).tolist(), want.round(1).tolist())
    assert emu.missing == [] and emu.errors == []


@pytest.mark.parametrize('orientation', range(1, 9))
def test_image_size_is_the_displayed_size(tmp_path, orientation):
    """The reader sizes images from the header; it must agree with the decoded, EXIF-applied picture."""
    path = tmp_path / 'exif.jpg'
    path.write_bytes(exif_jpeg(orientation))
    assert image_size(str(path)) == load_image(str(path)).size == (W, H)


def test_unreadable_item_is_reported_not_raised(dataloop_env):
    emu = dataloop_env
    project = emu.seed_project('images')
    dataset = emu.seed_dataset(project['id'], 'images')
    truncated = emu.seed_item(dataset['id'], 'cut.jpg', exif_jpeg(1)[:300], dir='/odd')
    entry = FasterRCNNAdapter().prepare_item_func(dl.items.get(item_id=truncated['id']))
    assert isinstance(entry, UnreadableItem)
    assert entry.item_id == truncated['id'] and entry.name == '/odd/cut.jpg'


def _noisy_jpeg(orientation=1, mode='RGB', **save):
    pixels = np.random.default_rng(orientation).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', exif=exif.tobytes(), **save)
    return buffer.getvalue()


@pytest.mark.parametrize('data', [_noisy_jpeg(o) for o in range(1, 9)]
                         + [_noisy_jpeg(mode='L'), _noisy_jpeg(mode='CMYK'), _noisy_jpeg(progressive=True),
                            _noisy_jpeg(subsampling=0, quality=97), _noisy_jpeg(subsampling=2, quality=60)],
                         ids=[f'exif{o}' for o in range(1, 9)] + ['gray', 'cmyk', 'progressive', '444', '420'])
def test_jpeg_tensor_decode_gives_pil_pixels_exactly(data):
    """Prediction decodes JPEGs with torchvision (less GIL held): the very pixels `load_image` gives."""
    from torchvision.transforms.functional import pil_to_tensor
    from utils.data.images import load_image_tensor
    fast = load_image_tensor(data)
    assert fast.dtype == torch.uint8
    assert torch.equal(fast, pil_to_tensor(load_image(data)))


def test_jpeg_tensor_decode_fails_as_pil_does():
    from utils.data.images import ImageDecodeError, ImageLimits, ImageSizeError, load_image_tensor
    truncated = _noisy_jpeg()[:300]
    with pytest.raises(ImageDecodeError) as fast:
        load_image_tensor(truncated)
    with pytest.raises(ImageDecodeError) as slow:
        load_image(truncated)
    assert str(fast.value) == str(slow.value)
    with pytest.raises(ImageSizeError, match='over the limit'):
        load_image_tensor(_noisy_jpeg(), ImageLimits(max_pixels=100))
    with pytest.raises(ImageDecodeError, match='not a decodable image'):
        load_image_tensor(b'this is not an image')
