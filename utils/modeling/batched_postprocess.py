"""Proposal filtering and detection post-processing for the whole batch at once on the GPU.

torchvision's RPN and RoI heads post-process image by image: per image a string of small
kernels, host syncs (boolean indexing, `torch.where`) and one NMS, whose greedy pass runs on
the GPU in a single thread block. On an H100 at batch 16 that was 234 host syncs and half of
the device time of a prediction, NMS alone 36 of 70 ms (`bench/gpu_stages.py`,
bench/RESULTS.md); training pays the same per image in its RPN.

Here every (image, level) or (image, class) group of the batch runs through one greedy NMS
together, computed as Cluster-NMS's fixed point (Zheng et al., 2021): with the boxes of a
group in descending score order, ``keep[j] = not any(keep[i] and IoU(i, j) > t, i < j)``.
That recursion has exactly one solution, greedy NMS's; iterating it from "keep all" fixes
one more leading box per round at worst and usually converges in a handful of rounds, each a
batched matrix-vector product and one host sync. The boxes kept, their order and scores are
torchvision's (up to the order of exactly tied scores, which torchvision's GPU sort leaves
open too). CPU runs and tracing (ONNX export) keep torchvision's own code.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

#: IoU pairs computed per block of groups: bounds the float temporaries (about 16 bytes a pair).
IOU_BLOCK_PAIRS = 1 << 24
#: Pairs iterated at once in `greedy_nms`: bounds the suppression matrix (2 bytes a pair on CUDA).
NMS_BLOCK_PAIRS = 1 << 27
#: Rounds of `greedy_nms` between convergence checks (each check is a host sync; a round after
#: convergence changes nothing, so checking less often only costs a cheap round or two).
ROUNDS_PER_CHECK = 4
#: Tests set this to run the batched code on the CPU too (it is slower there than torchvision's).
ON_CPU = False
#: Batches of fewer images keep torchvision's per-image code. On an H100 (bench/postprocess_crossover.py,
#: resnet50_fpn at 800 px) the batched forward took 19.0 / 24.4 / 68.9 ms at batch 2 / 4 / 16 against
#: 20.5 / 29.4 / 96.6 per image; at batch 1 20.6 against 20.0: nothing to batch there.
MIN_IMAGES = 2


def batched(tensor: Tensor, images: int) -> bool:
    """Whether post-processing takes the batched path: on CUDA, from MIN_IMAGES images on, not while tracing
    or scripting."""
    return ((tensor.is_cuda or ON_CPU) and images >= MIN_IMAGES and not torchvision._is_tracing()
            and not torch.jit.is_scripting())


def suppression(boxes: Tensor, threshold: float) -> Tensor:
    """over[g, i, j]: box i precedes box j in group g and their IoU exceeds `threshold` (torchvision's
    NMS arithmetic: intersection / (area_i + area_j - intersection), in fp32)."""
    groups, n = boxes.shape[:2]
    over = torch.empty((groups, n, n), dtype=torch.bool, device=boxes.device)
    step = max(1, IOU_BLOCK_PAIRS // max(1, n * n))
    for start in range(0, groups, step):
        x1, y1, x2, y2 = boxes[start:start + step].float().unbind(-1)
        area = (x2 - x1) * (y2 - y1)
        width = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :]))
        height = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :]))
        inter = width.clamp_(min=0).mul_(height.clamp_(min=0))
        union = (area[:, :, None] + area[:, None, :]).sub_(inter)
        torch.gt(inter.div_(union), threshold, out=over[start:start + step])
    return over.logical_and_(torch.ones((n, n), dtype=torch.bool, device=boxes.device).triu_(1))


def greedy_nms(boxes: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """Greedy NMS in every group at once: `boxes` [G, N, 4] in descending score order within each group,
    `valid` [G, N] the boxes taking part; returns keep [G, N] (exactly what torchvision's nms keeps)."""
    groups, n = valid.shape
    keep = torch.zeros_like(valid)
    if n == 0:
        return keep
    dtype = torch.float16 if boxes.is_cuda else torch.float32  # counts of suppressors; only > 0 matters
    step = max(1, NMS_BLOCK_PAIRS // (n * n))
    for start in range(0, groups, step):
        part = slice(start, start + step)
        over = suppression(boxes[part], threshold).logical_and_(valid[part, :, None]).to(dtype)
        current, rounds = valid[part], 0
        while rounds < n:  # round r settles box r at the latest; usually far fewer rounds
            for _ in range(min(ROUNDS_PER_CHECK, n - rounds)):
                previous, rounds = current, rounds + 1
                current = valid[part] & ~(torch.bmm(current[:, None, :].to(dtype), over)[:, 0] > 0)
            if torch.equal(previous, current):
                break
        keep[part] = current
    return keep


def host_table(values: Sequence[Sequence[float]], like: Tensor) -> Tensor:
    """A small host table on `like`'s device without waiting for the GPU (pinned, non-blocking copy)."""
    table = torch.tensor(values, dtype=like.dtype)
    if like.is_cuda:
        return table.pin_memory().to(like.device, non_blocking=True)
    return table


def _clip(boxes: Tensor, image_shapes: Sequence[Tuple[int, int]]) -> Tensor:
    """torchvision's clip_boxes_to_image for every image of the batch: boxes [B, ..., 4]."""
    limits = host_table([[w, h] for h, w in image_shapes], boxes)  # [B, 2]
    limits = limits.view(limits.shape[:1] + (1,) * (boxes.dim() - 2) + (1, 2))
    corners = boxes.unflatten(-1, (2, 2)).clamp(min=0)  # [..., (x1, y1) / (x2, y2)]
    return torch.minimum(corners, limits).flatten(-2)


def _large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """torchvision's remove_small_boxes as a mask: both sides at least `min_size`."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def filter_proposals(rpn: RegionProposalNetwork, proposals: Tensor, objectness: Tensor,
                     image_shapes: List[Tuple[int, int]], num_anchors_per_level: List[int]
                     ) -> Tuple[List[Tensor], List[Tensor]]:
    """`RegionProposalNetwork.filter_proposals` for the whole batch: per level the top pre-NMS anchors,
    clipped, small and low-scoring ones dropped, NMS per (image, level), then the top post-NMS by score."""
    num_images = proposals.shape[0]
    objectness = objectness.detach().reshape(num_images, -1)
    boxes, logits, real = [], [], []
    width = min(rpn.pre_nms_top_n(), max(num_anchors_per_level))
    for level_logits, level_boxes in zip(objectness.split(num_anchors_per_level, 1),
                                         proposals.split(num_anchors_per_level, 1)):
        count = min(rpn.pre_nms_top_n(), level_logits.shape[1])
        top, index = level_logits.topk(count, dim=1)
        boxes.append(F.pad(level_boxes.gather(1, index[..., None].expand(-1, -1, 4)), (0, 0, 0, width - count)))
        logits.append(F.pad(top, (0, width - count)))
        real.append(torch.arange(width, device=proposals.device) < count)
    boxes = _clip(torch.stack(boxes, 1), image_shapes)  # [B, L, n, 4]
    scores = torch.sigmoid(torch.stack(logits, 1))  # [B, L, n]
    valid = torch.stack(real)[None] & _large_enough(boxes, rpn.min_size) & (scores >= rpn.score_thresh)
    keep = greedy_nms(boxes.flatten(0, 1), valid.flatten(0, 1), rpn.nms_thresh).view_as(valid)
    ranked = torch.where(keep, scores, -1).flatten(1)  # sigmoid scores are >= 0: -1 marks the dropped
    top, index = ranked.topk(min(rpn.post_nms_top_n(), ranked.shape[1]), dim=1)
    counts = keep.flatten(1).sum(1).clamp(max=top.shape[1]).tolist()
    chosen = boxes.flatten(1, 2).gather(1, index[..., None].expand(-1, -1, 4))
    return [chosen[i, :c] for i, c in enumerate(counts)], [top[i, :c] for i, c in enumerate(counts)]


def postprocess_detections(heads: RoIHeads, class_logits: Tensor, box_regression: Tensor,
                           proposals: List[Tensor], image_shapes: List[Tuple[int, int]]
                           ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """`RoIHeads.postprocess_detections` for the whole batch: per (image, class) the boxes above the score
    threshold and not empty, NMS, then per image the top `detections_per_img` by score."""
    counts = [len(p) for p in proposals]
    decoded = heads.box_coder.decode(box_regression, proposals).reshape(sum(counts), class_logits.shape[-1], 4)
    boxes = torch.nn.utils.rnn.pad_sequence(decoded.split(counts), batch_first=True)  # [B, P, C, 4]
    scores = torch.nn.utils.rnn.pad_sequence(F.softmax(class_logits, -1).split(counts), batch_first=True)
    real = torch.nn.utils.rnn.pad_sequence(scores.new_ones(sum(counts)).split(counts), batch_first=True) > 0
    boxes = _clip(boxes, image_shapes)[:, :, 1:].transpose(1, 2)  # [B, C-1, P, 4]: groups per class
    scores = scores[:, :, 1:].transpose(1, 2)  # [B, C-1, P]
    valid = real[:, None] & (scores > heads.score_thresh) & _large_enough(boxes, 1e-2)
    longest = int(valid.sum(-1).max()) if valid.numel() else 0
    order = torch.where(valid, scores, -1).argsort(dim=-1, descending=True)[..., :longest]
    boxes = boxes.gather(2, order[..., None].expand(-1, -1, -1, 4))
    scores, valid = scores.gather(2, order), valid.gather(2, order)
    keep = greedy_nms(boxes.flatten(0, 1), valid.flatten(0, 1), heads.nms_thresh).view_as(valid)
    ranked = torch.where(keep, scores, -1).flatten(1)  # softmax scores are >= 0: -1 marks the dropped
    top, index = ranked.topk(min(heads.detections_per_img, ranked.shape[1]), dim=1)
    found = keep.flatten(1).sum(1).clamp(max=top.shape[1]).tolist()
    chosen = boxes.flatten(1, 2).gather(1, index[..., None].expand(-1, -1, 4))
    labels = torch.div(index, max(1, longest), rounding_mode='floor') + 1
    return ([chosen[i, :c] for i, c in enumerate(found)], [top[i, :c] for i, c in enumerate(found)],
            [labels[i, :c] for i, c in enumerate(found)])


class BatchedRPN(RegionProposalNetwork):
    """torchvision's RPN, filtering the proposals of the whole batch at once on the GPU."""

    @classmethod
    def like(cls, rpn: RegionProposalNetwork) -> 'BatchedRPN':
        """A BatchedRPN with `rpn`'s settings and submodules (the same weights under the same names)."""
        return cls(rpn.anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold,
                   rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image,
                   rpn.fg_bg_sampler.positive_fraction, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n),
                   rpn.nms_thresh, rpn.score_thresh)

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        if batched(proposals, len(image_shapes)):
            return filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level)
        return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)


class BatchedRoIHeads(RoIHeads):
    """torchvision's box RoI heads, post-processing the detections of the whole batch at once on the GPU."""

    @classmethod
    def like(cls, heads: RoIHeads) -> 'BatchedRoIHeads':
        """BatchedRoIHeads with `heads`' settings and box submodules (the same weights under the same names)."""
        if heads.has_mask() or heads.has_keypoint():
            raise ValueError('the batched heads post-process boxes only: a mask or keypoint head has its own')
        return cls(heads.box_roi_pool, heads.box_head, heads.box_predictor, heads.proposal_matcher.high_threshold,
                   heads.proposal_matcher.low_threshold, heads.fg_bg_sampler.batch_size_per_image,
                   heads.fg_bg_sampler.positive_fraction, heads.box_coder.weights, heads.score_thresh,
                   heads.nms_thresh, heads.detections_per_img)

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        if batched(class_logits, len(image_shapes)) and not self.has_mask() and not self.has_keypoint():
            return postprocess_detections(self, class_logits, box_regression, proposals, image_shapes)
        return super().postprocess_detections(class_logits, box_regression, proposals, image_shapes)
