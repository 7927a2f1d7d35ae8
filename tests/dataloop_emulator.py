"""In-memory emulator of the Dataloop REST API, for offline tests with the real dtlpy SDK.

Why: the adapter's platform flows (train_model, predict_items, evaluate_model)
go through dtlpy's repositories, which speak HTTP. Mocking dtlpy would test our
guesses about the SDK; answering its HTTP calls tests the SDK as it is. The
emulator keeps just enough platform state (projects, datasets with recipe and
ontology, items and their bytes, annotations, models, artifacts, metrics,
feature sets and their vectors) to make those flows run (a video item, like the
platform's, carries ``metadata.system.ffmpeg`` and ``metadata.fps`` read from
its bytes), and answers 404 with
the path for anything else, so a new SDK call shows up as a visible gap
instead of a silent pass.

Use it through the ``dataloop_env`` fixture in ``tests/conftest.py``::

    def test_something(dataloop_env):
        emu = dataloop_env                       # a started DataloopEmulator
        project = emu.seed_project('proj')       # also creates its 'Binaries' dataset
        dataset = emu.seed_dataset(project['id'], 'data', labels=['cat', 'dog'])
        item = emu.seed_item(dataset['id'], 'a.png', png_bytes, dir='/train',
                             annotations=[{'type': 'box', 'label': 'cat',
                                           'coordinates': [{'x': 1, 'y': 2}, {'x': 30, 'y': 40}]}])
        model = emu.seed_model(project['id'], dataset['id'], 'frcnn',
                               configuration={...}, labels=['cat', 'dog'],
                               subsets={'train': emu.dir_filter('/train'),
                                        'validation': emu.dir_filter('/validation')})
        m = dl.models.get(model_id=model['id'])  # the real SDK, talking to the emulator
        ...
        assert emu.missing == []                 # no endpoint the emulator lacks was called

Every ``seed_*`` helper returns the stored platform JSON (a dict; its ``id`` is
what the SDK wants). State is public for assertions: ``projects``, ``datasets``,
``recipes``, ``ontologies``, ``items``, ``blobs`` (item id -> bytes),
``annotations``, ``models``, ``metrics`` (list of published PlotSample dicts,
each with ``modelId`` and ``datasetId``), ``feature_sets`` and ``features`` (the
vectors ``embed_items`` uploads, each with ``featureSetId``, ``entityId`` and
``value``), ``requests`` (``Request(method, path,
status)`` for every call), ``missing`` (requests that hit no route) and
``errors`` (tracebacks of handler crashes, answered 500).

Helpers: ``dir_filter(dir, recursive=False)`` and ``tag_filter(subset)`` build
model subset filters; ``binaries_dataset(project_id)``, ``find_items(dataset_id,
filename)`` and ``item_annotations(item_id)`` read state back;
``make_token()`` is the unsigned JWT the fixture logs in with;
``add_fault(kind, where, times)`` injects the platform's failures (HTTP 500,
or a request read and never answered), for example on
``artifact_upload('weights/best.pth')`` or ``metrics_publish(2)``, and
``clear_faults()`` drops those not spent;
``connect_sdk(api_url)`` logs the SDK of any process in (a child process
driving ``train_model`` uses it too) and ``NoExportWaitTime`` replaces
``time`` in ``dtlpy.repositories.datasets`` to skip the SDK's export wait.

SDK behaviour worth knowing when writing flow tests (dtlpy 1.126):
- ``train_model`` calls ``prepare_data(root_path='tmp/<model id>')``, relative
  to the working directory: ``monkeypatch.chdir(tmp_path)`` first.
- ``prepare_data`` with explicit ``root_path``/``data_path``/``output_path``
  writes each into the model configuration (one PATCH each), and needs an
  explicit ``data_path`` to exist already.
- ``AnnotationCollection.add(model_info=...)`` puts it in ``metadata.user.model``;
  ``predict_items`` adds ``metadata.system.model`` itself before uploading.
- Model artifacts live in the project's Binaries dataset under
  ``/artifacts/models/<model name>/<relative path>``.

Assumptions where the platform's exact behaviour is not visible offline (kept
deliberately simple, change them here if the platform proves different):
- ``*`` and ``**`` in ``filename``/``dir`` values match any characters,
  ``/`` included (the SDK's own cache translates both to SQL ``%``, and
  ``artifacts.upload`` lists nested artifact folders with ``dir: <path>*``).
- An export's ``annotationsQuery`` filters the annotations written into each
  item JSON (prepare_data relies on it to leave model-made annotations out).
- An item uploaded into a folder whose name starts with ``.`` is hidden
  (``/.modelscores``, ``/.dataloop/...``): dtlpymetrics uploads its score
  files to ``/.modelscores`` with a plain ``items.upload`` and then looks them
  up with ``hidden: True``, and the SDK lists its own ``/.dataloop/dqlfilters``
  uploads only with the default ``hidden: False`` filter turned off.
- Ids are 24 hex digits that increase in creation order (the SDK splits big
  exports by ObjectId ranges, so ids must sort and parse as ObjectIds).
- A request whose client goes away before its body is complete (a killed
  process mid-upload) is dropped unanswered and changes nothing, as a real
  server does; it is not recorded in ``requests``.
"""
import base64
import collections
import copy
import datetime
import io
import itertools
import json
import math
import mimetypes
import re
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

API_PREFIX = '/api/v1'
USER_EMAIL = 'tester@emulator.local'

Request = collections.namedtuple('Request', 'method path status')


