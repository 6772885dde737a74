"""Guardrails of `genlab serve`: a prompt filter and an output concept checker.

The prompt filter refuses a request whose text (image prompts, negative prompts, completion prompts, chat
messages) matches a rule of a list file, after normalising both: Unicode NFKC (full-width letters, ligatures,
mathematical alphabets fold to plain letters), case folding, format characters (zero-width spaces) dropped, every
run of other non-alphanumeric characters one space. A rule matches at word boundaries; written without its spaces
("redstar") it matches too, and so do its letters spelled out one by one ("r.e.d s-t-a-r") anywhere in such a run.

The output checker follows Stable Diffusion's safety checker (CompVis/stable-diffusion `safety_checker.py`): the
CLIP image embedding of each output is compared by cosine with the embedding of each configured concept, and an
image whose cosine passes a concept's threshold is blocked: replaced by black and flagged. Here the concepts are
phrases embedded by the text tower of genlab's own CLIP, each with its own threshold.

`genlab serve` writes the configuration into the server's data folder (`safety.json`), so the API process and every
worker process (`--workers N`) read the same rules.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genlab.errors import GenlabError

CONFIG_NAME = "safety.json"
MAX_RULES = 100_000
BLOCKED_FILL = -1.0  # a blocked image becomes black ([-1, 1] pixel range)


def normalize(text: str) -> str:
    """NFKC, casefold, format characters dropped, non-alphanumeric runs as one space, stripped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = unicodedata.normalize("NFKC", text)  # casefold can undo NFKC (e.g. U+0130)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    text = "".join(c if c.isalnum() else " " for c in text)
    return " ".join(text.split())


def _spelled_out(words: list[str]) -> list[str]:
    """Runs of two or more one-character words, joined ("a r e d s t a r" -> ["aredstar"])."""
    runs, run = [], []
    for w in words + [""]:
        if len(w) == 1:
            run.append(w)
            continue
        if len(run) > 1:
            runs.append("".join(run))
        run = []
    return runs


@dataclass(frozen=True)
class Rule:
    text: str  # as written in the list file
    line: int
    pattern: re.Pattern[str]
    compact: re.Pattern[str]
    letters: str


@dataclass(frozen=True)
class FilterMatch:
    rule: str
    line: int
    field: str

    def message(self) -> str:
        return (f"{self.field} was refused by the server's prompt filter: it matches the rule {self.rule!r} "
                f"(line {self.line} of the filter list); rephrase it")


class PromptFilter:
    """Rules of a list file: one word or phrase per line; blank lines and `#` comments skipped."""

    def __init__(self, rules: list[tuple[int, str]]) -> None:
        self.rules: list[Rule] = []
        for line, text in rules:
            norm = normalize(text)
            if not norm:
                raise GenlabError(f"prompt filter line {line}: {text!r} holds no letters or digits; remove it")
            words = re.escape(norm).replace(r"\ ", " ")
            self.rules.append(Rule(text, line, re.compile(rf"(?<![0-9\w]){words}(?![0-9\w])"),
                                   re.compile(rf"(?<![0-9\w]){re.escape(norm.replace(' ', ''))}(?![0-9\w])"),
                                   norm.replace(" ", "")))

    @classmethod
    def parse(cls, text: str, source: str = "the prompt filter") -> PromptFilter:
        rules = []
        for i, raw in enumerate(text.splitlines()):
            line = raw.strip()
            if line and not line.startswith("#"):
                rules.append((i + 1, line))
        if not rules:
            raise GenlabError(f"{source} holds no rule; write one word or phrase per line")
        if len(rules) > MAX_RULES:
            raise GenlabError(f"{source} holds {len(rules)} rules; at most {MAX_RULES}")
        return cls(rules)

    @classmethod
    def read(cls, path: str | Path) -> PromptFilter:
        return cls.parse(_read_text(path, "--prompt-filter", "one word or phrase per line"), f"--prompt-filter {path}")

    def match(self, text: str, field: str = "prompt") -> FilterMatch | None:
        """The first rule that `text` matches, or None."""
        norm = normalize(text)
        if not norm:
            return None
        runs = _spelled_out(norm.split())
        for r in self.rules:
            if r.pattern.search(norm) or r.compact.search(norm) or any(r.letters in run for run in runs):
                return FilterMatch(r.text, r.line, field)
        return None


