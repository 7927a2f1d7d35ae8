"""The emulator supports the platform flows the adapter needs, proven with the real dtlpy SDK only."""
import dataclasses
import glob
import io
import json
import os

import dtlpy as dl
import pytest
from dtlpy.ml.base_model_adapter import AdapterDefaults
from PIL import Image


def png_bytes(width=32, height=24, color=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new('RGB', (width, height), color).save(buf, format='PNG')
    return buf.getvalue()


def box(label, left, top, right, bottom, **extra):
    return dict({'type': 'box', 'label': label, 'attributes': [],
                 'coordinates': [{'x': left, 'y': top, 'z': 0}, {'x': right, 'y': bottom, 'z': 0}]}, **extra)


def model_box(label, model_name):
    """An annotation a model made earlier: the platform marks it in metadata.system.model."""
    return box(label, 1, 1, 5, 5, metadata={'system': {'model': {'name': model_name, 'confidence': 0.9}}})


def adapter_defaults_config(**extra):
    """The 7 keys the SDK's adapter writes (and PATCHes) when missing, pre-filled."""
    config = {f.name: f.default for f in dataclasses.fields(AdapterDefaults)}
    config.update(extra)
    return config


@pytest.fixture
def world(dataloop_env):
    """One project with a 2-label dataset: 2 train items, 1 validation item, 1 unannotated train item."""
    emu = dataloop_env
    project = emu.seed_project('emu-project')
    dataset = emu.seed_dataset(project['id'], 'emu-data', labels=['cat', 'dog'])
    train_a = emu.seed_item(dataset['id'], 'a.png', png_bytes(32, 24), dir='/train',
                            annotations=[box('cat', 1, 2, 10, 12), box('dog', 5, 5, 20, 20),
                                         model_box('dog', 'old-model')])
    train_b = emu.seed_item(dataset['id'], 'b.png', png_bytes(40, 30, (0, 0, 255)), dir='/train/sub',
                            annotations=[box('dog', 0, 0, 39, 29)])
    val_c = emu.seed_item(dataset['id'], 'c.png', png_bytes(16, 16), dir='/validation',
                          annotations=[box('cat', 2, 2, 8, 8)])
    empty = emu.seed_item(dataset['id'], 'empty.png', png_bytes(8, 8), dir='/train')
    model = emu.seed_model(project['id'], dataset['id'], 'emu-model',
                           configuration=adapter_defaults_config(epochs=1),
                           labels=['cat', 'dog'],
                           subsets={'train': emu.dir_filter('/train', recursive=True),
                                    'validation': emu.dir_filter('/validation')})
    return dict(emu=emu, project=project, dataset=dataset, model=model,
                train_a=train_a, train_b=train_b, val_c=val_c, empty=empty)


def assert_no_gaps(emu):
    assert emu.missing == [], 'SDK called endpoints the emulator lacks: {}'.format(emu.missing)
    assert emu.errors == [], emu.errors[0]


def test_entities_round_trip(world):
    emu = world['emu']
    project = dl.projects.get(project_id=world['project']['id'])
    assert project.name == 'emu-project'
    dataset = dl.datasets.get(dataset_id=world['dataset']['id'])
    assert dataset.name == 'emu-data'
    assert sorted(label.tag for label in dataset.labels) == ['cat', 'dog']

    model = dl.models.get(model_id=world['model']['id'])
    assert model.name == 'emu-model' and model.status == 'created'
    assert model.dataset.id == dataset.id
    model.configuration['epochs'] = 7
    model.status = 'trained'
    model.metadata['user'] = {'note': 'patched'}
    model.update()
    stored = emu.models[model.id]
    assert stored['configuration']['epochs'] == 7
    assert stored['status'] == 'trained' and stored['metadata']['user'] == {'note': 'patched'}
    again = dl.models.get(model_id=model.id)
    assert again.configuration['epochs'] == 7 and again.status == 'trained'
    assert again.metadata['system']['subsets']['train'] == emu.dir_filter('/train', recursive=True)

    names = sorted(item.filename for item in dataset.items.list().all())
    assert names == ['/train/a.png', '/train/empty.png', '/train/sub/b.png', '/validation/c.png']

    item = dl.items.get(item_id=world['train_a']['id'])
    assert item.width == 32 and item.height == 24
    buffer = item.download(save_locally=False)
    assert buffer.read() == emu.blobs[item.id]
    labels = sorted(ann.label for ann in item.annotations.list())
    assert labels == ['cat', 'dog', 'dog']
    assert_no_gaps(emu)


def test_item_query_filters(world):
    """The DQL the SDK and users send: dir, globbed filename, $in on ids, annotated, metadata tags, $or."""
    emu, dataset = world['emu'], dl.datasets.get(dataset_id=world['dataset']['id'])

    def names(filters):
        return sorted(item.name for item in dataset.items.list(filters=filters).all())

    assert names(dl.Filters(field='dir', values='/train')) == ['a.png', 'empty.png']
    assert names(dl.Filters(field='filename', values='/train')) == ['a.png', 'b.png', 'empty.png']  # /train/**
    assert names(dl.Filters(field='annotated', values=False)) == ['empty.png']
    ids = [world['train_b']['id'], world['val_c']['id']]
    assert names(dl.Filters(field='id', values=ids, operator=dl.FiltersOperations.IN)) == ['b.png', 'c.png']

    emu.items[world['val_c']['id']]['metadata']['system']['tags'] = {'validation': True}
    assert names(dl.Filters(custom_filter=emu.tag_filter('validation'))) == ['c.png']
    either = dl.Filters(custom_filter={'$or': [{'dir': '/validation'}, {'name': {'$glob': 'e*'}}]})
    assert names(either) == ['c.png', 'empty.png']

    paged = dataset.items.list(filters=dl.Filters(page_size=2))
    assert paged.items_count == 4 and paged.total_pages_count == 2
    assert len([item for page in paged for item in page]) == 4
    assert_no_gaps(emu)


def test_annotations_upload_and_delete_by_model_filter(world):
    emu = world['emu']
    item = dl.items.get(item_id=world['train_b']['id'])
    collection = dl.AnnotationCollection(item=item)
    collection.add(annotation_definition=dl.Box(left=1, top=2, right=11, bottom=12, label='cat'),
                   model_info={'name': 'new-model', 'model_id': world['model']['id'], 'confidence': 0.75})
    collection.add(annotation_definition=dl.Box(left=3, top=3, right=9, bottom=9, label='dog'),
                   model_info={'name': 'new-model', 'model_id': world['model']['id'], 'confidence': 0.5})
    # model_info lands in metadata.user.model; predict_items also writes metadata.system.model, as here
    for ann in collection.annotations:
        ann.metadata.setdefault('system', {})['model'] = dict(ann.metadata['user']['model'])
    uploaded = item.annotations.upload(collection)
    assert len(uploaded) == 2 and all(ann.id for ann in uploaded)

    stored = emu.item_annotations(item.id)
    made = [a for a in stored if a['metadata']['system'].get('model', {}).get('name') == 'new-model']
    assert len(made) == 2 and made[0]['coordinates'][0] == {'x': 1, 'y': 2, 'z': 0}
    assert {a['metadata']['system']['model']['confidence'] for a in made} == {0.75, 0.5}
    assert {a['metadata']['user']['model']['model_id'] for a in made} == {world['model']['id']}
    assert emu.items[item.id]['annotationsCount'] == 3

    clean = dl.Filters(resource=dl.FiltersResource.ANNOTATION)
    clean.add(field='metadata.system.model.name', values='new-model')
    item.annotations.delete(filters=clean)
    left = emu.item_annotations(item.id)
    assert [(a['label'], 'model' in a['metadata']['system']) for a in left] == [('dog', False)]

    # one by id too (the SDK's DELETE /annotations/{id})
    item.annotations.delete(annotation_id=left[0]['id'])
    assert emu.item_annotations(item.id) == [] and emu.items[item.id]['annotated'] is False
    assert_no_gaps(emu)


def test_model_artifacts_round_trip(world, tmp_path):
    emu = world['emu']
    model = dl.models.get(model_id=world['model']['id'])
    src = tmp_path / 'out'
    (src / 'weights').mkdir(parents=True)
    files = {'weights/best.pth': os.urandom(70_000), 'config.json': b'{"a": 1}', 'labels.txt': b'cat\ndog\n'}
    for rel, data in files.items():
        (src / rel).write_bytes(data)

    model.artifacts.upload(filepath=str(src / '*'), overwrite=True)
    binaries = emu.binaries_dataset(world['project']['id'])
    remote = {i['filename']: emu.blobs[i['id']] for i in emu.find_items(binaries['id']) if not i['hidden']}
    assert remote == {'/artifacts/models/emu-model/' + rel: data for rel, data in files.items()}
    assert len(emu.models[model.id]['artifacts']) == 3  # the SDK PATCHes the model with its artifacts

    # overwrite=True replaces the bytes in place
    (src / 'weights' / 'best.pth').write_bytes(b'new weights')
    model.artifacts.upload(filepath=str(src / '*'), overwrite=True)
    files['weights/best.pth'] = b'new weights'

    fresh = dl.models.get(model_id=model.id)
    dst = tmp_path / 'back'
    fresh.artifacts.download(local_path=str(dst), overwrite=True)
    got = {os.path.relpath(p, dst): open(p, 'rb').read()
           for p in glob.glob(str(dst / '**' / '*'), recursive=True) if os.path.isfile(p)}
    assert got == files
    assert_no_gaps(emu)


def test_metrics_are_recorded(world):
    emu = world['emu']
    model = dl.models.get(model_id=world['model']['id'])
    samples = [dl.PlotSample(figure='loss', legend='train', x=epoch, y=1.0 / (epoch + 1)) for epoch in range(3)]
    assert model.metrics.create(samples=samples, dataset_id=world['dataset']['id']) is True
    assert [(m['figure'], m['legend'], m['data']['x']) for m in emu.metrics] == [('loss', 'train', x) for x in range(3)]
    assert {(m['modelId'], m['datasetId']) for m in emu.metrics} == {(model.id, world['dataset']['id'])}
    assert_no_gaps(emu)


class ListingAdapter(dl.BaseModelAdapter):
    """The smallest adapter prepare_data can run: convert_from_dtlpy only records what was downloaded."""

    def load(self, local_path, **kwargs):
        pass

    def convert_from_dtlpy(self, data_path, **kwargs):
        self.converted = sorted(os.path.relpath(p, data_path)
                                for p in glob.glob(os.path.join(data_path, '**', '*'), recursive=True)
                                if os.path.isfile(p))


def test_prepare_data_downloads_subsets(world, tmp_path):
    emu = world['emu']
    model = dl.models.get(model_id=world['model']['id'])
    adapter = ListingAdapter()
    adapter.model_entity = model
    dataset = dl.datasets.get(dataset_id=world['dataset']['id'])
    data_path = tmp_path / 'data'
    data_path.mkdir()  # the SDK only creates data_path when it picks the path itself
    adapter.prepare_data(dataset=dataset, root_path=str(tmp_path), data_path=str(data_path),
                         output_path=str(tmp_path / 'out'))

    # the unannotated item is left out (no include_background), every other subset item is there
    assert adapter.converted == ['train/items/train/a.png', 'train/items/train/sub/b.png',
                                 'train/json/train/a.json', 'train/json/train/sub/b.json',
                                 'validation/items/validation/c.png', 'validation/json/validation/c.json']
    assert (data_path / 'train/items/train/a.png').read_bytes() == emu.blobs[world['train_a']['id']]
    item_json = json.loads((data_path / 'train/json/train/a.json').read_text())
    assert item_json['id'] == world['train_a']['id']
    assert item_json['metadata']['system']['width'] == 32
    # the earlier model's prediction is filtered out by prepare_data's annotation filter
    assert sorted(a['label'] for a in item_json['annotations']) == ['cat', 'dog']
    val_json = json.loads((data_path / 'validation/json/validation/c.json').read_text())
    assert [a['coordinates'] for a in val_json['annotations']] == [[{'x': 2, 'y': 2, 'z': 0}, {'x': 8, 'y': 8, 'z': 0}]]
    # explicit paths are written into the configuration, each one a PATCH (the SDK's AdapterDefaults.resolve)
    assert [r.method for r in emu.requests].count('PATCH') == 3
    assert emu.models[model.id]['configuration']['data_path'] == str(data_path)
    assert_no_gaps(emu)


def test_unknown_endpoint_is_a_visible_404(dataloop_env):
    emu = dataloop_env
    with pytest.raises(dl.exceptions.NotFound) as err:
        dl.pipelines.get(pipeline_id='deadbeef')
    assert 'pipelines' in str(err.value)
    assert emu.missing and emu.missing[0].path.endswith('/pipelines/deadbeef')
    assert emu.requests[-1].status == 404


def test_an_upload_cut_off_mid_body_stores_nothing(world):
    """A process killed mid-upload must not leave a truncated artifact behind (a real server drops the request)."""
    import socket
    import time
    from urllib.parse import urlsplit
    emu = world['emu']
    binaries = emu.binaries_dataset(world['project']['id'])
    boundary = 'cutoff'
    body = ('--{b}\r\nContent-Disposition: form-data; name="type"\r\n\r\nfile\r\n'
            '--{b}\r\nContent-Disposition: form-data; name="path"\r\n\r\n/artifacts/models/m/weights/last.pth\r\n'
            '--{b}\r\nContent-Disposition: form-data; name="file"; filename="last.pth"\r\n\r\n').format(b=boundary)
    body = body.encode() + b'\0' * 1000  # the file part is cut off: no closing boundary, no last chunk
    url = urlsplit(emu.api_url)
    for framing in ('chunked', 'length'):
        head = ('POST {}/datasets/{}/items HTTP/1.1\r\nHost: x\r\n'
                'Content-Type: multipart/form-data; boundary={}\r\n').format(url.path, binaries['id'], boundary)
        if framing == 'chunked':
            data = (head + 'Transfer-Encoding: chunked\r\n\r\n').encode() + b'%x\r\n' % len(body) + body + b'\r\n'
        else:
            data = (head + 'Content-Length: {}\r\n\r\n'.format(len(body) + 5000)).encode() + body
        with socket.create_connection((url.hostname, url.port)) as sock:
            sock.sendall(data)
        time.sleep(0.3)  # let the handler thread see the closed connection
        assert emu.find_items(binaries['id'], '/artifacts/models/m/weights/last.pth') == [], framing
    assert emu.errors == []


def test_an_injected_500_on_an_upload_comes_before_the_file_is_sent(world):
    """The client has sent the form's fields and the file part's header, and still owes 10 MB: the 500 comes."""
    import socket
    from urllib.parse import urlsplit
    emu = world['emu']
    binaries = emu.binaries_dataset(world['project']['id'])
    emu.add_fault('error', emu.artifact_upload('weights/best.pth'))
    boundary = 'early'
    body = ('--{b}\r\nContent-Disposition: form-data; name="type"\r\n\r\nfile\r\n'
            '--{b}\r\nContent-Disposition: form-data; name="path"\r\n\r\n/artifacts/models/m/weights/best.pth\r\n'
            '--{b}\r\nContent-Disposition: form-data; name="file"; filename="best.pth"\r\n\r\n').format(b=boundary)
    url = urlsplit(emu.api_url)
    head = ('POST {}/datasets/{}/items HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={}\r\n'
            'Content-Length: {}\r\n\r\n').format(url.path, binaries['id'], boundary, len(body) + 10 * 2 ** 20)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head.encode() + body.encode() + b'\0' * 1000)
        answer = b''
        while not answer.endswith(b'}'):  # the headers, then the JSON message
            piece = sock.recv(4096)
            if not piece:
                break
            answer += piece
    assert answer.startswith(b'HTTP/1.1 500'), answer
    assert b'emulator fault' in answer and b'Connection: close' in answer
    assert [hit.status for hit in emu.faults_hit] == ['error']
    assert emu.find_items(binaries['id'], '/artifacts/models/m/weights/best.pth') == []


def test_a_fault_on_one_epochs_metrics_until_the_faults_are_cleared(world):
    emu = world['emu']
    model = dl.models.get(model_id=world['model']['id'])
    emu.add_fault('error', emu.metrics_publish(2))

    def publish(x):
        return model.metrics.create(samples=[dl.PlotSample(figure='loss', legend='train', x=x, y=1.0)],
                                    dataset_id=world['dataset']['id'])
    assert publish(1) is True
    with pytest.raises(dl.exceptions.InternalServerError):
        publish(2)
    emu.clear_faults()
    assert publish(2) is True
    assert [m['data']['x'] for m in emu.metrics] == [1, 2] and len(emu.faults_hit) == 1
