"""Samplers: overhead against diffusers' schedulers on the same network, and accuracy per network evaluation.

    python benchmarks/samplers.py [--steps 20] [--repeats 3] [--threads N]

Speed: genlab's sampler over `DiffusionModel.denoise` and the matching diffusers scheduler loop drive the same
small U-Net (the mnist-ddpm shape, batch 16) for --steps steps; rounds alternate so that machine load hits both
alike and each figure is the best of --repeats; `speedup` = diffusers' time / genlab's. Accuracy: on Gaussian data
(x0 ~ N(0.3, 0.5^2)) the exact denoiser is closed form and the probability-flow ODE maps x_T to mu + s z exactly;
`ode_error_at_nfe` is the largest error of the final sample for a budget of network evaluations (Karras schedule
from 80 to 0.002; heun and dpm_2 spend two evaluations per step but one on the last). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genlab.models.diffusion import DiffusionConfig, DiffusionModel  # noqa: E402
from genlab.registry import SAMPLERS  # noqa: E402
from genlab.sampling.schedules import get_sigmas, karras_sigmas  # noqa: E402

# genlab sampler -> (diffusers scheduler, its options, genlab schedule, quantized t)
PAIRS = {
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "karras", False),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "karras", True),
    "unipc": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}, "karras", True),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}, "trailing", True),
}
ODE_SAMPLERS = {"euler": 1, "heun": 2, "dpm_2": 2, "lms": 1, "dpmpp_2m": 1, "unipc": 1}  # evaluations per step


def tiny_model() -> DiffusionModel:
    cfg = DiffusionConfig(image_size=28, channels=1, class_cond=False, base_channels=16, channel_mults=(1, 2),
                          num_res_blocks=1, attention_resolutions=(), head_channels=32, norm_groups=8)
    return DiffusionModel(cfg).eval()


def run_genlab(model: DiffusionModel, name: str, noise: torch.Tensor, steps: int) -> float:
    _, _, schedule, quantize = PAIRS[name]
    sigmas = get_sigmas(schedule, model.sigmas, steps)
    t0 = time.perf_counter()
    SAMPLERS.get(name)(functools.partial(model.denoise, quantize=quantize), noise * (1 + sigmas[0] ** 2).sqrt(),
                       sigmas)
    return time.perf_counter() - t0


@torch.no_grad()
def run_diffusers(model: DiffusionModel, name: str, noise: torch.Tensor, steps: int) -> float:
    import diffusers

    cls_name, opts, _, _ = PAIRS[name]
    t0 = time.perf_counter()
    sched = getattr(diffusers, cls_name)(num_train_timesteps=1000, beta_schedule="linear", **opts)
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = model.net(sched.scale_model_input(x, t), t.expand(x.shape[0]))
        x = sched.step(eps, t, x).prev_sample
    return time.perf_counter() - t0


def ode_error(name: str, nfe: int) -> float:
    mu, s, sigma_max = 0.3, 0.5, 80.0
    z = torch.linspace(-2, 2, 9, dtype=torch.float64).view(9, 1)

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, cond: object = None) -> torch.Tensor:
        return mu + s**2 / (s**2 + sigma.view(-1, 1) ** 2) * (x - mu)

    per_step = ODE_SAMPLERS[name]
    steps = (nfe + per_step - 1) // per_step  # the last step of heun / dpm_2 is a single Euler evaluation
    out = SAMPLERS.get(name)(denoiser, mu + z * math.sqrt(s**2 + sigma_max**2), karras_sigmas(steps, 0.002, sigma_max))
    return (out - (mu + z * s)).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = tiny_model()
    noise = torch.randn(16, 1, 28, 28)
    speed = {}
    for name in PAIRS:
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(run_genlab(model, name, noise, args.steps))
            theirs.append(run_diffusers(model, name, noise, args.steps))
        speed[name] = {"genlab_s": round(min(ours), 4), "diffusers_s": round(min(theirs), 4),
                       "speedup": round(min(theirs) / min(ours), 3)}
    accuracy = {name: {str(nfe): float(f"{ode_error(name, nfe):.3g}") for nfe in (10, 20, 40)} for name in ODE_SAMPLERS}
    print(json.dumps({"benchmark": "samplers", "steps": args.steps, "threads": torch.get_num_threads(),
                      "speed_vs_diffusers": speed, "ode_error_at_nfe": accuracy}))


if __name__ == "__main__":
    main()
