"""Build torchvision Faster R-CNN variants: COCO weights, a fresh box predictor, padding buckets, cuDNN autotuning.

Checkpoint files (writing, loading, validating them) are `utils.modeling.checkpoints`."""
import contextlib
import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torchvision
from torchvision.models import detection
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from utils.core import tested_versions
from utils.core.config import VARIANTS
from utils.core.errors import InputError
from utils.modeling.batched_postprocess import BatchedRoIHeads, BatchedRPN, host_table

logger = logging.getLogger(__name__)

# the variants the configuration offers (`utils.core.config.VARIANTS`: their one list), each as torchvision's
# builder and its weights enum, looked up in torchvision's model registry by the builder's name
BUILDERS = {variant: (torchvision.models.get_model_builder(variant), torchvision.models.get_model_weights(variant))
            for variant in VARIANTS}


def coco_id_to_label_map() -> Dict[int, str]:
    """COCO's 91-slot category ids (1..90 with gaps) as torchvision's COCO heads use them."""
    categories = detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta['categories']
    return {i: name for i, name in enumerate(categories) if i > 0 and name != 'N/A'}


def num_classes_for(id_to_label_map: Mapping[int, str]) -> int:
    """Class count of the network: background slot 0 plus the highest label id."""
    if not id_to_label_map:
        raise InputError('the model has no labels: set the model\'s labels or id_to_label_map')
    return max(int(i) for i in id_to_label_map) + 1


def build_model(variant: str, num_classes: int, min_size: Optional[int] = None, max_size: Optional[int] = None,
                coco_weights: bool = False, keep_coco_head: bool = False, padding_bucket: int = 32,
                batched_postprocess: bool = True, **options: Any) -> torch.nn.Module:
    """Faster R-CNN of `variant` with `num_classes` outputs (background included).

    `min_size` / `max_size` None keep the builder's own input size (800 / 1333, or
    320 / 640 for the 320 variant), as torchvision's builders do.
    With `coco_weights`, torchvision's COCO checkpoint is loaded through its Weights
    API (so a copy cached under TORCH_HOME is used, no download when present); the
    box predictor is then replaced for `num_classes` unless `keep_coco_head`.
    `padding_bucket` > 32 pads batches to `BucketedTransform`'s coarser grid.
    `batched_postprocess`: on CUDA, the RPN and RoI heads post-process the whole batch at once
    (`utils.modeling.batched_postprocess`: same results, far fewer host syncs); False: torchvision's as is.
    `options` are further FasterRCNN keyword arguments (e.g. rpn_post_nms_top_n_train).
    """
    builder, weights_enum = BUILDERS[variant]
    sizes = {key: value for key, value in (('min_size', min_size), ('max_size', max_size)) if value is not None}
    sizes.update(options)
    if not coco_weights:
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **sizes)
    else:
        model = builder(weights=weights_enum.COCO_V1, **sizes)
        if not keep_coco_head:
            replace_box_predictor(model, num_classes)
    if padding_bucket > model.transform.size_divisible:
        model.transform = BucketedTransform(model.transform, padding_bucket)
    if batched_postprocess and batched_heads_tested():
        model.rpn = BatchedRPN.like(model.rpn)
        model.roi_heads = BatchedRoIHeads.like(model.roi_heads)
    return model


def batched_heads_tested() -> bool:
    """Whether the batched heads were tested on this torchvision (they subclass its RPN and RoI heads);
    if not, the network keeps torchvision's own heads, and one warning says so."""
    version = torchvision.__version__
    if tested_versions.within(version, tested_versions.TORCHVISION_TESTED):
        return True
    logger.warning('torchvision %s is outside the releases the batched post-processing was tested on (%s): '
                   'the network keeps torchvision\'s own RPN and RoI heads (same results, more host syncs on a GPU)',
                   version, tested_versions.range_text(tested_versions.TORCHVISION_TESTED))
    return False


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def bucketed_side(side: int, anchor: int, step: int, cap: int) -> int:
    """The smallest value >= `side` on the grid `anchor + k * step` (k any integer), at most `cap`.

    The grid is anchored at the network's `min_size`: most images are resized so one side is
    exactly `min_size`, and that side then pays no padding at all.
    """
    if side <= anchor:
        value = anchor - ((anchor - side) // step) * step
    else:
        value = anchor + _round_up(side - anchor, step)
    return max(side, min(value, cap))


@contextlib.contextmanager
def cudnn_autotune(device: torch.device, asked: bool):
    """cuDNN's per-shape autotuning (`cudnn.benchmark`) on inside the block on CUDA when `asked` (the
    `cudnn_benchmark` setting; left as it was otherwise), for training epochs and prediction alike.

    Autotuning trials every convolution's kernels once per new input shape: on an H100
    (torch 2.11) 12-17 s per shape for resnet50_fpn at 800 px, then about 14 % saved a
    step. Mixed sizes meet many shapes in epoch 1, so it is off by default; a long run on
    images of one size gains from turning it on (bench/RESULTS.md has the figures).
    """
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=(device.type == 'cuda' and bool(asked)) or cudnn.benchmark,
                     deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32):
        yield


