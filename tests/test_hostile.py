"""A corpus of hostile command lines and files: each must end in exit status 2 with ONE line that says what to
change (no traceback), before any work starts, leaving every file already saved byte-identical (and writing none).

Every entry names a fragment the error must contain, so that it fails if its check were removed (a missing check
either succeeds, writes files, fails elsewhere with another message, or ends in a traceback).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import randomize_weights
from test_gpt import tiny_gpt

from genlab.cli import main
from genlab.models.diffusion import DiffusionConfig, DiffusionModel

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_RECIPE = """\
name: tiny
family: diffusion
out_dir: runs
data: {name: mnist, image_size: 8, max_items: 8}
model: {base_channels: 8, channel_mults: [1, 2], num_res_blocks: 1, attention_resolutions: [], head_channels: 8,
        norm_groups: 4, timesteps: 100}
train: {steps: 2, batch_size: 4, warmup_steps: 1, log_every: 1, ckpt_every: 0}
sample: {n: 4, steps: 2}
"""


def _tiny_diffusion(base_channels: int = 8) -> DiffusionModel:
    cfg = DiffusionConfig(image_size=8, channels=1, num_classes=3, base_channels=base_channels, channel_mults=(1, 2),
                          num_res_blocks=1, attention_resolutions=(), head_channels=8, norm_groups=4, timesteps=100)
    model = DiffusionModel(cfg).eval()
    randomize_weights(model.net)
    return model


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def _folder_with_config(root: Path, name: str, source: Path, meta) -> None:
    """A copy of model folder `source` whose config.json is replaced by `meta` (JSON data)."""
    d = root / name
    d.mkdir()
    for f in source.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "config.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Model folders (good and broken), images, text files, recipes and a finished run folder."""
    w = tmp_path_factory.mktemp("hostile")
    diff = _tiny_diffusion().save_pretrained(w / "diff")
    gpt = tiny_gpt().save_pretrained(w / "gpt")
    diff_meta = json.loads((diff / "config.json").read_text())
    gpt_meta = json.loads((gpt / "config.json").read_text())

    _folder_with_config(w, "cfg_list", diff, [diff_meta])
    _folder_with_config(w, "cfg_int", diff, {**diff_meta, "config": 3})
    _folder_with_config(w, "cfg_nofamily", diff, {"config": diff_meta["config"]})
    _folder_with_config(w, "cfg_unknown_family", diff, {**diff_meta, "family": "hopfield"})
    _folder_with_config(w, "cfg_wide", diff, {**diff_meta, "config": {**diff_meta["config"], "base_channels": 16}})
    _folder_with_config(w, "cfg_huge_image", diff, {**diff_meta, "config": {**diff_meta["config"],
                                                                            "image_size": 10**6}})
    _folder_with_config(w, "cfg_huge_steps", diff, {**diff_meta, "config": {**diff_meta["config"],
                                                                            "timesteps": 10**10}})
    _folder_with_config(w, "gpt_huge", gpt, {**gpt_meta, "config": {**gpt_meta["config"], "n_embd": 10**9}})
    _folder_with_config(w, "gpt_huge_block", gpt, {**gpt_meta, "config": {**gpt_meta["config"],
                                                                         "block_size": 10**12}})
    _folder_with_config(w, "gpt_nan", gpt, {**gpt_meta, "config": {**gpt_meta["config"], "norm_eps": "nan"}})
    _folder_with_config(w, "truncated", diff, diff_meta)
    weights = (w / "truncated" / "model.safetensors").read_bytes()
    (w / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])

    rng = np.random.default_rng(0)
    _png(w / "img.png", rng.integers(0, 256, (8, 8)))
    mask = np.zeros((8, 8))
    mask[2:6, 2:6] = 255
    _png(w / "mask.png", mask)
    png = (w / "img.png").read_bytes()
    (w / "truncated.png").write_bytes(png[: len(png) // 2])
    (w / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (w / "file.txt").write_text("a regular file\n")
    (w / "empty.txt").write_text("")
    (w / "blank.txt").write_text("\n  \n\t\n")
    (w / "binary.txt").write_bytes(bytes(range(256)) * 16)
    (w / "adir").mkdir()
    (w / "tiny.yaml").write_text(TINY_RECIPE)
    (w / "list.yaml").write_text("- name: tiny\n- family: diffusion\n")
    (w / "broken.yaml").write_text("name: tiny\ntrain: {steps: 2\n")
    (w / "scalar_section.yaml").write_text(TINY_RECIPE.replace("sample: {n: 4, steps: 2}", "sample: 3"))
    (w / "bad_sampler.yaml").write_text(TINY_RECIPE.replace("sample: {n: 4, steps: 2}",
                                                            "sample: {n: 4, steps: 2, sampler: eulr}"))
    (w / "long_preview.yaml").write_text(TINY_RECIPE.replace("sample: {n: 4, steps: 2}", "sample: {n: 4, steps: 200}"))
    assert main(["train", str(w / "tiny.yaml"), "--run-dir", str(w / "oldrun")]) == 0  # a finished run to protect
    return w


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> content hash) and every folder (-> "dir")."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# (id, command line with {w} for the workspace, a fragment the one-line error must contain)
CORPUS: list[tuple[str, str, str]] = [
    # -- genlab sample: numbers -----------------------------------------------------------------------------
    ("sample-cfg-nan", "sample {w}/diff --cfg nan", "--cfg"),
    ("sample-cfg-inf", "sample {w}/diff --cfg inf", "--cfg"),
    ("sample-cfg-negative", "sample {w}/diff --cfg -1", "--cfg"),
    ("sample-rescale-nan", "sample {w}/diff --guidance-rescale nan", "--guidance-rescale"),
    ("sample-rescale-2", "sample {w}/diff --guidance-rescale 2", "--guidance-rescale"),
    ("sample-strength-nan", "sample {w}/diff --init-image {w}/img.png --strength nan", "--strength"),
    ("sample-strength-2", "sample {w}/diff --init-image {w}/img.png --strength 2", "--strength"),
    ("sample-eta-nan", "sample {w}/diff --eta nan", "eta"),
    ("sample-eta-2", "sample {w}/diff --eta 2", "eta"),
    ("sample-opt-nan", "sample {w}/diff --sampler euler --opt s_churn=nan", "s_churn"),
    ("sample-opt-inf", "sample {w}/diff --sampler euler --opt s_noise=inf", "s_noise"),
    ("sample-opt-negative", "sample {w}/diff --sampler euler --opt s_churn=-1", "s_churn"),
    ("sample-opt-order", "sample {w}/diff --sampler lms --opt order=0", "order"),
    ("sample-opt-unknown", "sample {w}/diff --sampler euler --opt order=2", "order"),
    ("sample-opt-form", "sample {w}/diff --opt s_churn", "--opt"),
    ("sample-eta-twice", "sample {w}/diff --sampler ddim --eta 0.5 --opt eta=0.5", "give it once"),
    # -- genlab sample: names ------------------------------------------------------------------------------
    ("sample-sampler", "sample {w}/diff --sampler eulr", "euler"),
    ("sample-schedule", "sample {w}/diff --schedule karas", "karras"),
    ("sample-spacing", "sample {w}/diff --spacing sideways", "spacing"),
    ("sample-device", "sample {w}/diff --device gpu0", "--device"),
    # -- genlab sample: sizes and seeds --------------------------------------------------------------------
    ("sample-n-0", "sample {w}/diff --n 0", "--n"),
    ("sample-n-huge", "sample {w}/diff --n 100000000", "--n"),
    ("sample-steps-0", "sample {w}/diff --steps 0", "--steps"),
    ("sample-steps-huge", "sample {w}/diff --steps 100000000 --schedule karras", "--steps"),
    ("sample-batch-0", "sample {w}/diff --batch 0", "--batch"),
    ("sample-seed-negative", "sample {w}/diff --seed -1", "--seed"),
    ("sample-seed-huge", "sample {w}/diff --seed 18446744073709551616", "--seed"),
    ("sample-label-range", "sample {w}/diff --label 7", "label"),
    ("sample-not-an-int", "sample {w}/diff --n many", "--n"),
    # -- genlab sample: options that would do nothing -------------------------------------------------------
    ("sample-repaint-no-mask", "sample {w}/diff --repaint-jumps 5", "--mask"),
    ("sample-repaint-length-0", "sample {w}/diff --init-image {w}/img.png --mask {w}/mask.png --sampler ddpm "
     "--repaint-jumps 2 --repaint-jump-length 0", "--repaint-jump-length"),
    ("sample-negative-no-cfg", "sample {w}/diff --negative-label 1 --cfg 1", "--negative-label"),
    ("sample-rescale-no-cfg", "sample {w}/diff --guidance-rescale 0.5 --cfg 1", "--guidance-rescale"),
    ("sample-eta-deterministic", "sample {w}/diff --sampler euler --eta 0.5", "eta"),
    ("sample-mask-no-init", "sample {w}/diff --mask {w}/mask.png", "--init-image"),
    # -- genlab sample: files ------------------------------------------------------------------------------
    ("sample-init-truncated", "sample {w}/diff --init-image {w}/truncated.png", "--init-image"),
    ("sample-init-garbage", "sample {w}/diff --init-image {w}/garbage.png", "--init-image"),
    ("sample-init-missing", "sample {w}/diff --init-image {w}/nothing.png", "--init-image"),
    ("sample-init-text", "sample {w}/diff --init-image {w}/file.txt", "--init-image"),
    ("sample-mask-garbage", "sample {w}/diff --init-image {w}/img.png --mask {w}/garbage.png", "--mask"),
    ("sample-out-is-folder", "sample {w}/diff --out {w}/adir", "--out"),
    ("sample-out-under-file", "sample {w}/diff --out {w}/file.txt/grid.png", "--out"),
    ("sample-out-not-png", "sample {w}/diff --out {w}/grid.txt", "--out"),
    ("sample-out-dir-is-file", "sample {w}/diff --out-dir {w}/file.txt", "--out-dir"),
    ("sample-out-dir-under-file", "sample {w}/diff --out-dir {w}/file.txt/images", "--out-dir"),
    # -- model folders -------------------------------------------------------------------------------------
    ("model-missing", "sample {w}/nothing", "nothing"),
    ("model-config-list", "sample {w}/cfg_list", "config.json"),
    ("model-config-int", "sample {w}/cfg_int", "config"),
    ("model-config-no-family", "sample {w}/cfg_nofamily", "family"),
    ("model-unknown-family", "sample {w}/cfg_unknown_family", "hopfield"),
    ("model-weights-misfit", "sample {w}/cfg_wide", "model.safetensors"),
    ("model-huge-image", "sample {w}/cfg_huge_image", "image_size"),
    ("model-huge-timesteps", "sample {w}/cfg_huge_steps", "timesteps"),
    ("model-truncated-weights", "sample {w}/truncated", "model.safetensors"),
    ("model-wrong-family", "sample {w}/gpt", "images"),
    ("gpt-huge-n-embd", "generate {w}/gpt_huge", "n_embd"),
    ("gpt-huge-block", "generate {w}/gpt_huge_block", "block_size"),
    ("gpt-nan-config", "generate {w}/gpt_nan", "norm_eps"),
    ("gpt-wrong-family", "generate {w}/diff", "gpt"),
    ("export-wrong-family", "export {w}/diff --out {w}/exported", "gpt"),
    ("export-out-is-file", "export {w}/gpt --out {w}/file.txt", "--out"),
    # -- genlab generate -----------------------------------------------------------------------------------
    ("gen-max-new-huge", "generate {w}/gpt --max-new-tokens 100000000", "--max-new-tokens"),
    ("gen-max-new-0", "generate {w}/gpt --max-new-tokens 0", "--max-new-tokens"),
    ("gen-temperature-inf", "generate {w}/gpt --temperature inf", "--temperature"),
    ("gen-temperature-nan", "generate {w}/gpt --temperature nan", "--temperature"),
    ("gen-temperature-negative", "generate {w}/gpt --temperature -1", "--temperature"),
    ("gen-top-p-nan", "generate {w}/gpt --top-p nan", "--top-p"),
    ("gen-top-p-0", "generate {w}/gpt --top-p 0", "--top-p"),
    ("gen-min-p-nan", "generate {w}/gpt --min-p nan", "--min-p"),
    ("gen-top-k-negative", "generate {w}/gpt --top-k -1", "--top-k"),
    ("gen-repetition-nan", "generate {w}/gpt --repetition-penalty nan", "--repetition-penalty"),
    ("gen-presence-nan", "generate {w}/gpt --presence-penalty nan", "--presence-penalty"),
    ("gen-frequency-inf", "generate {w}/gpt --frequency-penalty inf", "--frequency-penalty"),
    ("gen-length-penalty-nan", "generate {w}/gpt --num-beams 2 --length-penalty nan", "--length-penalty"),
    ("gen-n-0", "generate {w}/gpt --n 0", "--n"),
    ("gen-n-huge", "generate {w}/gpt --n 100000000", "--n"),
    ("gen-beams-0", "generate {w}/gpt --num-beams 0", "--num-beams"),
    # -- genlab caption and generate --image (image files: tests/test_captioner.py) ------------------------------
    ("gen-image-on-gpt", "generate {w}/gpt --image {w}/img.png", "takes no image"),
    ("gen-image-int8", "generate {w}/gpt --image {w}/img.png --int8", "--int8"),
    ("gen-image-draft", "generate {w}/gpt --image {w}/img.png --draft {w}/gpt", "--draft"),
    ("caption-gpt", "caption {w}/gpt {w}/img.png", "does not describe images"),
    ("caption-diffusion", "caption {w}/diff {w}/img.png", "does not describe images"),
    ("caption-no-folder", "caption {w}/adir {w}/img.png", "neither a model folder"),
    ("caption-max-new-0", "caption {w}/gpt {w}/img.png --max-new-tokens 0", "--max-new-tokens"),
    ("caption-temperature-nan", "caption {w}/gpt {w}/img.png --temperature nan", "--temperature"),
    ("caption-top-p-greedy", "caption {w}/gpt {w}/img.png --top-p 0.5", "--top-p"),
    ("caption-no-image", "caption {w}/gpt", "images"),
    ("eval-caption-gpt", "eval {w}/gpt --data mnist --metrics caption --out {w}/ev", "does not describe images"),
    # -- genlab serve and embed (requests: tests/test_serve.py, tests/test_serve_text.py) ------------------------
    ("serve-models-missing", "serve --models {w}/nothing-here", "is not a folder"),
    ("serve-models-file", "serve --models {w}/img.png", "is not a folder"),
    ("serve-port-huge", "serve --models {w}/adir --port 70000", "--port"),
    ("serve-workers-0", "serve --models {w}/adir --workers 0", "--workers"),
    ("serve-max-n-0", "serve --models {w}/adir --max-n 0", "--max-n"),
    ("serve-body-nan", "serve --models {w}/adir --max-body-mb nan", "--max-body-mb"),
    ("serve-timeout-negative", "serve --models {w}/adir --timeout -1", "--timeout"),
    ("serve-budget-inf", "serve --models {w}/adir --memory-budget-mb inf", "--memory-budget-mb"),
    ("serve-key-file-missing", "serve --models {w}/adir --api-key-file {w}/nokeys.txt", "--api-key-file"),
    ("embed-no-folder", "embed {w}/adir --text hi", "neither a model folder"),
    ("embed-gpt", "embed {w}/gpt --text hi", "embed"),
    ("gen-beams-huge", "generate {w}/gpt --num-beams 1000000", "--num-beams"),
    ("gen-seed-negative", "generate {w}/gpt --seed -1", "--seed"),
    ("gen-threads-negative", "generate {w}/gpt --threads -1", "--threads"),
    ("gen-stop-empty", "generate {w}/gpt --stop=", "--stop"),
    ("gen-draft-beams", "generate {w}/gpt --draft {w}/gpt --num-beams 2", "--draft"),
    ("gen-gamma-no-draft", "generate {w}/gpt --gamma 3", "--gamma"),
    ("gen-gamma-0", "generate {w}/gpt --draft {w}/gpt --gamma 0", "--gamma"),
    ("gen-length-penalty-no-beams", "generate {w}/gpt --length-penalty 2", "--length-penalty"),
    ("gen-top-p-greedy", "generate {w}/gpt --temperature 0 --top-p 0.9", "--top-p"),
    ("gen-stream-n", "generate {w}/gpt --stream --n 2", "--stream"),
    ("gen-stream-draft", "generate {w}/gpt --stream --draft {w}/gpt", "--stream"),
    ("gen-logprobs-stream", "generate {w}/gpt --stream --logprobs", "--logprobs"),
    # -- genlab train: recipes -----------------------------------------------------------------------------
    ("recipe-missing", "train {w}/nothing.yaml --run-dir {w}/run", "nothing"),
    ("recipe-list", "train {w}/list.yaml --run-dir {w}/run", "mapping"),
    ("recipe-broken-yaml", "train {w}/broken.yaml --run-dir {w}/run", "YAML"),
    ("recipe-scalar-section", "train {w}/scalar_section.yaml --run-dir {w}/run", "sample"),
    ("recipe-unknown-sampler", "train {w}/bad_sampler.yaml --run-dir {w}/run", "eulr"),
    ("recipe-preview-steps", "train {w}/long_preview.yaml --run-dir {w}/run", "sample.steps=200"),
    ("recipe-unknown-key", "train {w}/tiny.yaml --run-dir {w}/run --set train.lrr=1e-3", "train.lr"),
    ("recipe-set-form", "train {w}/tiny.yaml --run-dir {w}/run --set train.lr", "--set"),
    ("recipe-unknown-family", "train {w}/tiny.yaml --run-dir {w}/run --set family=hopfield", "hopfield"),
    ("recipe-unknown-dataset", "train {w}/tiny.yaml --run-dir {w}/run --set data.name=mnsit", "mnist"),
    ("recipe-lr-negative", "train {w}/tiny.yaml --run-dir {w}/run --set train.lr=-1e-3", "train.lr"),
    ("recipe-lr-nan", "train {w}/tiny.yaml --run-dir {w}/run --set train.lr=.nan", "train.lr"),
    ("recipe-lr-zero", "train {w}/tiny.yaml --run-dir {w}/run --set train.lr=0", "train.lr"),
    ("recipe-betas-1", "train {w}/tiny.yaml --run-dir {w}/run --set train.betas=[0.9,1.0]", "train.betas"),
    ("recipe-betas-negative", "train {w}/tiny.yaml --run-dir {w}/run --set train.betas=[-0.1,0.99]", "train.betas"),
    ("recipe-weight-decay", "train {w}/tiny.yaml --run-dir {w}/run --set train.weight_decay=-0.1",
     "train.weight_decay"),
    ("recipe-grad-clip-nan", "train {w}/tiny.yaml --run-dir {w}/run --set train.grad_clip=.nan", "train.grad_clip"),
    ("recipe-grad-clip-negative", "train {w}/tiny.yaml --run-dir {w}/run --set train.grad_clip=-1",
     "train.grad_clip"),
    ("recipe-warmup-past-steps", "train {w}/tiny.yaml --run-dir {w}/run --set train.warmup_steps=5",
     "train.warmup_steps"),
    ("recipe-batch-0", "train {w}/tiny.yaml --run-dir {w}/run --set train.batch_size=0", "train.batch_size"),
    ("recipe-batch-huge", "train {w}/tiny.yaml --run-dir {w}/run --set train.batch_size=1000000000",
     "train.batch_size"),
    ("recipe-steps-huge", "train {w}/tiny.yaml --run-dir {w}/run --set train.steps=1e15", "train.steps"),
    ("recipe-max-minutes-nan", "train {w}/tiny.yaml --run-dir {w}/run --set train.max_minutes=.nan",
     "train.max_minutes"),
    ("recipe-ema-nan", "train {w}/tiny.yaml --run-dir {w}/run --set train.ema_decay=.nan", "train.ema_decay"),
    ("recipe-seed-huge", "train {w}/tiny.yaml --run-dir {w}/run --set train.seed=1e30", "train.seed"),
    ("recipe-eval-n-alone", "train {w}/tiny.yaml --run-dir {w}/run --set train.eval_n=8", "train.eval_every"),
    ("recipe-sample-sampler", "train {w}/tiny.yaml --run-dir {w}/run --set sample.sampler=nope", "nope"),
    ("recipe-sample-steps", "train {w}/tiny.yaml --run-dir {w}/run --set sample.steps=0", "sample.steps"),
    ("recipe-sample-cfg", "train {w}/tiny.yaml --run-dir {w}/run --set sample.cfg=.nan", "sample.cfg"),
    ("recipe-sample-eta", "train {w}/tiny.yaml --run-dir {w}/run --set sample.eta=2", "eta"),
    ("recipe-sample-eta-deterministic", "train {w}/tiny.yaml --run-dir {w}/run --set sample.sampler=heun "
     "--set sample.eta=0.5", "eta"),
    ("recipe-sample-n", "train {w}/tiny.yaml --run-dir {w}/run --set sample.n=0", "sample.n"),
    ("recipe-sample-seed", "train {w}/tiny.yaml --run-dir {w}/run --set sample.seed=-1", "sample.seed"),
    ("recipe-model-nan", "train {w}/tiny.yaml --run-dir {w}/run --set model.cond_drop=.nan", "model.cond_drop"),
    ("recipe-model-beta-nan", "train {w}/tiny.yaml --run-dir {w}/run --set model.beta_end=.nan", "model.beta_end"),
    ("recipe-model-huge-width", "train {w}/tiny.yaml --run-dir {w}/run --set model.base_channels=1048576",
     "model.base_channels"),
    ("recipe-model-huge-timesteps", "train {w}/tiny.yaml --run-dir {w}/run --set model.timesteps=10000000000",
     "model.timesteps"),
    ("recipe-data-image-size-0", "train {w}/tiny.yaml --run-dir {w}/run --set data.image_size=0", "data.image_size"),
    ("recipe-data-image-size-huge", "train {w}/tiny.yaml --run-dir {w}/run --set data.image_size=1000000",
     "data.image_size"),
    ("recipe-data-max-items-0", "train {w}/tiny.yaml --run-dir {w}/run --set data.max_items=0", "data.max_items"),
    ("recipe-run-dir-is-file", "train {w}/tiny.yaml --run-dir {w}/file.txt", "--run-dir"),
    ("recipe-run-dir-under-file", "train {w}/tiny.yaml --run-dir {w}/file.txt/run", "--run-dir"),
    ("recipe-old-run-lr", "train {w}/tiny.yaml --run-dir {w}/oldrun --no-resume --set train.lr=-1", "train.lr"),
    ("recipe-old-run-sampler", "train {w}/tiny.yaml --run-dir {w}/oldrun --no-resume --set sample.sampler=x", "x"),
    ("recipe-old-run-dataset", "train {w}/tiny.yaml --run-dir {w}/oldrun --no-resume --set data.name=nope", "nope"),
    # -- genlab tokenizer ----------------------------------------------------------------------------------
    ("tok-empty", "tokenizer train --data {w}/empty.txt --out {w}/tok.json", "empty"),
    ("tok-blank", "tokenizer train --data {w}/blank.txt --out {w}/tok.json", "blank.txt"),
    ("tok-binary", "tokenizer train --data {w}/binary.txt --out {w}/tok.json", "UTF-8"),
    ("tok-unknown-data", "tokenizer train --data fortunez --out {w}/tok.json", "fortunes"),
    ("tok-image-data", "tokenizer train --data mnist --out {w}/tok.json", "text"),
    ("tok-vocab-0", "tokenizer train --data fortunes --vocab 0 --out {w}/tok.json", "--vocab"),
    ("tok-vocab-huge", "tokenizer train --data fortunes --vocab 1000000000 --out {w}/tok.json", "--vocab"),
    ("tok-vocab-char", "tokenizer train --data fortunes --kind char --vocab 300 --out {w}/tok.json", "--vocab"),
    ("tok-out-under-file", "tokenizer train --data fortunes --out {w}/file.txt/tok.json", "--out"),
    ("tok-encode-not-tokenizer", "tokenizer encode {w}/file.txt hello", "file.txt"),
    ("tok-encode-missing", "tokenizer encode {w}/nothing.json hello", "nothing.json"),
    # -- genlab data ---------------------------------------------------------------------------------------
    ("data-unknown", "data show mnsit --out {w}/g.png", "mnist"),
    ("data-split", "data show mnist --split val --out {w}/g.png", "val"),
    ("data-n-0", "data show mnist --n 0 --out {w}/g.png", "--n"),
    ("data-image-size-0", "data show mnist --image-size 0 --out {w}/g.png", "--image-size"),
    ("data-image-size-huge", "data show mnist --image-size 1000000 --out {w}/g.png", "--image-size"),
    ("data-seed", "data show mnist --seed -1 --out {w}/g.png", "--seed"),
    ("data-out-is-folder", "data show mnist --out {w}/adir", "--out"),
    ("data-out-under-file", "data show mnist --out {w}/file.txt/g.png", "--out"),
    ("data-out-not-png", "data show mnist --out {w}/g.jpg", "--out"),
    ("data-text-n", "data show fortunes --n 5", "--n"),
    ("data-shapes-image-size", "data show shapes --image-size 48 --out {w}/g.png", "32 or 64"),
    ("data-shapes-split", "data show shapes --split val --out {w}/g.png", "heldout"),
    # -- genlab eval ---------------------------------------------------------------------------------------
    ("eval-n-0", "eval {w}/diff --data mnist --n 0 --out {w}/ev", "--n"),
    ("eval-cfg-nan", "eval {w}/diff --data mnist --cfg nan --out {w}/ev", "--cfg"),
    ("eval-steps-0", "eval {w}/diff --data mnist --steps 0 --out {w}/ev", "--steps"),
    ("eval-sampler", "eval {w}/diff --data mnist --sampler eulr --out {w}/ev", "euler"),
    ("eval-metric", "eval {w}/diff --data mnist --metrics fid,fdd --out {w}/ev", "fdd"),
    ("eval-seed", "eval {w}/diff --data mnist --seed -1 --out {w}/ev", "--seed"),
    ("eval-data", "eval {w}/diff --data mnsit --out {w}/ev", "mnist"),
    ("eval-kid-subsets-0", "eval {w}/diff --data mnist --metrics kid --kid-subsets 0 --out {w}/ev", "--kid-subsets"),
    ("eval-nll-n-0", "eval {w}/diff --data mnist --metrics nll --nll-n 0 --out {w}/ev", "--nll-n"),
    ("eval-nll-method", "eval {w}/diff --data mnist --metrics nll --nll-method exact --out {w}/ev", "--nll-method"),
    ("eval-out-is-file", "eval {w}/diff --data mnist --out {w}/file.txt", "--out"),
    ("eval-model-config-list", "eval {w}/cfg_list --data mnist --out {w}/ev", "config.json"),
    ("eval-geneval-prompts-0", "eval {w}/diff --data mnist --metrics geneval --geneval-prompts 0 --out {w}/ev",
     "--geneval-prompts"),
    ("eval-geneval-images-big", "eval {w}/diff --data mnist --metrics geneval --geneval-images 65 --out {w}/ev",
     "--geneval-images"),
    ("eval-geneval-not-text", "eval {w}/diff --data mnist --metrics geneval --out {w}/ev", "draw from text"),
    # -- genlab demo ---------------------------------------------------------------------------------------
    ("demo-minutes-nan", "demo --recipe {w}/tiny.yaml --minutes nan", "--minutes"),
    ("demo-minutes-negative", "demo --recipe {w}/tiny.yaml --minutes -1", "--minutes"),
    ("demo-per-class-0", "demo --recipe {w}/tiny.yaml --per-class 0", "--per-class"),
    ("demo-sampler", "demo --recipe {w}/tiny.yaml --sampler eulr --per-class 1 --steps 1", "euler"),
    ("demo-steps-0", "demo --recipe {w}/tiny.yaml --steps 0 --per-class 1", "--steps"),
    ("demo-cfg-nan", "demo --recipe {w}/tiny.yaml --cfg nan --per-class 1 --steps 1", "--cfg"),
    ("demo-seed", "demo --recipe {w}/tiny.yaml --seed -1 --per-class 1 --steps 1", "--seed"),
    ("demo-recipe-list", "demo --recipe {w}/list.yaml", "mapping"),
]


def _argv(line: str, w: Path) -> list[str]:
    return [part.replace("{w}", str(w)) for part in line.split()]


def _timeout(signum, frame):
    raise TimeoutError("the command started working instead of refusing its input")


def _run(argv: list[str], seconds: int = 60) -> int:
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(seconds)
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return int(e.code or 0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize(("line", "fragment"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_hostile_input_is_one_line_and_changes_nothing(workspace, line, fragment, capsys, monkeypatch):
    monkeypatch.chdir(workspace)  # a default output (grid.png, eval-*, runs/) would land here
    before = _snapshot(workspace)
    capsys.readouterr()
    code = _run(_argv(line, workspace))
    err = capsys.readouterr().err
    assert code == 2, f"exit status {code}; stderr: {err[-2000:]}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genlab: error: "), err[-2000:]
    assert fragment in lines[0], lines[0]
    assert _snapshot(workspace) == before, "a failed command changed or wrote files"


# inputs at the edge that are valid: they must work (no error, no traceback)
ACCEPTED = [
    ("gen-empty-prompt", "generate {w}/gpt --prompt= --max-new-tokens 3"),
    ("sample-strength-0", "sample {w}/diff --n 1 --steps 2 --init-image {w}/img.png --strength 0 --out {w}/s0.png"),
    ("sample-seed-max", "sample {w}/diff --n 2 --steps 1 --seed 18446744073709551614 --out {w}/smax.png"),
]


@pytest.mark.parametrize("line", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_edge_inputs_are_accepted(workspace, line, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    code = _run(_argv(line, workspace))
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through folder permissions")
def test_a_folder_that_cannot_be_written_is_refused_before_sampling(workspace, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = _run(["sample", str(workspace / "diff"), "--out", str(locked / "grid.png")])
    finally:
        locked.chmod(0o700)
    assert code == 2 and "not writable" in capsys.readouterr().err
    assert not any(locked.iterdir())


def test_every_command_is_in_the_corpus():
    from genlab.cli import COMMANDS

    assert {line.split()[0] for _, line, _ in CORPUS} == set(COMMANDS)


def test_corpus_ids_are_unique():
    ids = [c[0] for c in CORPUS]
    assert len(ids) == len(set(ids))


# -- every image family's MNIST recipe: absurd sizes are one-line errors before anything is allocated or written -----
FAMILY_SIZES: list[tuple[str, str, str]] = [
    ("gan-width", "train mnist-gan --run-dir {w}/run --set model.z_dim=100000000", "model.z_dim"),
    ("gan-depth", "train mnist-gan --run-dir {w}/run --set model.num_blocks=100000000",
     "model.num_blocks"),
    ("vae-width", "train mnist-vae --run-dir {w}/run --set model.z_channels=100000000",
     "model.z_channels"),
    ("vae-iwae", "train mnist-vae --run-dir {w}/run --set model.iwae_samples=10000000000",
     "model.iwae_samples"),
    ("flow-width", "train mnist-flow --run-dir {w}/run --set model.hidden=100000000", "model.hidden"),
    ("flow-depth", "train mnist-flow --run-dir {w}/run --set model.steps=100000000", "model.steps"),
    ("fm-width", "train mnist-fm --run-dir {w}/run --set model.base_channels=100000000",
     "model.base_channels"),
    ("pixelar-width", "train mnist-pixelar --run-dir {w}/run --set model.n_embd=100000000",
     "model.n_embd"),
    ("pixelar-depth", "train mnist-pixelar --run-dir {w}/run --set model.n_layer=100000000",
     "model.n_layer"),
    ("pixelar-temperature", "train mnist-pixelar --run-dir {w}/run --set model.preview_temperature=.nan",
     "model.preview_temperature"),
    ("vq-codebook", "train mnist-vq --run-dir {w}/run --set model.codebook_size=10000000000",
     "model.codebook_size"),
    ("vq-code-dim", "train mnist-vq --run-dir {w}/run --set model.code_dim=100000000", "model.code_dim"),
    ("vq-fsq-levels", "train mnist-vq --run-dir {w}/run --set model.quantizer=fsq "
     "--set model.fsq_levels=[256,256,256]", "model.fsq_levels"),
    ("vq-quantizer", "train mnist-vq --run-dir {w}/run --set model.quantizer=lfq", "fsq"),
    ("vq-prior-missing", "train mnist-vq-prior --run-dir {w}/run --set model.tokenizer={w}/nothing",
     "nothing"),
    ("vq-prior-not-vq", "train mnist-maskgit --run-dir {w}/run --set model.tokenizer={w}/diff",
     "diffusion"),
    ("tarflow-depth", "train mnist-tarflow --run-dir {w}/run --set model.blocks=100000000",
     "model.blocks"),
    ("tarflow-patch", "train mnist-tarflow --run-dir {w}/run --set model.patch_size=5",
     "model.patch_size"),
    ("tarflow-width", "train mnist-tarflow --run-dir {w}/run --set model.n_embd=100000000",
     "model.n_embd"),
]


@pytest.mark.parametrize(("line", "fragment"), [c[1:] for c in FAMILY_SIZES], ids=[c[0] for c in FAMILY_SIZES])
def test_family_recipe_sizes_are_one_line_errors(workspace, line, fragment, capsys, monkeypatch):
    test_hostile_input_is_one_line_and_changes_nothing(workspace, line, fragment, capsys, monkeypatch)


# genlab export --to diffusers: refused in one line before any file is written
DIFFUSERS_EXPORT: list[tuple[str, str, str]] = [
    ("dx-out-is-file", "export {w}/diff --to diffusers --out {w}/file.txt", "--out"),
    ("dx-out-under-file", "export {w}/diff --to diffusers --out {w}/file.txt/sub", "file.txt"),
    ("dx-gpt", "export {w}/gpt --to diffusers --out {w}/dx", "gpt"),
    ("dx-merge", "export {w}/diff --to diffusers --merge --out {w}/dx", "--merge"),
    ("dx-missing", "export {w}/nothing --to diffusers --out {w}/dx", "nothing"),
    ("dx-truncated-weights", "export {w}/truncated --to diffusers --out {w}/dx", "model.safetensors"),
    ("dx-unknown-family", "export {w}/cfg_unknown_family --to diffusers --out {w}/dx", "hopfield"),
    ("dx-unknown-target", "export {w}/diff --to onnx --out {w}/dx", "onnx"),
]


@pytest.mark.parametrize(("line", "fragment"), [c[1:] for c in DIFFUSERS_EXPORT],
                         ids=[c[0] for c in DIFFUSERS_EXPORT])
def test_diffusers_export_hostile_inputs(workspace, line, fragment, capsys, monkeypatch):
    test_hostile_input_is_one_line_and_changes_nothing(workspace, line, fragment, capsys, monkeypatch)


# ControlNet: `genlab sample --control` and the controlnet recipe
CONTROLNET = [
    ("sample-control-on-diffusion", "sample {w}/diff --n 1 --steps 1 --control {w}/mask.png --out {w}/c.png",
     "does not take --control"),
    ("sample-control-scale-alone", "sample {w}/diff --n 1 --control-scale 0.5 --out {w}/c.png", "--control edges.png"),
    ("sample-control-scale-nan", "sample {w}/diff --n 1 --control {w}/mask.png --control-scale nan --out {w}/c.png",
     "--control-scale"),
    ("sample-control-scale-count", "sample {w}/diff --n 1 --control {w}/mask.png --control-scale 1 --control-scale 2 "
     "--control-scale 3 --out {w}/c.png", "one per control"),
    ("train-controlnet-missing-base", "train mnist-controlnet --run-dir {w}/run --set model.init_from={w}/nothing",
     "nothing"),
    ("train-controlnet-gpt-base", "train mnist-controlnet --run-dir {w}/run --set model.init_from={w}/gpt", "gpt"),
    ("train-controlnet-size", "train mnist-controlnet --run-dir {w}/run --set model.init_from={w}/diff", "8px"),
    ("train-controlnet-classes", "train mnist-controlnet --run-dir {w}/run --set model.init_from={w}/diff "
     "--set data.image_size=8", "10 classes"),
    ("train-controlnet-control", "train mnist-controlnet --run-dir {w}/run --set model.init_from={w}/diff "
     "--set model.control=canny", "model.control"),
    ("train-controlnet-threshold", "train mnist-controlnet --run-dir {w}/run --set model.edge_threshold=-1",
     "model.edge_threshold"),
    ("train-controlnet-base-key", "train mnist-controlnet --run-dir {w}/run --set model.init_from={w}/diff "
     "--set data.image_size=8 --set model.base_channels=64", "model.base_channels"),
]


@pytest.mark.parametrize(("line", "fragment"), [c[1:] for c in CONTROLNET], ids=[c[0] for c in CONTROLNET])
def test_controlnet_hostile_inputs(workspace, line, fragment, capsys, monkeypatch):
    test_hostile_input_is_one_line_and_changes_nothing(workspace, line, fragment, capsys, monkeypatch)


# Few steps: the consistency-distillation and shortcut recipes
FEWSTEP = [
    ("cd-teacher-missing", "train mnist-cd --run-dir {w}/run --set model.teacher={w}/nothing", "nothing"),
    ("cd-teacher-not-edm", "train mnist-cd --run-dir {w}/run --set model.teacher={w}/diff", "not EDM-preconditioned"),
    ("cd-teacher-gpt", "train mnist-cd --run-dir {w}/run --set model.teacher={w}/gpt", "gpt"),
    ("cd-no-teacher", "train mnist-cd --run-dir {w}/run --set model.teacher=null", "model.teacher"),
    ("cd-loss", "train mnist-cd --run-dir {w}/run --set model.loss=lpips", "model.loss"),
    ("cd-scales", "train mnist-cd --run-dir {w}/run --set model.num_scales=1", "model.num_scales"),
    ("cd-target-decay", "train mnist-cd --run-dir {w}/run --set model.target_decay=1.5", "model.target_decay"),
    ("shortcut-max-steps", "train mnist-shortcut --run-dir {w}/run --set model.max_steps=100", "power of two"),
    ("shortcut-fraction", "train mnist-shortcut --run-dir {w}/run --set model.bootstrap_fraction=1.5",
     "model.bootstrap_fraction"),
    ("shortcut-preview-steps", "train mnist-shortcut --run-dir {w}/run --set sample.steps=3", "sample.steps=3"),
]


@pytest.mark.parametrize(("line", "fragment"), [c[1:] for c in FEWSTEP], ids=[c[0] for c in FEWSTEP])
def test_fewstep_hostile_inputs(workspace, line, fragment, capsys, monkeypatch):
    test_hostile_input_is_one_line_and_changes_nothing(workspace, line, fragment, capsys, monkeypatch)


# LoRA on the few-step families: no adapter on them was ever tested, so they declare no LoRA targets
FEWSTEP_LORA = [
    ("cd-lora", "train mnist-cd --run-dir {w}/run --set model.teacher={w}/diff --set model.init_from={w}/diff "
     "--set adapt.lora.rank=4", "consistency family has no layers for LoRA"),
    ("shortcut-lora", "train mnist-shortcut --run-dir {w}/run --set model.init_from={w}/diff --set adapt.lora.rank=4",
     "shortcut family has no layers for LoRA"),
]


@pytest.mark.parametrize(("line", "fragment"), [c[1:] for c in FEWSTEP_LORA], ids=[c[0] for c in FEWSTEP_LORA])
def test_fewstep_families_refuse_lora(workspace, line, fragment, capsys, monkeypatch):
    test_hostile_input_is_one_line_and_changes_nothing(workspace, line, fragment, capsys, monkeypatch)
