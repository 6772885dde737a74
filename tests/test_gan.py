"""The GAN family: penalties against their closed forms on discriminators whose input gradient is known, each loss
against its formula, the projection discriminator, DiffAugment's properties, a 2-D toy that learns, the model
folder, and the commands (train, sample, eval, nll refused)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genlab.cli import main
from genlab.models.base import GenerativeModel, Likelihood
from genlab.models.gan import (
    GAN,
    LOSSES,
    GANConfig,
    wgan_gradient_penalty,
    zero_centered_penalty,
)
from genlab.nn.diffaugment import cutout, diff_augment, translate
from genlab.nn.gan import Discriminator

pytestmark = pytest.mark.usefixtures("one_thread")


class LinearD(nn.Module):
    """D(x, y) = <w, x> + b: grad_x D = w everywhere."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x, y=None):
        return x.flatten(1) @ self.w + self.b


class QuadraticD(nn.Module):
    """D(x, y) = ||x||^2 / 2 + 0 * a: grad_x D = x."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(()))

    def forward(self, x, y=None):
        return 0.5 * x.flatten(1).pow(2).sum(1) + 0 * self.a


def _tiny(**kw) -> GAN:
    cfg = dict(image_size=8, channels=1, base_channels=4, channel_mults=(1, 2), z_dim=4, d_features=8)
    return GAN(GANConfig(**{**cfg, **kw}))


def test_r1_and_r2_equal_their_closed_forms():
    """gamma/2 E||grad D||^2 is gamma/2 ||w||^2 for a linear D and gamma/2 E||x||^2 for D = ||x||^2/2, taken at the
    real images for R1 and at the generated ones for R2 (Mescheder et al. 2018, eq. 9)."""
    torch.manual_seed(0)
    x = torch.randn(5, 1, 8, 8, requires_grad=True)
    d = LinearD(64)
    torch.testing.assert_close(zero_centered_penalty(d(x), x, 3.0), 1.5 * d.w.pow(2).sum())
    torch.testing.assert_close(zero_centered_penalty(QuadraticD()(x), x, 3.0), 1.5 * x.pow(2).sum((1, 2, 3)).mean())

    model = _tiny(num_classes=0, r1_gamma=2.0, r2_gamma=0.5)
    model.discriminator = QuadraticD()
    real = torch.randn(6, 1, 8, 8)
    torch.manual_seed(1)
    out = model.training_losses({"x": real, "label": torch.zeros(6, dtype=torch.long)})
    torch.manual_seed(1)
    with torch.no_grad():
        fake = model.generator(torch.randn(6, 4))
    torch.testing.assert_close(out["r1"], 1.0 * real.pow(2).sum((1, 2, 3)).mean())
    torch.testing.assert_close(out["r2"], 0.25 * fake.pow(2).sum((1, 2, 3)).mean())
    torch.testing.assert_close(out["loss"], out["d_loss"] + out["r1"] + out["r2"])


def test_wgan_gradient_penalty_equals_its_closed_form():
    """(||grad D(x_hat)|| - 1)^2 at x_hat = eps x + (1 - eps) x_fake (Gulrajani et al. 2017, eq. 3): (||w|| - 1)^2
    for a linear D, (||x_hat|| - 1)^2 for D = ||x||^2/2."""
    torch.manual_seed(0)
    real, fake, eps = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3), torch.rand(4)
    d = LinearD(9)
    torch.testing.assert_close(wgan_gradient_penalty(d, real, fake, eps), (d.w.norm() - 1) ** 2)
    x_hat = eps.view(4, 1, 1, 1) * real + (1 - eps.view(4, 1, 1, 1)) * fake
    torch.testing.assert_close(wgan_gradient_penalty(QuadraticD(), real, fake, eps),
                               (x_hat.flatten(1).norm(dim=1) - 1).pow(2).mean())
    model = _tiny(num_classes=0, loss="wgan_gp", gp_weight=10.0)
    model.discriminator = LinearD(64)
    out = model.training_losses({"x": torch.randn(3, 1, 8, 8), "label": torch.zeros(3, dtype=torch.long)})
    torch.testing.assert_close(out["gp"], 10.0 * (model.discriminator.w.norm() - 1) ** 2)


def test_each_loss_equals_its_formula():
    real, fake = torch.tensor([2.0, -0.5, 0.3]), torch.tensor([-1.0, 0.7, 1.5])
    bce = F.binary_cross_entropy_with_logits
    expected = {  # (D's loss, G's loss), from torch's BCE, log-sigmoid and plain arithmetic
        "nonsaturating": (bce(real, torch.ones(3)) + bce(fake, torch.zeros(3)), bce(fake, torch.ones(3))),
        "hinge": (torch.tensor([0.0, 1.5, 0.7]).mean() + torch.tensor([0.0, 1.7, 2.5]).mean(), -fake.mean()),
        "wgan_gp": (fake.mean() - real.mean(), -fake.mean()),
        "relativistic": (-F.logsigmoid(real - fake).mean(), -F.logsigmoid(fake - real).mean()),
    }
    assert set(expected) == set(LOSSES)
    for name, (d_ref, g_ref) in expected.items():
        d_loss, g_loss = LOSSES[name]
        torch.testing.assert_close(d_loss(real, fake), d_ref, msg=name)
        torch.testing.assert_close(g_loss(real, fake), g_ref, msg=name)


@pytest.mark.parametrize("arch", ["resnet", "dcgan"])
def test_projection_discriminator_follows_its_formula(arch):
    """D(x, y) = psi(phi(x)) + <V_y, phi(x)>: D(x, a) - D(x, b) = <V_a - V_b, phi(x)> (Miyato & Koyama 2018, eq. 3)."""
    torch.manual_seed(0)
    d = Discriminator(arch, [4, 8], image_size=8, channels=1, num_classes=5, features=6).eval()
    x = torch.randn(3, 1, 8, 8)
    a, b = torch.tensor([0, 1, 4]), torch.tensor([2, 2, 3])
    with torch.no_grad():
        phi = d.features(x)
        diff = d(x, a) - d(x, b)
        torch.testing.assert_close(diff, ((d.embed.weight[a] - d.embed.weight[b]) * phi).sum(1))
        torch.testing.assert_close(d(x, a), d.psi(phi).squeeze(1) + (d.embed.weight[a] * phi).sum(1))
    assert not torch.allclose(diff, torch.zeros(3))


def test_translation_moves_pixels_and_keeps_their_sum_inside_the_frame():
    """With a zero border at least as wide as the shift, translation is a roll: same pixels, same sum."""
    x = torch.zeros(2, 3, 10, 10)
    x[:, :, 3:7, 3:7] = torch.rand(2, 3, 4, 4) + 0.1
    shifts = torch.tensor([[2, -3], [-1, 0]])
    out = translate(x, shifts)
    for b in range(2):
        torch.testing.assert_close(out[b], torch.roll(x[b], tuple(shifts[b].tolist()), dims=(1, 2)))
    torch.testing.assert_close(out.sum((1, 2, 3)), x.sum((1, 2, 3)))
    full = torch.rand(1, 1, 6, 6)  # without the border, what leaves the frame is lost and zeros come in
    moved = translate(full, torch.tensor([[0, 2]]))
    assert (moved[..., :2] == 0).all() and torch.equal(moved[..., 2:], full[..., :4])


def test_cutout_zeroes_one_square_and_keeps_the_rest():
    x = torch.rand(2, 1, 8, 8) + 0.5
    out = cutout(x, torch.tensor([[1, 2], [-2, 6]]), 4)
    zero = out == 0
    assert zero[0, 0, 1:5, 2:6].all() and zero[0].sum() == 16
    assert zero[1, 0, 0:2, 6:8].all() and zero[1].sum() == 4  # clipped at the corner
    assert torch.equal(out[~zero], x[~zero])


def test_diffaugment_reaches_both_real_and_generated_images_and_passes_gradients():
    """D sees augmented real and generated images alike (cutout zeroes a square in every one of all-ones inputs),
    and G's gradient flows through the augmentation."""
    model = _tiny(num_classes=0, diffaugment=True)
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.ones(()))

        def forward(self, x, y=None):
            seen.append(x.detach().clone())
            return self.a * x.flatten(1).sum(1)

    class Ones(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Parameter(torch.ones(()))

        def forward(self, z, y=None):
            return self.c * torch.ones(z.shape[0], 1, 8, 8)

    model.discriminator, model.generator = Recorder(), Ones()
    model.training_losses({"x": torch.ones(4, 1, 8, 8), "label": torch.zeros(4, dtype=torch.long)})
    assert len(seen) == 2 and all(((s == 0).flatten(1).sum(1) >= 4).all() for s in seen)
    g = model.training_losses({"x": torch.ones(4, 1, 8, 8), "label": torch.zeros(4, dtype=torch.long)},
                              part="generator")
    g["loss"].backward()
    assert model.generator.c.grad is not None and model.generator.c.grad != 0
    x = torch.rand(3, 1, 16, 16, requires_grad=True)
    diff_augment(x, torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and set(x.grad.unique().tolist()) <= {0.0, 1.0}


def test_a_two_dimensional_toy_moves_the_generated_mean_to_the_data():
    """Tiny MLPs for G and D on a 4-component Gaussian mixture centred at (3, -2), trained by the family's own
    train_step (relativistic loss, R1 and R2): the generated mean ends much nearer the data's than it started."""
    torch.manual_seed(0)
    model = _tiny(num_classes=0, r1_gamma=0.1, r2_gamma=0.1)

    class MLP(nn.Module):
        def __init__(self, d_in, d_out):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(d_in, 32), nn.LeakyReLU(0.2), nn.Linear(32, d_out))

        def forward(self, x, y=None):
            out = self.net(x)
            return out.squeeze(1) if out.shape[1] == 1 else out

    model.generator, model.discriminator = MLP(4, 2), MLP(2, 1)
    optimizers = model.configure_optimizers(SimpleNamespace(lr=4e-3, betas=(0.5, 0.99), weight_decay=0.0,
                                                            grad_clip=10.0))
    accelerator = SimpleNamespace(backward=lambda loss: loss.backward(), clip_grad_norm_=nn.utils.clip_grad_norm_)
    centres = torch.tensor([3.0, -2.0]) + torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])

    def gen_mean():
        with torch.no_grad():
            return model.generator(torch.randn(2000, 4)).mean(0)

    target = centres.mean(0)
    start = (gen_mean() - target).norm()
    for _ in range(150):
        x = centres[torch.randint(0, 4, (64,))] + 0.1 * torch.randn(64, 2)
        out = model.train_step({"x": x, "label": torch.zeros(64, dtype=torch.long)}, optimizers, accelerator,
                               model.training_losses)
    assert {"loss", "g_loss", "d_loss", "r1", "r2", "d_real", "d_fake", "d_grad_norm", "g_grad_norm"} <= set(out)
    assert (gen_mean() - target).norm() < 0.25 * start


