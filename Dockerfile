# The runner images of the manifest's two services, one build target each, built from the repository root:
#   docker build --target gpu -t <runnerImage ending in -gpu> .   train_model, evaluate_model (gpu-t4 pods)
#   docker build --target cpu -t <runnerImage ending in -cpu> .   the deploy service (predict_*, embed_*)
#   docker build .                                                  the last target: the CPU image
# The tags are written once, in dataloop.json: a tag's ending names its target, and `make images`
# (docker/images.py) builds each one, `make push-images` pushes them. .dockerignore sends only requirements.txt.
#
# Both targets stand on Dataloop's runner bases (Python 3.11 as ${DL_PYTHON_EXECUTABLE}, the interpreter the
# agent runs; HOME=/tmp), install exactly requirements.txt's pins system-wide as root (the bases install their
# own packages that way, so user 1000 imports them), bake the default variant's COCO weights under TORCH_HOME
# (a deployed model never downloads at start) and run as user 1000.

# The variant whose COCO weights are baked in: the manifest's default model_variant.
ARG MODEL_VARIANT=fasterrcnn_resnet50_fpn

# ---------------------------------------------------------------------------------------------------- gpu
# CUDA 11.8 runtime on Ubuntu 22.04; torch's wheels bring their own CUDA libraries: of the base's CUDA only the
# node's driver, mounted at run time, matters.
FROM hub.dataloop.ai/dtlpy-runner-images/gpu:python3.11_cuda11.8_opencv AS gpu

# The CUDA 12.8 build of the pinned torch, from PyTorch's own index: PyPI's wheel of the same version is a
# CUDA 13 build that needs an R580+ driver, while CUDA 12.x builds run on R525+ drivers (CUDA's minor-version
# compatibility), which gpu-t4 nodes and most customer clusters have. Another driver: --build-arg
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 (README, "Runner images").
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG MODEL_VARIANT

# FASTERRCNN_EXPECT_GPU: this image is meant for a GPU, so loading without one warns loudly (utils/core/device.py).
ENV HOME=/tmp \
    PIP_NO_CACHE_DIR=1 \
    TORCH_HOME=/opt/torch \
    FASTERRCNN_EXPECT_GPU=1

USER root
COPY requirements.txt /opt/fasterrcnn/requirements.txt
# torch and torchvision first, from the CUDA index, at requirements.txt's pins; then every pin from PyPI, which
# finds those two satisfied (2.14.1+cu128 is a 2.14.1); the last check fails the build if PyPI's CUDA 13 build
# got in.
RUN grep -E '^(torch|torchvision)==' /opt/fasterrcnn/requirements.txt > /opt/fasterrcnn/torch-requirements.txt \
    && ${DL_PYTHON_EXECUTABLE} -m pip install --index-url ${TORCH_INDEX_URL} -r /opt/fasterrcnn/torch-requirements.txt \
    && ${DL_PYTHON_EXECUTABLE} -m pip install -r /opt/fasterrcnn/requirements.txt \
    && ${DL_PYTHON_EXECUTABLE} -c "import torch; assert (torch.version.cuda or '').startswith('12.'), torch.__version__"

# The weights' folder belongs to user 1000, so another variant's weights can still be cached there.
RUN mkdir -p ${TORCH_HOME} && chown 1000:1000 ${TORCH_HOME}
USER 1000
RUN ${DL_PYTHON_EXECUTABLE} -c "import sys; from torchvision.models import get_model_weights; get_model_weights(sys.argv[1]).COCO_V1.get_state_dict(progress=False)" ${MODEL_VARIANT} \
    && ls -l ${TORCH_HOME}/hub/checkpoints
WORKDIR /tmp

# ---------------------------------------------------------------------------------------------------- cpu
# CPU wheels of torch, a fraction of the GPU image's size, which matters with minReplicas 0 (every cold start
# pulls it).
FROM hub.dataloop.ai/dtlpy-runner-images/cpu:python3.11_opencv AS cpu

# The CPU build of the pinned torch, from PyTorch's own index (PyPI's Linux wheel pulls the CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG MODEL_VARIANT

ENV HOME=/tmp \
    PIP_NO_CACHE_DIR=1 \
    TORCH_HOME=/opt/torch

USER root
COPY requirements.txt /opt/fasterrcnn/requirements.txt
# As in the gpu target, from the CPU index; the last check fails the build if a CUDA build got in. What only
# the deploy service needs is installed here, one `&& ${DL_PYTHON_EXECUTABLE} -m pip install ...` line each.
RUN grep -E '^(torch|torchvision)==' /opt/fasterrcnn/requirements.txt > /opt/fasterrcnn/torch-requirements.txt \
    && ${DL_PYTHON_EXECUTABLE} -m pip install --index-url ${TORCH_INDEX_URL} -r /opt/fasterrcnn/torch-requirements.txt \
    && ${DL_PYTHON_EXECUTABLE} -m pip install -r /opt/fasterrcnn/requirements.txt \
    && ${DL_PYTHON_EXECUTABLE} -c "import torch; assert torch.version.cuda is None, torch.__version__"

RUN mkdir -p ${TORCH_HOME} && chown 1000:1000 ${TORCH_HOME}
USER 1000
RUN ${DL_PYTHON_EXECUTABLE} -c "import sys; from torchvision.models import get_model_weights; get_model_weights(sys.argv[1]).COCO_V1.get_state_dict(progress=False)" ${MODEL_VARIANT} \
    && ls -l ${TORCH_HOME}/hub/checkpoints
WORKDIR /tmp
