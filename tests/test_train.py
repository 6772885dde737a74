"""The trainer in-process: LR schedule, EMA, data order, outputs, checkpoints, resume, failures, CLI errors."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch
import toy_family
from safetensors.torch import load_file

from genlab.cli import main
from genlab.errors import GenlabError
from genlab.models.base import GenerativeModel, resolve_model_dir
from genlab.train import Trainer, train
from genlab.train import checkpoint as ckpt
from genlab.train.ema import EMA
from genlab.train.lock import LOCK_NAME, run_lock
from genlab.train.schedule import lr_factor
from genlab.train.trainer import MAX_SKIPPED_STEPS, DataOrder, nonfinite_stop, run_end


def steps_of(run_dir):
    return [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")]


def final_weights(run_dir, step):
    d = run_dir / "checkpoints" / f"step_{step:07d}"
    ema = {f"ema.{k}": v for k, v in load_file(d / "ema.safetensors").items()}
    return {**load_file(d / "model.safetensors"), **ema}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- pieces ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_factor_matches_torch_schedulers(schedule):
    """Warmup + cosine equals torch's LinearLR followed by CosineAnnealingLR (or a constant LR)."""
    base, warmup, total, floor = 0.1, 5, 40, 0.2
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    after = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=base * floor)
             if schedule == "cosine" else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0))
    ref = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup, 1.0, total_iters=warmup - 1), after], milestones=[warmup])
    for step in range(total):
        ours = base * lr_factor(step, warmup_steps=warmup, total_steps=total, schedule=schedule, min_lr_ratio=floor)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), step
        opt.step()
        ref.step()
    assert lr_factor(total, warmup_steps=warmup, total_steps=total, schedule=schedule, min_lr_ratio=floor) == \
        pytest.approx(floor if schedule == "cosine" else 1.0)


def test_ema_matches_closed_form():
    """With the parameter held at p, shadow_k = p + (s_0 - p) * prod(beta_i), beta_i = min(d, (1+i)/(10+i))."""
    lin = torch.nn.Linear(3, 2)
    s0 = {k: v.detach().clone() for k, v in lin.named_parameters()}
    ema = EMA(lin, decay=0.95, warmup=True)
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(1.5)
    prod = 1.0
    for i in range(30):
        ema.update(i)
        prod *= min(0.95, (1 + i) / (10 + i))
    for k, p in lin.named_parameters():
        torch.testing.assert_close(ema.shadow[k], p + (s0[k] - p) * prod, rtol=1e-6, atol=1e-6)
    sd = ema.model_state_dict(lin)
    torch.testing.assert_close(sd["weight"], ema.shadow["weight"])
    with ema.average_parameters():
        torch.testing.assert_close(lin.weight, ema.shadow["weight"])
    torch.testing.assert_close(lin.weight, s0["weight"] + 1.5)


def test_data_order_is_per_epoch_permutations_and_resumes_mid_epoch():
    order = DataOrder(10, seed=3)
    drawn = np.concatenate([order.take(4) for _ in range(8)])  # 3.2 epochs
    for e in range(3):
        epoch = drawn[10 * e : 10 * e + 10]
        assert sorted(epoch) == list(range(10))
        assert list(epoch) == list(np.random.default_rng([3, e]).permutation(10))
    assert list(drawn[:10]) != list(drawn[10:20])
    resumed = DataOrder(10, seed=3, epoch=1, index=6)  # position after 16 items
    assert list(np.concatenate([resumed.take(4) for _ in range(4)])) == list(drawn[16:32])


