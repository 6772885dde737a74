"""Direct Preference Optimization for the GPT (Rafailov et al. 2023, eq. 7):
L = -log sigma(beta [log pi(y_w | x) / pi_ref(y_w | x) - log pi(y_l | x) / pi_ref(y_l | x)]).

A recipe with `family: dpo` reads a JSONL file of `{"prompt": ..., "chosen": ..., "rejected": ...}` lines
(`data.name`), starts the policy from `model.init_from` (the SFT GPT folder) and keeps that same model as the frozen
reference: its log-probabilities of every pair are computed once, in `prepare_data`, before the first update (the
reference never changes), so no second network is held in memory. The run's `model/` is a plain GPT folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.config import MAX_CONTEXT, check_int, check_number
from genlab.errors import GenlabError
from genlab.files import jsonl_records
from genlab.models.base import Conditioning, GenerativeModel, ModelConfig, Output
from genlab.models.gpt import GPT
from genlab.registry import MODELS

PAIR_KEYS = ("prompt", "chosen", "rejected")


@dataclass
class DPOConfig(ModelConfig):
    """The policy's starting point (also the reference) and the strength of the KL constraint."""

    init_from: str | None = None  # the SFT GPT folder: initial policy and frozen reference pi_ref
    beta: float = 0.1  # beta of eq. 7: larger keeps the policy closer to the reference
    block_size: int = 0  # tokens of prompt + completion kept (the completion is cut); 0: the policy's block_size


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> Tensor:
    """Per-pair DPO loss from sequence log-probabilities (Rafailov et al. 2023, eq. 7)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def completion_logps(model: GPT, ids: Tensor, mask: Tensor) -> Tensor:
    """sum_t mask_t log p(ids_t | ids_<t) per row: the log-probability of the completion tokens (mask 1) given
    everything before them; rows are right-padded, so padding never reaches a scored position."""
    logits = model(ids[:, :-1]).float()
    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * mask[:, 1:]).sum(-1)


def read_pairs(text: str) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) of every JSONL line; a partial first or last line (a file split by
    characters) is skipped, any other bad line is a one-line error."""
    pairs = []
    for n, record in jsonl_records(text, "preference data", '{"prompt": ..., "chosen": ..., "rejected": ...}'):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in PAIR_KEYS):
            raise GenlabError(f"line {n} of the preference data needs string fields prompt, chosen, rejected")
        if record["chosen"] == record["rejected"]:
            raise GenlabError(f"line {n} of the preference data has chosen == rejected: drop the line")
        pairs.append((record["prompt"], record["chosen"], record["rejected"]))
    if not pairs:
        raise GenlabError('the preference data holds no pairs; give JSONL lines {"prompt", "chosen", "rejected"}')
    return pairs


class PairData:
    """Token rows of prompt + completion (right-padded), completion masks and the reference's log-probabilities."""

    def __init__(self, rows: dict[str, Tensor]) -> None:
        self.rows = rows

    @classmethod
    def encode(cls, policy: GPT, pairs: list[tuple[str, str, str]], block_size: int) -> PairData:
        """Tokenize `pairs` (BOS + prompt, then completion + EOS, cut to block_size + 1 tokens) and score them
        with `policy` as the reference."""
        tok = policy._require_tokenizer()
        out: dict[str, list[list[int]]] = {"chosen": [], "rejected": [], "chosen_n": [], "rejected_n": []}
        for prompt, *answers in pairs:
            p = tok.encode(prompt, bos=True)
            if len(p) >= block_size:
                raise GenlabError(f"a prompt has {len(p)} tokens, model.block_size={block_size} leaves no room for "
                                  "the answer: raise model.block_size or shorten the prompt")
            for key, answer in zip(("chosen", "rejected"), answers, strict=True):
                row = (p + tok.encode(answer) + [tok.eos_id])[: block_size + 1]
                out[key].append(row)
                out[key + "_n"].append([len(p), len(row)])
        width = max(len(r) for key in ("chosen", "rejected") for r in out[key])
        rows: dict[str, Tensor] = {}
        for key in ("chosen", "rejected"):
            ids = torch.full((len(pairs), width), tok.pad_id, dtype=torch.long)
            mask = torch.zeros(len(pairs), width)
            for i, (r, (start, end)) in enumerate(zip(out[key], out[key + "_n"], strict=True)):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, start:end] = 1.0
            rows[key + "_ids"], rows[key + "_mask"] = ids, mask
        data = cls(rows)
        was_training = policy.training
        policy.eval()
        device = policy.tok_emb.weight.device
        with torch.no_grad():
            for key in ("chosen", "rejected"):
                rows["ref_" + key] = torch.cat([
                    completion_logps(policy, b[key + "_ids"].to(device), b[key + "_mask"].to(device)).cpu()
                    for b in data.iter_eval_batches(32, with_ref=False)])
        policy.train(was_training)
        return data

    def __len__(self) -> int:
        return len(self.rows["chosen_ids"])

    def get_batch(self, indices: Tensor | list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.rows.items()}

    def iter_eval_batches(self, batch_size: int, with_ref: bool = True):
        for i in range(0, len(self), batch_size):
            batch = {k: v[i: i + batch_size] for k, v in self.rows.items()}
            yield batch if with_ref else {k: v for k, v in batch.items() if not k.startswith("ref_")}


