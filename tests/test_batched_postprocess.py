"""The batched post-processing (utils/modeling/batched_postprocess.py) gives torchvision's results, run here on the CPU.

On CUDA the network takes that path by itself; `ON_CPU` sends these CPU runs through it too.
"""
import pytest
import torch
import torchvision
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from utils.core import tested_versions
from utils.modeling import batched_postprocess
from utils.modeling.batched_postprocess import BatchedRoIHeads, BatchedRPN, greedy_nms
from utils.modeling.model_factory import build_model

VARIANT = 'fasterrcnn_mobilenet_v3_large_320_fpn'


def random_boxes(generator, count, spread=100.0, size=40.0):
    corner = torch.rand(count, 2, generator=generator) * spread
    sides = torch.rand(count, 2, generator=generator) * size + 0.5
    return torch.cat([corner, corner + sides], dim=1)


def reference_keep(boxes, scores, valid, threshold):
    """torchvision's nms over the valid boxes, as a mask in the given order."""
    keep = torch.zeros(len(boxes), dtype=torch.bool)
    index = torch.nonzero(valid).flatten()
    keep[index[torchvision.ops.nms(boxes[index], scores[index], threshold)]] = True
    return keep


@pytest.mark.parametrize('threshold', [0.3, 0.5, 0.7])
def test_greedy_nms_keeps_what_torchvision_keeps(threshold):
    g = torch.Generator().manual_seed(int(threshold * 10))
    groups, n = 6, 300
    scores = torch.rand(groups, n, generator=g).sort(dim=1, descending=True).values
    boxes = torch.stack([random_boxes(g, n) for _ in range(groups)])
    valid = torch.rand(groups, n, generator=g) > 0.2
    keep = greedy_nms(boxes, valid, threshold)
    for group in range(groups):
        expected = reference_keep(boxes[group], scores[group], valid[group], threshold)
        assert torch.equal(keep[group], expected)
        assert 0 < expected.sum() < valid[group].sum()  # the case has something to suppress, and survivors


def test_greedy_nms_follows_long_suppression_chains():
    """Boxes each overlapping only the next: keep alternates, and the fixed point needs many rounds."""
    n = 40
    left = torch.arange(n, dtype=torch.float32) * 6.0
    boxes = torch.stack([left, torch.zeros(n), left + 10.0, torch.full((n,), 10.0)], dim=1)  # IoU 4/16 with the next
    scores = torch.linspace(1.0, 0.1, n)
    keep = greedy_nms(boxes[None], torch.ones(1, n, dtype=torch.bool), 0.2)[0]
    assert torch.equal(keep, reference_keep(boxes, scores, torch.ones(n, dtype=torch.bool), 0.2))
    assert keep.tolist() == [i % 2 == 0 for i in range(n)]


def test_greedy_nms_blocks_give_the_same_answer(monkeypatch):
    g = torch.Generator().manual_seed(5)
    boxes = torch.stack([random_boxes(g, 64) for _ in range(9)])
    valid = torch.ones(9, 64, dtype=torch.bool)
    whole = greedy_nms(boxes, valid, 0.5)
    monkeypatch.setattr(batched_postprocess, 'IOU_BLOCK_PAIRS', 64 * 64 * 2)
    monkeypatch.setattr(batched_postprocess, 'NMS_BLOCK_PAIRS', 64 * 64 * 4)
    assert torch.equal(greedy_nms(boxes, valid, 0.5), whole)


def detector(seed=0, **options):
    """A random network whose heads are initialised wide: distinct scores everywhere (torchvision's small
    initial weights give every box the same class scores, and ties may come out in any order)."""
    torch.manual_seed(seed)
    model = build_model(VARIANT, 4, 160, 240, box_score_thresh=0.0, box_detections_per_img=50, **options).eval()
    for layer in model.backbone.modules():  # the default initialisation leaves features of about 1e-8
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity='relu')
    predictor = model.roi_heads.box_predictor
    for layer, std in ((model.rpn.head.cls_logits, 3e-4), (model.rpn.head.bbox_pred, 1e-4),
                       (predictor.cls_score, 3e-4), (predictor.bbox_pred, 1e-3)):
        torch.nn.init.normal_(layer.weight, std=std)
    return model


def images_of_mixed_sizes(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in ((120, 160), (200, 150), (90, 240), (160, 160))]


def test_the_network_gets_the_batched_heads_and_torchvision_s_own_on_request():
    model = detector()
    assert type(model.rpn) is BatchedRPN and type(model.roi_heads) is BatchedRoIHeads
    plain = detector(batched_postprocess=False)
    assert type(plain.rpn) is RegionProposalNetwork and type(plain.roi_heads) is RoIHeads
    assert model.state_dict().keys() == plain.state_dict().keys()


def heads_settings(heads):
    """Every setting of an RPN or RoI heads module: its own plain attributes, and its matcher's, sampler's
    and box coder's."""
    settings = {key: value for key, value in vars(heads).items() if not key.startswith('_') or 'nms_top_n' in key}
    for helper in ('proposal_matcher', 'fg_bg_sampler', 'box_coder'):
        settings[helper] = (type(settings[helper]), vars(settings[helper]))
    return settings


