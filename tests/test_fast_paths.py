"""The speed pieces on CPU: grouped batches, padding buckets, the GPU inference copy, bulk boxes."""
import collections
import io
import threading
import time

import dtlpy as dl
import numpy as np
import pytest
import torch
from PIL import Image

from torchvision.models.detection._utils import BoxCoder

from utils.data.group_by_aspect_ratio import aspect_ratio_groups, build_grouped_batch_sampler
from utils.inference.prediction import NetworkCache, Prefetcher, fold_batch_norms, inference_network
from utils.platform.box_collection import boxes_to_collection
from utils.modeling.model_factory import BucketedTransform, build_model

VARIANT = 'fasterrcnn_mobilenet_v3_large_320_fpn'


# ----------------------------------------------------------------------------- grouped batches

SIZES = [(480, 640)] * 7 + [(640, 480)] * 5 + [(400, 400)] * 3 + [(200, 800)]  # (height, width)


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return [list(batch) for batch in sampler]


def test_grouped_batches_cover_every_index_within_one_group():
    groups = aspect_ratio_groups(SIZES)
    assert len(set(groups[:7])) == len(set(groups[7:12])) == len(set(groups[12:15])) == 1
    assert len({groups[0], groups[7], groups[12], groups[15]}) == 4  # landscape, portrait, square, panorama
    sampler = build_grouped_batch_sampler(SIZES, batch_size=4, seed=3)
    batches = epoch_batches(sampler, 0)
    assert len(batches) == len(sampler) == 2 + 2 + 1 + 1  # ceil(7/4) + ceil(5/4) + ceil(3/4) + ceil(1/4)
    # a group of at least 4 fills every batch; a smaller one makes one smaller batch: no image twice in a batch
    assert sorted(len(batch) for batch in batches) == [1, 3, 4, 4, 4, 4]
    assert all(len(set(batch)) == len(batch) for batch in batches)
    assert all(len({groups[i] for i in batch}) == 1 for batch in batches)
    counts = collections.Counter(i for batch in batches for i in batch)
    assert set(counts) == set(range(len(SIZES)))  # every index, every epoch
    # repeats only top up a group's last partial batch, with other members of that group
    assert sum(counts.values()) - len(SIZES) == sum(-n % 4 for n in (7, 5))


def test_grouped_batches_are_seeded_per_epoch():
    sampler = build_grouped_batch_sampler(SIZES, batch_size=4, seed=3)
    first = epoch_batches(sampler, 0)
    assert epoch_batches(build_grouped_batch_sampler(SIZES, batch_size=4, seed=3), 0) == first
    assert epoch_batches(sampler, 1) != first
    assert epoch_batches(build_grouped_batch_sampler(SIZES, batch_size=4, seed=4), 0) != first
    with pytest.raises(ValueError, match='image 1 has size 0x5'):
        aspect_ratio_groups([(4, 4), (0, 5)])


def test_grouped_sampler_drives_a_dataloader():
    sampler = build_grouped_batch_sampler(SIZES, batch_size=3, seed=0)
    loader = torch.utils.data.DataLoader(list(range(len(SIZES))), batch_sampler=sampler)
    assert sorted(set(torch.cat(list(loader)).tolist())) == list(range(len(SIZES)))


# ----------------------------------------------------------------------------- padding buckets

def test_padded_shapes_fall_on_the_bucket_grid():
    plain = build_model(VARIANT, 4, 320, 640).eval()
    bucketed = build_model(VARIANT, 4, 320, 640, padding_bucket=128).eval()
    assert isinstance(bucketed.transform, BucketedTransform) and not isinstance(plain.transform, BucketedTransform)
    grid = {320 + k * 128 for k in range(-2, 3)} | {640}
    shapes, plain_shapes = set(), set()
    for height in range(240, 481, 37):
        for width in range(320, 641, 41):
            image_list, _ = plain.transform([torch.zeros(3, height, width)])
            plain_shapes.add(tuple(image_list.tensors.shape[-2:]))
            shapes.add(tuple(bucketed.transform.pad([image_list.tensors[0]]).shape[-2:]))
    assert all(h in grid and w in grid for h, w in shapes), shapes
    assert len(shapes) < len(plain_shapes) / 2

    # the images themselves are untouched: same resize, same content, zeros around, same image_sizes
    images = [torch.rand(3, 300, 450), torch.rand(3, 250, 460)]
    (a, _), (b, _) = plain.transform(images), bucketed.transform(images)
    assert a.image_sizes == b.image_sizes and torch.equal(a.tensors, b.tensors)  # CPU: torchvision's padding
    padded = bucketed.transform.pad([image[:, :h, :w] for image, (h, w) in zip(a.tensors, a.image_sizes)])
    height, width = a.tensors.shape[-2:]
    assert tuple(padded.shape[-2:]) == (320, 640)  # the short side is min_size: no padding; 589 -> the cap
    assert torch.equal(a.tensors, padded[..., :height, :width])
    assert padded[..., height:, :].abs().sum() == 0 and padded[..., width:].abs().sum() == 0


