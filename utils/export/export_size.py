"""The ONNX export's input size, checked without torch: the local runner refuses a bad ``--size`` in a
fraction of a second, before the network's imports (about 4 s on a 2-core CPU) are paid."""
from typing import Sequence, Tuple

from utils.core.errors import InputError

# Input sides taken: the graph resizes every input to min_size/max_size (at most 1333 px) first, so a
# larger input only costs memory; tracing at 8192 x 8192 already holds a 0.8 GB example image.
MIN_SIDE, MAX_SIDE = 32, 8192


class ExportError(InputError):
    """The model folder or the requested size cannot be exported; the message says which and why
    (an InputError: the local runner shows it as one line and exits 2)."""


def check_size(size: Sequence[int]) -> Tuple[int, int]:
    """(height, width) as ints; ExportError unless two integers, each from MIN_SIDE to MAX_SIDE."""
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and MIN_SIDE <= v <= MAX_SIDE
                                 for v in size):
        raise ExportError(f'size must be two integers (height, width), each from {MIN_SIDE} to {MAX_SIDE} '
                          f'pixels (the network resizes its input to at most max_size anyway), got {size!r}')
    return int(size[0]), int(size[1])
