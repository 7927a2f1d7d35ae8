#!/usr/bin/env bash
# Everything this project checks on a lent GPU machine, in one run (see bench/RESULTS.md).
# Needs the wheels in .whl/ (dtlpy and its pure-python deps, pycocotools / faster-coco-eval for the
# machine's Python): `pip download --only-binary=:all: --python-version 3.12 -d .whl dtlpy==1.126.5 ...`
# here, then `run` with carry=['.whl'] and `bash bench/gpu_checks.sh` (about 8 minutes on an H100).
set -uo pipefail
export PYTHONUNBUFFERED=1 DATALOOP_PATH=/tmp/dlp
mkdir -p /tmp/dlp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, torchvision, dtlpy; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'dtlpy', dtlpy.__version__, torch.cuda.get_device_name())"
echo '== CUDA tests (AMP training + resume, fp16 predict vs fp32 within 1 px / 0.01, fp16 embed vs CPU)'
timeout 180 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tail -5
echo '== issue 8 table: every row beside plain torchvision, same run'
timeout 420 python3 bench/gpu_speed.py 2>&1 | grep -v -E 'DEBUG|WARNING|random weights'
