"""ControlNet on the text-to-image model with a layout of boxes (Zhang et al. 2023): the box layout rasterizes to the
closed-form mask, training controls are the `shapes` ground truth's boxes, zero convolutions leave the base's outputs
unchanged at initialisation, two weighted controls add up their residuals, only the ControlNet trains, and
`genlab train` + `genlab sample --prompt ... --control a.png --control b.png --control-scale ...` end to end."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import randomize_weights
from PIL import Image
from scipy import ndimage

from genlab.cli import main
from genlab.data import load_dataset
from genlab.data.images import read_params
from genlab.data.shapes import shapes
from genlab.data.tokenizer import train_tokenizer
from genlab.errors import GenlabError
from genlab.eval.geneval import segment, to_uint8_hwc
from genlab.models.base import Conditioning, GenerativeModel
from genlab.models.controlnet import (
    BoxLayoutData,
    Control,
    ControlCondition,
    TextControlNetConfig,
    TextControlNetModel,
)
from genlab.models.t2i import TextDiffusionConfig, TextDiffusionModel
from genlab.nn.controlnet import box_layout
from genlab.sampling.controls import Guidance

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


def test_box_layout_is_the_closed_form_mask():
    # pixel (i, j) spans [j, j + 1) x [i, i + 1) and is inside when the box overlaps it: columns 2..5, rows 3..7
    m = box_layout([(2.2, 3.0, 5.6, 7.5)], 10)
    expected = torch.zeros(1, 10, 10)
    expected[0, 3:8, 2:6] = 1.0
    assert torch.equal(m, expected)
    assert torch.equal(box_layout([], 4), torch.zeros(1, 4, 4))
    rng = np.random.default_rng(0)
    for _ in range(20):  # against a loop over every pixel, boxes overlapping the border and each other
        boxes = [tuple(sorted(rng.uniform(-2, 14, 2))) for _ in range(3)]
        boxes = [(a[0], b[0], a[1], b[1]) for a, b in zip(boxes, boxes[::-1])]
        brute = torch.zeros(1, 12, 12)
        for i, j in itertools.product(range(12), range(12)):
            brute[0, i, j] = float(any(j + 1 > x0 and j < x1 and i + 1 > y0 and i < y1 for x0, y0, x1, y1 in boxes))
        assert torch.equal(box_layout(boxes, 12), brute)


def test_box_controls_are_the_ground_truth_boxes_and_cover_the_rendered_objects():
    ds = shapes("train", SIZE, n=16)
    data = BoxLayoutData(ds)
    batch = data.get_batch(list(range(16)))
    assert batch["control"].shape == (16, 1, SIZE, SIZE) and len(data) == 16
    imgs = to_uint8_hwc(batch["x"])
    for i in range(16):
        assert torch.equal(batch["control"][i], box_layout([o.box for o in ds.objects(i)], SIZE))
        fg = np.zeros((SIZE, SIZE), dtype=bool)
        for _, mask in segment(imgs[i]):
            fg |= mask
        inside = batch["control"][i, 0].numpy() > 0
        near = ndimage.binary_dilation(inside, np.ones((3, 3), dtype=bool))  # anti-aliasing reaches 1/4 pixel out
        assert fg.any() and not (fg & ~near).any()  # every object's pixels lie at its mask
        assert (fg & inside).sum() >= 0.9 * fg.sum()
        assert len(ds.objects(i)) == len(segment(imgs[i]))


CAPTIONS = ["a red circle", "a blue square", "a red circle left of a blue square", "two green stars"]


def _base() -> TextDiffusionModel:
    torch.manual_seed(0)
    tok = train_tokenizer("\n".join(CAPTIONS * 4 + shapes("train", SIZE, n=64).captions), "bpe", 300)
    cfg = TextDiffusionConfig(image_size=SIZE, channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                              attention_resolutions=(16,), head_channels=8, norm_groups=4, timesteps=100,
                              text_width=16, text_depth=1, text_heads=2, vocab_size=tok.vocab_size, max_tokens=128)
    model = TextDiffusionModel(cfg, tokenizer=tok).eval()
    randomize_weights(model)
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return _base().save_pretrained(tmp_path_factory.mktemp("tcn") / "base")


def _model(base_dir, **kw) -> TextControlNetModel:
    cfg = TextControlNetConfig(init_from=str(base_dir), control="boxes", **kw)
    return TextControlNetModel.build(cfg, load_dataset("shapes")).eval()


def _condition(model, prompts, scales=(1.0, 0.5), seed=0):
    g = torch.Generator().manual_seed(seed)
    controls = (torch.rand(len(prompts), len(scales), 1, SIZE, SIZE, generator=g) > 0.5).float()
    return ControlCondition(model.encode_prompts(prompts), controls, scales)


def test_text_controlnet_declares_text_and_control():
    assert {Conditioning.TEXT, Conditioning.CONTROL_IMAGE} <= TextControlNetModel.conditioning


def test_at_initialisation_outputs_equal_the_text_base_models_exactly(base_dir):
    model, base = _model(base_dir), GenerativeModel.from_pretrained(base_dir).eval()
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([10, 70])
    prompts = ["a red circle", "two green stars"]
    with torch.no_grad():
        c = base.encode_prompts(prompts)
        torch.testing.assert_close(model.backbone(x, t, _condition(model, prompts)),
                                   base.net(x, t, context=c.tokens, context_mask=c.mask), rtol=0, atol=0)
        g = [torch.Generator().manual_seed(i) for i in range(2)]
        a = model.sample(2, prompts, [torch.Generator().manual_seed(i) for i in range(2)], steps=3,
                         guidance=Guidance(3.0), control=Control(torch.ones(1, 1, SIZE, SIZE)))
        b = base.sample(2, prompts, g, steps=3, guidance=Guidance(3.0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_two_weighted_controls_add_their_residuals_and_guidance_keeps_them(base_dir):
    model = _model(base_dir)
    randomize_weights(model.controlnet, seed=4)
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([10, 50])
    prompts = ["a red circle", "a blue square"]
    with torch.no_grad():
        c = _condition(model, prompts, scales=(1.0, 0.5))
        ctx = {"context": c.labels.tokens, "context_mask": c.labels.mask}
        r = [model.controlnet(x, t, None, c.controls[:, k] * 2 - 1, **ctx) for k in range(2)]
        skips = [1.0 * a + 0.5 * b for a, b in zip(r[0][0], r[1][0])]
        expected = model.net(x, t, residuals=(skips, 1.0 * r[0][1] + 0.5 * r[1][1]), **ctx)
        torch.testing.assert_close(model.backbone(x, t, c), expected)
        off = ControlCondition(c.labels, c.controls, (0.0, 0.0))
        torch.testing.assert_close(model.backbone(x, t, off), model.net(x, t, **ctx))
        # guidance: D_null + w (D_c - D_null), the null half carrying the same controls
        sigma = torch.tensor([0.5, 1.5])
        guided = model.guided_denoiser(Guidance(4.0), c)(x, sigma, c)
        null = ControlCondition(model.encode_prompts(["", ""]), c.controls, c.scales)
        d_c, d_0 = model.denoise(x, sigma, c), model.denoise(x, sigma, null)
        torch.testing.assert_close(guided, (d_0 + 4.0 * (d_c - d_0)).clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_only_the_controlnet_trains_and_its_controls_are_the_boxes(base_dir):
    model = _model(base_dir).train()
    data = model.prepare_data(load_dataset("shapes"))
    batch = data.get_batch([0, 1, 2, 3])
    cond = model.training_labels(batch, torch.device("cpu"))
    assert torch.equal(cond.controls[:, 0], batch["control"])
    model.training_losses(batch)["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith("controlnet.") for n in with_grad)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_box_control_needs_shapes_and_the_base_must_be_text_to_image(base_dir, tmp_path):
    from types import SimpleNamespace

    model = _model(base_dir)
    fake = SimpleNamespace(info=SimpleNamespace(name="toy", kind="image", channels=3, image_size=SIZE,
                                                num_classes=0))
    with pytest.raises(GenlabError, match="data.name=shapes"):
        model.prepare_data(fake)
    from genlab.models.diffusion import DiffusionConfig, DiffusionModel

    DiffusionModel(DiffusionConfig(image_size=SIZE, channels=3, base_channels=8, channel_mults=(1,),
                                   num_res_blocks=1, attention_resolutions=(), norm_groups=4,
                                   timesteps=10)).save_pretrained(tmp_path / "d")
    with pytest.raises(GenlabError, match="give a trained text_diffusion model"):
        TextControlNetModel.build(TextControlNetConfig(init_from=str(tmp_path / "d")), fake)
    with pytest.raises(GenlabError, match="model.control='layout' is unknown"):
        TextControlNetModel.build(TextControlNetConfig(init_from=str(base_dir), control="layout"), fake)
    with pytest.raises(GenlabError, match="model.text_width=32 but model.init_from has 16"):
        TextControlNetModel.build(TextControlNetConfig(init_from=str(base_dir), text_width=32), fake)


def test_cli_trains_a_box_controlnet_and_samples_a_prompt_with_two_weighted_controls(base_dir, tmp_path, capsys):
    assert main(["train", "configs/shapes-layout.yaml", "--set", f"model.init_from={base_dir}",
                 "--set", "data.max_items=16", "--set", "train.steps=2", "--set", "train.batch_size=4",
                 "--set", "train.warmup_steps=1", "--set", "train.ckpt_every=0", "--set", "sample.n=2",
                 "--set", "sample.steps=2", "--set", f"out_dir={tmp_path}", "--set", "name=lay"]) == 0
    left, right = np.zeros((SIZE, SIZE), dtype=np.uint8), np.zeros((SIZE, SIZE), dtype=np.uint8)
    left[8:20, 2:14] = 255
    right[10:24, 18:30] = 255
    Image.fromarray(left, mode="L").save(tmp_path / "left.png")
    Image.fromarray(right, mode="L").save(tmp_path / "right.png")
    out = tmp_path / "s.png"
    assert main(["sample", str(tmp_path / "lay"), "--n", "2", "--steps", "2", "--prompt", "a red circle",
                 "--control", str(tmp_path / "left.png"), "--control", str(tmp_path / "right.png"),
                 "--control-scale", "1.0", "--control-scale", "0.5", "--out", str(out)]) == 0
    params = read_params(out)
    assert params["family"] == "text_controlnet" and params["control_scale"] == [1.0, 0.5]
    model = GenerativeModel.from_pretrained(tmp_path / "lay" / "model")
    base = GenerativeModel.from_pretrained(base_dir)
    for name, p in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name  # the base (U-Net and text encoder) stayed frozen


def test_layout_iou_matches_closed_forms():
    from genlab.eval.layout import box_iou, layout_iou

    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    img = np.full((1, 16, 16, 3), 255, dtype=np.uint8)
    img[0, 3:8, 2:6] = (220, 30, 30)  # one object covering pixels x 2..5, y 3..7: box (2, 3, 6, 8)
    x = torch.from_numpy(img).permute(0, 3, 1, 2)
    exact = layout_iou(x, [[(2, 3, 6, 8)]])
    assert exact["box_iou"].item() == pytest.approx(1.0) and exact["mask_iou"].item() == pytest.approx(1.0)
    # control box shifted right by 2: box IoU 2x5 / (20 + 20 - 10) = 1/3, mask the same
    shifted = layout_iou(x, [[(4, 3, 8, 8)]])
    assert shifted["box_iou"].item() == pytest.approx(1 / 3) and shifted["mask_iou"].item() == pytest.approx(1 / 3)
    # two control boxes, one missed: (1 + 0) / 2; an empty image against no boxes is a perfect match
    assert layout_iou(x, [[(2, 3, 6, 8), (10, 10, 14, 14)]])["box_iou"].item() == pytest.approx(0.5)
    blank = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    assert layout_iou(blank, [[]])["box_iou"].item() == 1.0
