"""Hostile inputs are refused per item, file or key, and nothing else is lost.

Covered here: the image size guard (pixel limit, read from the header), images
the network's resize would squash below one pixel, checkpoint validation,
non-finite configuration and weights, artifact paths, and binary masks of the
wrong size. Prediction goes through the adapter's real path
(`prepare_item_func` on items the real SDK downloads from the emulator, then
`predict`); `tests/test_platform_flows.py` drives `predict_items` over the same cases.
"""
import base64
import io
import json
import logging
import math
import re
import os
import shutil
import struct
import zlib

import dtlpy as dl
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from local_runner.cli import main as local_runner_main
from fasterrcnn_adapter import UnreadableItem
from test_adapter_core import SMALL, boxes_of, make_adapter, random_image
from test_dataloop_reader import _image_bytes, _item, _mask_png
from test_training import LABEL_TO_ID, make_records, settings, small_model
from test_training import curves_png_not_drawn  # noqa: F401 (a fixture)
from utils.core import config as config_lib
from utils.modeling import checkpoints, model_factory
from utils.training import trainer
from utils.data.dataloop_reader import read_dataloop_export
from utils.data.detection_dataset import DetectionDataset
from utils.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageLimits, ImageSizeError, load_image, network_limits
from utils.data.transforms import get_transform

CPU = torch.device('cpu')


def _chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def png_header(width, height, color_type=2):
    """The first bytes of a PNG claiming `width` x `height` (8-bit RGB by default): what a viewer, and PIL,
    read to learn the size. The pixel data is cut short: decoding it would fail (or, were it complete,
    take width * height * 3 bytes and more)."""
    header = struct.pack('>IIBBBBB', width, height, 8, color_type, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', header)
            + _chunk(b'IDAT', zlib.compress(b'\0' * 4096)[:16]))


def png(width, height, value=128):
    buffer = io.BytesIO()
    Image.new('RGB', (width, height), (value, value, value)).save(buffer, format='PNG')
    return buffer.getvalue()


# ----------------------------------------------------------------------------- 1. image size guard

def test_default_pixel_limit_is_the_configured_default():
    assert config_lib.DEFAULTS['max_image_pixels'] == DEFAULT_MAX_IMAGE_PIXELS == ImageLimits().max_pixels


def test_an_image_over_the_pixel_limit_is_refused_from_its_header_with_its_dimensions():
    # 20000 x 10000 = 200 MP in 70 bytes: refused before decoding (the data is cut short, so a decode
    # would fail with another message)
    with pytest.raises(ImageSizeError, match=r'20000x10000 = 200,000,000 pixels.*100,000,000.*max_image_pixels'):
        load_image(png_header(20000, 10000))
    with pytest.raises(ImageSizeError, match='300x200'):
        load_image(png(300, 200), ImageLimits(max_pixels=59_999))
    assert load_image(png(300, 200), ImageLimits(max_pixels=60_000)).size == (300, 200)


@pytest.mark.parametrize('value', [0, -5, 400_000_001, 1.5e8, True])
def test_max_image_pixels_is_validated(value):
    with pytest.raises(config_lib.ConfigError, match="'max_image_pixels'"):
        config_lib.resolve({'max_image_pixels': value})


# ----------------------------------------------------------------------------- 2. degenerate shapes

@pytest.mark.parametrize('min_size,max_size', [(800, 1333), (128, 128), (320, 640), (64, 100)])
@pytest.mark.parametrize('height,width', [(1, 2000), (2000, 1), (3, 3000), (1, 400), (400, 1), (800, 2),
                                          (2, 800), (1, 1333), (1, 1334), (5, 5), (64, 64)])
