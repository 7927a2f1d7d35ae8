"""utils.frozen_heap: the collector skips the heap inside, and gets it back after (predict_items through it:
tests/test_predict_pipeline.py)."""
import gc
import threading
import weakref

from utils.frozen_heap import freeze_kept, frozen_heap


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


def test_overlapping_calls_in_two_threads_keep_it_frozen_until_both_are_out():
    entered, release = threading.Event(), threading.Event()

    def other_call():
        with frozen_heap():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=other_call)
    with frozen_heap():
        thread.start()
        assert entered.wait(10)
    assert gc.get_freeze_count() > 0  # the other thread is still inside
    release.set()
    thread.join()
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
