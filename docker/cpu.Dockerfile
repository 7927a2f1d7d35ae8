# Runner image of the CPU deploy service `fasterrcnn-deploy` (predict_items, predict_dataset, embed_*): CPU wheels of
# torch, a fraction of the GPU image's size, which matters with minReplicas 0 (every cold start pulls it).
# Its tag is the manifest's runnerImage ending in `-cpu` (dataloop.json); `make images` builds it from the
# repository root, `make push-images` pushes it.
#
# Dataloop's runner base: python:3.11, with ${DL_PYTHON_EXECUTABLE} the interpreter the agent runs.
FROM hub.dataloop.ai/dtlpy-runner-images/cpu:python3.11_opencv

# The CPU build of the pinned torch, from PyTorch's own index (PyPI's Linux wheel pulls the CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The variant whose COCO weights are baked in: the manifest's default model_variant.
ARG MODEL_VARIANT=fasterrcnn_resnet50_fpn

ENV HOME=/tmp \
    PIP_NO_CACHE_DIR=1 \
    TORCH_HOME=/opt/torch

USER root
COPY requirements.txt /opt/fasterrcnn/requirements.txt
# torch and torchvision first, from the CPU index, at requirements.txt's pins; then every pin from PyPI, which
# finds those two satisfied (2.14.1+cpu is a 2.14.1). System-wide as root, as the base installs its own
# packages, so that user 1000 imports them; the last check fails the build if a CUDA build got in.
RUN grep -E '^(torch|torchvision)==' /opt/fasterrcnn/requirements.txt > /opt/fasterrcnn/torch-requirements.txt \
    && ${DL_PYTHON_EXECUTABLE} -m pip install --index-url ${TORCH_INDEX_URL} -r /opt/fasterrcnn/torch-requirements.txt \
    && ${DL_PYTHON_EXECUTABLE} -m pip install -r /opt/fasterrcnn/requirements.txt \
    && ${DL_PYTHON_EXECUTABLE} -c "import torch; assert torch.version.cuda is None, torch.__version__"

# COCO weights of the default variant under TORCH_HOME, where torchvision looks for them: a deployed model never
# downloads at start. The folder belongs to user 1000, so another variant's weights can still be cached there.
RUN mkdir -p ${TORCH_HOME} && chown 1000:1000 ${TORCH_HOME}
USER 1000
RUN ${DL_PYTHON_EXECUTABLE} -c "import sys; from torchvision.models import get_model_weights; get_model_weights(sys.argv[1]).COCO_V1.get_state_dict(progress=False)" ${MODEL_VARIANT} \
    && ls -l ${TORCH_HOME}/hub/checkpoints
WORKDIR /tmp
