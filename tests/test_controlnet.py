"""ControlNet (Zhang et al. 2023): zero convolutions leave the base model's outputs unchanged, only the ControlNet
trains, the Sobel edge map and the edge F1 against brute force, and `genlab train` + `genlab sample --control`."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import randomize_weights
from PIL import Image

from genlab.cli import main
from genlab.data.images import read_params
from genlab.errors import GenlabError
from genlab.eval.edges import edge_f1
from genlab.models.base import GenerativeModel
from genlab.models.controlnet import Control, ControlCondition, ControlNetConfig, ControlNetModel
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.nn.controlnet import sobel_edges, sobel_magnitude, thin_edges
from genlab.sampling.controls import Guidance

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 12


def _base(image_size: int = SIZE, num_classes: int = 3) -> DiffusionModel:
    torch.manual_seed(0)
    cfg = DiffusionConfig(image_size=image_size, channels=1, num_classes=num_classes, base_channels=8,
                          channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(6,), head_channels=8,
                          norm_groups=4, timesteps=100)
    model = DiffusionModel(cfg).eval()
    randomize_weights(model.net)
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return _base().save_pretrained(tmp_path_factory.mktemp("controlnet") / "base")


def _dataset(image_size: int = SIZE):
    return SimpleNamespace(info=SimpleNamespace(name="toy", kind="image", channels=1, image_size=image_size,
                                                num_classes=3))


def test_build_refuses_a_base_of_other_data_or_keys(base_dir):
    with pytest.raises(GenlabError, match="10 classes"):
        ControlNetModel.build(ControlNetConfig(init_from=str(base_dir)),
                              SimpleNamespace(info=SimpleNamespace(**{**vars(_dataset().info), "num_classes": 10})))
    with pytest.raises(GenlabError, match="16px"):
        ControlNetModel.build(ControlNetConfig(init_from=str(base_dir)), _dataset(16))
    with pytest.raises(GenlabError, match="model.base_channels"):
        ControlNetModel.build(ControlNetConfig(init_from=str(base_dir), base_channels=64), _dataset())
    with pytest.raises(GenlabError, match="model.init_from"):
        ControlNetModel.build(ControlNetConfig(), _dataset())


def _model(base_dir) -> ControlNetModel:
    return ControlNetModel.build(ControlNetConfig(init_from=str(base_dir)), _dataset()).eval()


def _condition(labels: torch.Tensor, k: int = 2, seed: int = 0) -> ControlCondition:
    g = torch.Generator().manual_seed(seed)
    return ControlCondition(labels, torch.rand(len(labels), k, 1, SIZE, SIZE, generator=g).round(), (1.0, 0.5)[:k])


def test_at_initialisation_outputs_equal_the_base_models_exactly(base_dir):
    base, model = GenerativeModel.from_pretrained(base_dir).eval(), _model(base_dir)
    x, t, y = torch.randn(4, 1, SIZE, SIZE), torch.tensor([3, 30, 60, 99]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert torch.equal(model.backbone(x, t, _condition(y)), base.net(x, t, y))
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        ours = model.sample(3, [0, 1, 2], gens, steps=4, guidance=Guidance(3.0),
                            control=Control(torch.rand(2, 1, 1, SIZE, SIZE).round(), (1.0, 0.7)))
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        theirs = base.sample(3, [0, 1, 2], gens, steps=4, guidance=Guidance(3.0))
    assert torch.equal(ours, theirs)
    # the encoder copy starts as the base's encoder; once the zero convolutions move, the control acts
    copied, original = model.controlnet.encoder.down[0].res[0].conv1.weight, base.net.down[0].res[0].conv1.weight
    torch.testing.assert_close(copied, original)
    randomize_weights(model.controlnet, seed=3)
    with torch.no_grad():
        assert (model.backbone(x, t, _condition(y)) - base.net(x, t, y)).abs().max() > 1e-3
        a, b = model.backbone(x, t, _condition(y, seed=1)), model.backbone(x, t, _condition(y, seed=2))
    assert (a - b).abs().max() > 1e-4  # the output depends on the control image


def test_several_controls_add_their_residuals_by_scale(base_dir):
    model = _model(base_dir)
    randomize_weights(model.controlnet, seed=4)
    x, t, y = torch.randn(2, 1, SIZE, SIZE), torch.tensor([10, 50]), torch.tensor([1, 2])
    c = _condition(y)
    with torch.no_grad():
        r = [model.controlnet(x, t, y, c.controls[:, k] * 2 - 1) for k in range(2)]
        skips = [1.0 * a + 0.5 * b for a, b in zip(r[0][0], r[1][0])]
        expected = model.net(x, t, y, residuals=(skips, 1.0 * r[0][1] + 0.5 * r[1][1]))
        torch.testing.assert_close(model.backbone(x, t, c), expected)
        zero = ControlCondition(y, c.controls, (0.0, 0.0))
        torch.testing.assert_close(model.backbone(x, t, zero), model.net(x, t, y))


@pytest.mark.parametrize(("control", "make"), [("edges", sobel_edges), ("thin_edges", thin_edges)])
def test_training_controls_are_the_edge_maps_of_the_training_images(base_dir, control, make):
    model = ControlNetModel.build(ControlNetConfig(init_from=str(base_dir), control=control, edge_threshold=0.8),
                                  _dataset())
    x = torch.rand(3, 1, SIZE, SIZE) * 2 - 1
    cond = model.training_labels({"x": x, "label": torch.tensor([0, 1, 2])}, torch.device("cpu"))
    assert torch.equal(cond.controls[:, 0], make(x, 0.8)) and cond.scales == (1.0,)


def test_only_controlnet_parameters_get_gradients(base_dir):
    model = _model(base_dir).train()
    batch = {"x": torch.rand(4, 1, SIZE, SIZE) * 2 - 1, "label": torch.tensor([0, 1, 2, -1])}
    model.training_losses(batch)["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith("controlnet.") for n in with_grad)
    assert not any(p.requires_grad for p in model.net.parameters())
    assert all(p.requires_grad for p in model.controlnet.parameters())
    # the zero convolutions get gradients at once (their inputs are the copy's features; Zhang et al. 2023, sec. 3.1)
    assert model.controlnet.mid_zero_conv.weight.grad.abs().sum() > 0


def _brute_sobel(grey: np.ndarray) -> np.ndarray:
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    h, w = grey.shape
    out = np.zeros((h, w))
    for i, j in itertools.product(range(h), range(w)):
        gx = gy = 0.0
        for a, b in itertools.product(range(3), range(3)):
            v = grey[min(max(i + a - 1, 0), h - 1), min(max(j + b - 1, 0), w - 1)]
            gx += kx[a, b] * v
            gy += kx[b, a] * v
        out[i, j] = np.hypot(gx, gy)
    return out


def test_sobel_edges_match_a_brute_force_convolution():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 9, 11, generator=g) * 2 - 1
    images[1, :, :, 5:] = 1.0  # a flat region and a step
    mag = sobel_magnitude(images)
    for b in range(2):
        grey = ((images[b].double().mean(0) + 1) / 2).numpy()
        expected = _brute_sobel(grey)
        np.testing.assert_allclose(mag[b, 0].double().numpy(), expected, atol=1e-5)
        edges = sobel_edges(images[b : b + 1], threshold=1.0)[0, 0].numpy()
        assert np.array_equal(edges, (expected > 1.0).astype(np.float32))
    assert mag[1, 0, :, 7:].abs().max() == 0  # flat: no edge


def _brute_thin(grey: np.ndarray, threshold: float) -> np.ndarray:
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    h, w = grey.shape
    gx, gy = np.zeros((h, w)), np.zeros((h, w))
    for i, j in itertools.product(range(h), range(w)):
        for a, b in itertools.product(range(3), range(3)):
            v = grey[min(max(i + a - 1, 0), h - 1), min(max(j + b - 1, 0), w - 1)]
            gx[i, j] += kx[a, b] * v
            gy[i, j] += kx[b, a] * v
    mag = np.hypot(gx, gy)
    out = np.zeros((h, w))
    for i, j in itertools.product(range(h), range(w)):
        angle = np.degrees(np.arctan2(gy[i, j], gx[i, j])) % 180
        di, dj = [(0, 1), (1, 1), (1, 0), (1, -1)][int((angle + 22.5) // 45) % 4]

        def at(r, c):
            return mag[r, c] if 0 <= r < h and 0 <= c < w else 0.0

        if mag[i, j] > threshold and mag[i, j] >= at(i + di, j + dj) and mag[i, j] >= at(i - di, j - dj):
            out[i, j] = 1.0
    return out


def test_thin_edges_match_a_brute_force_non_maximum_suppression():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 1, 9, 10, generator=g) * 2 - 1
    images[1] = -1.0
    images[1, :, 2:7, 3:8] = 1.0  # a square: one-pixel-wide edges around it
    for b in range(2):
        grey = ((images[b, 0].double() + 1) / 2).numpy()
        assert np.array_equal(thin_edges(images[b : b + 1], 0.5)[0, 0].numpy(), _brute_thin(grey, 0.5))
    assert thin_edges(images[1:], 0.5).sum() < sobel_edges(images[1:], 0.5).sum()


def _brute_f1(out: np.ndarray, ctl: np.ndarray, tol: int) -> float:
    po, pc = np.argwhere(out), np.argwhere(ctl)
    if len(po) == 0 and len(pc) == 0:
        return 1.0

    def near(p, others):
        return any(max(abs(p[0] - q[0]), abs(p[1] - q[1])) <= tol for q in others)

    precision = sum(near(p, pc) for p in po) / max(len(po), 1)
    recall = sum(near(p, po) for p in pc) / max(len(pc), 1)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_edge_f1_matches_a_brute_force_toy():
    rng = np.random.default_rng(0)
    out = rng.random((6, 1, 7, 8)) < 0.2
    ctl = rng.random((6, 1, 7, 8)) < 0.2
    out[4], ctl[4] = False, False  # both empty
    out[5] = False  # only the output is empty
    for tol in (0, 1, 2):
        got = edge_f1(torch.tensor(out).float(), torch.tensor(ctl).float(), tol)
        expected = [_brute_f1(out[i, 0], ctl[i, 0], tol) for i in range(6)]
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    same = torch.tensor(out).float()
    assert torch.equal(edge_f1(same, same, 0), torch.ones(6))


def test_cli_trains_a_controlnet_and_samples_with_control(tmp_path, capsys):
    base = _base(8, num_classes=10).save_pretrained(tmp_path / "base")  # MNIST's ten digits
    assert main(["train", "mnist-controlnet", "--set", f"model.init_from={base}", "--set", "data.image_size=8",
                 "--set", "data.max_items=16", "--set", "train.steps=2", "--set", "train.batch_size=4",
                 "--set", "train.warmup_steps=1", "--set", "train.ckpt_every=0", "--set", "train.log_every=1",
                 "--set", "sample.n=3", "--set", "sample.steps=2", "--set", f"out_dir={tmp_path}",
                 "--set", "name=cn"]) == 0
    captured = capsys.readouterr()
    assert "trainable parameters:" in captured.out + captured.err
    edges = np.zeros((8, 8), dtype=np.uint8)
    edges[2:6, 2] = edges[2:6, 5] = 255
    Image.fromarray(edges, mode="L").save(tmp_path / "edges.png")
    out = tmp_path / "c.png"
    assert main(["sample", str(tmp_path / "cn"), "--n", "2", "--steps", "2", "--label", "1",
                 "--control", str(tmp_path / "edges.png"), "--control", str(tmp_path / "edges.png"),
                 "--control-scale", "1.0", "--control-scale", "0.5", "--out", str(out)]) == 0
    params = read_params(out)
    assert params["family"] == "controlnet" and params["control_scale"] == [1.0, 0.5]
    model = GenerativeModel.from_pretrained(tmp_path / "cn" / "model")
    base_model = GenerativeModel.from_pretrained(base)
    for name, p in base_model.net.state_dict().items():
        assert torch.equal(model.net.state_dict()[name], p), name  # the base stayed frozen
    assert main(["sample", str(base), "--n", "1", "--control", str(tmp_path / "edges.png"),
                 "--out", str(tmp_path / "d.png")]) == 2
    assert "does not take --control" in capsys.readouterr().err
