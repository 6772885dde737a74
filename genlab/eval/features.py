"""Feature networks trained by genlab: the embedding every sample-quality metric is computed in.

No Inception weights exist offline, so each dataset gets its own network, trained on its train split
and cached under `$GENLAB_CACHE/features/<dataset>-<size>-<hash>/` (safetensors + json). The hash covers the
data bytes and the recipe (hyperparameters + `RECIPE_VERSION`), so a metric that names the hash can
only be compared with metrics computed in the very same features.

- labelled data (MNIST digits, emoji categories): a small CNN classifier; `features` is its penultimate
  layer (before the ReLU), centred and scaled to unit mean variance on the train split, `logits` its output
  (used by the Inception-style score);
- unlabelled images: a contrastive encoder (SimCLR, Chen et al. 2020, NT-Xent loss eq. 1) of the same trunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from genlab.config import DataConfig
from genlab.data import ImageDataset, load_dataset
from genlab.errors import GenlabError
from genlab.files import atomic_path, write_atomic
from genlab.models.base import load_weights

# bump when the network, the training loop or the preprocessing changes: it invalidates every cached network
RECIPE_VERSION = 2


@dataclass
class FeatureRecipe:
    """How a feature network is trained; every field enters the cache hash."""

    width: int = 16  # channels of the first conv block (the second has 2x)
    feature_dim: int = 128
    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    max_shift: int = 2  # random translation (pixels) as augmentation
    hflip: bool = False  # random horizontal flips (emoji; never digits)
    temperature: float = 0.2  # NT-Xent temperature (contrastive encoders only)
    seed: int = 0


def default_recipe(dataset: str, labelled: bool) -> FeatureRecipe:
    """The recipe genlab uses for a dataset: digits get shifts only, emoji and unlabelled images flips too."""
    if dataset == "mnist":
        return FeatureRecipe()
    if labelled:
        return FeatureRecipe(epochs=30, hflip=True, max_shift=3)
    return FeatureRecipe(epochs=40, hflip=True, max_shift=3, batch_size=256)


class ConvNet(nn.Module):
    """Two VGG-style blocks (conv-BN-ReLU x2, max-pool), a linear feature layer and a linear head."""

    def __init__(self, in_channels: int, image_size: int, num_outputs: int, width: int, feature_dim: int) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.trunk = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = image_size // 4
        self.fc = nn.Linear(2 * width * side * side, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(feature_dim, num_outputs))
        # set after training: features are centred and scaled to unit mean variance on the train split
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(()))

    def raw_features(self, x: Tensor) -> Tensor:
        return self.fc(self.trunk(x))

    def features(self, x: Tensor) -> Tensor:
        return (self.raw_features(x) - self.feature_mean) / self.feature_std

    def logits_from_features(self, f: Tensor) -> Tensor:
        return self.head(f * self.feature_std + self.feature_mean)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.raw_features(x))


class FeatureNetwork(nn.Module):
    """A trained, frozen feature network with its provenance (`name`, `hash`, `test_accuracy`).

    Inputs are images in [-1, 1], (B, C, H, W); images of another side are resized (bilinear, antialiased)
    to the network's own `image_size`, and that resize is recorded in `describe()`.
    `forward` returns features, and `num_features` is set, so it plugs into torchmetrics' FID/KID.
    """

    def __init__(self, net: ConvNet, meta: dict[str, Any]) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.meta = meta
        self.num_features: int = meta["feature_dim"]
        self.weights_digest = weights_digest(net)

    @property
    def name(self) -> str:
        return f"genlab-{self.meta['kind']}-{self.meta['dataset']}"

    @property
    def hash(self) -> str:
        return self.meta["hash"]

    @property
    def test_accuracy(self) -> float | None:
        return self.meta.get("test_accuracy")

    def describe(self) -> dict[str, Any]:
        """What a metric result records about the features it was computed in."""
        keys = ("kind", "dataset", "hash", "image_size", "channels", "feature_dim", "test_accuracy", "recipe_version")
        return {"name": self.name, **{k: self.meta.get(k) for k in keys}, "weights": self.weights_digest}

    def preprocess(self, x: Tensor) -> Tensor:
        """Check channels and value range, resize to the network's side."""
        if x.ndim != 4:
            raise GenlabError(f"feature network {self.name} takes (B, C, H, W) images, got shape {tuple(x.shape)}")
        c, size = self.meta["channels"], self.meta["image_size"]
        if x.shape[1] != c:
            raise GenlabError(
                f"feature network {self.name} takes {c}-channel images, got {x.shape[1]}: "
                f"evaluate against a dataset with {x.shape[1]} channels"
            )
        x = x.float()
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feature_dim) penultimate-layer activations."""
        return self.net.features(self.preprocess(x))

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, num_classes) class logits (classifiers only)."""
        if self.meta["kind"] != "classifier":
            raise GenlabError(f"{self.name} is a contrastive encoder and has no class logits; use a labelled dataset")
        return self.net(self.preprocess(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    @torch.no_grad()
    def embed(self, images: Tensor, batch_size: int = 1000, with_logits: bool = False,
              progress: bool = False) -> tuple[Tensor, Tensor | None]:
        """Features (and logits) of many images, in batches; float32 on the CPU."""
        feats, logits = [], []
        bar = tqdm(total=len(images), desc="features", unit="img", disable=not progress, leave=False)
        for i in range(0, len(images), batch_size):
            h = self.net.features(self.preprocess(images[i : i + batch_size]))
            bar.update(len(h))
            feats.append(h.float().cpu())
            if with_logits and self.meta["kind"] == "classifier":
                logits.append(self.net.logits_from_features(h).float().cpu())
        bar.close()
        f = torch.cat(feats) if feats else torch.zeros(0, self.num_features)
        return f, (torch.cat(logits) if logits else None)

    @torch.no_grad()
    def classify(self, images: Tensor, batch_size: int = 1000) -> Tensor:
        """Predicted class index of each image (long)."""
        return torch.cat([self.logits(images[i : i + batch_size]).argmax(-1) for i in range(0, len(images),
                                                                                             batch_size)])


def weights_digest(net: nn.Module) -> str:
    """sha256 (16 hex digits) of the network's tensors: the same recipe trained on another machine may differ in
    the last bits, and this says whether two results used the very same weights."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """`$GENLAB_CACHE`, default `~/.cache/genlab`."""
    return Path(os.environ.get("GENLAB_CACHE", "~/.cache/genlab")).expanduser()


def data_hash(ds: ImageDataset) -> str:
    """sha256 of the images (uint8 bytes, shape) and labels of a dataset split."""
    h = hashlib.sha256()
    h.update(str(tuple(ds.images.shape)).encode())
    h.update(ds.images.contiguous().numpy().tobytes())
    if ds.labels is not None:
        h.update(ds.labels.numpy().tobytes())
    return h.hexdigest()


def _recipe_hash(train_hash: str, data: DataConfig, recipe: FeatureRecipe, kind: str) -> str:
    blob = json.dumps({"data": train_hash, "name": data.name, "image_size": data.image_size, "label": data.label,
                       "kind": kind, "recipe": asdict(recipe), "version": RECIPE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _as_config(data: DataConfig | str, image_size: int | None) -> DataConfig:
    cfg = DataConfig(name=data) if isinstance(data, str) else DataConfig(**asdict(data))
    if image_size is not None:
        cfg.image_size = image_size
    cfg.split, cfg.max_items = "train", None
    return cfg


def get_feature_network(data: DataConfig | str, image_size: int | None = None, retrain: bool = False,
                        progress: bool = True) -> FeatureNetwork:
    """The feature network of a dataset: loaded from the cache, or trained on its train split and cached."""
    cfg = _as_config(data, image_size)
    train = load_dataset(cfg, split="train")
    if not isinstance(train, ImageDataset):
        raise GenlabError(f"dataset {cfg.name!r} is text; feature networks exist for image data only")
    labelled = train.labels is not None and train.info.num_classes > 1
    kind = "classifier" if labelled else "contrastive"
    recipe = default_recipe(cfg.name, labelled)
    digest = _recipe_hash(data_hash(train), cfg, recipe, kind)
    slug = Path(cfg.name).name or "data"
    folder = cache_dir() / "features" / f"{slug}-{cfg.image_size or train.info.image_size}-{digest}"
    if not retrain and (folder / "meta.json").is_file():
        return load_feature_network(folder)
    test = _test_split(cfg) if labelled else None
    net, meta = train_feature_network(train, test, recipe, kind, progress=progress)
    meta.update(hash=digest, dataset=cfg.name, recipe=asdict(recipe), recipe_version=RECIPE_VERSION)
    save_feature_network(net, meta, folder)
    return FeatureNetwork(net, meta)


def _test_split(cfg: DataConfig) -> ImageDataset | None:
    try:
        ds = load_dataset(cfg, split="test")
    except GenlabError:
        return None  # image folders have no test split
    return ds if isinstance(ds, ImageDataset) and len(ds) > 0 else None


def save_feature_network(net: ConvNet, meta: dict[str, Any], folder: Path) -> None:
    """Write `model.safetensors` then `meta.json` (the json is written last: it marks the folder complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    write_atomic(folder / "meta.json", json.dumps(meta, indent=2))


def load_feature_network(folder: str | Path) -> FeatureNetwork:
    """Load a feature network folder written by `save_feature_network`."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GenlabError(f"{folder} is not a feature network folder ({e}); delete it to retrain") from None
    net = _build(meta)
    net.load_state_dict(load_weights(folder / "model.safetensors"))
    return FeatureNetwork(net, meta)


def _build(meta: dict[str, Any]) -> ConvNet:
    r = meta["recipe"]
    return ConvNet(meta["channels"], meta["image_size"], meta["num_outputs"], r["width"], r["feature_dim"])


def augment(x: Tensor, recipe: FeatureRecipe, g: torch.Generator) -> Tensor:
    """Random translation by up to `max_shift` pixels (border pixels replicated) and optional horizontal flips."""
    b, _, h, w = x.shape
    s = recipe.max_shift
    if s > 0:
        pad = F.pad(x, (s, s, s, s), mode="replicate")
        dy = torch.randint(0, 2 * s + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * s + 1, (b,), generator=g)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        x = pad[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if recipe.hflip:
        flip = torch.rand(b, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's normalized-temperature cross entropy (Chen et al. 2020, eq. 1) over 2B views."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


@torch.no_grad()
def accuracy(net: ConvNet, ds: ImageDataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy of a classifier on a labelled split."""
    net.eval()
    correct = 0
    for i in range(0, len(ds), batch_size):
        b = ds.get_batch(torch.arange(i, min(i + batch_size, len(ds))))
        correct += int((net(b["x"]).argmax(-1) == b["label"]).sum())
    return correct / len(ds)


@torch.no_grad()
def set_feature_normalization(net: ConvNet, train: ImageDataset, batch_size: int = 1000) -> None:
    """Centre the features on the train split and scale them to unit mean variance (one scalar, so the geometry
    FID and KID see is kept while their magnitudes become comparable across datasets)."""
    raw = torch.cat([net.raw_features(train.get_batch(torch.arange(i, min(i + batch_size, len(train))))["x"])
                     for i in range(0, len(train), batch_size)]).double()
    net.feature_mean.copy_(raw.mean(0).float())
    net.feature_std.copy_(raw.var(0).mean().sqrt().float())


def train_feature_network(train: ImageDataset, test: ImageDataset | None, recipe: FeatureRecipe, kind: str,
                          progress: bool = True) -> tuple[ConvNet, dict[str, Any]]:
    """Train a classifier (cross entropy) or a contrastive encoder (NT-Xent) with AdamW + one-cycle LR."""
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    c, size = train.images.shape[1], train.images.shape[-1]
    if size % 4:
        raise GenlabError(f"feature networks need an image side divisible by 4, got {size}; set data.image_size")
    num_outputs = train.info.num_classes if kind == "classifier" else 128
    net = ConvNet(c, size, num_outputs, recipe.width, recipe.feature_dim)
    steps_per_epoch = max(1, len(train) // recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total, pct_start=0.2)
    t0 = time.time()
    bar = tqdm(total=total, desc=f"training {kind} on {train.info.name}", unit="step", disable=not progress)
    net.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(train), generator=g)
        for i in range(steps_per_epoch):
            batch = train.get_batch(perm[i * recipe.batch_size : (i + 1) * recipe.batch_size])
            if kind == "classifier":
                loss = F.cross_entropy(net(augment(batch["x"], recipe, g)), batch["label"])
            else:
                x = batch["x"]
                loss = nt_xent(net(augment(x, recipe, g)), net(augment(x, recipe, g)), recipe.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    net.eval()
    set_feature_normalization(net, train)
    meta: dict[str, Any] = {
        "kind": kind, "channels": c, "image_size": size, "num_outputs": num_outputs,
        "feature_dim": recipe.feature_dim, "train_size": len(train), "train_seconds": round(time.time() - t0, 1),
        "class_names": train.info.class_names if kind == "classifier" else [],
        "test_accuracy": accuracy(net, test) if test is not None else None,
        "test_size": len(test) if test is not None else 0,
    }
    return net, meta


def train_heads(net: nn.Module, x: Tensor, labels: tuple[Tensor, ...], heads: tuple[int, ...], *, epochs: int,
                batch_size: int, lr: float, generator: torch.Generator,
                augment: Callable[[Tensor, torch.Generator], Tensor] | None = None, name: str = "classifier",
                progress: bool = False) -> nn.Module:
    """Fit `net` on in-memory images `x`: the loss is the sum of one cross entropy per head (consecutive slices of
    the logits, `heads` their sizes, `labels` their targets), AdamW (weight decay 1e-4) with a one-cycle LR over
    `epochs` passes, each in an order drawn from `generator` (which `augment(batch, generator)` may also use)."""
    if len(heads) != len(labels) or sum(heads) < 1:
        raise GenlabError(f"train_heads needs one label tensor per head, got {len(labels)} for {len(heads)} heads")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-len(x) // batch_size))
    starts = [sum(heads[:k]) for k in range(len(heads))]
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = perm[i: i + batch_size]
            xb = x[idx] if augment is None else augment(x[idx], generator)
            logits = net(xb)
            loss = sum(F.cross_entropy(logits[:, s: s + n], y[idx]) for s, n, y in zip(starts, heads, labels))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            print(f"{name} epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return net.eval()


def classify(images: Tensor, dataset: str = "mnist") -> Tensor:
    """Class index of each image by the dataset's genlab classifier (e.g. digits for MNIST samples)."""
    return get_feature_network(dataset, image_size=None, progress=False).classify(images)
