"""The trainer as real processes: SIGKILL + resume is exact, Ctrl-C saves and exits, two processes agree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import toy_family
from safetensors.torch import load_file

from genlab.train import Trainer
from genlab.train.checkpoint import list_checkpoints

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}


def cli(*args: str) -> list[str]:
    return [sys.executable, str(TESTS / "toy_cli.py"), *args]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    """2N steps in one go == N steps, SIGKILL, resume: bit-identical weights, EMA, exported model."""
    recipe = str(toy_family.write_recipe(tmp_path))
    sets = ["--set", "model.step_sleep=0.1", "--set", "train.eval_every=4", "--set", "train.sample_every=5"]
    full = subprocess.Popen(cli("train", recipe, "--run-dir", str(tmp_path / "full"), *sets), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "killed"
    victim = subprocess.Popen(cli("train", recipe, "--run-dir", str(run), *sets), env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (run / "checkpoints" / "step_0000006").is_dir(), victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    steps = [s for s, _ in list_checkpoints(run / "checkpoints")]
    assert 6 in steps and 12 not in steps and not (run / "model").exists()

    resumed = subprocess.run(cli("train", recipe, "--run-dir", str(run), *sets), env=env(), capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step_{max(steps):07d}" in resumed.stdout
    out, err = full.communicate(timeout=120)
    assert full.returncode == 0, err
    for rel in ("checkpoints/step_0000012/model.safetensors", "checkpoints/step_0000012/ema.safetensors",
                "model/model.safetensors"):
        a, b = load_file(tmp_path / "full" / rel), load_file(run / rel)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), rel
    logged = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(logged) == 6  # lines the killed run wrote past its checkpoint were dropped, none repeated


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    recipe = str(toy_family.write_recipe(tmp_path))
    run = tmp_path / "run"
    proc = subprocess.Popen(cli("train", recipe, "--run-dir", str(run), "--set", "train.steps=100000", "--set",
                                "model.step_sleep=0.02", "--set", "train.ckpt_every=0"),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run / "metrics.jsonl").exists(), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "genlab: interrupted" in err and "interrupted at step" in out
    steps = [s for s, _ in list_checkpoints(run / "checkpoints")]
    assert len(steps) == 1 and 2 <= steps[0] < 100000
    assert (run / "model" / "model.safetensors").is_file() and f"model:      {run / 'model'}" in out


def test_two_processes_agree_and_see_distinct_items(tmp_path):
    """torchrun with 2 CPU processes (gloo): identical weights on both, disjoint shards of each global batch,
    and (noise off) the same result as one process on the whole batch."""
    recipe = str(toy_family.write_recipe(tmp_path))
    sets = ["model.noise=0", "train.steps=4", "train.ckpt_every=2"]
    run = tmp_path / "ddp"
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29571",
                           str(TESTS / "toy_ddp.py"), recipe, str(run), *sets],
                          env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(run / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    assert len(r0["seen"]) == len(r1["seen"]) == 16 and not set(r0["seen"]) & set(r1["seen"])

    single = Trainer(toy_family.toy_config(tmp_path, *sets), tmp_path / "single")
    single.fit()
    assert sorted(single.model.seen) == sorted(r0["seen"] + r1["seen"])
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0["weights"][k], v, rtol=0, atol=5e-5)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 4] and (run / "model").is_dir()
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 4]  # written once (rank 0 only): train lines at 2 and 4, the final validation


@pytest.mark.slow
def test_accelerate_launch_runs_the_cli_unchanged(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine runs `genlab train` as is."""
    recipe = str(toy_family.write_recipe(tmp_path))
    run = tmp_path / "acc"
    proc = subprocess.run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", "29572", str(TESTS / "toy_cli.py"), "train", recipe,
                           "--run-dir", str(run), "--set", "train.steps=4"],
                          env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1  # printed by the main process only
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [3, 4]


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_once_on_both_processes(tmp_path):
    """Ctrl-C at a terminal signals the launcher and both workers (and the launcher forwards it again)."""
    recipe = str(toy_family.write_recipe(tmp_path))
    run = tmp_path / "run"
    proc = subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29573",
                             str(TESTS / "toy_cli.py"), "train", recipe, "--run-dir", str(run), "--set",
                             "train.steps=100000", "--set", "model.step_sleep=0.02", "--set", "train.ckpt_every=0"],
                            env=env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: (run / "metrics.jsonl").exists(), proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert err.count("genlab: interrupted") == 2 and "interrupted at step" in out
    assert len(list_checkpoints(run / "checkpoints")) == 1 and (run / "model" / "model.safetensors").is_file()