@MODELS.register("dpo")
class DPO(GenerativeModel):
    """A GPT policy trained on preference pairs by DPO against its frozen starting point (Rafailov et al. 2023)."""

    family = "dpo"
    config_class = DPOConfig
    conditioning = frozenset({Conditioning.NONE, Conditioning.TEXT})
    output = Output.TEXT

    def __init__(self, config: DPOConfig, policy: GPT | None = None) -> None:
        super().__init__(config)
        if policy is None:
            raise GenlabError("a dpo model is made from model.init_from; its run's model/ is a gpt folder")
        self.policy = policy

    @classmethod
    def build(cls, config: DPOConfig, dataset: Any) -> DPO:
        if not config.init_from:
            raise GenlabError("family dpo needs model.init_from: the SFT GPT folder (policy start and reference)")
        check_number("model.beta", config.beta, 0.0, None, low_open=True)
        check_int("model.block_size", config.block_size, 0, MAX_CONTEXT)
        policy = GPT.from_pretrained(config.init_from)
        return cls(config, policy)

    def prepare_data(self, dataset: Any) -> PairData:
        """The pairs of the JSONL text, with the reference's (= the initial policy's) log-probabilities."""
        if getattr(getattr(dataset, "info", None), "kind", "text") != "text":
            raise GenlabError("family dpo reads a JSONL text file of preference pairs (data.name=pairs.jsonl)")
        return PairData.encode(self.policy, read_pairs(dataset.text), self.config.block_size
                               or self.policy.config.block_size)

    def _losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        device = self.policy.tok_emb.weight.device
        logps = {k: completion_logps(self.policy, batch[k + "_ids"].to(device), batch[k + "_mask"].to(device))
                 for k in ("chosen", "rejected")}
        ref = {k: batch["ref_" + k].to(device) for k in ("chosen", "rejected")}
        losses = dpo_loss(logps["chosen"], logps["rejected"], ref["chosen"], ref["rejected"], self.config.beta)
        margin = self.config.beta * ((logps["chosen"] - ref["chosen"]) - (logps["rejected"] - ref["rejected"]))
        return losses, margin.detach()

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Mean DPO loss; `reward_acc`: the share of pairs whose implicit reward ranks chosen above rejected."""
        losses, margin = self._losses(batch)
        return {"loss": losses.mean(), "reward_acc": (margin > 0).float().mean(), "margin": margin.mean()}

    @torch.no_grad()
    def validation_metrics(self, val_data: PairData) -> dict[str, float]:
        was_training = self.training
        self.eval()
        losses, margins = [], []
        for batch in val_data.iter_eval_batches(32):
            loss, margin = self._losses(batch)
            losses.append(loss)
            margins.append(margin)
        self.train(was_training)
        loss, margin = torch.cat(losses), torch.cat(margins)
        return {"val_loss": float(loss.mean()), "val_reward_acc": float((margin > 0).float().mean()),
                "val_margin": float(margin.mean())}

    def sample(self, n: int, cond: Any = None, generator: torch.Generator | None = None, **opts: Any) -> Tensor:
        return self.policy.sample(n, cond, generator, **opts)

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        return self.policy.write_preview(stem, sample_cfg, generator)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """The policy as a plain GPT folder (generate, export and eval read it as any GPT)."""
        sd = state_dict if state_dict is not None else self.state_dict()
        return self.policy.save_pretrained(directory, {k.removeprefix("policy."): v for k, v in sd.items()})