def test_model_folder_round_trip_and_per_item_seeds(tmp_path):
    torch.manual_seed(0)
    model = _tiny(num_classes=3, arch="dcgan").eval()
    folder = model.save_pretrained(tmp_path / "gan")
    again = GenerativeModel.from_pretrained(folder).eval()
    assert isinstance(again, GAN) and again.likelihood is Likelihood.NONE

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a = model.sample(3, cond=[0, 1, 2], generator=gens(5, 6, 7))
    torch.testing.assert_close(again.sample(3, cond=[0, 1, 2], generator=gens(5, 6, 7)), a, rtol=0, atol=0)
    torch.testing.assert_close(again.sample(1, cond=1, generator=gens(6)), a[1:2], rtol=0, atol=1e-6)  # batch-size ulps
    assert a.shape == (3, 1, 8, 8) and a.abs().max() <= 1
    assert again.labels_for(4).tolist() == [0, 0, 1, 1]


def test_cli_train_sample_eval_and_nll_refused(tmp_path, monkeypatch, capsys):
    """`genlab train` (2 steps on MNIST), `genlab sample --label`, `genlab eval --metrics fid --n 8`, and a clear
    one-line refusal of --metrics nll; the trainer logs both losses, the penalties and D's mean outputs."""
    from genlab.data import load_dataset
    from genlab.eval import features as FE

    ds = load_dataset("mnist").subset(128)
    recipe = FE.FeatureRecipe(width=4, feature_dim=8, epochs=1, batch_size=128)
    net, meta = FE.train_feature_network(ds, None, recipe, "classifier", progress=False)
    meta.update(hash="tiny0000", dataset="mnist", recipe=vars(recipe), recipe_version=FE.RECIPE_VERSION)
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(FE, "get_feature_network", lambda *a, **k: FE.FeatureNetwork(net, meta))

    recipe_path = tmp_path / "gan.yaml"
    recipe_path.write_text(json.dumps({
        "name": "gan", "family": "gan", "out_dir": str(tmp_path / "runs"),
        "data": {"name": "mnist", "max_items": 64},
        "model": {"base_channels": 4, "channel_mults": [1, 2, 2], "z_dim": 8, "d_features": 8,
                  "loss": "relativistic", "r1_gamma": 1.0, "r2_gamma": 1.0},
        "train": {"steps": 2, "batch_size": 8, "warmup_steps": 0, "log_every": 1, "ema_decay": 0.5},
        "sample": {"n": 10}}))
    assert main(["train", str(recipe_path)]) == 0
    run = tmp_path / "runs" / "gan"
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"g_loss", "d_loss", "r1", "r2", "d_real", "d_fake"} <= set(rec[0])
    assert main(["sample", str(run), "--n", "4", "--label", "3", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    out = tmp_path / "ev"
    assert main(["eval", str(run), "--data", "mnist", "--metrics", "fid", "--n", "8", "--out", str(out)]) == 0
    assert json.loads((out / "eval.json").read_text())["n_fake"] == 8
    capsys.readouterr()
    assert main(["eval", str(run), "--data", "mnist", "--metrics", "nll", "--out", str(tmp_path / "nll")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no likelihood" in err and "gan" in err
