"""The prediction path: batch entries to network inputs, the forward pass, its rows on the host.

The adapter's predict / embed / predict_items are short calls into this module:
`split_readable` turns a batch into images (and the entries that cannot run),
`detection_rows` / `image_vectors` run them under `inference_context`, and
`utils.platform.box_collection` turns one image's rows into annotations. Two pieces are
about speed: on CUDA the adapter predicts with `inference_network(model)`
(cached by `NetworkCache`): batch norms folded into the convolutions,
channels_last, run under fp16 autocast, with anchors and box decoding kept in
fp32 (in fp16, coordinates near 1000 px are only 0.5-1 px apart, so boxes would
drift by about a pixel); on CPU the training network is used as is. And
`Prefetcher` downloads the next batches while the network runs this one.
"""
import contextlib
import copy
import dataclasses
import logging
import threading
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops.misc import FrozenBatchNorm2d

from utils.modeling.detection_outputs import detections_to_host
from utils.modeling.embeddings import fpn_embedding
from utils.data.images import ImageLimits, ImageSizeError
from utils.inference.array_images import UnsupportedImageError, to_uint8_rgb
from utils.modeling.model_factory import cudnn_autotune
from utils.modeling.network_loading import RPN_TEST_KEYS

logger = logging.getLogger(__name__)

#: Images decoded at once (downloads are not limited). torchvision's decoder itself lets go of the
#: GIL, but each decoding thread needs it back between images, and the thread driving the GPU waits
#: at every hand-over: on 2 cores, 16 decoding threads slowed a GPU-like main loop 11-13x, 2 threads
#: 1.0-1.2x (bench/decode_contention.py); on an H100 end to end, 16 threads ran at 0.77-0.83 of
#: plain's forward against 0.89-0.92 for 2 (bench/RESULTS.md).
DECODE_THREADS = 2
#: Items downloaded at once while predict_items runs ahead: waiting on the network holds no GIL (the SDK's own 16).
DOWNLOAD_THREADS = 16

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


class NetworkCache:
    """The network to predict with: on CUDA the fp16-ready copy, made once and remade only when the
    weights change (a copy costs far more than a batch); elsewhere the network itself."""

    def __init__(self):
        self._entry = (None, None, None)  # (network it was made from, its weights version, the copy)

    def get(self, model: nn.Module, device: torch.device) -> nn.Module:
        if device.type != 'cuda':
            return model
        source, version, network = self._entry
        if source is not model or version != weights_version(model):
            network = inference_network(model)
            self._entry = (model, weights_version(model), network)
        return network


@dataclasses.dataclass
class UnreadableItem:
    """Stands in a batch for an item that could not be decoded, so the rest of the batch goes on."""
    item_id: Optional[str]
    name: str
    reason: str

    def __str__(self):
        return f'{self.name} (id {self.item_id}): {self.reason}'


def to_tensor(image) -> torch.Tensor:
    """uint8 RGB CHW tensor from what a batch may hold (`utils.inference.array_images`: tensors and
    arrays in either layout, 1-4 channels, uint8 or float in [0, 1], PIL images)."""
    return to_uint8_rgb(image)


def split_readable(batch: Sequence[Any], limits: ImageLimits
                   ) -> Tuple[List[torch.Tensor], List[int], List[UnreadableItem]]:
    """The batch's decoded images (uint8 CHW), their positions, and its unreadable entries in batch order.

    None entries are skipped. An image the network's resize would squash to 0 px is refused here:
    in the forward pass it would fail the whole batch.
    """
    images, positions, unreadable = [], [], []
    for position, entry in enumerate(batch):
        if entry is None:
            continue
        if not isinstance(entry, UnreadableItem):
            try:
                image = to_tensor(entry)
                limits.check(image.shape[-1], image.shape[-2])
                images.append(image)
                positions.append(position)
                continue
            except (ImageSizeError, UnsupportedImageError) as err:  # this entry alone
                logger.error('cannot read batch entry %d: %s', position, err)
                entry = UnreadableItem(None, f'batch entry {position}', str(err))
        unreadable.append(entry)
    return images, positions, unreadable


