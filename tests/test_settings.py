"""The validated settings object (`utils.core.config.Settings`), how often it is built, and the explicit
process set-up (`utils.core.runtime_setup`), which importing the package leaves undone."""
import io
import json
import os
import subprocess
import sys
import textwrap

import dtlpy as dl
import numpy as np
import pytest
from PIL import Image

from fasterrcnn_adapter import FasterRCNNAdapter
from utils.core import config as config_lib
from utils.core.settings_cache import SettingsCache
from utils.platform.local_model import manifest_model_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {'model_variant': 'fasterrcnn_mobilenet_v3_large_320_fpn', 'pretrained': False, 'device': 'cpu',
        'min_size': 64, 'max_size': 64, 'conf_threshold': 0.0, 'max_detections': 3}


def test_settings_are_read_only_all_the_way_down():
    settings = config_lib.resolve({'lr_steps': [0.5, 0.9], 'yaml_config': {'epochs': 3}})
    with pytest.raises(AttributeError, match='read-only'):
        settings.epochs = 4
    with pytest.raises(TypeError):
        settings['epochs'] = 4
    with pytest.raises(AttributeError):
        settings.lr_steps.append(1.0)  # a tuple
    with pytest.raises(TypeError):
        settings.yaml_config['epochs'] = 5
    assert settings.epochs == settings['epochs'] == 3 and settings.lr_steps == (0.5, 0.9)
    thawed = settings.to_dict()
    thawed['lr_steps'].append(1.0)  # a plain copy: the settings keep theirs
    assert settings.lr_steps == (0.5, 0.9) and thawed['yaml_config'] == {'epochs': 3}


def test_settings_hold_typed_values():
    settings = config_lib.resolve({'conf_threshold': 1, 'epochs': 7, 'checkpoint_interval_s': 30, 'amp': False})
    assert type(settings.epochs) is int and type(settings.max_detections) is int
    assert type(settings.conf_threshold) is float and settings.conf_threshold == 1.0  # a number option: a float
    assert type(settings.checkpoint_interval_s) is float and type(settings.momentum) is float
    assert settings.amp is False and settings.batch_size == config_lib.AUTO
    trained = config_lib.for_training(settings, 'cpu')  # the 'auto' values chosen: typed too
    assert type(trained.batch_size) is int and type(trained.num_workers) is int
    assert type(trained.learning_rate) is float and isinstance(trained, config_lib.Settings)
    with pytest.raises(AttributeError, match="no configuration key 'epoch'"):
        settings.epoch


def test_replace_validates_and_leaves_the_original():
    settings = config_lib.resolve({})
    changed = settings.replace(epochs=3, min_size=320)
    assert (changed.epochs, changed.min_size, settings.epochs, settings.min_size) == (3, 320, 50, None)
    with pytest.raises(config_lib.ConfigError, match="'epochs' must be >= 1"):
        settings.replace(epochs=0)
    with pytest.raises(config_lib.ConfigError, match="unknown configuration key"):
        settings.replace(epoch=3)
    with pytest.raises(config_lib.ConfigError, match="'max_size' \\(320\\) must be >= 'min_size' \\(640\\)"):
        changed.replace(min_size=640, max_size=320)
    assert settings.replace(lr_steps=settings.lr_steps).lr_steps == (0.62, 0.85)  # a frozen value goes back in


def test_settings_compare_with_plain_configurations_and_survive_pickling():
    import pickle
    settings = config_lib.resolve({'lr_steps': [0.5]})
    assert settings == {**config_lib.DEFAULTS, 'lr_steps': [0.5]} and settings != config_lib.DEFAULTS
    assert config_lib.resolve(settings) is settings  # already validated: passed through
    assert pickle.loads(pickle.dumps(settings)) == settings  # what a DataLoader worker receives


def test_the_cache_rebuilds_only_when_an_option_value_changes():
    cache, configuration = SettingsCache(), {'lr_steps': [0.5], 'epochs': 3, 'platform_key': 'x'}
    first = cache.get(configuration)
    configuration['platform_key'] = 'y'  # not an option of this adapter
    assert cache.get(configuration) is first
    configuration['lr_steps'].append(0.9)  # edited in place
    second = cache.get(configuration)
    assert second is not first and second.lr_steps == (0.5, 0.9)
    configuration['amp'] = 1  # equal to True, but not a bool: validated again, and refused
    with pytest.raises(config_lib.ConfigError, match="'amp' must be bool"):
        cache.get(configuration)


def _jpeg(seed):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, 'JPEG')
    return buffer.getvalue()


def test_settings_are_built_once_per_configuration_not_per_predict_batch(dataloop_env, monkeypatch):
    emu = dataloop_env
    project = emu.seed_project('settings-project')
    dataset = emu.seed_dataset(project['id'], 'pictures', labels=['a', 'b'])
    seeded = [emu.seed_item(dataset['id'], f'{k}.jpg', _jpeg(k), dir='/predict') for k in range(3)]
    configuration = manifest_model_block()['configuration']
    configuration.update(TINY, id_to_label_map={'1': 'a', '2': 'b'}, label_to_id_map={'a': 1, 'b': 2})
    model = emu.seed_model(project['id'], dataset['id'], 'settings-model', configuration=configuration,
                           labels=['a', 'b'])
    builds = []
    real_resolve = config_lib.resolve
    monkeypatch.setattr(config_lib, 'resolve', lambda c: builds.append(1) or real_resolve(c))

    service = FasterRCNNAdapter(dl.models.get(model_id=model['id']))  # load: the one build
    items = [dl.items.get(item_id=item['id']) for item in seeded]
    assert len(builds) == 1
    _, annotations = service.predict_items(items, batch_size=1)  # three batches
    assert len(builds) == 1 and len(annotations) > 0

    service.model_entity.configuration['conf_threshold'] = 1.0  # the user edits the model between calls
    _, annotations = service.predict_items(items, batch_size=1)
    assert len(builds) == 2 and len(annotations) == 0  # rebuilt once, and it took effect (no score is > 1)
    assert emu.missing == [] and emu.errors == []


SNAPSHOT = textwrap.dedent('''
    import json, sys, warnings
    from PIL import Image
    from utils.core import runtime_setup

    def state():
        from dtlpy.ml import base_model_adapter
        return {'pil_limit': Image.MAX_IMAGE_PIXELS,
                'filters': sum(runtime_setup.TORCHVISION_DECODE_DEPRECATION in str(getattr(f[1], 'pattern', ''))
                               for f in warnings.filters),
                'sdk_bars_routed': bool(getattr(base_model_adapter.tqdm, 'routed_to_progress', False))}

    before = state()
    import fasterrcnn_adapter, local_runner.cli, utils.data.images, utils.data.dataloop_reader  # noqa: F401
    imported = state()
    runtime_setup.configure()
    runtime_setup.configure()  # idempotent
    print(json.dumps([before, imported, state()]))
''')


def test_importing_changes_nothing_global_and_configure_does_it_once():
    done = subprocess.run([sys.executable, '-c', SNAPSHOT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before, imported, configured = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported == before and before['filters'] == 0 and not before['sdk_bars_routed']
    assert configured == {'pil_limit': config_lib.MAX_IMAGE_PIXELS_CEILING, 'filters': 1, 'sdk_bars_routed': True}
