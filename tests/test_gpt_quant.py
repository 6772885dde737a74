"""Int8 linear layers: quantization error within the absmax bound, and a quantized GPT still decodes."""

from __future__ import annotations

import pytest
import torch
from test_gpt import tiny_gpt

from genlab.nn.quant import Int8Linear, quantize_int8
from genlab.sampling.text import GenerationConfig, generate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_int8_linear_error_is_within_the_rounding_bound():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    q = Int8Linear(lin.weight)
    # weights: each entry within half a quantization step of its row
    step_w = lin.weight.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantized_weight() - lin.weight).abs() <= step_w / 2 + 1e-7).all()
    x = torch.randn(5, 64)
    with torch.no_grad():
        y, ref = q(x), lin(x)
    # |x W^T - x_hat W_hat^T| <= sum_k |x_k||dW_k| + |dx_k||W_hat_k| with |dW| <= s_w/2, |dx| <= s_x/2
    s_x = x.abs().amax(1, keepdim=True) / 127
    bound = x.abs().sum(1, keepdim=True) * step_w.T / 2 + s_x / 2 * q.dequantized_weight().abs().sum(1)[None]
    assert ((y - ref).abs() <= bound + 1e-5).all()
    assert (y - ref).abs().max() > 0  # it really is quantized


def test_quantized_model_keeps_most_greedy_tokens():
    model = tiny_gpt(std=0.2)
    p = model.tokenizer.encode("the quick", bos=True)
    cfg = GenerationConfig(max_new_tokens=16, temperature=0, stop_token_ids=[])
    ref = generate(model, [p], cfg).tokens[0]
    quantize_int8(model)
    assert isinstance(model.blocks[0].attn.wqkv, Int8Linear) and isinstance(model.lm_head, Int8Linear)
    out = generate(model, [p], cfg).tokens[0]
    assert out[:4] == ref[:4]
