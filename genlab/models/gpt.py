"""GPT: a decoder-only transformer language model (Radford et al. 2018) in the Llama layout (Touvron et al. 2023).

RoPE, RMSNorm, SwiGLU, causal scaled-dot-product attention, optional tied embeddings; the tokenizer is trained
by `build` (or read from `tokenizer_file` / `init_from`) and travels with the model as `tokenizer.json`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.config import MAX_CONTEXT, MAX_DEPTH, MAX_VOCAB, MAX_WIDTH, check_int
from genlab.data.tokenizer import TOKENIZER_NAME, Tokenizer, tokenizer_kind, train_tokenizer
from genlab.errors import GenlabError
from genlab.models.base import (
    WEIGHTS_NAME,
    Conditioning,
    GenerativeModel,
    Likelihood,
    ModelConfig,
    Output,
    load_weights,
    read_model_meta,
)
from genlab.nn.transformer import Block, KVCache, RMSNorm, _decode_attention, apply_rope, attention_mask, rope_tables
from genlab.registry import MODELS


@dataclass
class GPTConfig(ModelConfig):
    """Sizes of the network and where its tokenizer comes from."""

    tokenizer: str = "bpe"  # bpe | char: the kind trained by `build` on the training text
    vocab: int = 4096  # BPE vocabulary size to train
    tokenizer_file: str | None = None  # use this tokenizer.json instead of training one
    vocab_size: int = 0  # filled from the tokenizer by `build`
    block_size: int = 256  # context length used in training
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 0  # 0: same as n_head (no grouped-query attention)
    n_embd: int = 384
    ffn_hidden: int = 0  # 0: 8/3 * n_embd rounded up to a multiple of 64 (Llama)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_from: str | None = None  # start from this model folder (fine-tuning)
    sft: bool = False  # data is JSONL chat; the loss covers assistant tokens only
    preview_tokens: int = 256  # length of the text samples written during training


def _ffn_hidden(cfg: GPTConfig) -> int:
    return cfg.ffn_hidden or 64 * math.ceil(8 * cfg.n_embd / 3 / 64)


@MODELS.register("gpt")
class GPT(GenerativeModel):
    """Decoder-only transformer LM: p(x) = prod_t p(x_t | x_<t) (Radford et al. 2018, eq. 1)."""

    family = "gpt"
    config_class = GPTConfig
    conditioning = frozenset({Conditioning.NONE, Conditioning.TEXT})  # a text prompt
    output = Output.TEXT
    likelihood = Likelihood.EXACT  # the chain rule over tokens
    lora_targets = ("wqkv", "wo", "w13", "w2")  # attention and MLP projections of every block

    def __init__(self, config: GPTConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__(config)
        c = config
        if c.vocab_size <= 0:
            raise GenlabError("model.vocab_size is unset: build the model from data or give a tokenizer_file")
        check_int("model.vocab_size", c.vocab_size, 1, MAX_VOCAB)
        check_int("model.block_size", c.block_size, 1, MAX_CONTEXT, "position tables of this length are built")
        check_int("model.n_embd", c.n_embd, 1, MAX_WIDTH)
        check_int("model.ffn_hidden", c.ffn_hidden, 0, 4 * MAX_WIDTH)
        check_int("model.n_head", c.n_head, 1, c.n_embd)
        check_int("model.n_layer", c.n_layer, 1, MAX_DEPTH)
        if c.n_embd % c.n_head:
            raise GenlabError(f"model.n_embd={c.n_embd} must be divisible by model.n_head={c.n_head}")
        self.n_kv_head = c.n_kv_head or c.n_head
        if c.n_head % self.n_kv_head:
            raise GenlabError(f"model.n_head={c.n_head} must be a multiple of model.n_kv_head={self.n_kv_head}")
        self.head_dim = c.n_embd // c.n_head
        if self.head_dim % 2:
            raise GenlabError(f"head size n_embd/n_head={self.head_dim} must be even for RoPE")
        self.tokenizer = tokenizer
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, self.n_kv_head, _ffn_hidden(c), c.norm_eps, c.dropout) for _ in range(c.n_layer)
        )
        self.norm = RMSNorm(c.n_embd, c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:  # one tensor, stored once (safetensors refuses shared memory)
            self.lm_head.weight = self.tok_emb.weight
            self.register_state_dict_post_hook(_drop_tied_head)
            self.register_load_state_dict_pre_hook(_restore_tied_head)
        cos, sin = rope_tables(self.head_dim, c.block_size, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's 1/sqrt(2 L) scaling of residual projections
            if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    # -- the network ------------------------------------------------------------------
    def _rope(self, end: int) -> tuple[Tensor, Tensor]:
        if end > self.rope_cos.shape[0]:  # beyond the training context: extend the tables
            cos, sin = rope_tables(self.head_dim, max(end, 2 * self.rope_cos.shape[0]), self.config.rope_theta)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self.rope_cos, self.rope_sin

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty preallocated KV cache for `batch` rows of up to `max_len` tokens."""
        p = self.tok_emb.weight
        return KVCache(self.config.n_layer, batch, self.n_kv_head, max_len, self.head_dim, p.dtype, p.device)

    def forward(self, idx: Tensor | None, cache: KVCache | None = None, key_mask: Tensor | None = None,
                positions: Tensor | None = None, last_only: bool = False, embeds: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) for tokens `idx` (B, T) following the `cache.length` cached ones.

        `key_mask` (B, past + T) marks real tokens (False: left padding); `positions` (B, T) are the RoPE
        positions (default past .. past + T - 1); `last_only` computes logits of the last position only.
        `embeds` (B, T, n_embd) are input embeddings taken in place of `tok_emb(idx)` (idx None), e.g. an image
        prefix followed by token embeddings (Liu et al. 2023, LLaVA, eq. 1: H_v = W Z_v beside H_q).
        """
        B, T = idx.shape if embeds is None else embeds.shape[:2]
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_len:
            raise GenlabError(f"the KV cache holds {cache.max_len} tokens; {past + T} were asked for")
        if positions is None:
            cos_t, sin_t = self._rope(past + T)
            cos, sin = cos_t[past: past + T, None, :], sin_t[past: past + T, None, :]
        else:
            cos_t, sin_t = self._rope(int(positions.max()) + 1)
            cos, sin = cos_t[positions][:, :, None, :], sin_t[positions][:, :, None, :]
        mask = attention_mask(key_mask, T, past, self.tok_emb.weight.device)
        if T == 1 and cache is not None and embeds is None and not (self.training and torch.is_grad_enabled()):
            return self._decode_step(idx, cache, cos.reshape(-1, 1, self.head_dim),
                                     sin.reshape(-1, 1, self.head_dim), mask)
        x = self.tok_emb(idx) if embeds is None else embeds
        x = self.drop(x) if self.training else x
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length = past + T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def _decode_matmuls(self) -> list[Any]:
        """Per block (wqkv, wo, w13, w2), then lm_head: a function x (B, in) -> (B, out) for each projection.

        A plain float nn.Linear that widens (out > in) multiplies a contiguous (in, out) copy of its weight, which
        takes MKL's faster path for a few rows (about 1.5x on one token); the copies are rebuilt whenever a
        weight changes (its version counter). Any other layer (int8, adapters) is called as it is.
        """
        linears = [m for b in self.blocks for m in (b.attn.wqkv, b.attn.wo, b.mlp.w13, b.mlp.w2)] + [self.lm_head]
        key = tuple((m.weight.data_ptr(), m.weight._version) if type(m) is nn.Linear else id(m) for m in linears)
        if getattr(self, "_decode_key", None) != key:
            fns = []
            for m in linears:
                if type(m) is nn.Linear and m.bias is None and m.out_features > m.in_features:
                    w_t = m.weight.detach().t().contiguous()
                    fns.append(lambda x, w_t=w_t: torch.mm(x, w_t))
                else:
                    fns.append(m)
            self._decode_fns, self._decode_key = fns, key
        return self._decode_fns

    def _decode_step(self, idx: Tensor, cache: KVCache, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        """`forward` for one new token per row (B, 1) with a KV cache: the same math on (B, C) rows, without
        module calls, transposes or per-step allocations beyond the activations; logits (B, 1, V)."""
        B = idx.shape[0]
        H, Hkv, D = self.config.n_head, self.n_kv_head, self.head_dim
        fns = self._decode_matmuls()
        past = cache.length
        x = self.tok_emb(idx.view(B))
        for i, block in enumerate(self.blocks):
            wqkv, wo, w13, w2 = fns[4 * i: 4 * i + 4]
            qkv = wqkv(block.attn_norm(x)).view(B, H + 2 * Hkv, D)
            qk = apply_rope(qkv[:, : H + Hkv], cos, sin)
            k, v = cache.update(i, qk[:, H:, None], qkv[:, H + Hkv:, None])
            y = _decode_attention(qk[:, :H, None], k, v, mask, Hkv)
            x = x + wo(y.view(B, H * D))
            gate, up = w13(block.mlp_norm(x)).chunk(2, dim=-1)
            x = x + w2(F.silu(gate) * up)
        cache.length = past + 1
        return fns[-1](self.norm(x)).view(B, 1, -1)

    # -- losses and likelihood ----------------------------------------------------------
    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Mean next-token cross-entropy over the batch's target tokens (positions labelled -100 do not count);
        0 when there are none. The trainer weights it by `loss_tokens`, so a step's loss is the mean over all
        its tokens, however they fall into micro-batches and processes."""
        ids = batch["input_ids"].to(self.tok_emb.weight.device)
        targets = batch.get("labels", ids)[:, 1:].to(ids.device)
        logits = self(ids[:, :-1])
        total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        return {"loss": total / self.loss_tokens(batch).clamp(min=1)}

    @staticmethod
    def loss_tokens(batch: dict[str, Any]) -> Tensor:
        """How many target tokens `training_losses` averages over in `batch` (labels other than -100)."""
        targets = batch.get("labels", batch["input_ids"])[:, 1:]
        return (targets != -100).sum()

    def log_likelihood(self, x: Tensor, cond: Any = None) -> Tensor:
        """log p(x_1..x_T | x_0) in nats per sequence, exact by the chain rule."""
        logits = self(x[:, :-1]).float()
        logp = logits.log_softmax(-1).gather(-1, x[:, 1:, None])[..., 0]
        return logp.sum(-1)

    @torch.no_grad()
    def validation_metrics(self, val_data: Any) -> dict[str, float]:
        """Mean next-token loss over non-overlapping blocks of the held-out data, and perplexity exp(loss)."""
        was_training = self.training
        self.eval()
        total, count = 0.0, 0
        for batch in val_data.iter_eval_batches(16):
            ids = batch["input_ids"].to(self.tok_emb.weight.device)
            targets = batch.get("labels", ids)[:, 1:].to(ids.device)
            logits = self(ids[:, :-1]).float()
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((targets != -100).sum())
        self.train(was_training)
        if count == 0:
            raise GenlabError("the validation data is shorter than one block; lower model.block_size")
        val_loss = total / count
        return {"val_loss": val_loss, "ppl": math.exp(min(val_loss, 50.0))}

    # -- trainer hooks --------------------------------------------------------------------
    @classmethod
    def build(cls, config: GPTConfig, dataset: Any) -> GPT:
        """Load `init_from`, or train (or read) the tokenizer on the training text and size the vocabulary."""
        if config.init_from:
            model = cls.from_pretrained(config.init_from)
            model.config = replace(model.config, sft=config.sft, dropout=config.dropout, init_from=config.init_from)
            return model
        if config.tokenizer_file:
            tok = Tokenizer.from_file(config.tokenizer_file)
        else:
            text = dataset.text
            if config.sft:
                from genlab.data.chat import conversation_text

                text = conversation_text(text)
            tok = train_tokenizer(text, config.tokenizer, config.vocab, "model.vocab")
        return cls(replace(config, vocab_size=tok.vocab_size), tokenizer=tok)

    def prepare_data(self, dataset: Any) -> Any:
        """Token windows of block_size + 1 (every offset is one item), or masked chat examples when `sft`."""
        tok = self._require_tokenizer()
        if self.config.sft:
            from genlab.data.chat import ChatData

            return ChatData.from_jsonl(dataset.text, tok, self.config.block_size)
        return TokenBlocks(encode_text(tok, dataset.text), self.config.block_size)

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: torch.Generator | None = None, **opts: Any) -> Tensor:
        """`n` continuations of the prompt `cond` (text; default: from BOS), as token ids (n, T) after the prompt."""
        from genlab.sampling.text import GenerationConfig, generate

        tok = self._require_tokenizer()
        prompt = tok.encode(cond or "", bos=True)
        out = generate(self, [prompt] * n, GenerationConfig(**opts), generator=generator)
        width = max(len(s) for s in out.tokens)
        ids = torch.full((n, width), tok.pad_id, dtype=torch.long)
        for i, s in enumerate(out.tokens):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return ids

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        """A text file of 4 samples from BOS (temperature 0.8, top-p 0.95)."""
        from genlab.sampling.text import GenerationConfig, generate

        tok = self._require_tokenizer()
        was_training = self.training
        self.eval()
        gen = GenerationConfig(max_new_tokens=self.config.preview_tokens, temperature=0.8, top_p=0.95)
        out = generate(self, [[tok.bos_id]] * 4, gen, generator=generator)
        self.train(was_training)
        path = Path(stem).with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        sep = "\n" + "-" * 40 + "\n"
        path.write_text(sep.join(tok.decode(s) for s in out.tokens) + "\n", encoding="utf-8")
        return [path]

    # -- the model folder -------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """config.json + model.safetensors + tokenizer.json."""
        d = super().save_pretrained(directory, state_dict)
        self._require_tokenizer().save(d / TOKENIZER_NAME)
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> GPT:
        """A genlab GPT folder, a Hugging Face Llama folder (as written by `genlab export --to hf`), or a LoRA
        adapter folder on either."""
        from genlab.models.lora import is_adapter_folder

        if is_adapter_folder(directory):
            return super().from_pretrained(directory, map_location)
        d, meta = read_model_meta(directory)
        if meta.get("model_type") == "llama":
            return cls._from_llama_folder(d, meta, map_location)
        return super().from_pretrained(d, map_location)

    @classmethod
    def _from_llama_folder(cls, d: Path, hf: dict[str, Any], map_location: str | torch.device) -> GPT:
        """A Hugging Face Llama folder (config `hf`, a genlab tokenizer.json) as a GPT, fusing the projections again."""
        rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
        if rope.get("rope_type", "default") != "default":
            raise GenlabError(f"{d} uses RoPE scaling {rope.get('rope_type')!r}; only the default RoPE is supported")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise GenlabError(f"{d} has attention or MLP biases, which genlab's GPT does not have")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
            raise GenlabError(f"{d} has head_dim * heads != hidden_size, which genlab's GPT does not support")
        tie = bool(hf.get("tie_word_embeddings", False))
        tok = Tokenizer.from_file(d / TOKENIZER_NAME)
        config = GPTConfig(
            vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], n_embd=hf["hidden_size"],
            ffn_hidden=hf["intermediate_size"], rope_theta=float(rope.get("rope_theta", 10000.0)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=tie,
            tokenizer=tokenizer_kind(tok),
        )
        model = cls(config, tokenizer=tok)
        sd = load_weights(d / WEIGHTS_NAME, "cpu")
        try:
            with torch.no_grad():
                model.tok_emb.weight.copy_(sd["model.embed_tokens.weight"])
                model.norm.weight.copy_(sd["model.norm.weight"])
                if not tie:
                    model.lm_head.weight.copy_(sd["lm_head.weight"])
                for i, b in enumerate(model.blocks):
                    p = f"model.layers.{i}."
                    b.attn_norm.weight.copy_(sd[p + "input_layernorm.weight"])
                    b.attn.wqkv.weight.copy_(torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
                    b.attn.wo.weight.copy_(sd[p + "self_attn.o_proj.weight"])
                    b.mlp_norm.weight.copy_(sd[p + "post_attention_layernorm.weight"])
                    b.mlp.w13.weight.copy_(torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]))
                    b.mlp.w2.weight.copy_(sd[p + "mlp.down_proj.weight"])
        except (KeyError, RuntimeError) as e:
            raise GenlabError(f"{d / WEIGHTS_NAME} does not fit its Llama config ({e})") from None
        return model.to(map_location)

    @classmethod
    def from_folder_config(cls, config: GPTConfig, directory: Path) -> GPT:
        """The model with the folder's tokenizer.json."""
        return cls(config, tokenizer=Tokenizer.from_file(directory / TOKENIZER_NAME))

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise GenlabError("this model has no tokenizer: build it from data or load it from a model folder")
        return self.tokenizer


