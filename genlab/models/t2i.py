"""Text-to-image diffusion (Rombach et al. 2022, sec. 3.3; Saharia et al. 2022): the diffusion family's backbones
with cross-attention to the token embeddings of a text encoder, the prompt dropped to the empty prompt about
`cond_drop` of the time so that classifier-free guidance (Ho & Salimans 2022, eq. 6) has a null condition, and a
negative prompt that takes the unconditional branch's place (A1111's meaning).

The condition is a `TextCondition` (token embeddings and their mask); samplers and guidance only batch it. The text
encoder is either trained jointly (a small transformer over a byte-level BPE trained on the captions) or a frozen
CLIP text tower (`model.text_encoder`: a CLIP model folder), whose weights this model's folder then holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.config import MAX_DEPTH, MAX_WIDTH, check_int, from_dict, to_dict
from genlab.data.images import save_grid
from genlab.data.tokenizer import TOKENIZER_NAME, Tokenizer, train_tokenizer
from genlab.errors import GenlabError
from genlab.models.base import Conditioning, load_model_folder, with_image_shape
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.registry import MODELS
from genlab.sampling.controls import Guidance
from genlab.sampling.denoiser import Denoiser, classifier_free_guidance

MAX_TOKENS = 256  # the longest prompt (in tokens, with BOS and EOS) a model may be built for
PREVIEW_PROMPTS = 8


@dataclass
class TextCondition:
    """A batch of encoded prompts: token embeddings `tokens` (B, L, D) and `mask` (B, L), True on real tokens.
    What the text-to-image family passes through the denoiser as `cond`; guidance batches it with `cat`."""

    tokens: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: Any) -> TextCondition:
        return TextCondition(self.tokens[index], self.mask[index])

    def cat(self, other: TextCondition) -> TextCondition:
        """Both batches in one, the shorter padded with masked-out zeros to the longer's length."""
        L = max(self.tokens.shape[1], other.tokens.shape[1])
        parts = [c._padded(L) for c in (self, other)]
        return TextCondition(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]))

    def _padded(self, L: int) -> TextCondition:
        pad = L - self.tokens.shape[1]
        if pad == 0:
            return self
        return TextCondition(F.pad(self.tokens, (0, 0, 0, pad)), F.pad(self.mask, (0, pad), value=False))


class TextTransformer(nn.Module):
    """A small bidirectional transformer text encoder (token + learned position embeddings, pre-norm layers,
    final LayerNorm; Vaswani et al. 2017), trained jointly with the denoiser, as Imagen's ablations train
    small encoders (Saharia et al. 2022, sec. 4.4 compares frozen and trained ones)."""

    def __init__(self, vocab_size: int, max_tokens: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_tokens, width))
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]
        return self.norm(self.layers(h, src_key_padding_mask=~mask))


@dataclass
class TextDiffusionConfig(DiffusionConfig):
    """A diffusion model conditioned on prompts: the diffusion keys, plus the text encoder (a jointly trained
    transformer of `text_width` x `text_depth`, or a frozen CLIP text tower from `text_encoder`) and the longest
    prompt in tokens."""

    class_cond: bool = False  # text replaces labels
    cond_drop: float = 0.1  # rate at which training prompts become the empty prompt (for guidance)
    max_tokens: int = 0  # 0: the longest training caption + BOS + EOS (build)
    vocab: int = 512  # BPE size trained on the captions (jointly trained encoder)
    vocab_size: int = 0  # filled from the tokenizer by build
    text_width: int = 128
    text_depth: int = 2
    text_heads: int = 4
    text_encoder: str | None = None  # a CLIP model (or run) folder whose frozen text tower encodes prompts
    text_encoder_config: dict[str, Any] = field(default_factory=dict)  # filled by build; its weights are ours
    preview_prompts: list[str] = field(default_factory=list)  # filled by build from the training captions


