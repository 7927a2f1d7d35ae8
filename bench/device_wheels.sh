#!/usr/bin/env bash
# The wheels bench/gpu_checks.sh installs on a lent GPU machine (Python 3.12 there, no package index):
# dtlpy, the COCO evaluators, and what dtlpy needs that the machine's image lacks (checked 2026-11-27
# against its package list in /work/.library/device/KINDS.md). Run here, in the repository root; needs
# .venv (for docopt, which PyPI has as a source archive only). Then: run with carry [".whl"].
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
for wheel in dtlpy==1.126.5 dtlpymetrics==1.2.32 pycocotools==2.0.11 faster-coco-eval==1.8.0 \
    blessed==1.52.0 decorator==5.3.1 dictdiffer==0.10.0 diskcache==5.6.3 dnspython==2.9.2 editor==2.0.1 \
    fuzzyfinder==2.1.0 inquirer==3.4.1 jinxed==2.1.0 prompt-toolkit==3.0.53 pyjwt==2.15.1 pymongo==4.20.1 \
    readchar==4.2.2 redis==8.1.0 requests-toolbelt==1.0.0 runs==1.3.0 shapely==2.2.0 validators==0.18.2 \
    wcwidth==0.9.4 webvtt-py==0.4.3 xmod==1.10.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$wheel"
done
.venv/bin/pip wheel -q --no-deps -w .whl docopt==0.6.2
ls .whl | wc -l
