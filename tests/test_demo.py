"""The demo's report: it says when the time limit stopped a decaying LR schedule before its end."""

from __future__ import annotations

from genlab.commands.demo import write_report


def _metrics(done: int, planned: int, schedule: str) -> dict:
    return {
        "recipe": "mnist-ddpm", "run_dir": "runs/mnist-ddpm", "train_steps": done, "planned_steps": planned,
        "lr_schedule": schedule, "train_seconds": 1.0, "samples": 10, "sampler": "dpmpp_2m", "steps": 20, "cfg": 3.0,
        "seed": 0, "sample_seconds": 1.0, "classifier": {"name": "mnist-cnn", "hash": "0", "test_accuracy": 0.99},
        "classifier_agreement": 0.9, "classifier_agreement_per_class": [0.9] * 10, "fid": 5.0, "kid": 0.01,
        "kid_se": 0.001, "n_real": 2000, "reference": {"split": "test"},
    }


def test_report_names_a_schedule_cut_short(tmp_path):
    grid = tmp_path / "samples.png"
    cut = write_report(tmp_path / "a.md", _metrics(1800, 2600, "cosine"), grid).read_text()
    assert "stopped training at step 1800 of 2600" in cut and "train.steps=1800" in cut
    for done, schedule in ((2600, "cosine"), (1800, "constant")):  # finished, or nothing to decay
        text = write_report(tmp_path / "b.md", _metrics(done, 2600, schedule), grid).read_text()
        assert "stopped training" not in text
