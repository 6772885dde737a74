"""Exponential moving average of model weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA:
    """Polyak averaging of parameters: shadow <- decay * shadow + (1 - decay) * param.

    With `warmup`, the decay at update `step` is min(decay, (1 + step) / (10 + step)) (the TensorFlow
    `ExponentialMovingAverage(num_updates=...)` rule, as in Ho et al. 2020's DDPM code), so early weights
    are forgotten quickly. Shadows are float32 and keyed by parameter name; tied parameters share one shadow.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.shadow: dict[str, Tensor] = {k: p.detach().float().clone() for k, p in self.params.items()}
        # every name a parameter is reachable under (tied weights appear more than once in the state dict)
        self.aliases = {k: k for k in self.params}
        first = {id(p): k for k, p in self.params.items()}
        for k, p in model.named_parameters(remove_duplicate=False):
            self.aliases.setdefault(k, first[id(p)])

    def decay_at(self, step: int) -> float:
        """The decay used for update number `step` (0-based)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current parameters into the shadows."""
        beta = self.decay_at(step)
        shadows = list(self.shadow.values())
        params = [self.params[k].detach().float() for k in self.shadow]
        torch._foreach_lerp_(shadows, params, 1.0 - beta)

    def state_dict(self) -> dict[str, Tensor]:
        """The shadows (one per distinct parameter), for checkpoints."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise KeyError(f"EMA state does not match the model ({len(set(state) ^ set(self.shadow))} names differ)")
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def model_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """`model.state_dict()` with every parameter replaced by its average (buffers as they are); no shared memory."""
        sd = model.state_dict()
        out = {}
        for k, v in sd.items():
            src = self.shadow[self.aliases[k]] if k in self.aliases else v
            out[k] = src.detach().to(dtype=v.dtype, device="cpu", copy=True)
        return out

    @contextmanager
    def average_parameters(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the model (for previews and validation)."""
        with torch.no_grad():
            saved = {k: p.detach().clone() for k, p in self.params.items()}
            for k, p in self.params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(saved[k])
