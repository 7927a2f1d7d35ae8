"""Which device the network runs on, and one loud line when a GPU was expected but torch cannot use it.

A GPU node whose NVIDIA driver is older than torch's CUDA build makes `torch.cuda.is_available()`
false; `device: auto` would then train on the CPU without a word, and an hour's fine-tune takes
days. So: `cuda` with no usable GPU is an error, and `auto` falling back to the CPU where a GPU
was expected is a warning that says why (torch's CUDA build, the driver's view) and what follows.
"""
import logging
import os
import re
import shutil
import subprocess
from typing import Optional, Tuple
import warnings

import torch

from utils.core.errors import InputError

logger = logging.getLogger(__name__)

# The GPU runner image (the Dockerfile's gpu target) sets it: that image exists to run on a GPU.
EXPECT_GPU_ENV = 'FASTERRCNN_EXPECT_GPU'
NVIDIA_SMI_TIMEOUT_S = 15


class DeviceError(InputError):
    """`device: cuda` where torch sees no usable GPU."""


def resolve_device(requested: str) -> torch.device:
    """`cpu`, `cuda` or `auto` (CUDA when torch can use it) -> the device to run on."""
    if requested == 'cpu':
        return torch.device('cpu')
    available, torch_note = _cuda_available()
    if available:
        return torch.device('cuda')
    facts, fix = diagnose(torch_note)
    if requested == 'cuda':
        raise DeviceError(f"device is 'cuda' but there is no usable GPU: {facts}. Set device to 'cpu' (or 'auto', "
                          f"which falls back to the CPU), or fix the GPU: {fix}")
    if gpu_expected():
        logger.warning('NO USABLE GPU on a GPU runner: %s. Training and prediction go on on the CPU, far slower '
                       '(a fine-tune of hours takes days). Fix: %s; or set device to cpu to accept the CPU',
                       facts, fix)
    else:
        logger.info('device auto: no GPU here, running on the CPU')
    return torch.device('cpu')


def gpu_expected() -> bool:
    """True on the GPU runner image, or where the machine shows NVIDIA devices or a driver."""
    if os.environ.get(EXPECT_GPU_ENV, '').strip().lower() in ('1', 'true', 'yes'):
        return True
    if os.environ.get('NVIDIA_VISIBLE_DEVICES', '').strip().lower() not in ('', 'void', 'none'):
        return True
    return shutil.which('nvidia-smi') is not None


def diagnose(torch_note: str = '') -> Tuple[str, str]:
    """(torch's CUDA build, the driver as nvidia-smi sees it, what torch said; the likely fix), each one line."""
    torch_cuda = torch.version.cuda
    build = (f'torch {torch.__version__} is built for CUDA {torch_cuda}' if torch_cuda
             else f'torch {torch.__version__} is a CPU-only build')
    driver_cuda, driver_view = _nvidia_smi()
    facts = [build, driver_view]
    if 'CUDA_VISIBLE_DEVICES' in os.environ:
        facts.append(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}")
    if torch_note:
        facts.append(f'torch says: {torch_note}')
    return '; '.join(facts), _advice(torch_cuda, driver_cuda, driver_view)


def _cuda_available() -> Tuple[bool, str]:
    """torch's answer plus the first sentence of any warning it gave (e.g. 'the NVIDIA driver ... is too old')."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        available = torch.cuda.is_available()
    notes = [re.split(r'(?<=\.)\s', str(w.message).strip(), maxsplit=1)[0] for w in caught]
    return available, ' '.join(note for note in notes if note)


def _nvidia_smi() -> Tuple[Optional[str], str]:
    """(the highest CUDA version the driver supports, a short description of what nvidia-smi says)."""
    binary = shutil.which('nvidia-smi')
    if binary is None:
        return None, 'nvidia-smi is missing (no NVIDIA driver visible here)'
    try:
        run = subprocess.run([binary], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f'nvidia-smi failed: {err}'
    output = f'{run.stdout}\n{run.stderr}'
    driver = re.search(r'Driver Version:\s*([\d.]+)', output)
    cuda = re.search(r'CUDA Version:\s*([\d.]+)', output)
    if run.returncode == 0 and driver:
        supports = f', supports CUDA up to {cuda.group(1)}' if cuda else ''
        return (cuda.group(1) if cuda else None), f'nvidia-smi: driver {driver.group(1)}{supports}'
    first_line = next((line.strip() for line in output.splitlines() if line.strip()), 'no output')
    return None, f'nvidia-smi failed (exit {run.returncode}): {first_line}'


def _advice(torch_cuda: Optional[str], driver_cuda: Optional[str], driver_view: str) -> str:
    if not torch_cuda:
        return 'install a CUDA build of torch (the GPU runner image has one)'
    if driver_view.startswith('nvidia-smi is missing'):
        return 'run on a GPU machine (on Dataloop, a gpu-* podType) with the NVIDIA driver mounted'
    if driver_cuda and _major(driver_cuda) < _major(torch_cuda):
        return (f"the driver (CUDA {driver_cuda}) is older than torch's CUDA {torch_cuda} build: use torch's CUDA "
                f'{_major(driver_cuda)}.x build where one exists (the GPU runner image has 12.x, for R525+ '
                f'drivers; README, "Runner images") or update the driver')
    return "check that the container was given a GPU (CUDA_VISIBLE_DEVICES, the pod's GPU request)"


def _major(version: str) -> int:
    return int(version.split('.')[0])
