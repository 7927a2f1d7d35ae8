"""utils.frozen_heap: the collector skips the heap during prediction and training, and gets it back after."""
import gc
import io
import threading
import weakref

import numpy as np
from PIL import Image

from utils.frozen_heap import freeze_kept, frozen_heap

VARIANT = 'fasterrcnn_mobilenet_v3_large_320_fpn'


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


class _Item:
    def __init__(self, index, data):
        self.id, self.name, self.filename, self.mimetype = f'item-{index}', f'{index}.jpg', f'/{index}.jpg', 'jpeg'
        self.data = data
        self.annotations = self

    def download(self, save_locally=False, **kwargs):
        return io.BytesIO(self.data)

    def delete(self, filters=None):
        return True

    def upload(self, annotations):
        return annotations


def test_predict_items_collects_only_each_batch_s_objects_and_unfreezes_after(monkeypatch):
    """Through the user's call: every collection during predict_items skips the heap and the earlier
    batches' annotations, and after it nothing stays frozen."""
    from fasterrcnn_adapter import FasterRCNNAdapter
    from utils.local_model import local_model
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buffer, 'JPEG')
    items = [_Item(i, buffer.getvalue()) for i in range(6)]
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model({'pretrained': False, 'model_variant': VARIANT, 'device': 'cpu',
                                        'conf_threshold': 0.0}, labels=['a', 'b'])
    adapter.load('/nonexistent')
    frozen_at = []  # the frozen count at each collection
    callback = lambda phase, info: frozen_at.append(gc.get_freeze_count()) if phase == 'start' else None
    real_detect = adapter._detect
    at_batches = []

    def detect(batch, **kwargs):
        at_batches.append(gc.get_freeze_count())
        gc.collect(0)  # at least one collection per batch
        return real_detect(batch, **kwargs)
    monkeypatch.setattr(adapter, '_detect', detect)
    gc.callbacks.append(callback)
    try:
        _, annotations = adapter.predict_items(items, batch_size=2)
    finally:
        gc.callbacks.remove(callback)
    assert len(annotations) > 0  # random weights, no threshold: every image has boxes
    # batch 0's annotations are finished (and kept frozen) before batch 2 runs
    assert len(at_batches) == 3 and 1000 < at_batches[0] < at_batches[2]
    assert len(frozen_at) >= 3 and min(frozen_at) > 1000
    assert gc.get_freeze_count() == 0
