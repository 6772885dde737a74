"""Property tests of the sampling controls: img2img, inpainting (pasting and RePaint), negative conditions and
guidance rescale, per-step previews, sampler options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_weights

from genlab.errors import GenlabError
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.registry import SAMPLERS
from genlab.sampling.controls import Guidance, Start, img2img_sigmas, iter_steps, repaint_schedule
from genlab.sampling.denoiser import classifier_free_guidance, rescale_guidance
from genlab.sampling.solvers import sampler_defaults, sampler_options

STEPS = 6

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    """A tiny class-conditional U-Net with every weight random (its zero-initialised output layers too)."""
    cfg = DiffusionConfig(image_size=8, channels=1, num_classes=3, base_channels=8, channel_mults=(1, 2),
                          num_res_blocks=1, attention_resolutions=(), head_channels=8, norm_groups=4, timesteps=100)
    m = DiffusionModel(cfg).eval()
    randomize_weights(m.net)
    return m


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _image(n: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1


def test_img2img_strength_0_returns_the_input(model):
    init = _image(3)
    out = model.sample(3, cond=[0, 1, 2], generator=_gens(3), sampler="euler", steps=STEPS,
                       start=Start(init, strength=0.0))
    torch.testing.assert_close(out, init, atol=0, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_ancestral"])
def test_img2img_strength_1_is_text_to_image(model, sampler):
    kw = {"cond": [0, 2], "sampler": sampler, "steps": STEPS, "guidance": Guidance(2.0)}
    t2i = model.sample(2, generator=_gens(2), **kw)
    i2i = model.sample(2, generator=_gens(2), start=Start(_image(), strength=1.0), **kw)
    torch.testing.assert_close(i2i, t2i, atol=0, rtol=0)


def test_img2img_walks_the_schedule_tail():
    sigmas = torch.linspace(10, 0, 11)
    assert torch.equal(img2img_sigmas(sigmas, 0.5), sigmas[5:])
    assert torch.equal(img2img_sigmas(sigmas, 0.0), sigmas[10:])
    with pytest.raises(GenlabError, match="strength"):
        img2img_sigmas(sigmas, 1.5)


def test_img2img_moves_toward_the_input_as_strength_falls(model):
    init = _image(4)
    dist = []
    for strength in (1.0, 0.6, 0.3):
        out = model.sample(4, cond=1, generator=_gens(4), sampler="euler", steps=10,
                           start=Start(init, strength=strength))
        dist.append((out - init).pow(2).mean().item())
    assert dist[0] > dist[1] > dist[2] > 0


def _half_mask() -> torch.Tensor:
    mask = torch.zeros(8, 8)
    mask[:, 4:] = 1  # generate the right half, keep the left
    return mask


@pytest.mark.parametrize("sampler,opts", [("euler", {}), ("dpmpp_2m", {}), ("unipc", {}), ("lms", {}),
                                          ("heun", {"s_churn": 1.0}), ("dpmpp_sde", {}), ("ddpm", {}),
                                          ("ddpm", {"repaint_jumps": 3, "repaint_jump_length": 2})])
def test_inpainting_keeps_the_known_region(model, sampler, opts):
    init, mask = _image(2), _half_mask()
    repaint = {k: v for k, v in opts.items() if k.startswith("repaint")}
    out = model.sample(2, cond=[0, 1], generator=_gens(2), sampler=sampler, steps=STEPS,
                       start=Start(init, mask=mask, **repaint), **{k: v for k, v in opts.items() if k not in repaint})
    torch.testing.assert_close(out[..., :4], init[..., :4], atol=0, rtol=0)
    assert (out[..., 4:] - init[..., 4:]).abs().max() > 0.1  # the masked half is generated anew


def test_inpainting_with_nothing_known_is_text_to_image(model):
    kw = {"cond": [2, 0], "sampler": "dpmpp_2m", "steps": STEPS}
    t2i = model.sample(2, generator=_gens(2), **kw)
    inpainted = model.sample(2, generator=_gens(2), start=Start(_image(), mask=torch.ones(8, 8)), **kw)
    torch.testing.assert_close(inpainted, t2i, atol=0, rtol=0)


def test_repaint_schedule_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for steps, jump_length, jump_n_sample in [(20, 5, 3), (12, 3, 2), (10, 10, 10), (7, 2, 1)]:
        sched = diffusers.RePaintScheduler(num_train_timesteps=1000)
        sched.set_timesteps(steps, jump_length=jump_length, jump_n_sample=jump_n_sample)
        # after diffusers' entry t (a step down from level t, or noising up to it) the image is at level t - 1,
        # which is sigma index steps - t here; the walk starts from pure noise at index 0
        levels = (sched.timesteps // (1000 // steps)).tolist()
        assert repaint_schedule(steps, jump_length, jump_n_sample) == [0] + [steps - t for t in levels]


def test_guidance_1_is_the_conditional_model(model):
    x, sigma, cond = torch.randn(3, 1, 8, 8), torch.full((3,), 2.0), torch.tensor([0, 1, 2])
    guided = classifier_free_guidance(model.denoise, 1.0, torch.full_like(cond, 3))
    torch.testing.assert_close(guided(x, sigma, cond), model.denoise(x, sigma, cond), atol=1e-5, rtol=0)
    out = model.sample(3, cond=cond, generator=_gens(3), sampler="heun", steps=STEPS, guidance=Guidance(1.0))
    sigmas = model.sampling_sigmas(STEPS)
    x_T = torch.stack([torch.randn(1, 8, 8, generator=g) for g in _gens(3)]) * (1 + sigmas[0] ** 2).sqrt()
    alone = SAMPLERS.get("heun")(lambda x, s, c: model.denoise(x, s, c).clamp(-1, 1), x_T, sigmas, cond)
    torch.testing.assert_close(out, alone.clamp(-1, 1), atol=1e-5, rtol=0)


def test_negative_label_replaces_the_null_class(model):
    """D_neg + w (D_cond - D_neg) with negative = cond is the conditional model at any scale; with negative =
    the null class it is plain classifier-free guidance."""
    kw = {"cond": [0, 1], "sampler": "euler", "steps": STEPS}
    same = model.sample(2, generator=_gens(2), guidance=Guidance(4.0, negative=[0, 1]), **kw)
    unguided = model.sample(2, generator=_gens(2), guidance=Guidance(1.0), **kw)
    torch.testing.assert_close(same, unguided, atol=1e-5, rtol=0)
    other = model.sample(2, generator=_gens(2), guidance=Guidance(4.0, negative=2), **kw)
    assert (other - model.sample(2, generator=_gens(2), guidance=Guidance(4.0), **kw)).abs().max() > 1e-3


def test_guidance_rescale_matches_diffusers():
    rescale_noise_cfg = pytest.importorskip(
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion").rescale_noise_cfg
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 3, 4, 4, generator=g) * 3, torch.tensor([2.5, 0.7])
    eps_cond, eps_null = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    eps_cfg = eps_null + 5.0 * (eps_cond - eps_null)
    s = sigma.view(-1, 1, 1, 1)
    for phi in (0.0, 0.7, 1.0):
        ours = rescale_guidance(x, sigma, x - s * eps_cfg, x - s * eps_cond, phi)
        theirs = x - s * rescale_noise_cfg(eps_cfg, eps_cond, guidance_rescale=phi)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_guidance_rescale_in_sample_changes_only_with_guidance(model):
    kw = {"cond": [0, 1], "sampler": "ddim", "steps": STEPS, "generator": None}
    a = model.sample(2, **{**kw, "generator": _gens(2)}, guidance=Guidance(1.0, rescale=0.7))
    b = model.sample(2, **{**kw, "generator": _gens(2)}, guidance=Guidance(1.0))
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # no guidance, nothing to rescale
    c = model.sample(2, **{**kw, "generator": _gens(2)}, guidance=Guidance(5.0, rescale=0.7))
    d = model.sample(2, **{**kw, "generator": _gens(2)}, guidance=Guidance(5.0))
    assert (c - d).abs().max() > 1e-4


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_streams_one_preview_per_step(name):
    sigmas = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.0])
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 5

    def denoiser(x, sigma, cond):
        return 0.2 * x / (1 + sigma.view(-1, 1) ** 2)

    seen = []
    out = SAMPLERS.get(name)(denoiser, x, sigmas, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(4))
    assert all(d["denoised"].shape == x.shape and float(d["sigma"]) == float(sigmas[d["i"]]) for d in seen)
    assert out.shape == x.shape


def test_iter_steps_yields_previews_then_the_result(model):
    kw = {"cond": 1, "sampler": "dpmpp_2m", "steps": STEPS}
    items = list(iter_steps(lambda cb: model.sample(2, generator=_gens(2), callback=cb, **kw)))
    assert [d["i"] for d in items[:-1]] == list(range(STEPS)) and items[-1]["done"]
    torch.testing.assert_close(items[-1]["x"], model.sample(2, generator=_gens(2), **kw), atol=0, rtol=0)
    # the last preview is the last denoised image the sampler returns (dpmpp_2m ends with x = denoised)
    torch.testing.assert_close(items[-2]["denoised"].clamp(-1, 1), items[-1]["x"], atol=0, rtol=0)


def test_iter_steps_stops_when_the_consumer_does(model):
    calls = []

    def run(cb):
        def counting(d):
            calls.append(d["i"])
            cb(d)
        return model.sample(1, cond=0, generator=_gens(1), sampler="euler", steps=20, callback=counting)

    it = iter_steps(run)
    assert next(it)["i"] == 0
    it.close()  # joins the worker: the sampler stopped after at most two more steps
    assert len(calls) <= 3


def test_iter_steps_reraises_the_samplers_error(model):
    with pytest.raises(GenlabError, match="no option"):
        list(iter_steps(lambda cb: model.sample(1, cond=0, sampler="euler", callback=cb, order=3)))


def test_sampler_options_are_checked():
    assert sampler_defaults("euler")["s_churn"] == 0.0 and "order" in sampler_defaults("unipc")
    assert sampler_options("euler_ancestral", eta=0.5) == {"eta": 0.5}
    assert sampler_options("euler_ancestral") == {}  # its own default eta = 1 stays
    with pytest.raises(GenlabError, match="s_churn"):
        sampler_options("euler", s_curn=1.0)
    with pytest.raises(GenlabError, match="eta"):
        sampler_options("heun", eta=0.5)


def test_control_mistakes_are_user_errors(model):
    with pytest.raises(GenlabError, match="mask"):
        Start(_image(), repaint_jumps=3)
    with pytest.raises(GenlabError, match="strength"):
        Start(_image(), strength=1.5)
    for scale, rescale in [(float("nan"), 0.0), (-1.0, 0.0), (2.0, 1.5)]:
        with pytest.raises(GenlabError, match="guidance"):
            Guidance(scale, rescale=rescale)
    with pytest.raises(GenlabError, match="resize"):
        model.sample(1, cond=0, start=Start(torch.zeros(1, 16, 16), strength=0.5))
    with pytest.raises(GenlabError, match="ddpm"):
        model.sample(1, cond=0, sampler="euler", start=Start(_image(), mask=_half_mask(), repaint_jumps=3))
    with pytest.raises(GenlabError, match="karras"):
        model.sample(1, cond=0, schedule="karas")


# -- the CLI -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


def _png(path, array):
    from PIL import Image

    Image.fromarray(array.astype(np.uint8), mode="L").save(path)
    return str(path)


def test_cli_lists_every_sampler_and_schedule(capsys):
    from genlab.cli import main

    assert main(["sample", "--list-samplers"]) == 0
    out = capsys.readouterr().out
    names = {line.split()[0] for line in out.splitlines() if line and not line.startswith("schedules")}
    assert {"euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m", "dpmpp_2m_sde",
            "dpmpp_3m_sde", "dpmpp_sde", "unipc", "ddim", "ddpm"} <= names
    assert "s_churn=0.0" in out and "karras, exponential, uniform, trailing" in out


@pytest.mark.parametrize("extra", [[], ["--repaint-jumps", "2", "--repaint-jump-length", "2", "--sampler", "ddpm"]])
def test_cli_inpainting_keeps_the_known_pixels(model_dir, tmp_path, extra):
    from PIL import Image

    from genlab.cli import main

    rng = np.random.default_rng(0)
    init = rng.integers(0, 256, (8, 8))
    mask = np.zeros((8, 8))
    mask[2:6, 2:6] = 255
    args = ["sample", str(model_dir), "--n", "2", "--steps", "4", "--label", "1", "--sampler", "dpmpp_2m",
            "--schedule", "karras", "--init-image", _png(tmp_path / "init.png", init), "--mask",
            _png(tmp_path / "mask.png", mask), "--out-dir", str(tmp_path / "out"), *extra]
    assert main(args) == 0
    for f in sorted((tmp_path / "out").glob("*.png")):
        img = np.asarray(Image.open(f).convert("L"), dtype=np.int64)
        assert np.array_equal(img[mask == 0], init[mask == 0])
        assert not np.array_equal(img[mask > 0], init[mask > 0])


def test_cli_img2img_options(model_dir, tmp_path, capsys):
    from PIL import Image

    from genlab.cli import main

    init = np.random.default_rng(1).integers(0, 256, (8, 8))
    out = tmp_path / "same.png"
    assert main(["sample", str(model_dir), "--n", "1", "--label", "0", "--init-image", _png(tmp_path / "i.png", init),
                 "--strength", "0", "--out", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("L"))[2:-2, 2:-2], init)  # inside the grid padding
    ok = ["sample", str(model_dir), "--n", "1", "--steps", "3", "--label", "2", "--out", str(tmp_path / "o.png")]
    assert main([*ok, "--sampler", "heun", "--opt", "s_churn=1.0", "--negative-label", "0",
                 "--guidance-rescale", "0.5"]) == 0
    capsys.readouterr()
    assert main([*ok, "--sampler", "euler", "--opt", "order=2"]) == 2
    assert "no option 'order'" in capsys.readouterr().err
    assert main([*ok, "--opt", "s_churn"]) == 2
    assert main([*ok, "--mask", "m.png"]) == 2
    assert main([*ok, "--schedule", "karas"]) == 2


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_2m_sde", "euler_ancestral"])
def test_stochastic_samplers_keep_per_image_seeds(model, sampler):
    """Image i depends on generator i alone (the Brownian path of the SDE solvers too)."""
    kw = {"sampler": sampler, "steps": STEPS, "guidance": Guidance(2.0)}
    batch = model.sample(3, cond=[0, 1, 2], generator=_gens(3), **kw)
    alone = model.sample(1, cond=[2], generator=_gens(1, seed=2), **kw)
    torch.testing.assert_close(batch[2:], alone, atol=1e-4, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 0.01
