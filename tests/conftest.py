"""Shared fixtures."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster, and much faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_weights(model: torch.nn.Module, seed: int = 1) -> torch.Generator:
    """Every weight random at a fan-in scale (zero-initialised output layers too); returns the generator used."""
    import math

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in) * (1.0 if p.ndim > 1 else 0.1))
    return g


@functools.lru_cache(maxsize=1)
def tiny_feature_network():
    """A 1-epoch feature network on 256 MNIST digits (hash "tiny0000"), standing in for the cached MNIST network;
    trained once per test session."""
    from genlab.data import load_dataset
    from genlab.eval import features as F

    ds = load_dataset("mnist").subset(256)
    recipe = F.FeatureRecipe(width=4, feature_dim=16, epochs=1, batch_size=64)
    net, meta = F.train_feature_network(ds, ds, recipe, "classifier", progress=False)
    meta.update(hash="tiny0000", dataset="mnist", recipe=vars(recipe), recipe_version=F.RECIPE_VERSION)
    return F.FeatureNetwork(net, meta)
