"""Sampling controls that wrap a denoiser or a sampler without either knowing: img2img (SDEdit), inpainting with
the known region re-noised and pasted at every step, RePaint resampling, and per-step previews as an iterator.

Images here live in the sampler's space (pixels, or scaled latents for a latent model); `mask` is 1 where new
content is generated and 0 where the input is kept, broadcastable to the images.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from genlab.errors import GenlabError
from genlab.sampling.denoiser import Denoiser
from genlab.sampling.noise import NoiseSampler, default_noise_sampler
from genlab.sampling.solvers import sample_ddpm

Callback = Callable[[dict[str, Any]], None]
Sampler = Callable[..., Tensor]  # sampler(denoiser, x, sigmas, cond=, noise_sampler=, callback=, progress=)


# -- the options of a diffusion model's `sample`, grouped ----------------------------------
@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance (Ho & Salimans 2022): `scale` (1 = none) against the null condition or the
    `negative` one, with guidance `rescale` phi in [0, 1] (Lin et al. 2024, sec. 3.4; 0 = off)."""

    scale: float = 3.0
    negative: Any = None
    rescale: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise GenlabError(f"guidance scale {self.scale} must be a finite number >= 0 (1 = no guidance)")
        if not 0.0 <= self.rescale <= 1.0:
            raise GenlabError(f"guidance rescale {self.rescale} must be in [0, 1]")


@dataclass(frozen=True)
class Start:
    """Sampling that starts from an image: img2img (SDEdit) at `strength`, or inpainting where `mask` = 1 (default
    strength 1), with RePaint resampling when `repaint_jumps` > 1. `image` (pixels in [-1, 1]) and `mask` are
    (H, W), (C, H, W) or (1 or n, C, H, W); the model maps them to its sampler's space."""

    image: Tensor
    strength: float | None = None  # default: 0.8 for img2img, 1.0 with a mask
    mask: Tensor | None = None
    repaint_jumps: int = 1
    repaint_jump_length: int = 10

    def __post_init__(self) -> None:
        if self.strength is not None and not 0.0 <= self.strength <= 1.0:
            raise GenlabError(f"strength={self.strength} must be in [0, 1] (0 keeps the input, 1 ignores it)")
        if self.repaint_jumps > 1 and self.mask is None:
            raise GenlabError("RePaint resampling (repaint_jumps > 1) inpaints: give a mask as well")

    @property
    def resolved_strength(self) -> float:
        return self.strength if self.strength is not None else (1.0 if self.mask is not None else 0.8)

    def compose(self, sampler_name: str, sampler: Sampler, denoiser: Denoiser, sigmas: Tensor, noise: Tensor,
                init: Tensor, mask: Tensor | None) -> tuple[Sampler, Denoiser, Tensor, Tensor]:
        """(sampler, denoiser, sigmas, x_start) of this start composed from the controls below, given `init` and
        `mask` already in the sampler's space and the prior `noise`."""
        if self.repaint_jumps > 1 and sampler_name != "ddpm":
            raise GenlabError("RePaint resampling (repaint_jumps > 1) inpaints with ddpm steps: use sampler ddpm")
        strength = self.resolved_strength
        sigmas = img2img_sigmas(sigmas, strength)
        x = img2img_start(init, noise, sigmas, strength)
        if mask is None:
            return sampler, denoiser, sigmas, x
        if self.repaint_jumps > 1:
            repaint = functools.partial(sample_repaint, init=init, mask=mask, jump_length=self.repaint_jump_length,
                                        jump_n_sample=self.repaint_jumps)
            return repaint, denoiser, sigmas, x
        return sampler, inpaint_denoiser(denoiser, init, mask, noise), sigmas, x


