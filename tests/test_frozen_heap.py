"""utils.core.frozen_heap: the collector skips the heap inside, and gets it back after (predict_items through it:
tests/test_predict_pipeline.py)."""
import contextlib
import gc
import threading
import weakref

from utils.core import frozen_heap as frozen_heap_module
from utils.core.frozen_heap import freeze_kept, frozen_heap


class _Cycle:
    """Garbage only the cyclic collector frees."""

    def __init__(self):
        self.me = self


def test_frozen_while_inside_and_given_back_at_the_outermost_exit():
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        at_entry = gc.get_freeze_count()
        assert at_entry > 1000  # the process's modules, at least
        kept = [[i] for i in range(500)]  # lists are always tracked (a dict of ints is not)
        with frozen_heap():  # nested: nothing changes at its exit
            pass
        assert gc.get_freeze_count() == at_entry
        freeze_kept()
        assert gc.get_freeze_count() >= at_entry + len(kept)
    assert gc.get_freeze_count() == 0
    freeze_kept()  # outside: does nothing
    assert gc.get_freeze_count() == 0


@contextlib.contextmanager
def _another_call_inside():
    """A call in another thread, inside frozen_heap() for the duration of the block."""
    entered, release = threading.Event(), threading.Event()

    def call():
        with frozen_heap():
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=call)
    thread.start()
    try:
        assert entered.wait(10)
        yield
    finally:
        release.set()
        thread.join()


def test_overlapping_calls_in_two_threads_keep_it_frozen_until_both_are_out():
    with _another_call_inside():
        with frozen_heap():
            pass
        assert gc.get_freeze_count() > 0  # the other thread is still inside
    assert gc.get_freeze_count() == 0


def test_garbage_frozen_during_a_call_is_collected_after_it():
    with frozen_heap():
        cycle = _Cycle()
        alive = weakref.ref(cycle)
        freeze_kept()
        del cycle
        gc.collect()
        assert alive() is not None  # frozen: the collector does not look at it
    gc.collect()
    assert alive() is None


def _assert_calls_leave_little_garbage(calls=40, per_call=20000):
    """`calls` calls that each keep `per_call` reference cycles to their end (as predict_items keeps its
    annotations, each referring to its box and back), then drop them: most must be gone after."""
    sample = []
    for _ in range(calls):
        with frozen_heap():
            kept = [_Cycle() for _ in range(per_call)]
            freeze_kept()
            sample.extend(weakref.ref(cycle) for cycle in kept[::1000])
        del kept
    alive = sum(ref() is not None for ref in sample)
    assert alive < len(sample) / 4, f'{alive} of {len(sample)} dropped cycles still alive'


def test_the_garbage_of_finished_calls_is_swept_not_frozen_again_call_after_call(monkeypatch):
    """Given back at the end of a call, dropped cycles never set off Python's own full collection: frozen
    again by the next call, they piled up (128,000 dropped annotations alive after 40 calls). Swept when
    the heap has grown by GROWTH, at most about that much garbage is alive at any time."""
    monkeypatch.setattr(frozen_heap_module, 'GROWTH', 0.05)
    _assert_calls_leave_little_garbage()


def test_calls_that_always_overlap_sweep_their_garbage_too(monkeypatch):
    """A service running calls in threads may never have none inside: the heap would stay frozen for good."""
    monkeypatch.setattr(frozen_heap_module, 'GROWTH', 0.05)
    with _another_call_inside():
        _assert_calls_leave_little_garbage()  # each starts and ends while the other call is inside


def test_evaluation_runs_with_the_heap_frozen(tmp_path):
    """engine.evaluate (fit runs it, and so does the local runner's report) carries the policy itself."""
    import torch
    from tests.test_training import CPU, LABEL_TO_ID, make_records, small_model
    from utils.training import engine
    from utils.data.data_loading import collate_fn
    from utils.data.detection_dataset import DetectionDataset
    from utils.data.transforms import get_transform
    records = make_records(tmp_path, 2, seed=2)
    loader = torch.utils.data.DataLoader(DetectionDataset(records, LABEL_TO_ID, get_transform(False, {})),
                                         batch_size=2, collate_fn=collate_fn)
    model = small_model()
    frozen = []
    model.register_forward_pre_hook(lambda module, args: frozen.append(gc.get_freeze_count()))
    engine.evaluate(model, loader, CPU, progress=False)
    assert frozen and min(frozen) > 1000
    assert gc.get_freeze_count() == 0


def test_calls_do_not_count_the_frozen_heap(monkeypatch):
    """gc.get_freeze_count walks every frozen object (35 ms for 400k objects on a 2-core host, about 45 on
    the H100 machine's): asked at each call's entry, it cost every `predict` call that much. The heap's size
    comes from the allocator's arenas instead, sweeps included."""
    def walks_the_heap():
        raise AssertionError('gc.get_freeze_count walks the whole frozen heap')
    with _another_call_inside():
        monkeypatch.setattr(gc, 'get_freeze_count', walks_the_heap)
        monkeypatch.setattr(frozen_heap_module, '_alive', 1)  # as if the heap had grown: the next entry sweeps
        with frozen_heap():
            freeze_kept()
        freeze_kept()  # a call ended while another is inside: freeze_kept measures too
        with frozen_heap():
            freeze_kept()
    assert frozen_heap_module._alive > 1