class BucketedTransform(GeneralizedRCNNTransform):
    """torchvision's transform, padding each batch to a coarse grid of sizes instead of the next 32 px.

    With images of many sizes, padding to 32 px makes nearly every batch a new input
    shape, and every new shape pays again for cuDNN's autotuning (`cudnn.benchmark`)
    and for fresh blocks from the CUDA allocator. Rounding the padded height and
    width up to `min_size + k * padding_bucket` (capped at `max_size`) leaves a handful
    of shapes per orientation. GPU only: CPU batches get torchvision's padding. Padding is zeros after normalisation and lies outside
    every image's `image_sizes`, so proposals and detections are clipped to the real
    image as before; only features near the bottom/right edge see a little more zero
    context, as with any batch padding.
    """

    def __init__(self, transform: GeneralizedRCNNTransform, padding_bucket: int):
        super().__init__(transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
                         size_divisible=transform.size_divisible, fixed_size=transform.fixed_size,
                         _skip_resize=transform._skip_resize)
        if padding_bucket % transform.size_divisible:
            raise ValueError(f'padding_bucket must be a multiple of {transform.size_divisible}, got {padding_bucket}')
        self.padding_bucket = int(padding_bucket)

    def padded_size(self, height: int, width: int, size_divisible: int) -> List[int]:
        """The padded (height, width) of a batch whose largest image is height x width."""
        anchor = _round_up(max(self.min_size), size_divisible)
        cap = max(anchor, _round_up(self.max_size, size_divisible))
        return [bucketed_side(_round_up(side, size_divisible), anchor, self.padding_bucket, cap)
                for side in (height, width)]

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """torchvision's normalisation, with the mean and std kept on the device: torchvision copies them
        there for every image, and each such copy from pageable memory waits for the GPU."""
        if not image.is_floating_point():
            return super().normalize(image)  # its error message
        key = (image.dtype, image.device)
        if getattr(self, '_statistics', (None,))[0] != key:
            self._statistics = (key,) + tuple(torch.as_tensor(values, dtype=image.dtype, device=image.device)
                                              [:, None, None] for values in (self.image_mean, self.image_std))
        _, mean, std = self._statistics
        return (image - mean) / std

    def postprocess(self, result, image_shapes, original_image_sizes):
        """torchvision's postprocess (boxes back to the original image sizes), the ratios computed on the
        host in fp32 as torchvision computes them on the device, and sent there in one copy."""
        if self.training or torchvision._is_tracing() or not result or any(
                set(r) - {'boxes', 'scores', 'labels'} or r['boxes'].dtype != torch.float32 for r in result):
            return super().postprocess(result, image_shapes, original_image_sizes)
        ratios = []
        for (height, width), (new_height, new_width) in zip(image_shapes, original_image_sizes):
            across = float(np.float32(new_width) / np.float32(width))
            down = float(np.float32(new_height) / np.float32(height))
            ratios.append([across, down, across, down])
        ratios = host_table(ratios, result[0]['boxes'])
        for detections, ratio in zip(result, ratios):
            detections['boxes'] = detections['boxes'] * ratio
        return result

    def batch_images(self, images: List[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        # ONNX export takes torchvision's traceable path; on the CPU there is no autotuner to feed and
        # extra padding is only extra work, so CPU batches are padded exactly as torchvision does
        if torchvision._is_tracing() or images[0].device.type != 'cuda':
            return super().batch_images(images, size_divisible)
        return self.pad(images, size_divisible)

    def pad(self, images: List[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        """The batch, zero-padded to `padded_size`, images in the top-left corner."""
        channels = max(image.shape[0] for image in images)
        height, width = self.padded_size(max(image.shape[1] for image in images),
                                         max(image.shape[2] for image in images), size_divisible)
        batched = images[0].new_zeros((len(images), channels, height, width))
        for slot, image in zip(batched, images):
            slot[:image.shape[0], :image.shape[1], :image.shape[2]].copy_(image)
        return batched


def replace_box_predictor(model: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    """A fresh classification/regression layer for `num_classes`; backbone, RPN and box head stay."""
    predictor = model.roi_heads.box_predictor
    if predictor.cls_score.out_features != num_classes:
        in_features = predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes).to(predictor.cls_score.weight.device)
    return model


def input_sizes(model: torch.nn.Module) -> Tuple[int, int]:
    """(min_size, max_size) the network resizes its inputs to."""
    transform = model.transform
    min_size = transform.min_size[-1] if isinstance(transform.min_size, (tuple, list)) else transform.min_size
    return int(min_size), int(transform.max_size)
