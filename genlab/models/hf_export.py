"""Export a genlab GPT to a Hugging Face Llama folder (`GPT.from_pretrained` reads such a folder back).

The architectures are the same (RoPE with rotate_half, RMSNorm, SwiGLU, no biases); export renames tensors
and splits the fused q/k/v and gate/up projections. The folder loads as it is in
`transformers.LlamaForCausalLM.from_pretrained` and `PreTrainedTokenizerFast.from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from genlab.data.tokenizer import ASSISTANT, BOS, END, EOS, PAD, TOKENIZER_NAME
from genlab.errors import GenlabError
from genlab.models.base import CONFIG_NAME, WEIGHTS_NAME
from genlab.models.gpt import GPT

# the chat template of genlab.data.chat, in Jinja for transformers' apply_chat_template
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '"
    + END + "' }}{% endfor %}{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)


def hf_config(model: GPT) -> dict:
    """The `config.json` of the equivalent `LlamaForCausalLM`."""
    c, tok = model.config, model.tokenizer
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": model.blocks[0].mlp.w2.in_features,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": model.n_kv_head,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": tok.bos_id,
        "eos_token_id": [tok.eos_id, tok.end_id],
        "pad_token_id": tok.pad_id,
        "dtype": "float32",
    }


def to_hf_state_dict(model: GPT) -> dict[str, Tensor]:
    """genlab parameter names -> Llama names, fused projections split."""
    c = model.config
    q_dim, kv_dim = c.n_head * model.head_dim, model.n_kv_head * model.head_dim
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight}
    if not c.tie_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = b.attn.wqkv.weight.split([q_dim, kv_dim, kv_dim])
        gate, up = b.mlp.w13.weight.chunk(2)
        sd |= {
            p + "input_layernorm.weight": b.attn_norm.weight,
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": b.attn.wo.weight,
            p + "post_attention_layernorm.weight": b.mlp_norm.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": b.mlp.w2.weight,
        }
    return {k: v.detach().float().contiguous().cpu() for k, v in sd.items()}


def export_hf(model: GPT, directory: str | Path) -> Path:
    """Write config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json."""
    tok = model.tokenizer
    if tok is None:
        raise GenlabError("the model has no tokenizer to export")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_NAME).write_text(json.dumps(hf_config(model), indent=2))
    save_file(to_hf_state_dict(model), str(d / WEIGHTS_NAME), metadata={"format": "pt"})
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": [tok.eos_id, tok.end_id], "pad_token_id": tok.pad_id}
    (d / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tok.save(d / TOKENIZER_NAME)
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model.config.block_size, "padding_side": "left", "chat_template": CHAT_TEMPLATE,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return d
