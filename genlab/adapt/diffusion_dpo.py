"""Diffusion-DPO for the text-to-image model (Wallace et al. 2023, eq. 14):
L = -log sigma(-beta T w(lambda_t) [(||eps_w - eps_theta(x_t^w, t)||^2 - ||eps_w - eps_ref(x_t^w, t)||^2)
                                    - (||eps_l - eps_theta(x_t^l, t)||^2 - ||eps_l - eps_ref(x_t^l, t)||^2)]).

A recipe with `family: diffusion_dpo` reads a folder of image preference pairs (`data.name`, `genlab.data.image_pairs`:
`pairs.jsonl` + images), starts the policy from `model.init_from` (a trained text-to-image model or run folder) and
keeps a frozen copy of it as the reference eps_ref. As in the paper's implementation, w(lambda_t) is constant, the
squared errors are means over pixels, and the chosen and rejected image of a pair share t and the noise; `model.beta`
stands for the whole factor beta T w(lambda_t) (the paper's code writes it as 0.5 beta_dpo, so model.beta = 2500 here
is their beta_dpo = 5000). The errors are on the model's own target (eps, v or x0). The run's `model/` is a plain
text_diffusion folder: sample, eval and serve read it as any.

Pairs ranked by Shapes-GenEval (`geneval_pairs`): several samples of one prompt, read by the evaluator; a correct
image is chosen and an incorrect one rejected (Ghosh et al. 2023's verdicts standing in for Pick-a-Pic's people).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.config import check_number
from genlab.data.image_pairs import ImagePairs
from genlab.errors import GenlabError
from genlab.eval import geneval as G
from genlab.eval.report import sample_images
from genlab.models.base import Conditioning, GenerativeModel, ModelConfig, Output, SampleOption, load_model_folder
from genlab.models.diffusion import DiffusionModel
from genlab.registry import MODELS

CHOSEN_SOURCES = ("sample", "render")
RANKINGS = ("pass", "partial")  # Shapes-GenEval's verdict, or also its attribute recall among failures
ENCODE_BATCH = 64


@dataclass
class DiffusionDPOConfig(ModelConfig):
    """The policy's starting point (also the frozen reference) and the strength of the KL constraint."""

    init_from: str | None = None  # a text_diffusion model (or run) folder: initial policy and frozen reference
    beta: float = 2500.0  # beta T w(lambda_t) of eq. 14 (errors are pixel means): larger stays closer to the reference


def diffusion_dpo_loss(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float) -> Tensor:
    """Per-pair Diffusion-DPO loss from the squared errors of policy and reference on the chosen (w) and rejected
    (l) images at the same t and noise (Wallace et al. 2023, eq. 14)."""
    return -F.logsigmoid(-beta * ((err_w - ref_err_w) - (err_l - ref_err_l)))


class PairBatches:
    """The pairs as the trainer reads them: chosen and rejected images in the policy's space, and the prompts."""

    def __init__(self, chosen: Tensor, rejected: Tensor, prompts: list[str]) -> None:
        self.chosen, self.rejected, self.prompts = chosen, rejected, prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def get_batch(self, indices: Tensor | list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"chosen": self.chosen[idx], "rejected": self.rejected[idx], "text": [self.prompts[i] for i in
                                                                                    idx.tolist()]}


