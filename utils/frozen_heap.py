"""Keep Python's cyclic garbage collector off the objects a long call does not let go of.

A process holding torch, dtlpy and a detection network tracks about 600k container objects,
and each full collection walks all of them (0.5-0.7 s on a 2-core host). Prediction allocates
enough to set one off every few batches (tensors in the forward pass; a `dl.Annotation` with
its dicts and lists per box), so the collector was more than half of `predict_items`' host
time: 2.1 of 3.4 s for 1,024 images of 100 boxes with the network stubbed out, 0.7 of 5.0 s
over 4 CPU forward passes (bench/RESULTS.md).

Inside `frozen_heap()` the objects alive at entry, and those alive when `freeze_kept()` is
called (a batch's annotations, kept to the end of `predict_items`), sit in the collector's
permanent generation (`gc.freeze`, a list splice), so a collection walks only what the batch
in hand made: 0.08 s of collector for those 1,024 images. The outermost exit gives them back
(`gc.unfreeze`), so a cycle that became garbage meanwhile is collected as usual afterwards.
Calls nest and may overlap across threads: the heap stays frozen while any is inside.
"""
import contextlib
import gc
import threading

_lock = threading.Lock()
_inside = 0  # calls inside frozen_heap() now, over all threads


@contextlib.contextmanager
def frozen_heap():
    """For the duration: collections skip what existed at entry (and what `freeze_kept` adds)."""
    global _inside
    with _lock:
        if _inside == 0:
            gc.freeze()
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0:
                gc.unfreeze()


def freeze_kept() -> None:
    """Inside `frozen_heap()`: what is alive now is kept to the end, so collections stop walking it."""
    with _lock:
        if _inside:
            gc.freeze()
