"""Decode any image file the way a viewer shows it: EXIF orientation applied, 8-bit RGB.

Sizes are checked from the header, before decoding (`ImageLimits`): an image
over the pixel limit, or one the network's resize would squash below one pixel,
is refused with its dimensions, so one bad file never costs the batch.
"""
import contextlib
import dataclasses
import io
import math
import os
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor


from utils.core.config import DEFAULT_MAX_IMAGE_PIXELS
from utils.core.errors import InputError

try:  # deprecated since torchvision 0.29 (TorchCodec takes over; `utils.core.runtime_setup` quiets the warning);
    # without it PIL decodes every image
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a future torchvision
    decode_jpeg = None

# PIL's own bomb check is raised to the largest `max_image_pixels` allowed by `utils.core.runtime_setup.configure`;
# the configured limit (`ImageLimits`, default in utils.core.config) is applied first, from the header.


class ImageDecodeError(InputError):
    """The file is not an image PIL can fully decode (truncated, text, video...)."""


class ImageSizeError(ImageDecodeError):
    """The image's size is refused before decoding; `reason` is a short counter key."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Which image sizes the adapter takes: at most `max_pixels`, and (with the network's
    resize sizes) a short side that stays at least one pixel after that resize."""
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    min_size: Optional[int] = None  # the network's resize: short side to min_size...
    max_size: Optional[int] = None  # ...unless the long side would pass max_size

    def check(self, width: int, height: int) -> None:
        """Raise ImageSizeError naming the dimensions when the image is refused."""
        if width * height > self.max_pixels:
            raise ImageSizeError(f'image is {width}x{height} = {width * height:,} pixels, over the limit of '
                                 f'{self.max_pixels:,} (configuration key max_image_pixels)', 'image too large')
        if self.min_size and self.max_size:
            # torchvision's GeneralizedRCNNTransform: one scale for both sides, then
            # interpolate floors each side; a side of 0 px fails the whole batch.
            short, long = sorted((int(width), int(height)))
            scale = min(self.min_size / short, self.max_size / long)
            if math.floor(float(short) * scale) < 1:
                raise ImageSizeError(
                    f'image is {width}x{height}: the network resizes it by {scale:.3g} (short side to '
                    f'{self.min_size}, long side at most {self.max_size}), which leaves its short side '
                    f'{short * scale:.2f} px, under one pixel', 'image too thin for the network')


def network_limits(model, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageLimits:
    """ImageLimits for a torchvision detection `model`, read from its own resize transform.

    Training draws the short side from `min_size` when it holds several; the smallest is the binding one.
    """
    transform = model.transform
    return ImageLimits(int(max_pixels), int(min(transform.min_size)), int(transform.max_size))


def to_rgb8(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (1, L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB."""
    if image.mode == 'RGB':
        return image
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
        # 16-bit / 32-bit single channel: scale by the actual range so the picture is visible.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        array = ((array - low) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(array, mode='L').convert('RGB')
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        # Composite transparency on white, as viewers do.
        rgba = image.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return image.convert('RGB')


def load_image(source: Union[str, os.PathLike, bytes, io.IOBase],
               limits: Optional[ImageLimits] = None) -> Image.Image:
    """Open a path, bytes or file object and return a fully decoded 8-bit RGB image.

    Raises ImageDecodeError with the reason when the data is not a decodable image,
    and ImageSizeError (one of those) when `limits` (default: the pixel limit only)
    refuse its size, read from the header before anything is decoded.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    limits = limits or ImageLimits()
    with _decode_errors(), Image.open(source) as image:
        # the stored size: both rules hold under rotation, and reading EXIF can decode (PNG)
        limits.check(*image.size)
        return _displayed_rgb(image)


def _displayed_rgb(image: Image.Image) -> Image.Image:
    """An opened image fully decoded, EXIF orientation applied, as 8-bit RGB."""
    image.load()  # force full decode: a truncated file fails here, not later
    image = ImageOps.exif_transpose(image)
    if image.mode == 'RGB':
        return image.copy()
    return to_rgb8(image)


def load_image_tensor(source: Union[str, os.PathLike, bytes, io.IOBase],
                      limits: Optional[ImageLimits] = None) -> torch.Tensor:
    """`load_image` as a uint8 CHW tensor, the same pixels, the same errors.

    A JPEG is decoded by torchvision (libjpeg-turbo, EXIF orientation applied), which holds
    Python's GIL for a fraction of the time PIL's decode and copies do (bench/decode_contention.py),
    and is faster. Anything else, and a JPEG torchvision refuses (truncated, say), goes
    through PIL, which names the problem.
    """
    data = _read_bytes(source)
    limits = limits or ImageLimits()
    with _decode_errors(), Image.open(io.BytesIO(data)) as image:  # the header only, until decoded
        limits.check(*image.size)
        if image.format == 'JPEG' and decode_jpeg is not None:
            try:
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                   apply_exif_orientation=True)
            except RuntimeError:
                pass
        return pil_to_tensor(_displayed_rgb(image))


def _read_bytes(source: Union[str, os.PathLike, bytes, io.IOBase]) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        with open(source, 'rb') as f:
            return f.read()
    return source.read()


@contextlib.contextmanager
def _decode_errors():
    """What PIL raises on data it cannot decode, as ImageDecodeError (ImageSizeError goes through)."""
    try:
        yield
    except ImageSizeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f'not a decodable image: {err}') from err


def image_size(path: Union[str, os.PathLike], limits: Optional[ImageLimits] = None) -> tuple:
    """(width, height) as displayed, i.e. after EXIF orientation; reads only the header.

    Raises ImageSizeError when `limits` (default: the pixel limit only) refuse the
    size, before EXIF is read (for a PNG without EXIF up front, PIL decodes to look for it).
    """
    limits = limits or ImageLimits()
    with _decode_errors(), Image.open(path) as image:
        width, height = image.size
        limits.check(width, height)
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            width, height = height, width
        return width, height
