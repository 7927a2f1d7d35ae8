"""utils.inference.pipeline through the adapter's predict_items: the SDK loop's results and errors, with batch
k's annotations built and uploaded while the network runs batch k+1."""
import copy
import gc
import io
import threading

import dtlpy as dl
import numpy as np
import pytest
from PIL import Image

from fasterrcnn_adapter import FasterRCNNAdapter
from utils.platform.local_model import local_model

VARIANT = 'fasterrcnn_mobilenet_v3_large_320_fpn'


class _Item:
    def __init__(self, index, data):
        self.id, self.name, self.filename, self.mimetype = f'item-{index}', f'{index}.jpg', f'/{index}.jpg', 'jpeg'
        self.data = data

    def download(self, save_locally=False, **kwargs):
        return io.BytesIO(self.data)


def _jpeg(seed):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buffer, 'JPEG')
    return buffer.getvalue()


@pytest.fixture(scope='module')
def adapter():
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model({'pretrained': False, 'model_variant': VARIANT, 'device': 'cpu',
                                        'conf_threshold': 0.0, 'max_detections': 5}, labels=['a', 'b'])
    adapter.load('/nonexistent')
    return adapter


class _Uploads(list):
    """Item ids in upload order; `sent`: per item id, the annotation dicts its upload sent."""
    sent: dict


@pytest.fixture
def uploads(adapter, monkeypatch):
    """The platform's upload, offline: records which items went up and what was sent (objects as the SDK's upload
    serialises them, dicts as they are), and returns what the SDK's upload returns: its objects, read back."""
    uploaded = _Uploads()
    uploaded.sent = {}

    def upload(item, predictions):
        uploaded.append(item.id)
        sent = [p if isinstance(p, dict) else p.to_json() for p in predictions]
        uploaded.sent.setdefault(item.id, []).append(sent)
        return dl.AnnotationCollection.from_json(_json=copy.deepcopy(sent))
    monkeypatch.setattr(adapter, '_upload_model_annotations', upload)
    return uploaded


def _as_json(annotations):
    return [(annotation.item_id, annotation.to_json()) for annotation in annotations]


def test_same_annotations_in_the_same_order_as_the_sdk_loop(adapter, uploads):
    items = [_Item(i, _jpeg(i)) for i in range(7)]  # 3 batches of 3, the last one short
    ours_items, ours = adapter.predict_items(items, batch_size=3)
    ours_sent = dict(uploads.sent)
    uploads.sent.clear()
    sdk_items, sdk = dl.BaseModelAdapter.predict_items(adapter, items, batch_size=3)
    assert ours_items == sdk_items == items
    assert ours_sent == uploads.sent  # the JSON built in bulk is what the SDK's objects send
    assert len(ours) == 7 * 5
    assert _as_json(ours) == _as_json(sdk)
    assert [annotation.item_id for annotation in ours] == [f'item-{i}' for i in range(7) for _ in range(5)]
    assert ours[0].metadata['system']['model']['name'] == adapter.model_entity.name  # the SDK's stamp
    assert uploads[:7] == [item.id for item in items]


def test_a_batch_is_uploaded_while_the_network_runs_the_next(adapter, monkeypatch):
    """Batch 0's upload waits until batch 1's forward pass has started: only a pipeline gets past it."""
    items = [_Item(i, _jpeg(i)) for i in range(4)]
    detecting = [threading.Event() for _ in range(2)]
    real_detect = adapter._detect

    def detect(batch, **kwargs):
        detecting[sum(event.is_set() for event in detecting)].set()
        return real_detect(batch, **kwargs)

    def upload(item, collection):
        if item is items[0]:
            assert detecting[1].wait(10), 'batch 1 did not reach the network while batch 0 was uploading'
        return collection
    monkeypatch.setattr(adapter, '_detect', detect)
    monkeypatch.setattr(adapter, '_upload_model_annotations', upload)
    _, annotations = adapter.predict_items(items, batch_size=2)
    assert len(annotations) == 4 * 5


def test_failed_batches_are_reported_after_the_others_ran(adapter, uploads, monkeypatch):
    """The SDK loop's rule: a batch whose forward pass or upload fails is named at the end with its item ids."""
    items = [_Item(i, _jpeg(i)) for i in range(6)]
    real_detect = adapter._detect

    def detect(batch, **kwargs):
        if len(uploads) == 0 and detect.calls == 0:
            detect.calls += 1
            raise RuntimeError('CUDA out of memory (simulated)')
        return real_detect(batch, **kwargs)
    detect.calls = 0

    def upload(item, collection):
        if item is items[4]:
            raise ConnectionError('platform unreachable (simulated)')
        uploads.append(item.id)
        return collection
    monkeypatch.setattr(adapter, '_detect', detect)
    monkeypatch.setattr(adapter, '_upload_model_annotations', upload)
    with pytest.raises(Exception) as raised:
        adapter.predict_items(items, batch_size=2)
    message = str(raised.value)
    assert "Failed IDs: ['item-0', 'item-1', 'item-4', 'item-5']" in message
    assert 'CUDA out of memory (simulated)' in message and 'platform unreachable (simulated)' in message
    assert uploads[:2] == ['item-2', 'item-3']  # the batch between the failures went through
    assert not {'item-0', 'item-1'} & set(uploads)  # (item-5 may go up beside item-4's failure, as in the SDK)


def test_the_garbage_collector_walks_only_each_batch_s_objects_and_gets_the_heap_back(adapter, uploads,
                                                                                    monkeypatch):
    """utils.core.frozen_heap through predict_items: every collection skips the heap and the earlier batches'
    annotations, and after the call nothing stays frozen."""
    items = [_Item(i, _jpeg(i)) for i in range(6)]
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


def _steps_of(adapter, monkeypatch, items, batch_size):
    """The order of predict_items' steps: ('decoded', i) per item, ('detect', first item), ('annotate', first)."""
    steps = []
    prepare, detect, annotate = adapter.prepare_item_func, adapter._detect, adapter._upload_payloads

    def decoded(item):
        image = prepare(item)
        steps.append(('decoded', items.index(item)))
        return image

    def detecting(batch, **kwargs):
        steps.append(('detect', len([s for s in steps if s[0] == 'detect']) * batch_size))
        return detect(batch, **kwargs)

    def annotating(batch_items, detections):
        steps.append(('annotate', len([s for s in steps if s[0] == 'annotate']) * batch_size))
        return annotate(batch_items, detections)
    for name, replacement in (('prepare_item_func', decoded), ('_detect', detecting),
                              ('_upload_payloads', annotating)):
        monkeypatch.setattr(adapter, name, replacement)
    adapter.predict_items(items, batch_size=batch_size)
    return steps


def test_a_batch_is_annotated_once_the_next_is_decoded(adapter, uploads, monkeypatch):
    """Beside the decoding, the finishing thread's pure Python made each decoding thread wait for the GIL."""
    items = [_Item(i, _jpeg(i)) for i in range(6)]
    steps = _steps_of(adapter, monkeypatch, items, batch_size=2)
    for batch in (0, 2):
        assert steps.index(('annotate', batch)) > max(steps.index(('decoded', i)) for i in (batch + 2, batch + 3))
    # decoding stays between forward passes: batch k+1 is decoded after batch k's
    assert steps.index(('decoded', 2)) > steps.index(('detect', 0))

