"""Export genlab's DDPM U-Net with its noise schedule, and its KL autoencoder, as diffusers folders (`UNet2DModel` +
`DDPMScheduler` under a `DDPMPipeline` model_index.json; `AutoencoderKL`), where the architectures coincide.

The U-Net's ResNet blocks are diffusers' `ResnetBlock2D` with `time_embedding_norm="scale_shift"` (the adaptive
group norm of Dhariwal & Nichol 2021, sec. 3; genlab's second norm has no affine parameters, so diffusers' gets
weight 1 and bias 0); its timestep features are diffusers' `Timesteps(flip_sin_to_cos=True, freq_shift=0)`
(Vaswani et al. 2017, sec. 3.5); the DDPM posterior and the DDIM update are the same maps in the sigma form genlab
samples in (Ho et al. 2020, eqs. 6-7; Song et al. 2021, eq. 12). A block with no diffusers counterpart is refused
in one line naming it and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from genlab.errors import GenlabError
from genlab.models.autoencoder import AutoencoderKL, ResnetBlock
from genlab.models.diffusion import DiffusionModel
from genlab.nn.attention import SelfAttention2d
from genlab.nn.resnet import ResBlock
from genlab.nn.unet import UNet
from genlab.sampling.schedules import make_betas

BETA_SCHEDULE_NAMES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # sigmoid: DDIMScheduler lacks it
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _refuse(block: str, why: str) -> GenlabError:
    return GenlabError(f"cannot export to diffusers: {block} does not map ({why})")


# -- configs -------------------------------------------------------------------------------------------------------
def unet_config(model: DiffusionModel) -> dict[str, Any]:
    """The `UNet2DModel` config of the model's U-Net, or a GenlabError naming the first block that does not map."""
    cfg = model.config
    if cfg.preconditioning == "edm":
        raise _refuse("EDM preconditioning", "diffusers' UNet2DModel takes discrete timesteps, not c_noise = "
                      "ln(sigma) / 4 with c_in / c_skip / c_out scalings")
    if not isinstance(model.net, UNet):
        raise _refuse(f"backbone {cfg.backbone!r}", "only genlab's U-Net maps onto UNet2DModel")
    if model.net.context_dim:
        raise _refuse("cross-attention to text tokens", "UNet2DModel has no encoder_hidden_states; the text "
                      "U-Net would need UNet2DConditionModel and a text encoder")
    if model.autoencoder is not None:
        raise _refuse("latent diffusion", "diffusers' unconditional latent pipeline (LDMPipeline) decodes with a "
                      "VQModel, not a KL autoencoder with genlab's latent scale")
    levels = len(cfg.channel_mults)
    if cfg.image_size % 2 ** (levels - 1):
        raise _refuse(f"upsampling of a {cfg.image_size}px U-Net with {levels} levels", "genlab upsamples to each "
                      "skip's odd size, diffusers' Upsample2D doubles; use an image size divisible by "
                      f"{2 ** (levels - 1)}")
    widths = [cfg.base_channels * m for m in cfg.channel_mults]
    res, attn = cfg.image_size, []
    for _ in widths:
        attn.append(res in cfg.attention_resolutions)
        res = (res + 1) // 2
    attn_widths = [w for w, a in zip(widths, attn) if a] + [widths[-1]]  # the middle always attends
    if all(w >= cfg.head_channels for w in attn_widths):
        head_dim = cfg.head_channels
    elif all(w <= cfg.head_channels for w in attn_widths):
        head_dim = None  # one head per block: diffusers then uses the block's width as the head size
    else:
        raise _refuse(f"attention heads with head_channels={cfg.head_channels}", "some attention layers are "
                      "narrower than a head (genlab gives them one head) and others wider; UNet2DModel has one "
                      "attention_head_dim for all")
    num_classes = model.num_classes
    return {
        "sample_size": cfg.image_size, "in_channels": cfg.channels, "out_channels": cfg.channels,
        "center_input_sample": False, "time_embedding_type": "positional", "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": cfg.dropout,
        "act_fn": "silu", "attention_head_dim": head_dim, "norm_num_groups": cfg.norm_groups,
        "attn_norm_num_groups": cfg.norm_groups, "norm_eps": 1e-5, "resnet_time_scale_shift": "scale_shift",
        "add_attention": True, "class_embed_type": None,
        "num_class_embeds": num_classes + 1 if num_classes else None,  # genlab's null class is the last index
    }


