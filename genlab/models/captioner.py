"""LLaVA-style image-to-text: a frozen CLIP image tower, a two-layer MLP projector and genlab's GPT (Liu et al. 2023).

The patch features Z_v of the image tower become prefix embeddings H_v = W_2 GELU(W_1 Z_v) of the GPT (LLaVA,
eq. 1, with LLaVA-1.5's two-layer MLP); the GPT reads them before the chat-templated question and learns the
answer: p(X_a | X_v, X_q) = prod_i p(x_i | X_v, X_q, X_a,<i) (LLaVA, eq. 3), the loss on the answer tokens only.
Stage 1 (feature alignment) trains on captions; stage 2 (instruction tuning) on questions and answers made from the
data's ground truth (`genlab.data.instructions`), starting from stage 1 (`init_from`). The image tower stays
frozen throughout, as in the paper, so its features are computed once per image in `prepare_data`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.config import check_int, from_dict, to_dict
from genlab.data.chat import IGNORE, encode_chat
from genlab.data.instructions import CAPTION_PROMPT
from genlab.data.tokenizer import TOKENIZER_NAME, Tokenizer, train_tokenizer
from genlab.errors import GenlabError
from genlab.models.base import Conditioning, GenerativeModel, Likelihood, ModelConfig, Output, resolve_model_dir
from genlab.models.clip import CLIP, CLIPConfig
from genlab.models.gpt import GPT, GPTConfig
from genlab.registry import MODELS

STAGES = (1, 2)


def _default_gpt() -> GPTConfig:
    return GPTConfig(vocab=512, block_size=64, n_layer=4, n_head=4, n_embd=128)


@dataclass
class CaptionerConfig(ModelConfig):
    """Where the image tower and language model come from, the projector, and what each stage trains."""

    clip: str = ""  # a CLIP model folder (family clip): its image tower gives the patch features, frozen
    clip_config: dict[str, Any] = field(default_factory=dict)  # filled by `build`: that CLIP's config
    llm: str | None = None  # a genlab GPT folder to start the language model from; None: trained from scratch
    gpt: GPTConfig = field(default_factory=_default_gpt)  # the language model's sizes when trained from scratch
    projector_hidden: int = 0  # hidden width of the two-layer MLP projector; 0: the GPT's width
    prefix_pool: int = 1  # average-pool the patch grid k x k (2: a quarter of the prefix tokens)
    prefix_position: bool = True  # a learned embedding per prefix token (where on the grid), added after the projector
    stage: int = 1  # 1: captions (feature alignment); 2: instructions from the ground truth, plus captions
    freeze_gpt: bool = True  # train the projector alone (stage 1 of the paper); false also trains the GPT
    init_from: str | None = None  # a captioner folder to continue from (stage 2 starts from stage 1)
    questions_per_image: int = 4  # stage 2: question-answer examples made from each training image
    captions_per_image: int = 1  # stage 2: caption examples kept beside them (so captioning is not forgotten)
    seed: int = 0  # the draw of stage 2's questions


class Projector(nn.Module):
    """H_v = W_2 GELU(W_1 Z_v): patch features to the language model's embedding width (LLaVA-1.5's mlp2x_gelu)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(z)))


@dataclass
class ImagePrompt:
    """What the GPT decodes from: its prompts (chat-templated token ids) after the image prefixes (B, P, n_embd)."""

    model: GPT
    prompts: list[list[int]]
    prefix: Tensor


