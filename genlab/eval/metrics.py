"""Sample-quality metrics over feature arrays: FID, KID, Inception-style score, precision/recall, density/coverage.

The math of FID, KID and IS is torchmetrics' (its metrics accept any feature `nn.Module`; here the features are
computed once by genlab's own network and fed through an identity module, built with `sync_on_compute=False`: one
process computes each number on features it already holds, under torchrun rank 0 alone). KID's standard error (a
jackknife variance), improved precision and recall (Kynkaanniemi et al. 2019) and density / coverage (Naeem et al.
2020), which torchmetrics lacks, are written here.
Every function takes (N, D) float tensors and is deterministic given its `seed`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from genlab.errors import GenlabError


class Precomputed(nn.Module):
    """Identity "feature extractor" so torchmetrics' metric math runs on features genlab already computed."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def _check(real: Tensor, fake: Tensor, least: int = 2) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise GenlabError(f"features must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) < least:
        raise GenlabError(f"need at least {least} real and generated samples, got {len(real)} and {len(fake)}")


def fid(real: Tensor, fake: Tensor) -> float:
    """Frechet distance ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) (Heusel et al. 2017, eq. 6), float64."""
    _check(real, fake)
    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]), sync_on_compute=False).double()
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def _poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    """KID's kernel k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018, sec. 3), between the rows of a and b."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def _poly_kernel_diagonal(a: Tensor) -> Tensor:
    """k(x, x) for each row x of a."""
    return ((a * a).sum(1) / a.shape[1] + 1) ** 3


def kid_jackknife_variance(real: Tensor, fake: Tensor, chunk: int = 1024) -> float:
    """Jackknife variance of the full-sample unbiased MMD^2 (KID's estimator, Binkowski et al. 2018, eq. 4).

    MMD^2_u is a two-sample U-statistic; its delete-one jackknife variance (Arvesen 1969)
    V = (m-1)/m sum_i (U_-i - mean U_-i)^2 + (n-1)/n sum_j (U_-j - mean U_-j)^2 is consistent and, by the
    Efron-Stein inequality, conservative. Each leave-one-out U_-i follows from kernel row sums, so this costs
    one pass over the (m + n)^2 kernel entries, in chunks, in float64.
    """
    x, y = real.double(), fake.double()
    m, n = len(x), len(y)
    r = torch.empty(m, dtype=torch.float64)  # r_i = sum_{i' != i} k(x_i, x_i')
    c = torch.empty(m, dtype=torch.float64)  # c_i = sum_j k(x_i, y_j)
    d = torch.zeros(n, dtype=torch.float64)  # d_j = sum_i k(x_i, y_j)
    s = torch.empty(n, dtype=torch.float64)  # s_j = sum_{j' != j} k(y_j, y_j')
    for i, rows in _row_chunks(x, chunk):
        r[i : i + len(rows)] = _poly_kernel(rows, x).sum(1) - _poly_kernel_diagonal(rows)
        kxy = _poly_kernel(rows, y)
        c[i : i + len(rows)] = kxy.sum(1)
        d += kxy.sum(0)
    for j, rows in _row_chunks(y, chunk):
        s[j : j + len(rows)] = _poly_kernel(rows, y).sum(1) - _poly_kernel_diagonal(rows)
    # U_-i = const - 2/(m-1) * (r_i/(m-2) - c_i/n): only the part that varies with i enters the variance
    u = 2 / (m - 1) * (c / n - r / (m - 2))
    v = 2 / (n - 1) * (d / m - s / (n - 2))
    return float((m - 1) / m * ((u - u.mean()) ** 2).sum() + (n - 1) / n * ((v - v.mean()) ** 2).sum())


def kid(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
        ) -> dict[str, float]:
    """Kernel distance: unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018, eq. 4), over subsets.

    Returns the mean over `subsets` random subsets of `min(subset_size, n_real, n_fake)` items, the standard
    deviation across subsets, and the standard error of that mean. Given the samples, the subset mean is an
    unbiased estimate of the full-sample MMD^2_u (every pair is equally likely to be drawn), so its variance is
    Var(MMD^2_u) + E[subset variance] / subsets: the first term is `kid_jackknife_variance`, the second the spread
    across subsets (zero when each subset is the whole sample; unknown, so nan, from one subset of fewer items).
    """
    _check(real, fake, least=3)
    m = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features": that is the point here
        warnings.simplefilter("ignore")
        metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=m,
                                         sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        mean, std = metric.compute()  # std over subsets with divisor `subsets`
    std = float(std) if subsets > 1 else float("nan")
    whole = m == len(real) == len(fake)  # every subset is the whole sample: no subset noise
    subset_var = 0.0 if whole else std**2 / (subsets - 1) if subsets > 1 else float("nan")
    se = math.sqrt(kid_jackknife_variance(real, fake) + subset_var)
    return {"kid": float(mean), "kid_std": std, "kid_se": se, "kid_subsets": subsets, "kid_subset_size": m}


def inception_score(logits: Tensor, splits: int = 10, seed: int = 0) -> dict[str, float]:
    """exp(E_x KL(p(y|x) || p(y))) over classifier logits (Salimans et al. 2016, sec. 4); mean, std over splits."""
    if logits.ndim != 2 or len(logits) < splits:
        raise GenlabError(f"the Inception-style score needs (N, classes) logits with N >= {splits}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = InceptionScore(feature=Precomputed(logits.shape[1]), splits=splits, sync_on_compute=False)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # std of one split is nan, and says so
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"is": float(mean), "is_std": float(std), "is_splits": splits}


def _row_chunks(x: Tensor, rows: int) -> Iterator[tuple[int, Tensor]]:
    for i in range(0, len(x), rows):
        yield i, x[i : i + rows]


def _distances(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise Euclidean distances via the Gram matrix (squared distances clamped at 0)."""
    d2 = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return d2.clamp_min_(0).sqrt_()


