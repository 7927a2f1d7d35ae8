"""utils.platform.annotation_json: the upload's annotation JSON built directly equals, field by field and key for
key, what the SDK sends for its own objects; predict_items uploads exactly what the SDK's loop uploads."""
import io
import json

import dtlpy as dl
import numpy as np
import pytest
from PIL import Image

from fasterrcnn_adapter import FasterRCNNAdapter
from utils.platform.box_collection import boxes_to_collection
from utils.platform.annotation_json import batch_box_annotations, box_annotations
from utils.platform.local_model import local_model, manifest_model_block

VARIANT = 'fasterrcnn_mobilenet_v3_large_320_fpn'
LABELS = {1: 'cat', 2: 'dog', 7: 'car'}
# edges on purpose: a score over 1 and one under 0 (clamped), 5 decimals (rounded), an id the map lacks,
# integer coordinates (floats in the JSON), a class id as a float (rows come from a float tensor's tolist()),
# a zero-size box, 105 boxes (two upload batches)
ROWS = [[1.5, 2, 30.25, 40, 0.912345678, 1], [0, 0, 640, 480, 1.0000001, 7], [3, 4, 3, 4, -0.2, 2],
        [10.5, 11, 12, 13, 0.33333, 99], [5, 6, 7, 8, 0.12345, 2.0]]
ROWS += [[i, i + 1, i + 20.125, i + 30, (i % 10) / 10, 1 + i % 2] for i in range(100)]


def _item(item_id='item-1', dataset_id='dataset-1'):
    """A dl.Item built offline, as predict_items gets it from the platform."""
    return dl.Item.from_json(_json={'id': item_id, 'datasetId': dataset_id, 'filename': '/a.jpg', 'name': 'a.jpg',
                                    'url': f'http://platform/api/v1/items/{item_id}',
                                    'dataset': f'http://platform/api/v1/datasets/{dataset_id}',
                                    'metadata': {'system': {'width': 640, 'height': 480}}},
                             client_api=dl.client_api, dataset=None, project=None)


@pytest.fixture(scope='module')
def adapter():
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model({'pretrained': False, 'model_variant': VARIANT, 'device': 'cpu'},
                                       labels=['cat', 'dog'], name='the-model', model_id='model-id-1')
    return adapter


def _sdk_upload_json(adapter, item, rows):
    """What the SDK's predict_items sends for these rows: its objects (`boxes_to_collection`), stamped by the
    SDK, serialised by the item's annotations repository as `upload` does (no HTTP)."""
    collection = boxes_to_collection(rows, LABELS, adapter.model_entity.name, adapter.model_entity.id)
    adapter._update_predictions_metadata(item, collection)
    return item.annotations._create_batches_for_upload(collection.annotations)


def _assert_same_layout(ours, sdk, where='annotation'):
    """Equal values, the same keys in the same order, the same types (an int is not a float), all the way down."""
    assert type(ours) is type(sdk), f'{where}: {type(ours).__name__} vs the SDK\'s {type(sdk).__name__}'
    if isinstance(sdk, dict):
        assert list(ours) == list(sdk), f'{where}: keys {list(ours)} vs the SDK\'s {list(sdk)}'
        for key in sdk:
            _assert_same_layout(ours[key], sdk[key], f'{where}.{key}')
    elif isinstance(sdk, list):
        assert len(ours) == len(sdk), f'{where}: {len(ours)} entries vs the SDK\'s {len(sdk)}'
        for index, (a, b) in enumerate(zip(ours, sdk)):
            _assert_same_layout(a, b, f'{where}[{index}]')
    else:
        assert ours == sdk, f'{where}: {ours!r} vs the SDK\'s {sdk!r}'


def test_each_field_equals_the_sdk_s_to_json(adapter):
    item = _item()
    sdk = _sdk_upload_json(adapter, item, ROWS)
    ours = item.annotations._create_batches_for_upload(
        box_annotations(ROWS, LABELS, 'the-model', 'model-id-1', item.id, item.dataset_id))
    assert [len(batch) for batch in sdk] == [100, 5]
    _assert_same_layout(ours, sdk, 'upload')
    assert json.dumps(ours) == json.dumps(sdk)  # the request body, byte for byte
    first = ours[0][0]
    assert first['label'] == 'cat' and first['itemId'] == 'item-1' and first['datasetId'] == 'dataset-1'
    assert first['metadata']['system']['model'] == {'model_id': 'model-id-1', 'name': 'the-model',
                                                    'confidence': 0.9123}
    assert [a['label'] for a in ours[0][1:4]] == ['car', 'dog', '99']
    assert [a['metadata']['user']['model']['confidence'] for a in ours[0][1:3]] == [1.0, 0.0]


