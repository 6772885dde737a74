"""Does a generated image show a taught concept? A small CNN (`features.ConvNet`) trained on rendered ground truth to
tell a new shape of `shapes.NOVEL_SHAPES` from the seven known `shapes.SHAPES`: DreamBooth's subject fidelity
(Ruiz et al. 2023, sec. 4.1) read by a classifier, as Shapes-GenEval reads prompt adherence.

Training images are single objects of every shape (the concept included) in every color and both sizes, drawn by
the `shapes` renderer at 32 px, a share of them blurred and noised as generated images are soft (the Shapes-GenEval
reader's `degrade`). `share(images)` is the fraction of images the classifier calls the concept.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genlab.data import shapes as S
from genlab.errors import GenlabError
from genlab.eval.features import ConvNet, train_heads
from genlab.eval.geneval import degrade


@dataclass(frozen=True)
class ConceptRecipe:
    """How the concept classifier is trained."""

    concept: str = "arrow"  # one of shapes.NOVEL_SHAPES
    image_size: int = 32
    per_class: int = 400  # training renders of each shape (the validation split has a quarter as many)
    width: int = 16
    feature_dim: int = 64
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    degrade_p: float = 0.5  # share of renders blurred and noised, as generated images are soft
    max_blur: float = 1.0  # Gaussian blur sigma, uniform in [0.2, max_blur] pixels
    max_pixel_noise: float = 8.0  # pixel noise std, uniform in [0, this] levels of 255
    seed: int = 0


def concept_classes(concept: str) -> tuple[str, ...]:
    """The classifier's classes: the known shapes, then the concept."""
    if concept not in S.NOVEL_SHAPES:
        raise GenlabError(f"concept {concept!r} is not a new shape; choose one of: {', '.join(S.NOVEL_SHAPES)}")
    return (*S.SHAPES, concept)


def concept_renders(recipe: ConceptRecipe, split: str = "train") -> tuple[Tensor, Tensor]:
    """(images in [-1, 1] (N, 3, H, W), class ids): `per_class` single objects of each class (a quarter as many
    for split "val"), each in a uniform color and size at a place `shapes.place` picks."""
    classes = concept_classes(recipe.concept)
    n = recipe.per_class if split == "train" else recipe.per_class // 4
    images, labels = [], []
    for k, shape in enumerate(classes):
        for i in range(n):
            rng = random.Random(f"concept:{recipe.seed}:{split}:{shape}:{i}")
            color = S.COLOR_NAMES[min(int(rng.random() * len(S.COLOR_NAMES)), len(S.COLOR_NAMES) - 1)]
            img = S.render_scene(S.place([(color, shape)], rng), recipe.image_size)
            if rng.random() < recipe.degrade_p:
                img = degrade(img, rng.uniform(0.2, recipe.max_blur) * recipe.image_size / 32,
                              rng.uniform(0, recipe.max_pixel_noise), rng.getrandbits(32))
            images.append(img)
            labels.append(k)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, torch.tensor(labels)


class ConceptClassifier:
    """A trained classifier over `classes` (the known shapes, then the concept)."""

    def __init__(self, net: ConvNet, classes: tuple[str, ...], meta: dict[str, Any]) -> None:
        self.net, self.classes, self.meta = net.eval(), classes, meta

    @property
    def concept(self) -> str:
        return self.classes[-1]

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Class ids of images in [-1, 1] (B, 3, H, W) at the classifier's size."""
        size = self.meta.get("image_size", images.shape[-1])
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != size or images.shape[-2] != size:
            raise GenlabError(f"the concept classifier reads (B, 3, {size}, {size}) images, not {tuple(images.shape)}")
        return torch.cat([self.net(images[i: i + 256].float()).argmax(1) for i in range(0, len(images), 256)])

    def share(self, images: Tensor) -> float:
        """The fraction of `images` the classifier calls the concept."""
        return float((self.predict(images) == len(self.classes) - 1).float().mean())


def train_concept_classifier(recipe: ConceptRecipe | None = None, progress: bool = False) -> ConceptClassifier:
    """Train on renders; `meta` has the validation accuracy, the concept's recall and the share of known shapes
    called the concept (its false-positive rate), all on held-out renders."""
    recipe = recipe or ConceptRecipe()
    classes = concept_classes(recipe.concept)
    torch.manual_seed(recipe.seed)
    t0 = time.monotonic()
    x, y = concept_renders(recipe, "train")
    vx, vy = concept_renders(recipe, "val")
    net = ConvNet(3, recipe.image_size, len(classes), recipe.width, recipe.feature_dim)
    train_heads(net, x, (y,), (len(classes),), epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                generator=torch.Generator().manual_seed(recipe.seed), name="concept classifier", progress=progress)
    clf = ConceptClassifier(net, classes, {"image_size": recipe.image_size})
    pred = clf.predict(vx)
    concept = len(classes) - 1
    clf.meta.update({
        "recipe": asdict(recipe), "classes": list(classes), "train_images": len(x), "val_images": len(vx),
        "val_accuracy": float((pred == vy).float().mean()),
        "val_concept_recall": float((pred[vy == concept] == concept).float().mean()),
        "val_known_called_concept": float((pred[vy != concept] == concept).float().mean()),
        "train_seconds": round(time.monotonic() - t0, 1),
    })
    return clf
