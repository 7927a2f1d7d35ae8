"""utils.inference.cuda_graphs: capture, replay, bounds and fallbacks, on the CPU behind a test double of the CUDA
graph API (tests/graph_double.py: a replay recomputes from the captured input buffers only); on a GPU, the real
API against the eager network (skipped without CUDA)."""
import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from graph_double import HostGraphApi
from utils.inference.cuda_graphs import GraphSet, GraphedModule, use_graphs
from utils.modeling.model_factory import build_model

VARIANT = 'fasterrcnn_mobilenet_v3_large_320_fpn'
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def _graphed(module, rows_bucket=None, **options):
    graphs = GraphSet(HostGraphApi(), **options)
    graphs.enabled = True
    return GraphedModule(module, graphs, 'conv', rows_bucket), graphs


@pytest.fixture(scope='module')
def conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()


def test_each_replay_computes_from_the_new_inputs(conv):
    graphed, graphs = _graphed(conv)
    inputs = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    with torch.inference_mode():
        results = [graphed(x).clone() for x in inputs]
        assert all(torch.equal(result, conv(x)) for result, x in zip(results, inputs))
    assert graphs.captures == 1 and graphs.replays == 3  # seen once (eager), captured on the second, replayed


def test_outputs_are_the_graph_s_buffers_until_its_next_replay(conv):
    """Documented contract: the caller reads an output before the same graph runs again."""
    graphed, _ = _graphed(conv)
    a, b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        graphed(a)
        first = graphed(a)
        graphed(b)
        assert torch.equal(first, conv(b))


def test_a_shape_seen_once_runs_eagerly_and_the_table_is_bounded(conv):
    graphed, graphs = _graphed(conv, max_graphs=2)
    sizes = [8, 12, 16]
    with torch.inference_mode():
        for size in sizes:
            x = torch.randn(1, 3, size, size)
            assert torch.equal(graphed(x), conv(x)) and graphs.captures == sizes.index(size)  # first sight: eager
            assert torch.equal(graphed(x), conv(x))
        assert len(graphs) == 2 and graphs.captures == 3
        x = torch.randn(1, 3, 8, 8)  # its graph was dropped: captured again, still right
        assert torch.equal(graphed(x), conv(x)) and graphs.captures == 4 and len(graphs) == 2


def test_a_failed_capture_leaves_that_shape_eager_and_is_not_retried(conv, caplog):
    graphs = GraphSet(HostGraphApi(fail=True))
    graphs.enabled = True
    graphed = GraphedModule(conv, graphs, 'conv')
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger='utils.inference.cuda_graphs'):
        assert all(torch.equal(graphed(x), conv(x)) for _ in range(4))
    assert len(graphs) == 0 and graphs.replays == 0
    assert sum('capture of the conv' in r.getMessage() for r in caplog.records) == 1


def test_rows_are_padded_to_the_bucket_and_outputs_cut_back():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU()).eval()
    graphed, graphs = _graphed(head, rows_bucket=lambda: 8)
    with torch.inference_mode():
        for rows in (5, 5, 7, 3, 9, 9, 16):
            x = torch.randn(rows, 3, 2, 2)
            out = graphed(x)
            assert out.shape == (rows, 5)
            torch.testing.assert_close(out, head(x))
    assert graphs.captures == 2  # 8 rows (5, 7, 3) and 16 rows (9, 16)
    assert graphs.replays == 5


