"""Few-step families: consistency distillation (Song et al. 2023) and shortcut models (Frans et al. 2024), checked
against closed forms on Gaussian data (whose optimal denoiser, probability-flow ODE and flow map are known), the
boundary condition, the target network's EMA, the model folder and the CLI, with hostile inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_weights
from torch import Tensor, nn

from genlab.cli import main
from genlab.errors import GenlabError
from genlab.models.base import GenerativeModel
from genlab.models.consistency import (
    ConsistencyConfig,
    ConsistencyModel,
    cd_sigmas,
    consistency_sampling_sigmas,
    consistency_scalings,
    heun_step,
)
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.models.shortcut import ShortcutConfig, ShortcutModel
from genlab.sampling.greedy import golden_section_min, greedy_times

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 8
MU, S = 0.2, 0.1  # Gaussian data N(MU, S^2 I): inside [-1, 1], so clamping does not bite


def _teacher(preconditioning: str = "edm", num_classes: int = 10) -> DiffusionModel:
    torch.manual_seed(0)
    cfg = DiffusionConfig(image_size=SIZE, channels=1, num_classes=num_classes, base_channels=8, channel_mults=(1, 2),
                          num_res_blocks=1, attention_resolutions=(4,), head_channels=8, norm_groups=4,
                          timesteps=100, preconditioning=preconditioning)
    model = DiffusionModel(cfg).eval()
    randomize_weights(model.net)
    return model


def _dataset(num_classes: int = 10):
    return SimpleNamespace(info=SimpleNamespace(name="toy", kind="image", channels=1, image_size=SIZE,
                                                num_classes=num_classes))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return _teacher().save_pretrained(tmp_path_factory.mktemp("cd") / "teacher")


def _student(teacher_dir, **kw) -> ConsistencyModel:
    return ConsistencyModel.build(ConsistencyConfig(teacher=str(teacher_dir), **kw), _dataset())


# -- the consistency function ------------------------------------------------------------------------------------
def test_boundary_condition_holds_exactly_at_sigma_min(teacher_dir):
    c_skip, c_out = consistency_scalings(torch.tensor([0.002, 80.0]), 0.002, 0.5)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    # Song et al. 2023, app. C, by hand at sigma = 80: 0.25 / (79.998^2 + 0.25), 0.5 * 79.998 / sqrt(0.25 + 6400)
    assert c_skip[1].item() == pytest.approx(0.25 / (79.998**2 + 0.25), rel=1e-6)
    assert c_out[1].item() == pytest.approx(0.5 * 79.998 / math.sqrt(6400.25), rel=1e-6)
    model = _student(teacher_dir).eval()
    randomize_weights(model.net)
    x = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        f = model.denoise(x, torch.full((3,), model.config.sigma_min), torch.tensor([0, 1, 2]))
    assert torch.equal(f, x)


def test_cd_sigmas_are_the_karras_discretisation_ascending():
    t = cd_sigmas(18, 0.002, 80.0)
    n = 18
    by_hand = [(0.002 ** (1 / 7) + i / (n - 1) * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 for i in range(n)]
    assert t.tolist() == pytest.approx(by_hand, rel=1e-12)
    assert t[0].item() == 0.002 and t[-1].item() == 80.0
    taus = consistency_sampling_sigmas(2, 0.002, 80.0)
    assert taus[0].item() == pytest.approx(80.0) and 0.002 < taus[1].item() < 80.0 and len(taus) == 2


def test_student_starts_as_the_teachers_network(teacher_dir):
    teacher = GenerativeModel.from_pretrained(teacher_dir)
    model = _student(teacher_dir)
    for k, v in teacher.net.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v) and torch.equal(model.target.state_dict()[k], v)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert not any(p.requires_grad for p in model.target.parameters())


# -- the distillation target on Gaussian data --------------------------------------------------------------------
def gaussian_denoiser(x: Tensor, sigma: Tensor, cond=None) -> Tensor:
    """The optimal denoiser of N(MU, S^2 I): E[x0 | x0 + sigma z = x] = MU + S^2 / (S^2 + sigma^2) (x - MU)."""
    s2 = sigma.view(-1, 1, 1, 1) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


class GaussianTeacher(nn.Module):
    def guided_denoiser(self, guidance=None, labels=None):
        return gaussian_denoiser


def test_heun_step_matches_a_hand_computed_step_and_the_exact_ode():
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    a, b = torch.tensor([2.0, 0.7], dtype=torch.float64), torch.tensor([1.5, 0.6], dtype=torch.float64)
    out = heun_step(gaussian_denoiser, x, a, b)
    for i in range(2):  # scalar Heun: d = (x - D) / sigma, Euler, average of the two slopes
        sa, sb, xi = a[i].item(), b[i].item(), x[i]
        d1 = (xi - (MU + S**2 / (S**2 + sa**2) * (xi - MU))) / sa
        xe = xi + (sb - sa) * d1
        d2 = (xe - (MU + S**2 / (S**2 + sb**2) * (xe - MU))) / sb
        torch.testing.assert_close(out[i], xi + (sb - sa) * (d1 + d2) / 2, rtol=0, atol=1e-12)
        exact = MU + math.sqrt((S**2 + sb**2) / (S**2 + sa**2)) * (xi - MU)  # the PF-ODE's flow for Gaussian data
        torch.testing.assert_close(out[i], exact, rtol=0, atol=2e-3)


def test_cd_loss_uses_one_heun_step_of_the_teacher_and_the_target_network(teacher_dir):
    model = _student(teacher_dir, cond_drop=0.0)
    model.attach_teacher(GaussianTeacher())
    randomize_weights(model.target, seed=5)  # a target that differs from the student
    x0 = MU + S * torch.randn(4, 1, SIZE, SIZE)
    batch = {"x": x0, "label": torch.tensor([0, 3, 5, 9])}
    torch.manual_seed(7)
    loss = model.training_losses(batch)["loss"]
    torch.manual_seed(7)  # the same draws, by hand
    n = torch.randint(0, 17, (4,))
    z = torch.randn_like(x0)
    t = cd_sigmas(18, 0.002, 80.0)
    t_n, t_next = t[n].float(), t[n + 1].float()
    x_next = x0 + t_next.view(-1, 1, 1, 1) * z
    x_hat = heun_step(gaussian_denoiser, x_next, t_next, t_n)
    with torch.no_grad():
        target = model.consistency_function(model.target, x_hat, t_n, batch["label"])
        pred = model.consistency_function(model.net, x_next, t_next, batch["label"])
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean(), rtol=1e-5, atol=1e-7)


def test_pseudo_huber_loss_and_target_ema(teacher_dir):
    model = _student(teacher_dir, loss="pseudo_huber", target_decay=0.9)
    before = [p.detach().clone() for p in model.target.parameters()]
    opt = model.configure_optimizers(SimpleNamespace(weight_decay=0.0, lr=1e-2, betas=(0.9, 0.99), grad_clip=1.0))
    acc = SimpleNamespace(backward=lambda loss: loss.backward(),
                          clip_grad_norm_=lambda ps, m: torch.nn.utils.clip_grad_norm_(list(ps), m))
    batch = {"x": torch.rand(4, 1, SIZE, SIZE) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}
    out = model.train_step(batch, opt, acc, model.training_losses)
    assert math.isfinite(out["loss"].item()) and out["loss"].item() >= 0
    for old, new, p in zip(before, model.target.parameters(), model.net.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * p.detach(), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(o, p) for o, p in zip(before, model.net.parameters(), strict=True))


# -- multistep sampling with the exact consistency function ------------------------------------------------------
class ExactConsistencyF(nn.Module):
    """F such that c_skip x + c_out F = the exact map to sigma_min of N(MU, S^2 I)'s probability-flow ODE."""

    def __init__(self, sigma_min: float, sigma_data: float) -> None:
        super().__init__()
        self.sigma_min, self.sigma_data = sigma_min, sigma_data
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x_in: Tensor, c_noise: Tensor, cond=None) -> Tensor:
        sigma = (4 * c_noise).exp().view(-1, 1, 1, 1)
        x = x_in * (sigma**2 + self.sigma_data**2).sqrt()
        f = MU + ((S**2 + self.sigma_min**2) / (S**2 + sigma**2)).sqrt() * (x - MU)
        c_skip, c_out = consistency_scalings(sigma, self.sigma_min, self.sigma_data)
        return (f - c_skip * x) / c_out


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_sampling_with_the_exact_consistency_function_draws_the_data(teacher_dir, steps):
    model = _student(teacher_dir)
    model.net = ExactConsistencyF(model.config.sigma_min, model.config.sigma_data)
    x = model.sample(2000, 0, torch.Generator().manual_seed(0), steps=steps)
    assert abs(x.mean().item() - MU) < 0.005 and abs(x.std().item() - S) < 0.005


