"""Platform items into what `predict` and `embed` take: a decoded image, an opened video, or an `UnreadableItem`.

Downloads run ahead of the network (`prefetching`: waiting on the network holds no GIL); decoding runs a
few at a time, since each decode takes the GIL back from the thread driving the GPU. An item that cannot
be downloaded or decoded becomes an `UnreadableItem` naming it and why, never an exception of the batch.
"""
import contextlib
import logging
import threading
from typing import Any, Callable, Iterator, List

from utils.data.images import ImageDecodeError, ImageLimits, ImageSizeError, load_image_tensor
from utils.inference import prediction
from utils.inference import video as video_inference
from utils.inference.prediction import UnreadableItem

logger = logging.getLogger(__name__)


def download(item) -> Any:
    """The item's bytes in memory (a video's file on disk), or the exception that stopped the download."""
    try:
        if video_inference.is_video_item(item):
            return video_inference.download(item)
        return item.download(save_locally=False)
    except Exception as err:  # reported per item by ItemReader.decode, never failing the batch
        return err


class ItemReader:
    """`read(item)` for `prepare_item_func`; `prefetching(items, size)` downloads ahead while a run lasts."""

    def __init__(self, limits: Callable[[], ImageLimits], decode_threads: int = prediction.DECODE_THREADS):
        self._limits = limits  # the network's image limits, read when an image is decoded
        self.prefetchers: List[prediction.Prefetcher] = []  # one per predict_items call in flight
        self._decode_slots = threading.BoundedSemaphore(decode_threads)

    def read(self, item) -> Any:
        """The item decoded, from a download already made by a prefetcher when there is one."""
        for prefetcher in list(self.prefetchers):
            downloaded = prefetcher.take(item)
            if downloaded is not prediction.Prefetcher.MISSING:
                return self.decode(item, downloaded)
        return self.decode(item)

    def decode(self, item, downloaded=None) -> Any:
        """`downloaded`: what `download` gave (downloaded here when None). A video is opened, not decoded."""
        name = getattr(item, 'filename', None) or getattr(item, 'name', '?')
        try:
            buffer = download(item) if downloaded is None else downloaded
            if isinstance(buffer, Exception):
                raise buffer
            if isinstance(buffer, video_inference.VideoEntry):
                return buffer
            with self._decode_slots:
                return load_image_tensor(buffer, self._limits())
        except ImageSizeError as err:
            reason = str(err)
        except ImageDecodeError as err:
            reason = f'{err} (mimetype {getattr(item, "mimetype", None)})'
        except Exception as err:  # download failures, odd item types: report, never fail the batch
            reason = f'{type(err).__name__}: {err}'
        logger.error('cannot read item %s (id %s): %s', name, item.id, reason)
        return UnreadableItem(item.id, name, reason)

    @contextlib.contextmanager
    def prefetching(self, items: list, batch_size: int) -> Iterator[None]:
        """Download two batches ahead while the block runs: the next batch is ready when the network finishes
        this one, and one more is on its way."""
        prefetcher = prediction.Prefetcher(download, items, lookahead=2 * batch_size,
                                           workers=prediction.DOWNLOAD_THREADS)
        self.prefetchers.append(prefetcher)
        try:
            yield
        finally:
            self.prefetchers.remove(prefetcher)
            prefetcher.close()
