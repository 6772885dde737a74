"""A tiny test-only family ("toy"): an MLP denoising autoencoder on flattened images.

It uses the global torch RNG in `training_losses` and `validation_metrics` (so resume and RNG isolation are
observable), records the item indices it trained on, and can sleep per step or turn its loss into NaN.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.data.images import save_grid
from genlab.models.base import GenerativeModel, ModelConfig
from genlab.registry import MODELS


@dataclass
class ToyConfig(ModelConfig):
    hidden: int = 16
    shape: list[int] | None = None  # (C, H, W), filled from the data by build
    noise: float = 0.5  # std of the corruption; 0 makes the loss deterministic
    step_sleep: float = 0.0  # seconds per training_losses call (to make a run slow enough to kill)
    nan_after: int = 0  # calls after which the loss is NaN (0: never)


class IndexedData:
    """The dataset, with each batch carrying the indices it was drawn from."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(self, indices: Tensor) -> dict[str, Any]:
        return {**self.dataset.get_batch(indices), "index": torch.as_tensor(indices)}


@MODELS.register("toy")
class Toy(GenerativeModel):
    family = "toy"
    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        dim = math.prod(config.shape)
        self.net = nn.Sequential(nn.Linear(dim, config.hidden), nn.SiLU(), nn.Linear(config.hidden, dim))
        self.calls = 0
        self.seen: list[int] = []

    @classmethod
    def build(cls, config: ToyConfig, dataset: Any) -> Toy:
        return cls(replace(config, shape=list(dataset.get_batch([0])["x"].shape[1:])))

    def prepare_data(self, dataset: Any) -> IndexedData:
        return IndexedData(dataset)

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        self.calls += 1
        if self.config.step_sleep:
            time.sleep(self.config.step_sleep)
        if "index" in batch:
            self.seen.extend(batch["index"].tolist())
        mse = self.denoising_mse(batch["x"])
        loss = mse * float("nan") if self.config.nan_after and self.calls > self.config.nan_after else mse
        return {"loss": loss, "mse": mse.detach()}

    def denoising_mse(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return F.mse_loss(self.net(x + self.config.noise * torch.randn_like(x)), x)

    def validation_metrics(self, val_data: Any) -> dict[str, float]:
        return {"val_loss": float(self.denoising_mse(val_data.dataset.get_batch(torch.arange(16))["x"]))}

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: torch.Generator | None = None, **opts: Any) -> Tensor:
        dim = int(torch.tensor(self.config.shape).prod())
        z = torch.randn(n, dim, generator=generator, device=self.net[0].weight.device)
        return self.net(z).clamp(-1, 1).reshape(n, *self.config.shape)

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        return [save_grid(self.sample(sample_cfg.n, generator=generator), Path(stem).with_suffix(".png"))]


@MODELS.register("toy2")
class TwoOptimizerToy(Toy):
    """Two optimizers (one per layer) stepped in turn by the family's own `train_step`, as a GAN's would be."""

    family = "toy2"

    def configure_optimizers(self, train_cfg: Any) -> list[torch.optim.Optimizer]:
        return [torch.optim.AdamW(layer.parameters(), lr=train_cfg.lr) for layer in (self.net[0], self.net[2])]

    def train_step(self, batch: dict[str, Any], optimizers: list[Any], accelerator: Any, objective: Any
                   ) -> dict[str, Tensor]:
        out = {}
        for i, opt in enumerate(optimizers):
            self.zero_grad(set_to_none=True)
            losses = objective(batch)
            accelerator.backward(losses["loss"])
            opt.step()
            out[f"loss_{i}"] = losses["loss"].detach()
        return {"loss": out["loss_1"], **out}


RECIPE = {
    "name": "toy",
    "family": "toy",
    "data": {"name": "mnist", "max_items": 64},
    "model": {"hidden": 16},
    "train": {"steps": 12, "batch_size": 8, "lr": 1e-2, "warmup_steps": 3, "ckpt_every": 3, "log_every": 2,
              "ema_decay": 0.9, "keep_last": 5},
    "sample": {"n": 4},
}


def write_recipe(folder: Path) -> Path:
    """The toy recipe as a YAML file in `folder` (runs go to `folder/runs`)."""
    import yaml

    path = Path(folder) / "toy.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "out_dir": str(Path(folder) / "runs")}))
    return path


def toy_config(folder: Path, *overrides: str) -> Any:
    """The toy recipe with `--set`-style overrides, validated like the CLI does."""
    from genlab.config import load_run_config

    return load_run_config(str(write_recipe(folder)), list(overrides))