def test_consistency_folder_holds_the_student_alone_and_per_item_seeds(teacher_dir, tmp_path):
    model = _student(teacher_dir)
    d = model.save_pretrained(tmp_path / "cd")
    loaded = GenerativeModel.from_pretrained(d)
    assert type(loaded) is ConsistencyModel and loaded.teacher is None
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    a = loaded.sample(3, [1, 2, 3], gens, steps=2)
    b = model.eval().sample(1, [3], [torch.Generator().manual_seed(2)], steps=2)
    torch.testing.assert_close(a[2:], b, rtol=0, atol=1e-6)
    with pytest.raises(GenlabError, match="steps"):
        loaded.sample(2, steps=0)
    with pytest.raises(GenlabError, match="no teacher"):
        loaded.training_losses({"x": torch.zeros(2, 1, SIZE, SIZE), "label": torch.tensor([0, 1])})


def test_a_teacher_that_is_not_edm_or_not_a_diffusion_model_is_refused(tmp_path, teacher_dir):
    vp = _teacher("vp").save_pretrained(tmp_path / "vp")
    with pytest.raises(GenlabError, match="not EDM-preconditioned"):
        ConsistencyModel.build(ConsistencyConfig(teacher=str(vp)), _dataset())
    student = _student(teacher_dir).save_pretrained(tmp_path / "student")
    with pytest.raises(GenlabError, match="consistency model"):
        ConsistencyModel.build(ConsistencyConfig(teacher=str(student)), _dataset())
    with pytest.raises(GenlabError, match="model.teacher"):
        ConsistencyModel.build(ConsistencyConfig(), _dataset())
    with pytest.raises(GenlabError, match="model.base_channels"):
        ConsistencyModel.build(ConsistencyConfig(teacher=str(teacher_dir), base_channels=64), _dataset())
    with pytest.raises(GenlabError, match="model.loss"):
        ConsistencyModel.build(ConsistencyConfig(teacher=str(teacher_dir), loss="lpips"), _dataset())
    with pytest.raises(GenlabError, match="16px"):
        ConsistencyModel.build(ConsistencyConfig(teacher=str(teacher_dir)), SimpleNamespace(
            info=SimpleNamespace(name="toy", kind="image", channels=1, image_size=16, num_classes=10)))


