"""What a caller hands `adapter.predict` as one image, as the uint8 RGB CHW tensor the network path takes.

Callers pass what torchvision and numpy code hold: uint8 CHW tensors (the adapter's own decode),
float CHW tensors in [0, 1] (torchvision's `to_tensor`, `ToDtype(scale=True)`), HxWxC numpy arrays,
CHW numpy arrays, PIL images, a single image with a batch axis of 1. The rules:

- layout: a tensor is CHW unless only its last axis can be channels (1-4 long); a numpy array is HWC
  unless only its first axis can be. A leading axis of 1 more (1xCxHxW) is dropped.
- channels: 1 (grey) is repeated to RGB; 2 (grey + alpha) and 4 (RGBA) are composited on white,
  as `utils.data.images` does for files with transparency, so an array and the file it was read
  from give the same picture; 3 is RGB.
- values: integers must lie in 0..255; floats all in [0, 1] are scaled by 255 (never divided by 255
  twice: a float image in [0, 1] does not become a black picture), floats up to 255 are pixel values
  already; NaN, infinities, negatives and larger values are refused.

Anything else (a string, an object array, a batch of several images, a 1-D or 5-D array, an empty one)
is an `UnsupportedImageError` naming what was given: `split_readable` refuses that entry alone.
"""
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from utils.core.errors import InputError
from utils.data.images import to_rgb8


class UnsupportedImageError(InputError):
    """One batch entry is not an image the adapter can read; the message says what it is."""


def _describe(entry: Any) -> str:
    shape = getattr(entry, 'shape', None)
    dtype = getattr(entry, 'dtype', None)
    if shape is not None:
        return f'a {type(entry).__name__} of shape {tuple(shape)} and dtype {dtype}'
    return f'a {type(entry).__name__}'


def _as_tensor(entry: Any) -> torch.Tensor:
    """A numeric tensor from a tensor or an array-like, still in the caller's layout."""
    if isinstance(entry, torch.Tensor):
        if entry.dtype == torch.bool or entry.is_complex():
            raise UnsupportedImageError(f'{_describe(entry)} is not an image (a mask or complex values)')
        return entry.detach()
    if isinstance(entry, (str, bytes, bytearray, dict)) or entry is None:
        raise UnsupportedImageError(f'{_describe(entry)} is not an image: pass a decoded array, tensor or PIL image')
    try:
        array = np.asarray(entry)
    except (ValueError, TypeError) as err:  # ragged nested lists
        raise UnsupportedImageError(f'{_describe(entry)} is not an image array: {err}') from None
    if array.dtype.kind not in 'iuf':
        raise UnsupportedImageError(f'{_describe(array)} is not an image: pixel values are numbers '
                                    f'(a bool array is a mask)')
    if array.dtype.kind == 'f' and not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder('='))
    elif array.dtype.kind in 'iu' and array.dtype != np.uint8:  # torch takes few other integer types
        array = array.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(array))


def _channels_first(image: torch.Tensor, numpy_layout: bool, described: str) -> torch.Tensor:
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() == 2:
        return image.unsqueeze(0)
    if image.dim() != 3:
        raise UnsupportedImageError(f'{described}: an image has 2 or 3 axes (HxW, CxHxW or HxWxC); '
                                    f'pass a batch of images as separate entries')
    if 0 in image.shape:
        raise UnsupportedImageError(f'{described} is empty')
    first, last = image.shape[0] <= 4, image.shape[-1] <= 4
    if first and last:
        channels_last = numpy_layout
    elif first or last:
        channels_last = last
    else:
        raise UnsupportedImageError(f'{described}: neither its first nor its last axis has 1 to 4 channels')
    return image.permute(2, 0, 1) if channels_last else image


def _to_unit_range(image: torch.Tensor, described: str) -> torch.Tensor:
    """float32 values in [0, 1] (the scale rules of the module's doc)."""
    if image.is_floating_point():
        image = image.float()
        if not bool(torch.isfinite(image).all()):
            raise UnsupportedImageError(f'{described} holds NaN or infinite values')
        low, high = float(image.min()), float(image.max())
        scale = 1.0 if high <= 1.0 else 255.0
    else:
        low, high = int(image.min()), int(image.max())
        scale = 255.0
    if low < 0 or high > 255:
        raise UnsupportedImageError(f'{described} has values from {low:g} to {high:g}: pixel values must be '
                                    f'0..255, or floats in [0, 1]')
    return image.float() / scale if scale != 1.0 else image


def _rgb(image: torch.Tensor, described: str) -> torch.Tensor:
    """1-4 channels in [0, 1] -> 3, transparency composited on white."""
    channels = image.shape[0]
    if channels == 1:
        return image.expand(3, -1, -1)
    if channels == 3:
        return image
    if channels in (2, 4):
        colour, alpha = (image[:1].expand(3, -1, -1), image[1:2]) if channels == 2 else (image[:3], image[3:4])
        return colour * alpha + (1.0 - alpha)
    raise UnsupportedImageError(f'{described} has {channels} channels: 1 (grey), 2 (grey + alpha), 3 (RGB) '
                                f'or 4 (RGBA) are taken')


def to_uint8_rgb(entry: Any) -> torch.Tensor:
    """uint8 3xHxW tensor (on the entry's device) of one image; UnsupportedImageError when it is none."""
    if isinstance(entry, Image.Image):  # any mode: 16-bit, palette, transparency as a decoded file's
        return pil_to_tensor(to_rgb8(entry))
    described = _describe(entry)
    image = _channels_first(_as_tensor(entry), not isinstance(entry, torch.Tensor), described)
    if image.dtype == torch.uint8 and image.shape[0] == 3:
        return image  # the adapter's own decode: no copy
    if image.shape[0] not in (1, 2, 3, 4):
        raise UnsupportedImageError(f'{described} has {image.shape[0]} channels: 1 (grey), 2 (grey + alpha), '
                                    f'3 (RGB) or 4 (RGBA) are taken')
    if image.dtype == torch.uint8 and image.shape[0] == 1:
        return image.expand(3, -1, -1).contiguous()
    rgb = _rgb(_to_unit_range(image, described), described)
    return (rgb * 255.0).round_().clamp_(0, 255).to(torch.uint8)
