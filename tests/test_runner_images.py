"""The runner images read together with the manifest (no Docker here: the Dockerfile is parsed).

Checked: every service names an image that a target of the repository's Dockerfile builds (docker/images.py
maps a tag to its target), GPU pods get the gpu target on Dataloop's GPU base and CPU pods the cpu one, and
`docker build .` builds a runner image; each target installs exactly requirements.txt's pins into the agent's
interpreter (torch/torchvision from PyTorch's CUDA 12.x or CPU index at the same versions), bakes the default
variant's COCO weights (the baking command is run here against a stand-in file) and runs as user 1000 with
HOME=/tmp.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
import torchvision

from utils.core import config as config_lib
from utils.core import device as device_lib
from utils.modeling import model_factory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'docker'))
import images as images_lib  # noqa: E402  docker/images.py

TARGETS = ('cpu', 'gpu')
BASES = {'gpu': 'hub.dataloop.ai/dtlpy-runner-images/gpu:', 'cpu': 'hub.dataloop.ai/dtlpy-runner-images/cpu:'}
AGENT_PIP = '${DL_PYTHON_EXECUTABLE} -m pip install'


def manifest():
    with open(os.path.join(ROOT, 'dataloop.json')) as f:
        return json.load(f)


def instructions():
    """[(INSTRUCTION, arguments)] of the Dockerfile, continuation lines joined and comments dropped."""
    with open(os.path.join(ROOT, 'Dockerfile')) as f:
        text = re.sub(r'\\\n\s*', ' ', '\n'.join(line for line in f.read().splitlines()
                                                 if not line.lstrip().startswith('#')))
    result = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(' ')
            result.append((keyword.upper(), arguments.strip()))
    return result


def stages():
    """{target: its steps from its FROM on}, and the global ARG steps before the first FROM under ''."""
    result, name = {'': []}, ''
    for instruction, arguments in instructions():
        if instruction == 'FROM':
            name = re.fullmatch(r'\S+\s+AS\s+(\S+)', arguments, flags=re.IGNORECASE).group(1)
            result[name] = []
        result[name].append((instruction, arguments))
    return result


def stage(target):
    return stages()[target]


def variables(steps, keyword):
    """ENV or ARG values (`KEY=VALUE` pairs, several per line allowed); an ARG without a value takes the
    Dockerfile's global default (an ARG before the first FROM)."""
    values = {}
    for instruction, arguments in steps:
        if instruction == keyword:
            for pair in shlex.split(arguments):
                key, _, value = pair.partition('=')
                values[key] = value if '=' in pair else variables(stages()[''], 'ARG')[key]
    return values


def requirement_pins():
    pins = {}
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        for line in f:
            requirement = line.split('#', 1)[0].strip()
            if requirement:
                name, version = requirement.split('==')
                pins[name.lower()] = version
    return pins


def test_every_service_names_an_image_that_a_target_of_the_dockerfile_builds():
    computes = manifest()['components']['computeConfigs']
    built = images_lib.images(manifest())
    for compute in computes:
        image = compute['runtime']['runnerImage']
        target = built[image]
        expected = 'gpu' if compute['runtime']['podType'].startswith('gpu') else 'cpu'
        assert target == expected, (compute['name'], image)
        (base,) = [arguments for instruction, arguments in stage(target) if instruction == 'FROM']
        assert base.startswith(BASES[expected]) and base.endswith(f' AS {target}'), (target, base)
    assert sorted(set(built.values())) == sorted(images_lib.targets()) == sorted(TARGETS)  # no unused target
    assert len(set(built)) == 2  # a slim CPU image for deploy, the GPU image for train/evaluate


def test_docker_build_from_the_repository_root_builds_a_runner_image():
    """`docker build .` builds the last target: a whole runner image, the deploy service's."""
    assert images_lib.targets()[-1] == 'cpu'
    with open(os.path.join(ROOT, '.dockerignore')) as f:
        sent = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    assert sent == ['*', '!requirements.txt']  # the build context: the pins and nothing else


def test_an_image_without_a_target_is_refused():
    broken = manifest()
    broken['components']['computeConfigs'][0]['runtime']['runnerImage'] = 'registry/fasterrcnn-adapter:0.1.0-tpu'
    with pytest.raises(ValueError, match="the Dockerfile has no target 'tpu'"):
        images_lib.images(broken)
    with pytest.raises(ValueError, match='must end in -<target>'):
        images_lib.target_for('registry/fasterrcnn-adapter:latest')


def test_build_commands_tag_each_image_from_its_target():
    commands = images_lib.commands(manifest(), push=True)
    for image, target in images_lib.images(manifest()).items():
        assert ['docker', 'build', '--platform', 'linux/amd64', '--target', target, '-t', image, '.'] in commands
        assert ['docker', 'push', image] in commands


