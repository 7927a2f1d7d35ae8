#!/usr/bin/env bash
# Everything this project checks on a lent GPU machine, in one run (see bench/RESULTS.md).
# Needs the wheels in .whl/ (dtlpy and its pure-python deps, pycocotools for cp312).
set -uo pipefail
export PYTHONUNBUFFERED=1 DATALOOP_PATH=/tmp/dlp
mkdir -p /tmp/dlp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, torchvision, dtlpy; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'dtlpy', dtlpy.__version__, torch.cuda.get_device_name())"
echo '== CUDA test (AMP training, GPU predict, CPU reload)'
python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tail -5
echo '== predict speed, default variant, 640x480'
python3 bench/predict_speed.py --device cuda --runs 20 --batch 1 2>&1 | grep -v -E 'DEBUG|WARNING|random weights'
python3 bench/predict_speed.py --device cuda --runs 10 --batch 8 2>&1 | grep -v -E 'DEBUG|WARNING|random weights'
echo '== training speed'
python3 bench/train_speed.py --device cuda --variant fasterrcnn_resnet50_fpn --size 640 --images 64 --batch 4 2>&1 | tail -6
python3 bench/train_speed.py --device cuda --images 128 --batch 8 2>&1 | tail -6
