"""U-Net building blocks against closed forms and diffusers, and the U-Net's structural properties."""

import math

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from genlab.nn.attention import SelfAttention2d
from genlab.nn.embeddings import LabelEmbedding, timestep_embedding
from genlab.nn.unet import UNet
from genlab.registry import BACKBONES


def _randomize(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised output layers do not hide bugs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_unet(**kw) -> UNet:
    args = dict(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), num_classes=3, head_channels=8, norm_groups=4)
    args.update(kw)
    torch.manual_seed(0)
    return _randomize(UNet(**args)).eval()


def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0.0, 1.0, 17.0, 999.0, 250.5])
    ours = timestep_embedding(t, 32)
    ref = get_timestep_embedding(t, 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_attention_matches_brute_force_softmax():
    torch.manual_seed(0)
    attn = _randomize(SelfAttention2d(16, head_channels=8, norm_groups=4), std=0.3)
    x = torch.randn(2, 16, 3, 5)
    h = attn.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, v = attn.qkv(h).chunk(3, dim=-1)
    heads = []
    for i in range(2):  # two heads of 8 channels
        sl = slice(8 * i, 8 * (i + 1))
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(8), dim=-1)
        heads.append(w @ v[..., sl])
    ref = x + attn.proj(torch.cat(heads, -1)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,mults", [(8, (1, 2)), (28, (1, 2, 2)), (7, (1, 2)), (12, (1, 2, 2))])
def test_unet_output_shape(size, mults):
    net = tiny_unet(image_size=size, channel_mults=mults, in_channels=3)
    x = torch.randn(2, 3, size, size)
    assert net(x, torch.tensor([5, 900]), torch.tensor([0, 2])).shape == x.shape


def test_unet_items_are_independent_of_the_batch():
    net = tiny_unet()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 50, 400, 999]), torch.tensor([0, 1, 2, 3])
    full = net(x, t, y)
    for i in range(4):
        torch.testing.assert_close(net(x[i : i + 1], t[i : i + 1], y[i : i + 1]), full[i : i + 1],
                                   atol=1e-5, rtol=1e-5)


def test_unet_label_and_timestep_change_the_output_and_none_is_the_null_class():
    net = tiny_unet()
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([100])
    out = {y: net(x, t, torch.tensor([y])) for y in range(4)}
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    assert not torch.allclose(net(x, torch.tensor([700]), torch.tensor([0])), out[0], atol=1e-4)
    torch.testing.assert_close(net(x, t, None), out[3])  # index num_classes is the null class


def test_fresh_unet_predicts_zero_and_trains_every_parameter():
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), num_classes=3, head_channels=8, norm_groups=4)
    x = torch.randn(2, 1, 8, 8)
    assert net(x, torch.tensor([3, 4]), torch.tensor([0, 1])).abs().max() == 0  # zero-initialised output conv
    _randomize(net)
    net(x, torch.tensor([3, 4]), torch.tensor([0, 3])).square().mean().backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert unused == [], unused


def test_label_dropout_rate_and_registry():
    emb = LabelEmbedding(10, 4)
    y = torch.zeros(20000, dtype=torch.long)
    dropped = (emb.drop(y, 0.25, torch.Generator().manual_seed(0)) == 10).float().mean().item()
    assert abs(dropped - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 20000)
    assert torch.equal(emb.drop(y, 0.0), y)
    assert BACKBONES.get("unet") is UNet