@MODELS.register("captioner")
class Captioner(GenerativeModel):
    """Image-conditioned GPT: p(answer | image, question), the image as prefix embeddings (Liu et al. 2023, eq. 3)."""

    family = "captioner"
    config_class = CaptionerConfig
    conditioning = frozenset({Conditioning.IMAGE, Conditioning.TEXT})  # an image, and a question about it
    output = Output.TEXT
    likelihood = Likelihood.NONE  # exact per answer given the image, but not a likelihood of images or texts alone

    def __init__(self, config: CaptionerConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__(config)
        c = config
        if not c.clip_config:
            raise GenlabError("model.clip_config is unset: build the captioner from data with model.clip set to a "
                              "CLIP model folder")
        _check_config(c)
        clip_cfg = from_dict(CLIPConfig, c.clip_config, prefix="model.clip_config.")
        self.visual = CLIP(clip_cfg).visual  # the image tower alone is kept (and stored in this model's weights)
        self.visual.requires_grad_(False)
        self.gpt = GPT(c.gpt, tokenizer=tokenizer)
        width = clip_cfg.vision_width
        self.projector = Projector(width, c.projector_hidden or c.gpt.n_embd, c.gpt.n_embd)
        # A ViT's patch features carry their position (its position embedding); a CNN's carry almost none, so that
        # "left of" could not be read from them: a learned embedding per grid cell says where each prefix token is.
        side = _pooled_side(int(self.visual.grid), c.prefix_pool)
        self.prefix_pos = nn.Parameter(torch.randn(1, side * side, c.gpt.n_embd) * 0.02) if c.prefix_position else None
        self.gpt.requires_grad_(not (c.stage == 1 and c.freeze_gpt))

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.gpt.tokenizer

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the image tower reads."""
        c = self.config.clip_config
        return (int(c["channels"]), int(c["image_size"]), int(c["image_size"]))

    def train(self, mode: bool = True) -> Captioner:
        super().train(mode)
        self.visual.eval()  # frozen: no dropout or batch statistics, whatever the mode
        return self

    # -- the image prefix ----------------------------------------------------------------------------------
    @torch.no_grad()
    def patch_features(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """Z_v: the frozen tower's patch features (B, P, width) of images x (B, C, H, W) in [-1, 1], pooled
        `prefix_pool` x `prefix_pool` over the patch grid."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise GenlabError(f"images of shape {tuple(x.shape)} do not fit this captioner, which reads "
                              f"(B, {', '.join(map(str, self.image_shape))})")
        device = self.projector.fc1.weight.device
        out = []
        for i in range(0, len(x), batch_size):
            _, patches = self.visual(x[i: i + batch_size].to(device))
            out.append(_pool_grid(patches.float(), self.config.prefix_pool))
        return torch.cat(out)

    def prefix(self, z: Tensor) -> Tensor:
        """H_v = projector(Z_v) (+ the prefix position embedding): prefix embeddings (B, P, n_embd) of patch
        features (B, P, width)."""
        h = self.projector(z.to(self.projector.fc1.weight))
        return h if self.prefix_pos is None else h + self.prefix_pos

    def image_prompt(self, images: Tensor, questions: list[str]) -> ImagePrompt:
        """The GPT, the chat-templated questions (one per image) and the images' prefixes, for `sampling.text`'s
        `generate` / `stream` (any decoding: greedy, sampling, beams); an empty question asks for the caption."""
        if len(questions) != len(images):
            raise GenlabError(f"{len(questions)} questions for {len(images)} images; give one per image")
        tok = self._require_tokenizer()
        prompts = [encode_chat(tok, [{"role": "user", "content": q or CAPTION_PROMPT}], add_generation_prompt=True)[0]
                   for q in questions]
        with torch.no_grad():
            prefix = self.prefix(self.patch_features(images))
        return ImagePrompt(self.gpt, prompts, prefix)

    @torch.no_grad()
    def answer(self, images: Tensor, questions: list[str] | str = CAPTION_PROMPT, max_new_tokens: int = 48,
               batch_size: int = 256) -> list[str]:
        """Greedy answers (up to the end token) to one question per image (or one for all): captions by default."""
        if isinstance(questions, str):
            questions = [questions] * len(images)
        if len(questions) != len(images):
            raise GenlabError(f"{len(questions)} questions for {len(images)} images; give one per image")
        was_training = self.training
        self.eval()
        z = self.patch_features(images)
        out: list[str] = []
        for i in range(0, len(images), batch_size):
            out += self.answer_features(z[i: i + batch_size], questions[i: i + batch_size], max_new_tokens)
        self.train(was_training)
        return out

    # -- losses ---------------------------------------------------------------------------------------------
    def logits(self, z: Tensor, ids: Tensor) -> Tensor:
        """Next-token logits (B, L - 1, V) for the tokens ids[:, 1:], read after the image prefix and ids[:, :-1]."""
        h_v = self.prefix(z)
        P = h_v.shape[1]
        x = torch.cat([h_v, self.gpt.tok_emb(ids.to(h_v.device))], dim=1)
        return self.gpt(None, embeds=x[:, :-1])[:, P:]

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Cross-entropy over the answer tokens only (labels -100 elsewhere), summed and divided by their count;
        the trainer weights micro-batches by `loss_tokens` (LLaVA, eq. 3)."""
        logits = self.logits(batch["patches"], batch["input_ids"])
        targets = batch["labels"][:, 1:].to(logits.device)
        total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return {"loss": total / self.loss_tokens(batch).clamp(min=1)}

    @staticmethod
    def loss_tokens(batch: dict[str, Any]) -> Tensor:
        """How many answer tokens `training_losses` averages over in `batch`."""
        return (batch["labels"][:, 1:] != IGNORE).sum()

    @torch.no_grad()
    def validation_metrics(self, val_data: Any) -> dict[str, float]:
        """Answer-token loss over (up to) 1,024 held-out examples, and the exact-match rate of greedy answers to
        the first 64 of them."""
        was_training = self.training
        self.eval()
        total, count = 0.0, 0
        n = min(len(val_data), 1024)
        for start in range(0, n, 128):
            batch = val_data.get_batch(torch.arange(start, min(start + 128, n)))
            logits = self.logits(batch["patches"], batch["input_ids"]).float()
            targets = batch["labels"][:, 1:].to(logits.device)
            total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                           reduction="sum"))
            count += int((targets != IGNORE).sum())
        k = min(len(val_data), 64)
        answers = self.answer_features(val_data.patches[val_data.image[:k]].float(), val_data.questions[:k])
        exact = sum(a == b for a, b in zip(answers, val_data.answers[:k])) / max(k, 1)
        self.train(was_training)
        loss = total / max(count, 1)
        return {"val_loss": loss, "ppl": math.exp(min(loss, 50.0)), "val_exact": exact}

    @torch.no_grad()
    def answer_features(self, z: Tensor, questions: list[str], max_new_tokens: int = 48) -> list[str]:
        """Greedy answers (up to the end token) from patch features z (B, P, width), one question per row."""
        from genlab.sampling.text import GenerationConfig, generate

        tok = self._require_tokenizer()
        prompts = [encode_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0]
                   for q in questions]
        gen = generate(self.gpt, prompts, GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0),
                       prefix=self.prefix(z))
        return [tok.decode(ids).strip() for ids in gen.tokens]

    # -- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: torch.Generator | None = None, **opts: Any) -> Tensor:
        """`n` answers as token ids (n, T) about the image(s) `cond`: a (1 or n, C, H, W) tensor in [-1, 1], or a
        pair (images, question); the question defaults to the caption prompt. `opts` are `GenerationConfig`'s."""
        from genlab.sampling.text import GenerationConfig, generate

        images, question = cond if isinstance(cond, tuple) else (cond, CAPTION_PROMPT)
        if not isinstance(images, Tensor):
            raise GenlabError("a captioner answers about an image: give one (an image file, --image)")
        if images.ndim == 3:
            images = images[None]
        if len(images) == 1:
            images = images.expand(n, -1, -1, -1)
        if len(images) != n:
            raise GenlabError(f"{len(images)} images for {n} samples; give one image or one per sample")
        p = self.image_prompt(images, [question or CAPTION_PROMPT] * n)
        out = generate(p.model, p.prompts, GenerationConfig(**opts), generator=generator, prefix=p.prefix)
        tok = self._require_tokenizer()
        ids = torch.full((n, max(1, max(len(s) for s in out.tokens))), tok.pad_id, dtype=torch.long)
        for i, s in enumerate(out.tokens):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return ids

    # -- trainer hooks ----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: CaptionerConfig, dataset: Any) -> Captioner:
        """Continue from `init_from`, or take the image tower from `clip`, the language model from `llm` (or a
        new GPT with a tokenizer trained on every text the stages use) and a new projector."""
        from genlab.data.instructions import training_texts

        _check_config(config)
        if config.init_from:
            model = cls.from_pretrained(resolve_model_dir(config.init_from))
            kept = replace(model.config, stage=config.stage, freeze_gpt=config.freeze_gpt, init_from=config.init_from,
                           questions_per_image=config.questions_per_image, seed=config.seed,
                           captions_per_image=config.captions_per_image,
                           gpt=replace(model.config.gpt, dropout=config.gpt.dropout))
            model.config = kept
            model.gpt.config = kept.gpt
            model.gpt.requires_grad_(not (kept.stage == 1 and kept.freeze_gpt))
            _check_image_data(model, dataset)
            return model
        if not config.clip:
            raise GenlabError("model.clip is unset: give a CLIP model folder (train configs/shapes-clip.yaml first)")
        clip = CLIP.from_pretrained(resolve_model_dir(config.clip))
        if config.llm:
            llm = GPT.from_pretrained(resolve_model_dir(config.llm))
            tok, gpt_cfg = llm.tokenizer, llm.config
        else:
            llm = None
            tok = train_tokenizer(training_texts(dataset), config.gpt.tokenizer, config.gpt.vocab, "model.gpt.vocab")
            gpt_cfg = replace(config.gpt, vocab_size=tok.vocab_size)
        model = cls(replace(config, clip_config=to_dict(clip.config), gpt=gpt_cfg), tokenizer=tok)
        model.visual.load_state_dict(clip.visual.state_dict())
        if llm is not None:
            model.gpt.load_state_dict(llm.state_dict())
        _check_image_data(model, dataset)
        return model

    def prepare_data(self, dataset: Any) -> ImageConversations:
        """Each training image's patch features (computed once: the tower is frozen) and its conversations:
        captions in stage 1, questions and answers from the ground truth plus captions in stage 2."""
        from genlab.data.instructions import image_conversations

        c = self.config
        _check_image_data(self, dataset)
        items = image_conversations(dataset, c.stage, c.questions_per_image, c.captions_per_image, c.seed)
        was_training = self.training
        self.eval()
        z = self.patch_features(dataset.images.float().div(127.5).sub(1.0)).half().cpu()
        self.train(was_training)
        return ImageConversations(z, items, self._require_tokenizer())

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """Nothing: the trainer's validation measures `val_exact` on held-out images instead."""
        return []

    # -- the model folder -------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """config.json + model.safetensors (image tower, projector, GPT) + tokenizer.json."""
        d = super().save_pretrained(directory, state_dict)
        self._require_tokenizer().save(d / TOKENIZER_NAME)
        return d

    @classmethod
    def from_folder_config(cls, config: CaptionerConfig, directory: Path) -> Captioner:
        return cls(config, tokenizer=Tokenizer.from_file(directory / TOKENIZER_NAME))

    def _require_tokenizer(self) -> Tokenizer:
        if self.gpt.tokenizer is None:
            raise GenlabError("this captioner has no tokenizer: build it from data or load it from a model folder")
        return self.gpt.tokenizer


