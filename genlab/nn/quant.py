"""Int8 linear layers for CPU inference: per-output-channel int8 weights, per-token int8 activations.

y = (s_x * s_w) * (q_x @ q_w^T), with q_w = round(W / s_w), s_w = max|W_row| / 127 and q_x = round(x / s_x),
s_x = max|x_token| / 127 (absmax quantization as in LLM.int8(), Dettmers et al. 2022, eq. 1-3, without the
outlier decomposition). The product runs as an int8 x int8 -> int32 matrix multiply; weights take a quarter of
the memory of float32, which is what bounds decoding one token at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights and dynamically quantized int8 inputs."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("weight_t", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).t()
                             .contiguous())
        self.register_buffer("weight_scale", scale)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        s_x = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        q_x = torch.round(x2 / s_x).to(torch.int8)
        y = torch._int_mm(q_x, self.weight_t).float() * s_x * self.weight_scale
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> Tensor:
        """The float weight this layer represents, W_hat = s_w * q_w."""
        return self.weight_t.t().float() * self.weight_scale[:, None]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every bias-free `nn.Linear` in `model` (in place) by an `Int8Linear`; returns the model."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and child.bias is None:
            setattr(model, name, Int8Linear(child.weight))
        else:
            quantize_int8(child)
    return model
