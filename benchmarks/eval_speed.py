"""Time FID + KID + precision/recall for 10,000 generated against 8,000 real MNIST images, features included.

genlab: features computed once by genlab's MNIST network, then FID, KID (100 subsets of 1,000) and improved
precision/recall (k=3) on them. Peer, in the same run: torchmetrics' own pipeline (FrechetInceptionDistance and
KernelInceptionDistance, each given the same feature network and fed the images), which has no precision/recall,
so the ratio is taken on FID + KID, and the genlab total is reported beside it. Prints one JSON line.

    python benchmarks/eval_speed.py [--n-fake 10000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from genlab.eval import metrics as M
from genlab.eval.features import get_feature_network
from genlab.eval.reference import all_images, load_images


def stand_in_samples(n: int, seed: int = 0) -> torch.Tensor:
    """`n` "generated" digits: test images, shifted by up to 2 pixels, with light Gaussian noise."""
    test = all_images(load_images("mnist", "test"))
    g = torch.Generator().manual_seed(seed)
    x = test[torch.randint(0, len(test), (n,), generator=g)]
    shifts = torch.randint(-2, 3, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shifts, dims=(-2, -1))
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def genlab_pipeline(fnet, real: torch.Tensor, fake: torch.Tensor, batch: int, with_prc: bool) -> tuple[float, dict]:
    t0 = time.perf_counter()
    fr, ff = fnet.embed(real, batch_size=batch)[0], fnet.embed(fake, batch_size=batch)[0]
    out = {"fid": M.fid(fr, ff), **M.kid(fr, ff, subsets=100, subset_size=1000)}
    if with_prc:
        out |= M.precision_recall(fr, ff)
    return time.perf_counter() - t0, out


def torchmetrics_pipeline(fnet, real: torch.Tensor, fake: torch.Tensor, batch: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fid = FrechetInceptionDistance(feature=fnet)
        kid = KernelInceptionDistance(feature=fnet, subsets=100, subset_size=1000)
        for metric in (fid, kid):
            for i in range(0, len(real), batch):
                metric.update(real[i : i + batch], real=True)
            for i in range(0, len(fake), batch):
                metric.update(fake[i : i + batch], real=False)
        torch.manual_seed(0)
        out = {"fid": float(fid.compute()), "kid": float(kid.compute()[0])}
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-fake", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=1000)
    args = p.parse_args()
    fnet = get_feature_network("mnist", progress=False)
    real = all_images(load_images("mnist", "train"))
    fake = stand_in_samples(args.n_fake)
    genlab_pipeline(fnet, real[:500], fake[:500], args.batch, True)  # warm-up
    t_fk, _ = genlab_pipeline(fnet, real, fake, args.batch, with_prc=False)
    t_all, ours = genlab_pipeline(fnet, real, fake, args.batch, with_prc=True)
    t_peer, peer = torchmetrics_pipeline(fnet, real, fake, args.batch)
    print(json.dumps({
        "benchmark": "eval_speed", "n_real": len(real), "n_fake": len(fake), "features": fnet.hash,
        "threads": torch.get_num_threads(),
        "genlab_fid_kid_prc_s": round(t_all, 2), "genlab_fid_kid_s": round(t_fk, 2),
        "torchmetrics_fid_kid_s": round(t_peer, 2), "speedup_fid_kid_vs_torchmetrics": round(t_peer / t_fk, 2),
        "fid": round(ours["fid"], 4), "fid_torchmetrics": round(peer["fid"], 4),
        "kid": round(ours["kid"], 5), "kid_se": round(ours["kid_se"], 5), "kid_torchmetrics": round(peer["kid"], 5),
        "precision": ours["precision"], "recall": ours["recall"],
    }))


if __name__ == "__main__":
    main()
