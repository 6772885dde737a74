"""What a CLIP model's embeddings are worth: zero-shot classification with prompt templates (Radford et al. 2021,
sec. 3.1.4), image-text retrieval recall@k (CLIP_benchmark's rule: every item whose caption is identical is a
positive), the attribute-binding test (a caption against the same caption with two objects' colors swapped), and
CLIP score (Hessel et al. 2021, eq. 1, as torchmetrics computes it: max(100 * mean cos(E_I, E_C), 0)).

Every function takes embeddings or a model with `encode_text` / `encode_image` (L2-normalized outputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.errors import GenlabError

BATCH = 256


@torch.no_grad()
def embed_texts(model: Any, texts: Sequence[str], batch: int = BATCH) -> Tensor:
    """Unit-length text embeddings (N, D) on the CPU, in batches."""
    if not texts:
        raise GenlabError("no texts to embed")
    return torch.cat([model.encode_text(list(texts[i: i + batch])).float().cpu()
                      for i in range(0, len(texts), batch)])


@torch.no_grad()
def embed_images(model: Any, images: Tensor, batch: int = BATCH) -> Tensor:
    """Unit-length image embeddings (N, D) on the CPU of images (N, C, H, W) in [-1, 1], in batches."""
    if len(images) == 0:
        raise GenlabError("no images to embed")
    return torch.cat([model.encode_image(images[i: i + batch]).float().cpu() for i in range(0, len(images), batch)])


def zeroshot_classifier(model: Any, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """One weight vector per class (K, D): the normalized mean of the normalized embeddings of every template
    filled with the class name (Radford et al. 2021, sec. 3.1.4, prompt ensembling)."""
    if not templates or any("{}" not in t for t in templates):
        raise GenlabError("each prompt template must hold '{}' where the class name goes, e.g. 'a photo of a {}'")
    texts = [t.format(c) for c in classnames for t in templates]
    emb = embed_texts(model, texts).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def zeroshot_predict(image_emb: Tensor, classifier: Tensor) -> Tensor:
    """The class (N,) whose weight vector has the highest cosine with each image."""
    return (image_emb @ classifier.t()).argmax(1)


def positives_of(queries: Sequence[str], keys: Sequence[str]) -> Tensor:
    """(Q, K) bool: key j is a positive of query i when their captions are identical (CLIP_benchmark)."""
    ids: dict[str, int] = {}
    q = torch.tensor([ids.setdefault(s, len(ids)) for s in queries])
    k = torch.tensor([ids.setdefault(s, len(ids)) for s in keys])
    return q[:, None] == k[None, :]


def recall_at_k(scores: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Share of queries (rows of `scores`) with at least one positive among their k best-scoring keys."""
    out = {}
    order = scores.argsort(dim=1, descending=True, stable=True)
    for k in ks:
        top = order[:, : min(k, scores.shape[1])]
        out[k] = float(positives.gather(1, top).any(1).float().mean())
    return out


def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, captions: Sequence[str],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k of N (image, caption) pairs; any item whose caption is identical
    to the query's own counts as a positive."""
    if not len(image_emb) == len(text_emb) == len(captions):
        raise GenlabError(f"{len(image_emb)} images, {len(text_emb)} texts and {len(captions)} captions; give one "
                          "caption per image")
    pos = positives_of(captions, captions)
    scores = image_emb @ text_emb.t()
    i2t = recall_at_k(scores, pos, ks)
    t2i = recall_at_k(scores.t(), pos.t(), ks)
    return {**{f"image_retrieval_r@{k}": v for k, v in t2i.items()},
            **{f"text_retrieval_r@{k}": v for k, v in i2t.items()}}


def binding_accuracy(image_emb: Tensor, caption_emb: Tensor, swapped_emb: Tensor) -> float:
    """Share of images closer to their own caption than to the caption with its two objects' colors swapped."""
    own = (image_emb * caption_emb).sum(-1)
    swapped = (image_emb * swapped_emb).sum(-1)
    return float((own > swapped).float().mean())


def clip_score(image_emb: Tensor, text_emb: Tensor) -> float:
    """max(100 * mean_i cos(E_I_i, E_C_i), 0) over image-caption pairs, as torchmetrics' `CLIPScore` computes it."""
    if image_emb.shape != text_emb.shape:
        raise GenlabError(f"{len(image_emb)} images and {len(text_emb)} prompts: CLIP score needs one prompt per image")
    cos = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return max(float(100 * cos.mean()), 0.0)


def clip_score_of(model: Any, images: Tensor, prompts: Sequence[str]) -> float:
    """CLIP score of images (N, C, H, W) in [-1, 1] against their prompts in `model`'s embedding space."""
    return clip_score(embed_images(model, images), embed_texts(model, prompts))