def make_token(email=USER_EMAIL, ttl_s=7 * 24 * 3600):
    """An unsigned JWT with a future ``exp``: dtlpy only decodes it, never verifies it."""
    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b'=').decode()
    payload = {'email': email, 'sub': email, 'exp': int(time.time()) + ttl_s}
    return '{}.{}.{}'.format(b64({'alg': 'HS256', 'typ': 'JWT'}), b64(payload), 'emulator')


class NoExportWaitTime:
    """``time`` for dtlpy's datasets module, minus the fixed 2 s wait after each export request.

    The SDK waits because the real platform reports export progress late; the
    emulator's export commands are finished when returned, so the wait only
    slows tests (4 s per prepare_data with two subsets).
    """

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds):
        pass


def connect_sdk(api_url, alias='emulator'):
    """Point the real dtlpy SDK of this process at an emulator, logged in with an unsigned token.

    Set ``DATALOOP_PATH`` before importing dtlpy: the SDK keeps its cookie file there.
    """
    import dtlpy as dl
    dl.client_api.add_environment(environment=api_url, alias=alias, verify_ssl=False, token=make_token())
    dl.setenv(api_url)
    dl.client_api.token = make_token()
    dl.verbose.disable_progress_bar = True


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='milliseconds').replace('+00:00', 'Z')


def _get_path(doc, dotted):
    """Value at a dotted path (``metadata.system.model.name``), or a sentinel when absent."""
    value = doc
    for key in dotted.split('.'):
        if isinstance(value, dict) and key in value:
            value = value[key]
        else:
            return _MISSING
    return value


_MISSING = object()


def _glob_regex(pattern):
    """``*``/``**`` match anything (``/`` too), ``?`` one character; see module docstring."""
    out = ''
    for part in re.split(r'(\*+|\?)', pattern):
        out += '.*' if part.startswith('*') else '.' if part == '?' else re.escape(part)
    return re.compile('^{}$'.format(out))


class DQL:
    """Evaluates the subset of Dataloop's query language the SDK sends.

    Field values: a scalar means equality (a glob for ``filename``/``dir`` when
    it holds ``*``), a list means ``$in``, a dict holds operators. A list-valued
    document field matches when any element does (MongoDB semantics).
    """
    GLOB_FIELDS = ('filename', 'dir')
    ALIASES = {'annotationId': 'id'}

    @classmethod
    def match(cls, doc, query):
        if not query:
            return True
        for key, cond in query.items():
            if key == '$and':
                if not all(cls.match(doc, q) for q in cond):
                    return False
            elif key == '$or':
                if not any(cls.match(doc, q) for q in cond):
                    return False
            elif key == '$not':
                if cls.match(doc, cond):
                    return False
            elif not cls._field(doc, key, cond):
                return False
        return True

    @classmethod
    def _field(cls, doc, field, cond):
        value = _get_path(doc, cls.ALIASES.get(field, field))
        if isinstance(cond, dict) and cond and all(k.startswith('$') for k in cond):
            return all(cls._op(field, value, op, arg) for op, arg in cond.items())
        if isinstance(cond, list):
            return cls._op(field, value, '$in', cond)
        return cls._op(field, value, '$eq', cond)

    @classmethod
    def _eq(cls, field, value, expected):
        if value is _MISSING:
            return expected is None
        if isinstance(value, list) and not isinstance(expected, list):
            return any(cls._eq(field, v, expected) for v in value)
        if field in cls.GLOB_FIELDS and isinstance(expected, str) and '*' in expected:
            return isinstance(value, str) and bool(_glob_regex(expected).match(value))
        return value == expected

    @classmethod
    def _op(cls, field, value, op, arg):
        if op == '$eq':
            return cls._eq(field, value, arg)
        if op == '$ne':
            return not cls._eq(field, value, arg)
        if op == '$in':
            return any(cls._eq(field, value, a) for a in arg)
        if op == '$nin':
            return not any(cls._eq(field, value, a) for a in arg)
        if op == '$exists':
            return (value is not _MISSING) == bool(arg)
        if op == '$glob':
            return isinstance(value, str) and bool(_glob_regex(arg).match(value))
        if op == '$regex':
            return isinstance(value, str) and re.search(arg, value) is not None
        if op in ('$gt', '$gte', '$lt', '$lte'):
            if value is _MISSING or value is None:
                return False
            try:
                return {'$gt': value > arg, '$gte': value >= arg, '$lt': value < arg, '$lte': value <= arg}[op]
            except TypeError:
                return False
        raise ValueError('DQL operator not emulated: {} on {}'.format(op, field))


