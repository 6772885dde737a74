"""CLIP's hard negatives (NegCLIP, Yuksekgonul et al. 2023): the loss against explicit log-softmax sums, the negative
captions against the ground truth of `shapes` (a negative never describes its scene), and the recipe checks."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from test_clip import TINY, toy_dataset

from genlab.data import shapes as S
from genlab.errors import GenlabError
from genlab.models.clip import CLIP, CLIPConfig, contrastive_loss, hard_negative

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = [list(S.SHAPES), [S.plural(s) for s in S.SHAPES], list(S.COLOR_NAMES)]


def test_loss_with_hard_negatives_against_explicit_sums():
    """Image i against every caption and every existing hard negative; caption i against every image."""
    g = torch.Generator().manual_seed(3)
    img, txt, neg = (F.normalize(torch.randn(5, 4, generator=g), dim=-1) for _ in range(3))
    valid = torch.tensor([True, False, True, True, False])
    s = 9.0
    sim, sim_neg = s * img @ txt.t(), s * img @ neg.t()
    rows = -sum(sim[i, i] - torch.logsumexp(torch.cat([sim[i], sim_neg[i][valid]]), 0) for i in range(5)) / 5
    cols = -sum(sim[i, i] - torch.logsumexp(sim[:, i], 0) for i in range(5)) / 5
    torch.testing.assert_close(contrastive_loss(img, txt, torch.tensor(s), neg, valid), (rows + cols) / 2)
    none = torch.zeros(5, dtype=torch.bool)  # no negative exists: the plain loss
    torch.testing.assert_close(contrastive_loss(img, txt, torch.tensor(s), neg, none),
                               contrastive_loss(img, txt, torch.tensor(s)))


def _objects(caption: str) -> Counter:
    """(color, shape) of every object a canonical `shapes` caption names, read back with a regular expression."""
    out: Counter = Counter()
    plurals = {S.plural(s): s for s in S.SHAPES}
    colors, shapes = "|".join(S.COLOR_NAMES), "|".join([*S.SHAPES, *plurals])
    for count, color, shape in re.findall(rf"\b(?:(two|three) )?({colors}) ({shapes})\b", caption):
        out[(color, plurals.get(shape, shape))] += {"two": 2, "three": 3}.get(count, 1)
    return out


def test_negatives_of_shapes_captions_never_describe_the_scene():
    """For canonical captions made from each scene's ground truth, the negative names other objects (or binds colors
    to other shapes), keeps every other word, and its articles agree with the word after them."""
    ds = S.shapes("train", n=400, seed=5)
    rng = random.Random(0)
    kinds = Counter()
    for caption, scene in zip(ds.canonical, ds.scenes, strict=True):
        truth = Counter((o.color, o.shape) for o in scene.objects)
        assert _objects(caption) == truth, caption  # the reader agrees with the ground truth
        for _ in range(4):
            neg = hard_negative(caption, GROUPS, rng)
            assert neg is not None and neg != caption
            assert _objects(neg) != truth, (caption, neg)
            a, b = caption.split(), neg.split()
            assert len(a) == len(b)
            diff = [i for i, (u, v) in enumerate(zip(a, b, strict=True)) if u != v and {u, v} != {"a", "an"}]
            assert len(diff) in (1, 2), (caption, neg)
            assert all(any(a[i].strip(",") in g and b[i].strip(",") in g for g in GROUPS) for i in diff)
            kinds[len(diff)] += 1
            for i, w in enumerate(b[:-1]):
                if w in ("a", "an"):
                    assert w == ("an" if b[i + 1][0] in "aeiou" else "a"), neg
    assert kinds[1] > 100 and kinds[2] > 100  # both replacements and swaps are drawn


def test_negative_cases_written_out():
    rng = random.Random(0)
    assert hard_negative("a white background", GROUPS, rng) is None
    # same shape twice: exchanging the colors would keep the meaning, so only replacements are drawn
    for _ in range(20):
        neg = hard_negative("a blue diamond and an orange diamond", GROUPS, rng)
        assert neg is not None and _objects(neg) != _objects("a blue diamond and an orange diamond")
    swaps = {hard_negative("an orange heart and a green square", GROUPS, rng) for _ in range(60)}
    assert "a green heart and an orange square" in swaps  # the binding swap, articles fixed
    assert "An orange circle" in {hard_negative("A red circle", [["red", "orange"]], rng) for _ in range(3)}


def test_training_losses_use_the_drawn_negatives():
    """The model's loss equals contrastive_loss over the negatives drawn from the same seed."""
    groups = [["red", "green", "blue", "yellow"]]
    torch.manual_seed(0)
    model = CLIP.build(CLIPConfig(image_tower="cnn", hard_negatives=groups, cnn_channels=8,
                                  **{**TINY, "vision_layers": 2}), toy_dataset())
    batch = model.prepare_data(toy_dataset()).get_batch(torch.arange(8))
    torch.manual_seed(7)
    loss = model.training_losses(batch)["loss"]
    torch.manual_seed(7)
    rng = random.Random(int(torch.randint(2**31, ())))
    negs = [hard_negative(t, groups, rng) for t in batch["text"]]
    assert all(n is not None and n != t for n, t in zip(negs, batch["text"], strict=True))
    with torch.no_grad():
        img, txt, scale = model(batch["x"], batch["input_ids"])
        expected = contrastive_loss(img, txt, scale, model.encode_text(negs), torch.ones(8, dtype=torch.bool))
    torch.testing.assert_close(loss.detach(), expected)
    assert loss.item() > contrastive_loss(img, txt, scale).item()  # more negatives, a larger loss


@pytest.mark.parametrize("groups", [[["circle"]], [["circle", "two words"]], "circle", [["circle", 3]]])
def test_bad_hard_negative_groups_are_refused(groups):
    with pytest.raises(GenlabError, match="hard_negatives"):
        CLIP.build(CLIPConfig(hard_negatives=groups, **TINY), toy_dataset())
