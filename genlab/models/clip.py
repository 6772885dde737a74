"""CLIP: contrastive language-image pre-training (Radford et al. 2021), as a genlab family that outputs embeddings.

An image tower (a small ViT or a residual CNN, `nn/vit.py`) and a text tower (a causal transformer of
`nn/transformer.py` over a byte-level BPE tokenizer trained on the captions) are projected into one space and
trained with the symmetric contrastive loss (Radford et al. 2021, fig. 3) at a learned temperature,
initialised at log(1/0.07) and clamped at 100 as open_clip does. Under several processes the features of every
rank are gathered with their gradients (open_clip's `gather_features`, local loss off), so the global batch
supplies the negatives. With `hard_negatives` (groups of interchangeable words, e.g. the shape names), each caption
also gets a caption that differs in one attribute, added to the image-to-text negatives (NegCLIP, Yuksekgonul et al.
2023, sec. 5).

API for other families (the text-to-image model, the captioner):

- `model.text_features(texts)` -> `TextFeatures(tokens (B, T, text_width), mask (B, T) bool, pooled (B, embed_dim))`
- `model.image_features(x)` -> `ImageFeatures(patches (B, N, vision_width), pooled (B, embed_dim))`, x in [-1, 1]
- `model.encode_text(texts)` / `model.encode_image(x)` -> (B, embed_dim), L2-normalized unless `normalize=False`
- `CLIP.from_pretrained(folder)`: config.json + model.safetensors + tokenizer.json
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.config import MAX_CONTEXT, MAX_DEPTH, MAX_IMAGE_SIZE, MAX_VOCAB, MAX_WIDTH, check_int, check_number
from genlab.data.tokenizer import TOKENIZER_NAME, Tokenizer, train_tokenizer
from genlab.errors import GenlabError
from genlab.models.base import Conditioning, GenerativeModel, Likelihood, ModelConfig, Output, with_image_shape
from genlab.nn.transformer import Block, RMSNorm, rope_tables
from genlab.nn.vit import ConvEncoder, ViT
from genlab.registry import MODELS

IMAGE_TOWERS = ("vit", "cnn")
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # Radford et al. 2021, sec. 2.5


@dataclass
class CLIPConfig(ModelConfig):
    """Sizes of both towers, the shared embedding and the tokenizer."""

    image_size: int = 0  # filled from the data by `build`
    channels: int = 0
    image_tower: str = "vit"  # vit | cnn
    patch_size: int = 4  # vit: pixels per patch side
    vision_width: int = 128
    vision_layers: int = 4  # vit: blocks; cnn: stages (each halves the resolution after the first)
    vision_heads: int = 4
    cnn_channels: int = 32  # cnn: channels of the first stage
    tokenizer: str = "bpe"  # bpe | char, trained on the training captions by `build`
    vocab: int = 1024  # BPE vocabulary size to train (the merges stop earlier on a small caption set)
    tokenizer_file: str | None = None  # use this tokenizer.json instead of training one
    vocab_size: int = 0  # filled from the tokenizer by `build`
    context_length: int = 32  # tokens per caption, BOS and EOS included; longer captions are cut
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    embed_dim: int = 128
    init_logit_scale: float = INIT_LOGIT_SCALE
    max_logit_scale: float = 100.0  # the temperature's clamp (open_clip: logit_scale <= log 100)
    hard_negatives: list[list[str]] = field(default_factory=list)  # NegCLIP: groups of interchangeable words
    norm_eps: float = 1e-5


@dataclass
class TextFeatures:
    """Per-token embeddings of the text tower (after its final norm), which positions are real tokens (BOS,
    caption, EOS; False: padding), and the pooled, projected embedding (the EOS token's, unnormalized)."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor


@dataclass
class ImageFeatures:
    """Patch features of the image tower (after its final norm) and the pooled, projected embedding."""

    patches: Tensor
    pooled: Tensor


def gather_features(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's features, concatenated in rank order, with gradients flowing back to their owners
    (open_clip's `gather_features(gather_with_grad=True)`); the inputs themselves with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image, text
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(image)), torch.cat(all_gather(text))


def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor, negatives: Tensor | None = None,
                     valid: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over normalized embeddings (Radford et al. 2021, fig. 3):
    logits = exp(t) I T^T; loss = (CE(logits, arange) + CE(logits^T, arange)) / 2.

    With hard `negatives` (B, D), one caption per image (`valid` (B,) bool: which exist), the image-to-text
    logits are exp(t) I [T; N]^T, every image against every caption and every hard negative (NegCLIP,
    Yuksekgonul et al. 2023, sec. 5); the text-to-image term is unchanged."""
    logits = logit_scale * image @ text.t()
    labels = torch.arange(len(logits), device=logits.device)
    per_image = logits
    if negatives is not None:
        neg = logit_scale * image @ negatives.t()
        if valid is not None:
            neg = neg.masked_fill(~valid.to(neg.device)[None], float("-inf"))
        per_image = torch.cat([logits, neg], dim=1)
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(logits.t(), labels)) / 2


_WORDS = re.compile(r"(\w+)")


def hard_negative(caption: str, groups: Sequence[Sequence[str]], rng: random.Random) -> str | None:
    """`caption` changed in one attribute (NegCLIP, Yuksekgonul et al. 2023, sec. 5): with probability 1/2 (when
    possible) two different words of one group exchanged ("a red circle and a blue square" -> "a blue circle and a
    red square"; only between words whose neighbouring attribute words differ: "a red circle and a blue circle" would
    keep its meaning), else one word of a group replaced by another of its group. "a"/"an" just before a changed
    word follows it. None when no word of a group occurs."""
    parts = _WORDS.split(caption)  # words at odd indices, the text between them at even ones
    group_of = {w.lower(): tuple(g) for g in groups for w in g}
    found = [i for i in range(1, len(parts), 2) if len(group_of.get(parts[i].lower(), ())) > 1]
    if not found:
        return None
    def partner(k: int) -> str | None:  # the attribute word of another group next to word k (its noun, its color)
        for n in (k + 2, k - 2):
            if 0 < n < len(parts) and group_of.get(parts[n].lower(), group_of[parts[k].lower()]) \
                    != group_of[parts[k].lower()]:
                return parts[n].lower()
        return None

    swaps = [(i, j) for a, i in enumerate(found) for j in found[a + 1:]
             if group_of[parts[i].lower()] == group_of[parts[j].lower()] and parts[i].lower() != parts[j].lower()
             and partner(i) is not None and partner(i) != partner(j)]
    if swaps and rng.random() < 0.5:
        i, j = swaps[rng.randrange(len(swaps))]
        parts[i], parts[j] = parts[j], parts[i]
        changed = [i, j]
    else:
        i = found[rng.randrange(len(found))]
        parts[i] = rng.choice([w for w in group_of[parts[i].lower()] if w.lower() != parts[i].lower()])
        changed = [i]
    for k in changed:  # the article agrees with the word that now follows it
        if k >= 2 and parts[k - 1] == " " and parts[k - 2].lower() in ("a", "an"):
            article = "an" if parts[k][:1].lower() in "aeiou" else "a"
            parts[k - 2] = article.capitalize() if parts[k - 2][0].isupper() else article
    return "".join(parts)


class TextTransformer(nn.Module):
    """A causal transformer over BOS + caption + EOS (right-padded); the EOS token's state is the pooled one
    (Radford et al. 2021, sec. 2.4). Causal attention keeps padding out of every real token's state."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 eps: float) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.blocks = nn.ModuleList(Block(width, heads, heads, 4 * width, eps, 0.0) for _ in range(layers))
        self.norm = RMSNorm(width, eps)
        cos, sin = rope_tables(width // heads, context_length)
        self.register_buffer("rope_cos", cos[:, None, :], persistent=False)
        self.register_buffer("rope_sin", sin[:, None, :], persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        T = ids.shape[1]
        x = self.tok_emb(ids)
        cos, sin = self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None, None, i)
        return self.norm(x)


@MODELS.register("clip")
class CLIP(GenerativeModel):
    """Contrastive image-text model: cos(f(image), g(text)) is high for a matching pair (Radford et al. 2021).

    Not generative: it draws nothing (`sample` refuses), its output is embeddings; `genlab embed` and the
    zero-shot, retrieval, binding and CLIP-score evaluations read them."""

    family = "clip"
    config_class = CLIPConfig
    conditioning = frozenset({Conditioning.NONE})  # sample takes nothing: there is no sampling
    output = Output.EMBEDDING
    likelihood = Likelihood.NONE

    def __init__(self, config: CLIPConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__(config)
        c = config
        _check_config(c)
        self.tokenizer = tokenizer
        if c.image_tower == "vit":
            self.visual: nn.Module = ViT(c.image_size, c.channels, c.patch_size, c.vision_width, c.vision_layers,
                                         c.vision_heads, eps=c.norm_eps)
        else:
            self.visual = ConvEncoder(c.image_size, c.channels, c.cnn_channels, c.vision_layers, c.vision_width,
                                      eps=c.norm_eps)
        self.text = TextTransformer(c.vocab_size, c.context_length, c.text_width, c.text_layers, c.text_heads,
                                    c.norm_eps)
        self.image_proj = nn.Linear(c.vision_width, c.embed_dim, bias=False)
        self.text_proj = nn.Linear(c.text_width, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.init_logit_scale)))
        for m in [self.text, self.image_proj, self.text_proj]:
            m.apply(_init_weights)
        for name, p in self.text.named_parameters():  # GPT-2's 1/sqrt(2 L) scaling of residual projections
            if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.text_layers))

    # -- the two towers ---------------------------------------------------------------------------------
    def tokenize(self, texts: list[str] | tuple[str, ...]) -> Tensor:
        """Token ids (B, context_length): BOS, the caption's tokens (cut to fit), EOS, then padding."""
        tok = self._require_tokenizer()
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise GenlabError("texts must be a list of strings")
        L = self.config.context_length
        ids = torch.full((len(texts), L), tok.pad_id, dtype=torch.long)
        for i, row in enumerate(tok.encode_batch(list(texts))):
            row = [tok.bos_id, *row[: L - 2], tok.eos_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids

    def text_features(self, texts: list[str] | Tensor) -> TextFeatures:
        """Per-token states, the mask of real tokens and the pooled projection, for captions or token ids."""
        ids = self.tokenize(texts) if not isinstance(texts, Tensor) else texts
        ids = ids.to(self.logit_scale.device)
        mask = ids != self._require_tokenizer().pad_id
        tokens = self.text(ids)
        eos = mask.sum(1) - 1  # BOS .. EOS are the real tokens; EOS is the last
        pooled = self.text_proj(tokens[torch.arange(len(ids), device=ids.device), eos])
        return TextFeatures(tokens, mask, pooled)

    def image_features(self, x: Tensor) -> ImageFeatures:
        """Patch features and the pooled projection of images x (B, C, H, W) in [-1, 1]."""
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise GenlabError(f"images of shape {tuple(x.shape)} do not fit this CLIP, which reads "
                              f"(B, {c.channels}, {c.image_size}, {c.image_size})")
        pooled, patches = self.visual(x.to(self.logit_scale.device))
        return ImageFeatures(patches, self.image_proj(pooled))

    def encode_text(self, texts: list[str] | Tensor, normalize: bool = True) -> Tensor:
        """Text embeddings (B, embed_dim), unit length unless `normalize` is False."""
        z = self.text_features(texts).pooled
        return F.normalize(z, dim=-1) if normalize else z

    def encode_image(self, x: Tensor, normalize: bool = True) -> Tensor:
        """Image embeddings (B, embed_dim) of x in [-1, 1], unit length unless `normalize` is False."""
        z = self.image_features(x).pooled
        return F.normalize(z, dim=-1) if normalize else z

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the image tower reads (CLIP draws none)."""
        return (self.config.channels, self.config.image_size, self.config.image_size)

    def scale(self) -> Tensor:
        """exp(t), the inverse temperature, at most `max_logit_scale`."""
        return self.logit_scale.clamp(0, math.log(self.config.max_logit_scale)).exp()

    def forward(self, x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalized image and text embeddings and the logit scale."""
        return self.encode_image(x), self.encode_text(ids), self.scale()

    # -- training -----------------------------------------------------------------------------------------
    def training_losses(self, batch: dict[str, Any], gather: bool = True) -> dict[str, Tensor]:
        """The contrastive loss over the whole global batch (every rank's features, when `gather`)."""
        with torch.no_grad():  # open_clip clamps the parameter itself (after each step; here before the next)
            self.logit_scale.clamp_(0, math.log(self.config.max_logit_scale))
        image, text, scale = self(batch["x"], batch["input_ids"])
        negatives = valid = None
        if self.config.hard_negatives:
            rng = random.Random(int(torch.randint(2**31, ())))
            made = [hard_negative(t, self.config.hard_negatives, rng) for t in batch["text"]]
            valid = torch.tensor([m is not None for m in made], device=image.device)
            negatives = self.encode_text([m if m is not None else t for m, t in zip(made, batch["text"], strict=True)])
        if gather:
            image, text = gather_features(image, text)
            if negatives is not None and valid is not None:
                negatives, valid = gather_features(negatives, valid.to(negatives.dtype))
                valid = valid.bool()
        loss = contrastive_loss(image, text, scale, negatives, valid)
        return {"loss": loss, "logit_scale": scale.detach()}

    @torch.no_grad()
    def validation_metrics(self, val_data: Any) -> dict[str, float]:
        """Contrastive loss (on this process only) and image-to-text top-1 accuracy, where any caption identical to
        the image's own counts as correct, over batches of 256 held-out pairs (the first 2,048)."""
        n = min(len(val_data), 2048)
        losses, correct = [], 0
        for start in range(0, n, 256):
            batch = val_data.get_batch(torch.arange(start, min(start + 256, n)))
            image, text, scale = self(batch["x"], batch["input_ids"])
            losses.append(float(contrastive_loss(image, text, scale)) * len(image))
            ids = batch["input_ids"].to(image.device)
            same = (ids[:, None] == ids[None]).all(-1)
            correct += int(same[torch.arange(len(ids)), (image @ text.t()).argmax(1)].sum())
        return {"val_loss": sum(losses) / n, "val_i2t_acc": correct / n, "logit_scale": float(self.scale())}

    @classmethod
    def build(cls, config: CLIPConfig, dataset: Any) -> CLIP:
        """Image size from the data; the tokenizer trained on the captions (or read from `tokenizer_file`)."""
        config = with_image_shape(config, dataset, cls.family)
        if config.tokenizer_file:
            tok = Tokenizer.from_file(config.tokenizer_file)
        else:
            tok = train_tokenizer("\n".join(_captions(dataset)) + "\n", config.tokenizer, config.vocab, "model.vocab")
        return cls(replace(config, vocab_size=tok.vocab_size), tokenizer=tok)

    def prepare_data(self, dataset: Any) -> CaptionedImages:
        """Images with their captions tokenized once."""
        return CaptionedImages(dataset, self.tokenize(_captions(dataset)))

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: torch.Generator | None = None, **opts: Any) -> Tensor:
        raise GenlabError("a CLIP model draws nothing: it embeds texts and images (`genlab embed`)")

    # -- the model folder -----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """config.json + model.safetensors + tokenizer.json."""
        d = super().save_pretrained(directory, state_dict)
        self._require_tokenizer().save(d / TOKENIZER_NAME)
        return d

    @classmethod
    def from_folder_config(cls, config: CLIPConfig, directory: Path) -> CLIP:
        """The model with the folder's tokenizer.json."""
        return cls(config, tokenizer=Tokenizer.from_file(directory / TOKENIZER_NAME))

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise GenlabError("this CLIP has no tokenizer: build it from data or load it from a model folder")
        return self.tokenizer