@pytest.mark.parametrize('target', TARGETS)
def test_image_installs_exactly_the_requirements_pins_into_the_agents_interpreter(target):
    steps = stage(target)
    assert ('COPY', 'requirements.txt /opt/fasterrcnn/requirements.txt') in steps
    runs = ' && '.join(arguments for instruction, arguments in steps if instruction == 'RUN')
    pip_calls = [call.strip() for call in runs.split('&&') if ' pip ' in call]
    assert pip_calls and all(call.startswith(AGENT_PIP) for call in pip_calls), pip_calls
    assert f'{AGENT_PIP} -r /opt/fasterrcnn/requirements.txt' in pip_calls
    # no version written in the Dockerfile itself: every one comes from requirements.txt
    assert not re.search(r'[A-Za-z0-9_.-]+(==|>=|<=|~=)\d', runs), runs

    (prefilter,) = re.findall(r"grep -E '([^']+)' /opt/fasterrcnn/requirements.txt > "
                              r"/opt/fasterrcnn/torch-requirements.txt", runs)
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        torch_pins = [line.strip() for line in f if re.search(prefilter, line)]
    pins = requirement_pins()
    assert torch_pins == [f'torch=={pins["torch"]}', f'torchvision=={pins["torchvision"]}']
    # the versions the tests run with
    assert pins['torch'] == torch.__version__.split('+')[0]
    assert pins['torchvision'] == torchvision.__version__.split('+')[0]
    index = variables(steps, 'ARG')['TORCH_INDEX_URL']
    assert f'{AGENT_PIP} --index-url ${{TORCH_INDEX_URL}} -r /opt/fasterrcnn/torch-requirements.txt' in pip_calls
    if target == 'gpu':
        assert re.fullmatch(r'https://download\.pytorch\.org/whl/cu12\d+', index), index
        assert "torch.version.cuda or '').startswith('12.')" in runs  # the build fails on PyPI's CUDA 13 wheel
    else:
        assert index == 'https://download.pytorch.org/whl/cpu'
        assert 'assert torch.version.cuda is None' in runs


@pytest.mark.parametrize('target', TARGETS)
def test_image_runs_as_user_1000_and_bakes_the_default_variants_weights_where_it_can_read_them(target):
    steps = stage(target)
    users = [(i, arguments) for i, (instruction, arguments) in enumerate(steps) if instruction == 'USER']
    assert users[-1][1] == '1000'
    env = variables(steps, 'ENV')
    assert env['HOME'] == '/tmp' and env['TORCH_HOME'].startswith('/')
    assert variables(steps, 'ARG')['MODEL_VARIANT'] == config_lib.DEFAULTS['model_variant']
    (bake_index,) = [i for i, (instruction, arguments) in enumerate(steps)
                     if instruction == 'RUN' and 'get_state_dict' in arguments]
    assert users[-1][0] < bake_index  # downloaded as user 1000, into ...
    assert ('RUN', 'mkdir -p ${TORCH_HOME} && chown 1000:1000 ${TORCH_HOME}') in steps[:users[-1][0]]  # its folder
    assert env.get(device_lib.EXPECT_GPU_ENV) == ('1' if target == 'gpu' else None)


def test_the_baking_command_fetches_the_file_the_adapter_loads(tmp_path):
    """Run the Dockerfile's own command offline (the targets share it: it runs once per distinct command):
    with the default variant's file already under TORCH_HOME it must load that file (and not try a
    download, which fails here)."""
    bakes = {}
    for target in TARGETS:
        steps = stage(target)
        (bake,) = [arguments for instruction, arguments in steps
                   if instruction == 'RUN' and 'get_state_dict' in arguments]
        bakes.setdefault((bake, variables(steps, 'ARG')['MODEL_VARIANT']), []).append(target)
    for index, (bake, variant) in enumerate(bakes):
        command = shlex.split(bake.split('&&')[0])
        assert command[:2] == ['${DL_PYTHON_EXECUTABLE}', '-c'] and command[3:] == ['${MODEL_VARIANT}']
        weights = model_factory.BUILDERS[variant][1].COCO_V1
        checkpoints = tmp_path / str(index) / 'hub' / 'checkpoints'
        checkpoints.mkdir(parents=True)
        torch.save({'stand-in': torch.zeros(1)}, checkpoints / os.path.basename(weights.url))
        env = {**os.environ, 'TORCH_HOME': str(tmp_path / str(index))}
        run = subprocess.run([sys.executable, '-c', command[2], variant], env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert sorted(os.listdir(checkpoints)) == [os.path.basename(weights.url)]


def test_readme_says_which_image_serves_which_service():
    with open(os.path.join(ROOT, 'README.md')) as f:
        readme = f.read()
    for compute in manifest()['components']['computeConfigs']:
        image = compute['runtime']['runnerImage']
        row = next((line for line in readme.splitlines() if f'`{image}`' in line), None)
        assert row is not None, f'README.md does not name {image}'
        assert f'`{compute["name"]}`' in row and f'`Dockerfile` target `{images_lib.target_for(image)}`' in row
    # one Dockerfile, at the root: no second copy of an image's recipe to drift
    assert [name for name in os.listdir(os.path.join(ROOT, 'docker')) if 'Dockerfile' in name] == []
