"""Device resolution on a machine without a usable GPU, on CPU.

What stands in for the GPU node: `torch.cuda.is_available` answers False, and a fake `nvidia-smi`
script on PATH prints the header a real driver prints (or PATH holds none). The adapter's own code
runs unpatched.
"""
import json
import logging
import os
import stat

import pytest
import torch

from local_runner.cli import main as local_runner_main
from fasterrcnn_adapter import FasterRCNNAdapter
from utils.core import device as device_lib
from utils.platform.local_model import local_model
from utils.data.synthetic import make_synthetic_export

TINY = {'pretrained': False, 'model_variant': 'fasterrcnn_mobilenet_v3_large_320_fpn',
        'min_size': 64, 'max_size': 64}
OLD_DRIVER_SMI = """\
+-----------------------------------------------------------------------------+
| NVIDIA-SMI 470.57.02    Driver Version: 470.57.02    CUDA Version: 11.4     |
|-------------------------------+----------------------+----------------------+
|   0  Tesla T4            Off  | 00000000:00:04.0 Off |                    0 |
+-------------------------------+----------------------+----------------------+
"""


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """No usable GPU, no NVIDIA hints in the environment, an empty PATH folder to add a fake nvidia-smi to."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for name in (device_lib.EXPECT_GPU_ENV, 'NVIDIA_VISIBLE_DEVICES', 'CUDA_VISIBLE_DEVICES'):
        monkeypatch.delenv(name, raising=False)
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    monkeypatch.setenv('PATH', str(bin_dir))
    return bin_dir


def fake_nvidia_smi(bin_dir, output, exit_code=0):
    script = bin_dir / 'nvidia-smi'
    script.write_text(f"#!/bin/sh\n/bin/cat <<'EOF'\n{output}EOF\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def load_adapter(device):
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model(configuration={**TINY, 'device': device}, labels=['a', 'b'])
    adapter.load('/nonexistent')
    return adapter


def device_records(caplog, level):
    return [r for r in caplog.records if r.name == 'utils.core.device' and r.levelno == level]


def test_gpu_runner_without_usable_gpu_warns_once_with_torch_build_and_driver_view(no_gpu, monkeypatch, caplog):
    fake_nvidia_smi(no_gpu, OLD_DRIVER_SMI)
    monkeypatch.setenv(device_lib.EXPECT_GPU_ENV, '1')
    with caplog.at_level(logging.INFO, logger='utils.core.device'):
        adapter = load_adapter('auto')
    assert adapter.device.type == 'cpu' and next(adapter.model.parameters()).device.type == 'cpu'
    (warning,) = device_records(caplog, logging.WARNING)
    line = warning.getMessage()
    assert '\n' not in line
    assert f'CUDA {torch.version.cuda}' in line or 'CPU-only build' in line
    assert 'driver 470.57.02' in line and 'CUDA up to 11.4' in line
    assert 'go on on the CPU, far slower' in line
    if torch.version.cuda and int(torch.version.cuda.split('.')[0]) > 11:
        assert "older than torch's CUDA" in line


def test_nvidia_devices_without_nvidia_smi_say_it_is_missing(no_gpu, monkeypatch, caplog):
    monkeypatch.setenv('NVIDIA_VISIBLE_DEVICES', 'all')  # what a GPU container's runtime sets
    with caplog.at_level(logging.INFO, logger='utils.core.device'):
        assert device_lib.resolve_device('auto') == torch.device('cpu')
    (warning,) = device_records(caplog, logging.WARNING)
    assert 'nvidia-smi is missing' in warning.getMessage()


def test_failing_nvidia_smi_is_quoted(no_gpu, caplog):
    fake_nvidia_smi(no_gpu, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", 9)
    with caplog.at_level(logging.INFO, logger='utils.core.device'):
        assert device_lib.resolve_device('auto') == torch.device('cpu')
    (warning,) = device_records(caplog, logging.WARNING)
    assert "nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it couldn't communicate" in warning.getMessage()


def test_auto_on_a_plain_cpu_machine_is_quiet(no_gpu, caplog):
    with caplog.at_level(logging.INFO, logger='utils.core.device'):
        assert load_adapter('auto').device.type == 'cpu'
    assert not device_records(caplog, logging.WARNING)
    assert device_records(caplog, logging.INFO)


def test_explicit_cuda_without_gpu_is_a_one_line_error_saying_what_to_set(no_gpu):
    fake_nvidia_smi(no_gpu, OLD_DRIVER_SMI)
    with pytest.raises(device_lib.DeviceError) as caught:
        load_adapter('cuda')
    message = str(caught.value)
    assert isinstance(caught.value, ValueError) and '\n' not in message
    assert "device is 'cuda'" in message and "Set device to 'cpu'" in message and 'driver 470.57.02' in message


def test_explicit_cuda_without_gpu_in_the_local_runner_exits_2_with_one_line(no_gpu, tmp_path, capsys):
    data = tmp_path / 'data'
    make_synthetic_export(str(data), n_train=2, n_val=1, image_size=(64, 64), seed=0)
    config = tmp_path / 'config.json'
    config.write_text(json.dumps({**TINY, 'device': 'cuda', 'epochs': 1, 'num_workers': 0}))
    code = local_runner_main(['-q', 'train', '--data', str(data), '--output', str(tmp_path / 'out'),
                              '--config', str(config)])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "device is 'cuda'" in line and 'nvidia-smi is missing' in line
    assert not os.path.exists(tmp_path / 'out' / 'weights')


def test_cpu_and_available_cuda_resolve_without_diagnosis(no_gpu, monkeypatch):
    assert device_lib.resolve_device('cpu') == torch.device('cpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert device_lib.resolve_device('cuda') == torch.device('cuda')
    assert device_lib.resolve_device('auto') == torch.device('cuda')
