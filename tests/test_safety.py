"""The serve guardrails without a server: the prompt filter's normalisation and matching (prompts that must pass and
must be refused, bypass attempts through case, Unicode forms that NFKC folds, zero-width characters and
punctuation), the concept list, and the concept checker against cosines computed by hand."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from genlab.errors import GenlabError
from genlab.serve import safety
from genlab.serve.safety import Concept, ConceptChecker, PromptFilter, normalize, parse_concepts, request_texts

pytestmark = pytest.mark.usefixtures("one_thread")

RULES = "# shapes we do not draw\nred star\nheart\n  \n"


@pytest.fixture(scope="module")
def pf() -> PromptFilter:
    return PromptFilter.parse(RULES)


BLOCKED = [
    "a red star", "A RED STAR", "a Red Star left of a blue circle", "red star",
    "a \uff52\uff45\uff44 \uff53\uff54\uff41\uff52",  # full-width letters
    "\U0001d42b\U0001d41e\U0001d41d \U0001d42c\U0001d42d\U0001d41a\U0001d42b",  # mathematical bold
    "\uff32\uff25\uff24\u3000\uff33\uff34\uff21\uff32",  # full-width capitals, ideographic space
    "a red\u200b star", "a r\u00aded star",  # zero-width space, soft hyphen
    "a red, star", "a red-star", "a red...star!", "a red\n\tstar", "redstar", "a RedStar",
    "a r.e.d s.t.a.r", "a r e d s t a r", "a r-e-d-s-t-a-r",
    "two hearts? no: one heart", "\u210cEART",  # black-letter capital H folds to h
]
ALLOWED = [
    "a red circle", "a blue star", "a red square and a blue star", "hired starlet", "sweetheart", "red stars",
    "a red starfish", "heartbeat", "", "   ", "a s t a r",
]


@pytest.mark.parametrize("text", BLOCKED)
def test_filter_refuses_rules_however_they_are_written(pf, text):
    found = pf.match(text, "prompt")
    assert found is not None, (text, normalize(text))
    assert found.rule in ("red star", "heart")
    assert found.line == (2 if found.rule == "red star" else 3)
    assert repr(found.rule) in found.message() and "prompt" in found.message()


@pytest.mark.parametrize("text", ALLOWED)
def test_filter_lets_other_words_pass(pf, text):
    assert pf.match(text) is None, (text, normalize(text))


def test_normalize_against_its_definition():
    assert normalize("  Ｆｕｌｌ\u2003width—and ﬁ ligature!  ") == "full width and fi ligature"
    assert normalize("İstanbul") == normalize("i\u0307stanbul")  # casefold then NFKC again
    assert normalize("a\u200bb\u2060c") == "abc"  # format characters vanish rather than split a word


def test_filter_list_errors():
    with pytest.raises(GenlabError, match="no rule"):
        PromptFilter.parse("# only a comment\n\n")
    with pytest.raises(GenlabError, match="line 2"):
        PromptFilter.parse("ok\n!!!\n")


def test_request_texts_cover_images_completions_and_chat():
    raw = {"prompt": ["a", 3, "b"], "negative_prompt": "c",
           "messages": [{"role": "user", "content": "d"},
                        {"role": "user", "content": [{"type": "text", "text": "e"}, {"type": "image_url"}]}]}
    assert [t for _, t in request_texts(raw)] == ["a", "b", "c", "d", "e"]
    assert list(request_texts("not a dict")) == []


def test_concept_list_parsing():
    assert parse_concepts("# c\nred star = 0.8\na = b = -0.5\n") == [Concept("red star", 0.8), Concept("a = b", -0.5)]
    for bad in ("red star", "red star = 2", "= 0.5", "x = nan", ""):
        with pytest.raises(GenlabError):
            parse_concepts(bad)


class FixedClip:
    """Embeddings given in advance: the checker's arithmetic against cosines computed by hand."""

    image_shape = (3, 4, 4)

    def __init__(self, texts: dict[str, torch.Tensor]) -> None:
        self.texts = texts

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(torch.stack([self.texts[t] for t in texts]), dim=-1)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.mean((2, 3)), dim=-1)  # the mean colour as the embedding


def test_checker_blocks_by_each_concepts_threshold_and_blacks_out_the_image():
    clip = FixedClip({"red": torch.tensor([1.0, 0, 0]), "blue": torch.tensor([0, 0, 1.0])})
    checker = ConceptChecker(clip, [Concept("red", 0.9), Concept("blue", 0.99)])
    colours = torch.tensor([[1.0, 0.1, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 1.0], [0.05, 0.05, 1.0]])
    images = colours[:, :, None, None].expand(-1, -1, 4, 4).clone()
    want = F.normalize(colours, dim=-1) @ torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]).t()  # by hand
    assert torch.allclose(checker.cosines(images), want)
    screened, verdicts = checker.screen(images)
    blocked = [(want[i] > torch.tensor([0.9, 0.99])).any().item() for i in range(4)]
    assert [v.blocked for v in verdicts] == blocked == [True, True, False, True]
    assert [v.concept for v in verdicts] == ["red", "blue", None, "blue"]
    assert torch.equal(screened[~torch.tensor(blocked)], images[~torch.tensor(blocked)])
    assert (screened[torch.tensor(blocked)] == safety.BLOCKED_FILL).all()
    gray = images[:, :1]  # a one-channel model's images reach a colour CLIP as gray
    assert checker.cosines(gray).shape == (4, 2)


def test_configure_writes_the_rules_into_the_data_folder_and_removes_them(tmp_path):
    rules = tmp_path / "rules.txt"
    rules.write_text(RULES)
    assert safety.configure(tmp_path / "data", str(rules), None, None) == {"prompt_filter": RULES}
    assert json.loads((tmp_path / "data" / safety.CONFIG_NAME).read_text())["prompt_filter"] == RULES
    with pytest.raises(GenlabError, match="prompt filter"):
        safety.check_request(tmp_path / "data", {"prompt": "A RED STAR"})
    safety.check_request(tmp_path / "data", {"prompt": "a red circle"})
    assert safety.configure(tmp_path / "data", None, None, None) is None
    safety.check_request(tmp_path / "data", {"prompt": "a red star"})  # no configuration: nothing refused
    with pytest.raises(GenlabError, match="together"):
        safety.configure(tmp_path / "data", None, str(rules), None)
    with pytest.raises(GenlabError, match="cannot read"):
        safety.configure(tmp_path / "data", str(tmp_path / "missing.txt"), None, None)


@pytest.mark.parametrize("flags, fragment", [
    (["--prompt-filter", "{tmp}/missing.txt"], "cannot read"),
    (["--prompt-filter", "{tmp}/empty.txt"], "no rule"),
    (["--safety-clip", "{tmp}"], "together"),
    (["--safety-concepts", "{tmp}/empty.txt"], "together"),
    (["--safety-clip", "{tmp}/nothing", "--safety-concepts", "{tmp}/empty.txt"], "no concept"),
    (["--safety-clip", "{tmp}/nothing", "--safety-concepts", "{tmp}/one.txt"], "--safety-clip"),
])
def test_serve_refuses_bad_guardrail_options_in_one_line(tmp_path, capsys, flags, fragment):
    import socket

    from genlab.cli import main

    (tmp_path / "models").mkdir()
    (tmp_path / "empty.txt").write_text("# nothing\n")
    (tmp_path / "one.txt").write_text("red star = 0.3\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["serve", "--models", str(tmp_path / "models"), "--port", str(port)]
    assert main(args + [f.format(tmp=tmp_path) for f in flags]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err