# -- shortcut models ---------------------------------------------------------------------------------------------
def _variance(t: Tensor) -> Tensor:
    """Var of x_t = (1 - t) x0 + t eps per dimension, x0 ~ N(MU, S^2), eps ~ N(0, 1)."""
    return (1 - t) ** 2 * S**2 + t**2


class ExactShortcutNet(nn.Module):
    """s(x_t, t, d) of the Gaussian-to-Gaussian flow: its flow map is affine, x_{t'} = (1 - t') MU +
    sqrt(V(t') / V(t)) (x_t - (1 - t) MU), so s = (x_t - x_{t-d}) / d; at d = 0 the velocity
    E[eps - x0 | x_t] = (t - (1 - t) S^2) / V(t) (x_t - (1 - t) MU) - MU."""

    def __init__(self, net: nn.Module, timesteps: int, error: float = 0.0) -> None:
        super().__init__()
        self.time_embed, self.label_embed, self.timesteps = net.time_embed, net.label_embed, timesteps
        self.error = error  # a relative error of the shortcuts (d > 0): no longer self-consistent

    def forward(self, x: Tensor, t_scaled: Tensor, cond=None) -> Tensor:
        t = (t_scaled / self.timesteps).double().view(-1, 1, 1, 1)
        d = self.time_embed.d.double().view(-1, 1, 1, 1)
        x, centred = x.double(), x.double() - (1 - t) * MU
        velocity = (t - (1 - t) * S**2) / _variance(t) * centred - MU
        x_next = (1 - t + d) * MU + (_variance(t - d) / _variance(t)).sqrt() * centred
        return torch.where(d > 0, (1 + self.error * d) * (x - x_next) / d.clamp(min=1e-12), velocity).float()


