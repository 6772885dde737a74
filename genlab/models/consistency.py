"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2) of an EDM-preconditioned
diffusion teacher, sampled in one or a few steps (multistep consistency sampling, Algorithm 1).

The student is the teacher's network (initialised with its weights) read through the consistency function
f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), whose c_skip / c_out (Song et al.
2023, app. C) make f(x, sigma_min) = x exactly (the boundary condition); c_in and c_noise are EDM's, as the
teacher's. Training draws n ~ U{1, ..., N-1} on the Karras discretisation sigma_min = t_1 < ... < t_N = sigma_max,
runs one Heun step of the teacher's probability-flow ODE from x_{t_{n+1}} = x0 + t_{n+1} z to t_n, and pulls
f_theta(x_{t_{n+1}}, t_{n+1}) towards the target network's f_theta-(x_hat_{t_n}, t_n). The target network is an
EMA of the student (theta- <- mu theta- + (1 - mu) theta, Algorithm 2), or, with `target_decay: 0`, the student
itself under a stop-gradient, as improved consistency training does (Song & Dhariwal 2023, sec. 3.2), which
pairs it with the pseudo-Huber distance (`loss: pseudo_huber`, their eq. 13).

The intermediate times of multistep sampling are chosen after training (`model.search_steps`) greedily on FID
against a validation split, one at a time, as Song et al. 2023 do (sec. 6, app. C), and kept in the model folder
(`model.sampling_sigmas`); without them (or for more steps than were searched) they follow the Karras rule.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genlab.config import MAX_SAMPLING_STEPS, check_int, check_number, to_dict
from genlab.data.images import save_grid
from genlab.errors import GenlabError
from genlab.models.base import Likelihood, SampleOption, load_model_folder
from genlab.models.diffusion import MAX_SAMPLES, DiffusionConfig, DiffusionModel
from genlab.models.parameterization import denoised, edm_scalings
from genlab.registry import MODELS
from genlab.sampling.denoiser import Denoiser, to_d
from genlab.sampling.greedy import MAX_SEARCH_ITERS, greedy_times
from genlab.sampling.noise import Generators, randn
from genlab.sampling.schedules import karras_sigmas

CD_LOSSES = ("l2", "pseudo_huber")
MAX_SCALES = 10_000
STUDENT_KEYS = ("cond_drop",)  # DiffusionConfig keys the student takes from its recipe, not from the teacher


@dataclass
class ConsistencyConfig(DiffusionConfig):
    """The teacher's keys (copied from `teacher` by build) plus the distillation's."""

    teacher: str | None = None  # a trained EDM-preconditioned diffusion model (or run) folder
    num_scales: int = 18  # N: the Karras discretisation t_1 = sigma_min < ... < t_N = sigma_max (Song et al., table 3)
    rho: float = 7.0  # of that discretisation (Karras et al. 2022, eq. 5)
    target_decay: float = 0.95  # mu of the target network's EMA; 0: the student under a stop-gradient (iCT)
    loss: str = "l2"  # l2 (mean squared error) | pseudo_huber (Song & Dhariwal 2023, eq. 13)
    huber_c: float = 0.0  # pseudo-Huber c; 0: 0.00054 sqrt(C H W) (Song & Dhariwal 2023, sec. 3.3)
    # after training, choose tau_2 > ... > tau_K of K-step sampling greedily on FID against the training split (Song
    # et al. 2023, app. C); 0: none (the Karras rule)
    search_steps: int = 0
    search_n: int = 500  # samples a candidate time is scored on (fixed noise and labels)
    search_iters: int = 10  # golden-section steps a time (the log-sigma bracket shrinks by 0.618 each)
    sampling_sigmas: tuple[float, ...] = ()  # the chosen tau_2 > ... > tau_K (written by the search)


def _check_cd(cfg: ConsistencyConfig) -> None:
    if cfg.loss not in CD_LOSSES:
        raise GenlabError(f"model.loss={cfg.loss!r} is unknown; choose one of: {', '.join(CD_LOSSES)}")
    check_int("model.num_scales", cfg.num_scales, 2, MAX_SCALES)
    check_number("model.target_decay", cfg.target_decay, 0.0, 0.999999)
    check_number("model.rho", cfg.rho, 1e-3, 1e3)
    check_number("model.huber_c", cfg.huber_c, 0.0, 1e3)
    check_int("model.search_steps", cfg.search_steps, 0, MAX_SAMPLING_STEPS)
    if cfg.search_steps == 1:
        raise GenlabError("model.search_steps=1 has no intermediate time to choose; use 0 (none) or 2 or more")
    check_int("model.search_n", cfg.search_n, 2, 50_000)
    check_int("model.search_iters", cfg.search_iters, 1, MAX_SEARCH_ITERS)
    check_sampling_sigmas(cfg.sampling_sigmas, cfg.sigma_min, cfg.sigma_max)


