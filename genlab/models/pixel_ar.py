"""Autoregressive pixels: a pixel transformer on genlab's GPT (Chen et al. 2020, Image GPT; Parmar et al. 2018).

An image of D = C x H x W 8-bit values is read in raster order (row by row, the channels of a pixel in turn) as D
tokens t_1..t_D in 0..255, and p(x | y) = prod_i p(t_i | t_<i, y) (the chain rule, van den Oord et al. 2016, eq. 1)
with a 256-way softmax per value, so log p is exact and the training loss is test bits/dim directly. The class y
(or, unconditionally, one start token) is the first token of the sequence; the network is `GPT` (RoPE, RMSNorm,
SwiGLU, causal attention) and sampling decodes one value at a time through its KV cache: D network evaluations
per image, each over one new token.

`TokenAR` is the sequence model alone (tokens of any vocabulary, a start token per class); the VQ family's GPT
prior over codes is the same class.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.config import MAX_CONTEXT, MAX_IMAGE_SIZE, MAX_WIDTH, check_int, check_number
from genlab.data.images import DELTA, save_grid
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
from genlab.models.gpt import GPT, GPTConfig
from genlab.nn.distributions import to_pixel_levels
from genlab.registry import MODELS
from genlab.sampling.noise import Generators, randn

MAX_SAMPLES = 10_000
MAX_CLASSES = 100_000
LEVELS = 256
VAL_ITEMS = 200  # held-out images behind the validation bits/dim (784 values each: ~1 min on a busy core)
COST_ITEMS = 4  # images drawn at validation to time sampling


def uniforms(shape: tuple[int, ...], generator: Generators, device: torch.device | str) -> Tensor:
    """U(0, 1) draws as Phi(z) of standard normal ones; with a list of generators, item i uses generator i alone."""
    return torch.special.ndtr(randn(shape, generator, device, torch.float64)).float()


def categorical(logits: Tensor, u: Tensor, temperature: float) -> Tensor:
    """One draw per row from softmax(logits / T) by inverting its CDF at u (B,) (T = 0: the argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = torch.softmax(logits.float() / temperature, dim=-1).cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp(max=logits.shape[-1] - 1)


class TokenAR(nn.Module):
    """p(t_1..t_L | y) = prod_i p(t_i | t_<i, y) over a vocabulary of `vocab` tokens, with genlab's GPT; token
    `vocab` starts an unconditional sequence, `vocab + 1 + y` one of class y."""

    def __init__(self, vocab: int, length: int, num_classes: int, n_layer: int, n_head: int, n_embd: int,
                 ffn_hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.vocab, self.length, self.num_classes = vocab, length, num_classes
        self.gpt = GPT(GPTConfig(vocab_size=vocab + 1 + num_classes, block_size=length, n_layer=n_layer,
                                 n_head=n_head, n_embd=n_embd, ffn_hidden=ffn_hidden, dropout=dropout))

    def start_tokens(self, n: int, y: Tensor | None, device: torch.device) -> Tensor:
        """(n,) first tokens: `vocab` (unconditional), else `vocab + 1 + y`."""
        if y is None:
            return torch.full((n,), self.vocab, dtype=torch.long, device=device)
        return self.vocab + 1 + y.to(device).long().reshape(-1).expand(n)

    def logits(self, tokens: Tensor, y: Tensor | None = None) -> Tensor:
        """(B, L, vocab): the logits of p(t_i | t_<i, y) at every position, from one causal pass."""
        start = self.start_tokens(tokens.shape[0], y, tokens.device)
        inp = torch.cat([start[:, None], tokens[:, :-1]], dim=1)
        return self.gpt(inp)[..., : self.vocab]

    def log_prob(self, tokens: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(t | y) in nats per sequence, (B,), exact by the chain rule."""
        logits = self.logits(tokens, y)
        logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        return logp.gather(-1, tokens[..., None])[..., 0].sum(-1)

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None, u: Tensor, temperature: float = 1.0) -> Tensor:
        """(n, L) tokens drawn one at a time through the KV cache (L network evaluations of one token each); u (n, L)
        are the uniforms that pick each token (`categorical`)."""
        device = self.gpt.tok_emb.weight.device
        cache = self.gpt.new_cache(n, self.length)
        tok = self.start_tokens(n, y, device)[:, None]
        out = torch.empty(n, self.length, dtype=torch.long, device=device)
        for i in range(self.length):
            logits = self.gpt(tok, cache=cache)[:, -1, : self.vocab]
            out[:, i] = categorical(logits, u[:, i].to(device), temperature)
            tok = out[:, i: i + 1]
        return out


@dataclass
class PixelARConfig(ModelConfig):
    """Image shape, class conditioning and the transformer's sizes."""

    image_size: int = 0  # 0: take from the data
    channels: int = 0  # 0: take from the data
    class_cond: bool = False  # the class label is the sequence's first token
    num_classes: int = 0  # 0: take from the data (when class_cond)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    ffn_hidden: int = 0  # 0: 8/3 n_embd rounded up to a multiple of 64 (Llama)
    dropout: float = 0.0
    preview_temperature: float = 1.0  # temperature of the sample grids written during training


def _check(cfg: PixelARConfig) -> None:
    if cfg.image_size <= 0 or cfg.channels <= 0:
        raise GenlabError("model.image_size and model.channels must be set (or build the model from a dataset)")
    check_int("model.image_size", cfg.image_size, 1, MAX_IMAGE_SIZE, "activations grow with its square")
    check_int("model.channels", cfg.channels, 1, MAX_WIDTH)
    check_int("model.num_classes", cfg.num_classes, 0, MAX_CLASSES)
    if cfg.channels * cfg.image_size**2 > MAX_CONTEXT:
        raise GenlabError(f"model.image_size={cfg.image_size} with {cfg.channels} channels makes sequences of "
                          f"{cfg.channels * cfg.image_size**2:,} values; at most {MAX_CONTEXT:,} (position tables "
                          "of this length are built): lower data.image_size")
    check_number("model.dropout", cfg.dropout, 0, 1, high_open=True)
    check_number("model.preview_temperature", cfg.preview_temperature, 0, 10, hint="1 = the model's own density")
    if cfg.class_cond and cfg.num_classes < 1:
        raise GenlabError("model.class_cond needs model.num_classes >= 1 (or a dataset with labels)")


@MODELS.register("pixel_ar")
class PixelAR(GenerativeModel):
    """A pixel transformer: loss = -log p(x | y) / (D log 2), exact bits/dim of the 8-bit image (Chen et al. 2020,
    eq. 1; van den Oord et al. 2016, eq. 1-2)."""

    family = "pixel_ar"
    config_class = PixelARConfig
    output = Output.IMAGE
    conditioning = frozenset({Conditioning.NONE, Conditioning.CLASS_LABEL})
    likelihood = Likelihood.EXACT
    sample_options = frozenset({SampleOption.TEMPERATURE})
    per_item_seeds = True

    def __init__(self, config: PixelARConfig) -> None:
        super().__init__(config)
        _check(config)
        self.num_classes = config.num_classes if config.class_cond else 0
        c = config
        self.net = TokenAR(LEVELS, c.channels * c.image_size**2, self.num_classes, c.n_layer, c.n_head, c.n_embd,
                           c.ffn_hidden, c.dropout)

    @classmethod
    def build(cls, config: PixelARConfig, dataset: Any) -> PixelAR:
        """Fill image_size, channels and num_classes from `dataset.info` where the config leaves them at 0."""
        return cls(with_image_shape_and_classes(config, dataset, cls.family))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.channels, self.config.image_size, self.config.image_size

    @property
    def dims(self) -> int:
        return math.prod(self.image_shape)

    # -- pixels <-> tokens ------------------------------------------------------------------------------------------
    @staticmethod
    def to_tokens(x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, H W C) 8-bit levels in raster order, the channels of a pixel in turn."""
        levels = ((to_pixel_levels(x) + 1.0) / DELTA).round().long()
        return levels.permute(0, 2, 3, 1).flatten(1)

    def to_images(self, tokens: Tensor) -> Tensor:
        """The inverse of `to_tokens`: (B, D) levels -> (B, C, H, W) in [-1, 1]."""
        c, h, w = self.image_shape
        return (tokens.view(-1, h, w, c).permute(0, 3, 1, 2).float() * DELTA - 1.0).contiguous()

    def _labels(self, y: Any, n: int, device: torch.device) -> Tensor | None:
        if not self.num_classes:
            return None
        if y is None:
            raise GenlabError("this pixel_ar model is class-conditional: give labels")
        return torch.as_tensor(y, dtype=torch.long, device=device).reshape(-1).expand(n)

    # -- the family contract ----------------------------------------------------------------------------------------
    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Mean cross-entropy of each 8-bit value given the ones before it, in bits: exact bits/dim."""
        x = batch["x"]
        tokens = self.to_tokens(x)
        y = self._labels(batch.get("label"), x.shape[0], x.device) if self.num_classes else None
        logits = self.net.logits(tokens, y)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        return {"loss": nll / math.log(2)}

    def log_likelihood(self, x: Tensor, cond: Any = None) -> Tensor:
        """log P(levels of x | y) - D log DELTA in nats per image: the exact mass of x's 8-bit levels as a density over
        their bins (so a dequantized point gives back -log P). A class-conditional model without labels gives the
        exact log p(x) = log (1/K) sum_y p(x | y) under a uniform class prior (K passes)."""
        tokens = self.to_tokens(x)
        if self.num_classes and cond is None:
            per_class = [self.net.log_prob(tokens, torch.full((x.shape[0],), k, device=x.device))
                         for k in range(self.num_classes)]
            logp = torch.logsumexp(torch.stack(per_class), dim=0) - math.log(self.num_classes)
        else:
            logp = self.net.log_prob(tokens, self._labels(cond, x.shape[0], x.device))
        return logp - self.dims * math.log(DELTA)

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Generators = None, temperature: float = 1.0) -> Tensor:
        """Images drawn value by value from softmax(logits / T) (T < 1 sharpens, T = 0 is greedy), D network
        evaluations each through the KV cache; image i uses generator i alone when given a list."""
        if not 1 <= n <= MAX_SAMPLES:
            raise GenlabError(f"n={n} is out of range; use 1..{MAX_SAMPLES}")
        check_number("temperature", temperature, 0, 10, hint="1 = the model's own distribution")
        if cond is not None and not self.num_classes:
            raise GenlabError("this pixel_ar model is unconditional; leave out the label")
        device = self.net.gpt.tok_emb.weight.device
        y = self._labels(self.labels_for(n, cond), n, device) if self.num_classes else None
        u = uniforms((n, self.dims), generator, device)
        return self.to_images(self.net.sample(n, y, u, temperature))

    def labels_for(self, n: int, label: Any = None) -> Tensor | None:
        """None for an unconditional model; else (n,) labels (None: classes in blocks, one grid row per class)."""
        return class_labels(n, label, self.num_classes) if self.num_classes else super().labels_for(n, label)

    @torch.no_grad()
    def validation_metrics(self, val_data: Any, batch_size: int = 50) -> dict[str, float]:
        """Exact bits/dim of the first VAL_ITEMS held-out images (given their labels when class-conditional), and
        the sampling cost: network evaluations and milliseconds per image (COST_ITEMS drawn at once)."""
        device = self.net.gpt.tok_emb.weight.device
        n = min(len(val_data), VAL_ITEMS)
        total = 0.0
        for start in range(0, n, batch_size):
            batch = val_data.get_batch(torch.arange(start, min(start + batch_size, n)))
            y = batch["label"].to(device) if self.num_classes else None
            total -= float(self.net.log_prob(self.to_tokens(batch["x"].to(device)), y).sum())
        t0 = time.perf_counter()
        self.sample(COST_ITEMS, self.labels_for(COST_ITEMS), torch.Generator(device).manual_seed(0))
        ms = 1000 * (time.perf_counter() - t0) / COST_ITEMS
        return {"bits_per_dim": total / (n * self.dims * math.log(2)), "evals_per_image": float(self.dims),
                "sample_ms_per_image": ms}

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """A PNG grid of samples at `preview_temperature`, one row per class when class-conditional."""
        n = min(sample_cfg.n, 64)
        labels = self.labels_for(n)
        nrow = int((labels == 0).sum()) if labels is not None else None
        t = self.config.preview_temperature
        x = self.sample(n, labels, generator=generator, temperature=t)
        return [save_grid(x, Path(stem).with_suffix(".png"), nrow=nrow,
                          params={"n": n, "seed": sample_cfg.seed, "temperature": t})]
