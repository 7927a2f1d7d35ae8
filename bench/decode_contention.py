"""How much decoding ahead slows the thread that drives the GPU (runs on CPU; no GPU needed).

    python bench/decode_contention.py

A GPU forward pass of torchvision's detector is a long run of short Python steps
(launching kernels) and waits (host syncs: NMS, `.cpu()`), and at each wait the
thread gives Python's GIL away. Decoding threads that want the GIL then hold the
main thread up. The main loop here does that: ~10 us of Python, then a 200 us wait
that releases the GIL, 2000 times. Its time is measured idle, while one thread
decodes with torchvision's decode_jpeg alone and with PIL alone (does the decoder
itself let go of the GIL? it varies with the build), while 16 threads
decode with PIL (what the SDK's predict_items pool does), and while the adapter's
`predict_items` prefetcher decodes (16 download threads, `DECODE_THREADS` decoding,
torchvision's JPEG decoder). Ratio = idle time / time while decoding (1.0: no harm).
"""
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault('DATALOOP_PATH', tempfile.mkdtemp())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision.io import ImageReadMode, decode_jpeg  # noqa: E402
from torchvision.transforms.functional import pil_to_tensor  # noqa: E402

from bench.speed.common import MemoryItem, jpeg  # noqa: E402
from fasterrcnn_adapter import FasterRCNNAdapter  # noqa: E402
from utils.data.images import load_image  # noqa: E402
from utils.inference.prediction import DECODE_THREADS, DOWNLOAD_THREADS, Prefetcher  # noqa: E402


def driving_loop(steps=2000):
    """Seconds for `steps` rounds of a little Python and a GIL-free wait, like a launch-bound forward pass."""
    start = time.perf_counter()
    for _ in range(steps):
        total = 0
        for i in range(300):
            total += i
        time.sleep(0.0002)
    return time.perf_counter() - start


def while_decoding(start_decoding, items):
    """(driving loop seconds, images decoded per second) while `start_decoding(items)` runs in the background."""
    done = threading.Event()
    count = [0]

    def decode_forever():
        while not done.is_set():
            count[0] += start_decoding(items)
    worker = threading.Thread(target=decode_forever, daemon=True)
    began = time.perf_counter()
    worker.start()
    seconds = driving_loop()
    done.set()
    worker.join()
    return seconds, count[0] / (time.perf_counter() - began)


def main():
    items = [MemoryItem(i, jpeg(i, 640, 480)) for i in range(64)]
    adapter = FasterRCNNAdapter()  # its decoding only: no network is built

    pool = ThreadPoolExecutor(16)

    def pil_in_16_threads(batch):
        return len(list(pool.map(lambda item: pil_to_tensor(load_image(item.download())), batch)))

    def adapter_prefetcher(batch):
        prefetcher = Prefetcher(adapter._decode_item, batch, lookahead=32, workers=DOWNLOAD_THREADS)
        try:
            return len([prefetcher.take(item) for item in batch])
        finally:
            prefetcher.close()

    def one_thread(decode):
        return lambda batch: len([decode(item.download().getvalue()) for item in batch])

    def torchvision_only(data):
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    idle = driving_loop()
    print(f'{os.cpu_count()} cores, torchvision {torchvision.__version__}; driving loop idle: {idle:.2f} s; '
          'ratio = idle / while decoding 640x480 JPEGs')
    for name, decode in (('1 thread, torchvision decode_jpeg alone (does it let go of the GIL?)',
                          one_thread(torchvision_only)),
                         ('1 thread, PIL decode alone', one_thread(lambda data: load_image(data))),
                         ('16 threads, PIL (plain: the SDK pool)', pil_in_16_threads),
                         (f'adapter prefetcher: {DOWNLOAD_THREADS} downloads, {DECODE_THREADS} decodes, torchvision',
                          adapter_prefetcher)):
        seconds, rate = while_decoding(decode, items)
        print(f'  {name:<72} loop {seconds:6.2f} s  ratio {idle / seconds:5.2f}  decoded {rate:7.0f} img/s')
    pool.shutdown()


if __name__ == '__main__':
    main()
