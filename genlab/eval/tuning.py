"""The score that sampling settings are chosen on after training (`GenerativeModel.tune_sampling`): FID (Heusel et
al. 2017, eq. 6) in the dataset's own feature network against the TRAINING split, the validation reference of such
choices, so the test split that reported FIDs use is never read while choosing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from genlab.config import DataConfig
from genlab.eval import metrics as M
from genlab.eval.features import FeatureNetwork, get_feature_network
from genlab.eval.reference import reference_features

VALIDATION_SPLIT = "train"


def validation_fid(data: DataConfig, fnet: FeatureNetwork | None = None) -> Callable[[Tensor, Any], float]:
    """`score(images, labels) -> FID` of images in [-1, 1] against the training split of `data` (loaded at the
    run's image size), in `fnet` (default: the dataset's feature network, as `genlab eval` uses)."""
    if fnet is None:
        with torch.enable_grad():  # a network not cached yet is trained here, maybe under a caller's no_grad
            fnet = get_feature_network(data.name, progress=True)
    ref = reference_features(fnet, data, VALIDATION_SPLIT)

    def score(images: Tensor, labels: Any = None) -> float:
        feats, _ = fnet.embed(images)
        return float(M.fid(ref.features, feats))

    return score
