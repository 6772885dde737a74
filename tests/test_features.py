"""Feature networks: augmentation, contrastive loss, cache round trip, and (slow) the MNIST classifier's accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genlab.data import DatasetInfo, ImageDataset, load_dataset
from genlab.eval import features as F


def _tiny_dataset(n: int = 64, labelled: bool = True) -> ImageDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)
    info = DatasetInfo(name="tiny", kind="image", size=n, license="test", attribution="test", channels=1,
                       image_size=8, class_names=["a", "b"] if labelled else [])
    return ImageDataset(images, info, labels=rng.integers(0, 2, n) if labelled else None)


def test_augment_is_a_translation_with_border_replication():
    x = torch.randn(16, 2, 6, 6)
    recipe = F.FeatureRecipe(max_shift=2)
    out = F.augment(x, recipe, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # replay the draws: dy then dx
    dy = torch.randint(0, 5, (16,), generator=g)
    dx = torch.randint(0, 5, (16,), generator=g)
    xn = x.numpy()
    for b in range(16):
        padded = np.pad(xn[b], ((0, 0), (2, 2), (2, 2)), mode="edge")
        ref = padded[:, dy[b] : dy[b] + 6, dx[b] : dx[b] + 6]
        np.testing.assert_array_equal(out[b].numpy(), ref)


def test_nt_xent_matches_the_formula():
    torch.manual_seed(0)
    z1, z2, tau = torch.randn(4, 3), torch.randn(4, 3), 0.5
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=-1).numpy()
    total = 0.0
    for i in range(8):
        j = (i + 4) % 8
        denom = sum(math.exp(z[i] @ z[k] / tau) for k in range(8) if k != i)
        total += -math.log(math.exp(z[i] @ z[j] / tau) / denom)
    assert F.nt_xent(z1, z2, tau).item() == pytest.approx(total / 8, rel=1e-5)


@pytest.mark.parametrize("kind", ["classifier", "contrastive"])
def test_cache_round_trip_gives_identical_features(tmp_path, kind):
    ds = _tiny_dataset(labelled=kind == "classifier")
    recipe = F.FeatureRecipe(width=4, feature_dim=8, epochs=1, batch_size=32, max_shift=1)
    net, meta = F.train_feature_network(ds, ds if kind == "classifier" else None, recipe, kind, progress=False)
    meta.update(hash="x", dataset="tiny", recipe=vars(recipe), recipe_version=F.RECIPE_VERSION)
    F.save_feature_network(net, meta, tmp_path / "fn")
    loaded = F.load_feature_network(tmp_path / "fn")
    x = ds.get_batch(torch.arange(10))["x"]
    torch.testing.assert_close(loaded.features(x), net.eval().features(x), rtol=1e-5, atol=1e-6)
    assert loaded.features(x).shape == (10, 8) and loaded.num_features == 8
    assert loaded.describe()["weights"] == F.weights_digest(net) != F.weights_digest(F._build(meta))
    if kind == "classifier":
        assert 0.0 <= loaded.test_accuracy <= 1.0


def test_wrong_channels_is_a_user_error(tmp_path):
    from genlab.errors import GenlabError

    ds = _tiny_dataset()
    recipe = F.FeatureRecipe(width=4, feature_dim=8, epochs=1, batch_size=32)
    net, meta = F.train_feature_network(ds, ds, recipe, "classifier", progress=False)
    fn = F.FeatureNetwork(net, {**meta, "hash": "x", "dataset": "tiny"})
    with pytest.raises(GenlabError, match="1-channel"):
        fn.features(torch.zeros(2, 3, 8, 8))


def test_data_hash_changes_with_one_pixel():
    a, b = _tiny_dataset(), _tiny_dataset()
    assert F.data_hash(a) == F.data_hash(b)
    b.images[0, 0, 0, 0] ^= 1
    assert F.data_hash(a) != F.data_hash(b)


@pytest.mark.slow
def test_mnist_classifier_reaches_98_percent_on_the_test_split():
    fn = F.get_feature_network("mnist")
    test = load_dataset("mnist", split="test")
    pred = fn.classify(test.get_batch(torch.arange(len(test)))["x"])
    acc = (pred == test.labels).float().mean().item()
    assert acc >= 0.98
    assert fn.test_accuracy == pytest.approx(acc)


def test_train_heads_learns_each_head_from_its_own_slice_of_the_logits():
    """Two heads over one linear layer: head A (2 classes) is the sign of feature 0, head B (3 classes) the tercile
    of feature 1; each is learnable only from its own logits, so both accuracies say the slices and sum are right."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 2, 1, 1, generator=g)
    ya = (x[:, 0, 0, 0] > 0).long()
    yb = torch.bucketize(x[:, 1, 0, 0].contiguous(), torch.tensor([-0.43, 0.43]))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    seen = []
    F.train_heads(net, x, (ya, yb), (2, 3), epochs=20, batch_size=64, lr=3e-2, generator=g,
                  augment=lambda xb, gen: seen.append(len(xb)) or xb)
    assert sum(seen) == 20 * 512 and not net.training
    with torch.no_grad():
        logits = net(x)
    assert (logits[:, :2].argmax(1) == ya).float().mean() > 0.95
    assert (logits[:, 2:].argmax(1) == yb).float().mean() > 0.9
    with pytest.raises(F.GenlabError, match="one label tensor per head"):
        F.train_heads(net, x, (ya,), (2, 3), epochs=1, batch_size=64, lr=1e-3, generator=g)
