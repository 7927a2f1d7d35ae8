"""The graphs the CPU runtime compiles: the detector, and the backbone for `embed`, as ONNX files with
free height and width, kept in the model's folder under a digest of the weights and settings.

One file per network takes every image size: the caller normalises and resizes each image with the
network's own transform (as the PyTorch path does), the graph pads it, runs the network and its
NMS, and returns boxes in the resized image's pixels; nothing is squashed to a fixed size. Exporting costs tens of seconds on
a 2-vCPU pod, so the adapter also writes the detector's file when it saves a trained model, and a
deploy that downloads the artifacts finds it under the same digest.
"""
import copy
import hashlib
import logging
import os
from typing import List

import torch
from torch import nn

from utils.core.atomic import atomic_write
from utils.export.onnx_export import INPUT_NAME, OPSET, OUTPUT_NAMES, write_graph
from utils.modeling import checkpoints

logger = logging.getLogger(__name__)

GRAPHS_DIR = 'cpu_runtime'  # under the model's local folder (uploaded with the artifacts)
DETECTOR, BACKBONE = 'detector', 'backbone'
#: The detector graph keeps every box scoring above this (or the model's lower `conf_threshold`); the
#: runtime drops those under `conf_threshold` itself, so changing that setting needs no new export.
#: Same result: NMS is greedy by score (a lower box never suppresses a higher one), and the top
#: `max_detections` of the larger set hold every box above the threshold that PyTorch would keep.
SCORE_FLOOR = 0.05
_EXAMPLE_SIZE = (3, 480, 640)  # any size: the graph's height and width stay free
GRAPH_FORMAT = 'fasterrcnn-cpu-graph/1'  # what the graphs take and return: a new format gets new digests


def graph_score_threshold(network: nn.Module) -> float:
    return min(float(network.roi_heads.score_thresh), SCORE_FLOOR)


def digest(network: nn.Module) -> str:
    """What the exported graphs depend on: the weights' bytes, the settings the export freezes into the
    graph (input sizes, NMS, detections per image, proposal counts), the graphs' format, the exporter's version."""
    h = hashlib.blake2b(digest_size=10)
    transform, rpn, heads = network.transform, network.rpn, network.roi_heads
    settings = (GRAPH_FORMAT, torch.__version__, OPSET, transform.min_size, transform.max_size, transform.image_mean,
                transform.image_std, graph_score_threshold(network), heads.nms_thresh, heads.detections_per_img,
                rpn._pre_nms_top_n['testing'], rpn._post_nms_top_n['testing'])
    h.update(repr(settings).encode())
    for name, tensor in network.state_dict().items():
        h.update(f'{name}{tuple(tensor.shape)}{tensor.dtype}'.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def graph_folder(root: str, network: nn.Module) -> str:
    return os.path.join(root, GRAPHS_DIR, digest(network))


def _unchanged(image: torch.Tensor) -> torch.Tensor:
    return image


def _unchanged_with_target(image: torch.Tensor, target=None):
    return image, target


def prepared_image(network: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The detector graph's input: a float [0, 1] CHW image normalised and resized by the network's own transform."""
    resized, _ = network.transform.resize(network.transform.normalize(image), None)
    return resized


class _Backbone(nn.Module):
    """The FPN features of a normalised, padded batch of one: `embed`'s heavy half."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, tensors: torch.Tensor) -> List[torch.Tensor]:
        return list(self.backbone(tensors).values())


def backbone_levels(network: nn.Module) -> List[str]:
    """The backbone's output names in order (FPN levels: '0', '1', ..., 'pool')."""
    with torch.inference_mode():
        return list(network.backbone(torch.zeros(1, 3, 64, 64)).keys())


def export_graph(network: nn.Module, kind: str, path: str) -> str:
    """Write `kind`'s ONNX file at `path` (atomically: a half-written file is never found) from a CPU copy of
    `network`; the network itself is left as it was."""
    network = copy.deepcopy(network).cpu().eval()
    example = torch.rand(*_EXAMPLE_SIZE, generator=torch.Generator().manual_seed(0))
    with atomic_write(path, 'wb') as f, torch.no_grad():
        if kind == DETECTOR:
            network.roi_heads.score_thresh = graph_score_threshold(network)
            # the caller normalises and resizes with the network's own transform (`prepared_image`): the
            # traced resize rounds its scale differently for some sizes (a 100x200 image lost a third of
            # its boxes under ONNX Runtime), and the caller's own resize is the PyTorch path's by definition
            network.transform.normalize = _unchanged
            network.transform.resize = _unchanged_with_target
            axes = {INPUT_NAME: {1: 'height', 2: 'width'}, **{name: {0: 'detections'} for name in OUTPUT_NAMES}}
            write_graph(network, ([example],), f, OUTPUT_NAMES, axes)
        else:
            levels = backbone_levels(network)
            axes = {INPUT_NAME: {0: 'batch', 2: 'height', 3: 'width'},
                    **{name: {0: 'batch', 2: f'height_{name}', 3: f'width_{name}'} for name in levels}}
            write_graph(_Backbone(network.backbone), (example[None],), f, levels, axes)
    return path


def ensure_graph(network: nn.Module, kind: str, folder: str) -> str:
    """`folder/<kind>.onnx`, exported first when it is not there yet (`folder` from `graph_folder`)."""
    path = os.path.join(folder, f'{kind}.onnx')
    if not os.path.isfile(path):
        logger.info('exporting the %s graph for the CPU runtime to %s (once per weights and settings)', kind, path)
        export_graph(network, kind, path)
    return path


def trained_network(model: nn.Module, weights_path: str) -> nn.Module:
    """A CPU copy of `model` holding the checkpoint at `weights_path`: the network a deploy of those weights
    builds, so its `digest` is the one the deploy computes (once the same prediction settings are applied)."""
    network = copy.deepcopy(model).cpu().eval()
    checkpoints.load_state(network, checkpoints.load_checkpoint(weights_path), weights_path)
    return network