@MODELS.register("diffusion_dpo")
class DiffusionDPO(GenerativeModel):
    """A text-to-image diffusion policy trained on image preference pairs by Diffusion-DPO against a frozen copy
    of its starting point (Wallace et al. 2023)."""

    family = "diffusion_dpo"
    config_class = DiffusionDPOConfig
    conditioning = frozenset({Conditioning.NONE, Conditioning.TEXT})
    output = Output.IMAGE
    sample_options = frozenset({SampleOption.SAMPLER, SampleOption.STEPS, SampleOption.GUIDANCE})
    per_item_seeds = True

    def __init__(self, config: DiffusionDPOConfig, policy: DiffusionModel | None = None) -> None:
        super().__init__(config)
        if policy is None:
            raise GenlabError("a diffusion_dpo model is made from model.init_from; its run's model/ is a "
                              "text_diffusion folder")
        self.policy = policy
        self.ref = copy.deepcopy(policy).requires_grad_(False).eval()

    @classmethod
    def build(cls, config: DiffusionDPOConfig, dataset: Any) -> DiffusionDPO:
        check_number("model.beta", config.beta, 0.0, None, low_open=True)
        policy = load_model_folder("model.init_from", config.init_from,
                                   "a trained text-to-image diffusion model (family text_diffusion) or run folder "
                                   "(policy start and reference)",
                                   lambda m: isinstance(m, DiffusionModel) and Conditioning.TEXT in m.conditioning,
                                   needed_by="family diffusion_dpo")
        if policy.edm:
            raise GenlabError("Diffusion-DPO here is written for discrete-time (vp) models; model.init_from is "
                              "EDM-preconditioned")
        return cls(config, policy)

    def train(self, mode: bool = True) -> DiffusionDPO:
        super().train(mode)
        self.ref.eval()  # the reference never trains
        return self

    @torch.no_grad()
    def prepare_data(self, dataset: Any) -> PairBatches:
        """The pairs' images in the policy's space (pixels in [-1, 1], or scaled latents), checked against its size."""
        if not isinstance(dataset, ImagePairs):
            raise GenlabError("family diffusion_dpo reads a folder of image pairs (data.name=a folder with "
                              "pairs.jsonl, see genlab.data.image_pairs)")
        shape = tuple(dataset.chosen.shape[1:])
        if shape != self.policy.image_shape:
            raise GenlabError(f"the pair images are {shape[1]}x{shape[2]} with {shape[0]} channels but the model "
                              f"makes {self.policy.image_shape}; give images of the model's size")
        self.policy.tokenize(list(dict.fromkeys(dataset.prompts)))  # refuses an overlong prompt now
        return PairBatches(self._encode(dataset.chosen), self._encode(dataset.rejected), dataset.prompts)

    def _encode(self, images: Tensor) -> Tensor:
        x = images.float().div(127.5).sub(1.0)
        if self.policy.autoencoder is None:
            return x
        ae, device = self.policy.autoencoder, self.policy.alpha_bar.device
        return torch.cat([ae.encode(x[i: i + ENCODE_BATCH].to(device))[0].cpu()
                          for i in range(0, len(x), ENCODE_BATCH)]) * self.policy.config.latent_scale

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Mean Diffusion-DPO loss at t ~ U{0..T-1} and eps ~ N(0, I) shared by each pair's two images;
        `reward_acc`: the share of pairs whose implicit reward ranks the chosen image above the rejected one;
        `mse_w` / `mse_l` and the reference's `ref_mse_w` / `ref_mse_l` tell which side moved (the loss also falls
        when both errors rise, the rejected one faster)."""
        device = self.policy.alpha_bar.device
        x_w, x_l = batch["chosen"].to(device), batch["rejected"].to(device)
        B = x_w.shape[0]
        t = torch.randint(0, self.policy.config.timesteps, (B,), device=device).repeat(2)
        eps = torch.randn_like(x_w).repeat(2, 1, 1, 1)
        x0, prompts = torch.cat([x_w, x_l]), list(batch["text"]) * 2
        err_w, err_l = self.policy.vp_errors(x0, t, eps, self.policy.encode_prompts(prompts)).chunk(2)
        with torch.no_grad():
            ref_w, ref_l = self.ref.vp_errors(x0, t, eps, self.ref.encode_prompts(prompts)).chunk(2)
        losses = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, self.config.beta)
        margin = -((err_w - ref_w) - (err_l - ref_l)).detach()
        return {"loss": losses.mean(), "reward_acc": (margin > 0).float().mean(), "mse_w": err_w.detach().mean(),
                "mse_l": err_l.detach().mean(), "ref_mse_w": ref_w.mean(), "ref_mse_l": ref_l.mean()}

    def sample(self, n: int, cond: Any = None, generator: Any = None, **opts: Any) -> Tensor:
        return self.policy.sample(n, cond, generator, **opts)

    def check_sample_config(self, sample_cfg: Any) -> None:
        self.policy.check_sample_config(sample_cfg)

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        return self.policy.write_preview(stem, sample_cfg, generator)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """The policy as a plain text_diffusion folder (the reference is not saved)."""
        sd = state_dict if state_dict is not None else self.state_dict()
        return self.policy.save_pretrained(directory, {k.removeprefix("policy."): v for k, v in sd.items()
                                                       if k.startswith("policy.")})


def rank_pairs(specs: list[G.PromptSpec], images: Tensor, scores: list[float], k: int) -> list[tuple[int, int]]:
    """(chosen index, rejected index) per prompt whose `k` consecutive images do not all score the same: the first
    of the best and the first of the worst (scores 1/0: a correct and an incorrect image by the evaluator)."""
    if len(images) != len(specs) * k or len(scores) != len(images):
        raise GenlabError(f"{len(images)} images and {len(scores)} scores for {len(specs)} prompts x {k}")
    out = []
    for p in range(len(specs)):
        row = [float(v) for v in scores[p * k: p * k + k]]
        if max(row) > min(row):
            out.append((p * k + row.index(max(row)), p * k + row.index(min(row))))
    return out


def geneval_pairs(model: GenerativeModel, specs: list[G.PromptSpec], k: int, *, seed: int = 0,
                  chosen: str = "sample", rank: str = "pass", reader: G.AttributeReader | None = None,
                  batch_size: int = 64, **sample_opts: Any
                  ) -> tuple[list[str], Tensor, Tensor, list[dict[str, Any]], dict[str, Any]]:
    """Preference pairs of `specs` ranked by Shapes-GenEval: `k` samples per prompt (image i seeded seed + i) read by
    the evaluator, a correct one chosen and an incorrect one rejected. rank="partial" also ranks images that both
    fail by `attribute_recall`'s partial score (a pass outranks any failure), so a weak model still gets on-policy
    pairs. With chosen="render", a prompt none of whose samples is correct and that got no pair takes as its chosen
    image a real `shapes` render of it that the evaluator passes (a weaker, off-policy stand-in, marked
    `"chosen_from": "render"` in the pair's record). Returns prompts, chosen and rejected images, per-pair records and
    a summary."""
    if chosen not in CHOSEN_SOURCES:
        raise GenlabError(f"chosen images come from {' or '.join(CHOSEN_SOURCES)}, not {chosen!r}")
    if rank not in RANKINGS:
        raise GenlabError(f"pairs are ranked by {' or '.join(RANKINGS)}, not {rank!r}")
    reader = reader or G.get_reader()
    expanded = G.expand(specs, k)
    images = sample_images(model.sample, len(expanded), seed, batch_size=batch_size,
                           cond=[s.prompt for s in expanded], per_item_seeds=True, **sample_opts)
    detections = reader.read(images)
    verdicts = [G.passes(s, d) for s, d in zip(expanded, detections, strict=True)]
    scores = [2.0 if v else G.attribute_recall(s, d)["partial"] if rank == "partial" else 0.0
              for s, d, v in zip(expanded, detections, verdicts, strict=True)]
    pairs = rank_pairs(specs, images, scores, k)
    prompts = [expanded[w].prompt for w, _ in pairs]
    chosen_x, rejected_x = [images[w] for w, _ in pairs], [images[l_] for _, l_ in pairs]
    extra = [{"category": expanded[w].category, "chosen_from": "sample", "chosen_seed": seed + w,
              "rejected_seed": seed + l_, "chosen_score": scores[w], "rejected_score": scores[l_]} for w, l_ in pairs]
    renders = 0
    if chosen == "render":
        paired = {w // k for w, _ in pairs}
        lonely = [(p, s) for p, s in enumerate(specs) if p not in paired and not any(verdicts[p * k: p * k + k])]
        if lonely:
            real = G.render_specs([s for _, s in lonely], image_size=images.shape[-1], seed=seed)
            real_ok = [G.passes(s, d) for (_, s), d in zip(lonely, reader.read(real), strict=True)]
            for (p, s), img, ok in zip(lonely, real, real_ok, strict=True):
                if ok:
                    prompts.append(s.prompt)
                    chosen_x.append(img.float().div(127.5).sub(1.0))
                    rejected_x.append(images[p * k])
                    extra.append({"category": s.category, "chosen_from": "render", "rejected_seed": seed + p * k})
                    renders += 1
    summary = {"prompts": len(specs), "samples_per_prompt": k, "rank": rank,
               "sample_pass_rate": sum(verdicts) / len(verdicts),
               "pairs": len(prompts), "pairs_from_samples": len(pairs), "pairs_with_rendered_chosen": renders}
    if not prompts:
        raise GenlabError(f"no prompt of {len(specs)} had both a correct and an incorrect sample among {k}; draw more "
                          "samples per prompt, or take chosen images from renders")
    stack = lambda xs: torch.stack(xs) if xs else images[:0]  # noqa: E731
    return prompts, stack(chosen_x), stack(rejected_x), extra, summary