def test_each_precision_gets_its_own_graph(conv):
    graphed, graphs = _graphed(conv)
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        graphed(x), graphed(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            graphed(x)
            out = graphed(x)
            assert out.dtype == torch.bfloat16 and torch.equal(out, conv(x))
    assert graphs.captures == 2


def test_off_it_captures_nothing(conv):
    graphed, graphs = _graphed(conv)
    graphs.enabled = False
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        assert all(torch.equal(graphed(x), conv(x)) for _ in range(3))
    assert graphs.captures == 0


def _network():
    torch.manual_seed(0)
    network = build_model(VARIANT, 4, min_size=96, max_size=128).eval()
    network.roi_heads.score_thresh = 0.0
    return network


def test_the_cpu_network_predicted_with_is_never_changed():
    """On the CPU the adapter predicts with the trained model itself: without an API, no wrapper goes in."""
    network = _network()
    keys = list(network.state_dict())
    assert use_graphs(network, True) is None and use_graphs(network, False) is None
    assert list(network.state_dict()) == keys


def test_the_adapter_on_the_cpu_predicts_and_saves_as_without_graphs():
    from fasterrcnn_adapter import FasterRCNNAdapter
    from utils.platform.local_model import local_model
    adapters = []
    for on in (False, True):
        adapter = FasterRCNNAdapter()
        adapter.model_entity = local_model({'pretrained': False, 'model_variant': VARIANT, 'device': 'cpu',
                                            'conf_threshold': 0.0, 'cuda_graphs': on}, labels=['a', 'b'])
        adapter.load('/nonexistent')
        adapters.append(adapter)
    images = [torch.randint(0, 255, (3, 60, 80), dtype=torch.uint8) for _ in range(2)]
    eager, graphed = ([a.predict(images) for _ in range(3)][-1] for a in adapters)
    assert [c.to_json() for c in graphed] == [c.to_json() for c in eager]
    assert list(adapters[1].model.state_dict()) == list(adapters[0].model.state_dict())


def test_a_network_replayed_finds_what_it_finds_eagerly():
    """Three batches of one padded shape (seen, captured, replayed), then another shape: the detections of
    each batch equal the eager network's; the RPN head reads the backbone's output buffers without a copy."""
    eager, network = _network(), _network()
    graphs = use_graphs(network, True, api=HostGraphApi())
    torch.manual_seed(1)
    batches = [[torch.rand(3, 96, 128) for _ in range(2)] for _ in range(3)] + [[torch.rand(3, 128, 96)] * 2] * 2
    with torch.inference_mode():
        for batch in batches:
            for ours, theirs in zip(network(batch), eager(batch)):
                assert len(theirs['boxes']) > 0
                torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # backbone and RPN head per shape; the box head and predictor once: both shapes give 2 x 150 proposal rows
    assert graphs.captures == 2 + 2 + 1 + 1
    assert graphs.replays == 4 + 4 + 2 + 4  # batches 2, 3: all four; 4: the box head's two; 5: all four
    backbone = next(e for k, e in graphs._graphs.items() if k[0] == 'backbone')
    rpn_head = next(e for k, e in graphs._graphs.items() if k[0] == 'RPN head')
    assert [t.data_ptr() for t in rpn_head.inputs] == [t.data_ptr() for t in backbone.output_leaves]


def _assert_close(ours, theirs):
    for a, b in zip(tree_flatten(ours)[0], tree_flatten(theirs)[0]):
        assert a.shape == b.shape and b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))


@cuda
def test_on_cuda_each_replayed_part_computes_what_the_eager_part_computes():
    """The four graphed parts on the real API, fp32 (the fp16 detections with graphs are tests/test_cuda.py's
    parity test, on a trained network: a random one's fp16 features underflow). Four batches: seen, captured,
    replayed twice; the box head's rows vary, so its padding is exercised; the RPN head reads the backbone's
    buffers as they are."""
    from utils.inference.prediction import inference_network
    model = _network().cuda()
    eager, network = inference_network(model), inference_network(model)
    graphs = use_graphs(network, True)
    per_image = network.rpn.post_nms_top_n()
    with torch.inference_mode():
        for seed in range(4):
            torch.manual_seed(seed)
            x = torch.rand(4, 3, 96, 128, device='cuda')
            features = network.backbone(x)
            _assert_close(features, eager.backbone(x))
            levels = list(features.values())
            _assert_close(network.rpn.head(levels), eager.rpn.head([t.clone() for t in levels]))
            rows = torch.rand(4 * per_image - 5 * seed, model.backbone.out_channels, 7, 7, device='cuda')
            head = network.roi_heads.box_head(rows)
            _assert_close(head, eager.roi_heads.box_head(rows))
            _assert_close(network.roi_heads.box_predictor(head), eager.roi_heads.box_predictor(head.clone()))
    assert graphs.captures == 4 and graphs.replays == 4 * 3


@cuda
def test_on_cuda_inputs_of_new_batches_reach_the_replay():
    """Stale inputs on the real API: each replayed batch differs from the one before, and so do its outputs."""
    model = _network().cuda()
    network = copy.deepcopy(model)
    graphs = use_graphs(network, True)
    with torch.inference_mode():
        x = [torch.rand(2, 3, 96, 128, device='cuda') for _ in range(3)]
        results = [{k: v.clone() for k, v in network.backbone(t).items()} for t in x]
        for t, result in zip(x, results):
            expected = model.backbone(t)
            assert all(torch.allclose(result[k], expected[k], atol=1e-4) for k in expected)
    assert graphs.replays == 2
