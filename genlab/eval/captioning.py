"""Captioning and visual question answering on `shapes`: exact match and token F1 per question kind, on images of
seen compositions (the test split) and of held-out ones (the heldout split).

Every image is asked for its caption and up to `questions` questions drawn from its ground truth
(`genlab.data.instructions`), answered greedily up to the end token. A caption counts as exact when it equals any
caption of the same content (objects in any order, a relation or its mirror); its F1 is the best among those.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from genlab.data.instructions import CAPTION_PROMPT, KINDS, caption, equivalent_captions, sample_questions, score
from genlab.data.shapes import shapes
from genlab.errors import GenlabError

SPLITS = {"seen": "test", "heldout": "heldout"}


def caption_items(scenes: list[Any], questions: int, seed: int) -> list[tuple[int, str, set[str], str]]:
    """(image index, question, references, kind): every image's caption, then its questions (seeded per image)."""
    items = []
    for i, s in enumerate(scenes):
        items.append((i, CAPTION_PROMPT, equivalent_captions(s) | {caption(s)}, "caption"))
        rng = np.random.default_rng([seed, 7, i])
        items += [(i, q, {a}, kind) for q, a, kind in sample_questions(s, questions, rng)]
    return items


@torch.no_grad()
def evaluate_split(model: Any, split: str, n: int, questions: int = 4, seed: int = 0, batch_size: int = 256,
                   examples: int = 5) -> dict[str, Any]:
    """Exact match and token F1 of `model`'s answers on the first `n` images of a `shapes` split, overall (every
    answer) and per kind, with the count of answers and a few wrong ones."""
    image_size = model.image_shape[-1]
    ds = shapes(split=split, image_size=image_size, n=n)
    items = caption_items(list(ds.scenes), questions, seed)
    was_training = model.training
    model.eval()
    z = model.patch_features(ds.images.float().div(127.5).sub(1.0))
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        idx = torch.tensor([i for i, _, _, _ in chunk])
        answers += model.answer_features(z[idx], [q for _, q, _, _ in chunk])
    model.train(was_training)
    per: dict[str, dict[str, Any]] = {k: {"n": 0, "exact": 0.0, "f1": 0.0} for k in KINDS}
    wrong: list[dict[str, str]] = []
    for (i, q, refs, kind), a in zip(items, answers):
        exact, f1 = score(a, refs)
        per[kind]["n"] += 1
        per[kind]["exact"] += exact
        per[kind]["f1"] += f1
        if not exact and len(wrong) < examples:
            wrong.append({"image": str(i), "question": q, "answer": a, "expected": sorted(refs)[0]})
    total = sum(p["n"] for p in per.values())
    out: dict[str, Any] = {
        "split": split, "images": n, "answers": total,
        "exact": sum(p["exact"] for p in per.values()) / total, "f1": sum(p["f1"] for p in per.values()) / total,
    }
    for kind, p in per.items():
        if p["n"]:
            out[kind] = {"n": p["n"], "exact": p["exact"] / p["n"], "f1": p["f1"] / p["n"]}
    out["wrong_examples"] = wrong
    return out


def evaluate_captioner(model: Any, n: int, questions: int = 4, seed: int = 0) -> dict[str, Any]:
    """`evaluate_split` on seen (test) and held-out compositions, timed."""
    if not 1 <= n <= 5000:
        raise GenlabError(f"--n {n}: the shapes test and heldout splits have 5,000 images each; give 1..5000")
    t0 = time.monotonic()
    result = {name: evaluate_split(model, split, n, questions, seed) for name, split in SPLITS.items()}
    return {"caption_eval": result, "caption_eval_seconds": round(time.monotonic() - t0, 1)}


def caption_table(result: dict[str, Any]) -> str:
    """A Markdown table: rows are the kinds (and overall), columns exact / F1 on seen and held-out images."""
    res = result["caption_eval"]
    lines = ["| answers | " + " | ".join(f"{s} exact | {s} F1 | {s} n" for s in res) + " |",
             "|---" * (1 + 3 * len(res)) + "|"]
    for kind in ("overall", *KINDS):
        cells = []
        for r in res.values():
            row = r if kind == "overall" else r.get(kind)
            n = r["answers"] if kind == "overall" else (row or {}).get("n", 0)
            cells += ([f"{row['exact']:.1%}", f"{row['f1']:.3f}", str(n)] if row else ["-", "-", "0"])
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
