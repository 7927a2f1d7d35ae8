"""dataloop.json: Dataloop validates nothing offline (`dl.Dpk.from_json` accepts anything), so we do."""
import importlib
import inspect
import json
import os

from dtlpy.entities.service import OnResetAction

from utils.core import config as config_lib
from utils.modeling import model_factory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    with open(os.path.join(ROOT, 'dataloop.json')) as f:
        return json.load(f)


def test_manifest_identity_and_compute_configs():
    manifest = load()
    assert manifest['name'] == 'fasterrcnn' and manifest['scope'] == 'public'
    assert manifest['codebase']['type'] == 'git'
    computes = {c['name']: c for c in manifest['components']['computeConfigs']}
    assert set(computes) == {'fasterrcnn-deploy', 'fasterrcnn-train-evaluate'}
    assert not computes['fasterrcnn-deploy']['runtime']['podType'].startswith('gpu')
    # a long video on the CPU takes hours (README "Video items"): above the platform's 1-hour default
    assert computes['fasterrcnn-deploy']['executionTimeout'] >= 24 * 3600
    train = computes['fasterrcnn-train-evaluate']
    assert train['runtime']['podType'].startswith('gpu')
    assert train['executionTimeout'] >= 24 * 3600
    # a pod reset or preemption reruns the execution, which resumes from the checkpoints uploaded during training
    assert train['onReset'] == OnResetAction.RERUN.value
    assert isinstance(train['maxAttempts'], int) and 2 <= train['maxAttempts'] <= 10
    assert config_lib.DEFAULTS['checkpoint_upload_interval_s'] > 0
    for compute in computes.values():
        assert compute['runtime']['autoscaler']['maxReplicas'] >= 1


def adapter_class(module):
    return getattr(importlib.import_module(module['entryPoint'][:-3]), module['className'])


def test_module_entry_point_class_and_functions_exist():
    manifest = load()
    (module,) = manifest['components']['modules']
    entry = module['entryPoint']
    assert os.path.isfile(os.path.join(ROOT, entry))
    adapter_cls = adapter_class(module)
    computes = {c['name'] for c in manifest['components']['computeConfigs']}
    assert module['computeConfig'] in computes
    names = [f['name'] for f in module['functions']]
    assert len(names) == len(set(names)), names
    assert set(names) == {'train_model', 'evaluate_model', 'predict_items', 'predict_dataset',
                          'embed_items', 'embed_dataset'}
    for function in module['functions']:
        method = getattr(adapter_cls, function['name'], None)
        assert callable(method), f"dataloop.json declares {function['name']!r}, which {module['className']} lacks"
        parameters = inspect.signature(method).parameters
        for declared in function['input']:
            assert declared['name'] in parameters, (function['name'], declared['name'])
        assert function.get('computeConfig', module['computeConfig']) in computes
    by_name = {f['name']: f for f in module['functions']}
    assert by_name['train_model']['computeConfig'] == 'fasterrcnn-train-evaluate'
    assert by_name['evaluate_model']['computeConfig'] == 'fasterrcnn-train-evaluate'


def test_function_inputs_and_outputs_match_the_code_and_are_described():
    """Names and types as the method's `@dl.Package.decorators.function` declares them; each with a description."""
    (module,) = load()['components']['modules']
    adapter_cls = adapter_class(module)
    for function in module['functions']:
        declared = getattr(adapter_cls, function['name']).__dtlpy__
        for side in ('input', 'output'):
            in_manifest = [(io['name'], io['type']) for io in function[side]]
            in_code = [(io['name'], io['type']) for io in declared[side]]
            assert in_manifest == in_code, (function['name'], side, in_manifest, in_code)
            for io in function[side]:
                description = io.get('description')
                assert isinstance(description, str) and description.strip(), \
                    f"dataloop.json: {function['name']} {side} {io['name']!r} has no description"
        assert function.get('description', '').strip() and function.get('displayName', '').strip(), function['name']
    for io in module['initInputs']:
        assert io['name'] in inspect.signature(adapter_cls.__init__).parameters, io


def test_every_configuration_key_is_known():
    (model,) = load()['components']['models']
    known = set(config_lib.OPTIONS) | {'id_to_label_map', 'label_to_id_map'}
    unknown = sorted(set(model['configuration']) - known)
    assert unknown == [], f'dataloop.json configuration keys unknown to utils/core/config.py: {unknown}'


def test_model_configuration_equals_documented_defaults():
    (model,) = load()['components']['models']
    assert model['name'] == 'fasterrcnn' and model['status'] == 'pre-trained'
    # the platform offers the model the media its inputType lists: images and videos (predict_items takes both)
    assert model['inputType'] == ['image', 'video'] and model['outputType'] == 'box'
    assert load()['attributes']['Media Type'] == ['Image', 'Video']
    assert model['moduleName'] == load()['components']['modules'][0]['name']
    configuration = dict(model['configuration'])
    configuration.pop('id_to_label_map')  # checked against the labels below
    configuration.pop('label_to_id_map')
    assert configuration == config_lib.DEFAULTS
    assert config_lib.resolve(model['configuration']) == config_lib.DEFAULTS


def test_label_maps_agree_with_labels_and_coco():
    (model,) = load()['components']['models']
    id_to_label = {int(k): v for k, v in model['configuration']['id_to_label_map'].items()}
    label_to_id = model['configuration']['label_to_id_map']
    assert id_to_label == model_factory.coco_id_to_label_map()
    assert len(id_to_label) == 80 and max(id_to_label) == 90 and 0 not in id_to_label
    assert [id_to_label[i] for i in sorted(id_to_label)] == model['labels']
    assert {v: k for k, v in id_to_label.items()} == label_to_id


def test_readme_documents_every_configuration_key_with_its_default():
    with open(os.path.join(ROOT, 'README.md')) as f:
        readme = f.read()
    for key, default in config_lib.DEFAULTS.items():
        row = next((line for line in readme.splitlines() if line.startswith(f'| `{key}` |')), None)
        assert row is not None, f'README.md has no configuration row for {key}'
        assert f'`{json.dumps(default)}`' in row, f'README.md row for {key} lacks its default {json.dumps(default)}'