def check_sampling_sigmas(sigmas: Any, sigma_min: float, sigma_max: float) -> tuple[float, ...]:
    """`model.sampling_sigmas` as a tuple: a list of numbers strictly decreasing inside (sigma_min, sigma_max)."""
    if not isinstance(sigmas, list | tuple) or len(sigmas) >= MAX_SAMPLING_STEPS:
        raise GenlabError(f"model.sampling_sigmas={sigmas!r} must be a list of fewer than {MAX_SAMPLING_STEPS} noise "
                          "levels (tau_2 > tau_3 > ...), or [] for the Karras rule")
    prev = sigma_max
    for i, s in enumerate(sigmas):
        if isinstance(s, bool) or not isinstance(s, int | float) or not sigma_min < s < prev:
            raise GenlabError(f"model.sampling_sigmas[{i}]={s!r} must be a number in ({sigma_min:g}, {prev:g}): the "
                              "times must decrease strictly from sigma_max to above sigma_min")
        prev = s
    return tuple(float(s) for s in sigmas)


def consistency_scalings(sigma: Tensor, sigma_min: float, sigma_data: float) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of the consistency function (Song et al. 2023, app. C, eq. above (22)):
    sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2) and sigma_data (sigma - sigma_min) / sqrt(sigma_data^2 +
    sigma^2), so that f(x, sigma_min) = x exactly."""
    shifted = sigma - sigma_min
    return sigma_data**2 / (shifted**2 + sigma_data**2), sigma_data * shifted * (sigma**2 + sigma_data**2).rsqrt()


def cd_sigmas(num_scales: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """t_1 < ... < t_N: the Karras discretisation of [sigma_min, sigma_max] in ascending order (Song et al. 2023,
    sec. 5: t_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho), with its ends
    exactly sigma_min and sigma_max."""
    t = karras_sigmas(num_scales, sigma_min, sigma_max, rho)[:-1].flip(0)
    t[0], t[-1] = sigma_min, sigma_max
    return t


def consistency_sampling_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                                chosen: tuple[float, ...] = ()) -> Tensor:
    """tau_1 = sigma_max > tau_2 > ... > tau_steps of multistep sampling (Song et al. 2023, Algorithm 1): sigma_max and
    the first steps - 1 `chosen` times (a greedy search's, each found with the earlier ones fixed) where there are
    enough of them; otherwise the first `steps` points of a (steps + 1)-point Karras schedule, so no step starts at
    sigma_min, where f is the identity."""
    if 1 < steps <= len(chosen) + 1:
        return torch.tensor([sigma_max, *chosen[: steps - 1]], dtype=torch.float64)
    return karras_sigmas(steps + 1, sigma_min, sigma_max, rho)[:steps]


def heun_step(denoiser: Denoiser, x: Tensor, sigma: Tensor, sigma_next: Tensor, cond: Any = None) -> Tensor:
    """One Heun step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma from `sigma` to `sigma_next`
    (both (B,), per item, positive; Karras et al. 2022, alg. 1): the teacher's ODE solver Phi of Algorithm 2."""
    s, s_next = (v.view(-1, *[1] * (x.ndim - 1)) for v in (sigma, sigma_next))
    d = to_d(x, s, denoiser(x, sigma, cond))
    x_euler = x + (s_next - s) * d
    d_next = to_d(x_euler, s_next, denoiser(x_euler, sigma_next, cond))
    return x + (s_next - s) * (d + d_next) / 2


def consistency_distance(a: Tensor, b: Tensor, loss: str, c: float) -> Tensor:
    """d(a, b) per item: the mean squared error, or the pseudo-Huber sqrt(||a - b||^2 + c^2) - c (Song & Dhariwal
    2023, eq. 13)."""
    sq = ((a - b) ** 2).flatten(1)
    if loss == "pseudo_huber":
        return (sq.sum(1) + c**2).sqrt() - c
    return sq.mean(1)


def few_step_preview(model: Any, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
    """A PNG grid of a few-step family's samples at `sample.steps`, one row per class when class-conditional."""
    n, nrow = sample_cfg.n, None
    if model.num_classes:
        nrow = max(1, sample_cfg.n // model.num_classes)
        n = nrow * model.num_classes
    x = model.sample(n, generator=generator, steps=sample_cfg.steps)
    return [save_grid(x, Path(stem).with_suffix(".png"), nrow=nrow,
                      params={"steps": sample_cfg.steps, "n": n, "seed": sample_cfg.seed})]


def _student_config(config: ConsistencyConfig, teacher: DiffusionModel) -> ConsistencyConfig:
    """The teacher's keys with the distillation's own and the recipe's label dropout (`cond_drop`); another teacher
    key the recipe sets otherwise is refused."""
    defaults = DiffusionConfig()
    for f in dataclasses.fields(DiffusionConfig):
        ours, theirs = getattr(config, f.name), getattr(teacher.config, f.name)
        if f.name not in STUDENT_KEYS and ours != getattr(defaults, f.name) and ours != theirs:
            raise GenlabError(f"model.{f.name}={ours!r} but model.teacher has {theirs!r}; drop the key (the "
                              "student is the teacher's network)")
    own = {f.name: getattr(config, f.name) for f in dataclasses.fields(ConsistencyConfig)
           if f.name not in {g.name for g in dataclasses.fields(DiffusionConfig)} or f.name in STUDENT_KEYS}
    return ConsistencyConfig(**{**to_dict(teacher.config), **own})


@MODELS.register("consistency")
class ConsistencyModel(DiffusionModel):
    """Consistency distillation: E[d(f_theta(x0 + t_{n+1} z, t_{n+1}), f_theta-(x_hat^phi_{t_n}, t_n))] with
    x_hat^phi_{t_n} one Heun step of the teacher (Song et al. 2023, eq. 7 and Algorithm 2, lambda = 1); sampled by
    multistep consistency sampling (Algorithm 1). The model folder holds the student alone."""

    family = "consistency"
    config_class = ConsistencyConfig
    likelihood = Likelihood.NONE
    likelihood_estimators = ()
    sample_options = frozenset({SampleOption.STEPS})
    lora_targets = ()  # no adapter on a consistency model has been tested (it holds a teacher and a target): no LoRA
    # what the search after training reads and writes, and the code that only samples: a benchmark may reuse the
    # trained weights when only these change
    sampling_keys = ("search_steps", "search_n", "search_iters", "sampling_sigmas")
    sampling_code = ("consistency_sampling_sigmas", "few_step_preview", "sample", "consistency_step",
                     "tune_sampling", "check_sample_config", "write_preview")

    def __init__(self, config: ConsistencyConfig) -> None:
        _check_cd(config)
        config.sampling_sigmas = check_sampling_sigmas(config.sampling_sigmas, config.sigma_min, config.sigma_max)
        if config.preconditioning != "edm":
            raise GenlabError("consistency distillation reads the network through EDM's c_in / c_noise: the "
                              "teacher must be EDM-preconditioned (model.preconditioning=edm)")
        if config.autoencoder_config:
            raise GenlabError("consistency distillation here is in pixel space: give a teacher without an "
                              "autoencoder")
        super().__init__(config)
        self.register_buffer("cd_sigmas", cd_sigmas(config.num_scales, config.sigma_min, config.sigma_max,
                                                    config.rho).float(), persistent=False)
        self.teacher: DiffusionModel | None = None  # set by build (training only; not in the model folder)
        self.target: nn.Module | None = None
        self.grad_clip = 0.0

    @classmethod
    def build(cls, config: ConsistencyConfig, dataset: Any) -> ConsistencyModel:
        """The student: the teacher's network and weights, with the frozen teacher and the target network."""
        _check_cd(config)
        teacher = load_model_folder(
            "model.teacher", config.teacher, "a trained EDM diffusion model (or run) folder: a diffusion model whose "
            "ODE a sampler solves, trained with model.preconditioning=edm (configs/mnist-edm.yaml)",
            lambda m: isinstance(m, DiffusionModel) and SampleOption.SAMPLER in m.sample_options,
            needed_by="family consistency")
        if teacher.config.preconditioning != "edm":
            raise GenlabError(f"model.teacher={config.teacher!r} is not EDM-preconditioned (preconditioning="
                              f"{teacher.config.preconditioning}); train the teacher with configs/mnist-edm.yaml")
        info = dataset.info
        if (info.channels, info.image_size) != (teacher.config.channels, teacher.config.image_size):
            raise GenlabError(f"dataset {info.name!r} has {info.channels}-channel {info.image_size}px images but the "
                              f"teacher makes {teacher.config.channels}-channel {teacher.config.image_size}px ones")
        if teacher.num_classes and info.num_classes not in (0, teacher.num_classes):
            raise GenlabError(f"dataset {info.name!r} has {info.num_classes} classes but the teacher has "
                              f"{teacher.num_classes}; distil on the teacher's data")
        model = cls(_student_config(config, teacher))
        model.net.load_state_dict(teacher.net.state_dict())
        model.attach_teacher(teacher)
        return model

    def attach_teacher(self, teacher: DiffusionModel) -> None:
        """Hold the frozen teacher and a target network that starts as a copy of the student (theta- = theta)."""
        self.teacher = teacher.requires_grad_(False).eval()
        self.target = copy.deepcopy(self.net).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ConsistencyModel:
        super().train(mode)
        for frozen in (self.teacher, self.target):
            if frozen is not None:
                frozen.eval()
        return self

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """The student's folder: the teacher's and the target network's weights are left out."""
        sd = state_dict if state_dict is not None else self.state_dict()
        return super().save_pretrained(directory, {k: v for k, v in sd.items()
                                                   if not k.startswith(("teacher.", "target."))})

    # -- the consistency function --------------------------------------------------------------------------------
    def consistency_function(self, net: nn.Module, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        """f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), y) with the consistency
        c_skip / c_out (Song et al. 2023, app. C) and EDM's c_in, c_noise = ln(sigma) / 4."""
        cfg = self.config
        c_skip, c_out = consistency_scalings(sigma, cfg.sigma_min, cfg.sigma_data)
        _, _, c_in, c_noise = edm_scalings(sigma, cfg.sigma_data)
        return denoised(x, net(x * c_in.view(-1, *[1] * (x.ndim - 1)), c_noise, cond), c_skip, c_out)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, quantize: bool = True) -> Tensor:
        """The student's f_theta(x, sigma, y) (time is continuous, so `quantize` does nothing)."""
        return self.consistency_function(self.net, x, sigma, cond)

    # -- training ------------------------------------------------------------------------------------------------
    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x_hat_{t_n}, t_n)) with n ~ U{1, ..., N-1},
        x_{t_{n+1}} = x0 + t_{n+1} z and x_hat_{t_n} one Heun step of the teacher's ODE (Song et al. 2023,
        Algorithm 2 and eq. 7, lambda(t_n) = 1); the teacher draws with its own x0 clamping, no guidance."""
        if self.teacher is None or self.target is None:
            raise GenlabError("this consistency model has no teacher: train it from a recipe with model.teacher")
        x0 = batch["x"]
        B = x0.shape[0]
        cfg = self.config
        n = torch.randint(0, cfg.num_scales - 1, (B,), device=x0.device)
        t_n, t_next = self.cd_sigmas[n], self.cd_sigmas[n + 1]
        y = self.training_labels(batch, x0.device)
        x_next = x0 + t_next.view(B, 1, 1, 1) * torch.randn_like(x0)
        with torch.no_grad():
            x_hat = heun_step(self.teacher.guided_denoiser(None), x_next, t_next, t_n, y)
            target = self.consistency_function(self.target, x_hat, t_n, y)
        pred = self.consistency_function(self.net, x_next, t_next, y)
        c = cfg.huber_c or 0.00054 * math.sqrt(x0[0].numel())
        return {"loss": consistency_distance(pred, target, cfg.loss, c).mean()}

    def configure_optimizers(self, train_cfg: Any) -> list[torch.optim.Optimizer]:
        """The default AdamW over the student; `train.grad_clip` is kept for `train_step`."""
        self.grad_clip = train_cfg.grad_clip
        return super().configure_optimizers(train_cfg)

    def train_step(self, batch: dict[str, Any], optimizers: list[Any], accelerator: Any, objective: Any
                   ) -> dict[str, Tensor]:
        """One AdamW step on the whole batch (train.grad_accum is not split), clipped by global norm, then the
        target update theta- <- stopgrad(mu theta- + (1 - mu) theta) (Song et al. 2023, Algorithm 2)."""
        (opt,) = optimizers
        losses = objective(batch)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(losses["loss"])
        norm = accelerator.clip_grad_norm_(self.net.parameters(), self.grad_clip if self.grad_clip > 0 else math.inf)
        opt.step()
        self.update_target()
        out = {k: v.detach().float() for k, v in losses.items()}
        if norm is not None:
            out["grad_norm"] = norm.detach().float()
        return out

    @torch.no_grad()
    def update_target(self) -> None:
        """theta- <- mu theta- + (1 - mu) theta; mu = 0 copies the student."""
        if self.target is None:
            return
        ours = [p.detach() for p in self.net.parameters()]
        torch._foreach_lerp_(list(self.target.parameters()), ours, 1.0 - self.config.target_decay)

    # -- sampling ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: Generators = None, *, steps: int = 1,
               progress: bool = False) -> Tensor:
        """Multistep consistency sampling (Song et al. 2023, Algorithm 1): x = f(sigma_max z, sigma_max), then for
        each later tau: x = f(x + sqrt(tau^2 - sigma_min^2) z, tau), each x clamped to [-1, 1]; `steps` network
        evaluations. `generator` may be a list of n generators: image i then depends on generator i only."""
        if not 1 <= n <= MAX_SAMPLES:
            raise GenlabError(f"n={n} is out of range; use 1..{MAX_SAMPLES}")
        check_int("steps", steps, 1, MAX_SAMPLING_STEPS)
        cfg = self.config
        device = self.alpha_bar.device
        labels = self.sampling_condition(n, cond, device)
        taus = consistency_sampling_sigmas(steps, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                                           tuple(cfg.sampling_sigmas)).tolist()
        shape = (n, cfg.channels, cfg.image_size, cfg.image_size)
        was_training = self.training
        self.eval()
        try:
            x = None
            for tau in taus:
                x = self.consistency_step(x, tau, randn(shape, generator, device), labels)
        finally:
            self.train(was_training)
        return x

    def consistency_step(self, x: Tensor | None, tau: float, z: Tensor, labels: Any = None) -> Tensor:
        """One step of multistep consistency sampling (Song et al. 2023, Algorithm 1): f(tau z, tau) for the first
        (x None), else f(x + sqrt(tau^2 - sigma_min^2) z, tau), clamped to [-1, 1]."""
        smin = self.config.sigma_min
        x_tau = tau * z if x is None else x + math.sqrt(tau**2 - smin**2) * z
        return self.denoise(x_tau, torch.full((len(z),), tau, device=z.device), labels).clamp(-1.0, 1.0)

    @torch.no_grad()
    def tune_sampling(self, make_score: Callable[[], Callable[[Tensor, Any], float]],
                      log: Callable[[str], None] = print) -> dict[str, Any]:
        """With `model.search_steps` = K >= 2: tau_2 > ... > tau_K of K-step sampling chosen greedily, one at a time
        with the earlier ones fixed, each by golden-section search on log sigma of `score(images, labels)` (FID
        against a validation split; Song et al. 2023, sec. 6 and app. C), on `model.search_n` samples with fixed
        noise and balanced labels; kept in `model.sampling_sigmas` (so in the model folder). The state after the
        fixed earlier steps is computed once, so a candidate costs one network evaluation a sample."""
        cfg = self.config
        if cfg.search_steps < 2:
            return {}
        score = make_score()
        n, device = cfg.search_n, self.alpha_bar.device
        g = torch.Generator().manual_seed(0)
        labels = self.sampling_condition(n, None, device)
        shape = (n, cfg.channels, cfg.image_size, cfg.image_size)
        noise = [torch.randn(shape, generator=g).to(device) for _ in range(cfg.search_steps)]
        chunks = [slice(i, min(i + 250, n)) for i in range(0, n, 250)]
        states: dict[tuple[float, ...], Tensor] = {}  # the samples after the steps at these times

        def run(taus: tuple[float, ...]) -> Tensor:
            if taus not in states:
                prev = run(taus[:-1]) if len(taus) > 1 else None
                k = len(taus) - 1
                states[taus] = torch.cat([self.consistency_step(
                    None if prev is None else prev[c], taus[-1], noise[k][c],
                    None if labels is None else labels[c]) for c in chunks])
            return states[taus]

        def objective(taus: list[float]) -> float:
            out = score(run(tuple(taus)), labels)
            for key in [k for k in states if len(k) == len(taus) and k != tuple(taus)]:
                if key[:-1] != tuple(taus[:-1]):
                    del states[key]  # a state whose prefix is no longer searched
            return out

        was_training = self.training
        self.eval()
        try:
            taus, best = greedy_times(objective, cfg.sigma_max, cfg.sigma_min, cfg.search_steps, cfg.search_iters)
        finally:
            self.train(was_training)
        cfg.sampling_sigmas = tuple(taus[1:])
        log("sampling times chosen on the validation split: " + ", ".join(
            f"{k + 2} steps: tau_{k + 2} = {t:.4g} (score {s:.4g})" for k, (t, s) in enumerate(zip(taus[1:], best,
                                                                                                    strict=True))))
        return {"sampling_sigmas": list(cfg.sampling_sigmas), "search_scores": best}

    def check_sample_config(self, sample_cfg: Any) -> None:
        check_int("sample.steps", sample_cfg.steps, 1, MAX_SAMPLING_STEPS)

    def write_preview(self, stem: Path, sample_cfg: Any, generator: torch.Generator) -> list[Path]:
        return few_step_preview(self, stem, sample_cfg, generator)
