"""TarFlow (Zhai et al. 2024): a normalizing flow of transformer autoregressive blocks over image patches.

An image is cut into N patches of d = C p^2 values, x = (x_1..x_N). Each of the `blocks` flow blocks is a causal
transformer that reads the patches before position i and gives (mu_i, alpha_i), and maps

    z_i = (x_i - mu_i(x_<i)) exp(-alpha_i(x_<i)),      log |det dz/dx| = -sum_i sum_d alpha_i      (sec. 3.1)

(an affine autoregressive flow, Kingma et al. 2016; Papamakarios et al. 2017, whose Jacobian is triangular); the
sequence order is reversed from one block to the next, so every patch conditions on every other over the stack. The
prior is N(0, I), so log p(x) = log N(z; 0, I) + sum of the blocks' log-determinants (Dinh et al. 2017, eq. 3): exact.
Training minimizes it in bits/dim under uniform dequantization, like the `flow` family. Sampling inverts each block
patch by patch, x_i = mu_i + exp(alpha_i) z_i, through the transformer's KV cache (N steps per block). With a class
label (dropped to a null class at `cond_drop` in training) the sampler can guide: (mu, alpha) = u + w (c - u) of the
unconditional and conditional outputs (sec. 3.4); temperature T draws z ~ N(0, T^2 I).

Noise augmentation (sec. 2.3), `noise_std` sigma > 0: the flow is trained on y = x + sigma eps, eps ~ N(0, I) (in
place of the uniform dequantization), so it models the density of noisy images, and a sample y of the flow is
denoised by one step of Tweedie's formula, x = y + sigma^2 grad_y log p(y) (Efron 2011, eq. 2.8: the posterior mean
E[x | y] when p is the density of y), the gradient taken by autograd through the exact log-likelihood (of the
sample's own label, unguided). What bits/dim measure then: `bits_per_dim` stays the flow's density on uniformly
dequantized test images, an upper bound on the 8-bit NLL of the model's binned distribution, defined exactly as with
sigma = 0 (so rows stay comparable; a model that learnt the blurred density scores worse on it); the training loss and
`noisy_bits_per_dim` are -log p(x + sigma eps) of the noisy test images on the same 8-bit scale (D log 256/2 added), a
density of the noisy data, not a likelihood of the images.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genlab.config import MAX_DEPTH, MAX_IMAGE_SIZE, MAX_WIDTH, check_int, check_number
from genlab.data.images import DELTA, bits_per_dim, dequantize, save_grid
from genlab.errors import GenlabError
from genlab.models.base import (
    Conditioning,
    GenerativeModel,
    Likelihood,
    ModelConfig,
    Output,
    SampleOption,
    class_labels,
    with_image_shape_and_classes,
)
from genlab.nn.transformer import Block, KVCache, RMSNorm, rope_tables
from genlab.registry import MODELS
from genlab.sampling.noise import Generators, randn

MAX_SAMPLES = 10_000
LOG_2PI = math.log(2 * math.pi)


@dataclass
class TarFlowConfig(ModelConfig):
    """Image shape, patching, and the sizes of the flow's transformer blocks."""

    image_size: int = 0  # 0: take from the data
    channels: int = 0  # 0: take from the data
    patch_size: int = 4
    blocks: int = 4  # flow blocks (each a causal transformer), order reversed between them
    layers_per_block: int = 2
    n_embd: int = 128
    n_head: int = 4
    class_cond: bool = False
    num_classes: int = 0  # 0: take from the data (when class_cond)
    cond_drop: float = 0.1  # share of training labels replaced by the null class (for guidance)
    preview_temperature: float = 0.8
    preview_guidance: float = 1.0  # guidance scale of the preview grids (1 = none)
    noise_std: float = 0.0  # sigma of the Gaussian noise augmentation (sec. 2.3) for data in [-1, 1]; 0: none


def _check(cfg: TarFlowConfig) -> None:
    if cfg.image_size <= 0 or cfg.channels <= 0:
        raise GenlabError("model.image_size and model.channels must be set (or build the model from a dataset)")
    check_int("model.image_size", cfg.image_size, 1, MAX_IMAGE_SIZE, "activations grow with its square")
    check_int("model.channels", cfg.channels, 1, MAX_WIDTH)
    check_int("model.patch_size", cfg.patch_size, 1, cfg.image_size)
    if cfg.image_size % cfg.patch_size:
        raise GenlabError(f"model.patch_size={cfg.patch_size} must divide the image size {cfg.image_size}")
    check_int("model.patch values (channels x patch_size^2)", cfg.channels * cfg.patch_size**2, 1, MAX_WIDTH)
    check_int("model.blocks", cfg.blocks, 1, MAX_DEPTH)
    check_int("model.layers_per_block", cfg.layers_per_block, 1, MAX_DEPTH)
    check_int("model.n_embd", cfg.n_embd, 2, MAX_WIDTH)
    check_int("model.n_head", cfg.n_head, 1, cfg.n_embd)
    if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 2:
        raise GenlabError(f"model.n_embd={cfg.n_embd} / model.n_head={cfg.n_head} must be a whole, even head size")
    check_int("model.num_classes", cfg.num_classes, 0, 100_000)
    check_number("model.cond_drop", cfg.cond_drop, 0, 1)
    check_number("model.preview_temperature", cfg.preview_temperature, 0, 10, hint="1 = the model's own density")
    check_number("model.preview_guidance", cfg.preview_guidance, 0, 100, hint="1 = no guidance")
    check_number("model.noise_std", cfg.noise_std, 0, 1, hint="the paper's 0.05 for data in [-1, 1]; 0 = none")
    if cfg.class_cond and cfg.num_classes < 1:
        raise GenlabError("model.class_cond needs model.num_classes >= 1 (or a dataset with labels)")