def _shortcut(**kw) -> ShortcutModel:
    torch.manual_seed(0)
    cfg = ShortcutConfig(image_size=SIZE, channels=1, num_classes=10, base_channels=8, channel_mults=(1, 2),
                         num_res_blocks=1, attention_resolutions=(4,), head_channels=8, norm_groups=4, **kw)
    return ShortcutModel(cfg)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_exact_shortcut_network_gives_the_exact_few_step_sample(steps):
    model = _shortcut()
    model.net = ExactShortcutNet(model.net, model.config.timesteps)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    x = model.sample(4, 0, gens, steps=steps)
    eps = torch.stack([torch.randn(1, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    torch.testing.assert_close(x, MU + S * eps, rtol=0, atol=1e-5)  # the monotone map N(0, 1) -> N(MU, S^2)


def test_exact_shortcut_is_self_consistent_and_the_flow_loss_is_the_conditional_one():
    losses = {}
    for error in (0.0, 0.5):
        torch.manual_seed(0)
        model = _shortcut(bootstrap_fraction=0.5, cond_drop=0.0, t_sampling="uniform", max_steps=1024)
        model.net = ExactShortcutNet(model.net, model.config.timesteps, error)
        x0 = MU + S * torch.randn(512, 1, SIZE, SIZE)
        losses[error] = model.training_losses({"x": x0, "label": torch.zeros(512, dtype=torch.long)})
    # only the finest level (two Euler half-steps of 1/1024 on the velocity) is not exact: O(d^2)
    assert losses[0.0]["loss_sc"].item() < 1e-5 < 1e-3 < losses[0.5]["loss_sc"].item()
    # flow matching with the exact (marginal) velocity leaves E Var[eps - x0 | x_t] = 1 + S^2 - E[Cov^2 / V(t)]
    t = (torch.arange(10000, dtype=torch.float64) + 0.5) / 10000
    floor = (1 + S**2 - (t - (1 - t) * S**2) ** 2 / _variance(t)).mean().item()
    assert losses[0.0]["loss_fm"].item() == pytest.approx(floor, rel=0.25)


def test_shortcut_training_trains_every_parameter_and_the_step_embedding_matters():
    model = _shortcut()
    randomize_weights(model.net)
    batch = {"x": torch.rand(8, 1, SIZE, SIZE) * 2 - 1, "label": torch.arange(8)}
    out = model.training_losses(batch)
    out["loss"].backward()
    assert model.net.time_embed.step.mlp[0].weight.grad.abs().sum() > 0
    x, t, y = torch.randn(2, 1, SIZE, SIZE), torch.tensor([0.5, 1.0]), torch.tensor([1, 2])
    with torch.no_grad():
        a = model.shortcut(x, t, torch.tensor([0.5, 0.5]), y)
        b = model.shortcut(x, t, torch.tensor([0.25, 0.25]), y)
        c = model.shortcut(x, t, torch.tensor([1 / 128, 1 / 128]), y)
        v = model.shortcut(x, t, torch.zeros(2), y)
    assert not torch.allclose(a, b) and torch.equal(c, v)  # the finest step is the velocity


def test_shortcut_refuses_untrained_step_counts():
    model = _shortcut(max_steps=8)
    for steps in (0, 3, 16):
        with pytest.raises(GenlabError, match="1, 2, 4, ..., 8"):
            model.sample(2, steps=steps)
    with pytest.raises(GenlabError, match="power of two"):
        _shortcut(max_steps=12)
    with pytest.raises(GenlabError, match="bootstrap_fraction"):
        _shortcut(bootstrap_fraction=1.5)


# -- the CLI -----------------------------------------------------------------------------------------------------
TINY = ["--set", "data.image_size=8", "--set", "data.max_items=16", "--set", "train.steps=2", "--set",
        "train.batch_size=4", "--set", "train.warmup_steps=1", "--set", "train.ckpt_every=0", "--set",
        "train.log_every=1", "--set", "sample.n=2"]


def _refused(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2, argv
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and needle in err[0], err


def test_cli_distils_and_samples_in_few_steps(tmp_path, capsys):
    teacher = _teacher().save_pretrained(tmp_path / "teacher")
    # no search of the times here (it reads the MNIST feature network; the test below gives it a tiny one)
    assert main(["train", "mnist-cd", "--set", f"model.teacher={teacher}", *TINY, "--set", f"out_dir={tmp_path}",
                 "--set", "name=cd", "--set", "model.search_steps=0"]) == 0
    for steps in ("1", "2", "4"):
        out = tmp_path / f"cd{steps}.png"
        assert main(["sample", str(tmp_path / "cd"), "--n", "2", "--steps", steps, "--out", str(out)]) == 0
        assert out.is_file()
    capsys.readouterr()
    out = ["--out", str(tmp_path / "x.png")]
    _refused(capsys, ["sample", str(tmp_path / "cd"), "--steps", "0", *out], "--steps")
    _refused(capsys, ["sample", str(tmp_path / "cd"), "--sampler", "euler", *out], "sampler")
    vp = _teacher("vp").save_pretrained(tmp_path / "vp")
    for bad, needle in ((vp, "not EDM-preconditioned"), (tmp_path / "cd", "consistency model"),
                        (tmp_path / "none", "none")):
        _refused(capsys, ["train", "mnist-cd", "--set", f"model.teacher={bad}", *TINY, "--set",
                          f"out_dir={tmp_path}", "--set", "name=bad"], needle)


def test_cli_trains_a_shortcut_model_and_samples_in_few_steps(tmp_path, capsys):
    small = ["--set", "model.base_channels=8", "--set", "model.channel_mults=[1, 2]", "--set",
             "model.num_res_blocks=1", "--set", "model.attention_resolutions=[4]", "--set",
             "model.head_channels=8", "--set", "model.norm_groups=4"]
    assert main(["train", "mnist-shortcut", *small, *TINY, "--set", f"out_dir={tmp_path}", "--set", "name=sc"]) == 0
    for steps in ("1", "2", "4"):
        out = tmp_path / f"sc{steps}.png"
        assert main(["sample", str(tmp_path / "sc"), "--n", "2", "--steps", steps, "--out", str(out)]) == 0
        assert out.is_file()
    capsys.readouterr()
    _refused(capsys, ["sample", str(tmp_path / "sc"), "--steps", "3", "--out", str(tmp_path / "x.png")], "1, 2, 4")
    _refused(capsys, ["train", "mnist-shortcut", *small, *TINY, "--set", "sample.steps=6", "--set",
                      f"out_dir={tmp_path}", "--set", "name=bad"], "sample.steps=6")
    _refused(capsys, ["train", "mnist-shortcut", *small, *TINY, "--set", "model.max_steps=100", "--set",
                      f"out_dir={tmp_path}", "--set", "name=bad"], "power of two")


# -- the family table --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_family_table_distils_from_the_teacher_run_of_its_own_rows(tmp_path, monkeypatch):
    """cd-1 trains the EDM teacher first (the same run, key and folder as the teacher's own row), then distils from
    its model folder; the record keeps the teacher's training beside its own, and the cost check reads both."""
    import importlib.util
    import sys
    from pathlib import Path

    from conftest import tiny_feature_network

    if "families_bench" not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "benchmarks" / "families.py"
        spec = importlib.util.spec_from_file_location("families_bench", path)
        sys.modules["families_bench"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["families_bench"])
    fam = sys.modules["families_bench"]
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    tiny = ["model.base_channels=8", "model.channel_mults=[1, 2]", "model.num_res_blocks=1", "model.norm_groups=4",
            "model.head_channels=8", "train.batch_size=8", "data.max_items=64"]
    search = ["model.search_n=20", "model.search_iters=2"]
    s = fam.Settings(minutes=0.02, n=20, nll_n=2, batch=20, extra={"mnist-edm": tiny, "mnist-shortcut": tiny,
                                                                   "mnist-cd": ["train.batch_size=8", *search]})
    rows = [r for r in fam.ROWS if r.name in ("cd-1", "cd-2", "shortcut-1", "edm-ddpm-250")]
    rows = [fam.Row(**{**fam.asdict(r), "steps": 4}) if r.name == "edm-ddpm-250" else r for r in rows]
    measure = fam.Measure(tiny_feature_network())
    res = fam.run_rows(rows, s, tmp_path / "fam", measure=measure)
    cd1, cd2, r0 = res["rows"]["cd-1"], res["rows"]["cd-2"], res["rows"]["edm-ddpm-250"]
    assert res["trained"] == ["cd-1", "shortcut-1"]  # cd-2 and the teacher's own row reuse those runs
    assert cd1["train"]["teacher"]["train_flops"] == r0["train"]["train_flops"]
    assert cd1["nfe"] == 1 and cd2["nfe"] == 2 and r0["nfe"] >= 4 and math.isfinite(cd1["fid"])
    checks = {c["check"]: c for c in fam.acceptance(res["rows"])}
    cost = next(c for name, c in checks.items() if name.startswith("few steps: training FLOPs"))
    assert cost["result"] in ("pass", "fail") and "mnist-cd" in cost["detail"] and "mnist-shortcut" in cost["detail"]
    one = next(c for name, c in checks.items() if name.startswith("few steps: 1 step"))
    assert "cd-1" in one["detail"] and "shortcut-1" in one["detail"]
    # the times are chosen once at measurement (the search's 3 times), cached for cd-2, and kept out of training:
    # other search settings measure the CD rows again without training anything
    assert len(cd1["tuning"]["sampling_sigmas"]) == 3 and cd2["tuning"] == cd1["tuning"]
    assert cd2["sampling"] == {"steps": 2}
    s.extra["mnist-cd"] = ["train.batch_size=8", "model.search_n=24", "model.search_iters=2"]
    again = fam.run_rows(rows, s, tmp_path / "fam", measure=measure)
    assert again["trained"] == [] and again["measured"] == ["cd-1", "cd-2"]


# -- the intermediate times of multistep sampling, chosen greedily on a validation score -------------------------
def test_golden_section_and_greedy_search_find_a_known_optimum():
    x, fx = golden_section_min(lambda u: (u - 0.3) ** 2 + 1.0, -2.0, 5.0, 30)
    assert abs(x - 0.3) < 7 * 0.618**29 and fx == pytest.approx(1.0, abs=1e-6)
    targets = [80.0, 9.0, 1.5, 0.05]  # score: a k-step sampler's squared log distance to the first k targets
    calls: list[int] = []

    def score(taus: list[float]) -> float:
        calls.append(len(taus))
        return sum((math.log(t) - math.log(g)) ** 2 for t, g in zip(taus, targets, strict=False))

    taus, best = greedy_times(score, 80.0, 0.002, 4, 30)
    assert taus[0] == 80.0 and all(a > b for a, b in zip(taus, taus[1:], strict=False))
    torch.testing.assert_close(torch.tensor(taus), torch.tensor(targets), rtol=1e-4, atol=0)
    assert calls == [2] * 31 + [3] * 31 + [4] * 31 and max(best) < 1e-8  # greedy: one time at a time, in order
    with pytest.raises(GenlabError, match="empty"):
        golden_section_min(abs, 1.0, 1.0, 3)


class ExactDenoiserF(nn.Module):
    """F such that c_skip x + c_out F = E[x0 | x_sigma] of N(MU, S^2 I) (Tweedie): a consistency function that is
    right only at sigma_min, so the few-step sample's spread depends on the intermediate times in closed form."""

    def __init__(self, sigma_min: float, sigma_data: float) -> None:
        super().__init__()
        self.sigma_min, self.sigma_data = sigma_min, sigma_data
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x_in: Tensor, c_noise: Tensor, cond=None) -> Tensor:
        sigma = (4 * c_noise).exp().view(-1, 1, 1, 1)
        x = x_in * (sigma**2 + self.sigma_data**2).sqrt()
        d = MU + S**2 / (S**2 + sigma**2) * (x - MU)
        c_skip, c_out = consistency_scalings(sigma, self.sigma_min, self.sigma_data)
        return (d - c_skip * x) / c_out


def test_greedy_times_on_gaussian_data_match_the_closed_form(teacher_dir):
    """With the Tweedie denoiser as f, step k gives x_k - MU = c_k (x_{k-1} - MU + s_k z), c = S^2 / (S^2 + tau^2),
    s^2 = tau^2 - sigma_min^2, so Var x_k = S^4 (v + tau^2 - sigma_min^2) / (S^2 + tau^2)^2 (v = Var x_{k-1}), always
    below S^2: a score that wants the data's spread is best where that variance peaks, tau^2 = S^2 - 2 (v -
    sigma_min^2). The greedy search must land there for tau_2, then (given tau_2) for tau_3."""
    model = _student(teacher_dir, search_steps=3, search_n=400, search_iters=20)
    cfg = model.config
    model.net = ExactDenoiserF(cfg.sigma_min, cfg.sigma_data)
    seen_labels = []

    def make_score():
        def score(x: Tensor, labels) -> float:
            seen_labels.append(labels)
            return (x.mean().item() - MU) ** 2 + (x.std().item() - S) ** 2
        return score

    chosen = model.tune_sampling(make_score, log=lambda msg: None)
    smin2, smax = cfg.sigma_min**2, cfg.sigma_max
    v, expected = S**4 * smax**2 / (S**2 + smax**2) ** 2, []
    for _ in range(2):
        tau2 = S**2 - 2 * (v - smin2)
        expected.append(math.sqrt(tau2))
        v = S**4 * (v + tau2 - smin2) / (S**2 + tau2) ** 2
    assert chosen["sampling_sigmas"] == list(cfg.sampling_sigmas) and len(cfg.sampling_sigmas) == 2
    torch.testing.assert_close(torch.tensor(cfg.sampling_sigmas), torch.tensor(expected), rtol=0.02, atol=0)
    assert expected[1] < 0.8 * expected[0]  # the two optima are told apart
    assert torch.equal(seen_labels[0].bincount(), torch.full((10,), 40))  # balanced labels,
    assert all(torch.equal(y, seen_labels[0]) for y in seen_labels)  # the same for every candidate


def test_chosen_sigmas_are_kept_in_the_model_folder_and_used_by_sample(teacher_dir, tmp_path):
    model = _student(teacher_dir, sampling_sigmas=[2.0, 0.5, 0.1])
    loaded = GenerativeModel.from_pretrained(model.save_pretrained(tmp_path / "cd"))
    assert loaded.config.sampling_sigmas == (2.0, 0.5, 0.1)
    for steps in (2, 3, 4):
        assert consistency_sampling_sigmas(steps, 0.002, 80.0, 7.0, (2.0, 0.5, 0.1)).tolist() == \
            [80.0, 2.0, 0.5, 0.1][:steps]
    karras = consistency_sampling_sigmas(5, 0.002, 80.0, 7.0)
    torch.testing.assert_close(consistency_sampling_sigmas(5, 0.002, 80.0, 7.0, (2.0, 0.5, 0.1)), karras)  # fallback
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    got = loaded.sample(2, [3, 4], gens, steps=3)
    x, labels = None, torch.tensor([3, 4])
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with torch.no_grad():
        for tau in (80.0, 2.0, 0.5):  # Algorithm 1 by hand at the stored times, each image from its own generator
            z = torch.cat([torch.randn(1, 1, SIZE, SIZE, generator=g) for g in gens])
            x_tau = tau * z if x is None else x + math.sqrt(tau**2 - 0.002**2) * z
            x = loaded.denoise(x_tau, torch.full((2,), tau), labels).clamp(-1, 1)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)
    assert not torch.allclose(got, _student(teacher_dir).eval().sample(2, [3, 4], [torch.Generator().manual_seed(i)
                                                                                 for i in range(2)], steps=3))


@pytest.mark.parametrize("key, value, needle", [
    ("sampling_sigmas", "[1.0, 2.0]", "sampling_sigmas[1]"),
    ("sampling_sigmas", "[100.0]", "sampling_sigmas[0]"),
    ("sampling_sigmas", "[0.001]", "sampling_sigmas[0]"),
    ("sampling_sigmas", "[.nan]", "sampling_sigmas"),
    ("sampling_sigmas", "[true]", "sampling_sigmas"),
    ("sampling_sigmas", "5.0", "sampling_sigmas"),
    ("search_steps", "1", "search_steps=1"),
    ("search_steps", "-2", "search_steps"),
    ("search_n", "0", "search_n"),
    ("search_iters", "0", "search_iters"),
    ("search_iters", "1000", "search_iters"),
])
def test_hostile_sampling_time_options_are_one_line_errors(tmp_path, capsys, key, value, needle):
    teacher = _teacher().save_pretrained(tmp_path / "teacher")
    _refused(capsys, ["train", "mnist-cd", "--set", f"model.teacher={teacher}", *TINY, "--set", f"model.{key}={value}",
                      "--set", f"out_dir={tmp_path}", "--set", "name=bad"], needle)


def test_a_model_folder_with_hostile_sigmas_is_refused(teacher_dir, tmp_path):
    import json

    d = _student(teacher_dir).save_pretrained(tmp_path / "cd")
    meta = json.loads((d / "config.json").read_text())
    meta["config"]["sampling_sigmas"] = [0.5, 3.0]
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(GenlabError, match=r"sampling_sigmas\[1\]=3.0 must be a number in \(0.002, 0.5\)") as e:
        GenerativeModel.from_pretrained(d)  # what `genlab sample` loads first
    assert "\n" not in str(e.value)


def test_cli_training_chooses_the_times_on_the_training_split_and_sample_uses_them(tmp_path, capsys, monkeypatch):
    import json

    from conftest import tiny_feature_network

    import genlab.eval.tuning as tuning

    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "get_feature_network", lambda *a, **k: tiny_feature_network())
    splits = []
    real_reference = tuning.reference_features
    monkeypatch.setattr(tuning, "reference_features",
                        lambda fnet, data, split, **k: splits.append(split) or real_reference(fnet, data, split, **k))
    teacher = _teacher().save_pretrained(tmp_path / "teacher")
    assert main(["train", "mnist-cd", "--set", f"model.teacher={teacher}", *TINY, "--set", "model.search_steps=3",
                 "--set", "model.search_n=12", "--set", "model.search_iters=3", "--set", f"out_dir={tmp_path}",
                 "--set", "name=cd"]) == 0
    assert splits == ["train"]  # the test split is never read while choosing
    cfg = json.loads((tmp_path / "cd" / "model" / "config.json").read_text())["config"]
    taus = cfg["sampling_sigmas"]
    assert len(taus) == 2 and 80.0 > taus[0] > taus[1] > 0.002
    tune = [r for r in map(json.loads, (tmp_path / "cd" / "metrics.jsonl").read_text().splitlines())
            if r.get("split") == "tune"]
    assert tune and tune[0]["sampling_sigmas"] == taus and len(tune[0]["search_scores"]) == 2
    model = GenerativeModel.from_pretrained(tmp_path / "cd" / "model")
    assert list(model.config.sampling_sigmas) == taus
    assert main(["sample", str(tmp_path / "cd"), "--n", "2", "--steps", "3", "--out", str(tmp_path / "s.png")]) == 0
