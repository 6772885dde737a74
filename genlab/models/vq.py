"""Discrete latents in two stages: a VQ tokenizer (VQ-VAE, van den Oord et al. 2017; or FSQ, Mentzer et al. 2023),
then a prior over its codes: genlab's GPT (van den Oord et al. 2017, sec. 3.3, with a transformer in place of the
PixelCNN) or MaskGIT's bidirectional transformer with parallel decoding (Chang et al. 2022).

Stage 1, family `vq`: the KL autoencoder's encoder (its mean half) maps x to z_e (B, D, h, w), a quantizer of
`genlab.nn.quantizers` maps each vector to one of K codes (VQ with an EMA codebook, k-means init and dead-code
restarts; or FSQ's fixed grid), the decoder maps the codes back; loss = ||x - D(z_q)||^2 + beta ||z_e - sg(e)||^2
(van den Oord et al. 2017, eq. 3, its codebook term replaced by the EMA update of app. A.1). Validation measures the
codebook usage over the whole held-out split. Its own `sample` decodes codes drawn uniformly (no prior yet).

Stage 2, family `vq_prior`: `model.tokenizer` names the trained `vq` model folder (or run); `build` loads it (its
weights become part of the prior's, so the folder is self-contained), `prepare_data` encodes the dataset to code
grids once, and the prior models the h x w codes in raster order with an optional class token. `sample` draws codes
and decodes them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.config import MAX_CONTEXT, MAX_DEPTH, MAX_SAMPLING_STEPS, MAX_WIDTH, check_int, check_number, from_dict
from genlab.data.images import save_grid
from genlab.errors import GenlabError
from genlab.models.autoencoder import AutoencoderConfig, Decoder, Encoder, psnr
from genlab.models.autoencoder import _check as check_blocks
from genlab.models.base import (
    Conditioning,
    GenerativeModel,
    ModelConfig,
    Output,
    SampleOption,
    class_labels,
    load_model_folder,
    with_image_shape,
)
from genlab.models.pixel_ar import TokenAR, categorical, uniforms
from genlab.nn.quantizers import FSQ, VectorQuantizerEMA, codebook_usage
from genlab.nn.transformer import Block, RMSNorm, rope_tables
from genlab.registry import MODELS
from genlab.sampling.noise import Generators

MAX_SAMPLES = 10_000
MAX_CODES = 65_536
MAX_CLASSES = 100_000
QUANTIZERS = ("vq", "fsq")
ARCHS = ("gpt", "maskgit")


# -- stage 1: the tokenizer ---------------------------------------------------------------------------------------
@dataclass
class VQConfig(ModelConfig):
    """Image shape, encoder/decoder widths (the KL autoencoder's blocks) and the quantizer."""

    image_size: int = 0  # 0: take from the data
    channels: int = 0  # 0: take from the data
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2)  # one level per entry; each level after the first halves the side
    patchify: int = 2
    num_res_blocks: int = 1
    attention: bool = False
    norm_groups: int = 8
    quantizer: str = "vq"  # vq (EMA codebook) | fsq
    codebook_size: int = 256  # vq: K codes
    code_dim: int = 16  # vq: dimension of each code
    ema_decay: float = 0.99  # vq: gamma of the codebook's EMA (van den Oord et al. 2017, app. A.1)
    commitment: float = 0.25  # vq: beta of the commitment loss (eq. 3)
    kmeans_init: bool = True  # vq: codebook from k-means on the first training batch
    dead_threshold: float = 1.0  # vq: restart a code whose EMA count (vectors per batch) falls below this
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)  # fsq: levels per channel (1000 codes; Mentzer et al. 2023, table 1)


def _tokenizer_check(cfg: VQConfig) -> None:
    if cfg.quantizer not in QUANTIZERS:
        raise GenlabError(f"model.quantizer={cfg.quantizer!r} is unknown; choose one of: {', '.join(QUANTIZERS)}")
    check_int("model.codebook_size", cfg.codebook_size, 2, MAX_CODES, "the codebook and its distances grow with it")
    check_int("model.code_dim", cfg.code_dim, 1, MAX_WIDTH)
    check_number("model.ema_decay", cfg.ema_decay, 0, 1, high_open=True)
    check_number("model.commitment", cfg.commitment, 0, 100)
    check_number("model.dead_threshold", cfg.dead_threshold, 0, 1e9)
    if not cfg.fsq_levels or len(cfg.fsq_levels) > 16:
        raise GenlabError("model.fsq_levels must list 1 to 16 levels, e.g. [8, 5, 5, 5]")
    for v in cfg.fsq_levels:
        check_int("model.fsq_levels", v, 2, 256)
    if math.prod(cfg.fsq_levels) > MAX_CODES:
        raise GenlabError(f"model.fsq_levels {list(cfg.fsq_levels)} make {math.prod(cfg.fsq_levels):,} codes; at most "
                          f"{MAX_CODES:,}")
    check_blocks(_blocks_config(cfg))  # after the code size, which sets the latent's channels


