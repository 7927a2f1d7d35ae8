"""`adapter.predict` on what callers hand it besides HxWx3 uint8: each the same picture gives the same
detections, or is refused alone with a per-entry reason, and the rest of its batch is predicted.

Same-picture inputs: float32 CHW tensors in [0, 1] (torchvision's own convention: never divided by 255
again, or the network would see black), float HxWx3 arrays in [0, 1] and in [0, 255], CHW uint8
numpy arrays, a 1xCxHxW tensor, RGBA with an opaque alpha, grey + alpha, grey HxW, PIL images.
Refused alone: strings, None, NaN, negative values, 16-bit values past 255, bool masks, 5 channels, a
batch of two images in one entry, an empty array, nested lists of uneven length.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from test_adapter_core import boxes_of, make_adapter, random_image

W, H = 200, 150


@pytest.fixture(scope='module')
def adapter():
    torch.manual_seed(11)
    return make_adapter({'conf_threshold': 0.0, 'max_detections': 20})


@pytest.fixture(autouse=True)
def fresh_unreadable(adapter):
    adapter.unreadable_items = []  # predict() adds to it; predict_items starts it afresh


def _same_boxes(got, expected):
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert a[4] == b[4]
        assert np.allclose(a[:4], b[:4], atol=1e-3) and abs(a[5] - b[5]) < 1e-4


def test_every_layout_and_scale_of_one_picture_gives_its_detections(adapter):
    rgb = random_image(W, H, seed=3)  # HxWx3 uint8: the reference
    grey = rgb[..., 0].copy()
    chw = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    opaque = np.dstack([rgb, np.full((H, W), 255, np.uint8)])
    same_as_rgb = [
        chw.float() / 255,                                   # torchvision's float CHW in [0, 1]
        (chw.float() / 255)[None],                           # with a batch axis of 1
        chw.double() / 255,
        rgb.astype(np.float32) / 255,                        # HxWx3 float in [0, 1]
        rgb.astype(np.float32),                              # HxWx3 float in [0, 255]
        np.ascontiguousarray(rgb.transpose(2, 0, 1)),        # CHW numpy
        chw,                                                 # the adapter's own uint8 CHW
        torch.from_numpy(rgb),                               # HxWx3 tensor (only the last axis can be channels)
        opaque,                                              # RGBA, opaque
        torch.from_numpy(opaque).permute(2, 0, 1).float() / 255,  # float RGBA CHW
        Image.fromarray(rgb),
        rgb.astype(np.int64),
    ]
    same_as_grey = [grey, np.dstack([grey, np.full((H, W), 255, np.uint8)]), grey[None].astype(np.float32) / 255,
                    Image.fromarray(grey)]
    grey_rgb = np.repeat(grey[..., None], 3, axis=2)
    collections = adapter.predict([rgb, grey_rgb] + same_as_rgb + same_as_grey)
    assert adapter.unreadable_items == []
    expected_rgb, expected_grey = boxes_of(collections[0]), boxes_of(collections[1])
    for k, collection in enumerate(collections[2:2 + len(same_as_rgb)]):
        _same_boxes(boxes_of(collection), expected_rgb)
    for collection in collections[2 + len(same_as_rgb):]:
        _same_boxes(boxes_of(collection), expected_grey)


def test_a_float_image_in_unit_range_is_not_a_black_picture(adapter):
    rgb = random_image(W, H, seed=5)
    black = np.zeros_like(rgb)
    float_chw = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    got, on_black, reference = adapter.predict([float_chw, black, rgb])
    _same_boxes(boxes_of(got), boxes_of(reference))
    assert boxes_of(got) != boxes_of(on_black)


def test_transparency_is_composited_on_white_like_a_decoded_file(adapter):
    rgb = random_image(W, H, seed=6)
    clear = np.dstack([rgb, np.zeros((H, W), np.uint8)])   # fully transparent: white, as a viewer shows it
    white = np.full_like(rgb, 255)
    got, reference = adapter.predict([clear, white])
    _same_boxes(boxes_of(got), boxes_of(reference))


BAD = [
    ('a path string', 'a str is not an image'),
    (None, None),  # None entries are skipped silently: the SDK's own placeholder for nothing
    (np.full((H, W, 3), np.nan, np.float32), 'NaN or infinite'),
    (-np.ones((H, W, 3), np.float32), 'values from -1'),
    (np.full((H, W), 4000, np.uint16), 'values from 4000 to 4000'),
    (np.zeros((H, W), bool), 'a bool array is a mask'),
    (np.zeros((5, H, W), np.uint8), 'neither its first nor its last axis has 1 to 4 channels'),
    (torch.zeros(2, 3, H, W), 'pass a batch of images as separate entries'),
    (np.zeros((0, W, 3), np.uint8), 'is empty'),
    ([[1, 2], [3]], 'not an image array'),
    (torch.full((3, H, W), float('inf')), 'NaN or infinite'),
]


def test_odd_entries_are_refused_one_by_one_and_the_batch_goes_on(adapter):
    rgb = random_image(W, H, seed=7)
    batch, good_positions = [], []
    for entry, _ in BAD:
        batch.append(entry)
        good_positions.append(len(batch))
        batch.append(rgb)
    collections = adapter.predict(batch)
    reference = boxes_of(collections[good_positions[0]])
    for position in good_positions:
        _same_boxes(boxes_of(collections[position]), reference)
    refused = {entry.name: entry.reason for entry in adapter.unreadable_items}
    for k, (entry, said) in enumerate(BAD):
        assert len(collections[2 * k]) == 0
        if said is None:
            assert f'batch entry {2 * k}' not in refused
        else:
            assert said in refused[f'batch entry {2 * k}'], refused
    assert len(refused) == len(BAD) - 1