def _drop_tied_head(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: Any) -> None:
    state_dict.pop(prefix + "lm_head.weight", None)


def _restore_tied_head(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    if prefix + "tok_emb.weight" in state_dict:
        state_dict.setdefault(prefix + "lm_head.weight", state_dict[prefix + "tok_emb.weight"])


def encode_text(tok: Tokenizer, text: str) -> Tensor:
    """BOS followed by the tokens of `text` (encoded in parallel, in pieces split at line ends)."""
    from genlab.data.tokenizer import _chunks

    ids = [tok.bos_id]
    for piece in tok.encode_batch(_chunks(text)):
        ids.extend(piece)
    return torch.tensor(ids, dtype=torch.long)


class TokenBlocks:
    """Windows of `block_size + 1` tokens of one long token stream; item i starts at token i."""

    def __init__(self, ids: Tensor, block_size: int) -> None:
        if len(ids) <= block_size:
            raise GenlabError(f"the text has {len(ids)} tokens, fewer than model.block_size={block_size} + 1; "
                              "lower block_size or use more text")
        self.ids = ids
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.ids) - self.block_size

    def get_batch(self, indices: Tensor | list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"input_ids": self.ids[idx[:, None] + torch.arange(self.block_size + 1)]}

    def iter_eval_batches(self, batch_size: int):
        """Non-overlapping windows covering the stream once (for validation loss)."""
        starts = torch.arange(0, len(self.ids) - self.block_size, self.block_size)
        for i in range(0, len(starts), batch_size):
            yield self.get_batch(starts[i: i + batch_size])