def scheduler_config(model: DiffusionModel) -> dict[str, Any]:
    """The `DDPMScheduler` config of genlab's vp schedule (DDIMPipeline converts it to DDIMScheduler's): a schedule
    diffusers names by name, else the betas themselves (`trained_betas`)."""
    cfg = model.config
    named = cfg.schedule in BETA_SCHEDULE_NAMES
    betas = None if named else make_betas(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end).tolist()
    return {
        "num_train_timesteps": cfg.timesteps, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end,
        "beta_schedule": BETA_SCHEDULE_NAMES.get(cfg.schedule, "linear"), "trained_betas": betas,
        "variance_type": "fixed_small",
        "clip_sample": bool(cfg.clip_denoised), "clip_sample_range": 1.0, "prediction_type":
        PREDICTION_TYPES[cfg.prediction], "thresholding": False, "timestep_spacing": "leading", "steps_offset": 0,
        "rescale_betas_zero_snr": bool(cfg.zero_terminal_snr),
    }


def autoencoder_config(model: AutoencoderKL) -> dict[str, Any]:
    """The diffusers `AutoencoderKL` config, or a GenlabError naming the block that does not map."""
    cfg = model.config
    if cfg.patchify != 1:
        raise _refuse(f"patchify={cfg.patchify} (pixel unshuffle)", "diffusers' Encoder has no space-to-depth step")
    if len(cfg.channel_mults) > 1:
        raise _refuse("the encoder's Downsample", "genlab's stride-2 conv pads one pixel on every side while "
                      "diffusers' Encoder hard-codes downsample_padding=0 (pads right and bottom only), so encode "
                      "would differ; only single-level autoencoders (one channel_mult) map")
    widths = [cfg.base_channels * m for m in cfg.channel_mults]
    return {
        "in_channels": cfg.channels, "out_channels": cfg.channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths), "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks, "act_fn": "silu",
        "latent_channels": cfg.z_channels, "norm_num_groups": cfg.norm_groups, "sample_size": cfg.image_size,
        "scaling_factor": 1.0, "use_quant_conv": False, "use_post_quant_conv": False,
        "mid_block_add_attention": bool(cfg.attention),
    }


# -- weights -------------------------------------------------------------------------------------------------------
def _copy(dst: nn.Module, src: nn.Module) -> None:
    """Copy a leaf layer's parameters (same shapes) from genlab's `src` into diffusers' `dst`."""
    dst.load_state_dict(src.state_dict())


def _resblock(dst: nn.Module, src: ResBlock | ResnetBlock) -> None:
    """genlab ResBlock / autoencoder ResnetBlock -> diffusers ResnetBlock2D."""
    if isinstance(src, ResBlock):
        _copy(dst.norm1, src.norm1)
        _copy(dst.conv1, src.conv1)
        _copy(dst.time_emb_proj, src.emb)
        nn.init.ones_(dst.norm2.weight)  # genlab's second norm is not affine: the scale-shift replaces it
        nn.init.zeros_(dst.norm2.bias)
        _copy(dst.conv2, src.conv2)
    else:
        norm1, _, conv1, norm2, _, conv2 = src.block
        for d, s in ((dst.norm1, norm1), (dst.conv1, conv1), (dst.norm2, norm2), (dst.conv2, conv2)):
            _copy(d, s)
    if isinstance(src.skip, nn.Conv2d):
        _copy(dst.conv_shortcut, src.skip)