# -- a whole run ------------------------------------------------------------------------------------------------
def test_run_folder_outputs_and_previews_do_not_change_training(tmp_path):
    """Validation and previews (which draw random numbers) leave the training trajectory bit-identical."""
    busy = train(toy_family.toy_config(tmp_path, "train.eval_every=1", "train.sample_every=2"), tmp_path / "busy")
    quiet = train(toy_family.toy_config(tmp_path, "train.eval_every=0"), tmp_path / "quiet")
    assert_identical(final_weights(busy, 12), final_weights(quiet, 12))

    cfg = (busy / "config.yaml").read_text()
    assert "shape:\n  - 1\n  - 28\n  - 28" in cfg  # filled in by the family from the data
    lines = [json.loads(x) for x in (busy / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in tr] == [2, 4, 6, 8, 10, 12]
    assert all({"loss", "mse", "lr", "grad_norm", "steps_per_s", "time"} <= r.keys() for r in tr)
    assert len([r for r in lines if r["split"] == "val" and "val_loss" in r]) == 12
    assert (busy / "samples" / "loss.png").is_file()
    assert sorted(p.name for p in (busy / "samples").glob("step_*.png")) == [f"step_{s:07d}.png" for s in
                                                                              range(2, 13, 2)]
    assert steps_of(busy) == [3, 6, 9, 12]

    model = GenerativeModel.from_pretrained(resolve_model_dir(busy))  # a run folder resolves to its model/
    ema = load_file(busy / "checkpoints" / "step_0000012" / "ema.safetensors")
    assert_identical({k: v for k, v in model.state_dict().items()}, ema)
    with pytest.raises(GenlabError, match="neither a model folder"):
        resolve_model_dir(tmp_path)


def test_grad_accum_and_batch_split_match_one_big_batch(tmp_path):
    """Mean loss over 4 micro-batches gives the same update as over the whole batch (noise off: deterministic)."""
    one = Trainer(toy_family.toy_config(tmp_path, "model.noise=0", "train.steps=4"), tmp_path / "one")
    one.fit()
    four = Trainer(toy_family.toy_config(tmp_path, "model.noise=0", "train.steps=4", "train.grad_accum=4"),
                   tmp_path / "four")
    four.fit()
    assert one.model.seen == four.model.seen  # the same items in the same order
    for (k, a), b in zip(one.model.state_dict().items(), four.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-5, msg=k)  # Adam magnifies rounding


def test_family_train_step_with_two_optimizers_resumes_exactly(tmp_path):
    """A family's own train_step (two optimizers, as in a GAN): both LR schedules run, both states resume."""
    ref = Trainer(toy_family.toy_config(tmp_path, "family=toy2", "train.steps=6"), tmp_path / "ref")
    ref.fit()
    assert [o.param_groups[0]["lr"] for o in ref.optimizers] == [pytest.approx(1e-2 * lr_factor(
        6, warmup_steps=3, total_steps=6, schedule="cosine", min_lr_ratio=0.1))] * 2
    lines = (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert '"loss_0"' in lines and '"loss_1"' in lines
    run = train(toy_family.toy_config(tmp_path, "family=toy2", "train.steps=6"), tmp_path / "run")
    ckpt.quarantine(run / "checkpoints" / "step_0000006")  # as if killed after step 3's checkpoint
    again = Trainer(toy_family.toy_config(tmp_path, "family=toy2", "train.steps=6"), run)
    assert again.step == 3
    again.fit()
    assert_identical(final_weights(tmp_path / "ref", 6), final_weights(run, 6))


# -- crashes, damaged checkpoints, resume -------------------------------------------------------------------------
def test_crash_during_save_keeps_previous_checkpoint_and_resume_is_exact(tmp_path, monkeypatch):
    ref = train(toy_family.toy_config(tmp_path, "train.steps=9"), tmp_path / "ref")

    real_save = ckpt.save_file
    calls = []

    def dying_save(*args, **kw):  # the second checkpoint dies half-way through writing its files
        calls.append(1)
        if len(calls) == 3:
            raise OSError("simulated kill during save")
        return real_save(*args, **kw)

    monkeypatch.setattr(ckpt, "save_file", dying_save)
    run = tmp_path / "run"
    with pytest.raises(OSError, match="simulated"):
        Trainer(toy_family.toy_config(tmp_path, "train.steps=9"), run).fit()
    monkeypatch.setattr(ckpt, "save_file", real_save)
    assert steps_of(run) == [3]
    assert any(p.name.startswith(".tmp-step_0000006") for p in (run / "checkpoints").iterdir())
    ckpt.load_checkpoint(run / "checkpoints" / "step_0000003")  # the previous checkpoint is intact

    trainer = Trainer(toy_family.toy_config(tmp_path, "train.steps=9"), run)
    assert trainer.step == 3
    trainer.fit()
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    assert_identical(final_weights(ref, 9), final_weights(run, 9))
    assert_identical(load_file(ref / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors"))


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    ref = train(toy_family.toy_config(tmp_path, "train.steps=9"), tmp_path / "ref")
    run = train(toy_family.toy_config(tmp_path, "train.steps=9"), tmp_path / "run")
    newest = run / "checkpoints" / "step_0000009" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    capsys.readouterr()
    trainer = Trainer(toy_family.toy_config(tmp_path, "train.steps=9"), run)
    out = capsys.readouterr().out
    assert "step_0000009 is unusable" in out and "truncated" in out and "from step_0000006" in out
    assert trainer.step == 6 and (run / "checkpoints" / "step_0000009.broken").is_dir()
    trainer.fit()
    assert_identical(final_weights(ref, 9), final_weights(run, 9))

    for _, path in ckpt.list_checkpoints(run / "checkpoints"):
        (path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(GenlabError, match="no usable checkpoint .* --no-resume"):
        Trainer(toy_family.toy_config(tmp_path, "train.steps=9"), run)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(GenlabError, match=r"loss became nan at step 6; .*step_0000004"):
        train(toy_family.toy_config(tmp_path, "model.nan_after=5", "train.ckpt_every=2"), run)
    assert steps_of(run) == [2, 4]
    weights, state = ckpt.load_checkpoint(run / "checkpoints" / "step_0000004")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in weights["model"].values())
    assert not (run / "model").exists()
    with pytest.raises(GenlabError, match="has no exported model yet"):
        resolve_model_dir(run)


def test_fp16_scaler_skips_stop_the_run_once_they_repeat(tmp_path):
    """The fp16 loss scaler skips a step with a non-finite gradient (and halves its scale): a few such steps while
    it calibrates are normal, MAX_SKIPPED_STEPS in a row (a loss that stays NaN) stop the run; without a scaler,
    the first does."""
    nan, ok = {"loss": math.nan, "grad_norm": math.nan}, {"loss": 1.0, "grad_norm": 2.0}
    overflow = {"loss": 1.0, "grad_norm": math.inf}
    assert nonfinite_stop(nan, scaled=False, skipped=0) == ("loss", 1)
    assert nonfinite_stop(overflow, scaled=False, skipped=0) == ("grad_norm", 1)
    skipped, keys = 0, []
    for stats in [overflow] * (MAX_SKIPPED_STEPS - 1) + [ok] + [nan] * MAX_SKIPPED_STEPS:
        key, skipped = nonfinite_stop(stats, scaled=True, skipped=skipped)
        keys.append(key)
    assert keys == [None] * (2 * MAX_SKIPPED_STEPS - 1) + ["loss"] and skipped == MAX_SKIPPED_STEPS
    trainer = Trainer(toy_family.toy_config(tmp_path, "train.steps=40"), tmp_path / "run")
    trainer.step = 25  # steps 7..26 were skipped
    assert re.match(r"loss became nan at step 7 and stayed so for the 20 steps the fp16 loss scaler skipped; ",
                    trainer._nonfinite_message("loss", math.nan, 20))


def test_resume_refuses_a_changed_config_and_no_resume_starts_over(tmp_path):
    run = train(toy_family.toy_config(tmp_path, "train.steps=3"), tmp_path / "run")
    with pytest.raises(GenlabError, match=r"differs .* at train\.lr \(0\.01 -> 0\.02\).*--no-resume"):
        Trainer(toy_family.toy_config(tmp_path, "train.steps=3", "train.lr=0.02"), run)
    again = Trainer(toy_family.toy_config(tmp_path, "train.steps=3", "train.log_every=1"), run)  # bookkeeping only
    assert again.step == 3
    fresh = Trainer(toy_family.toy_config(tmp_path, "train.steps=3", "train.lr=0.02"), run, resume=False)
    assert fresh.step == 0 and steps_of(run) == [] and not (run / "metrics.jsonl").exists()


def test_a_time_limited_run_shows_the_time_left_and_the_step_it_will_reach():
    """An 8-minute run of 100,000 steps at 4.6 steps/s ends at the limit, not in six hours."""
    end, eta = run_end(step=276, steps=100_000, done=276, seconds=60.0, time_left=420.0)
    assert eta == 420.0 and end == 276 + int(4.6 * 420)
    end, eta = run_end(step=276, steps=1000, done=276, seconds=60.0, time_left=420.0)  # the steps end first
    assert end == 1000 and eta == pytest.approx((1000 - 276) / 4.6)
    end, eta = run_end(step=5276, steps=100_000, done=276, seconds=60.0, time_left=420.0)  # resumed at step 5000
    assert end == 5276 + int(4.6 * 420) and eta == 420.0
    assert run_end(step=0, steps=100, done=0, seconds=0.0, time_left=30.0) == (100, 30.0)  # no rate yet
    assert run_end(step=0, steps=100, done=0, seconds=0.0, time_left=None) == (100, None)
    assert run_end(step=9, steps=100, done=9, seconds=60.0, time_left=-1.0) == (9, 0.0)  # past the limit


def test_max_minutes_stops_with_checkpoint_and_model(tmp_path):
    trainer = Trainer(toy_family.toy_config(tmp_path, "train.steps=1000", "train.max_minutes=1e-9"), tmp_path / "r")
    trainer.fit()
    assert trainer.step == 1 and not trainer.interrupted
    assert steps_of(tmp_path / "r") == [1] and (tmp_path / "r" / "model" / "model.safetensors").is_file()


# -- CLI ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "named", "choices"), [
    ("train.lrr=1", "lrr", "valid keys: steps, batch_size, lr,"),
    ("model.hiddn=3", "hiddn", "valid keys: hidden, shape, noise"),
])
def test_cli_unknown_key_fails_before_any_work(tmp_path, capsys, override, named, choices):
    recipe = toy_family.write_recipe(tmp_path)
    rc = main(["train", str(recipe), "--set", override])
    err = capsys.readouterr().err
    assert rc == 2 and named in err and choices in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr_schedule=cosin", "train.lr_schedule 'cosin' is unknown; choose one of: cosine, constant"),
    ("train.mixed_precision=fp8", "train.mixed_precision 'fp8' is unknown"),
    ("train.batch_size=6", "train.batch_size=6 must be divisible by grad_accum x processes = 4 x 1"),
    ("train.ema_decay=1", "train.ema_decay must be in [0, 1)"),
    ("train.steps=0", "train.steps must be at least 1"),
    ("train.dist_timeout_minutes=0", "train.dist_timeout_minutes must be in (0, 10080]"),
])
def test_bad_train_values_fail_before_any_work(tmp_path, override, message):
    cfg = toy_family.toy_config(tmp_path, "train.grad_accum=4", override)
    with pytest.raises(GenlabError, match=re.escape(message)):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_train_prints_run_and_model_folders(tmp_path, capsys):
    recipe = toy_family.write_recipe(tmp_path)
    assert main(["train", str(recipe), "--set", "train.steps=2", "--set", "train.warmup_steps=2",
                 "--set", "name=cli"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "cli"
    assert f"run folder: {run}" in out and f"model:      {run / 'model'}" in out
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-2]
    assert last["split"] == "train" and last["step"] == 2 and math.isfinite(last["loss"])


@pytest.mark.slow
def test_diffusion_family_resumes_exactly(tmp_path):
    """The real image family (a tiny U-Net DDPM): resuming from step 3 reproduces steps 4..6 bit for bit."""
    pytest.importorskip("genlab.models.diffusion")
    from genlab.config import load_run_config

    sets = ["family=diffusion", "data.max_items=32", "model.base_channels=8", "model.channel_mults=[1,2]",
            "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.norm_groups=4", "model.head_channels=8",
            "train.steps=6", "train.batch_size=8", "train.ckpt_every=3", "train.warmup_steps=2", "sample.steps=4",
            "sample.n=4", f"out_dir={tmp_path}"]
    ref = train(load_run_config(None, [*sets, "name=ref"]))
    run = train(load_run_config(None, [*sets, "name=run"]))
    ckpt.quarantine(run / "checkpoints" / "step_0000006")
    again = Trainer(load_run_config(None, [*sets, "name=run"]))
    assert again.step == 3
    again.fit()
    assert_identical(final_weights(ref, 6), final_weights(run, 6))
    assert_identical(load_file(ref / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors"))


def test_a_run_folder_in_use_is_refused_and_left_intact(tmp_path):
    two = ("train.steps=2", "train.warmup_steps=2")
    run = train(toy_family.toy_config(tmp_path, *two, "train.ckpt_every=1"), tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != LOCK_NAME}
    with run_lock(run):  # another trainer holds the folder
        with pytest.raises(GenlabError, match=rf"in use by another training process \(pid {os.getpid()}\)"):
            Trainer(toy_family.toy_config(tmp_path, *two), run, resume=False)
        with pytest.raises(GenlabError, match="in use by another training process"):
            train(toy_family.toy_config(tmp_path, *two, "train.ckpt_every=1"), run)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != LOCK_NAME} == before
    assert Trainer(toy_family.toy_config(tmp_path, *two, "train.ckpt_every=1"), run).step == 2  # released


# -- many processes ----------------------------------------------------------------------------------------------
class FakeCudaRNG:
    """torch.cuda's generator-state functions over `n` pretend GPUs; a missing device raises, as in torch."""

    def __init__(self, n: int) -> None:
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(n)}

    def _index(self, device) -> int:
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index not in self.states:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set_rng_state(self, new_state, device="cuda"):
        self.states[self._index(device)] = new_state.clone()

    def get_rng_state_all(self):
        return [s.clone() for s in self.states.values()]

    def set_rng_state_all(self, new_states):
        for i, s in enumerate(new_states):
            self.set_rng_state(s, i)


def fake_gpus(monkeypatch, n: int) -> FakeCudaRNG:
    gpus = FakeCudaRNG(n)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus.states))
    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(gpus, name))
    return gpus


