"""Decode any image file the way a viewer shows it: EXIF orientation applied, 8-bit RGB."""
import functools
import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from utils.errors import InputError

# Refuse decompression bombs but allow large aerial/medical images.
Image.MAX_IMAGE_PIXELS = 400_000_000


class ImageDecodeError(InputError):
    """The file is not an image PIL can fully decode (truncated, text, video...)."""


def _to_rgb8(image: Image.Image) -> Image.Image:
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


def load_image(source: Union[str, os.PathLike, bytes, io.IOBase]) -> Image.Image:
    """Open a path, bytes or file object and return a fully decoded 8-bit RGB image.

    Raises ImageDecodeError with the reason when the data is not a decodable image.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as image:
            image.load()  # force full decode: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)
            if image.mode == 'RGB':
                return image.copy()
            return _to_rgb8(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f'not a decodable image: {err}') from err


def image_size(path: Union[str, os.PathLike]) -> tuple:
    """(width, height) as displayed, i.e. after EXIF orientation; reads only the header."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f'not a decodable image: {err}') from err
    if orientation in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
        width, height = height, width
    return width, height


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset:
    """Lower-case file extensions (with the dot) that PIL can open: what counts as an image file."""
    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())