class DataloopEmulator:
    """A stateful fake of the Dataloop gate (``/api/v1``) on 127.0.0.1, in a background thread."""

    def __init__(self, host='127.0.0.1', port=0):
        self._host, self._port = host, port
        self._server = None
        self._thread = None
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._id_prefix = '{:08x}'.format(int(time.time()))
        self.projects, self.datasets, self.recipes, self.ontologies = {}, {}, {}, {}
        self.items, self.blobs, self.annotations, self.models, self.commands = {}, {}, {}, {}, {}
        self.feature_sets, self.features = {}, {}
        self.metrics, self.requests, self.missing, self.errors = [], [], [], []
        self.faults, self.faults_hit = [], []
        self._released = threading.Event()  # lets stalled requests go (unanswered) when the emulator stops
        self.routes = [(method, re.compile('^{}$'.format(pattern)), getattr(self, handler))
                       for method, pattern, handler in self.ROUTES]

    # ------------------------------------------------------------------ lifecycle
    def start(self):
        handler = type('Handler', (_RequestHandler,), {'emulator': self})
        self._server = _Server((self._host, self._port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={'poll_interval': 0.05},
                                        name='dataloop-emulator', daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def base_url(self):
        host, port = self._server.server_address[:2]
        return 'http://{}:{}'.format(host, port)

    @property
    def api_url(self):
        """The value to give ``dl.client_api.add_environment(environment=...)``."""
        return self.base_url + API_PREFIX

    # ------------------------------------------------------------------ helpers
    def new_id(self):
        """ObjectId-shaped and increasing, because the SDK sorts and bisects item ids."""
        return '{}{:016x}'.format(self._id_prefix, next(self._ids))

    def url(self, path):
        return self.api_url + path

    @staticmethod
    def dir_filter(directory, recursive=False, page_size=1000):
        """A model subset filter: items directly in ``directory``, or anywhere below it when ``recursive``."""
        where = {'filename': directory.rstrip('/') + '/**'} if recursive else {'dir': directory}
        return {'filter': {'$and': [where, {'hidden': False}, {'type': 'file'}]},
                'page': 0, 'pageSize': page_size, 'resource': 'items'}

    @staticmethod
    def tag_filter(subset, page_size=1000):
        """A model subset filter on ``metadata.system.tags.<subset>`` (the platform's ML subset tags)."""
        return {'filter': {'$and': [{'metadata.system.tags.{}'.format(subset): True},
                                    {'hidden': False}, {'type': 'file'}]},
                'page': 0, 'pageSize': page_size, 'resource': 'items'}

    def binaries_dataset(self, project_id):
        return next(d for d in self.datasets.values()
                    if d['name'] == 'Binaries' and project_id in d['projects'])

    def item_annotations(self, item_id):
        return [a for a in self.annotations.values() if a['itemId'] == item_id]

    def find_items(self, dataset_id=None, filename=None):
        """Stored items, optionally by dataset and exact remote path; handy in assertions."""
        return [i for i in self.items.values()
                if (dataset_id is None or i['datasetId'] == dataset_id)
                and (filename is None or i['filename'] == filename)]

    # ------------------------------------------------------------------ seeding
    def seed_project(self, name='project'):
        """A project and its ``Binaries`` dataset (where the SDK puts model artifacts and exports)."""
        with self._lock:
            pid = self.new_id()
            self.projects[pid] = {
                'id': pid, 'name': name, 'url': self.url('/projects/' + pid), 'createdAt': _now(),
                'creator': USER_EMAIL, 'role': 'owner', 'org': {'id': 'emulator-org', 'name': 'emulator'},
                'accountId': 'emulator-account', 'isBlocked': False, 'archived': False,
                'feconstants': [], 'contributors': [], 'groups': [], 'features': {}, 'metadata': {},
            }
            self.seed_dataset(pid, 'Binaries', labels=[], system=True)
            return self.projects[pid]

    def seed_dataset(self, project_id, name, labels=(), system=False):
        """A dataset with a recipe and an ontology holding ``labels`` (strings or label dicts)."""
        with self._lock:
            if project_id not in self.projects:
                raise KeyError('unknown project {}'.format(project_id))
            did, rid, oid = self.new_id(), self.new_id(), self.new_id()
            roots = [label if isinstance(label, dict) else
                     {'tag': label, 'displayLabel': label, 'color': '#{:06x}'.format((i * 2654435761) % 0xFFFFFF),
                      'attributes': [], 'children': []}
                     for i, label in enumerate(labels)]
            self.ontologies[oid] = {'id': oid, 'title': name + '-ontology', 'roots': roots, 'attributes': [],
                                    'url': self.url('/ontologies/' + oid), 'creator': USER_EMAIL,
                                    'metadata': {'system': {'projectIds': [project_id]}}}
            self.recipes[rid] = {'id': rid, 'title': name + '-recipe', 'ontologyIds': [oid],
                                 'projectIds': [project_id], 'url': self.url('/recipes/' + rid),
                                 'creator': USER_EMAIL, 'metadata': {'system': {}}, 'examples': [],
                                 'customActions': [], 'uiSettings': {}, 'instructions': None}
            self.datasets[did] = {
                'id': did, 'name': name, 'projects': [project_id], 'url': self.url('/datasets/' + did),
                'items': self.url('/datasets/{}/items'.format(did)), 'createdAt': _now(), 'updatedAt': _now(),
                'creator': USER_EMAIL, 'itemsCount': 0, 'annotated': 0, 'readonly': False, 'accessLevel': 'owner',
                'readableType': 'dataset', 'directoryTree': {}, 'export': {}, 'expirationOptions': None,
                'metadata': {'system': {'recipes': [rid], 'scope': 'system' if system else 'project'}},
            }
            return self.datasets[did]

    def seed_item(self, dataset_id, filename, data, annotations=(), dir='/', metadata=None,
                  mimetype=None, width=None, height=None, hidden=False):
        """An item holding ``data`` at ``<dir>/<filename>``, with platform-JSON ``annotations``.

        Width/height come from the bytes when PIL can read them (pass them to
        override, e.g. for a file that is not an image).
        """
        with self._lock:
            if dataset_id not in self.datasets:
                raise KeyError('unknown dataset {}'.format(dataset_id))
            directory = '/' + dir.strip('/') if dir.strip('/') else '/'
            remote = (directory.rstrip('/') + '/' + filename.lstrip('/'))
            item = self._store_item(dataset_id, remote, data, mimetype=mimetype, metadata=metadata,
                                    width=width, height=height, hidden=hidden)
            for ann in annotations:
                self._store_annotation(item, ann)
            return item

    def seed_model(self, project_id, dataset_id, name, configuration=None, labels=(), subsets=None,
                   status='created', input_type='image', output_type='box', metadata=None, **extra):
        """A model entity as the platform returns it; ``subsets`` go to ``metadata.system.subsets``."""
        with self._lock:
            mid = self.new_id()
            model_metadata = copy.deepcopy(metadata) if metadata else {}
            model_metadata.setdefault('system', {})
            if subsets is not None:
                model_metadata['system']['subsets'] = copy.deepcopy(subsets)
            self.models[mid] = dict({
                'id': mid, 'name': name, 'url': self.url('/ml/models/' + mid),
                'context': {'project': project_id, 'org': 'emulator-org', 'creator': USER_EMAIL},
                'datasetId': dataset_id, 'packageId': extra.pop('package_id', None), 'projectId': project_id,
                'configuration': copy.deepcopy(configuration or {}), 'labels': list(labels), 'status': status,
                'metadata': model_metadata, 'artifacts': [], 'inputType': input_type, 'outputType': output_type,
                'moduleName': 'model-adapter', 'scope': 'project', 'version': '1.0.0', 'tags': [],
                'description': None, 'statusLogs': [], 'createdAt': _now(), 'updatedAt': _now(),
                'creator': USER_EMAIL,
            }, **extra)
            return self.models[mid]

    # ------------------------------------------------------------------ storage
    def _store_item(self, dataset_id, remote, data, mimetype=None, metadata=None, width=None, height=None,
                    hidden=False, item_id=None):
        data = bytes(data)
        iid = item_id or self.new_id()
        directory, name = remote.rsplit('/', 1)
        mimetype = mimetype or mimetypes.guess_type(name)[0] or 'application/octet-stream'
        system = {'size': len(data), 'mimetype': mimetype, 'originalname': name, 'encoding': '7bit',
                  'refs': [], 'isBinary': True}
        if width is None and height is None and mimetype.startswith('image/'):
            width, height = self._image_size(data)
        video = self._video_metadata(data) if mimetype.startswith('video/') else {}
        if video and width is None and height is None:
            width, height = video['width'], video['height']
        if width is not None:
            system['width'], system['height'] = width, height
        old = self.items.get(iid)
        item = {
            'id': iid, 'datasetId': dataset_id, 'dataset': self.url('/datasets/' + dataset_id),
            'url': self.url('/items/' + iid), 'stream': self.url('/items/{}/stream'.format(iid)),
            'thumbnail': self.url('/items/{}/thumbnail'.format(iid)),
            'annotations': self.url('/items/{}/annotations'.format(iid)),
            'filename': remote, 'name': name, 'dir': directory or '/', 'type': 'file', 'hidden': hidden,
            'annotated': False, 'annotationsCount': 0, 'createdAt': old['createdAt'] if old else _now(),
            'updatedAt': _now(), 'creator': USER_EMAIL, 'description': None,
            'metadata': {'system': system, 'user': {}},
        }
        if video:  # as the platform's ffmpeg probe writes it: system.ffmpeg and a top-level fps
            item['metadata']['system']['ffmpeg'] = video
            item['metadata']['fps'] = video['fps']
        for key, value in (metadata or {}).items():
            if key == 'system':
                item['metadata']['system'].update(copy.deepcopy(value))
            else:
                item['metadata'][key] = copy.deepcopy(value)
        self.items[iid], self.blobs[iid] = item, data
        self._recount(iid)
        return item

    @staticmethod
    def _video_metadata(data):
        """{nb_frames, avg_frame_rate, fps, width, height, duration} of a video's bytes; {} if OpenCV cannot open it."""
        import tempfile
        import cv2
        with tempfile.NamedTemporaryFile(suffix='.video') as f:
            f.write(data)
            f.flush()
            capture = cv2.VideoCapture(f.name, cv2.CAP_FFMPEG)
            try:
                if not capture.isOpened():
                    return {}
                fps = float(capture.get(cv2.CAP_PROP_FPS) or 0)
                frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
                width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            finally:
                capture.release()
        return {'nb_frames': frames, 'avg_frame_rate': '{}/1'.format(fps), 'fps': fps, 'width': width,
                'height': height, 'duration': frames / fps if fps else None}

    @staticmethod
    def _image_size(data):
        try:
            from PIL import Image
            with Image.open(io.BytesIO(data)) as img:
                return img.size
        except Exception:
            return None, None

    def _store_annotation(self, item, ann):
        ann = copy.deepcopy(ann)
        aid = self.new_id()
        metadata = ann.get('metadata') or {}
        metadata.setdefault('system', {}).setdefault('status', None)
        metadata.setdefault('user', {})
        stored = dict(ann, **{
            'id': aid, 'itemId': item['id'], 'datasetId': item['datasetId'],
            'item': item['url'], 'dataset': item['dataset'], 'url': self.url('/annotations/' + aid),
            'metadata': metadata, 'creator': ann.get('creator', USER_EMAIL), 'createdAt': _now(),
            'updatedAt': _now(), 'updatedBy': USER_EMAIL, 'attributes': ann.get('attributes', []),
        })
        stored.setdefault('label', None)
        stored.setdefault('coordinates', [])
        self.annotations[aid] = stored
        self._recount(item['id'])
        return stored

    def _recount(self, item_id):
        item = self.items[item_id]
        item['annotationsCount'] = len(self.item_annotations(item_id))
        item['annotated'] = item['annotationsCount'] > 0

    def _item_with_annotations(self, item, annotation_query=None):
        out = copy.deepcopy(item)
        anns = sorted(self.item_annotations(item['id']), key=lambda a: a['id'])
        out['annotations'] = [copy.deepcopy(a) for a in anns if DQL.match(a, annotation_query or {})]
        return out

    # ------------------------------------------------------------------ queries
    def _scope(self, resource, dataset_id=None, context=None):
        """The documents a query runs over: one dataset's items/annotations, or datasets by project."""
        if resource == 'items':
            return [i for i in self.items.values() if i['datasetId'] == dataset_id]
        if resource == 'annotations':
            return [a for a in self.annotations.values() if a['datasetId'] == dataset_id]
        if resource == 'datasets':
            projects = (context or {}).get('projects')
            return [d for d in self.datasets.values() if not projects or set(projects) & set(d['projects'])]
        raise ValueError('query resource not emulated: {}'.format(resource))

    def _select(self, docs, query):
        """Filter + join + sort, as the platform applies a DQL body."""
        selected = [d for d in docs if DQL.match(d, query.get('filter') or {})]
        join = query.get('join')
        if join and join.get('filter'):
            if join.get('on', {}).get('resource', 'annotations') != 'annotations':
                raise ValueError('join not emulated: {}'.format(join.get('on')))
            selected = [d for d in selected
                        if any(DQL.match(a, join['filter']) for a in self.item_annotations(d['id']))]
        keys = list((query.get('sort') or {}).items()) or [('id', 'ascending')]  # id order = creation order
        for field, direction in reversed(keys):
            selected.sort(key=lambda d: (_get_path(d, field) is _MISSING, str(_get_path(d, field))),
                          reverse=str(direction).lower() in ('descending', 'desc', '-1'))
        return selected

    @staticmethod
    def _page(docs, query):
        page, size = int(query.get('page') or 0), query.get('pageSize', 1000)
        size = 1000 if size is None else int(size)
        total = len(docs)
        pages = math.ceil(total / size) if size > 0 else 0
        chunk = docs[page * size:(page + 1) * size] if size > 0 else []
        return {'items': chunk, 'totalItemsCount': total, 'totalPagesCount': pages,
                'hasNextPage': size > 0 and (page + 1) * size < total}

    # ------------------------------------------------------------------ faults
    def add_fault(self, kind, where, times=None):
        """Make the requests for which ``where(req)`` is true fail, the first ``times`` of them (all when None).

        ``kind``: ``'error'`` answers HTTP 500 (the platform failing) and changes nothing (an upload's answer
        comes once its fields before the file are read, and the client stops sending the file); ``'stall'``
        reads the whole request and never answers (a stalled connection), until the emulator stops. ``where``
        sees the request's body up to an upload's file bytes. Each hit is recorded in ``faults_hit`` as a
        ``Request``.
        """
        if kind not in ('error', 'stall'):
            raise ValueError('fault kind must be error or stall, got {!r}'.format(kind))
        self.faults.append({'kind': kind, 'where': where, 'left': times})

    def clear_faults(self):
        """Drop the faults not spent yet: what follows runs on a healthy platform."""
        with self._lock:
            self.faults.clear()

    @staticmethod
    def artifact_upload(relative=''):
        """A fault's ``where``: an item upload into a model's artifacts whose path ends with ``relative``."""
        def where(req):
            if req.method != 'POST' or not re.match(r'^/datasets/[^/]+/items$', req.path):
                return False
            fields = _parse_multipart(req.headers.get('Content-Type', ''), req.body)
            remote = '/' + (fields.get('path') or [b''])[0].decode().lstrip('/')
            return remote.startswith('/artifacts/models/') and remote.endswith(relative)
        return where

    @staticmethod
    def metrics_publish(x):
        """A fault's ``where``: publishing a model's metrics with a sample at ``x`` (training's epoch number)."""
        def where(req):
            if req.method != 'POST' or req.path != '/ml/metrics/publish':
                return False
            samples = req.json
            return any((sample.get('data') or {}).get('x') == x
                       for sample in (samples if isinstance(samples, list) else [samples]))
        return where

    def _fault_for(self, req):
        with self._lock:
            for fault in self.faults:
                if fault['left'] != 0 and fault['where'](req):
                    if fault['left'] is not None:
                        fault['left'] -= 1
                    self.faults_hit.append(Request(req.method, req.path, fault['kind']))
                    return fault['kind']
        return None

    # ------------------------------------------------------------------ routes
    ROUTES = [
        ('GET', r'/projects/(?P<pid>[^/]+)', 'get_project'),
        ('POST', r'/datasets/query', 'query_datasets'),
        ('GET', r'/datasets/(?P<did>[^/]+)', 'get_dataset'),
        ('POST', r'/datasets/(?P<did>[^/]+)/query', 'query_dataset'),
        ('POST', r'/datasets/(?P<did>[^/]+)/export', 'export_dataset'),
        ('POST', r'/datasets/(?P<did>[^/]+)/items', 'upload_item'),
        ('GET', r'/recipes/(?P<rid>[^/]+)', 'get_recipe'),
        ('GET', r'/ontologies/(?P<oid>[^/]+)', 'get_ontology'),
        ('GET', r'/items/(?P<iid>[^/]+)', 'get_item'),
        ('DELETE', r'/items/(?P<iid>[^/]+)', 'delete_item'),
        ('GET', r'/items/(?P<iid>[^/]+)/stream', 'stream_item'),
        ('GET', r'/items/(?P<iid>[^/]+)/annotations', 'list_item_annotations'),
        ('POST', r'/items/(?P<iid>[^/]+)/annotations', 'create_annotations'),
        ('GET', r'/annotations/(?P<aid>[^/]+)', 'get_annotation'),
        ('DELETE', r'/annotations/(?P<aid>[^/]+)', 'delete_annotation'),
        ('GET', r'/commands/(?P<cid>[^/]+)', 'get_command'),
        ('GET', r'/ml/models/(?P<mid>[^/]+)', 'get_model'),
        ('PATCH', r'/ml/models/(?P<mid>[^/]+)', 'patch_model'),
        ('POST', r'/ml/metrics/publish', 'publish_metrics'),
        ('POST', r'/ml/metrics/query', 'query_metrics'),
        ('POST', r'/features/sets/query', 'query_feature_sets'),
        ('POST', r'/features/sets', 'create_feature_set'),
        ('GET', r'/features/sets/(?P<fsid>[^/]+)', 'get_feature_set'),
        ('POST', r'/features/vectors/query', 'query_features'),
        ('POST', r'/features/vectors', 'create_features'),
    ]

    def dispatch(self, method, path, query, headers, body):
        """Route one request; returns (status, payload, extra headers). Payload: JSON-able or bytes."""
        if not path.startswith(API_PREFIX):
            return None
        api_path = path[len(API_PREFIX):].rstrip('/') or '/'
        req = _Req(method, api_path, query, headers, body)
        for route_method, regex, handler in self.routes:
            match = regex.match(api_path)
            if route_method == method and match:
                with self._lock:
                    return handler(req, **match.groupdict())
        return None

    def _not_found(self, what, key):
        return 404, {'message': '{} not found: {}'.format(what, key)}, {}

    def get_project(self, req, pid):
        """Projects are mostly lazy in the SDK; it fetches one for its name/org or dataset listing."""
        if pid not in self.projects:
            return self._not_found('project', pid)
        return 200, self.projects[pid], {}

    def query_datasets(self, req):
        """``project.datasets.list`` / ``_get_binaries_dataset``: DQL over datasets, scoped by context.projects."""
        body = req.json or {}
        docs = self._select(self._scope('datasets', context=body.get('context')), body)
        return 200, self._page(docs, body), {}

    def get_dataset(self, req, did):
        if did not in self.datasets:
            return self._not_found('dataset', did)
        dataset = self.datasets[did]
        dataset['itemsCount'] = len(self.find_items(did))
        dataset['annotated'] = sum(1 for i in self.find_items(did) if i['annotated'])
        return 200, dataset, {}

    def query_dataset(self, req, did):
        """Item/annotation listing, counting, and delete-by-query (``delete: true``) in one dataset."""
        if did not in self.datasets:
            return self._not_found('dataset', did)
        body = req.json or {}
        resource = body.get('resource', 'items')
        docs = self._select(self._scope(resource, dataset_id=did), body)
        if body.get('delete'):
            for doc in docs:
                self._delete(resource, doc['id'])
            return 200, {'deleted': len(docs)}, {}
        if body.get('update'):
            for doc in docs:
                _deep_merge(doc, body['update'])
            return 200, {'updated': len(docs)}, {}
        return 200, self._page(docs, body), {}

    def _delete(self, resource, doc_id):
        if resource == 'annotations':
            ann = self.annotations.pop(doc_id, None)
            if ann is not None and ann['itemId'] in self.items:
                self._recount(ann['itemId'])
        elif resource == 'items':
            self.items.pop(doc_id, None)
            self.blobs.pop(doc_id, None)
            for aid in [a['id'] for a in self.item_annotations(doc_id)]:
                self.annotations.pop(aid)

    def export_dataset(self, req, did):
        """Dataset export (what ``prepare_data`` downloads through): a JSON file of item JSONs.

        The file is stored as a hidden item in the project's Binaries dataset
        and the answer is an already-finished command whose ``spec.outputItemId``
        points at it, so the SDK downloads it without polling.
        """
        if did not in self.datasets:
            return self._not_found('dataset', did)
        body = req.json or {}
        if body.get('exportType', 'json') != 'json':
            return 400, {'message': 'only exportType json is emulated'}, {}
        items_query = body.get('itemsQuery') or {}
        docs = self._select(self._scope('items', dataset_id=did), items_query)
        include = (body.get('annotations') or {}).get('include', False)
        ann_query = (body.get('annotationsQuery') or {}).get('filter')
        exported = []
        for item in docs:
            out = self._item_with_annotations(item, ann_query) if include else copy.deepcopy(item)
            if not include:
                out.pop('annotations', None)
            exported.append(out)
        project_id = self.datasets[did]['projects'][0]
        binaries = self.binaries_dataset(project_id)
        cid = self.new_id()
        export_item = self._store_item(binaries['id'], '/.dataloop/exports/{}/{}.json'.format(cid, did),
                                       json.dumps(exported).encode(), mimetype='application/json', hidden=True)
        command = {'id': cid, 'url': self.url('/commands/' + cid), 'status': 'success', 'type': 'DatasetExport',
                   'progress': 100, 'spec': {'outputItemId': export_item['id'], 'itemsCount': len(exported)},
                   'error': None, 'createdAt': _now(), 'updatedAt': _now()}
        self.commands[cid] = command
        return 200, command, {}

    def get_command(self, req, cid):
        if cid not in self.commands:
            return self._not_found('command', cid)
        return 200, self.commands[cid], {}

    def upload_item(self, req, did):
        """The SDK's upload: multipart (often chunked) with ``type``, ``path``, ``file`` and optional ``metadata``.

        ``?mode=overwrite`` replaces the bytes of an existing item at that path
        (keeping its id); ``skip`` returns the existing item untouched.
        """
        if did not in self.datasets:
            return self._not_found('dataset', did)
        fields = _parse_multipart(req.headers.get('Content-Type', ''), req.body)
        if 'file' not in fields or 'path' not in fields:
            return 400, {'message': 'multipart needs file and path, got {}'.format(sorted(fields))}, {}
        remote = '/' + fields['path'][0].decode().lstrip('/')
        metadata = json.loads(fields['metadata'][0]) if 'metadata' in fields else None
        mode = req.query.get('mode', ['skip'])[0]
        existing = self.find_items(did, remote)
        if existing and mode != 'overwrite':
            return 200, existing[0], {'x-item-op': 'skip'}
        hidden = any(part.startswith('.') for part in remote.split('/')[:-1])  # see the module docstring
        item = self._store_item(did, remote, fields['file'][0], metadata=metadata, hidden=hidden,
                                item_id=existing[0]['id'] if existing else None)
        return 200, item, {'x-item-op': 'overwrite' if existing else 'created'}

    def get_recipe(self, req, rid):
        if rid not in self.recipes:
            return self._not_found('recipe', rid)
        return 200, self.recipes[rid], {}

    def get_ontology(self, req, oid):
        if oid not in self.ontologies:
            return self._not_found('ontology', oid)
        return 200, self.ontologies[oid], {}

    def get_item(self, req, iid):
        if iid not in self.items:
            return self._not_found('item', iid)
        return 200, self.items[iid], {}

    def delete_item(self, req, iid):
        if iid not in self.items:
            return self._not_found('item', iid)
        self._delete('items', iid)
        return 200, {}, {}

    def stream_item(self, req, iid):
        """Item bytes; honours ``Range: bytes=N-`` because the downloader resumes with it."""
        if iid not in self.blobs:
            return self._not_found('item', iid)
        data = self.blobs[iid]
        match = re.match(r'bytes=(\d+)-', req.headers.get('Range', ''))
        if match and int(match.group(1)) > 0:
            return 206, data[int(match.group(1)):], {'Content-Type': 'application/octet-stream'}
        return 200, data, {'Content-Type': self.items[iid]['metadata']['system']['mimetype']}

    def list_item_annotations(self, req, iid):
        if iid not in self.items:
            return self._not_found('item', iid)
        return 200, self._item_with_annotations(self.items[iid])['annotations'], {}

    def create_annotations(self, req, iid):
        """``item.annotations.upload``: a list of annotation JSONs in, the stored ones (with ids) out."""
        if iid not in self.items:
            return self._not_found('item', iid)
        body = req.json
        batch = body if isinstance(body, list) else [body]
        return 200, [self._store_annotation(self.items[iid], ann) for ann in batch], {}

    def get_annotation(self, req, aid):
        if aid not in self.annotations:
            return self._not_found('annotation', aid)
        return 200, self.annotations[aid], {}

    def delete_annotation(self, req, aid):
        if aid not in self.annotations:
            return self._not_found('annotation', aid)
        self._delete('annotations', aid)
        return 200, {}, {}

    def get_model(self, req, mid):
        if mid not in self.models:
            return self._not_found('model', mid)
        return 200, self.models[mid], {}

    def patch_model(self, req, mid):
        """``model.update()`` sends the whole model JSON; top-level keys replace the stored ones."""
        if mid not in self.models:
            return self._not_found('model', mid)
        model = self.models[mid]
        fixed = ('id', 'url', 'createdAt', 'creator', 'context')
        for key, value in (req.json or {}).items():
            if key not in fixed:
                model[key] = copy.deepcopy(value)
        model['updatedAt'] = _now()
        return 200, model, {}

    def publish_metrics(self, req):
        """``model.metrics.create``: a list of PlotSample JSONs, each with modelId and datasetId."""
        body = req.json
        samples = body if isinstance(body, list) else [body]
        self.metrics.extend(copy.deepcopy(samples))
        return 200, samples, {}

    def query_metrics(self, req):
        body = req.json or {}
        docs = [m for m in self.metrics if DQL.match(m, body.get('filter') or {})]
        return 200, self._page(docs, body), {}

    # ------------------------------------------------------------------ feature sets (embed_items)
    @staticmethod
    def _in_projects(doc, body):
        projects = (body.get('context') or {}).get('projects')
        return not projects or doc.get('project') in projects

    def query_feature_sets(self, req):
        """``project.feature_sets.list`` (the adapter looks its model's set up by ``modelId``, then by name)."""
        body = req.json or {}
        docs = self._select([f for f in self.feature_sets.values() if self._in_projects(f, body)], body)
        return 200, self._page(docs, body), {}

    def create_feature_set(self, req):
        """``feature_sets.create``: the platform answers a list holding the new set."""
        body = req.json or {}
        if not isinstance(body.get('size'), int) or body['size'] < 1:
            return 400, {'message': 'feature set size must be a positive int, got {!r}'.format(body.get('size'))}, {}
        fsid = self.new_id()
        self.feature_sets[fsid] = dict(copy.deepcopy(body), id=fsid, url=self.url('/features/sets/' + fsid),
                                       createdAt=_now(), creator=USER_EMAIL, updatedBy=USER_EMAIL)
        return 200, [self.feature_sets[fsid]], {}

    def get_feature_set(self, req, fsid):
        if fsid not in self.feature_sets:
            return self._not_found('feature set', fsid)
        return 200, self.feature_sets[fsid], {}

    def create_features(self, req):
        """``features.create``: a list of vectors, each for one entity; a length other than the set's size is refused."""
        body = req.json
        entries = body if isinstance(body, list) else [body]
        for entry in entries:
            feature_set = self.feature_sets.get(entry.get('featureSetId'))
            if feature_set is None:
                return self._not_found('feature set', entry.get('featureSetId'))
            if len(entry.get('value') or []) != feature_set['size']:
                return 400, {'message': 'vector of length {} for feature set of size {}'.format(
                    len(entry.get('value') or []), feature_set['size'])}, {}
        created = []
        for entry in entries:
            fid = self.new_id()
            self.features[fid] = dict(copy.deepcopy(entry), id=fid, url=self.url('/features/vectors/' + fid),
                                      createdAt=_now(), creator=USER_EMAIL)
            created.append(self.features[fid])
        return 200, created, {}

    def query_features(self, req):
        """``feature_set.features.list``: DQL over vectors (by ``featureSetId``, ``entityId``, ...)."""
        body = req.json or {}
        docs = self._select([f for f in self.features.values() if self._in_projects(f, body)], body)
        return 200, self._page(docs, body), {}


def _deep_merge(target, update):
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _parse_multipart(content_type, body):
    """Minimal multipart/form-data reader: {field name: [raw bytes, ...]}; exact for binary parts.

    Each part's content is copied once, by index: checkpoints of a hundred megabytes come through here."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        return {}
    delimiter = b'--' + match.group(1).encode()
    fields = {}
    start = body.find(delimiter)
    while start != -1:
        start += len(delimiter)
        if body.startswith(b'--', start):
            break
        end = body.find(delimiter, start)
        stop = len(body) if end == -1 else end
        head_end = body.find(b'\r\n\r\n', start, stop)
        head_stop, content_start = (stop, stop) if head_end == -1 else (head_end, head_end + 4)
        name = re.search(rb'name="([^"]*)"', body[start:head_stop])
        if name:
            content_stop = stop - 2 if stop - content_start >= 2 and body[stop - 2:stop] == b'\r\n' else stop
            fields.setdefault(name.group(1).decode(), []).append(body[content_start:content_stop])
        start = end
    return fields


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client killed mid-request (a test's SIGKILL) is expected: no traceback for a reset connection."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


_FILE_PART = b'name="file"'  # the SDK's upload form sends its fields (type, path, metadata) before the file


class _ClientGone(Exception):
    """The connection closed before the request body was complete."""


class _Req:
    def __init__(self, method, path, query, headers, body):
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body

    @property
    def json(self):
        return json.loads(self.body) if self.body else None


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    emulator = None  # set on a per-server subclass

    def log_message(self, format, *args):  # the request log lives in emulator.requests
        pass

    def _body_chunks(self):
        """The request body's pieces as they arrive (chunked or Content-Length); _ClientGone if it ends early."""
        if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
            while True:
                line = self.rfile.readline()
                if not line:
                    raise _ClientGone('connection closed inside a chunked body')
                size = int(line.split(b';')[0].strip() or b'0', 16)
                if size == 0:
                    while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                        pass
                    return
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    raise _ClientGone('connection closed inside a chunk')
                yield chunk
                self.rfile.readline()
        left = int(self.headers.get('Content-Length') or 0)
        while left > 0:
            chunk = self.rfile.read1(min(left, 1 << 20))  # what has arrived: a fault may answer before the rest
            if not chunk:
                raise _ClientGone('connection closed before Content-Length bytes arrived')
            left -= len(chunk)
            yield chunk

    def _read_body_head(self, chunks):
        """The body up to the start of a multipart file's bytes (all of any other body): what a fault decides on."""
        multipart = self.headers.get('Content-Type', '').startswith('multipart/form-data')
        head, tail = [], b''
        for chunk in chunks:
            head.append(chunk)
            if multipart:
                if _FILE_PART in tail + chunk:
                    break
                tail = (tail + chunk)[1 - len(_FILE_PART):]  # a marker split across pieces is still found
        return b''.join(head)

    def _handle(self):
        emulator = self.emulator
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        chunks = self._body_chunks()
        try:
            body = self._read_body_head(chunks)
            api_path = path[len(API_PREFIX):].rstrip('/') or '/'
            fault = emulator._fault_for(_Req(self.command, api_path, parse_qs(parts.query), self.headers, body))
            if fault == 'error':  # answered before the file's bytes, as a gateway does: the client stops sending
                self._answer_and_drain(path, chunks)
                return
            body += b''.join(chunks)
        except (_ClientGone, ConnectionError):
            self.close_connection = True
            return
        if fault == 'stall':
            emulator._released.wait()
            self.close_connection = True
            return
        try:
            result = emulator.dispatch(self.command, path, parse_qs(parts.query), self.headers, body)
            if result is None:
                result = 404, {'message': 'emulator has no route for {} {}'.format(self.command, path),
                               'path': path}, {}
                emulator.missing.append(Request(self.command, path, 404))
        except Exception:
            trace = traceback.format_exc()
            emulator.errors.append('{} {}\n{}'.format(self.command, path, trace))
            result = 500, {'message': 'emulator error', 'trace': trace}, {}
        status, payload, headers = result
        emulator.requests.append(Request(self.command, path, status))
        if isinstance(payload, (bytes, bytearray)):
            data, ctype = bytes(payload), 'application/octet-stream'
        else:
            data, ctype = json.dumps(payload).encode(), 'application/json'
        self.send_response(status)
        headers = dict(headers)
        self.send_header('Content-Type', headers.pop('Content-Type', ctype))
        self.send_header('Content-Length', str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(data)

    def _answer_and_drain(self, path, chunks):
        """An injected HTTP 500 sent at once; the rest of the body is read and dropped until the client stops
        (closing unread would reset the connection under the answer)."""
        self.emulator.requests.append(Request(self.command, path, 500))
        data = json.dumps({'message': 'emulator fault: internal server error'}).encode()
        self.send_response(500)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Connection', 'close')
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        self.close_connection = True
        for _ in chunks:
            pass

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = _handle
