# Runner image of the GPU service `fasterrcnn-train-evaluate` (train_model, evaluate_model on gpu-t4 pods).
# Its tag is the manifest's runnerImage ending in `-gpu` (dataloop.json); `make images` builds it from the
# repository root, `make push-images` pushes it.
#
# Dataloop's runner base: CUDA 11.8 runtime on Ubuntu 22.04, Python 3.11 as ${DL_PYTHON_EXECUTABLE} (the
# interpreter the agent runs), HOME=/tmp. torch's wheels bring their own CUDA libraries: of the base's CUDA
# only the node's driver, mounted at run time, matters.
FROM hub.dataloop.ai/dtlpy-runner-images/gpu:python3.11_cuda11.8_opencv

# The CUDA 12.8 build of the pinned torch, from PyTorch's own index: PyPI's wheel of the same version is a
# CUDA 13 build that needs an R580+ driver, while CUDA 12.x builds run on R525+ drivers (CUDA's minor-version
# compatibility), which gpu-t4 nodes and most customer clusters have. Another driver: --build-arg
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 (README, "Runner images").
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# The variant whose COCO weights are baked in: the manifest's default model_variant.
ARG MODEL_VARIANT=fasterrcnn_resnet50_fpn

# FASTERRCNN_EXPECT_GPU: this image is meant for a GPU, so loading without one warns loudly (utils/core/device.py).
ENV HOME=/tmp \
    PIP_NO_CACHE_DIR=1 \
    TORCH_HOME=/opt/torch \
    FASTERRCNN_EXPECT_GPU=1

USER root
COPY requirements.txt /opt/fasterrcnn/requirements.txt
# torch and torchvision first, from the CUDA index, at requirements.txt's pins; then every pin from PyPI, which
# finds those two satisfied (2.14.1+cu128 is a 2.14.1). System-wide as root, as the base installs its own
# packages, so that user 1000 imports them; the last check fails the build if PyPI's CUDA 13 build got in.
RUN grep -E '^(torch|torchvision)==' /opt/fasterrcnn/requirements.txt > /opt/fasterrcnn/torch-requirements.txt \
    && ${DL_PYTHON_EXECUTABLE} -m pip install --index-url ${TORCH_INDEX_URL} -r /opt/fasterrcnn/torch-requirements.txt \
    && ${DL_PYTHON_EXECUTABLE} -m pip install -r /opt/fasterrcnn/requirements.txt \
    && ${DL_PYTHON_EXECUTABLE} -c "import torch; assert (torch.version.cuda or '').startswith('12.'), torch.__version__"

# COCO weights of the default variant under TORCH_HOME, where torchvision looks for them: a deployed model never
# downloads at start. The folder belongs to user 1000, so another variant's weights can still be cached there.
RUN mkdir -p ${TORCH_HOME} && chown 1000:1000 ${TORCH_HOME}
USER 1000
RUN ${DL_PYTHON_EXECUTABLE} -c "import sys; from torchvision.models import get_model_weights; get_model_weights(sys.argv[1]).COCO_V1.get_state_dict(progress=False)" ${MODEL_VARIANT} \
    && ls -l ${TORCH_HOME}/hub/checkpoints
WORKDIR /tmp
