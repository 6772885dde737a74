"""Atomic writes and the JSON-lines reader (a killed run can leave a torn last line in metrics.jsonl)."""

from __future__ import annotations

import json

import pytest

from genlab.errors import GenlabError
from genlab.files import atomic_path, read_jsonl, write_atomic
from genlab.plots import plot_eval_metrics, plot_losses

RECORDS = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (1, 2, 3)] + [
    {"step": 3, "split": "val", "val_loss": 0.4, "kid": 0.02, "kid_se": 0.005, "fid": 3.5, "n_fake": 64}]


def _metrics(path, torn: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + torn)


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _metrics(path, torn='{"step": 4, "split": "tra')
    assert read_jsonl(path) == RECORDS
    _metrics(path)
    assert read_jsonl(path) == RECORDS
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_read_jsonl_refuses_a_bad_line_before_the_last(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{oops\n" + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(GenlabError, match=r"line 2 of .*metrics.jsonl is not JSON"):
        read_jsonl(path)


def test_plots_read_a_log_with_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _metrics(path, torn='{"step": 4, "lo')
    loss = plot_losses(path, tmp_path / "samples" / "loss.png")
    evals = plot_eval_metrics(path, tmp_path / "samples" / "eval_metrics.png")
    assert loss is not None and loss.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert evals is not None and evals.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["eval_metrics.png", "loss.png"]
    assert plot_eval_metrics(path, tmp_path / "none.png", keys=("precision",)) is None


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = write_atomic(tmp_path / "config.json", '{"a": 1}')
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text('{"a": ')  # a writer that dies half-way
        raise RuntimeError("killed")
    assert path.read_text() == '{"a": 1}' and [p.name for p in tmp_path.iterdir()] == ["config.json"]
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01" and [p.name for p in tmp_path.iterdir()] == ["config.json"]