def test_the_batched_heads_are_built_with_torchvision_s_settings_and_load_its_weights():
    model = detector(rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_train=500, box_batch_size_per_image=64,
                     box_nms_thresh=0.4, rpn_score_thresh=0.01)
    plain = detector(batched_postprocess=False, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_train=500,
                     box_batch_size_per_image=64, box_nms_thresh=0.4, rpn_score_thresh=0.01)
    for ours, theirs in ((model.rpn, plain.rpn), (model.roi_heads, plain.roi_heads)):
        assert heads_settings(ours) == heads_settings(theirs)
        assert heads_settings(ours)['fg_bg_sampler'][1]  # the comparison compared something
    assert model.rpn._pre_nms_top_n['testing'] == 300 and model.roi_heads.nms_thresh == 0.4
    plain.rpn.head.cls_logits.bias.data.fill_(0.5)
    model.load_state_dict(plain.state_dict())  # strict: a checkpoint of torchvision's network loads as it is
    assert torch.equal(model.rpn.head.cls_logits.bias, plain.rpn.head.cls_logits.bias)


def test_outside_the_tested_torchvision_releases_the_network_keeps_torchvision_s_heads(monkeypatch, caplog):
    monkeypatch.setattr(tested_versions, 'TORCHVISION_TESTED', ((0, 1), (0, 2)))
    model = detector()
    assert type(model.rpn) is RegionProposalNetwork and type(model.roi_heads) is RoIHeads
    assert 'outside the releases the batched post-processing was tested on (>=0.1, <0.2)' in caplog.text
    assert model.state_dict().keys() == detector(batched_postprocess=False).state_dict().keys()


def test_batched_detections_equal_torchvision_s(monkeypatch):
    """A whole forward pass, images of several sizes (clipping differs per image), score threshold 0."""
    model, images = detector(), images_of_mixed_sizes()
    # RoIs narrower than a feature cell pool the same features, so some scores tie exactly, and tied boxes may
    # come in either order (on the GPU torchvision's own order is not fixed): a different tiny offset per RoI
    # keeps every score distinct (added to one class's logit: softmax ignores what is added to all)
    model.roi_heads.box_predictor.register_forward_hook(lambda module, inputs, outputs: (
        outputs[0] + 1e-4 * torch.arange(len(outputs[0]))[:, None] * (torch.arange(outputs[0].shape[1]) == 1),
        outputs[1]))
    with torch.inference_mode():
        expected = model(images)
        monkeypatch.setattr(batched_postprocess, 'ON_CPU', True)
        found = model(images)
    assert sum(len(e['boxes']) for e in expected) > 100
    for want, got in zip(expected, found):
        assert torch.equal(got['labels'], want['labels'])
        assert torch.equal(got['scores'], want['scores'])
        torch.testing.assert_close(got['boxes'], want['boxes'], rtol=0, atol=1e-4)


def test_no_proposal_at_all_gives_no_detection(monkeypatch):
    """An RPN that lets nothing through (a diverged network's NaN boxes do that): empty results, as torchvision's."""
    model, images = detector(), images_of_mixed_sizes()
    model.rpn.score_thresh = 2.0  # above any probability
    monkeypatch.setattr(batched_postprocess, 'ON_CPU', True)
    with torch.inference_mode():
        found = model(images)
    assert [len(d['boxes']) for d in found] == [0] * len(images)
    assert all(d['boxes'].shape == (0, 4) and d['labels'].dtype == torch.int64 for d in found)


def test_batched_proposals_equal_torchvision_s(monkeypatch):
    model, images = detector(seed=3), images_of_mixed_sizes(seed=4)
    with torch.inference_mode():
        image_list, _ = model.transform(images)
        features = model.backbone(image_list.tensors)
        expected, _ = model.rpn(image_list, features)
        monkeypatch.setattr(batched_postprocess, 'ON_CPU', True)
        found, _ = model.rpn(image_list, features)
    assert all(len(p) > 50 for p in expected)
    for want, got in zip(expected, found):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_training_losses_equal_torchvision_s(monkeypatch):
    """Training takes the batched RPN too: same proposals in the same order, so the same sampled RoIs and losses."""
    images = images_of_mixed_sizes(seed=6)
    targets = [{'boxes': torch.tensor([[10.0, 10.0, 60.0, 70.0], [30.0, 20.0, 90.0, 50.0]]),
                'labels': torch.tensor([1, 3])} for _ in images]

    def losses():
        model = detector(seed=7).train()
        torch.manual_seed(8)
        return model(images, targets)

    expected = losses()
    monkeypatch.setattr(batched_postprocess, 'ON_CPU', True)
    found = losses()
    assert expected.keys() == found.keys()
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=1e-5, atol=1e-6)  # summation order aside


def test_tracing_and_single_images_keep_torchvision_s_code(monkeypatch):
    monkeypatch.setattr(batched_postprocess, 'ON_CPU', True)
    assert batched_postprocess.batched(torch.zeros(1), 2) and not batched_postprocess.batched(torch.zeros(1), 1)
    monkeypatch.setattr(torchvision, '_is_tracing', lambda: True)
    assert not batched_postprocess.batched(torch.zeros(1), 16)
