"""Adapter core: variants, weights (artifact / COCO-pretrained / random), save-load, prediction geometry."""
import os
import pickle
import threading

import numpy as np
import pytest
import torch

from fasterrcnn_adapter import FasterRCNNAdapter, UnreadableItem
from utils.core import config as config_lib
from utils.modeling import checkpoints, model_factory, network_loading
from utils.platform.local_model import local_model

SMALL = {'pretrained': False, 'model_variant': 'fasterrcnn_mobilenet_v3_large_320_fpn',
         'min_size': 160, 'max_size': 240, 'device': 'cpu'}


def make_adapter(configuration=None, labels=('cat', 'dog', 'bird'), artifacts='/nonexistent'):
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model(configuration={**SMALL, **(configuration or {})},
                                       labels=list(labels) if labels is not None else None)
    adapter.load(artifacts)
    return adapter


def random_image(width=640, height=480, seed=0):
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def boxes_of(collection):
    return [(a.left, a.top, a.right, a.bottom, a.label,
             a.metadata['user']['model']['confidence']) for a in collection.annotations]


@pytest.mark.parametrize('variant', config_lib.VARIANTS)
def test_every_variant_builds_and_predicts(variant):
    adapter = make_adapter({'model_variant': variant, 'min_size': 128, 'max_size': 160, 'conf_threshold': 0.0})
    assert adapter.model.roi_heads.box_predictor.cls_score.out_features == 4
    collections = adapter.predict([random_image(200, 150), random_image(160, 120, seed=1)])
    assert len(collections) == 2
    for collection in collections:
        for annotation in collection.annotations:
            assert annotation.type == 'box'
            assert annotation.label in {'cat', 'dog', 'bird'}


def test_save_then_load_in_fresh_adapter_predicts_identically(tmp_path):
    first = make_adapter({'conf_threshold': 0.0})
    first.save(str(tmp_path))
    assert (tmp_path / 'weights' / 'best.pth').is_file()
    assert first.model_entity.configuration['weights_filename'] == 'weights/best.pth'
    checkpoint = checkpoints.load_checkpoint(str(tmp_path / 'weights' / 'best.pth'))
    assert checkpoint['model_variant'] == SMALL['model_variant']
    assert checkpoint['id_to_label_map'] == {1: 'cat', 2: 'dog', 3: 'bird'}
    second = make_adapter({'conf_threshold': 0.0, 'seed': 1}, artifacts=str(tmp_path))  # another init, overwritten
    image = random_image(320, 240)
    assert boxes_of(first.predict([image])[0]) == boxes_of(second.predict([image])[0])
    assert len(first.predict([image])[0]) > 0


def test_a_loaded_checkpoint_is_built_without_random_draws_and_other_threads_still_initialise(tmp_path,
                                                                                              monkeypatch):
    """The network a checkpoint fills skips torchvision's random initialisation (nearly all of a resnet50's build),
    and holds the checkpoint's tensors exactly; a layer built meanwhile on another thread is initialised as usual,
    and the initialisers are torch's own again afterwards."""
    first = make_adapter()
    first.save(str(tmp_path))
    draws = []
    original = torch.nn.init.kaiming_uniform_
    monkeypatch.setattr(torch.nn.init, 'kaiming_uniform_', lambda t, *a, **k: draws.append(1) or original(t, *a, **k))
    counting = torch.nn.init.kaiming_uniform_
    second = make_adapter({'seed': 1}, artifacts=str(tmp_path))
    assert not draws
    expected = first.model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in second.model.state_dict().items())
    make_adapter({'seed': 1})  # a random start draws
    assert draws
    torch.manual_seed(0)
    reference = torch.nn.Linear(16, 16).weight
    built = []
    with network_loading.skipped_init():
        torch.manual_seed(0)
        worker = threading.Thread(target=lambda: built.append(torch.nn.Linear(16, 16).weight))
        worker.start()
        worker.join()
    assert torch.equal(built[0], reference)
    assert torch.nn.init.kaiming_uniform_ is counting