def test_bucket_of_32_is_torchvisions_padding():
    model = build_model(VARIANT, 4, 320, 640, padding_bucket=32)
    assert not isinstance(model.transform, BucketedTransform)
    bucketed = BucketedTransform(model.transform, 64)
    assert bucketed.padded_size(330, 500, 32) == [384, 512]  # 320 + 64, 320 + 192
    assert bucketed.padded_size(200, 640, 32) == [256, 640]  # below min_size: 320 - 64; capped at max_size
    with pytest.raises(ValueError, match='multiple of 32'):
        BucketedTransform(model.transform, 100)


def varied_model(padding_bucket=32):
    """A fixed random network whose scores and boxes vary (the default init scores every box alike)."""
    torch.manual_seed(0)
    model = build_model(VARIANT, 4, 160, 240, padding_bucket=padding_bucket).eval()
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.3)
    torch.nn.init.normal_(model.roi_heads.box_predictor.bbox_pred.weight, std=0.05)
    for module in model.backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    model.roi_heads.score_thresh = 0.3
    return model


def test_bucketed_detections_stay_inside_each_image():
    model = varied_model(padding_bucket=128)
    images = [torch.rand(3, 240, 320, generator=torch.Generator().manual_seed(1)), torch.rand(3, 100, 90)]
    with torch.inference_mode():
        outputs = model(images)
    assert len(outputs[0]['boxes']) > 0
    for image, output in zip(images, outputs):
        boxes = output['boxes']
        assert (boxes[:, 2] <= image.shape[2]).all() and (boxes[:, 3] <= image.shape[1]).all()


# ----------------------------------------------------------------------------- the GPU inference copy