def _attention(dst: nn.Module, src: SelfAttention2d) -> None:
    """genlab SelfAttention2d (fused qkv, head-major within q, k and v) -> diffusers Attention."""
    _copy(dst.group_norm, src.norm)
    with torch.no_grad():
        for lin, w, b in zip((dst.to_q, dst.to_k, dst.to_v), src.qkv.weight.chunk(3), src.qkv.bias.chunk(3)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
    _copy(dst.to_out[0], src.proj)


def unet_to_diffusers(net: UNet, config: dict[str, Any]) -> nn.Module:
    """A diffusers UNet2DModel with `config` holding the weights of genlab's `net`."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(**config)
    _copy(unet.time_embedding.linear_1, net.time_embed.mlp[0])
    _copy(unet.time_embedding.linear_2, net.time_embed.mlp[2])
    if net.label_embed is not None:
        _copy(unet.class_embedding, net.label_embed.embed)
    _copy(unet.conv_in, net.conv_in)
    for blocks, levels, resamplers, sampler_name in ((unet.down_blocks, net.down, net.downsample, "downsamplers"),
                                                     (unet.up_blocks, net.up, net.upsample, "upsamplers")):
        for i, (block, level) in enumerate(zip(blocks, levels)):
            for j, res in enumerate(level.res):
                _resblock(block.resnets[j], res)
                if isinstance(level.attn[j], SelfAttention2d):
                    _attention(block.attentions[j], level.attn[j])
            if i < len(resamplers):
                _copy(getattr(block, sampler_name)[0].conv, resamplers[i].conv)
    _resblock(unet.mid_block.resnets[0], net.mid_res1)
    _attention(unet.mid_block.attentions[0], net.mid_attn)
    _resblock(unet.mid_block.resnets[1], net.mid_res2)
    _copy(unet.conv_norm_out, net.norm_out)
    _copy(unet.conv_out, net.conv_out)
    return unet.eval()


def _middle(dst: nn.Module, src: nn.Sequential) -> None:
    _resblock(dst.resnets[0], src[0])
    if len(src) == 3:
        _attention(dst.attentions[0], src[1])
    _resblock(dst.resnets[1], src[-1])


def autoencoder_to_diffusers(model: AutoencoderKL, config: dict[str, Any]) -> nn.Module:
    """A diffusers AutoencoderKL with `config` holding the weights of genlab's autoencoder."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    vae = DiffusersAutoencoderKL(**config)
    enc = list(model.encoder.net)
    _copy(vae.encoder.conv_in, enc[0])
    blocks = [m for m in enc if isinstance(m, ResnetBlock)]
    per_level = model.config.num_res_blocks
    for i, block in enumerate(vae.encoder.down_blocks):
        for j, resnet in enumerate(block.resnets):
            _resblock(resnet, blocks[i * per_level + j])
    _middle(vae.encoder.mid_block, enc[-4])
    _copy(vae.encoder.conv_norm_out, enc[-3])
    _copy(vae.encoder.conv_out, enc[-1])
    dec = model.decoder
    _copy(vae.decoder.conv_in, dec.conv_in)
    _middle(vae.decoder.mid_block, dec.middle)
    for i, (block, level) in enumerate(zip(vae.decoder.up_blocks, dec.levels)):
        for resnet, src in zip(block.resnets, level):
            _resblock(resnet, src)
        if i < len(dec.upsample):
            _copy(block.upsamplers[0].conv, dec.upsample[i].conv)
    _copy(vae.decoder.conv_norm_out, dec.out[0])
    _copy(vae.decoder.conv_out, dec.out[2])
    return vae.eval()


def export_diffusers(model: Any, out: Path) -> str:
    """Write `model` to `out` as a diffusers folder; returns what was written, in words."""
    if isinstance(model, AutoencoderKL):
        vae = autoencoder_to_diffusers(model, autoencoder_config(model))
        vae.save_pretrained(out, safe_serialization=True)
        return "diffusers AutoencoderKL (config.json + diffusion_pytorch_model.safetensors)"
    if not isinstance(model, DiffusionModel):
        raise GenlabError(f"cannot export a {model.family} model to diffusers; give a diffusion (U-Net, vp) or "
                          "autoencoder_kl model")
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = unet_to_diffusers(model.net, unet_config(model))
    scheduler = DDPMScheduler.from_config(scheduler_config(model))
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    kind = "class-conditional UNet2DModel (pass class_labels; the null class is the last)" if model.num_classes \
        else "DDPMPipeline / DDIMPipeline folder"
    return f"{kind}: unet/ + scheduler/ + model_index.json"
