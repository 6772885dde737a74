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


# -- `genlab eval --metrics zeroshot,retrieval,binding,clip_score` ------------------------------------------------
CLIP_METRICS = ("zeroshot", "retrieval", "binding", "clip_score")
EMBEDDING_METRICS = ("zeroshot", "retrieval", "binding")  # measure a CLIP model itself
TEMPLATES = ("{}", "an image of {}", "{} on a white background")  # the phrasings of shapes' captions
GENERIC_TEMPLATES = ("{}", "an image of {}", "a picture of {}")


def check_clip_metrics(model: Any, metrics: Sequence[str], clip: str | None) -> None:
    """Refuse, before any work, CLIP metrics the model cannot be measured with (by its declared capabilities)."""
    from genlab.models.base import Conditioning, Output

    own = [m for m in metrics if m in EMBEDDING_METRICS]
    if own and model.output is not Output.EMBEDDING:
        raise GenlabError(f"{','.join(own)} measure a CLIP model, but this {model.family} model outputs "
                          f"{model.output.value}; leave them out of --metrics")
    if "clip_score" in metrics and model.output is Output.IMAGE:
        if Conditioning.TEXT not in model.conditioning:
            raise GenlabError(f"clip_score compares images with their prompts, but this {model.family} model takes no "
                              f"text ({model.takes()}); leave clip_score out of --metrics")
        if clip is None:
            raise GenlabError("clip_score of a text-to-image model needs a CLIP to score with: --clip MODEL")
    elif "clip_score" in metrics and model.output is not Output.EMBEDDING:
        raise GenlabError(f"clip_score measures images or a CLIP model, but this {model.family} model outputs "
                          f"{model.output.value}; leave clip_score out of --metrics")


def load_clip(path: str, device: str = "cpu") -> Any:
    """A CLIP (any model that outputs embeddings) from a model or run folder."""
    from genlab.models.base import Output, load_model_folder

    model = load_model_folder("--clip", path, "a CLIP model folder (a model that outputs embeddings)",
                              lambda m: m.output is Output.EMBEDDING, map_location=device)
    return model.to(device).eval()


def split_captions(data: str, split: str, n: int) -> list[str]:
    """The captions of a split's first `n` items (cycled when it holds fewer): the prompts of clip_score."""
    from genlab.data import load_dataset

    ds = load_dataset(data, split=split)
    captions = list(ds.captions or [])
    if not captions:
        raise GenlabError(f"dataset {data!r} has no captions to prompt with; clip_score needs captioned data")
    return [captions[i % len(captions)] for i in range(n)]


def _fit(clip: Any, images: Tensor) -> Tensor:
    """Images resized (bilinear, antialiased) to the CLIP's input side when they differ."""
    C, H, W = clip.image_shape
    if images.shape[1] != C:
        raise GenlabError(f"the images have {images.shape[1]} channels but the CLIP reads {C}")
    if images.shape[-2:] != (H, W):
        images = F.interpolate(images.float(), size=(H, W), mode="bilinear", antialias=True, align_corners=False)
    return images


def evaluate_clip(model: Any, data: str, split: str, metrics: Sequence[str], *, n: int, retrieval_n: int = 1000,
                  clip: Any = None, images: Tensor | None = None, prompts: Sequence[str] | None = None
                  ) -> dict[str, Any]:
    """The CLIP metrics asked for: zero-shot, retrieval and binding of the CLIP `model` on `data` (for `shapes`: on
    its seen `test` and held-out `heldout` splits), and clip_score of generated `images` with their `prompts` in
    `clip` (or, for a CLIP `model`, of the split's first `n` real images with their captions)."""
    from genlab.data import load_dataset

    out: dict[str, Any] = {}
    own = [m for m in metrics if m in EMBEDDING_METRICS]
    if own:
        out |= shapes_benchmark(model, own, retrieval_n) if data == "shapes" else \
            _generic_benchmark(model, load_dataset(data, split=split), own, retrieval_n)
    if "clip_score" in metrics:
        scorer = clip if clip is not None else model
        if images is None:  # a CLIP model: the real split's images with their captions, the reference figure
            ds = load_dataset(data, split=split)
            m = min(n, len(ds))
            batch = ds.get_batch(torch.arange(m))
            images, prompts = batch["x"], batch.get("text")
            if prompts is None:
                raise GenlabError(f"dataset {data!r} has no captions; clip_score needs captioned data")
            out["clip_score_of"] = f"{m} real {split} images with their captions"
        else:
            out["clip_score_of"] = f"{len(images)} generated images with their prompts"
        out["clip_score"] = clip_score_of(scorer, _fit(scorer, images), list(prompts))
    return out