def device_inputs(images: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """uint8 images to float [0, 1] on `device`: the network's own transform does the rest.

    On CUDA the batch travels in one copy from pinned memory, converted in one pass: a copy per
    image from pageable memory would wait for the GPU each time. Images already on the GPU stay there.
    """
    if device.type != 'cuda' or any(image.dtype != torch.uint8 or image.is_cuda for image in images):
        return [image.to(device).float().div_(255) for image in images]
    sizes = [image.numel() for image in images]
    staged = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
    torch.cat([image.reshape(-1) for image in images], out=staged)
    flat = staged.to(device, non_blocking=True).float().div_(255)
    return [part.view(image.shape) for part, image in zip(flat.split(sizes), images)]


@contextlib.contextmanager
def inference_context(device: torch.device, autotune: bool = False):
    """No autograd; fp16 on CUDA (the inference copy keeps anchors and box decoding in fp32), fp32 on CPU;
    cuDNN's per-shape autotuning when `autotune` (the `cudnn_benchmark` setting)."""
    cuda = device.type == 'cuda'
    with torch.inference_mode(), torch.autocast('cuda', dtype=torch.float16, enabled=cuda), \
            cudnn_autotune(device, autotune):
        yield


def set_postprocess(network: nn.Module, score_thresh: float, nms_thresh: float, detections_per_img: int,
                    rpn_test_counts: Sequence[Optional[int]] = (None, None)) -> None:
    """Apply the prediction settings to the network's heads before a forward pass (they may change between
    calls). `rpn_test_counts` (pre-NMS, post-NMS proposals kept at test time): None keeps the variant's own."""
    roi_heads = network.roi_heads
    roi_heads.score_thresh = float(score_thresh)
    roi_heads.nms_thresh = float(nms_thresh)
    roi_heads.detections_per_img = int(detections_per_img)
    for count, counts in zip(rpn_test_counts, (network.rpn._pre_nms_top_n, network.rpn._post_nms_top_n)):
        if count is not None:
            counts['testing'] = int(count)


def apply_settings(network: nn.Module, settings: Mapping[str, Any]) -> None:
    """`set_postprocess` with the model's settings: score and NMS thresholds, detections and proposals kept."""
    set_postprocess(network, settings['conf_threshold'], settings['nms_iou_threshold'], settings['max_detections'],
                    [settings[key] for key in RPN_TEST_KEYS])


def detection_rows(network: nn.Module, images: List[torch.Tensor], device: torch.device,
                   autotune: bool = False) -> List[list]:
    """Per image, rows [left, top, right, bottom, score, label id] clipped to the image (the network's
    `roi_heads.score_thresh`, set by `set_postprocess`, has already dropped the low scores).

    The rows of the whole batch come back to the host in one copy (`detection_outputs.detections_to_host`).
    """
    inputs = device_inputs(images, device)
    with inference_context(device, autotune):
        tables = detections_to_host(network(inputs))
    rows = []
    for image, table in zip(images, tables):
        height, width = image.shape[-2:]
        boxes = torch.minimum(table[:, :4].clamp(min=0), table.new_tensor([width, height, width, height]))
        rows.append(torch.cat([boxes, table[:, 4:]], dim=1).tolist())
    return rows


def image_vectors(network: nn.Module, images: List[torch.Tensor], device: torch.device,
                  autotune: bool = False) -> List[List[float]]:
    """One L2-normalised vector per image (`utils.modeling.embeddings.fpn_embedding`), through the same
    preprocessing and precision as `detection_rows`, so a vector describes what prediction sees."""
    with inference_context(device, autotune):
        image_list, _ = network.transform(device_inputs(images, device))
        features = network.backbone(image_list.tensors)
    pooled = fpn_embedding(features, image_list.image_sizes, tuple(image_list.tensors.shape[-2:]))
    return pooled.cpu().tolist()


class Prefetcher:
    """Runs `load(item)` in worker threads ahead of the caller, in input order.

    `take(item)` returns the loaded value of the next not-yet-taken occurrence of that
    item object and keeps `lookahead` further items loading, so while the network runs
    batch k, batch k+1 is being downloaded. Items it was not given are not its
    business: `take` returns `MISSING` and the caller loads them itself.
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
