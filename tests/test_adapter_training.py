"""Fine-tuning through the adapter, the way `train_model` calls it: convert_from_dtlpy -> train -> save -> load."""
import os

import pytest
import torch

from fasterrcnn_adapter import INDEX_FILENAME, FasterRCNNAdapter
from utils.platform.local_model import local_model
from utils.modeling.checkpoints import is_finished_run
from utils.data.synthetic import make_synthetic_export
from tests.test_training import curves_png_not_drawn  # noqa: F401 (a fixture)

TINY = {'pretrained': False, 'model_variant': 'fasterrcnn_mobilenet_v3_large_320_fpn', 'device': 'cpu',
        'min_size': 128, 'max_size': 128, 'batch_size': 2, 'num_workers': 0, 'epochs': 2,
        'learning_rate': 0.01, 'warmup_iters': 5,
        'box_batch_size_per_image': 64, 'rpn_post_nms_top_n_train': 150}  # the box head's cost: README's CPU advice


def make_adapter(configuration, labels, artifacts='/nonexistent'):
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model(configuration={**TINY, **configuration}, labels=labels)
    adapter.load(artifacts)
    return adapter


@pytest.fixture(scope='module')
def export_dir(tmp_path_factory):
    """Two batches to order and shuffle, one validation image: what the tests here look at (the epochs, the
    files, the seed's effect), at the least cost."""
    root = tmp_path_factory.mktemp('export')
    make_synthetic_export(str(root), n_train=4, n_val=1, image_size=(128, 128), seed=3)
    return str(root)


def test_adapter_trains_saves_and_reloads_the_best_epoch(export_dir, tmp_path, caplog):
    adapter = make_adapter({}, labels=['circle', 'square', 'triangle'])
    epochs_seen = []
    adapter.convert_from_dtlpy(export_dir)
    assert os.path.isfile(os.path.join(export_dir, INDEX_FILENAME))
    output = tmp_path / 'output'
    result = adapter.train(export_dir, str(output), on_epoch_end_callback=lambda i, n: epochs_seen.append((i, n)))
    assert epochs_seen == [(0, 2), (1, 2)]
    # a local model (no project) has no platform to plot metrics on: nothing is sent, nothing fails
    assert not [r for r in caplog.records if 'could not publish' in r.getMessage()]
    assert result.epochs_run == 2
    assert (output / 'weights' / 'best.pth').is_file()
    # last.pth says the run finished (save_to_model ships the folder without it: test_platform_flows)
    assert is_finished_run(str(output / 'weights' / 'last.pth'))
    assert (output / 'curves.csv').is_file() and (output / 'curves.png').is_file()
    artifacts = tmp_path / 'artifacts'
    adapter.save(str(artifacts))
    reloaded = make_adapter({'conf_threshold': 0.0}, labels=['circle', 'square', 'triangle'], artifacts=str(artifacts))
    adapter.model_entity.configuration['conf_threshold'] = 0.0
    image = torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8)
    a = [(x.left, x.top, x.label) for x in adapter.predict([image])[0].annotations]
    b = [(x.left, x.top, x.label) for x in reloaded.predict([image])[0].annotations]
    assert a == b


def test_labels_the_data_does_not_have_fail_before_training(export_dir):
    adapter = make_adapter({}, labels=['car', 'person'])
    with pytest.raises(ValueError, match=r"none of the labels in the data \['circle', 'square', 'triangle'\]"):
        adapter.convert_from_dtlpy(export_dir)


def _trained_state(export_dir, output, **configuration):
    adapter = make_adapter({'epochs': 1, **configuration}, labels=['circle', 'square', 'triangle'])
    adapter.convert_from_dtlpy(export_dir)
    adapter.train(export_dir, str(output))
    return adapter.model.state_dict()


def test_same_seed_trains_the_same_weights_another_seed_other_weights(export_dir, tmp_path, curves_png_not_drawn):
    """Random init, data order and augmentation (hflip is on) all follow `seed`, not the process's RNG history."""
    torch.manual_seed(123)
    first = _trained_state(export_dir, tmp_path / 'a', seed=7, num_workers=1)
    torch.rand(100)  # whatever ran before must not matter
    second = _trained_state(export_dir, tmp_path / 'b', seed=7, num_workers=1)
    other = _trained_state(export_dir, tmp_path / 'c', seed=8, num_workers=1)
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    float_keys = [k for k in first if first[k].is_floating_point()]
    assert not all(torch.equal(first[k], other[k]) for k in float_keys)
