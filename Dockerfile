# Runner image for the fasterrcnn app (the manifest's `runnerImage`).
# CUDA runtime base; the pip wheels of torch bring their own CUDA libraries.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TORCH_HOME=/opt/torch \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

# Bake in the COCO weights of the default variant: a deployed model never downloads at start.
RUN python -c "from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights as W; W.COCO_V1.get_state_dict(progress=False)" \
    && ls -l /opt/torch/hub/checkpoints

# Dataloop runs the agent as user 1000 (Ubuntu 24.04 images already have one: `ubuntu`).
RUN (getent passwd 1000 >/dev/null || useradd --create-home --uid 1000 dataloop) \
    && chown -R 1000:1000 /opt/torch
USER 1000
WORKDIR /tmp/app