def request_texts(raw: Any) -> Iterator[tuple[str, str]]:
    """(field, text) of what a request asks to draw or continue: prompt(s), negative_prompt, chat message contents
    (token-id prompts carry no text)."""
    if not isinstance(raw, dict):
        return
    for key in ("prompt", "negative_prompt"):
        value = raw.get(key)
        if isinstance(value, str):
            yield key, value
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, str):
                    yield f"{key}[{i}]", v
    messages = raw.get("messages")
    if isinstance(messages, list):
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                yield f"messages[{i}].content", content
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        yield f"messages[{i}].content", part["text"]


# -- the output checker -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Concept:
    text: str
    threshold: float


def parse_concepts(text: str, source: str = "the concept list") -> list[Concept]:
    """`CONCEPT = THRESHOLD` per line (a cosine in [-1, 1]); blank lines and `#` comments skipped."""
    out = []
    for i, raw in enumerate(text.splitlines()):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        concept, sep, value = line.rpartition("=")
        try:
            threshold = float(value)
        except ValueError:
            threshold = float("nan")
        if not sep or not concept.strip() or not -1 <= threshold <= 1:
            raise GenlabError(f"{source}, line {i + 1}: write CONCEPT = THRESHOLD with a cosine threshold in "
                              f"[-1, 1], e.g. 'red star = 0.8'")
        out.append(Concept(concept.strip(), threshold))
    if not out:
        raise GenlabError(f"{source} holds no concept; write CONCEPT = THRESHOLD, one per line")
    return out


@dataclass(frozen=True)
class Verdict:
    blocked: bool
    concept: str | None  # the concept with the largest margin over its threshold, when blocked
    score: float  # that concept's cosine (the best margin's cosine when not blocked)

    def as_dict(self) -> dict[str, Any]:
        return {"blocked": self.blocked, "concept": self.concept, "score": round(self.score, 4)}


class ConceptChecker:
    """Cosine of each image's CLIP embedding with each concept's text embedding against that concept's threshold
    (Stable Diffusion's safety checker: `cos_dist - concept_threshold > 0` flags an image)."""

    def __init__(self, clip: Any, concepts: list[Concept]) -> None:
        from genlab.eval.clip import embed_texts

        self.clip, self.concepts = clip, concepts
        self.embeddings = embed_texts(clip, [c.text for c in concepts])  # (K, D), unit length
        self.thresholds = torch.tensor([c.threshold for c in concepts])
        self._lock = threading.Lock()

    @torch.no_grad()
    def cosines(self, images: Tensor) -> Tensor:
        """(N, K) cosines of images (N, C, H, W) in [-1, 1] with the concepts."""
        from genlab.eval.clip import _fit, embed_images

        C = self.clip.image_shape[0]
        x = images.detach().float().cpu()
        if x.shape[1] == 1 and C == 3:  # a grayscale model checked by a colour CLIP
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and C == 1:
            x = x.mean(1, keepdim=True)
        with self._lock:  # one model, several worker threads
            emb = embed_images(self.clip, _fit(self.clip, x))
        return emb @ self.embeddings.t()

    def check(self, images: Tensor) -> list[Verdict]:
        cos = self.cosines(images)
        margin = cos - self.thresholds
        best = margin.argmax(1)
        return [Verdict(bool(margin[i, k] > 0), self.concepts[k].text if margin[i, k] > 0 else None,
                        float(cos[i, k])) for i, k in enumerate(best.tolist())]

    def screen(self, images: Tensor) -> tuple[Tensor, list[Verdict]]:
        """The images with blocked ones replaced by black, and every image's verdict."""
        verdicts = self.check(images)
        if any(v.blocked for v in verdicts):
            images = images.clone()
            for i, v in enumerate(verdicts):
                if v.blocked:
                    images[i] = BLOCKED_FILL
        return images, verdicts


