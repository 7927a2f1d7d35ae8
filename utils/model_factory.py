"""Build torchvision Faster R-CNN variants and (de)serialize adapter checkpoints."""
import collections
import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torchvision
from torchvision.models import detection
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from utils.atomic import atomic_write
from utils.errors import InputError
from utils.label_map import parse_id_to_label

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 'fasterrcnn-dataloop/1'

BUILDERS = {
    'fasterrcnn_resnet50_fpn': (detection.fasterrcnn_resnet50_fpn, detection.FasterRCNN_ResNet50_FPN_Weights),
    'fasterrcnn_resnet50_fpn_v2': (detection.fasterrcnn_resnet50_fpn_v2, detection.FasterRCNN_ResNet50_FPN_V2_Weights),
    'fasterrcnn_mobilenet_v3_large_fpn': (detection.fasterrcnn_mobilenet_v3_large_fpn,
                                          detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights),
    'fasterrcnn_mobilenet_v3_large_320_fpn': (detection.fasterrcnn_mobilenet_v3_large_320_fpn,
                                              detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights),
}


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
                **options: Any) -> torch.nn.Module:
    """Faster R-CNN of `variant` with `num_classes` outputs (background included).

    `min_size` / `max_size` None keep the builder's own input size (800 / 1333, or
    320 / 640 for the 320 variant), as torchvision's builders do.
    With `coco_weights`, torchvision's COCO checkpoint is loaded through its Weights
    API (so a copy cached under TORCH_HOME is used, no download when present); the
    box predictor is then replaced for `num_classes` unless `keep_coco_head`.
    `padding_bucket` > 32 pads batches to `BucketedTransform`'s coarser grid.
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
    return model


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


def make_checkpoint(model: torch.nn.Module, variant: str, id_to_label_map: Mapping[int, str],
                    min_size: Optional[int] = None, max_size: Optional[int] = None, **extra: Any) -> Dict[str, Any]:
    """Everything needed to rebuild the network without the platform: weights, variant, labels, sizes.

    The sizes recorded are the network's own unless given.
    """
    own_min, own_max = input_sizes(model)
    return {
        'format': CHECKPOINT_FORMAT,
        'model_variant': variant,
        'num_classes': num_classes_for(id_to_label_map),
        'id_to_label_map': parse_id_to_label(id_to_label_map),
        'min_size': int(own_min if min_size is None else min_size),
        'max_size': int(own_max if max_size is None else max_size),
        'state_dict': {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def save_checkpoint(payload: Mapping[str, Any], path: str) -> str:
    """Write atomically and to disk: a crash or preemption mid-write never leaves a half file at `path`."""
    with atomic_write(path, 'wb', fsync=True) as f:
        torch.save(dict(payload), f)
    return path


def load_checkpoint(path: str, map_location: Optional[str] = 'cpu') -> Dict[str, Any]:
    """Load with `weights_only=True`: a checkpoint carrying code to execute is refused."""
    # MultiStepLR keeps its milestones in a Counter: allow that one plain container.
    with torch.serialization.safe_globals([collections.Counter]):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:
            raise InputError(f'refusing to load checkpoint {path!r}: it is not a plain weights file '
                             f'(only tensors and plain containers are accepted): {err}') from err


def check_compatible(checkpoint: Mapping[str, Any], path: str, variant: str, num_classes: int) -> None:
    """Fail with both sides named when a checkpoint cannot fill this network."""
    ckpt_variant = checkpoint.get('model_variant', variant)
    ckpt_classes = checkpoint.get('num_classes')
    if ckpt_classes is None:
        weight = checkpoint['state_dict'].get('roi_heads.box_predictor.cls_score.weight')
        ckpt_classes = int(weight.shape[0]) if weight is not None else num_classes
    if ckpt_variant != variant or ckpt_classes != num_classes:
        raise InputError(
            f'checkpoint {path!r} holds {ckpt_variant!r} with {ckpt_classes} classes, but the model is '
            f'configured as {variant!r} with {num_classes} classes (labels + background): '
            f'fix model_variant / the label map, or remove weights_filename to start from pretrained weights')
