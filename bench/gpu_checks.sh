#!/usr/bin/env bash
# Everything this project checks on a lent GPU machine, in one run (see bench/RESULTS.md).
# Needs the wheels in .whl/: `bash bench/device_wheels.sh` here first, then `run` with carry [".whl"]
# and `bash bench/gpu_checks.sh` (5 minutes on an H100 on 2026-11-27, before gpu_profile.py was added).
# With $OUT set (the device tool), the whole log is kept in $OUT/gpu_checks.log.
set -uo pipefail
export PYTHONUNBUFFERED=1 DATALOOP_PATH=/tmp/dlp
mkdir -p /tmp/dlp
exec > >(tee "${OUT:-/tmp}/gpu_checks.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, torchvision, dtlpy; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'dtlpy', dtlpy.__version__, torch.cuda.get_device_name(), 'cores', __import__('os').cpu_count())"
echo '== CUDA tests (AMP training + resume, fp16 predict vs fp32 within 1 px / 0.01, fp16 embed vs CPU)'
SECONDS=0
timeout 150 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider --tb=short -W ignore::DeprecationWarning -W ignore::SyntaxWarning 2>&1 | grep -v -E "TIMEFRAME|TIMESTAMP|COMMENT_PATTERN|SyntaxWarning"
echo "   (${SECONDS} s)"
echo '== issue 8 table: every row beside plain torchvision, same run'
timeout "${GPU_SPEED_TIMEOUT:-240}" python3 bench/gpu_speed.py "$@" 2>&1 | grep -v -E 'DEBUG|WARNING|random weights'
echo '== profiles of the rows that missed their targets (adapter.predict vs bare forward, engine vs bare loop)'
timeout "${GPU_PROFILE_TIMEOUT:-150}" python3 bench/gpu_profile.py 2>&1 | grep -v -E 'DEBUG|WARNING|random weights'
