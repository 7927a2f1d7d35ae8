"""Two torchvision functions replaced, while the detector is traced for export, by equivalents that compile
to a leaner graph: same tensors out, less work for OpenVINO and for NNCF's int8 calibration.

- RoI pooling's merge of the FPN levels: torchvision's traced `MultiScaleRoIAlign` writes each level's pooled
  features into a zero tensor with a scatter whose index is every proposal's index expanded to its whole feature
  block (1000 x 256 x 7 x 7 per level); on an int8 resnet50 building and scattering those indices took about a
  tenth of the forward. Concatenating the levels and gathering rows by the inverse of the level order gives the
  same tensor with one index per proposal.
- Per-class NMS (`batched_nms`'s coordinate trick): torchvision scripts it for the empty-input case, which
  exports as ONNX If nodes; NNCF quantizes each If body as a model of its own (five passes instead of one).
  Taking the largest coordinate over the boxes and a zero needs no branch: boxes are clipped to the image
  before NMS (coordinates >= 0), so the offsets, and the boxes kept, are the same, and no boxes give no boxes.
Figures: bench/RESULTS.md.
"""
import contextlib
from typing import List

import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops
from torchvision.ops import poolers


def merge_by_gather(levels: Tensor, unmerged_results: List[Tensor]) -> Tensor:
    """`poolers._onnx_merge_levels`'s result: row i holds proposal i's features from its level `levels[i]`."""
    order = torch.cat([torch.where(levels == level)[0] for level in range(len(unmerged_results))])
    return torch.cat(unmerged_results)[torch.argsort(order)]


def batched_nms_without_branch(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """`box_ops._batched_nms_coordinate_trick` for boxes with coordinates >= 0, empty input included."""
    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (max_coordinate + 1)
    return box_ops.nms(boxes + offsets[:, None], scores, iou_threshold)


@contextlib.contextmanager
def lean_detector_ops():
    """While tracing, torchvision's pooler and NMS use the functions above."""
    originals = poolers._onnx_merge_levels, box_ops._batched_nms_coordinate_trick
    poolers._onnx_merge_levels, box_ops._batched_nms_coordinate_trick = merge_by_gather, batched_nms_without_branch
    try:
        yield
    finally:
        poolers._onnx_merge_levels, box_ops._batched_nms_coordinate_trick = originals
