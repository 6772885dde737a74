"""Instruction data for image-to-text models, made from the per-object ground truth of `shapes` (LLaVA's GPT-assisted
instructions, Liu et al. 2023 section 3, replaced by templates over exact ground truth).

Each image gives its caption (objects left to right; a relation stated with "left of" or "above") and
questions with short answers of four kinds: color ("What color is the star?" -> "red"), shape ("What shape is
the red object?" -> "star"), count ("How many objects are there?", "How many stars are there?" -> "two") and
position ("Where is the red star relative to the blue circle?" -> "left of", asked only where one axis of the
centres' offset is at least 1.5x the other, as the dataset's stated relations are). A question names only
objects it singles out (a color or shape the image has once). `answer_matches` / `token_f1` score answers, a caption
against every caption of the same content (any order of the objects, a relation or its mirror).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from genlab.data.shapes import (
    COLOR_NAMES,
    INVERSE,
    NUMBER_WORDS,
    RELATION_RATIO,
    RELATIONS,
    SHAPES,
    Scene,
    canonical_caption,
    plural,
)
from genlab.errors import GenlabError

CAPTION_PROMPT = "Describe the image."
KINDS = ("caption", "color", "shape", "count", "position")
COUNT_WORDS = {0: "zero", **NUMBER_WORDS}


def caption(scene: Scene) -> str:
    """The scene's caption in one order: objects left to right; a relation as "left of" or "above"."""
    objs = scene.objects
    if scene.kind == "relation" and scene.relation is not None:
        i, rel, j = scene.relation
        if rel in ("right of", "below"):
            i, rel, j = j, INVERSE[rel], i
        return canonical_caption("relation", [(objs[i].color, objs[i].shape), (objs[j].color, objs[j].shape)], rel)
    order = sorted(objs, key=lambda o: (o.center[0], o.center[1]))
    return canonical_caption(scene.kind, [(o.color, o.shape) for o in order])


def equivalent_captions(scene: Scene) -> set[str]:
    """Every canonical caption of the scene's content: any order of its objects; a relation or its mirror."""
    objs = scene.objects
    if scene.kind == "relation" and scene.relation is not None:
        i, rel, j = scene.relation
        a, b = (objs[i].color, objs[i].shape), (objs[j].color, objs[j].shape)
        return {canonical_caption("relation", [a, b], rel), canonical_caption("relation", [b, a], INVERSE[rel])}
    pairs = [(o.color, o.shape) for o in objs]
    return {canonical_caption(scene.kind, list(p)) for p in itertools.permutations(pairs)}


def _relation(a: Any, b: Any) -> str | None:
    """Where a's centre is relative to b's when one axis dominates by RELATION_RATIO, else None (ambiguous)."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dx) >= RELATION_RATIO * abs(dy):
        return "left of" if dx < 0 else "right of"
    if abs(dy) >= RELATION_RATIO * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def all_questions(scene: Scene) -> list[tuple[str, str, str]]:
    """Every (question, answer, kind) the scene's ground truth answers unambiguously."""
    objs = scene.objects
    out: list[tuple[str, str, str]] = []
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    for o in objs:
        if shapes.count(o.shape) == 1:
            out.append((f"What color is the {o.shape}?", o.color, "color"))
        if colors.count(o.color) == 1:
            out.append((f"What shape is the {o.color} object?", o.shape, "shape"))
    out.append(("How many objects are there?", COUNT_WORDS[len(objs)], "count"))
    for s in SHAPES:
        out.append((f"How many {plural(s)} are there?", COUNT_WORDS[shapes.count(s)], "count"))
    unique = [o for o in objs if sum((p.color, p.shape) == (o.color, o.shape) for p in objs) == 1]
    for a, b in itertools.permutations(unique, 2):
        rel = _relation(a, b)
        if rel is not None:
            out.append((f"Where is the {a.color} {a.shape} relative to the {b.color} {b.shape}?", rel, "position"))
    return out


