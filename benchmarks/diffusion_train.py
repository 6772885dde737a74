"""Training speed of genlab's U-Net vs diffusers' `UNet2DModel` at matched size (the mnist-ddpm shape).

    python benchmarks/diffusion_train.py [--batch 32] [--steps 10] [--repeats 3] [--threads N]

Both models get the same batch (28x28 grey, class labels, timesteps) and the same AdamW; one training step is
forward + MSE loss + backward + optimizer step. genlab runs channels-last; diffusers runs both as it comes
(contiguous) and channels-last, and the ratio is taken against diffusers' faster layout. Steps of the two models
alternate so that machine load hits both alike; each figure is the best of --repeats timed rounds. FLOPs are
counted with `torch.utils.flop_counter.FlopCounterMode`. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genlab.nn.unet import UNet  # noqa: E402


def genlab_unet() -> torch.nn.Module:
    net = UNet(in_channels=1, image_size=28, base_channels=16, channel_mults=(1, 2, 4), num_res_blocks=2,
               attention_resolutions=(7,), num_classes=10, head_channels=32, norm_groups=8)
    return net


def diffusers_unet() -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(16, 32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=32, num_class_embeds=11, resnet_time_scale_shift="scale_shift",
    )


def make_step(net: torch.nn.Module, call, batch: dict[str, torch.Tensor], channels_last: bool):
    """A closure running one training step (forward, MSE on eps, backward, AdamW)."""
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        batch = {**batch, "x": batch["x"].contiguous(memory_format=torch.channels_last)}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        loss = torch.nn.functional.mse_loss(call(net, batch), batch["eps"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return net, step


def flops_per_image(net: torch.nn.Module, call, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs for one image."""
    one = {k: v[:1] for k, v in batch.items()}
    with FlopCounterMode(display=False) as fc:
        call(net, one)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.mse_loss(call(net, one), one["eps"]).backward()
    net.zero_grad(set_to_none=True)
    return fwd, fc.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model per round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B = args.batch
    batch = {"x": torch.randn(B, 1, 28, 28), "eps": torch.randn(B, 1, 28, 28),
             "t": torch.randint(0, 1000, (B,)), "y": torch.randint(0, 11, (B,))}

    def call_genlab(net, b):
        return net(b["x"], b["t"], b["y"])

    def call_diffusers(net, b):
        return net(b["x"], b["t"], class_labels=b["y"]).sample

    models = {
        "genlab": (genlab_unet(), call_genlab, True),
        "diffusers": (diffusers_unet(), call_diffusers, False),
        "diffusers_channels_last": (diffusers_unet(), call_diffusers, True),
    }
    info, steps = {}, {}
    for name, (net, call, cl) in models.items():
        fwd, train = flops_per_image(net, call, batch)
        info[name] = {"params": sum(p.numel() for p in net.parameters()), "fwd_flops_per_image": fwd,
                      "train_flops_per_image": train}
        _, steps[name] = make_step(net, call, batch, cl)
        for _ in range(2):  # warm-up
            steps[name]()
    best = {name: float("inf") for name in models}
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
    ips = {name: B / best[name] for name in models}
    peer = max(ips["diffusers"], ips["diffusers_channels_last"])
    print(json.dumps({
        "benchmark": "diffusion_train", "batch": B, "threads": torch.get_num_threads(),
        "images_per_s": {k: round(v, 1) for k, v in ips.items()},
        "ratio_genlab_vs_diffusers": round(ips["genlab"] / peer, 3),
        "ratio_genlab_vs_diffusers_default": round(ips["genlab"] / ips["diffusers"], 3),
        "params": {k: v["params"] for k, v in info.items() if k != "diffusers_channels_last"},
        "fwd_flops_per_image": {k: v["fwd_flops_per_image"] for k, v in info.items() if k != "diffusers_channels_last"},
        "train_flops_per_image": {k: v["train_flops_per_image"] for k, v in info.items()
                                  if k != "diffusers_channels_last"},
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
