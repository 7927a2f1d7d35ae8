"""CUDA paths CI cannot reach (no GPU there): autocast + GradScaler training, GPU prediction, CPU reload.

Skipped without a GPU; run on a GPU machine with `python -m pytest tests/test_cuda.py`.
"""
import pytest
import torch

from fasterrcnn_adapter import FasterRCNNAdapter
from utils.local_model import local_model
from utils.synthetic import make_synthetic_export

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


def test_train_with_amp_on_cuda_then_predict_on_cuda_and_cpu(tmp_path):
    data = tmp_path / 'data'
    make_synthetic_export(str(data), n_train=64, n_val=16, image_size=(320, 320), seed=0)
    adapter = make_adapter({})
    assert adapter.device.type == 'cuda'
    adapter.convert_from_dtlpy(str(data))
    result = adapter.train(str(data), str(tmp_path / 'output'))
    assert result.epochs_run == 3
    assert all(torch.isfinite(torch.tensor(h['loss'])) for h in result.history)
    assert result.history[-1]['loss'] < result.history[0]['loss']
    adapter.save(str(tmp_path / 'artifacts'))

    images = [torch.randint(0, 255, (3, 320, 320), dtype=torch.uint8) for _ in range(4)]
    on_gpu = adapter.predict(images)
    on_cpu = make_adapter({'device': 'cpu'}, artifacts=str(tmp_path / 'artifacts')).predict(images)
    for gpu_collection, cpu_collection in zip(on_gpu, on_cpu):
        # fp16 autocast on the GPU vs fp32 on the CPU: same detections up to rounding at the threshold
        assert abs(len(gpu_collection) - len(cpu_collection)) <= 1


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