class FlowBlock(nn.Module):
    """One autoregressive affine block: a causal transformer over the shifted patches (a learned start vector at
    position 0, patch i - 1 at position i, plus the class embedding) gives (mu_i, alpha_i) of patch i; the output
    projection starts at zero, so a new block is the identity."""

    def __init__(self, d: int, n_patches: int, cfg: TarFlowConfig, num_classes: int) -> None:
        super().__init__()
        self.d, self.n_layer, self.n_head = d, cfg.layers_per_block, cfg.n_head
        self.proj_in = nn.Linear(d, cfg.n_embd)
        self.start = nn.Parameter(torch.zeros(cfg.n_embd))
        self.pos = nn.Parameter(torch.randn(n_patches, cfg.n_embd) * 0.02)
        self.class_emb = nn.Embedding(num_classes + 1, cfg.n_embd) if num_classes else None  # last: the null class
        hidden = 64 * math.ceil(8 * cfg.n_embd / 3 / 64)
        self.layers = nn.ModuleList(Block(cfg.n_embd, cfg.n_head, cfg.n_head, hidden, 1e-5, 0.0)
                                    for _ in range(cfg.layers_per_block))
        self.norm = RMSNorm(cfg.n_embd)
        self.proj_out = nn.Linear(cfg.n_embd, 2 * d)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        cos, sin = rope_tables(cfg.n_embd // cfg.n_head, n_patches)
        self.register_buffer("rope_cos", cos[:, None, :], persistent=False)
        self.register_buffer("rope_sin", sin[:, None, :], persistent=False)

    def _embed(self, h: Tensor, y: Tensor | None, start: int) -> Tensor:
        h = h + self.pos[start: start + h.shape[1]]
        if self.class_emb is not None and y is not None:
            h = h + self.class_emb(y)[:, None]
        return h

    def params(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """(mu, alpha), each (B, N, d), of every patch from the patches before it (one causal pass)."""
        B = x.shape[0]
        h = torch.cat([self.start.expand(B, 1, -1), self.proj_in(x[:, :-1])], dim=1)
        h = self._embed(h, y, 0)
        for i, layer in enumerate(self.layers):
            h = layer(h, self.rope_cos, self.rope_sin, None, None, i)
        mu, alpha = self.proj_out(self.norm(h)).chunk(2, dim=-1)
        return mu, alpha

    def forward(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """x -> z = (x - mu) exp(-alpha), and log |det dz/dx| = -sum alpha per item."""
        mu, alpha = self.params(x, y)
        return (x - mu) * torch.exp(-alpha), -alpha.flatten(1).sum(1)

    def step(self, h_in: Tensor, y: Tensor | None, i: int, cache: KVCache) -> tuple[Tensor, Tensor]:
        """(mu_i, alpha_i) (B, d) from the input at position i (the start vector or patch i - 1) and the cache."""
        h = self._embed(h_in[:, None], y, i)
        cos, sin = self.rope_cos[i: i + 1], self.rope_sin[i: i + 1]
        for k, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None, cache, k)
        cache.length = i + 1
        mu, alpha = self.proj_out(self.norm(h[:, 0])).chunk(2, dim=-1)
        return mu, alpha

    def new_cache(self, batch: int, n: int) -> KVCache:
        head_dim = self.proj_in.out_features // self.n_head
        w = self.proj_in.weight
        return KVCache(self.n_layer, batch, self.n_head, n, head_dim, w.dtype, w.device)


@MODELS.register("tarflow")
class TarFlow(GenerativeModel):
    """Transformer autoregressive flow; loss = -log p(x + u) - D log DELTA in bits/dim, u uniform over each 8-bit
    bin (Zhai et al. 2024, sec. 3.1; Theis et al. 2016, eq. 3-4)."""

    family = "tarflow"
    config_class = TarFlowConfig
    output = Output.IMAGE
    conditioning = frozenset({Conditioning.NONE, Conditioning.CLASS_LABEL})
    likelihood = Likelihood.EXACT
    sample_options = frozenset({SampleOption.TEMPERATURE, SampleOption.GUIDANCE})
    per_item_seeds = True

    def __init__(self, config: TarFlowConfig) -> None:
        super().__init__(config)
        _check(config)
        self.num_classes = config.num_classes if config.class_cond else 0
        p, c, s = config.patch_size, config.channels, config.image_size
        self.n_patches, self.d = (s // p) ** 2, c * p * p
        self.flow = nn.ModuleList(FlowBlock(self.d, self.n_patches, config, self.num_classes)
                                  for _ in range(config.blocks))
        if not self.num_classes:
            self.sample_options = frozenset({SampleOption.TEMPERATURE})

    @classmethod
    def build(cls, config: TarFlowConfig, dataset: Any) -> TarFlow:
        return cls(with_image_shape_and_classes(config, dataset, cls.family))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.channels, self.config.image_size, self.config.image_size

    # -- patches ----------------------------------------------------------------------------------------------------
    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, C p^2), patches in raster order."""
        p = self.config.patch_size
        B, C, H, W = x.shape
        return x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)

    def unpatchify(self, h: Tensor) -> Tensor:
        p = self.config.patch_size
        C, H, W = self.image_shape
        return h.view(-1, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(-1, C, H, W)

    def _labels(self, cond: Any, n: int, device: torch.device) -> Tensor | None:
        if not self.num_classes or cond is None:
            return None
        return torch.as_tensor(cond, dtype=torch.long, device=device).reshape(-1).expand(n)

    # -- the flow ---------------------------------------------------------------------------------------------------
    def encode(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """x -> (z (B, N, d), log p(x) in nats per item); an unlabelled item of a conditional model uses the null
        class."""
        y = self._labels(cond, x.shape[0], x.device)
        if self.num_classes and y is None:
            y = torch.full((x.shape[0],), self.num_classes, device=x.device)
        h, logdet = self.patchify(x), x.new_zeros(x.shape[0])
        for k, block in enumerate(self.flow):
            h, ld = block(h, y)
            logdet = logdet + ld
            if k < len(self.flow) - 1:
                h = h.flip(1)
        log_pz = (-0.5 * (LOG_2PI + h.pow(2))).flatten(1).sum(1)
        return h, log_pz + logdet

    @torch.no_grad()
    def decode(self, z: Tensor, cond: Any = None, guidance: float = 1.0) -> Tensor:
        """z (B, N, d) -> x, inverting the blocks last to first, patch by patch through each block's KV cache; with
        a label and guidance w != 1, (mu, alpha) = u + w (c - u) of the null-class and labelled passes."""
        B = z.shape[0]
        y = self._labels(cond, B, z.device)
        if self.num_classes and y is None:
            y = torch.full((B,), self.num_classes, device=z.device)
        guided = y is not None and guidance != 1.0
        if guided:
            y = torch.cat([y, torch.full_like(y, self.num_classes)])
        h = z
        for k in reversed(range(len(self.flow))):
            if k < len(self.flow) - 1:
                h = h.flip(1)
            block = self.flow[k]
            cache = block.new_cache(2 * B if guided else B, self.n_patches)
            x = torch.empty_like(h)
            h_in = block.start.expand(B, -1)
            for i in range(self.n_patches):
                inp = torch.cat([h_in, h_in]) if guided else h_in
                mu, alpha = block.step(inp, y, i, cache)
                if guided:
                    (mu_c, mu_u), (a_c, a_u) = mu.chunk(2), alpha.chunk(2)
                    mu, alpha = mu_u + guidance * (mu_c - mu_u), a_u + guidance * (a_c - a_u)
                x[:, i] = h[:, i] * torch.exp(alpha) + mu
                h_in = block.proj_in(x[:, i])
            h = x
        return self.unpatchify(h)

    # -- the family contract ----------------------------------------------------------------------------------------
    def log_likelihood(self, x: Tensor, cond: Any = None) -> Tensor:
        """log p(x) in nats per image, a density over continuous x in [-1, 1] (exact)."""
        return self.encode(x, cond)[1]

    @torch.no_grad()
    def denoise(self, y: Tensor, cond: Any = None, batch_size: int = 256) -> Tensor:
        """x = y + sigma^2 grad_y log p(y | cond) (Tweedie's formula, sec. 2.3), batch by batch."""
        sigma2 = self.config.noise_std**2
        labels = self._labels(cond, y.shape[0], y.device)
        out = []
        for i in range(0, y.shape[0], batch_size):
            with torch.enable_grad():
                yb = y[i: i + batch_size].detach().requires_grad_(True)
                log_p = self.log_likelihood(yb, None if labels is None else labels[i: i + batch_size])
                (score,) = torch.autograd.grad(log_p.sum(), yb)
            out.append(yb.detach() + sigma2 * score)
        return torch.cat(out)

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Bits/dim of the dequantized batch (or, with `noise_std`, of x + sigma eps), labels dropped to the null
        class at `cond_drop`."""
        x = batch["x"]
        y = None
        if self.num_classes:
            y = batch["label"].to(x.device).clone()
            drop = (torch.rand(y.shape, device=x.device) < self.config.cond_drop) | (y < 0)
            y[drop] = self.num_classes
        dims = x[0].numel()
        sigma = self.config.noise_std
        x_in = x + sigma * torch.randn_like(x) if sigma > 0 else dequantize(x)
        nll = -(self.log_likelihood(x_in, y) + dims * math.log(DELTA))
        return {"loss": bits_per_dim(nll, dims).mean()}

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Generators = None, temperature: float = 1.0,
               guidance: Any = None, denoise: bool = True) -> Tensor:
        """x = f^-1(T eps), eps ~ N(0, I); with a class-conditional model, guidance (a `Guidance`, its scale w); a
        model trained with `noise_std` denoises it (`denoise`: off to see the flow's own noisy sample)."""
        if not 1 <= n <= MAX_SAMPLES:
            raise GenlabError(f"n={n} is out of range; use 1..{MAX_SAMPLES}")
        check_number("temperature", temperature, 0, 10, hint="1 = the model's own density")
        if cond is not None and not self.num_classes:
            raise GenlabError("this tarflow is unconditional; leave out the label")
        scale = 1.0
        if guidance is not None:
            if not self.num_classes:
                raise GenlabError("guidance needs a class-conditional tarflow (model.class_cond)")
            if guidance.negative is not None or guidance.rescale:
                raise GenlabError("tarflow guides against the null class only: leave out the negative label and "
                                  "guidance rescale")
            scale = guidance.scale
        param = next(self.parameters())
        device = param.device
        y = self.labels_for(n, cond) if self.num_classes else None
        z = temperature * randn((n, self.n_patches, self.d), generator, device, param.dtype)
        y = None if y is None else y.to(device)
        x = self.decode(z, y, scale)
        if self.config.noise_std > 0 and denoise:
            x = self.denoise(x, y)
        return x.clamp(-1.0, 1.0)

    def labels_for(self, n: int, label: Any = None) -> Tensor | None:
        return class_labels(n, label, self.num_classes) if self.num_classes else super().labels_for(n, label)

    @torch.no_grad()
    def validation_metrics(self, val_data: Any, batch_size: int = 100, items: int = 1000) -> dict[str, float]:
        """Exact bits/dim (dequantized with fixed noise) of the first `items` held-out images, unlabelled, with
        `noise_std` also those of the noisy images (`noisy_bits_per_dim`, see the module's docstring), and the
        sampling cost: single-patch evaluations (blocks x patches) and milliseconds per image (4 drawn at once)."""
        device = next(self.parameters()).device
        n = min(len(val_data), items)
        sigma = self.config.noise_std
        total, noisy, gen, noise_gen = 0.0, 0.0, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        dims = math.prod(self.image_shape)
        for start in range(0, n, batch_size):
            x = val_data.get_batch(torch.arange(start, min(start + batch_size, n)))["x"]
            xq = dequantize(x, gen).to(device)
            total += float(bits_per_dim(-(self.log_likelihood(xq) + dims * math.log(DELTA)), dims).sum())
            if sigma > 0:
                xn = (x + sigma * torch.randn(x.shape, generator=noise_gen)).to(device)
                noisy += float(bits_per_dim(-(self.log_likelihood(xn) + dims * math.log(DELTA)), dims).sum())
        t0 = time.perf_counter()
        self.sample(4, self.labels_for(4), torch.Generator(device).manual_seed(0))
        ms = 1000 * (time.perf_counter() - t0) / 4
        out = {"bits_per_dim": total / n, "evals_per_image": float(len(self.flow) * self.n_patches),
               "sample_ms_per_image": ms}
        if sigma > 0:
            out["noisy_bits_per_dim"] = noisy / n
        return out

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """A PNG grid at `preview_temperature` (and `preview_guidance`), one row per class when conditional."""
        from genlab.sampling.controls import Guidance

        n = min(sample_cfg.n, 64)
        labels = self.labels_for(n)
        nrow = int((labels == 0).sum()) if labels is not None else None
        t, w = self.config.preview_temperature, self.config.preview_guidance
        guidance = Guidance(w) if self.num_classes and w != 1.0 else None
        x = self.sample(n, labels, generator=generator, temperature=t, guidance=guidance)
        return [save_grid(x, Path(stem).with_suffix(".png"), nrow=nrow,
                          params={"n": n, "seed": sample_cfg.seed, "temperature": t, "guidance": w})]
