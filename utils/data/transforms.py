"""Paired image + target transforms for detection training.

Every transform takes and returns ``(image, target)`` so that geometric changes
to the image move the boxes with it. Images may be PIL images or ``[C, H, W]``
tensors; targets are dicts holding at least ``boxes`` (float ``[N, 4]``, xyxy in
pixels) and are never modified in place.

`get_transform(train, settings)` builds the pipeline from the adapter's settings:
``augment_photometric`` / ``augment_hflip`` / ``augment_vflip`` switch each
augmentation (training only); evaluation only converts to a float tensor.
"""
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision.transforms import functional as F

from utils.core.config import resolve

logger = logging.getLogger(__name__)

Target = Dict[str, Any]


def loaded_size(image) -> Tuple[int, int]:
    """(width, height) of a PIL image or a ``[..., H, W]`` tensor."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    raise TypeError(f'expected a PIL image or a tensor, got {type(image).__name__}')


def _copy_target(target: Optional[Target]) -> Optional[Target]:
    return None if target is None else dict(target)


class Compose:
    """Apply transforms in order, each to the (image, target) pair."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target: Optional[Target] = None):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ', '.join(repr(t) for t in self.transforms)
        return f'{type(self).__name__}([{inner}])'


class PILToTensor:
    """PIL image -> uint8 ``[C, H, W]`` tensor; tensors pass through."""

    def __call__(self, image, target: Optional[Target] = None):
        if isinstance(image, Image.Image):
            image = F.pil_to_tensor(image)
        return image, target

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


class ConvertImageDtype:
    """Convert the image tensor's dtype, rescaling values (uint8 0..255 -> float 0..1)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype

    def __call__(self, image, target: Optional[Target] = None):
        return F.convert_image_dtype(image, self.dtype), target

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.dtype})'


class _RandomFlip:
    """Mirror the image with probability `p`; boxes follow along the flipped axis: a1' = S - a2, a2' = S - a1.

    Subclasses set `flip` (the image function), `coords` (the box coordinates on
    that axis) and `size_index` (0: width, 1: height).
    """

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image, target: Optional[Target] = None):
        if torch.rand(1).item() >= self.p:
            return image, target
        side = loaded_size(image)[self.size_index]
        image = self.flip(image)
        target = _copy_target(target)
        if target is not None and 'boxes' in target:
            boxes = target['boxes'].clone()
            boxes[:, self.coords] = side - target['boxes'][:, self.coords[::-1]]
            target['boxes'] = boxes
        return image, target

    def __repr__(self) -> str:
        return f'{type(self).__name__}(p={self.p})'


class RandomHorizontalFlip(_RandomFlip):
    """Mirror left-right with probability `p`; boxes follow: x1' = W - x2, x2' = W - x1."""
    flip = staticmethod(F.hflip)
    coords = [0, 2]
    size_index = 0


class RandomVerticalFlip(_RandomFlip):
    """Mirror top-bottom with probability `p`; boxes follow: y1' = H - y2, y2' = H - y1."""
    flip = staticmethod(F.vflip)
    coords = [1, 3]
    size_index = 1


class RandomPhotometricDistort:
    """Random brightness, contrast, saturation, hue and (rarely) channel order; boxes unchanged.

    Each change is applied with probability `p`, contrast either before or after
    the colour changes, as in SSD-style photometric distortion.
    """

    def __init__(self, brightness: Tuple[float, float] = (0.875, 1.125),
                 contrast: Tuple[float, float] = (0.5, 1.5),
                 saturation: Tuple[float, float] = (0.5, 1.5),
                 hue: Tuple[float, float] = (-0.05, 0.05), p: float = 0.5,
                 channel_shuffle_p: float = 0.0):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.p = float(p)
        self.channel_shuffle_p = float(channel_shuffle_p)

    @staticmethod
    def _uniform(bounds: Tuple[float, float]) -> float:
        low, high = bounds
        return float(torch.empty(1).uniform_(low, high).item())

    def __call__(self, image, target: Optional[Target] = None):
        draws = torch.rand(7).tolist()
        if draws[0] < self.p:
            image = F.adjust_brightness(image, self._uniform(self.brightness))
        contrast_first = draws[1] < 0.5
        if contrast_first and draws[2] < self.p:
            image = F.adjust_contrast(image, self._uniform(self.contrast))
        if draws[3] < self.p:
            image = F.adjust_saturation(image, self._uniform(self.saturation))
        if draws[4] < self.p:
            image = F.adjust_hue(image, self._uniform(self.hue))
        if not contrast_first and draws[5] < self.p:
            image = F.adjust_contrast(image, self._uniform(self.contrast))
        if draws[6] < self.channel_shuffle_p:
            was_pil = isinstance(image, Image.Image)
            tensor = F.pil_to_tensor(image) if was_pil else image
            tensor = tensor[torch.randperm(tensor.shape[-3])]
            image = F.to_pil_image(tensor) if was_pil else tensor
        return image, target

    def __repr__(self) -> str:
        return f'{type(self).__name__}(p={self.p})'


def get_transform(train: bool, settings: Optional[Mapping[str, Any]] = None) -> Compose:
    """The pipeline for training (`train=True`: augmentations as switched on) or evaluation.

    `settings`: the adapter's `Settings` (`utils.core.config.resolve`), or a dict of some keys over
    the defaults (horizontal flip on, vertical flip and photometric distortion off).
    """
    settings = resolve(settings)
    steps: List[Callable] = []
    if train:
        if settings['augment_photometric']:
            steps.append(RandomPhotometricDistort())
        if settings['augment_hflip']:
            steps.append(RandomHorizontalFlip(0.5))
        if settings['augment_vflip']:
            steps.append(RandomVerticalFlip(0.5))
    steps += [PILToTensor(), ConvertImageDtype(torch.float32)]
    return Compose(steps)