def test_thin_image_rule_is_exactly_where_torchvisions_resize_fails(min_size, max_size, height, width):
    transform = GeneralizedRCNNTransform(min_size, max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    try:
        transform([torch.zeros(3, height, width)])
        fails = False
    except RuntimeError:
        fails = True
    limits = ImageLimits(min_size=min_size, max_size=max_size)
    if fails:
        with pytest.raises(ImageSizeError, match=f'{width}x{height}.*under one pixel'):
            limits.check(width, height)
    else:
        limits.check(width, height)


def test_network_limits_read_the_models_own_resize():
    model = small_model()
    model.transform.min_size = (96, 128)  # training draws among several: the smallest binds
    limits = network_limits(model, 1234)
    assert (limits.max_pixels, limits.min_size, limits.max_size) == (1234, 96, 128)


def test_predict_refuses_thin_images_per_entry_and_keeps_the_rest():
    torch.manual_seed(6)
    adapter = make_adapter({'conf_threshold': 0.0})  # min_size 160, max_size 240
    thin = np.zeros((1, 2000, 3), np.uint8)
    collections = adapter.predict([random_image(), thin, random_image(seed=2)])
    assert [len(c) > 0 for c in collections] == [True, False, True]
    [refused] = adapter.unreadable_items
    assert refused.name == 'batch entry 1' and '2000x1' in refused.reason


@pytest.fixture
def items(dataloop_env):
    """`items(name=bytes, ...)`: the SDK's items (fetched from the emulator) for the given files."""
    emu = dataloop_env
    dataset = emu.seed_dataset(emu.seed_project('hostile')['id'], 'hostile')

    def make(**files):
        return [dl.items.get(item_id=emu.seed_item(dataset['id'], name.replace('_', '.'), data, dir='/h')['id'])
                for name, data in files.items()]
    return make


def test_prepare_item_func_and_predict_refuse_huge_and_thin_items_and_keep_the_batch(items):
    torch.manual_seed(6)
    adapter = make_adapter({'conf_threshold': 0.0, 'max_image_pixels': 1_000_000})
    good, huge, thin, tiny_bomb, good2 = items(good_png=png(320, 240, 90), huge_png=png(1001, 1000),
                                               thin_png=png(2000, 1), bomb_png=png_header(20000, 10000),
                                               good2_png=png(200, 150, 30))
    batch = [adapter.prepare_item_func(item) for item in (good, huge, thin, tiny_bomb, good2)]
    refused = [entry for entry in batch if isinstance(entry, UnreadableItem)]
    assert [(e.item_id, e.name) for e in refused] == [(huge.id, '/h/huge.png'), (thin.id, '/h/thin.png'),
                                                      (tiny_bomb.id, '/h/bomb.png')]
    assert '1001x1000' in refused[0].reason and 'max_image_pixels' in refused[0].reason
    assert '2000x1' in refused[1].reason and 'under one pixel' in refused[1].reason
    assert '20000x10000' in refused[2].reason
    collections = adapter.predict(batch)
    assert [len(c) > 0 for c in collections] == [True, False, False, False, True]
    assert adapter.unreadable_items == refused


# ----------------------------------------------------------------------------- 1 + 2 in training

def _reader_item(root, name, image, annotations=None):
    _item(root, 'train', f'/{name}', image=image,
          annotations=annotations or [{'type': 'box', 'label': 'car',
                                       'coordinates': [{'x': 0, 'y': 0}, {'x': 1, 'y': 1}]}])


def test_reader_skips_and_counts_huge_and_thin_images_naming_them(tmp_path, caplog):
    root = str(tmp_path)
    _reader_item(root, 'ok.png', png(100, 80))
    _reader_item(root, 'bomb.png', png_header(20000, 10000))
    _reader_item(root, 'thin.png', png(2000, 1))
    with caplog.at_level(logging.WARNING):
        export = read_dataloop_export(root, limits=ImageLimits(min_size=128, max_size=128))
    report = export.reports['train']
    assert [r['name'] for r in export.subsets['train']] == ['/ok.png']
    assert report.dropped['image too large'] == 1 and report.dropped['image too thin for the network'] == 1
    assert ('/bomb.png', 'image too large') in report.skipped_items
    assert '/bomb.png' in caplog.text and '20000x10000' in caplog.text
    assert '/thin.png' in caplog.text and '2000x1' in caplog.text


def test_adapter_convert_applies_the_networks_limits(tmp_path):
    root = str(tmp_path / 'data')
    for subset in ('train', 'validation'):
        _item(root, subset, '/ok.png', image=png(100, 80), annotations=[
            {'type': 'box', 'label': 'cat', 'coordinates': [{'x': 5, 'y': 5}, {'x': 50, 'y': 40}]}])
    _item(root, 'train', '/thin.png', image=png(4000, 2), annotations=[
        {'type': 'box', 'label': 'cat', 'coordinates': [{'x': 5, 'y': 0}, {'x': 50, 'y': 2}]}])
    adapter = make_adapter(labels=('cat',))  # max_size 240: a 4000x2 image scales to 0.12 px high
    export = adapter.convert_from_dtlpy(root)
    assert export.reports['train'].dropped['image too thin for the network'] == 1
    assert [r['name'] for r in export.subsets['train']] == ['/ok.png']


def test_training_skips_thin_and_huge_images_naming_them_and_finishes(tmp_path, caplog, curves_png_not_drawn):
    """Records that bypass the reader (an older index, another caller): the dataset refuses them per item."""
    torch.set_num_threads(1)
    records = make_records(tmp_path / 'train', 3, seed=1)
    thin = os.path.join(str(tmp_path), 'thin.png')
    with open(thin, 'wb') as f:
        f.write(png(2000, 1))
    records.insert(1, {'item_id': 'id-thin', 'name': 'thin.png', 'image_path': thin, 'width': 2000, 'height': 1,
                       'boxes': [[10.0, 0.0, 60.0, 1.0]], 'labels': ['red']})
    model = small_model()
    with caplog.at_level(logging.WARNING):
        result = trainer.fit(model, records, [], LABEL_TO_ID, str(tmp_path / 'out'),
                             settings(epochs=1, batch_size=4, warmup_iters=1), CPU,
                             dict(variant='fasterrcnn_mobilenet_v3_large_320_fpn', id_to_label_map={1: 'red', 2: 'blue'},
                                  min_size=128, max_size=128))
    assert result.epochs_run == 1
    assert 'thin.png' in caplog.text and 'id-thin' in caplog.text and '2000x1' in caplog.text
    dataset = DetectionDataset(records, LABEL_TO_ID, get_transform(False, {}),
                               ImageLimits(max_pixels=100, min_size=128, max_size=128))
    assert dataset[0] is None  # 128x128 = 16384 pixels, over 100


# ----------------------------------------------------------------------------- 1 + 2 in the local runner

@pytest.fixture(scope='module')
def weights_only_checkpoint(tmp_path_factory):
    """The best.pth of `weights_only_model`, written once for the module."""
    torch.manual_seed(0)
    model = model_factory.build_model(SMALL['model_variant'], 3, 128, 128)
    path = str(tmp_path_factory.mktemp('weights_only') / 'best.pth')
    return checkpoints.save_checkpoint(checkpoints.make_checkpoint(
        model, SMALL['model_variant'], {1: 'a', 2: 'b'}, 128, 128), path)


@pytest.fixture
def weights_only_model(weights_only_checkpoint, tmp_path):
    """A model folder holding only weights/best.pth (the runner rebuilds the model from the checkpoint); the
    test's own copy (some write into it)."""
    folder = tmp_path / 'model'
    (folder / 'weights').mkdir(parents=True)
    shutil.copyfile(weights_only_checkpoint, folder / 'weights' / 'best.pth')
    return str(folder)


def test_local_runner_predict_warns_per_refused_image_and_goes_on(weights_only_model, tmp_path, capsys):
    images = tmp_path / 'images'
    images.mkdir()
    (images / 'good.png').write_bytes(png(96, 96))
    (images / 'thin.png').write_bytes(png(2000, 1))
    (images / 'bomb.png').write_bytes(png_header(20000, 10000))
    code = local_runner_main(['predict', '--model', weights_only_model, '--input', str(images),
                              '--output', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert code == 0, err
    assert 'Traceback' not in err
    assert 'thin.png' in err and '2000x1' in err and 'bomb.png' in err and '20000x10000' in err
    assert sorted(os.listdir(tmp_path / 'out')) == ['good.json', 'good.png']


# ----------------------------------------------------------------------------- 3. checkpoint validation

@pytest.fixture(scope='module')
def small_checkpoint():
    """A valid checkpoint of the adapter's SMALL configuration (labels cat, dog, bird: 4 classes); shared by the
    module's tests, which corrupt copies of it (`_corrupt`), never it."""
    torch.manual_seed(1)
    model = model_factory.build_model(SMALL['model_variant'], 4, SMALL['min_size'], SMALL['max_size'])
    return model, checkpoints.make_checkpoint(model, SMALL['model_variant'], {1: 'cat', 2: 'dog', 3: 'bird'},
                                                SMALL['min_size'], SMALL['max_size'])


def _write(tmp_path, payload):
    path = tmp_path / 'weights' / 'best.pth'
    path.parent.mkdir(exist_ok=True)
    torch.save(payload, str(path))
    return str(path)


def _corrupt(checkpoint, **changes):
    payload = dict(checkpoint, state_dict=dict(checkpoint['state_dict']))
    for key, value in changes.items():
        if key == 'drop_tensor':
            payload['state_dict'].pop(value)
        elif key == 'nan_tensor':
            payload['state_dict'][value] = torch.full_like(payload['state_dict'][value], math.nan)
        elif value is None:
            payload.pop(key)
        else:
            payload[key] = value
    return payload


BAD_CHECKPOINTS = {
    'a list': (lambda c: [c['state_dict']], r'holds a list, not a checkpoint'),
    'no state_dict': (lambda c: _corrupt(c, state_dict=None), r'lacks the expected keys: no state_dict'),
    'state_dict of strings': (lambda c: _corrupt(c, state_dict={'a': 'b'}), r'not a mapping of names to tensors'),
    'no box predictor': (lambda c: _corrupt(c, drop_tensor='roi_heads.box_predictor.cls_score.weight'),
                         r'lacks a Faster R-CNN box predictor'),
    'missing tensor': (lambda c: _corrupt(c, drop_tensor='backbone.fpn.layer_blocks.0.0.weight'),
                       r"holds no supported Faster R-CNN.*1 missing tensor\(s\) \(first: 'backbone.fpn.layer_blocks"),
    'num_classes vs predictor': (lambda c: _corrupt(c, num_classes=7),
                                 r'says num_classes 7, but its box predictor has 4 classes'),
    'variant vs tensors': (lambda c: _corrupt(c, model_variant='fasterrcnn_resnet50_fpn'),
                           r"says model_variant 'fasterrcnn_resnet50_fpn', but its tensors are those of "
                           r'fasterrcnn_mobilenet_v3_large_fpn / fasterrcnn_mobilenet_v3_large_320_fpn'),
    'labels vs predictor': (lambda c: _corrupt(c, id_to_label_map={1: 'cat', 9: 'dog'}),
                            r'label id 9 in its id_to_label_map, but its box predictor has 4 classes'),
    'no BatchNorm statistics': (lambda c: _corrupt(c, drop_tensor='backbone.body.0.1.running_mean'),
                                r'does not fit the network: .*Missing key\(s\).*"backbone.body.0.1.running_mean"'),
    'other format': (lambda c: _corrupt(c, format='something/2'), r"has format 'something/2'"),
    'NaN weights': (lambda c: _corrupt(c, nan_tensor='rpn.head.conv.0.0.weight'),
                    r"NaN or Infinity in 1 weight tensor\(s\) \(first: 'rpn.head.conv.0.0.weight'\)"),
}


@pytest.mark.parametrize('case', sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line_naming_the_file_and_what_is_wrong(case, small_checkpoint, tmp_path):
    make_payload, message = BAD_CHECKPOINTS[case]
    path = _write(tmp_path, make_payload(small_checkpoint[1]))
    with pytest.raises(checkpoints.CheckpointError) as err:
        make_adapter(artifacts=str(tmp_path))
    text = str(err.value)
    assert '\n' not in text and text.startswith(f'checkpoint {path!r}')
    assert re.search(message, text), text


def test_bare_torchvision_state_dict_of_the_right_variant_is_accepted(small_checkpoint, tmp_path):
    model, checkpoint = small_checkpoint
    # as torchvision ships weights: a bare state dict, frozen-BN style (no num_batches_tracked)
    _write(tmp_path, {k: v for k, v in checkpoint['state_dict'].items() if not k.endswith('num_batches_tracked')})
    adapter = make_adapter({'conf_threshold': 0.0}, artifacts=str(tmp_path))
    for key, value in model.state_dict().items():
        if not key.endswith('num_batches_tracked'):
            assert torch.equal(adapter.model.state_dict()[key], value), key
    image = random_image(320, 240)
    assert len(boxes_of(adapter.predict([image])[0])) > 0
    # the same bare file cannot fill a model with another class count: both sides named
    with pytest.raises(checkpoints.CheckpointError, match=r'with 4 classes.*with 3 classes'):
        make_adapter(labels=('cat', 'dog'), artifacts=str(tmp_path))


def test_local_runner_reports_a_bad_checkpoint_in_one_line(weights_only_model, tmp_path, capsys):
    path = os.path.join(weights_only_model, 'weights', 'best.pth')
    torch.save([1, 2, 3], path)
    image = tmp_path / 'a.png'
    image.write_bytes(png(64, 64))
    assert local_runner_main(['predict', '--model', weights_only_model, '--input', str(image),
                              '--output', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    assert err.strip().splitlines()[-1] == (f'local_runner predict: error: checkpoint {path!r} holds a list, not a '
                                            f'checkpoint (a dict with a state_dict, or a torchvision state dict)')


# ----------------------------------------------------------------------------- 4. non-finite values

FLOAT_KEYS = sorted(key for key, option in config_lib.OPTIONS.items() if float in option.types)


@pytest.mark.parametrize('value', [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize('key', FLOAT_KEYS)
def test_non_finite_float_configuration_is_rejected_naming_the_key(key, value):
    with pytest.raises(config_lib.ConfigError, match=f"'{key}' must be a finite number"):
        config_lib.resolve({key: value})
    if config_lib.OPTIONS[key].training:
        with pytest.raises(config_lib.ConfigError, match=f"'{key}' must be a finite number"):
            config_lib.resolve({'yaml_config': {key: value}})


def test_float_keys_cover_thresholds_and_the_optimizer():
    assert {'conf_threshold', 'nms_iou_threshold', 'learning_rate', 'momentum', 'weight_decay', 'lr_gamma',
            'max_grad_norm'} <= set(FLOAT_KEYS)
    with pytest.raises(config_lib.ConfigError, match="'lr_steps'"):
        config_lib.resolve({'lr_steps': [0.5, math.inf]})


def test_local_runner_config_with_nan_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / 'c.json'
    config.write_text('{"learning_rate": NaN}')  # what json.dumps(float("nan")) writes
    (tmp_path / 'data' / 'train').mkdir(parents=True)
    (tmp_path / 'data' / 'validation').mkdir()
    assert local_runner_main(['train', '--data', str(tmp_path / 'data'), '--output', str(tmp_path / 'o'),
                              '--config', str(config)]) == 2
    assert "'learning_rate' must be a finite number, got nan" in capsys.readouterr().err


def test_checkpoint_writer_refuses_non_finite_weights_and_keeps_the_previous_file(small_checkpoint, tmp_path):
    model, checkpoint = small_checkpoint
    path = str(tmp_path / 'weights' / 'best.pth')
    checkpoints.save_checkpoint(checkpoint, path)
    good = open(path, 'rb').read()
    for value in (math.nan, math.inf):
        bad = _corrupt(checkpoint)
        bad['state_dict']['roi_heads.box_head.fc6.weight'] = bad['state_dict']['roi_heads.box_head.fc6.weight'].clone()
        bad['state_dict']['roi_heads.box_head.fc6.weight'][0, 0] = value
        with pytest.raises(checkpoints.CheckpointError, match=r"refusing to write checkpoint .*best.pth.*NaN or "
                                                                 r"Infinity \(first: 'roi_heads.box_head.fc6.weight'\)"):
            checkpoints.save_checkpoint(bad, path)
    assert open(path, 'rb').read() == good
    assert os.listdir(tmp_path / 'weights') == ['best.pth']  # no temporary file left behind


def test_finite_weights_whose_sum_overflows_are_written_and_loaded(small_checkpoint, tmp_path):
    """The check sums each tensor first; a sum that overflows is no NaN: the values themselves decide."""
    _, checkpoint = small_checkpoint
    path = str(tmp_path / 'weights' / 'best.pth')
    huge = _corrupt(checkpoint)
    name = 'rpn.head.conv.0.0.weight'
    huge['state_dict'][name] = torch.full_like(huge['state_dict'][name], 3e38)  # finite; the sum is inf
    checkpoints.save_checkpoint(huge, path)
    assert torch.equal(checkpoints.load_checkpoint(path)['state_dict'][name], huge['state_dict'][name])
    huge['state_dict']['half'] = torch.full((4,), 60000.0, dtype=torch.float16)  # finite; the sum is inf
    checkpoints.save_checkpoint(huge, path)
    huge['state_dict']['half'][1] = -math.inf
    with pytest.raises(checkpoints.CheckpointError, match=r"Infinity \(first: 'half'\)"):
        checkpoints.save_checkpoint(huge, path)


def test_adapter_save_never_ships_non_finite_weights(tmp_path):
    adapter = make_adapter()
    adapter.save(str(tmp_path))
    good = (tmp_path / 'weights' / 'best.pth').read_bytes()
    with torch.no_grad():
        adapter.model.roi_heads.box_predictor.cls_score.weight.fill_(math.nan)
    with pytest.raises(checkpoints.CheckpointError, match='NaN or Infinity'):
        adapter.save(str(tmp_path))
    assert (tmp_path / 'weights' / 'best.pth').read_bytes() == good


# ----------------------------------------------------------------------------- 5. artifact paths

@pytest.mark.parametrize('value', ['', '  ', '/tmp/best.pth', '../best.pth', 'weights/../../best.pth',
                                   'weights/', '.', 'C:\\weights\\best.pth', '..\\best.pth'])
def test_weights_filename_outside_the_artifacts_is_rejected_at_load(value):
    with pytest.raises(config_lib.ConfigError, match="'weights_filename' must be a file path relative"):
        make_adapter({'weights_filename': value})


def test_weights_filename_in_a_subfolder_stays_inside(tmp_path):
    adapter = make_adapter({'weights_filename': 'weights/v2/model.pth'})
    adapter.save(str(tmp_path))
    assert (tmp_path / 'weights' / 'v2' / 'model.pth').is_file()


def test_local_runner_refuses_a_model_json_pointing_outside_its_folder(weights_only_model, tmp_path, capsys):
    outside = tmp_path / 'outside.pth'
    outside.write_bytes(b'x')
    with open(os.path.join(weights_only_model, 'model.json'), 'w') as f:
        json.dump({'configuration': {'weights_filename': '../outside.pth'}, 'labels': ['a']}, f)
    assert local_runner_main(['predict', '--model', weights_only_model, '--input', str(outside),
                              '--output', str(tmp_path / 'o')]) == 2
    assert "'weights_filename' must be a file path relative" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 9. masks

def _mask_data(png_bytes):
    return 'data:image/png;base64,' + base64.b64encode(png_bytes).decode()


def test_masks_of_another_size_or_over_the_limit_are_counted_under_their_own_reasons(tmp_path, caplog):
    root = str(tmp_path)
    alpha = np.zeros((40, 50), np.uint8)
    alpha[5:15, 10:30] = 255
    full = np.zeros((80, 100), np.uint8)
    full[10:30, 20:60] = 255
    _item(root, 'train', '/masks.jpg', image=_image_bytes((100, 80)), annotations=[
        {'type': 'binary', 'label': 'car', 'coordinates': _mask_png(full)},              # the image's size: used
        {'type': 'binary', 'label': 'car', 'coordinates': _mask_png(alpha)},             # half size: no frame
        {'type': 'binary', 'label': 'car', 'coordinates': _mask_data(png_header(20000, 10000, 6))},  # 200 MP
        {'type': 'binary', 'label': 'car', 'coordinates': _mask_data(png_header(30000, 30000, 6))},  # past PIL's
    ])
    with caplog.at_level(logging.WARNING):
        export = read_dataloop_export(root)
    [record] = export.subsets['train']
    assert record['boxes'] == [[20.0, 10.0, 60.0, 30.0]]
    dropped = export.reports['train'].dropped
    assert dropped['mask size differs from image'] == 1 and dropped['mask too large'] == 2
    assert 'bad coordinates' not in dropped
    assert 'mask is 50x40, the image 100x80' in caplog.text and 'mask is 20000x10000' in caplog.text



def test_local_runner_evaluate_skips_thin_images_and_counts_them(weights_only_model, tmp_path, caplog):
    data = str(tmp_path / 'data')
    box = [{'type': 'box', 'label': 'a', 'coordinates': [{'x': 5, 'y': 0}, {'x': 50, 'y': 2}]}]
    _item(data, 'validation', '/ok.png', image=png(96, 96), annotations=box)
    _item(data, 'validation', '/thin.png', image=png(4000, 2), annotations=box)  # 128 px long side: 0.06 px high
    with caplog.at_level(logging.WARNING):
        assert local_runner_main(['evaluate', '--model', weights_only_model, '--data', data,
                                  '--output', str(tmp_path / 'eval')]) == 0
    assert '/thin.png' in caplog.text and 'image too thin for the network' in caplog.text
    with open(tmp_path / 'eval' / 'evaluation_validation.json') as f:
        assert json.load(f)['images'] == 1


# ----------------------------------------------------------------------------- 10. output names

def test_predict_gives_every_input_its_own_outputs_and_reports_what_it_wrote(weights_only_model, tmp_path, capsys):
    images = tmp_path / 'images'
    (images / 'sub').mkdir(parents=True)
    # one size per input: each result JSON must describe its own image, not one written over it
    sizes = {'c.png': (96, 64), 'c.jpg': (64, 96), 'c.png.jpg': (80, 80), 'd.png': (72, 48),
             os.path.join('sub', 'c.png'): (48, 72)}
    for rel, size in sizes.items():
        Image.new('RGB', size, 'gray').save(images / rel)
    out = tmp_path / 'out'
    assert local_runner_main(['predict', '--model', weights_only_model, '--input', str(images),
                              '--output', str(out)]) == 0
    assert capsys.readouterr().out.startswith(f'{len(sizes)} image(s),')
    written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files)
    # natural names where nothing clashes (d, sub/c); the extension kept where stems clash
    names = ['c.jpg', 'c.png', 'c.png.jpg', 'd', os.path.join('sub', 'c')]
    assert written == sorted(name + ext for name in names for ext in ('.json', '.png'))
    for name, rel in zip(names, sorted(sizes)):
        with open(out / (name + '.json')) as f:
            item = json.load(f)
        assert item['name'] == os.path.basename(rel) and item['filename'] == '/' + rel.replace(os.sep, '/')
        assert (item['metadata']['system']['width'], item['metadata']['system']['height']) == sizes[rel]
        assert Image.open(out / (name + '.png')).size == sizes[rel]


def test_output_names_are_distinct_and_deterministic():
    from local_runner.inputs import output_names

    def names(*rels):
        return output_names([(rel, rel) for rel in rels])
    assert names('c.jpg', 'c.png', 'c.png.jpg') == ['c.jpg', 'c.png', 'c.png.jpg']
    assert names('c.png', 'c.png.png', 'c.jpg.png', 'c.jpg') == ['c.png', 'c.png.png', 'c.jpg.png', 'c.jpg']
    assert names('a.jpg', 'b.png') == ['a', 'b']
    # names that differ only in case would overwrite each other on a case-insensitive disk
    assert names('C.png', 'c.png') == ['C.png', 'c.png~2']
    # a.json (a result file) where a.json/x.json needs a folder
    assert names('a.png', 'a.json/x.png') == ['a~2', 'a.json/x']


# ----------------------------------------------------------------------------- 11. special files

class _FifoWatch:
    """Unblocks whoever opens a FIFO for reading (by opening it for writing, writing junk, closing),
    and records that someone did. A regression then fails the test instead of hanging it; the thread
    polls with O_NONBLOCK (ENXIO while no reader), so it never blocks itself."""

    def __init__(self, path):
        import threading
        self.path, self.opened, self.stop = path, False, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(0.05):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody reads it
                continue
            self.opened = True
            try:
                os.write(fd, b'not an image')
            finally:
                os.close(fd)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


def test_predict_reads_only_regular_files(weights_only_model, tmp_path, capsys, caplog):
    import socket
    images = tmp_path / 'images'
    images.mkdir()
    (images / 'good.png').write_bytes(png(96, 96))
    os.symlink(images / 'good.png', images / 'link.png')  # a link to a regular file is an input
    os.mkfifo(images / 'pipe.png')
    os.symlink('/dev/zero', images / 'zero.jpg')  # a character device streams forever
    os.symlink(images / 'gone.png', images / 'dangling.png')
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(images / 'sock.png'))
        with _FifoWatch(str(images / 'pipe.png')) as watch, caplog.at_level(logging.WARNING):
            code = local_runner_main(['predict', '--model', weights_only_model, '--input', str(images),
                                      '--output', str(tmp_path / 'out')])
    finally:
        server.close()
    assert code == 0, capsys.readouterr().err
    assert not watch.opened, 'predict opened the FIFO'
    assert capsys.readouterr().out.startswith('2 image(s),')
    assert sorted(os.listdir(tmp_path / 'out')) == ['good.json', 'good.png', 'link.json', 'link.png']
    for name, kind in [('pipe.png', 'a named pipe (FIFO)'), ('zero.jpg', 'a character device'),
                       ('dangling.png', 'a broken symbolic link'), ('sock.png', 'a socket')]:
        assert f'{name} is {kind}, not a regular file: skipped' in caplog.text, name

    with _FifoWatch(str(images / 'pipe.png')) as watch:
        code = local_runner_main(['predict', '--model', weights_only_model, '--input', str(images / 'pipe.png'),
                                  '--output', str(tmp_path / 'out2')])
    assert code == 2 and not watch.opened
    assert 'pipe.png is a named pipe (FIFO), not an image file or a folder' in capsys.readouterr().err


# ----------------------------------------------------------------------------- 12. read-only data

@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only for this process, as a read-only mount would.

    chmod alone proves nothing here: the tests run as root, whom file modes do not stop. So besides
    the chmod (real for any other user), every way Python reaches the OS to change the folder (os.open
    with a write flag, which tempfile and atomic writes use; open/io.open in a writing mode; mkdir,
    rename, replace, remove) fails with EROFS, like the kernel on a read-only mount. Writes elsewhere
    go through untouched. The test also checks afterwards that nothing in the folder changed, which
    covers writers below Python (torch's C++ file writer, say)."""
    import builtins
    import errno
    import io
    import stat as stat_lib
    folders = []

    def inside(path):
        if isinstance(path, int):
            return False
        path = os.path.realpath(os.fsdecode(path))
        return any(path == f or path.startswith(f + os.sep) for f in folders)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_os_open, real_open = os.open, builtins.open

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode='r', *args, **kwargs):
        if set(mode) & set('wax+') and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded(name):
        real = getattr(os, name)

        def call(*paths, **kwargs):
            for path in paths[:2]:
                if inside(path):
                    refuse(path)
            return real(*paths, **kwargs)
        monkeypatch.setattr(os, name, call)

    monkeypatch.setattr(os, 'open', os_open)
    monkeypatch.setattr(builtins, 'open', open_)
    monkeypatch.setattr(io, 'open', open_)
    for name in ('mkdir', 'rename', 'replace', 'remove', 'unlink', 'rmdir', 'chmod'):
        guarded(name)

    def make(folder):
        folder = os.path.realpath(str(folder))
        for root, dirs, files in os.walk(folder):
            for name in files:
                os.chmod(os.path.join(root, name), 0o444)
            os.chmod(root, 0o555)
        folders.append(folder)
        return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
                for root, _, files in os.walk(folder) for name in files}

    yield make
    monkeypatch.undo()  # the real os.chmod back, to give the folders their modes back
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            os.chmod(root, stat_lib.S_IRWXU | 0o755)


def test_train_on_a_read_only_data_folder_skips_the_index_and_finishes(read_only, tmp_path, caplog):
    from test_local_runner import LIGHT_TRAINING, TINY
    from utils.data.synthetic import make_synthetic_export
    data = tmp_path / 'data'
    make_synthetic_export(str(data), n_train=2, n_val=1, image_size=(64, 64), seed=5)
    config = tmp_path / 'config.json'
    config.write_text(json.dumps(dict(TINY, **LIGHT_TRAINING, min_size=64, max_size=64)))
    before = read_only(data)
    with caplog.at_level(logging.INFO):
        code = local_runner_main(['train', '--data', str(data), '--output', str(tmp_path / 'model'),
                                  '--config', str(config)])
    assert code == 0
    assert 'fasterrcnn_index.json' in caplog.text
    # train() took the export converted in memory: it did not convert (and try the index) a second time
    assert caplog.text.count('data index not written') == 1
    assert (tmp_path / 'model' / 'weights' / 'best.pth').is_file()
    after = {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
             for root, _, files in os.walk(data) for name in files}
    assert after == before  # nothing written into the data folder, by any writer