def sample_questions(scene: Scene, k: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Up to `k` questions of the scene, each kind drawn in turn (color, shape, count, position), uniformly within a
    kind, so that every kind is trained about equally often; absent shapes get no more than one count question."""
    by_kind: dict[str, list[tuple[str, str, str]]] = {kind: [] for kind in KINDS[1:]}
    for q in all_questions(scene):
        by_kind[q[2]].append(q)
    present = [q for q in by_kind["count"] if q[1] != "zero"]
    absent = [q for q in by_kind["count"] if q[1] == "zero"]
    by_kind["count"] = present + ([absent[int(rng.integers(len(absent)))]] if absent else [])
    order = [kind for kind in rng.permutation(list(by_kind)) if by_kind[kind]]
    out: list[tuple[str, str, str]] = []
    while len(out) < k and any(by_kind[kind] for kind in order):
        for kind in order:
            pool = by_kind[kind]
            if pool and len(out) < k:
                out.append(pool.pop(int(rng.integers(len(pool)))))
    return out


def scenes_of(dataset: Any) -> list[Scene] | None:
    """The per-object ground truth of a dataset (`shapes`), or None where it has none."""
    scenes = getattr(dataset, "scenes", None)
    return list(scenes) if scenes is not None else None


def image_conversations(dataset: Any, stage: int, questions_per_image: int, captions_per_image: int,
                        seed: int) -> list[tuple[int, str, str, str]]:
    """(image index, question, answer, kind) for every training example: stage 1 one caption per image; stage 2
    `questions_per_image` questions and `captions_per_image` captions per image."""
    scenes = scenes_of(dataset)
    if scenes is None:
        captions = getattr(dataset, "captions", None)
        if stage == 2:
            raise GenlabError(f"stage 2 makes questions from per-object ground truth, which dataset "
                              f"{dataset.info.name!r} has not; train stage 2 on shapes")
        if not captions:
            raise GenlabError(f"dataset {dataset.info.name!r} has no captions to learn from (an image folder takes "
                              "them from metadata.jsonl or .txt files beside the images)")
        return [(i, CAPTION_PROMPT, str(c), "caption") for i, c in enumerate(captions)]
    if stage == 1:
        return [(i, CAPTION_PROMPT, caption(s), "caption") for i, s in enumerate(scenes)]
    out = []
    for i, s in enumerate(scenes):
        rng = np.random.default_rng([seed, i])
        out += [(i, CAPTION_PROMPT, caption(s), "caption")] * captions_per_image
        out += [(i, q, a, kind) for q, a, kind in sample_questions(s, questions_per_image, rng)]
    return out


def training_texts(dataset: Any, n: int = 5000) -> str:
    """Text a tokenizer is trained on: the captions and questions of (up to) `n` images, and every word the
    templates can produce (colors, shapes and their plurals, counts, relations)."""
    scenes = scenes_of(dataset)
    if scenes is None:
        captions = getattr(dataset, "captions", None) or []
        return "\n".join([CAPTION_PROMPT, *map(str, captions)]) + "\n"
    lines = [CAPTION_PROMPT]
    for s in scenes[:n]:
        lines.append(caption(s))
        lines += [f"{q} {a}" for q, a, _ in all_questions(s)]
    words = [*COLOR_NAMES, *SHAPES, *map(plural, SHAPES), *COUNT_WORDS.values(), *RELATIONS]
    return "\n".join(lines + words) + "\n"


def normalize(text: str) -> str:
    """Lower case, single spaces, no final period: how answers are compared."""
    return " ".join(text.lower().replace(".", " ").replace(",", " , ").split())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the word multisets of two texts (SQuAD's token F1, Rajpurkar et al. 2016)."""
    p, r = normalize(prediction).split(), normalize(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, references: set[str] | list[str]) -> tuple[bool, float]:
    """Exact match against any reference (after `normalize`) and the best token F1 among them."""
    refs = [normalize(r) for r in references]
    return normalize(prediction) in refs, max(token_f1(prediction, r) for r in refs)
