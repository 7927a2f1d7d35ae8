#!/usr/bin/env bash
# Everything this project checks on a lent GPU machine, in one run (see bench/RESULTS.md).
# Needs the wheels in .whl/: `bash bench/device_wheels.sh` here first, then `run` with carry [".whl"]
# and `bash bench/gpu_checks.sh [gpu_speed.py options]` (about 6 minutes on an H100).
# With $OUT set (the device tool), the whole log is kept in $OUT/gpu_checks.log.
set -uo pipefail
export PYTHONUNBUFFERED=1 DATALOOP_PATH=/tmp/dlp
mkdir -p /tmp/dlp
exec > >(tee "${OUT:-/tmp}/gpu_checks.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, torchvision, dtlpy; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'dtlpy', dtlpy.__version__, torch.cuda.get_device_name(), 'cores', __import__('os').cpu_count())"
if [ "${GPU_STAGES:-1}" = 1 ]; then  # GPU_STAGES=0 skips it (a minute)
  echo '== the prediction forward stage by stage: plain torchvision vs ours, device-busy time, launches, syncs'
  timeout "${GPU_STAGES_TIMEOUT:-60}" python3 bench/gpu_stages.py 2>&1 | grep -v -E 'DEBUG|WARNING|random weights|USDT|warn'
fi
echo '== the speed table (bench/speed/, a module a row): every row beside plain torchvision, same run'
timeout "${GPU_SPEED_TIMEOUT:-300}" python3 bench/gpu_speed.py "$@" 2>&1 | grep -v -E 'DEBUG|WARNING|random weights'
if [ "${GPU_DECODE:-1}" = 1 ]; then  # GPU_DECODE=0 skips it (about 15 s)
  echo '== does JPEG decoding on this host hold the GIL the thread driving the GPU needs?'
  timeout 90 python3 bench/decode_contention.py 2>&1 | grep -v -E 'DEBUG|WARNING|mismatch'
fi
if [ "${GPU_TESTS:-1}" = 1 ]; then  # GPU_TESTS=0 skips them (75 s)
  echo '== CUDA tests (AMP training + resume, fp16 predict vs fp32 within 1 px / 0.01, fp16 embed vs CPU)'
  SECONDS=0
  timeout "${GPU_TESTS_TIMEOUT:-120}" python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider --tb=short -W ignore::DeprecationWarning -W ignore::SyntaxWarning 2>&1 | grep -v -E "TIMEFRAME|TIMESTAMP|COMMENT_PATTERN|SyntaxWarning|^DEBUG|dtlpy:cookie"
  echo "   (${SECONDS} s)"
fi
if [ -n "${GPU_PROFILE:-}" ]; then  # torch.profiler tables of predict and the engine vs plain (a minute more)
  timeout 150 python3 bench/gpu_profile.py 2>&1 | grep -v -E 'DEBUG|WARNING|random weights'
fi
