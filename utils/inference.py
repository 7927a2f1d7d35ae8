"""Fast prediction pieces: a GPU copy of the network for fp16 inference, and decoding ahead of the GPU.

On CUDA the adapter predicts with `inference_network(model)`: batch norms folded into
the convolutions, channels_last, run under fp16 autocast, with anchors and box
decoding kept in fp32 (in fp16, coordinates near 1000 px are only 0.5-1 px apart,
so boxes would drift by about a pixel). On CPU the training network is used as is.
"""
import copy
import logging
import threading
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Deque, Dict, List, Sequence

import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops.misc import FrozenBatchNorm2d

logger = logging.getLogger(__name__)

_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _fold_into(conv: nn.Conv2d, norm: nn.Module) -> None:
    """conv(x) * scale + shift == conv'(x): scale the conv's filters, fold the shift into its bias."""
    eps = getattr(norm, 'eps', 1e-5)
    weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    scale = weight / torch.sqrt(norm.running_var + eps)
    shift = bias - norm.running_mean * scale
    with torch.no_grad():
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        if conv.bias is None:
            conv.bias = nn.Parameter(shift.clone())
        else:
            conv.bias.mul_(scale).add_(shift)


def _conv_norm_pairs(parent: nn.Module):
    """(conv name, norm name) pairs that run back to back: neighbours in a Sequential, convK/bnK in a block."""
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
        names = list(children)
        return [(a, b) for a, b in zip(names, names[1:])]
    return [(name, 'bn' + name[4:]) for name in children if name.startswith('conv') and 'bn' + name[4:] in children]


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every eval-mode batch norm that directly follows a convolution into it; returns how many.

    Under fp16 autocast a FrozenBatchNorm2d multiplies fp16 activations by fp32 buffers, so
    each one writes its output in fp32 and the next conv casts it back: folded, both passes go.
    """
    folded = 0
    for parent in list(model.modules()):
        for conv_name, norm_name in _conv_norm_pairs(parent):
            conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
            if isinstance(conv, nn.Conv2d) and isinstance(norm, _NORMS) and not norm.training \
                    and norm.running_var is not None and conv.out_channels == norm.running_var.numel():
                _fold_into(conv, norm)
                setattr(parent, norm_name, nn.Identity())
                folded += 1
    return folded


class Float32BoxCoder(BoxCoder):
    """Decodes boxes in fp32 whatever the regression head's dtype (fp16 under autocast)."""

    def __init__(self, coder: BoxCoder):
        super().__init__(coder.weights, coder.bbox_xform_clip)

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return super().decode_single(rel_codes.float(), boxes.float())


class Float32Anchors(nn.Module):
    """torchvision's AnchorGenerator takes its dtype from the feature maps: give it fp32 stand-ins of their shape."""

    def __init__(self, anchor_generator: nn.Module):
        super().__init__()
        self.anchor_generator = anchor_generator

    def forward(self, image_list, feature_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        shapes = [torch.empty((0, 0) + tuple(f.shape[-2:]), dtype=torch.float32, device=f.device)
                  for f in feature_maps]
        return self.anchor_generator(image_list, shapes)


def inference_network(model: nn.Module) -> nn.Module:
    """An eval-mode copy for fp16 prediction on the GPU (see the module docstring); `model` is untouched."""
    network = copy.deepcopy(model).eval()
    folded = fold_batch_norms(network)
    network.rpn.anchor_generator = Float32Anchors(network.rpn.anchor_generator)
    network.rpn.box_coder = Float32BoxCoder(network.rpn.box_coder)
    network.roi_heads.box_coder = Float32BoxCoder(network.roi_heads.box_coder)
    network.backbone.to(memory_format=torch.channels_last)
    logger.debug('inference network: %d batch norms folded, channels_last backbone', folded)
    return network


def weights_version(model: nn.Module) -> int:
    """Changes whenever a parameter or buffer is modified in place (optimizer step, load_state_dict)."""
    return sum(t._version for t in model.parameters()) + sum(t._version for t in model.buffers())


class Prefetcher:
    """Runs `load(item)` in worker threads ahead of the caller, in input order.

    `take(item)` returns the loaded value of the next not-yet-taken occurrence of that
    item object and keeps `lookahead` further items loading, so while the network runs
    batch k, batch k+1 is being downloaded and decoded. Items it was not given are
    not its business: `take` returns `MISSING` and the caller loads them itself.
    """
    MISSING = object()

    def __init__(self, load: Callable[[Any], Any], items: Sequence[Any], lookahead: int, workers: int):
        self._load = load
        self._items = list(items)
        self._lookahead = max(1, int(lookahead))
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix='prefetch')
        self._futures: Dict[int, Future] = {}
        self._pending: Dict[int, Deque[int]] = defaultdict(deque)
        for position, item in enumerate(self._items):
            self._pending[id(item)].append(position)
        self._submitted = 0
        self._lock = threading.Lock()
        with self._lock:
            self._submit_until(self._lookahead)

    def _submit_until(self, end: int) -> None:
        while self._submitted < min(end, len(self._items)):
            self._futures[self._submitted] = self._pool.submit(self._load, self._items[self._submitted])
            self._submitted += 1

    def take(self, item: Any) -> Any:
        with self._lock:
            positions = self._pending.get(id(item))
            if not positions:
                return self.MISSING
            position = positions.popleft()
            self._submit_until(position + 1 + self._lookahead)
            future = self._futures.pop(position)
        return future.result()

    def close(self) -> None:
        """Drop what nobody took (the caller stopped early) and release the threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()