def test_inference_copy_folds_batch_norms_and_keeps_the_detections():
    model = varied_model()
    network = inference_network(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    assert fold_batch_norms(network) == 0
    images = [torch.rand(3, 240, 320, generator=torch.Generator().manual_seed(1))]
    with torch.inference_mode():
        expected, got = model(images)[0], network(images)[0]
    assert len(expected['boxes']) > 5
    assert torch.equal(expected['labels'], got['labels'])
    assert torch.allclose(expected['boxes'], got['boxes'], atol=1e-2)
    assert torch.allclose(expected['scores'], got['scores'], atol=1e-4)


def test_inference_copy_is_cached_until_the_weights_change():
    model, cache = build_model(VARIANT, 4, 160, 240).eval(), NetworkCache()
    assert cache.get(model, torch.device('cpu')) is model  # off CUDA: the network itself
    cuda = torch.device('cuda')  # the copy is made on the model's own device: no GPU needed to check the cache
    copy = cache.get(model, cuda)
    assert copy is not model and cache.get(model, cuda) is copy
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias.add_(1.0)  # what an optimizer step does
    assert cache.get(model, cuda) is not copy


def test_inference_copy_keeps_anchors_and_box_decoding_in_fp32_under_fp16():
    """In fp16, coordinates near 1000 px are 0.5 px apart: decoded from fp16 anchors, boxes drift by ~1 px."""
    network = inference_network(build_model(VARIANT, 4, 800, 1333).eval())
    image_list, _ = network.transform([torch.rand(3, 800, 1200)])
    levels = len(network.rpn.anchor_generator.anchor_generator.sizes)
    features = [torch.zeros(1, 4, 800 // s, 1216 // s, dtype=torch.float16) for s in (16, 32, 64, 128)[:levels]]
    anchors = network.rpn.anchor_generator(image_list, features)
    reference = network.rpn.anchor_generator.anchor_generator(image_list, [f.float() for f in features])
    assert anchors[0].dtype == torch.float32 and torch.equal(anchors[0], reference[0])

    deltas = (torch.randn(len(anchors[0]), 4, generator=torch.Generator().manual_seed(0)) * 0.1).half()
    exact = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(deltas.double(), anchors[0].double())
    ours = network.rpn.box_coder.decode_single(deltas, anchors[0])
    assert ours.dtype == torch.float32 and (ours - exact).abs().max() < 1e-3
    half = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(deltas, anchors[0].half())  # torchvision under autocast
    assert (half.double() - exact).abs().max() > 0.25  # what the fp32 decoding avoids


# ----------------------------------------------------------------------------- boxes and prefetching

def test_bulk_boxes_equal_collection_add():
    rows = [[1.5, 2.0, 30.25, 40.0, 0.87654, 1], [0.0, 0.0, 5.0, 6.0, 1.0, 7]]
    labels = {1: 'cat'}
    reference = dl.AnnotationCollection()
    for left, top, right, bottom, score, label_id in rows:
        reference.add(annotation_definition=dl.Box(left=left, top=top, right=right, bottom=bottom,
                                                   label=labels.get(label_id, str(label_id))),
                      model_info={'name': 'm', 'model_id': 'id-1', 'confidence': round(score, 4)})
    built = boxes_to_collection(rows, labels, 'm', 'id-1')
    assert [a.to_json() for a in built.annotations] == [a.to_json() for a in reference.annotations]


def test_bulk_boxes_are_freed_as_soon_as_they_are_dropped():
    """No reference cycle between an annotation and its box: dropped, they go at once, where a cycle would
    wait for a full collection of the whole heap (utils.core.frozen_heap)."""
    import gc
    import weakref
    collection = boxes_to_collection([[1.0, 2.0, 30.0, 40.0, 0.9, 1]] * 3, {1: 'cat'}, 'm', 'id-1')
    refs = [weakref.ref(a) for a in collection.annotations] + [weakref.ref(a.annotation_definition)
                                                                 for a in collection.annotations]
    gc.disable()
    try:
        del collection
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


def test_prefetcher_returns_in_order_and_passes_errors_through():
    started = []

    def load(item):
        started.append(item)
        if item == 'bad':
            raise OSError('cannot read bad')
        return item.upper()

    items = ['a', 'b', 'bad', 'c', 'd']
    prefetcher = Prefetcher(load, items, lookahead=2, workers=2)
    try:
        assert prefetcher.take('a') == 'A'
        assert prefetcher.take('b') == 'B'
        with pytest.raises(OSError, match='cannot read bad'):
            prefetcher.take('bad')
        assert prefetcher.take('other') is Prefetcher.MISSING
        assert [prefetcher.take(item) for item in ('c', 'd')] == ['C', 'D']
        assert prefetcher.take('d') is Prefetcher.MISSING  # each occurrence is handed out once
    finally:
        prefetcher.close()
    assert sorted(started) == sorted(items)


class _Gauge:
    """How many threads are inside a block at once, at most."""

    def __init__(self):
        self.now = self.most = 0
        self.lock = threading.Lock()

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


class _InMemoryItem:
    """An item whose download takes a while (many overlap) and whose bytes take a while to decode."""

    def __init__(self, index, data, downloads, decodes):
        self.id, self.name, self.filename, self.mimetype = f'item-{index}', f'{index}.jpg', f'/{index}.jpg', 'jpeg'
        self.data, self.downloads, self.decodes = data, downloads, decodes
        self.annotations = self  # the platform's annotations endpoint: delete the old, keep the new

    def download(self, save_locally=False, **kwargs):
        with self.downloads:
            time.sleep(0.05)
        item = self

        class Bytes(io.BytesIO):
            def read(self, *args):  # decoding reads the bytes: inside the decode slots
                with item.decodes:
                    time.sleep(0.02)
                    return super().read(*args)
        return Bytes(self.data)

    def delete(self, filters=None):
        return True

    def upload(self, annotations):
        return annotations


def test_predict_items_downloads_ahead_in_many_threads_but_decodes_in_few():
    """Decoding holds the GIL that the thread driving the GPU needs: at most DECODE_THREADS at once."""
    from fasterrcnn_adapter import FasterRCNNAdapter
    from utils.inference.prediction import DECODE_THREADS
    from utils.platform.local_model import local_model
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buffer, 'JPEG')
    downloads, decodes = _Gauge(), _Gauge()
    items = [_InMemoryItem(i, buffer.getvalue(), downloads, decodes) for i in range(12)]
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model({'pretrained': False, 'model_variant': VARIANT, 'device': 'cpu',
                                        'conf_threshold': 0.0}, labels=['a', 'b'])
    adapter.load('/nonexistent')
    _, annotations = adapter.predict_items(items, batch_size=4)
    assert annotations  # every image went through (random weights, no score threshold)
    assert downloads.most > DECODE_THREADS >= decodes.most >= 1


def test_bucketed_transform_normalises_and_rescales_boxes_exactly_as_torchvision():
    """Its normalize keeps the statistics on the device and its postprocess sends the ratios in one copy:
    the same numbers as torchvision's, which copies them per image (each copy waiting for the GPU)."""
    plain = build_model(VARIANT, 4, 320, 640, padding_bucket=32).eval().transform
    ours = build_model(VARIANT, 4, 320, 640, padding_bucket=64).eval().transform
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 37, 53, generator=g)
    assert torch.equal(ours.normalize(image), plain.normalize(image))
    assert torch.equal(ours.normalize(image.double()), plain.normalize(image.double()))  # its own statistics
    with pytest.raises(TypeError, match='floating'):
        ours.normalize(torch.zeros(3, 4, 4, dtype=torch.uint8))
    shapes, originals = [(320, 427), (333, 640), (320, 320)], [(480, 640), (500, 961), (77, 77)]

    def detections():
        g.manual_seed(4)
        return [{'boxes': torch.rand(9, 4, generator=g) * 300, 'scores': torch.rand(9, generator=g),
                 'labels': torch.arange(9)} for _ in shapes]

    expected = plain.postprocess(detections(), shapes, originals)
    found = ours.postprocess(detections(), shapes, originals)
    for want, got in zip(expected, found):
        assert torch.equal(got['boxes'], want['boxes']) and torch.equal(got['scores'], want['scores'])


def test_predict_items_reports_a_failed_download_as_that_item_s_error():
    """Downloads run ahead in the prefetcher's threads; one that fails is its item's error, the others go on."""
    from fasterrcnn_adapter import FasterRCNNAdapter
    from utils.platform.local_model import local_model
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buffer, 'JPEG')

    class Item(_InMemoryItem):
        def download(self, save_locally=False, **kwargs):
            if self.id == 'item-3':
                raise ConnectionError('the connection was reset')
            return super().download(save_locally=save_locally, **kwargs)

    items = [Item(i, buffer.getvalue(), _Gauge(), _Gauge()) for i in range(6)]
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model({'pretrained': False, 'model_variant': VARIANT, 'device': 'cpu',
                                        'conf_threshold': 0.0}, labels=['a', 'b'])
    adapter.load('/nonexistent')
    with pytest.raises(ValueError) as caught:
        adapter.predict_items(items, batch_size=4)
    message = str(caught.value)
    assert message.startswith('1 of 6 items could not be read')
    assert '3.jpg (id item-3): ConnectionError: the connection was reset' in message
    assert adapter._prefetchers == []


