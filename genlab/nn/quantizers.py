"""Vector quantizers for discrete latents: VQ with an EMA codebook (van den Oord et al. 2017), and finite scalar
quantization (Mentzer et al. 2023).

Both take latents (B, D, h, w) and return the quantized latents (straight-through: the forward value is the code, the
backward pass copies the gradient to the input, van den Oord et al. 2017, eq. 3), the code indices (B, h, w) and
their own loss terms.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def straight_through(z: Tensor, z_q: Tensor) -> Tensor:
    """z_q in the forward pass, the identity in the backward pass: z + sg(z_q - z) (van den Oord et al. 2017, sec.
    3.1)."""
    return z + (z_q - z).detach()


def _all_reduce(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _broadcast(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, 0)
    return t


def kmeans(x: Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> Tensor:
    """k centroids of the rows of x (N, D) by Lloyd's algorithm from k rows drawn at random (with replacement when
    N < k); a centroid that loses all its points keeps its place."""
    idx = torch.randint(0, x.shape[0], (k,), generator=generator) if x.shape[0] < k else \
        torch.randperm(x.shape[0], generator=generator)[:k]
    c = x[idx.to(x.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
    return c


class VectorQuantizerEMA(nn.Module):
    """Nearest-neighbour quantization to K codes e_i; the codebook is the EMA of the encoder outputs assigned to
    each code, not trained by gradients (van den Oord et al. 2017, app. A.1, eq. 6-8):

        N_i <- g N_i + (1 - g) n_i,   m_i <- g m_i + (1 - g) sum_j z_ij,   e_i = m_i / N_i

    with the counts N Laplace-smoothed (eps) so that e_i is defined for a code nobody chose. The loss is the
    commitment term beta ||z - sg(e)||^2 (eq. 3, its codebook term replaced by the EMA). Extras that keep every code
    in use: the codebook is set by k-means on the first training batch (`kmeans_init`), and a code whose average
    count N_i falls below `dead_threshold` is restarted at a random encoder output of the current batch."""

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, beta: float = 0.25, eps: float = 1e-5,
                 kmeans_init: bool = True, dead_threshold: float = 1.0) -> None:
        super().__init__()
        self.num_codes, self.dim, self.decay, self.beta, self.eps = num_codes, dim, decay, beta, eps
        self.dead_threshold = dead_threshold
        self.register_buffer("codebook", torch.randn(num_codes, dim))
        self.register_buffer("ema_count", torch.ones(num_codes))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def indices(self, z: Tensor) -> Tensor:
        """Index of the nearest code of each latent vector, (B, h, w)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + self.codebook.pow(2).sum(1)[None]
        return d.argmin(1).view(z.shape[0], *z.shape[2:])

    def lookup(self, idx: Tensor) -> Tensor:
        """Codes of indices (B, h, w) as latents (B, D, h, w)."""
        return F.embedding(idx, self.codebook).permute(0, 3, 1, 2)

    @torch.no_grad()
    def ema_update(self, flat: Tensor, idx: Tensor) -> None:
        """One EMA step (eq. 6-8) from latent vectors `flat` (N, D) and their nearest codes `idx` (N,), summed over
        every process."""
        onehot = F.one_hot(idx, self.num_codes).to(flat.dtype)
        n = _all_reduce(onehot.sum(0))
        s = _all_reduce(onehot.t() @ flat)
        self.ema_count.mul_(self.decay).add_(n, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(s, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.num_codes * self.eps) * total
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _init_and_restart(self, flat: Tensor) -> None:
        if not bool(self.initialized):
            c = _broadcast(kmeans(flat.float(), self.num_codes).to(self.codebook.dtype))
            self.codebook.copy_(c)
            self.ema_sum.copy_(c)
            self.ema_count.fill_(1.0)
            self.initialized.fill_(True)
            return
        dead = _broadcast((self.ema_count < self.dead_threshold).to(torch.uint8)).bool()
        if bool(dead.any()):
            pick = flat[torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device)]
            pick = _broadcast(pick.contiguous())
            self.codebook[dead] = pick
            self.ema_sum[dead] = pick
            self.ema_count[dead] = 1.0

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(straight-through z_q, indices, {"commit": beta ||z - sg(e)||^2}); in training mode the codebook is
        initialized, restarted and EMA-updated from this batch first (in float32, outside autocast)."""
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim).float()
        with torch.autocast(z.device.type, enabled=False):
            if self.training and torch.is_grad_enabled():
                self._init_and_restart(flat)
                self.ema_update(flat, self.indices(z.detach().float()).reshape(-1))
            idx = self.indices(z.detach().float())
        z_q = self.lookup(idx).to(z.dtype)
        commit = self.beta * F.mse_loss(z, z_q.detach())
        return straight_through(z, z_q), idx, {"commit": commit}


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023, sec. 3, eq. 1-2): each of the d = len(levels) latent
    channels is bounded to L_i values by f(z) = tanh(z + shift) (L_i - 1) / 2 - offset (offset 1/2 for even L_i)
    and rounded, straight-through; the implicit codebook is the product of the levels, so no code can collapse and
    there is no codebook loss. Codes are rescaled to [-1, 1] and indexed in mixed radix."""

    def __init__(self, levels: tuple[int, ...] | list[int], eps: float = 1e-3) -> None:
        super().__init__()
        self.levels = tuple(int(v) for v in levels)
        self.dim = len(self.levels)
        self.num_codes = math.prod(self.levels)
        lv = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1], dtype=torch.long), 0)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.eps = eps

    def bound(self, z: Tensor) -> Tensor:
        """f(z) per channel: values in (-(L-1)/2 - offset, (L-1)/2 - offset) before rounding (Mentzer et al. 2023,
        app. A.1)."""
        lv = self._levels.view(1, -1, 1, 1).to(z.dtype)
        half = (lv - 1) * (1 + self.eps) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(straight-through codes in [-1, 1], indices (B, h, w), no losses)."""
        bounded = self.bound(z)
        q = straight_through(bounded, bounded.round())
        half_width = (self._levels // 2).view(1, -1, 1, 1).to(z.dtype)
        return q / half_width, self.codes_to_indices(q), {}

    def codes_to_indices(self, q: Tensor) -> Tensor:
        """Integer codes q (B, d, h, w) (centred: q_i + L_i // 2 in 0..L_i - 1) -> mixed-radix indices (B, h, w)."""
        digits = (q.detach() + (self._levels // 2).view(1, -1, 1, 1)).round().long()
        return (digits * self._basis.view(1, -1, 1, 1)).sum(1)

    def lookup(self, idx: Tensor) -> Tensor:
        """Indices (B, h, w) -> codes rescaled to [-1, 1], (B, d, h, w)."""
        digits = (idx[:, None] // self._basis.view(1, -1, 1, 1)) % self._levels.long().view(1, -1, 1, 1)
        q = digits.float() - (self._levels // 2).view(1, -1, 1, 1)
        return q / (self._levels // 2).view(1, -1, 1, 1)


def codebook_usage(counts: Tensor) -> dict[str, float]:
    """From how often each code was chosen (K,): the share of codes used at least once, and the perplexity
    exp(H(p)) of the code distribution (K when all are equally used)."""
    used = int((counts > 0).sum()) / counts.numel()
    p = counts.double() / counts.sum().clamp(min=1)
    entropy = -(p * p.clamp(min=1e-30).log()).sum()
    return {"codebook_usage": used, "codebook_perplexity": float(entropy.exp())}
