"""Which files count as images, by extension: PIL's registry alone, so a path check needs no torch."""
import functools

from PIL import Image


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset:
    """Lower-case file extensions (with the dot) that PIL can open: what counts as an image file."""
    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())