def _check_text(cfg: TextDiffusionConfig) -> None:
    if cfg.class_cond or cfg.num_classes:
        raise GenlabError("a text_diffusion model is conditioned on prompts: leave model.class_cond false")
    check_int("model.max_tokens", cfg.max_tokens, 3, MAX_TOKENS, "attention cost grows with it")
    if not cfg.text_encoder_config:
        check_int("model.vocab_size", cfg.vocab_size, 1, 1 << 20)
        check_int("model.text_width", cfg.text_width, 1, MAX_WIDTH)
        check_int("model.text_depth", cfg.text_depth, 1, MAX_DEPTH)
        if cfg.text_heads < 1 or cfg.text_width % cfg.text_heads:
            raise GenlabError(f"model.text_width={cfg.text_width} must be a multiple of model.text_heads="
                              f"{cfg.text_heads}")


def _captions(dataset: Any) -> list[str]:
    captions = getattr(dataset, "captions", None)
    if not captions:
        raise GenlabError(f"the text_diffusion family needs captions; dataset {dataset.info.name!r} has none "
                          "(use a captioned dataset such as shapes, or an image folder with metadata.jsonl)")
    return [str(c) for c in captions]


@MODELS.register("text_diffusion")
class TextDiffusionModel(DiffusionModel):
    """DDPM on eps_theta(x_t, t, c) with c = E(prompt), cross-attended (Rombach et al. 2022, eq. 3), trained with
    the prompt dropped to "" at `cond_drop`; sampled with guidance D_neg + w (D_c - D_neg), where D_neg is the
    empty prompt's (or the negative prompt's) denoiser (Ho & Salimans 2022, eq. 6)."""

    family = "text_diffusion"
    config_class = TextDiffusionConfig
    conditioning = frozenset({Conditioning.NONE, Conditioning.TEXT})

    def __init__(self, config: TextDiffusionConfig, tokenizer: Tokenizer | None = None,
                 text_encoder: nn.Module | None = None) -> None:
        if config.max_tokens <= 0:
            raise GenlabError("model.max_tokens is unset: build the model from captioned data")
        _check_text(config)
        if text_encoder is None:
            if config.text_encoder_config:
                text_encoder = _clip_text_tower(config.text_encoder_config)
            else:
                text_encoder = TextTransformer(config.vocab_size, config.max_tokens, config.text_width,
                                               config.text_depth, config.text_heads)
        self._context_dim = int(text_encoder.width)
        super().__init__(config)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.frozen_text = bool(config.text_encoder_config)
        if self.frozen_text:
            self.text_encoder.requires_grad_(False).eval()

    def backbone_kwargs(self) -> dict[str, Any]:
        return {"context_dim": self._context_dim}

    # -- building and the model folder ------------------------------------------------------
    @classmethod
    def build(cls, config: TextDiffusionConfig, dataset: Any) -> TextDiffusionModel:
        """Train the BPE on the captions (or read the CLIP folder's tokenizer and text tower), size max_tokens to the
        longest caption, take preview prompts from the captions, then build as the diffusion family does; with
        `init_from`, the trained model of that folder (fine-tuning, LoRA)."""
        if config.init_from:
            return cls.continued(config, dataset)
        captions = _captions(dataset)
        config = dataclasses.replace(config, class_cond=False, num_classes=0)
        text_encoder = None
        if config.text_encoder:
            tok, text_encoder, enc_config = _load_clip_text(config.text_encoder)
            config = dataclasses.replace(config, text_encoder_config=enc_config)
        else:
            tok = train_tokenizer("\n".join(captions), "bpe", config.vocab, "model.vocab")
            config = dataclasses.replace(config, vocab_size=tok.vocab_size)
        longest = max(len(ids) for ids in tok.encode_batch(captions)) + 2
        if text_encoder is not None and longest > text_encoder.context_length:
            raise GenlabError(f"the longest caption has {longest} tokens but the CLIP text tower reads at most "
                              f"{text_encoder.context_length}; shorten the captions or train CLIP with a longer "
                              "model.context_length")
        if config.max_tokens and config.max_tokens < longest:
            raise GenlabError(f"model.max_tokens={config.max_tokens} but the longest caption has {longest} tokens "
                              f"(with BOS and EOS); raise it to {longest} or drop the key")
        config = dataclasses.replace(config, max_tokens=config.max_tokens or longest,
                                     preview_prompts=config.preview_prompts
                                     or list(dict.fromkeys(captions))[:PREVIEW_PROMPTS])
        config = with_image_shape(config, dataset, cls.family)
        if config.autoencoder:
            return cls._with_autoencoder(config, dataset, tokenizer=tok, text_encoder=text_encoder)
        return cls(config, tokenizer=tok, text_encoder=text_encoder)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """config.json + model.safetensors + tokenizer.json."""
        d = super().save_pretrained(directory, state_dict)
        self._require_tokenizer().save(d / TOKENIZER_NAME)
        return d

    @classmethod
    def from_folder_config(cls, config: Any, directory: Path) -> TextDiffusionModel:
        """The model with the folder's tokenizer.json."""
        return cls(config, tokenizer=Tokenizer.from_file(directory / TOKENIZER_NAME))

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise GenlabError("this model has no tokenizer: build it from data or load it from a model folder")
        return self.tokenizer

    # -- the condition -----------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(ids, mask), each (B, L): BOS + tokens + EOS, PAD to the longest; a prompt over `max_tokens` is refused."""
        tok = self._require_tokenizer()
        rows = [[tok.bos_id, *ids, tok.eos_id] for ids in tok.encode_batch(list(prompts))]
        longest = max(len(r) for r in rows)
        if longest > self.config.max_tokens:
            i = max(range(len(rows)), key=lambda j: len(rows[j]))
            raise GenlabError(f"prompt {prompts[i][:40]!r}... has {longest} tokens (with BOS and EOS); this model "
                              f"reads at most {self.config.max_tokens}: shorten it")
        ids = torch.full((len(rows), longest), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return ids, mask

    def encode_prompts(self, prompts: list[str]) -> TextCondition:
        """The `TextCondition` of `prompts`: the text encoder's per-token embeddings and the padding mask."""
        ids, mask = self.tokenize(prompts)
        device = self.alpha_bar.device
        ids, mask = ids.to(device), mask.to(device)
        return TextCondition(self.text_encoder(ids, mask), mask)

    def labels_for(self, n: int, cond: Any = None) -> list[str] | None:
        """Prompts for `n` samples from None (the previews' prompts, cycled), one prompt for all, or one per sample;
        each is checked against `max_tokens`."""
        if cond is None:
            return None
        prompts = [cond] if isinstance(cond, str) else list(cond)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise GenlabError("give a prompt (a string) or one prompt per sample")
        if len(prompts) == 1:
            prompts = prompts * n
        if len(prompts) != n:
            raise GenlabError(f"{len(prompts)} prompts for {n} samples; give one prompt or one per sample")
        self.tokenize(list(dict.fromkeys(prompts)))  # refuses an overlong prompt before any sampling
        return prompts

    def _condition(self, n: int, cond: Any) -> TextCondition:
        if isinstance(cond, TextCondition):
            return cond
        prompts = self.labels_for(n, cond) or [""] * n
        return self.encode_prompts(prompts)

    def training_labels(self, batch: dict[str, Any], device: torch.device) -> TextCondition:
        """The batch's captions encoded, each replaced by the empty prompt with probability `cond_drop` in training
        (so that the empty prompt's embedding is the null condition of guidance)."""
        if "text" not in batch:
            raise GenlabError("the text_diffusion family needs captions in every batch (a captioned dataset)")
        return self.encode_prompts(drop_prompts(batch["text"], self.config.cond_drop if self.training else 0.0))

    def backbone(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        """The backbone on text tokens: cross-attention context and its padding mask from the `TextCondition`."""
        c = self._condition(x.shape[0], cond)
        return self.net(x, t, context=c.tokens, context_mask=c.mask)

    # -- sampling ----------------------------------------------------------------------------
    def guided_denoiser(self, guidance: Guidance | None = None, labels: Any = None) -> Denoiser:
        """Guidance against the empty prompt, or against the negative prompt(s) in its place; the rest (rescale,
        clamping) as the diffusion family does."""
        denoiser: Denoiser = self.denoise
        if labels is not None and guidance is not None and guidance.scale != 1.0:
            n = len(labels)
            negative = "" if guidance.negative is None else guidance.negative
            null = self._condition(n, negative)
            denoiser = classifier_free_guidance(denoiser, guidance.scale, null, guidance.rescale)
        if not self.config.clip_denoised or self.autoencoder is not None:
            return denoiser
        inner = denoiser
        return lambda x, sigma, cond: inner(x, sigma, cond).clamp(-1.0, 1.0)

    def sampling_condition(self, n: int, cond: Any, device: torch.device) -> TextCondition:
        """Prompts (one, or one per image; None: the empty prompt) or a `TextCondition`, encoded on `device`."""
        return self._condition(n, cond)

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """A PNG grid, one row per preview prompt (the prompts in the PNG's parameters)."""
        prompts = self.config.preview_prompts or [""]
        nrow = max(1, sample_cfg.n // len(prompts))
        batch = [p for p in prompts for _ in range(nrow)]
        x = self.sample(len(batch), batch, generator=generator, sampler=sample_cfg.sampler, steps=sample_cfg.steps,
                        guidance=Guidance(sample_cfg.cfg), eta=sample_cfg.eta)
        params = {"sampler": sample_cfg.sampler, "steps": sample_cfg.steps, "cfg": sample_cfg.cfg,
                  "eta": sample_cfg.eta, "n": len(batch), "seed": sample_cfg.seed, "prompts": prompts}
        return [save_grid(x, Path(stem).with_suffix(".png"), nrow=nrow, params=params)]


def drop_prompts(prompts: list[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Each prompt replaced by the empty prompt with probability `p` (condition dropout for classifier-free
    guidance, Ho & Salimans 2022, alg. 1)."""
    if p <= 0:
        return list(prompts)
    drop = torch.rand(len(prompts), generator=generator) < p
    return ["" if d else s for s, d in zip(prompts, drop.tolist())]


class CLIPTextEncoder(nn.Module):
    """The text tower of a trained CLIP (Radford et al. 2021), frozen: per-token states of BOS + prompt + EOS, as
    Stable Diffusion reads CLIP's (Rombach et al. 2022, sec. 4.3.2). Causal, so padding never reaches a real
    token's state."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from genlab.models.clip import CLIP, CLIPConfig

        clip_config = from_dict(CLIPConfig, config, prefix="model.text_encoder_config.")
        self.width = clip_config.text_width
        self.context_length = clip_config.context_length
        self.text = CLIP(clip_config).text  # the image tower is not kept

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.text(ids)


def _load_clip_text(path: str) -> tuple[Tokenizer, CLIPTextEncoder, dict[str, Any]]:
    """The tokenizer, the frozen text tower (with its trained weights) and the config of a CLIP model folder."""
    from genlab.models.clip import CLIP

    clip = load_model_folder("model.text_encoder", path, "a CLIP model folder", lambda m: isinstance(m, CLIP))
    enc_config = to_dict(clip.config)
    encoder = CLIPTextEncoder(enc_config)
    encoder.text.load_state_dict(clip.text.state_dict())
    return clip._require_tokenizer(), encoder, enc_config


def _clip_text_tower(config: dict[str, Any]) -> CLIPTextEncoder:
    return CLIPTextEncoder(config)