def _code_dim(cfg: VQConfig) -> int:
    return cfg.code_dim if cfg.quantizer == "vq" else len(cfg.fsq_levels)


def _blocks_config(cfg: VQConfig) -> AutoencoderConfig:
    return AutoencoderConfig(image_size=cfg.image_size, channels=max(cfg.channels, 1), base_channels=cfg.base_channels,
                             channel_mults=cfg.channel_mults, patchify=cfg.patchify, num_res_blocks=cfg.num_res_blocks,
                             attention=cfg.attention, norm_groups=cfg.norm_groups, z_channels=_code_dim(cfg))


@MODELS.register("vq")
class VQTokenizer(GenerativeModel):
    """x -> z_e -> nearest code -> D(z_q); loss = ||x - D(z_q)||^2 + beta ||z_e - sg(e)||^2 per element
    (van den Oord et al. 2017, eq. 3; FSQ: the reconstruction alone, Mentzer et al. 2023, sec. 3)."""

    family = "vq"
    config_class = VQConfig
    output = Output.IMAGE
    per_item_seeds = True

    def __init__(self, config: VQConfig) -> None:
        super().__init__(config)
        if config.image_size <= 0 or config.channels <= 0:
            raise GenlabError("model.image_size and model.channels must be set (or build the model from a dataset)")
        _tokenizer_check(config)
        blocks = _blocks_config(config)
        self.encoder = Encoder(blocks)
        self.decoder = Decoder(blocks)
        if config.quantizer == "vq":
            self.quantizer: VectorQuantizerEMA | FSQ = VectorQuantizerEMA(
                config.codebook_size, config.code_dim, config.ema_decay, config.commitment,
                kmeans_init=config.kmeans_init, dead_threshold=config.dead_threshold)
        else:
            self.quantizer = FSQ(config.fsq_levels)

    @classmethod
    def build(cls, config: VQConfig, dataset: Any) -> VQTokenizer:
        return cls(with_image_shape(config, dataset, cls.family))

    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.channels, self.config.image_size, self.config.image_size

    @property
    def code_shape(self) -> tuple[int, int]:
        """(h, w) of the code grid of one image."""
        s = self.config.image_size // (self.config.patchify * 2 ** (len(self.config.channel_mults) - 1))
        return s, s

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(straight-through z_q, code indices (B, h, w), the quantizer's losses) of images in [-1, 1]."""
        return self.quantizer(self.encoder(x)[0])

    @torch.no_grad()
    def encode_indices(self, x: Tensor) -> Tensor:
        """Code indices (B, h, w) of images (no codebook update)."""
        return self.quantizer.indices(self.encoder(x)[0]) if isinstance(self.quantizer, VectorQuantizerEMA) \
            else self.quantizer(self.encoder(x)[0])[1]

    def decode_indices(self, idx: Tensor) -> Tensor:
        """Images in [-1, 1] from code indices (B, h, w)."""
        return self.decoder(self.quantizer.lookup(idx)).clamp(-1.0, 1.0)

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Mean squared error of the reconstruction plus the commitment term (vq), and the share of codes this
        batch used."""
        x = batch["x"]
        z_q, idx, extra = self.quantize(x)
        rec = F.mse_loss(self.decoder(z_q), x)
        loss = rec + sum(extra.values(), torch.zeros((), device=x.device))
        used = torch.bincount(idx.flatten(), minlength=self.num_codes).gt(0).float().mean()
        return {"loss": loss, "rec": rec.detach(), **{k: v.detach() for k, v in extra.items()}, "batch_usage": used}

    @torch.no_grad()
    def code_counts(self, data: Any, batch_size: int = 256) -> tuple[Tensor, float, float]:
        """How often each code is chosen over every item of `data` (one epoch), with the mean squared error and the
        PSNR (dB) of the reconstructions."""
        device = next(self.parameters()).device
        counts = torch.zeros(self.num_codes, dtype=torch.long)
        mse_sum, psnr_sum = 0.0, 0.0
        for start in range(0, len(data), batch_size):
            x = data.get_batch(torch.arange(start, min(start + batch_size, len(data))))["x"].to(device)
            idx = self.encode_indices(x)
            counts += torch.bincount(idx.flatten().cpu(), minlength=self.num_codes)
            mse = ((self.decode_indices(idx) - x) / 2).pow(2).flatten(1).mean(1)
            mse_sum += float(mse.sum())
            psnr_sum += float(psnr(mse).sum())
        return counts, mse_sum / len(data), psnr_sum / len(data)

    @torch.no_grad()
    def validation_metrics(self, val_data: Any) -> dict[str, float]:
        """Over the whole held-out split (an epoch): the share of codes used at least once, the code perplexity,
        and the reconstruction MSE (images in [0, 1]) and PSNR."""
        counts, mse, p = self.code_counts(val_data)
        return {**codebook_usage(counts), "rec_mse": mse, "psnr": p}

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Generators = None, **opts: Any) -> Tensor:
        """Codes drawn uniformly and decoded: the tokenizer alone has no prior (train a vq_prior on it for one)."""
        if opts:
            raise GenlabError(f"the vq family takes no sampling options, got {', '.join(opts)}")
        if not 1 <= n <= MAX_SAMPLES:
            raise GenlabError(f"n={n} is out of range; use 1..{MAX_SAMPLES}")
        super().labels_for(n, cond)
        device = next(self.parameters()).device
        u = uniforms((n, *self.code_shape), generator, device)
        return self.decode_indices((u * self.num_codes).long().clamp(max=self.num_codes - 1))

    def prepare_data(self, dataset: Any) -> Any:
        """The images; the first 8 of the latest dataset prepared are kept for the reconstruction preview."""
        self.preview_x = dataset.get_batch(torch.arange(min(8, len(dataset))))["x"]
        return dataset

    @torch.no_grad()
    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """Held-out images above their reconstructions through the codes."""
        x = getattr(self, "preview_x", None)
        if x is None:
            return []
        x = x.to(next(self.parameters()).device)
        pairs = torch.cat([x, self.decode_indices(self.encode_indices(x))])
        return [save_grid(pairs, Path(stem).with_name(Path(stem).name + "_recon.png"), nrow=x.shape[0],
                          params={"top": "input", "bottom": "reconstruction"})]


# -- stage 2: priors over the codes -------------------------------------------------------------------------------
class MaskGITTransformer(nn.Module):
    """A bidirectional transformer over L codes (genlab's blocks with full attention), a [MASK] token (`vocab`) and a
    leading class token (`vocab + 1 + y`, or `vocab + 1 + num_classes` unconditionally): logits of every code."""

    def __init__(self, vocab: int, length: int, num_classes: int, n_layer: int, n_head: int, n_embd: int,
                 ffn_hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.vocab, self.length, self.num_classes, self.mask_id = vocab, length, num_classes, vocab
        hidden = ffn_hidden or 64 * math.ceil(8 * n_embd / 3 / 64)
        self.tok_emb = nn.Embedding(vocab + 2 + num_classes, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, n_head, hidden, 1e-5, dropout) for _ in range(n_layer))
        self.norm = RMSNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        cos, sin = rope_tables(n_embd // n_head, length + 1)
        self.register_buffer("rope_cos", cos[:, None, :], persistent=False)
        self.register_buffer("rope_sin", sin[:, None, :], persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: Tensor, y: Tensor | None) -> Tensor:
        B, L = tokens.shape
        null = torch.full((B,), self.num_classes, device=tokens.device)
        if y is not None:  # an unlabelled item (-1) takes the unconditional token
            y = y.to(tokens.device).long().reshape(-1).expand(B)
            null = torch.where(y >= 0, y, null)
        first = self.vocab + 1 + null
        x = self.tok_emb(torch.cat([first[:, None], tokens], dim=1))
        full = torch.ones(1, 1, L + 1, L + 1, dtype=torch.bool, device=tokens.device)  # every code sees every code
        for i, block in enumerate(self.blocks):
            x = block(x, self.rope_cos, self.rope_sin, full, None, i)
        return self.head(self.norm(x[:, 1:]))


def mask_ratio(r: Tensor) -> Tensor:
    """MaskGIT's cosine schedule gamma(r) = cos(pi r / 2): the share of codes masked at r in [0, 1] (Chang et al.
    2022, sec. 3.2)."""
    return torch.cos(math.pi / 2 * r)


@dataclass
class VQPriorConfig(ModelConfig):
    """Which tokenizer, which prior, and the transformer's sizes."""

    tokenizer: str | None = None  # a trained vq model (or run) folder, read by build
    tokenizer_config: dict[str, Any] = field(default_factory=dict)  # filled by build: the tokenizer's config
    arch: str = "gpt"  # gpt (raster order, KV cache) | maskgit (parallel decoding)
    class_cond: bool = False
    num_classes: int = 0  # 0: take from the data (when class_cond)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    ffn_hidden: int = 0
    dropout: float = 0.0
    maskgit_steps: int = 8  # maskgit: default decoding steps (T in Chang et al. 2022)
    choice_temperature: float = 4.5  # maskgit: scale of the Gumbel noise on confidences, annealed to 0
    preview_temperature: float = 1.0


def _prior_check(cfg: VQPriorConfig) -> None:
    if cfg.arch not in ARCHS:
        raise GenlabError(f"model.arch={cfg.arch!r} is unknown; choose one of: {', '.join(ARCHS)}")
    if not cfg.tokenizer_config:
        raise GenlabError("model.tokenizer must name a trained vq model folder (genlab train configs/mnist-vq.yaml)")
    check_int("model.num_classes", cfg.num_classes, 0, MAX_CLASSES)
    check_int("model.n_layer", cfg.n_layer, 1, MAX_DEPTH)
    check_int("model.n_embd", cfg.n_embd, 2, MAX_WIDTH)
    check_int("model.n_head", cfg.n_head, 1, cfg.n_embd)
    check_int("model.ffn_hidden", cfg.ffn_hidden, 0, 4 * MAX_WIDTH)
    if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 2:
        raise GenlabError(f"model.n_embd={cfg.n_embd} / model.n_head={cfg.n_head} must be a whole, even head size")
    check_int("model.maskgit_steps", cfg.maskgit_steps, 1, MAX_SAMPLING_STEPS)
    check_number("model.choice_temperature", cfg.choice_temperature, 0, 100)
    check_number("model.dropout", cfg.dropout, 0, 1, high_open=True)
    check_number("model.preview_temperature", cfg.preview_temperature, 0, 10, hint="1 = the model's own density")
    if cfg.class_cond and cfg.num_classes < 1:
        raise GenlabError("model.class_cond needs model.num_classes >= 1 (or a dataset with labels)")


class CodeDataset:
    """A dataset's images replaced by their code grids, flattened in raster order (N, h w), labels kept."""

    def __init__(self, codes: Tensor, labels: Tensor, info: Any) -> None:
        self.codes, self.labels, self.info = codes, labels, info

    def __len__(self) -> int:
        return self.codes.shape[0]

    def get_batch(self, idx: Tensor | list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return {"codes": self.codes[idx], "label": self.labels[idx]}


@MODELS.register("vq_prior")
class VQPrior(GenerativeModel):
    """A prior over a frozen tokenizer's codes. gpt: -log p(c) = -sum_i log p(c_i | c_<i, y) (van den Oord et al.
    2017, sec. 3.3); maskgit: -E[sum_{i masked} log p(c_i | c_unmasked, y)] with a cos-scheduled share of codes
    masked (Chang et al. 2022, eq. 1). Losses in nats per code."""

    family = "vq_prior"
    config_class = VQPriorConfig
    output = Output.IMAGE
    conditioning = frozenset({Conditioning.NONE, Conditioning.CLASS_LABEL})
    sample_options = frozenset({SampleOption.TEMPERATURE, SampleOption.STEPS})
    per_item_seeds = True

    def __init__(self, config: VQPriorConfig) -> None:
        super().__init__(config)
        _prior_check(config)
        tok_cfg = from_dict(VQConfig, config.tokenizer_config, prefix="model.tokenizer_config.")
        self.tokenizer = VQTokenizer(tok_cfg).requires_grad_(False).eval()
        self.num_classes = config.num_classes if config.class_cond else 0
        h, w = self.tokenizer.code_shape
        self.length = h * w
        check_int("the code grid", self.length, 1, MAX_CONTEXT)
        args = (self.tokenizer.num_codes, self.length, self.num_classes, config.n_layer, config.n_head,
                config.n_embd, config.ffn_hidden, config.dropout)
        if config.arch == "gpt":
            self.net: TokenAR | MaskGITTransformer = TokenAR(*args)
            self.sample_options = frozenset({SampleOption.TEMPERATURE})  # one code per step: no steps to choose
        else:
            self.net = MaskGITTransformer(*args)

    @classmethod
    def build(cls, config: VQPriorConfig, dataset: Any) -> VQPrior:
        """Load the tokenizer folder named by `model.tokenizer` into this model (frozen) and fill num_classes."""
        tok = load_model_folder("model.tokenizer", config.tokenizer,
                                "the folder of a trained vq model (genlab train configs/mnist-vq.yaml)",
                                lambda m: isinstance(m, VQTokenizer), needed_by=f"family {cls.family}")
        info = dataset.info
        if (tok.config.channels, tok.config.image_size) != (info.channels, info.image_size):
            raise GenlabError(f"the tokenizer was trained on {tok.config.channels}-channel {tok.config.image_size}px "
                              f"images but the data has {info.channels}-channel {info.image_size}px ones")
        num_classes = config.num_classes or (info.num_classes if config.class_cond else 0)
        model = cls(dataclasses.replace(config, tokenizer_config=dataclasses.asdict(tok.config),
                                        num_classes=num_classes))
        model.tokenizer.load_state_dict(tok.state_dict())
        return model

    def train(self, mode: bool = True) -> VQPrior:
        super().train(mode)
        self.tokenizer.eval()  # frozen: its codebook never updates
        return self

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.tokenizer.image_shape

    def labels_for(self, n: int, label: Any = None) -> Tensor | None:
        return class_labels(n, label, self.num_classes) if self.num_classes else super().labels_for(n, label)

    @torch.no_grad()
    def prepare_data(self, dataset: Any, batch_size: int = 256) -> CodeDataset:
        """Every image of `dataset` encoded once to its codes."""
        device = next(self.tokenizer.parameters()).device
        codes, labels = [], []
        for start in range(0, len(dataset), batch_size):
            batch = dataset.get_batch(torch.arange(start, min(start + batch_size, len(dataset))))
            codes.append(self.tokenizer.encode_indices(batch["x"].to(device)).flatten(1).cpu())
            labels.append(batch["label"])
        return CodeDataset(torch.cat(codes), torch.cat(labels), dataset.info)

    def _labels(self, y: Any, n: int, device: torch.device) -> Tensor | None:
        if not self.num_classes:
            return None
        return torch.as_tensor(y, dtype=torch.long, device=device).reshape(-1).expand(n)

    def masked_loss(self, codes: Tensor, y: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
        """MaskGIT's loss (Chang et al. 2022, eq. 1): mask ceil(gamma(r) L) random codes per sequence, r ~ U(0, 1),
        and take the mean cross-entropy of the masked ones."""
        B, L = codes.shape
        r = torch.rand(B, generator=generator, device=codes.device)
        n_mask = torch.ceil(mask_ratio(r) * L).clamp(min=1)
        order = torch.rand(B, L, generator=generator, device=codes.device).argsort(1).argsort(1)  # random ranks
        masked = order < n_mask[:, None]
        logits = self.net(codes.masked_fill(masked, self.net.mask_id), y)
        return F.cross_entropy(logits[masked].float(), codes[masked])

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        codes = batch["codes"]
        y = self._labels(batch.get("label"), codes.shape[0], codes.device)
        if isinstance(self.net, TokenAR):
            logits = self.net.logits(codes, y)
            return {"loss": F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())}
        return {"loss": self.masked_loss(codes, y)}

    @torch.no_grad()
    def validation_metrics(self, val_data: Any, batch_size: int = 256) -> dict[str, float]:
        """The loss on the held-out codes (gpt: exact nats per code; maskgit: masked cross-entropy at fixed-seed
        masks) and the sampling cost: network evaluations and milliseconds per image (4 drawn at once)."""
        device = next(self.parameters()).device
        gen = torch.Generator(device).manual_seed(0)
        total, n = 0.0, len(val_data)
        for start in range(0, n, batch_size):
            batch = val_data.get_batch(torch.arange(start, min(start + batch_size, n)))
            codes = batch["codes"].to(device)
            y = self._labels(batch["label"].to(device), codes.shape[0], device)
            if isinstance(self.net, TokenAR):
                total -= float(self.net.log_prob(codes, y).sum()) / self.length
            else:
                total += float(self.masked_loss(codes, y, gen)) * codes.shape[0]
        t0 = time.perf_counter()
        self.sample(4, self.labels_for(4), torch.Generator(device).manual_seed(0))
        ms = 1000 * (time.perf_counter() - t0) / 4
        evals = self.length if isinstance(self.net, TokenAR) else self.config.maskgit_steps
        return {"val_loss": total / n, "evals_per_image": float(evals), "sample_ms_per_image": ms}

    @torch.no_grad()
    def sample_codes(self, n: int, y: Tensor | None, generator: Generators, temperature: float, steps: int
                     ) -> Tensor:
        """(n, L) codes: gpt draws them in raster order through the KV cache; maskgit starts from all [MASK] and at
        step t keeps the most confident of its draws, re-masking the floor(gamma((t + 1) / T) L) least confident
        (confidence = log-probability + annealed Gumbel noise; Chang et al. 2022, sec. 3.2)."""
        device = next(self.parameters()).device
        L = self.length
        if isinstance(self.net, TokenAR):
            return self.net.sample(n, y, uniforms((n, L), generator, device), temperature)
        u = uniforms((n, 2 * steps * L), generator, device).view(n, 2, steps, L).clamp(1e-12, 1 - 1e-7)
        codes = torch.full((n, L), self.net.mask_id, dtype=torch.long, device=device)
        for t in range(steps):
            masked = codes == self.net.mask_id
            logits = self.net(codes, y).float()
            draw = categorical(logits.reshape(n * L, -1), u[:, 0, t].reshape(-1), temperature).view(n, L)
            draw = torch.where(masked, draw, codes)
            logp = logits.log_softmax(-1).gather(-1, draw[..., None])[..., 0]
            gumbel = -torch.log(-torch.log(u[:, 1, t]))
            confidence = torch.where(masked, logp + self.config.choice_temperature * (1 - (t + 1) / steps) * gumbel,
                                     torch.full_like(logp, math.inf))
            keep_masked = torch.floor(mask_ratio(torch.tensor((t + 1) / steps)) * L).long()
            keep_masked = torch.minimum(keep_masked.to(device), masked.sum(1) - 1).clamp(min=0)  # unmask >= 1
            ranks = confidence.argsort(1).argsort(1)
            codes = torch.where(ranks < keep_masked[:, None], self.net.mask_id, draw)
        return codes

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Generators = None, temperature: float = 1.0,
               steps: int | None = None) -> Tensor:
        """Codes from the prior (temperature T scales its logits; maskgit: `steps` parallel decoding steps, default
        `maskgit_steps`), decoded by the tokenizer."""
        if not 1 <= n <= MAX_SAMPLES:
            raise GenlabError(f"n={n} is out of range; use 1..{MAX_SAMPLES}")
        check_number("temperature", temperature, 0, 10, hint="1 = the model's own distribution")
        if steps is not None and isinstance(self.net, TokenAR):
            raise GenlabError("the gpt prior draws one code per step; steps apply to arch maskgit")
        steps = check_int("steps", steps or self.config.maskgit_steps, 1, MAX_SAMPLING_STEPS)
        if cond is not None and not self.num_classes:
            raise GenlabError("this vq_prior is unconditional; leave out the label")
        device = next(self.parameters()).device
        y = self._labels(self.labels_for(n, cond), n, device) if self.num_classes else None
        codes = self.sample_codes(n, y, generator, temperature, steps)
        return self.tokenizer.decode_indices(codes.view(n, *self.tokenizer.code_shape))

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """A PNG grid of samples at `preview_temperature`, one row per class when class-conditional."""
        n = min(sample_cfg.n, 64)
        labels = self.labels_for(n)
        nrow = int((labels == 0).sum()) if labels is not None else None
        t = self.config.preview_temperature
        x = self.sample(n, labels, generator=generator, temperature=t)
        return [save_grid(x, Path(stem).with_suffix(".png"), nrow=nrow,
                          params={"n": n, "seed": sample_cfg.seed, "temperature": t, "arch": self.config.arch})]
