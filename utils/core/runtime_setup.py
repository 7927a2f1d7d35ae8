"""The process-wide set-up the adapter needs, done when asked, never on import.

Importing a module of this package changes nothing global, so a program that only imports one
(a notebook, another adapter in the same process) keeps its own tqdm, warnings and PIL limits.
The adapter's constructor and the local runner's entry call `configure()`; it is idempotent.
"""
import sys
import threading
import warnings

_lock = threading.Lock()
_images_configured = False

# torchvision 0.29 deprecates its image decoding (TorchCodec takes over) and says so at every decode,
# which dtlpy shows; the deprecation is this project's to track (utils.data.images), not the user's
TORCHVISION_DECODE_DEPRECATION = 'The image decoding and encoding capabilities of TorchVision are deprecated'
SDK_ADAPTER_MODULE = 'dtlpy.ml.base_model_adapter'


def configure() -> None:
    """Hide torchvision's decoding deprecation and raise PIL's own bomb limit to the largest `max_image_pixels`
    allowed (the configured limit is checked first, from the header); once dtlpy is imported, route its
    predict/embed tqdm bars through `utils.core.progress` (bounded log lines in a service log)."""
    global _images_configured
    with _lock:
        if not _images_configured:
            from PIL import Image

            from utils.core.config import MAX_IMAGE_PIXELS_CEILING
            warnings.filterwarnings('ignore', message=TORCHVISION_DECODE_DEPRECATION, category=DeprecationWarning)
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS_CEILING
            _images_configured = True
        sdk_adapter = sys.modules.get(SDK_ADAPTER_MODULE)
        if sdk_adapter is not None:  # the local runner's commands may never load the SDK: no need to import it
            from utils.core.progress import route_sdk_bars
            route_sdk_bars(sdk_adapter)  # idempotent; the SDK offers no switch for its bars