def test_cuda_rng_of_the_rank_s_own_gpu_resumes_on_fewer_gpus(tmp_path, monkeypatch):
    """Rank 5 of 8 saves its own GPU's generator; resumed where one GPU is visible, that state goes to cuda:0."""
    eight = fake_gpus(monkeypatch, 8)
    saved = ckpt.rng_state(torch.device("cuda", 5))
    assert torch.equal(saved["cuda"], eight.states[5])
    path = ckpt.save_checkpoint(tmp_path, 1, {}, {"rng": [saved]})
    _, state = ckpt.load_checkpoint(path)
    one = fake_gpus(monkeypatch, 1)
    ckpt.set_rng_state(state["rng"][0], torch.device("cuda", 0))
    assert torch.equal(one.states[0], torch.full((16,), 5, dtype=torch.uint8))
    older = {**saved, "cuda": [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(8)]}  # every GPU's state
    ckpt.set_rng_state(older, torch.device("cuda", 0))
    assert torch.equal(one.states[0], torch.full((16,), 10, dtype=torch.uint8))  # the entry of this device


def test_processes_wait_for_one_another_as_long_as_the_recipe_says(tmp_path, monkeypatch):
    """The process group is made with train.dist_timeout_minutes (default 60), not the backend's short default:
    rank 0 alone may train the feature network or hash a large checkpoint while the others wait."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    import genlab.train.trainer as trainer_module

    made = []

    class RecordingAccelerator(trainer_module.Accelerator):
        def __init__(self, *args, **kw):
            made.append(kw)
            super().__init__(*args, **kw)

    monkeypatch.setattr(trainer_module, "Accelerator", RecordingAccelerator)
    for sets, minutes in [((), 60), (("train.dist_timeout_minutes=90",), 90)]:
        Trainer(toy_family.toy_config(tmp_path, "train.steps=3", *sets), tmp_path / f"run{minutes}")
        (init,) = [h for h in made[-1]["kwargs_handlers"] if isinstance(h, InitProcessGroupKwargs)]
        assert init.timeout == timedelta(minutes=minutes)


def test_resuming_with_another_number_of_processes_warns_that_it_is_not_bit_exact(tmp_path, capsys):
    """A checkpoint saved by 2 processes resumes on 1 with a one-line warning (and the same process count, none)."""
    run = train(toy_family.toy_config(tmp_path, "train.steps=6"), tmp_path / "run")
    ckpt.quarantine(run / "checkpoints" / "step_0000006")
    weights, state = ckpt.load_checkpoint(run / "checkpoints" / "step_0000003")
    capsys.readouterr()
    assert Trainer(toy_family.toy_config(tmp_path, "train.steps=6"), run).step == 3
    assert "warning" not in capsys.readouterr().out
    ckpt.save_checkpoint(run / "checkpoints", 3, weights, {**state, "world_size": 2, "rng": state["rng"] * 2})
    trainer = Trainer(toy_family.toy_config(tmp_path, "train.steps=6"), run)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "saved by 2 processes and resumes on 1" in warnings[0]
    assert "not bit for bit" in warnings[0]
    trainer.fit()
    assert trainer.step == 6