class ImageConversations:
    """Conversations about images: per item an image index, a question and its answer, encoded with the chat
    template (labels on the answer and its end token only); `get_batch` -> {"patches", "input_ids", "labels"},
    cut to the batch's longest conversation."""

    def __init__(self, patches: Tensor, items: list[tuple[int, str, str, str]], tok: Tokenizer) -> None:
        self.patches = patches
        self.image = torch.tensor([i for i, _, _, _ in items], dtype=torch.long)
        self.questions = [q for _, q, _, _ in items]
        self.answers = [a for _, _, a, _ in items]
        self.kinds = [k for _, _, _, k in items]
        encoded = [encode_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                   for _, q, a, _ in items]
        L = max(len(ids) for ids, _ in encoded)
        self.input_ids = torch.full((len(items), L), tok.pad_id, dtype=torch.long)
        self.labels = torch.full((len(items), L), IGNORE, dtype=torch.long)
        self.lengths = torch.tensor([len(ids) for ids, _ in encoded])
        for i, (ids, lab) in enumerate(encoded):
            self.input_ids[i, : len(ids)] = torch.tensor(ids)
            self.labels[i, : len(lab)] = torch.tensor(lab)

    def __len__(self) -> int:
        return len(self.image)

    def get_batch(self, indices: Tensor | list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        L = int(self.lengths[idx].max())
        return {"patches": self.patches[self.image[idx]].float(), "input_ids": self.input_ids[idx, :L],
                "labels": self.labels[idx, :L]}

    def iter_eval_batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.get_batch(torch.arange(i, min(i + batch_size, len(self))))


def _pool_grid(patches: Tensor, k: int) -> Tensor:
    """Average-pool (B, N, C) patch tokens on their sqrt(N) x sqrt(N) grid by k x k (k = 1: unchanged)."""
    if k == 1:
        return patches
    B, N, C = patches.shape
    side = math.isqrt(N)  # square, and divisible by k: checked when the model was built (`_pooled_side`)
    grid = patches.transpose(1, 2).reshape(B, C, side, side)
    return F.avg_pool2d(grid, k).flatten(2).transpose(1, 2)


def _pooled_side(side: int, k: int) -> int:
    """The side of a `side` x `side` patch grid pooled k x k; k must divide it."""
    if side % k:
        raise GenlabError(f"model.prefix_pool={k} does not divide the image tower's {side} x {side} patch grid")
    return side // k


def _check_config(c: CaptionerConfig) -> None:
    if c.stage not in STAGES:
        raise GenlabError(f"model.stage must be 1 (captions) or 2 (instructions), got {c.stage}")
    check_int("model.prefix_pool", c.prefix_pool, 1, 64)
    check_int("model.projector_hidden", c.projector_hidden, 0, 16_384)
    check_int("model.questions_per_image", c.questions_per_image, 0, 64)
    check_int("model.captions_per_image", c.captions_per_image, 0, 64)
    check_int("model.seed", c.seed, 0, 2**63 - 1)
    if c.stage == 2 and c.questions_per_image + c.captions_per_image == 0:
        raise GenlabError("stage 2 needs examples: set model.questions_per_image or model.captions_per_image above 0")


def _check_image_data(model: Captioner, dataset: Any) -> None:
    """The data are images of the shape the image tower reads."""
    info = dataset.info
    if info.kind != "image":
        raise GenlabError(f"the captioner trains on captioned images; dataset {info.name!r} is {info.kind}")
    shape = (info.channels, info.image_size, info.image_size)
    if shape != model.image_shape:
        raise GenlabError(f"dataset {info.name!r} has images {shape} but the CLIP image tower reads "
                          f"{model.image_shape}; set data.image_size or use a CLIP trained at that size")