def test_cudnn_autotuning_only_where_cudnn_benchmark_asks_and_only_on_cuda():
    """Off by default: on an H100 each new input shape cost 12-17 s of autotuning (bench/RESULTS.md)."""
    from utils.core import config as config_lib
    from utils.inference.prediction import inference_context
    from utils.modeling.model_factory import cudnn_autotune
    assert config_lib.DEFAULTS['cudnn_benchmark'] is False
    with pytest.raises(config_lib.ConfigError, match='cudnn_benchmark'):
        config_lib.resolve({'cudnn_benchmark': 'yes'})
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    before = torch.backends.cudnn.benchmark
    for device, asked, expected in ((cuda, True, True), (cuda, False, before), (cpu, True, before)):
        with cudnn_autotune(device, asked):  # what a training epoch runs under
            assert torch.backends.cudnn.benchmark is expected
        with inference_context(cpu if device.type == 'cpu' else cuda, autotune=asked):
            assert torch.backends.cudnn.benchmark is expected
        assert torch.backends.cudnn.benchmark is before


def test_detection_rows_clip_boxes_to_each_image_in_one_host_copy():
    """Rows [left, top, right, bottom, score, label] per image, boxes clipped to that image's own size."""
    from utils.inference.prediction import detection_rows

    def network(inputs):  # what a detector may return: a box past the edges, an image with none
        assert [tuple(i.shape) for i in inputs] == [(3, 48, 64), (3, 30, 20)]
        return [{'boxes': torch.tensor([[-5.0, -3.0, 70.0, 40.0], [1.0, 2.0, 3.0, 4.0]]),
                 'scores': torch.tensor([0.9, 0.5]), 'labels': torch.tensor([2, 1])},
                {'boxes': torch.zeros((0, 4)), 'scores': torch.zeros(0), 'labels': torch.zeros(0, dtype=torch.int64)}]

    images = [torch.zeros((3, 48, 64), dtype=torch.uint8), torch.zeros((3, 30, 20), dtype=torch.uint8)]
    rows = detection_rows(network, images, torch.device('cpu'))
    assert rows == [[[0.0, 0.0, 64.0, 40.0, pytest.approx(0.9), 2.0], [1.0, 2.0, 3.0, 4.0, 0.5, 1.0]], []]
