"""`embed`: one 256-value unit vector per item from the network's FPN features (the platform flow is in
test_platform_flows.py)."""
import numpy as np
import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from fasterrcnn_adapter import FasterRCNNAdapter, UnreadableItem
from utils.core import config as config_lib
from utils.modeling.embeddings import fpn_embedding
from utils.platform.local_model import local_model
from utils.data.synthetic import render_item

SHAPES = ['circle', 'square', 'triangle']


def make_adapter(**configuration):
    adapter = FasterRCNNAdapter()
    adapter.model_entity = local_model(
        configuration={'pretrained': False, 'model_variant': 'fasterrcnn_mobilenet_v3_large_320_fpn',
                       'min_size': 128, 'max_size': 160, 'device': 'cpu', **configuration}, labels=SHAPES)
    adapter.load('/nonexistent')
    return adapter


def shape_image(label, index, size=(96, 96)):
    """One image holding a single shape of class `label` on the synthetic set's noisy background."""
    rng = np.random.default_rng([7, SHAPES.index(label), index])
    image, _ = render_item(rng, size, [label], max_objects=1)
    return pil_to_tensor(image)


@pytest.mark.parametrize('variant', config_lib.VARIANTS)
def test_every_variant_gives_one_unit_vector_of_256_per_item(variant):
    torch.manual_seed(0)
    adapter = make_adapter(model_variant=variant, min_size=64, max_size=96)
    unreadable = UnreadableItem('id-1', 'broken.jpg', 'not an image')
    vectors = adapter.embed([shape_image('circle', 0), unreadable, shape_image('square', 0, (80, 60))])
    assert len(vectors) == 3 and vectors[1] is None  # the SDK skips None; embed_items names the item
    assert adapter.unreadable_items == [unreadable]
    for vector in (vectors[0], vectors[2]):
        assert isinstance(vector, list) and len(vector) == config_lib.DEFAULTS['embeddings_size'] == 256
        assert np.isfinite(vector).all() and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(vectors[0], vectors[2])


def test_pooling_covers_each_image_not_the_batch_padding():
    """A larger neighbour pads the batch; the pad cells (here huge values) must not enter an image's vector."""
    padded, image_sizes = (64, 96), [(64, 96), (32, 48)]  # the second image fills the top-left quarter
    features = {}
    for name, (rows, cols) in {'0': (16, 24), '1': (8, 12), 'pool': (4, 6)}.items():
        level = torch.randn(2, 256, rows, cols)
        level[1, :, rows // 2:, :] = 1e6
        level[1, :, :, cols // 2:] = 1e6
        features[name] = level
    vectors = fpn_embedding(features, image_sizes, padded)
    expected = torch.stack([f[1, :, :f.shape[2] // 2, :f.shape[3] // 2].mean(dim=(1, 2)) for f in features.values()])
    assert torch.allclose(vectors[1], torch.nn.functional.normalize(expected.mean(dim=0), dim=0), atol=1e-6)
    whole = torch.stack([f[0].mean(dim=(1, 2)) for f in features.values()]).mean(dim=0)
    assert torch.allclose(vectors[0], torch.nn.functional.normalize(whole, dim=0), atol=1e-6)


def test_same_shape_images_are_closer_than_other_shapes():
    """Even random-init FPN features (no training, so no label leaks in) group the synthetic shapes by class."""
    torch.manual_seed(0)
    adapter = make_adapter(min_size=320, max_size=320)
    labels = np.array([label for label in SHAPES for _ in range(6)])
    vectors = np.array(adapter.embed([shape_image(label, k) for k, label in enumerate(labels)]))
    similarity = vectors @ vectors.T
    for label in SHAPES:
        same = labels == label
        within = similarity[np.ix_(same, same)][~np.eye(same.sum(), dtype=bool)].mean()
        across = similarity[np.ix_(same, ~same)].mean()
        assert within > across, (label, within, across)
    np.fill_diagonal(similarity, -np.inf)
    nearest_is_same = labels[similarity.argmax(axis=1)] == labels
    assert nearest_is_same.mean() >= 0.6, nearest_is_same  # chance is 1/3
