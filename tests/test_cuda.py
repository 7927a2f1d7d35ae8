"""CUDA paths CI cannot reach (no GPU there): autocast + GradScaler training, GPU prediction, CPU reload.

Skipped without a GPU; run on a GPU machine with `python -m pytest tests/test_cuda.py`.
"""
import glob

import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from fasterrcnn_adapter import FasterRCNNAdapter
from local_runner.demo import DEMO_DATA, DEMO_SETTINGS
from utils.data.images import load_image
from utils.platform.local_model import local_model
from utils.data.synthetic import make_synthetic_export

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

SETTINGS = {'pretrained': False, 'model_variant': 'fasterrcnn_mobilenet_v3_large_320_fpn', 'device': 'auto',
            'min_size': 320, 'max_size': 320, 'batch_size': 4, 'num_workers': 2, 'epochs': 3,
            'learning_rate': 0.02, 'warmup_iters': 20, 'amp': True, 'conf_threshold': 0.3}
LABELS = ['circle', 'square', 'triangle']


def make_adapter(configuration, artifacts='/nonexistent'):
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model(configuration={**SETTINGS, **configuration}, labels=LABELS)
    adapter.load(artifacts)
    return adapter


def test_train_with_amp_on_cuda_then_fp16_predictions_match_fp32(tmp_path):
    """At the default settings (conf_threshold 0.5) the GPU's fp16 copy of a model trained on
    the synthetic set (the demo's recipe, with AMP) finds what the fp32 network finds on the CPU: the same
    labels, boxes within 1 px, scores within 0.01. (Trained less, the
    fp32 network found no box above its threshold and the check compared nothing.)"""
    data = tmp_path / 'data'
    make_synthetic_export(str(data), **DEMO_DATA)
    adapter = make_adapter({**DEMO_SETTINGS, 'amp': True, 'num_workers': 2})
    assert adapter.device.type == 'cuda'
    adapter.convert_from_dtlpy(str(data))
    result = adapter.train(str(data), str(tmp_path / 'output'))
    assert result.epochs_run == DEMO_SETTINGS['epochs']
    assert all(torch.isfinite(torch.tensor(h['loss'])) for h in result.history)
    assert result.history[-1]['loss'] < result.history[0]['loss']
    adapter.save(str(tmp_path / 'artifacts'))

    images = [pil_to_tensor(load_image(path)) for path in sorted(glob.glob(str(data / 'validation' / 'items' / '*')))]
    on_gpu = adapter.predict(images)  # fp16, channels_last, folded batch norms
    adapter.model_entity.configuration['cuda_graphs'] = True
    replayed = [adapter.predict(images) for _ in range(3)][-1]  # seen, captured, replayed
    assert adapter._inference_networks.get(adapter.model, adapter.device).backbone.graphs.replays >= 2
    on_cpu = make_adapter({**DEMO_SETTINGS, 'device': 'cpu'}, artifacts=str(tmp_path / 'artifacts')).predict(images)
    assert sum(len(c) for c in on_cpu) >= len(images)  # 1-3 shapes per image: something to compare
    threshold = DEMO_SETTINGS['conf_threshold']
    worst = (0.0, 0.0)  # the largest (box, score) difference of a matched detection: the margin, printed
    for gpu_collection, cpu_collection in zip(on_gpu + replayed, on_cpu + on_cpu):  # eager, then CUDA graphs
        # each side's detections, up to those within 0.01 of the threshold, found on the other side
        for side, one, other in (('cpu', cpu_collection, gpu_collection), ('gpu', gpu_collection, cpu_collection)):
            for a in one.annotations:
                score = a.metadata['user']['model']['confidence']
                if score < threshold + 0.01:
                    continue
                nearest = min(((_box_distance(a, b), abs(b.metadata['user']['model']['confidence'] - score), b)
                               for b in other.annotations if b.label == a.label), key=lambda t: t[0],
                              default=(float('inf'), float('inf'), None))
                assert nearest[0] <= 1.0 and nearest[1] <= 0.01, (
                    f'{side} found {a.label} {score:.4f} at {_corners(a)}; nearest {a.label} on the other side: '
                    + ('none' if nearest[2] is None else f'{nearest[2].metadata["user"]["model"]["confidence"]:.4f}'
                       f' at {_corners(nearest[2])}, {nearest[0]:.2f} px off'))
                worst = max(worst[0], nearest[0]), max(worst[1], nearest[1])
    print(f'fp16 GPU vs fp32 CPU: matched within {worst[0]:.3f} px and {worst[1]:.4f} in score')


def _corners(annotation):
    return tuple(round(v, 2) for v in (annotation.left, annotation.top, annotation.right, annotation.bottom))


def _box_distance(a, b) -> float:
    """The largest difference of the two boxes' sides, in pixels."""
    return max(abs(x - y) for x, y in zip(_corners(a), _corners(b)))


def test_embed_on_cuda_in_half_precision_matches_cpu(tmp_path):
    """embed shares predict's autocast path: fp16 features on the GPU, the same unit vectors as fp32 on the CPU.

    Trained first: an untrained network's features are ~1e-9, below what fp16 can hold.
    """
    data = tmp_path / 'data'
    make_synthetic_export(str(data), n_train=32, n_val=8, image_size=(320, 320), seed=1)
    adapter = make_adapter({'epochs': 1})
    adapter.convert_from_dtlpy(str(data))
    adapter.train(str(data), str(tmp_path / 'output'))
    adapter.save(str(tmp_path / 'artifacts'))
    images = [torch.randint(0, 255, (3, 320, 240), dtype=torch.uint8) for _ in range(3)]
    on_gpu = torch.tensor(adapter.embed(images))
    on_cpu = torch.tensor(make_adapter({'device': 'cpu'}, artifacts=str(tmp_path / 'artifacts')).embed(images))
    assert on_gpu.shape == on_cpu.shape == (3, 256)
    assert torch.allclose(on_gpu.norm(dim=1), torch.ones(3), atol=1e-3)
    assert (on_gpu * on_cpu).sum(dim=1).min() > 0.99


def test_device_inputs_take_images_already_on_the_gpu_as_they_are():
    """A batch decoded on the GPU (or passed as CUDA tensors) skips the pinned host copy."""
    from utils.inference.prediction import device_inputs
    device = torch.device('cuda')
    images = [torch.randint(0, 255, (3, 20, 30), dtype=torch.uint8, device=device),
              torch.randint(0, 255, (3, 16, 12), dtype=torch.uint8)]
    inputs = device_inputs(images, device)
    assert all(x.is_cuda and x.dtype == torch.float32 for x in inputs)
    # (CUDA divides by a scalar through its reciprocal: within an ulp of the CPU's quotient, not equal to it)
    assert all(torch.allclose(x.cpu(), image.cpu().float() / 255, rtol=0, atol=1e-6)
               for x, image in zip(inputs, images))