# -- img2img (SDEdit) ------------------------------------------------------------------------
def img2img_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of a schedule that SDEdit walks: its last int(steps * strength) steps (Meng et al. 2022, sec. 3.1;
    the step count of diffusers' img2img pipelines)."""
    if not 0.0 <= strength <= 1.0:
        raise GenlabError(f"strength={strength} must be in [0, 1] (0 keeps the input, 1 ignores it)")
    steps = len(sigmas) - 1
    return sigmas[steps - min(int(steps * strength), steps):]


def img2img_start(init: Tensor, noise: Tensor, sigmas: Tensor, strength: float) -> Tensor:
    """x at the first sigma of the truncated schedule: init + sigma * noise (SDEdit's perturbation, eq. 3); at
    strength 1 the text-to-image prior noise * sqrt(1 + sigma^2) itself, as diffusers' inpainting pipelines do."""
    if strength >= 1.0:
        return noise * (1 + sigmas[0] ** 2).sqrt()
    return init + sigmas[0] * noise


# -- inpainting --------------------------------------------------------------------------------
def paste(x: Tensor, init: Tensor, mask: Tensor) -> Tensor:
    """Generated content where mask = 1, the input where mask = 0."""
    return mask * x + (1 - mask) * init


def inpaint_denoiser(denoiser: Denoiser, init: Tensor, mask: Tensor, noise: Tensor) -> Denoiser:
    """Before every call the known region of x is the input re-noised to the current sigma (init + sigma * noise),
    and the denoised known region is the input itself, so any sampler inpaints (Song et al. 2021, app. I.2;
    Lugmayr et al. 2022, eq. 8 without resampling)."""
    def inpaint(x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        s = sigma.view(-1, *[1] * (x.ndim - 1))
        x = paste(x, init + s * noise, mask)
        return paste(denoiser(x, sigma, cond), init, mask)

    return inpaint


def repaint_schedule(steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """The sigma indices RePaint visits (0 = noisiest, `steps` = clean): down one step at a time, and every
    `jump_length` steps back up `jump_length` steps, `jump_n_sample - 1` times (Lugmayr et al. 2022, sec. 4.2)."""
    if jump_length < 1 or jump_n_sample < 1:
        raise GenlabError(f"jump_length={jump_length} and jump_n_sample={jump_n_sample} must be at least 1")
    jumps = {j: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
    t, path = steps, [0]
    while t >= 1:
        t -= 1
        path.append(steps - t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                path.append(steps - t)
    return path


@torch.no_grad()
def sample_repaint(denoiser: Denoiser, x: Tensor, sigmas: Tensor, init: Tensor, mask: Tensor, cond: Any = None,
                   jump_length: int = 10, jump_n_sample: int = 10, noise_sampler: NoiseSampler | None = None,
                   callback: Callback | None = None, progress: bool = False) -> Tensor:
    """RePaint (Lugmayr et al. 2022, alg. 1): DDPM steps down with the known region drawn from q(x_t | init) and
    pasted; forward noising q(x_t | x_{t-1}) back up on each jump, so the generated region harmonises."""
    noise_sampler = noise_sampler or default_noise_sampler(x)
    path = repaint_schedule(len(sigmas) - 1, jump_length, jump_n_sample)
    for k, (a, b) in enumerate(tqdm(list(zip(path, path[1:])), disable=not progress, desc="repaint")):
        sigma, sigma_next = sigmas[a], sigmas[b]
        if b > a:  # denoise one step, then paste the known region at sigma_next
            step_callback = None
            if callback is not None:
                def step_callback(d: dict[str, Any], k: int = k) -> None:
                    callback({**d, "i": k})
            x = sample_ddpm(denoiser, x, sigmas[a:b + 1], cond, noise_sampler=noise_sampler, callback=step_callback)
            x = paste(x, init + sigma_next * noise_sampler(sigma, sigma_next), mask)
        else:  # x_t ~ N(x_{t-1}, (sigma_t^2 - sigma_{t-1}^2) I) in the variance-exploding view
            x = x + (sigma_next**2 - sigma**2).sqrt() * noise_sampler(sigma, sigma_next)
    return x


# -- per-step previews -------------------------------------------------------------------------
class _StoppedError(Exception):
    """Raised inside the sampler's thread when the consumer stops listening."""


def iter_steps(run: Callable[[Callback], Tensor]) -> Iterator[dict[str, Any]]:
    """Yield each step's dict (`i`, `sigma`, `x`, `denoised`: the current preview) while `run(callback)` samples
    in a worker thread, then a final {"done": True, "x": result}. The sampler waits for the consumer, so a
    streaming server never buffers more than one step; closing the iterator stops the sampling."""
    steps: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def callback(d: dict[str, Any]) -> None:
        while not stop.is_set():
            try:
                steps.put(("step", d), timeout=0.1)
                return
            except queue.Full:
                continue
        raise _StoppedError

    def work() -> None:
        try:
            result = ("done", run(callback))
        except _StoppedError:
            return
        except BaseException as e:  # handed to the consumer, which re-raises it
            result = ("error", e)
        while not stop.is_set():
            try:
                steps.put(result, timeout=0.1)
                return
            except queue.Full:
                continue

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while True:
            kind, value = steps.get()
            if kind == "error":
                raise value
            if kind == "done":
                yield {"done": True, "x": value}
                return
            yield value
    finally:
        stop.set()
        worker.join()