def _generic_benchmark(model: Any, ds: Any, metrics: Sequence[str], retrieval_n: int) -> dict[str, Any]:
    """Zero-shot over the dataset's class names and retrieval over its captions (binding needs shapes)."""
    if "binding" in metrics:
        raise GenlabError(f"binding swaps two objects' colors in a caption: it needs the ground truth of `shapes`, "
                          f"which {ds.info.name!r} has not; leave binding out of --metrics")
    out: dict[str, Any] = {}
    x_all = lambda idx: _fit(model, ds.get_batch(idx)["x"])  # noqa: E731
    if "zeroshot" in metrics:
        if not ds.info.class_names:
            raise GenlabError(f"dataset {ds.info.name!r} has no class names to classify into; leave zeroshot out")
        labels = ds.get_batch(torch.arange(len(ds)))["label"]
        classifier = zeroshot_classifier(model, ds.info.class_names, GENERIC_TEMPLATES)
        pred = zeroshot_predict(embed_images(model, x_all(torch.arange(len(ds)))), classifier)
        out["zeroshot"] = {"accuracy": float((pred == labels).float().mean()), "n": len(ds),
                           "classes": len(ds.info.class_names), "templates": list(GENERIC_TEMPLATES)}
    if "retrieval" in metrics:
        m = min(retrieval_n, len(ds))
        batch = ds.get_batch(torch.arange(m))
        if batch.get("text") is None:
            raise GenlabError(f"dataset {ds.info.name!r} has no captions to retrieve; leave retrieval out")
        emb_i, emb_t = embed_images(model, _fit(model, batch["x"])), embed_texts(model, batch["text"])
        out["retrieval"] = {**retrieval_metrics(emb_i, emb_t, batch["text"]), "n": m}
    return out


def shapes_benchmark(model: Any, metrics: Sequence[str], retrieval_n: int = 1000) -> dict[str, Any]:
    """On shapes' `test` (seen compositions) and `heldout` splits: zero-shot over the 70 color x shape classes
    (single-object scenes; held-out: those of a held-out pair), the binding test on two-object scenes of two colors
    and two shapes (canonical caption against the same caption with the colors swapped), and retrieval over the
    first `retrieval_n` scenes with their canonical captions (identical captions are positives)."""
    from genlab.data import shapes as S

    size = model.image_shape[-1]
    out: dict[str, Any] = {}
    classifier = None
    for split in ("test", "heldout"):
        ds = S.shapes(split, image_size=size if size in S.IMAGE_SIZES else None)
        res: dict[str, Any] = {}
        if "zeroshot" in metrics:
            if classifier is None:
                names = [S.noun_phrase(c, s) for c, s in S.ALL_PAIRS]
                classifier = zeroshot_classifier(model, names, TEMPLATES)
            idx = [i for i, sc in enumerate(ds.scenes) if sc.kind == "single" and
                   ((sc.objects[0].color, sc.objects[0].shape) in S.HELDOUT_PAIRS) == (split == "heldout")]
            labels = torch.tensor([S.ALL_PAIRS.index((ds.scenes[i].objects[0].color, ds.scenes[i].objects[0].shape))
                                   for i in idx])
            pred = zeroshot_predict(embed_images(model, _fit(model, ds.get_batch(idx)["x"])), classifier)
            res["zeroshot"] = float((pred == labels).float().mean())
            res["zeroshot_n"] = len(idx)
        if "binding" in metrics:
            idx, own, swapped = [], [], []
            for i, sc in enumerate(ds.scenes):
                if sc.kind not in ("pair", "relation"):
                    continue
                pairs = [(o.color, o.shape) for o in sc.objects]
                if sc.relation is not None:
                    pairs = [pairs[sc.relation[0]], pairs[sc.relation[2]]]
                (c1, s1), (c2, s2) = pairs
                if c1 == c2 or s1 == s2:
                    continue
                rel = sc.relation[1] if sc.relation else None
                idx.append(i)
                own.append(S.canonical_caption(sc.kind, pairs, rel))
                swapped.append(S.canonical_caption(sc.kind, [(c2, s1), (c1, s2)], rel))
            emb = embed_images(model, _fit(model, ds.get_batch(idx)["x"]))
            res["binding"] = binding_accuracy(emb, embed_texts(model, own), embed_texts(model, swapped))
            res["binding_n"] = len(idx)
        if "retrieval" in metrics:
            m = min(retrieval_n, len(ds))
            captions = ds.canonical[:m]
            emb_i = embed_images(model, _fit(model, ds.get_batch(torch.arange(m))["x"]))
            res |= {**retrieval_metrics(emb_i, embed_texts(model, captions), captions), "retrieval_n": m}
        out[{"test": "seen", "heldout": "heldout"}[split]] = res
    return {"shapes_clip": out}


def shapes_table(result: dict[str, Any]) -> str:
    """The shapes CLIP figures as a Markdown table (rows: seen, heldout)."""
    cols = [("zero-shot", "zeroshot"), ("binding", "binding"), ("image R@1", "image_retrieval_r@1"),
            ("image R@5", "image_retrieval_r@5"), ("text R@1", "text_retrieval_r@1"),
            ("text R@5", "text_retrieval_r@5")]
    rows = result["shapes_clip"]
    used = [(name, key) for name, key in cols if any(key in r for r in rows.values())]
    lines = ["| split | " + " | ".join(n for n, _ in used) + " |", "|---" * (len(used) + 1) + "|"]
    for split, r in rows.items():
        lines.append(f"| {split} | " + " | ".join(f"{100 * r[k]:.1f}%" if k in r else "" for _, k in used) + " |")
    return "\n".join(lines)