def knn_radii(x: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """Distance from each point of `x` to its k-th nearest neighbour in `x`, itself excluded."""
    if len(x) <= k:
        raise GenlabError(f"k-NN radii need more than k={k} samples, got {len(x)}")
    out = torch.empty(len(x), dtype=x.dtype)
    for i, rows in _row_chunks(x, chunk):
        d = _distances(rows, x)
        d[torch.arange(len(rows)), torch.arange(i, i + len(rows))] = float("inf")  # exclude self
        out[i : i + len(rows)] = d.topk(k, dim=1, largest=False).values[:, -1]
    return out


def _ball_counts(query: Tensor, centers: Tensor, radii: Tensor, chunk: int = 2048) -> Tensor:
    """For each query point, how many balls B(center_i, radius_i) contain it."""
    counts = torch.empty(len(query), dtype=torch.long)
    for i, rows in _row_chunks(query, chunk):
        counts[i : i + len(rows)] = (_distances(rows, centers) <= radii[None, :]).sum(1)
    return counts


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall with k-NN manifolds (Kynkaanniemi et al. 2019, eq. 1-2).

    precision: fraction of generated samples inside the real manifold (union of real k-NN balls);
    recall: fraction of real samples inside the generated manifold.
    """
    _check(real, fake, least=k + 1)
    real, fake = real.float(), fake.float()
    precision = (_ball_counts(fake, real, knn_radii(real, k)) > 0).double().mean()
    recall = (_ball_counts(real, fake, knn_radii(fake, k)) > 0).double().mean()
    return {"precision": float(precision), "recall": float(recall), "prc_k": k}


def density_coverage(real: Tensor, fake: Tensor, k: int = 5) -> dict[str, float]:
    """Density and coverage over real k-NN balls (Naeem et al. 2020, eq. 3 and 4).

    density: (1 / kM) sum_j #{i : fake_j in B(real_i, NND_k(real_i))};
    coverage: fraction of real balls that contain at least one generated sample.
    """
    _check(real, fake, least=k + 1)
    real, fake = real.float(), fake.float()
    radii = knn_radii(real, k)
    density = _ball_counts(fake, real, radii).double().sum() / (k * len(fake))
    covered = torch.zeros(len(real), dtype=torch.bool)
    for _, rows in _row_chunks(fake, 2048):
        covered |= (_distances(rows, real) <= radii[None, :]).any(0)
    return {"density": float(density), "coverage": float(covered.double().mean()), "dc_k": k}


def equal_sizes(real: Tensor, fake: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Both sets at the smaller one's size: the larger is subsampled without replacement with a seeded generator."""
    n = min(len(real), len(fake))
    g = torch.Generator().manual_seed(seed)

    def take(x: Tensor) -> Tensor:
        return x if len(x) == n else x[torch.randperm(len(x), generator=g)[:n]]

    return take(real), take(fake)


def precision_recall_density_coverage(real: Tensor, fake: Tensor, seed: int = 0) -> dict[str, float]:
    """Precision and recall (k=3), density and coverage (k=5) on equal-size samples, with that size as `prc_n`.

    k-NN manifolds make these depend on the two sample sizes, not only on the distributions: for identical
    distributions coverage is 0.97 at 2,000 vs 2,000 but 0.998 at 2,000 vs 5,000. Naeem et al. 2020 compare
    equal sizes, so the larger set is subsampled (`equal_sizes`) and numbers are comparable at equal `prc_n`.
    """
    r, f = equal_sizes(real, fake, seed)
    return precision_recall(r, f) | density_coverage(r, f) | {"prc_n": len(r)}