def load_checker(clip_path: str, concepts_text: str, device: str = "cpu",
                 source: str = "--safety-concepts") -> ConceptChecker:
    from genlab.eval.clip import load_clip

    return ConceptChecker(load_clip(clip_path, device), parse_concepts(concepts_text, source))


# -- the configuration a server writes into its data folder -------------------------------------------------
def _read_text(path: str | Path, flag: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GenlabError(f"{flag} {path}: cannot read it ({e.__class__.__name__}); give a UTF-8 text file with "
                          f"{what}") from None


def configure(data_dir: str | Path, prompt_filter: str | None, safety_clip: str | None,
              safety_concepts: str | None) -> dict[str, Any] | None:
    """Check the options of `genlab serve` (loading the CLIP once) and write them into the data folder as
    `safety.json` (the rules themselves, so a later edit of a list file does not change a running server); with
    none given, remove an older configuration. Returns what was written."""
    if (safety_clip is None) != (safety_concepts is None):
        raise GenlabError("give --safety-clip and --safety-concepts together (a CLIP model folder and a concept list)")
    config: dict[str, Any] = {}
    if prompt_filter is not None:
        text = _read_text(prompt_filter, "--prompt-filter", "one word or phrase per line")
        PromptFilter.parse(text, f"--prompt-filter {prompt_filter}")
        config["prompt_filter"] = text
    if safety_clip is not None and safety_concepts is not None:
        text = _read_text(safety_concepts, "--safety-concepts", "CONCEPT = THRESHOLD lines")
        concepts = parse_concepts(text, f"--safety-concepts {safety_concepts}")
        from genlab.eval.clip import load_clip

        try:
            ConceptChecker(load_clip(safety_clip), concepts)
        except GenlabError as e:
            raise GenlabError(f"--safety-clip {safety_clip}: {e}") from None
        config["clip"] = str(Path(safety_clip).resolve())
        config["concepts"] = text
    path = Path(data_dir) / CONFIG_NAME
    if not config:
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return config


@dataclass
class Safety:
    prompt_filter: PromptFilter | None
    checker: ConceptChecker | None


def _stamp(data_dir: Path) -> tuple[str, int] | None:
    try:
        st = (data_dir / CONFIG_NAME).stat()
    except OSError:
        return None
    return str(data_dir.resolve()), st.st_mtime_ns


_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _load(stamp: tuple[str, int]) -> Safety:
    config = json.loads((Path(stamp[0]) / CONFIG_NAME).read_text(encoding="utf-8"))
    pf = PromptFilter.parse(config["prompt_filter"]) if config.get("prompt_filter") else None
    checker = load_checker(config["clip"], config["concepts"]) if config.get("clip") else None
    return Safety(pf, checker)


def for_data(data_dir: str | Path) -> Safety | None:
    """The safety configuration of a server data folder (cached until its file changes), or None."""
    stamp = _stamp(Path(data_dir))
    if stamp is None:
        return None
    with _lock:
        return _load(stamp)


def check_request(data_dir: str | Path, raw: Any) -> None:
    """Refuse (GenlabError naming the rule) a request whose text matches the data folder's prompt filter."""
    safety = for_data(data_dir)
    if safety is None or safety.prompt_filter is None:
        return
    for field, text in request_texts(raw):
        found = safety.prompt_filter.match(text, field)
        if found is not None:
            raise GenlabError(found.message())


def checker_for(data_dir: str | Path) -> ConceptChecker | None:
    safety = for_data(data_dir)
    return safety.checker if safety is not None else None