class CaptionedImages:
    """Images of an `ImageDataset` with their captions as token ids: `get_batch` -> {"x", "input_ids", "text"}."""

    def __init__(self, dataset: Any, ids: Tensor) -> None:
        self.dataset, self.ids = dataset, ids
        self.captions = list(dataset.captions)

    def __len__(self) -> int:
        return len(self.ids)

    def get_batch(self, indices: Tensor | list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"x": self.dataset.get_batch(idx)["x"], "input_ids": self.ids[idx],
                "text": [self.captions[i] for i in idx.tolist()]}


def _captions(dataset: Any) -> list[str]:
    captions = getattr(dataset, "captions", None)
    if dataset.info.kind != "image" or not captions:
        raise GenlabError(f"CLIP trains on captioned images; dataset {dataset.info.name!r} has no captions "
                          "(an image folder takes them from metadata.jsonl or .txt files beside the images)")
    return [str(c) for c in captions]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear | nn.Embedding):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _check_config(c: CLIPConfig) -> None:
    """One-line errors for sizes the towers cannot be built with."""
    if c.image_tower not in IMAGE_TOWERS:
        raise GenlabError(f"model.image_tower {c.image_tower!r} is unknown; choose one of: {', '.join(IMAGE_TOWERS)}")
    if c.vocab_size <= 0:
        raise GenlabError("model.vocab_size is unset: build the model from data or give a tokenizer_file")
    if c.image_size <= 0 or c.channels <= 0:
        raise GenlabError("model.image_size and model.channels are unset: build the model from an image dataset")
    check_int("model.image_size", c.image_size, 4, MAX_IMAGE_SIZE)
    check_int("model.channels", c.channels, 1, 4)
    check_int("model.vocab_size", c.vocab_size, 1, MAX_VOCAB)
    check_int("model.context_length", c.context_length, 3, MAX_CONTEXT, "BOS, at least one token and EOS")
    for key in ("vision_width", "text_width", "embed_dim", "cnn_channels"):
        check_int(f"model.{key}", getattr(c, key), 1, MAX_WIDTH)
    for key in ("vision_layers", "text_layers"):
        check_int(f"model.{key}", getattr(c, key), 1, MAX_DEPTH)
    check_int("model.text_heads", c.text_heads, 1, c.text_width)
    if c.text_width % c.text_heads or (c.text_width // c.text_heads) % 2:
        raise GenlabError(f"model.text_width={c.text_width} must be model.text_heads={c.text_heads} times an even "
                          "head size (RoPE)")
    check_number("model.max_logit_scale", c.max_logit_scale, 1, 1e4)
    if not isinstance(c.hard_negatives, list) or not all(
            isinstance(g, list) and len(g) >= 2 and all(isinstance(w, str) and w.strip() and w.isalnum() for w in g)
            for g in c.hard_negatives):
        raise GenlabError("model.hard_negatives must be a list of groups of at least two interchangeable single words, "
                          "e.g. [[circle, square, star], [red, blue, green]]")
    check_number("model.init_logit_scale", c.init_logit_scale, 0, math.log(c.max_logit_scale),
                 hint="a log: at most log(model.max_logit_scale)")
    if c.image_tower == "vit":
        check_int("model.vision_heads", c.vision_heads, 1, c.vision_width)
        check_int("model.patch_size", c.patch_size, 1, c.image_size)
        if c.image_size % c.patch_size:
            raise GenlabError(f"model.image_size={c.image_size} must be a multiple of model.patch_size={c.patch_size}")
        if c.vision_width % c.vision_heads or c.vision_width % 4:
            raise GenlabError(f"model.vision_width={c.vision_width} must be a multiple of 4 and of "
                              f"model.vision_heads={c.vision_heads}")
    else:
        check_int("model.vision_layers", c.vision_layers, 1, 8, "each cnn stage halves the resolution")
        if c.image_size % 2 ** (c.vision_layers - 1):
            raise GenlabError(f"model.image_size={c.image_size} must be divisible by 2^(vision_layers-1) = "
                              f"{2 ** (c.vision_layers - 1)} for the cnn tower")
        if c.cnn_channels % 8:
            raise GenlabError(f"model.cnn_channels={c.cnn_channels} must be a multiple of 8 (group norm)")
