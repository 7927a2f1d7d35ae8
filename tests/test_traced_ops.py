"""The export-time replacements of `utils.export.traced_ops` give torchvision's tensors, and the exported detector
graph has no If node (NNCF calibrates it in one pass) yet still returns no boxes when no box survives."""
import onnx
import pytest
import torch
from torchvision.ops import boxes as box_ops
from torchvision.ops import poolers

from utils.export import cpu_graphs, traced_ops
from utils.modeling import model_factory

ort = pytest.importorskip('onnxruntime')


def test_merge_by_gather_is_torchvisions_merge():
    generator = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 4, (50,), generator=generator)
    levels[:4] = torch.tensor([3, 2, 1, 0])  # every level present
    unmerged = [torch.rand(int((levels == level).sum()), 8, 3, 3, generator=generator) for level in range(4)]
    assert torch.equal(traced_ops.merge_by_gather(levels, unmerged), poolers._onnx_merge_levels(levels, unmerged))
    unmerged[2] = unmerged[2][:0]  # a level no proposal maps to
    kept = levels != 2
    assert torch.equal(traced_ops.merge_by_gather(levels[kept], unmerged),
                       poolers._onnx_merge_levels(levels[kept], unmerged))


def test_nms_without_branch_keeps_torchvisions_boxes():
    generator = torch.Generator().manual_seed(1)
    corners = torch.rand(300, 2, generator=generator) * 200
    boxes = torch.cat([corners, corners + 5 + torch.rand(300, 2, generator=generator) * 60], dim=1)
    scores = torch.rand(300, generator=generator)
    classes = torch.randint(0, 5, (300,), generator=generator)
    expected = box_ops._batched_nms_coordinate_trick(boxes, scores, classes, 0.5)
    assert torch.equal(traced_ops.batched_nms_without_branch(boxes, scores, classes, 0.5), expected)
    assert len(expected) < 300  # some boxes were suppressed: the comparison means something
    empty = traced_ops.batched_nms_without_branch(boxes[:0], scores[:0], classes[:0], 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_the_detector_graph_has_no_branch_and_returns_no_boxes_when_none_survive(tmp_path):
    torch.manual_seed(0)
    network = model_factory.build_model('fasterrcnn_mobilenet_v3_large_320_fpn', 4, 128, 128).eval()
    with torch.no_grad():  # every proposal is background: no class score reaches the graph's floor, and the
        network.roi_heads.box_predictor.cls_score.bias[0] = 100.0  # heads' NMS meets an empty input
    path = cpu_graphs.export_graph(network, cpu_graphs.DETECTOR, str(tmp_path / 'detector.onnx'))
    graph = onnx.load(path)
    assert 'If' not in {node.op_type for node in graph.graph.node}
    assert 'ScatterElements' not in {node.op_type for node in graph.graph.node}  # the pooler's merge is a gather
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    image = cpu_graphs.prepared_image(network, torch.rand(3, 100, 140)).numpy()
    boxes, labels, scores = session.run(None, {session.get_inputs()[0].name: image})
    assert boxes.shape == (0, 4) and labels.shape == scores.shape == (0,)
    with torch.inference_mode():
        assert len(network([torch.rand(3, 100, 140)])[0]['boxes']) == 0