def test_checkpoint_of_other_variant_or_class_count_is_refused_with_both_named(tmp_path):
    make_adapter().save(str(tmp_path))
    with pytest.raises(ValueError, match=r"fasterrcnn_mobilenet_v3_large_320_fpn.*4 classes.*5 classes"):
        make_adapter(labels=('a', 'b', 'c', 'd'), artifacts=str(tmp_path))
    with pytest.raises(ValueError, match=r"'fasterrcnn_mobilenet_v3_large_320_fpn'.*'fasterrcnn_mobilenet_v3_large_fpn'"):
        make_adapter({'model_variant': 'fasterrcnn_mobilenet_v3_large_fpn'}, artifacts=str(tmp_path))


class _RunsCode:
    def __reduce__(self):
        return os.system, ('touch pwned-by-checkpoint',)


def test_checkpoint_with_code_in_its_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'weights').mkdir()
    with open(tmp_path / 'weights' / 'best.pth', 'wb') as f:
        pickle.dump({'state_dict': _RunsCode()}, f)
    with pytest.raises(ValueError, match='refusing to load checkpoint'):
        make_adapter(artifacts=str(tmp_path))
    assert not (tmp_path / 'pwned-by-checkpoint').exists()


@pytest.mark.parametrize('key,value,message', [
    ('model_variant', 'yolov8', r"'model_variant' must be one of \['fasterrcnn_resnet50_fpn'"),
    ('conf_threshold', '0.5', r"'conf_threshold' must be int or float"),
    ('pretrained', 'yes', r"'pretrained' must be bool"),
    ('max_detections', 0, r"'max_detections' must be >= 1"),
    ('batch_size', 2.5, r"'batch_size' must be int"),
])
def test_bad_configuration_fails_at_load_naming_the_key(key, value, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        make_adapter({key: value})


def _write_torchvision_checkpoint(torch_home, variant, num_classes=91):
    """What torchvision's Weights API would have downloaded: a state dict under TORCH_HOME/hub/checkpoints."""
    _, weights_enum = model_factory.BUILDERS[variant]
    path = torch_home / 'hub' / 'checkpoints' / os.path.basename(weights_enum.COCO_V1.url)
    path.parent.mkdir(parents=True)
    torch.manual_seed(3)
    state = model_factory.build_model(variant, num_classes, 320, 640).state_dict()
    # torchvision's COCO files hold FrozenBatchNorm buffers: no num_batches_tracked
    state = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
    torch.save(state, path)
    return state


def test_pretrained_weights_come_from_torch_home(tmp_path, monkeypatch):
    variant = 'fasterrcnn_mobilenet_v3_large_320_fpn'
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    state = _write_torchvision_checkpoint(tmp_path, variant)
    pretrained = {'pretrained': True, 'model_variant': variant}

    coco = make_adapter(pretrained, labels=None)  # the public model: COCO's 91-slot map, head kept
    assert coco.model.roi_heads.box_predictor.cls_score.out_features == 91
    for key, value in coco.model.state_dict().items():
        assert torch.equal(value, state[key]), key

    custom = make_adapter(pretrained, labels=('cat', 'dog', 'bird'))  # head replaced, the rest kept
    assert custom.model.roi_heads.box_predictor.cls_score.out_features == 4
    custom_state = custom.model.state_dict()
    for key, value in state.items():
        if key.startswith('roi_heads.box_predictor'):
            continue
        assert torch.equal(custom_state[key], value), key


def test_random_starts_follow_the_seed_and_leave_the_callers_rng_alone(tmp_path, monkeypatch):
    """Random weights and a new box predictor on COCO weights: same seed, same start; another seed, another."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    _write_torchvision_checkpoint(tmp_path, SMALL['model_variant'])
    for pretrained, key in ((False, 'backbone.body.0.0.weight'), (True, 'roi_heads.box_predictor.cls_score.weight')):
        def start(seed):
            return make_adapter({'pretrained': pretrained, 'seed': seed}).model.state_dict()[key]
        torch.manual_seed(0)
        before = torch.get_rng_state()
        first = start(3)
        assert torch.equal(torch.get_rng_state(), before)  # loading a model does not reseed the caller
        torch.rand(10)
        assert torch.equal(first, start(3)), pretrained
        assert not torch.equal(first, start(4)), pretrained


def test_prediction_boxes_are_in_original_pixels_inside_the_image():
    adapter = make_adapter({'seed': 4, 'conf_threshold': 0.0, 'min_size': 240, 'max_size': 320})
    image = random_image(640, 480)
    collection = adapter.predict([image])[0]
    assert len(collection) > 0
    right_edges = []
    for annotation in collection.annotations:
        assert 0 <= annotation.left <= annotation.right <= 640
        assert 0 <= annotation.top <= annotation.bottom <= 480
        assert 0.0 <= annotation.metadata['user']['model']['confidence'] <= 1.0
        assert annotation.metadata['user']['model']['name'] == 'fasterrcnn-local'
        right_edges.append(annotation.right)
    # the network saw a 320x240 image: boxes past x=320 prove the scale-back to the original frame
    assert max(right_edges) > 330
    # same as torchvision's own forward at the same thresholds
    adapter.model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        raw = adapter.model([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
    assert len(raw['boxes']) == len(collection)
    assert np.allclose(sorted(b[2] for b in raw['boxes'].tolist()), sorted(right_edges), atol=1e-3)


def test_conf_threshold_and_max_detections_are_honoured():
    image = random_image(320, 240)
    everything = make_adapter({'seed': 5, 'conf_threshold': 0.0}).predict([image])[0]
    scores = sorted(a.metadata['user']['model']['confidence'] for a in everything.annotations)
    assert len(scores) > 4
    threshold = scores[len(scores) // 2]
    above = make_adapter({'seed': 5, 'conf_threshold': threshold}).predict([image])[0]
    assert 0 < len(above) < len(scores)
    assert all(a.metadata['user']['model']['confidence'] >= threshold - 1e-4 for a in above.annotations)
    capped = make_adapter({'seed': 5, 'conf_threshold': 0.0, 'max_detections': 3}).predict([image])[0]
    assert len(capped) == 3


def test_unreadable_entries_get_empty_collections_and_are_reported():
    adapter = make_adapter({'seed': 6, 'conf_threshold': 0.0})
    bad = UnreadableItem('id-1', 'notes.txt', 'not a decodable image')
    collections = adapter.predict([random_image(), bad, random_image(seed=2)])
    assert [len(c) > 0 for c in collections] == [True, False, True]
    assert adapter.unreadable_items == [bad]


def test_public_model_defaults_need_no_platform_call():
    # building the adapter on a configuration missing the SDK's keys must not PATCH (offline: TokenExpired)
    model = local_model(configuration=SMALL, labels=['a'])
    for key in config_lib.SDK_KEYS:
        model.configuration.pop(key, None)
    adapter = FasterRCNNAdapter()
    adapter.model_entity = model
    adapter.load('/nonexistent')
    assert set(config_lib.SDK_KEYS) <= set(model.configuration)


def test_training_sampler_sizes_reach_the_network():
    adapter = make_adapter({'rpn_post_nms_top_n_train': 500, 'box_batch_size_per_image': 64})
    assert adapter.model.rpn._post_nms_top_n['training'] == 500
    assert adapter.model.roi_heads.fg_bg_sampler.batch_size_per_image == 64


@pytest.mark.parametrize('variant, own_sizes', [('fasterrcnn_mobilenet_v3_large_320_fpn', (320, 640)),
                                                ('fasterrcnn_mobilenet_v3_large_fpn', (800, 1333))])
def test_min_and_max_size_null_mean_the_variants_own_and_the_checkpoint_records_them(tmp_path, variant, own_sizes):
    assert config_lib.DEFAULTS['min_size'] is None and config_lib.DEFAULTS['max_size'] is None
    adapter = make_adapter({'model_variant': variant, 'min_size': None, 'max_size': None})
    assert model_factory.input_sizes(adapter.model) == own_sizes
    adapter.save(str(tmp_path))
    checkpoint = checkpoints.load_checkpoint(str(tmp_path / 'weights' / 'best.pth'))
    assert (checkpoint['min_size'], checkpoint['max_size']) == own_sizes
    # a size that is set still wins over the variant's own
    sized = make_adapter({'model_variant': variant, 'min_size': 160, 'max_size': None})
    assert model_factory.input_sizes(sized.model) == (160, own_sizes[1])
