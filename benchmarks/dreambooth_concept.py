"""DreamBooth measured (Ruiz et al. 2023): does the concept appear, and do the other prompts keep their adherence?

A concept classifier (`genlab.eval.concept`, trained here on rendered ground truth: the seven shapes and the new one)
reads `--n` images of the concept prompt drawn by the base model and by the adapted one (same seeds); the share it
calls the concept is the figure, before and after. As controls, the same for a known-shape prompt (`--control`: the
concept should not leak into it) and the class prompt. Then Shapes-GenEval of both models on its own prompts (none
names the rare token) through `genlab eval MODEL --metrics geneval`, whose overall scores must stay within 5 points.

    python benchmarks/dreambooth_concept.py runs/shapes-t2i runs/shapes-dreambooth [runs/shapes-dreambooth-full] \
        --n 64 --geneval-prompts 10 --out runs/shapes-dreambooth/concept
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from genlab.cli import main as genlab_main
from genlab.data.images import save_grid
from genlab.eval.concept import ConceptRecipe, train_concept_classifier
from genlab.models.base import GenerativeModel, resolve_model_dir
from genlab.sampling.controls import Guidance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="the text_diffusion model (or run) folder DreamBooth started from")
    p.add_argument("adapted", nargs="+", help="DreamBooth runs, adapter or merged model folders (each measured "
                   "against the base; named by their folder)")
    p.add_argument("--prompt", default="a red sks shape", help="the concept prompt (with the rare token)")
    p.add_argument("--class-prompt", default="a red shape")
    p.add_argument("--control", default="a red circle", help="a known-shape prompt the concept must not leak into")
    p.add_argument("--concept", default="arrow")
    p.add_argument("--n", type=int, default=64, help="images per prompt and model (seeds 0..n-1)")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--geneval-prompts", type=int, default=10, help="Shapes-GenEval prompts per category and split")
    p.add_argument("--geneval-images", type=int, default=1)
    p.add_argument("--classifier-per-class", type=int, default=400)
    p.add_argument("--out", required=True, help="folder for grids, geneval results and result.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    clf = train_concept_classifier(ConceptRecipe(concept=args.concept, per_class=args.classifier_per_class))
    result: dict = {"classifier": {k: v for k, v in clf.meta.items() if k != "recipe"}, "args": vars(args)}
    print(f"concept classifier: {json.dumps(result['classifier'])}", flush=True)

    prompts = {"concept": args.prompt, "class": args.class_prompt, "control": args.control}
    opts = dict(sampler=args.sampler, steps=args.steps, guidance=Guidance(args.cfg))
    models = {"base": args.base, **{Path(a).name: a for a in args.adapted}}
    for name, folder in models.items():
        model = GenerativeModel.from_pretrained(resolve_model_dir(folder)).eval()
        row: dict = {}
        for key, prompt in prompts.items():
            t1 = time.perf_counter()
            gens = [torch.Generator().manual_seed(i) for i in range(args.n)]
            with torch.no_grad():
                x = model.sample(args.n, prompt, generator=gens, **opts)
            x = ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1  # as saved images
            pred = clf.predict(x)
            counts = {c: int((pred == k).sum()) for k, c in enumerate(clf.classes)}
            row[key] = {"prompt": prompt, "concept_share": clf.share(x),
                        "predicted": {c: m for c, m in counts.items() if m},
                        "seconds": round(time.perf_counter() - t1, 1)}
            save_grid(x[:32], out / f"{name}-{key}.png", nrow=8, params={"prompt": prompt, **vars(args)})
            print(f"{name} {key}: {json.dumps(row[key])}", flush=True)
        t1 = time.perf_counter()
        code = genlab_main(["eval", str(folder), "--metrics", "geneval", "--geneval-prompts",
                            str(args.geneval_prompts), "--geneval-images", str(args.geneval_images), "--sampler",
                            args.sampler, "--steps", str(args.steps), "--cfg", str(args.cfg), "--out",
                            str(out / f"geneval-{name}")])
        if code != 0:
            raise SystemExit(code)
        tables = json.loads((out / f"geneval-{name}" / "geneval.json").read_text())["geneval"]
        row["geneval"] = {split: tables[split]["overall"] for split in tables}
        row["geneval_seconds"] = round(time.perf_counter() - t1, 1)
        result[name] = row
    base = result["base"]["geneval"]
    result["geneval_change_points"] = {name: {s: round(100 * (result[name]["geneval"][s] - base[s]), 1) for s in base}
                                       for name in models if name != "base"}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
