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
in hand made. The outermost exit gives them back (`gc.unfreeze`).

Given back is not collected: a `dl.Annotation` and its box refer to each other, so the
annotations a caller drops are cyclic garbage, and they never count towards Python's own
trigger for a full collection; frozen again by the next call, they would pile up call after
call. So the heap is swept (`gc.collect`, then frozen again) when a call starts and the heap
has grown by `GROWTH` since the last sweep: garbage is bounded by that share of the live heap,
and the cost of a sweep is spread over the objects that grew it, as Python does itself.
The heap's size is read from the small-object allocator (`sys.getallocatedblocks`, a walk over
its arenas: 0.1-0.4 ms), not from `gc.get_freeze_count`, which walks every frozen object: 35 ms
on a 2-core host, and about 45 ms on the H100 machine's, paid by every `predict` call.
Calls nest and may overlap across threads: the heap stays frozen while any is inside, and a
call that ends while others go on lets the next `freeze_kept` sweep too, so a service whose
calls always overlap does not keep its garbage either.
"""
import contextlib
import gc
import sys
import threading

#: A sweep comes when the heap has grown by this share of what was alive after the last one.
GROWTH = 0.5

_lock = threading.Lock()
_inside = 0  # calls inside frozen_heap() now, over all threads
_alive = 0  # heap size (allocated blocks) after the last sweep (0: no call yet)
_finished_inside = False  # a call ended while others went on: what it made may be garbage by now


@contextlib.contextmanager
def frozen_heap():
    """For the duration: collections skip what existed at entry (and what `freeze_kept` adds)."""
    global _inside, _finished_inside
    with _lock:
        if _inside == 0:
            _freeze()
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0:
                gc.unfreeze()
                _finished_inside = False
            else:
                _finished_inside = True


def freeze_kept() -> None:
    """Inside `frozen_heap()`: what is alive now is kept to the end, so collections stop walking it."""
    with _lock:
        if not _inside:
            return
        if _finished_inside:
            _freeze()
        else:
            gc.freeze()


def _freeze() -> None:
    """Freeze the heap, sweeping it first when it has grown by GROWTH since the last sweep."""
    global _alive, _finished_inside
    gc.freeze()
    size = sys.getallocatedblocks()
    if not _alive:
        _alive = size
    elif size > (1 + GROWTH) * _alive:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        _alive, _finished_inside = sys.getallocatedblocks(), False
