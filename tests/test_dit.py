"""DiT backbone: shapes, adaLN-Zero identity at init, position embedding against diffusers, backbone choice,
and a tiny DiT that memorizes a handful of digits."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from genlab.config import DataConfig
from genlab.data import load_dataset
from genlab.errors import GenlabError
from genlab.models.diffusion import DiffusionConfig, DiffusionModel
from genlab.nn.dit import Attention, DiT, sincos_pos_embed_2d
from genlab.nn.unet import UNet
from genlab.sampling.controls import Guidance

TINY = dict(in_channels=3, image_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def test_shapes_and_null_class():
    """eps has the input's shape; y=None means the null class, which the label embedding's drop() produces."""
    torch.manual_seed(0)
    net = DiT(**TINY)
    for block in net.blocks:  # leave the zero init so labels matter
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.1)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999])
    null = torch.full((3,), 5)
    assert net(x, t, null).shape == x.shape
    assert torch.equal(net(x, t, None), net(x, t, null))
    assert not torch.allclose(net(x, t, torch.tensor([0, 1, 2])), net(x, t, null))
    assert torch.equal(net.label_embed.drop(torch.tensor([0, 1, 2]), 1.0), null)


def test_adaln_zero_blocks_start_as_identity():
    """At init every block maps x to x exactly (zero gates) and the output layer is zero (Peebles & Xie, 3.2)."""
    torch.manual_seed(0)
    net = DiT(**TINY)
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in net.blocks:
        assert torch.equal(block(h, c), h)
    out = net(torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 4]))
    assert torch.equal(out, torch.zeros_like(out))
    # ...and stops being the identity once the modulation is trained away from zero
    torch.nn.init.normal_(net.blocks[0].adaLN_modulation[-1].weight)
    assert not torch.allclose(net.blocks[0](h, c), h)


def test_unpatchify_inverts_patch_layout():
    """Tokens in row-major patch order, each a p x p x C patch, reassemble into the image (a brute-force loop)."""
    net = DiT(in_channels=2, image_size=6, patch_size=3, hidden_size=16, depth=1, num_heads=1)
    img = torch.randn(1, 2, 6, 6)
    tokens = torch.empty(1, 4, 18)
    for k in range(4):
        r, c = divmod(k, 2)
        patch = img[0, :, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3]  # (C, p, p)
        tokens[0, k] = patch.permute(1, 2, 0).reshape(-1)  # (p, q, C) flattened, as the final linear lays it out
    assert torch.equal(net.unpatchify(tokens), img)


def test_attention_matches_torch_multihead_attention():
    """The DiT's self-attention (fused qkv, heads split from it) equals torch's nn.MultiheadAttention given the
    same weights: a head split or merge in the wrong order would mix tokens wrongly and fail this."""
    torch.manual_seed(0)
    ours = Attention(24, 3)
    ref = torch.nn.MultiheadAttention(24, 3, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim,grid", [(32, 4), (64, 7)])
def test_position_embedding_matches_diffusers(dim, grid):
    ref = get_2d_sincos_pos_embed(dim, grid, base_size=grid, interpolation_scale=1.0, output_type="pt")
    torch.testing.assert_close(sincos_pos_embed_2d(dim, grid), ref.float(), atol=1e-6, rtol=0)


def test_diffusion_config_chooses_the_backbone():
    """The same DiffusionConfig builds a U-Net or a DiT by name; bad DiT sizes name the key to change."""
    common = dict(image_size=8, channels=1, num_classes=3, hidden_size=32, depth=1, num_heads=2)
    assert isinstance(DiffusionModel(DiffusionConfig(backbone="dit", **common)).net, DiT)
    assert isinstance(DiffusionModel(DiffusionConfig(backbone="unet", attention_resolutions=(), **common)).net, UNet)
    with pytest.raises(GenlabError, match="model.patch_size"):
        DiffusionModel(DiffusionConfig(backbone="dit", patch_size=3, **common))
    with pytest.raises(GenlabError, match="model.hidden_size"):
        DiffusionModel(DiffusionConfig(backbone="dit", **{**common, "hidden_size": 30}))
    with pytest.raises(GenlabError, match="unknown backbone"):
        DiffusionModel(DiffusionConfig(backbone="vit", **common))


def test_dit_diffusion_trains_and_round_trips(tmp_path):
    """A DiT diffusion model lowers its loss on one fixed batch and samples identically after save/load."""
    torch.manual_seed(0)
    model = DiffusionModel(DiffusionConfig(backbone="dit", image_size=8, channels=1, num_classes=2, hidden_size=32,
                                           depth=2, num_heads=2, cond_drop=0.0))
    batch = {"x": torch.rand(8, 1, 8, 8) * 2 - 1, "label": torch.arange(8) % 2}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        torch.manual_seed(1)  # the same t and eps every step: a pure regression problem
        loss = model.training_losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.save_pretrained(tmp_path / "m")
    loaded = DiffusionModel.from_pretrained(tmp_path / "m")
    kw = dict(cond=[0, 1], steps=4, guidance=Guidance(2.0))
    a = model.sample(2, generator=torch.Generator().manual_seed(3), **kw)
    b = loaded.sample(2, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)


def test_tiny_dit_memorizes_a_handful_of_digits():
    """A tiny DiT trained on four MNIST digits (one per label) for 200 steps reproduces each from pure noise when
    asked for its label (deterministic DDIM, written out here), and at a fixed noise level its x0 error falls far
    below that of the best constant predictor (the mean image). A DiT whose label embedding does not reach the
    blocks, whose positions are missing or whose adaLN gates never open draws the same blur for every label."""
    size, n = 12, 4
    ds = load_dataset(DataConfig(name="mnist", image_size=size))
    batch = ds.get_batch([int((ds.labels == c).nonzero()[0]) for c in range(n)])
    x0, y = batch["x"], batch["label"]
    torch.manual_seed(0)
    model = DiffusionModel(DiffusionConfig(backbone="dit", image_size=size, channels=1, num_classes=n, patch_size=2,
                                           hidden_size=64, depth=2, num_heads=4, cond_drop=0.0, prediction="x0"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(200):
        loss = model.training_losses({"x": x0.repeat(2, 1, 1, 1), "label": y.repeat(2)})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    net, alpha_bar = model.net.eval(), model.alpha_bar
    with torch.no_grad():
        x = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(1))
        ts = torch.linspace(999, 0, 25).round().long()
        for i, t in enumerate(ts):  # DDIM, eta = 0 (Song et al. 2021, eq. 12)
            ab, ab_prev = alpha_bar[t], alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x0_hat = net(x, t.expand(n), y).clamp(-1, 1)
            eps = (x - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
            x = ab_prev.sqrt() * x0_hat + (1 - ab_prev).sqrt() * eps
        dist = ((x[:, None] - x0[None]) ** 2).flatten(2).mean(2)  # (sample, training image)
        assert dist.argmin(1).tolist() == list(range(n))
        assert dist.diag().max() < 0.05
        t = torch.full((8 * n,), 500)
        xs, ab = x0.repeat(8, 1, 1, 1), alpha_bar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * xs + (1 - ab).sqrt() * torch.randn(xs.shape, generator=torch.Generator().manual_seed(2))
        err = ((net(x_t, t, y.repeat(8)) - xs) ** 2).mean()
    assert err < 0.25 * ((x0 - x0.mean(0)) ** 2).mean()


def _unzeroed(net: DiT) -> DiT:
    """The net with its adaLN regressions and output layer drawn at random, so that no block is the identity."""
    for block in net.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.1)
    return net


def test_long_skips_pair_shallow_and_deep_blocks_as_written_out():
    """U-ViT's long skips (Bao et al. 2023, sec. 3.1) in a depth-5 DiT: block 3 reads Linear_1([h, block 1's
    output]), block 4 reads Linear_0([h, block 0's output]), block 2 is the middle; written out by hand. A pairing
    off by one (or a skip taken before its block) gives other numbers."""
    torch.manual_seed(0)
    net = _unzeroed(DiT(**{**TINY, "depth": 5}, long_skip=True))
    assert len(net.skip_linears) == 2 and len(DiT(**{**TINY, "depth": 6}, long_skip=True).skip_linears) == 2
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    b, skip = net.blocks, net.skip_linears
    plain = h
    for block in b:
        plain = block(plain, c)
    torch.testing.assert_close(net.run_blocks(h, c), plain)  # each skip starts by passing h through
    for layer in skip:
        torch.nn.init.normal_(layer.weight, std=0.1)
    h0 = b[0](h, c)
    h1 = b[1](h0, c)
    h2 = b[2](h1, c)
    h3 = b[3](skip[1](torch.cat([h2, h1], -1)), c)
    h4 = b[4](skip[0](torch.cat([h3, h0], -1)), c)
    torch.testing.assert_close(net.run_blocks(h, c), h4)
    assert not torch.allclose(net.run_blocks(h, c), plain, atol=1e-3)


def test_final_conv_is_a_3x3_conv_of_the_unpatchified_output_and_starts_at_zero():
    """With final_conv the output is conv3x3(unpatchify(final layer)) (U-ViT's output conv), an identity filter at
    init, so the whole net still outputs zero (adaLN-Zero's zero output layer); without the options the
    parameters are exactly those of a plain DiT, so older model folders still load."""
    torch.manual_seed(0)
    net = DiT(**TINY, long_skip=True, final_conv=True)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 4])
    assert torch.equal(net(x, t, y), torch.zeros_like(x))
    assert torch.equal(net.final_conv(x), x)
    _unzeroed(net)
    torch.nn.init.normal_(net.final_conv.weight)
    torch.nn.init.normal_(net.final_conv.bias)
    c = net.t_embedder(t) + net.label_embed(y)
    h = net.run_blocks(net.x_embedder(x).flatten(2).transpose(1, 2) + net.pos_embed, c)
    raw = net.unpatchify(net.final_layer(h, c))
    expected = torch.nn.functional.conv2d(raw, net.final_conv.weight, net.final_conv.bias, padding=1)
    torch.testing.assert_close(net(x, t, y), expected)
    assert set(DiT(**TINY).state_dict()) == {k for k in net.state_dict()
                                             if not k.startswith(("skip_linears", "final_conv"))}
    model = DiffusionModel(DiffusionConfig(backbone="dit", image_size=8, channels=1, num_classes=2, hidden_size=32,
                                           depth=3, num_heads=2, long_skip=True, final_conv=True))
    assert len(model.net.skip_linears) == 1 and model.net.final_conv is not None
