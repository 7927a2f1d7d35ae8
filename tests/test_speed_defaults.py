"""'auto' batch size, learning rate and workers, chosen for the device (README: Speed defaults)."""
from types import SimpleNamespace

import pytest
import torch

from utils.core import config as config_lib


def test_auto_values_on_the_cpu_keep_the_cpu_recipe():
    settings = config_lib.for_training(config_lib.resolve({}), torch.device('cpu'))
    assert (settings['batch_size'], settings['num_workers']) == (2, 0)
    assert settings['learning_rate'] == pytest.approx(0.0025)  # torchvision's 0.02 / 16 per image, x 2
    assert config_lib.prediction_batch_size('auto', 'cpu') == 1


@pytest.mark.parametrize('gib, batch', [(15, 4), (80, 8)])
def test_auto_values_on_a_gpu_follow_its_memory(monkeypatch, gib, batch):
    monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda device: SimpleNamespace(total_memory=gib * 2 ** 30))
    monkeypatch.setattr('utils.core.config.os.cpu_count', lambda: 8)
    settings = config_lib.for_training(config_lib.resolve({}), torch.device('cuda'))
    assert settings['batch_size'] == batch and settings['learning_rate'] == pytest.approx(0.00125 * batch)
    assert settings['num_workers'] == 4
    assert config_lib.prediction_batch_size('auto', torch.device('cuda')) == 16


def test_numbers_are_used_as_given_and_an_auto_rate_follows_a_given_batch():
    settings = config_lib.for_training(config_lib.resolve({'batch_size': 6, 'num_workers': 1}), 'cpu')
    assert (settings['batch_size'], settings['num_workers']) == (6, 1)
    assert settings['learning_rate'] == pytest.approx(0.0075)
    settings = config_lib.for_training(config_lib.resolve({'batch_size': 6, 'learning_rate': 0.02}), 'cpu')
    assert settings['learning_rate'] == 0.02
    assert config_lib.prediction_batch_size(3, torch.device('cuda')) == 3


def test_only_auto_is_a_valid_string():
    with pytest.raises(config_lib.ConfigError, match="'batch_size' must be int or 'auto'"):
        config_lib.resolve({'batch_size': 'big'})
    with pytest.raises(config_lib.ConfigError, match="'amp'"):
        config_lib.resolve({'amp': 'auto'})