def test_no_dict_is_shared_between_annotations():
    """The SDK's objects each own their dicts; a caller that edits one annotation must not edit another."""
    ours = box_annotations(ROWS[:2], LABELS, 'm', 'id')
    ours[0]['metadata']['system']['attributes']['x'] = 1
    ours[0]['coordinates'][0]['x'] = -1
    assert ours[1]['metadata']['system']['attributes'] == {} and ours[1]['coordinates'][0]['x'] == 0.0


def test_a_batch_gives_each_item_its_own_rows_and_an_empty_list_where_none():
    items = [_item('a', 'd'), _item('b', 'd'), _item('c', 'd')]
    rows = [ROWS[:2], ROWS[2:5]]
    out = batch_box_annotations(items, [0, 2], rows, LABELS, 'm', 'id')
    assert [len(annotations) for annotations in out] == [2, 0, 3]
    assert {a['itemId'] for a in out[2]} == {'c'}
    assert out[2] == box_annotations(rows[1], LABELS, 'm', 'id', 'c', 'd')


# ----------------------------------------------------------------------------- through the platform

def _jpeg(seed):
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(buffer, 'JPEG')
    return buffer.getvalue()


def _record_annotation_posts(emu, monkeypatch):
    """{item id: [request bodies]} of every annotation upload the emulator receives."""
    bodies = {}
    dispatch = emu.dispatch

    def recording(method, path, query, headers, body):
        if method == 'POST' and path.endswith('/annotations'):
            bodies.setdefault(path.split('/')[-2], []).append(json.loads(body))
        return dispatch(method, path, query, headers, body)
    monkeypatch.setattr(emu, 'dispatch', recording)
    return bodies


def test_predict_items_uploads_what_the_sdk_s_own_loop_uploads(dataloop_env, monkeypatch):
    """The same model over the same items: the pipeline's bulk JSON and the SDK's loop (its predict_items
    around our `predict`, with its objects, stamp and to_json) send identical request bodies, and both
    return the SDK's annotation objects, equal."""
    emu = dataloop_env
    project = emu.seed_project('p')
    dataset = emu.seed_dataset(project['id'], 'd', labels=['cat', 'dog'])
    configuration = manifest_model_block()['configuration']
    configuration.update({'model_variant': VARIANT, 'pretrained': False, 'device': 'cpu', 'min_size': 64,
                          'max_size': 96, 'conf_threshold': 0.0, 'max_detections': 4, 'batch_size': 2,
                          'id_to_label_map': {'1': 'cat', '2': 'dog'}, 'label_to_id_map': {'cat': 1, 'dog': 2}})
    model = emu.seed_model(project['id'], dataset['id'], 'bulk-model', configuration=configuration,
                           labels=['cat', 'dog'])
    seeded = [emu.seed_item(dataset['id'], f'{k}.jpg', _jpeg(k)) for k in range(3)]
    broken = emu.seed_item(dataset['id'], 'broken.jpg', _jpeg(9)[:300])
    service = FasterRCNNAdapter(dl.models.get(model_id=model['id']))  # loads the model, as a deployed service
    items = [dl.items.get(item_id=item['id']) for item in seeded]
    bodies = _record_annotation_posts(emu, monkeypatch)

    _, ours = service.predict_items(items)
    ours_sent = dict(bodies)
    bodies.clear()
    _, sdk = dl.BaseModelAdapter.predict_items(service, items, batch_size=2)

    assert set(ours_sent) == set(bodies) == {item['id'] for item in seeded}
    for item in seeded:
        _assert_same_layout(ours_sent[item['id']], bodies[item['id']], f'item {item["name"]}')
        assert len(ours_sent[item['id']][0]) == 4  # random weights, no threshold: max_detections boxes
    assert all(isinstance(annotation, dl.Annotation) for annotation in ours) and len(ours) == 3 * 4
    assert [_made_here(a) for a in ours] == [_made_here(a) for a in sdk]

    bodies.clear()  # an unreadable item gets nothing and is named at the end; the others go up as before
    with pytest.raises(ValueError, match='broken.jpg'):
        service.predict_items([dl.items.get(item_id=broken['id']), items[0]])
    assert list(bodies) == [seeded[0]['id']] and bodies[seeded[0]['id']] == ours_sent[seeded[0]['id']]
    assert emu.missing == [] and emu.errors == []


def _made_here(annotation):
    """An uploaded annotation's JSON less what the platform gives it (its id, url and times)."""
    return {k: v for k, v in annotation.to_json().items() if k not in ('id', 'url', 'createdAt', 'updatedAt')}
