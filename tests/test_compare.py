"""``python -m mpitrain compare``: runs each strategy through mpirun, prints a table, draws one PNG."""

import json
import os
import subprocess
import sys

import pytest

from mpitrain import compare


def _compare(tmp_path, *args, timeout=300):
    cmd = [sys.executable, "-m", "mpitrain", "compare", "--set", f"data.path={tmp_path / 'digits'}",
           "--set", "data.dataset=digits",
           "--out", str(tmp_path / "runs"), *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_compare_runs_each_strategy_and_draws_one_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png, md = tmp_path / "c.png", tmp_path / "c.md"
    p = _compare(tmp_path, "--ranks", "2", "--strategies", "sync,local4", "--set", "train.epochs=3",
                 "--plot", str(png), "--markdown", str(md))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [ln.split() for ln in p.stdout.splitlines() if ln.startswith(("sync ", "local4 "))]
    assert [r[0] for r in rows] == ["sync", "local4"]
    by = {r[0]: r for r in rows}
    assert float(by["sync"][-1]) == 1.0 and 0.2 < float(by["local4"][-1]) < 0.35  # bytes vs sync: ~1/4
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert md.read_text().count("\n") == 4  # header, rule, two rows
    m = json.loads((tmp_path / "runs" / "local4-0.json").read_text())
    assert m["ranks"] == 2 and len(m["history"]) == 3 and "sync_every=4" in m["command"]
    # the table can be redrawn from the kept metrics without training
    again = _compare(tmp_path, "--strategies", "sync,local4", "--replot")
    table = [ln for ln in p.stdout.splitlines() if not ln.startswith("#")]
    assert again.returncode == 0 and [ln for ln in again.stdout.splitlines() if not ln.startswith("#")] == table


def test_compare_reports_a_failed_strategy_and_exits_nonzero(tmp_path):
    p = _compare(tmp_path, "--ranks", "2", "--strategies", "sync", "--set", "train.epochs=0")
    assert p.returncode != 0
    assert "sync: training failed" in p.stderr and "train.epochs = 0 must be >= 1" in p.stderr


def test_train_run_that_never_answers_is_a_timeout_error(tmp_path):
    """A launcher that never returns (here: one that blocks for ever) ends at ``timeout`` with the command."""
    stuck = tmp_path / "mpirun"
    stuck.write_text(f"#!{sys.executable}\nimport select\nselect.select([], [], [])\n")
    stuck.chmod(0o755)
    with pytest.raises(compare.UserError, match=r"digits: no result after 1 s \(--timeout\); command: .*mpirun -n 2"):
        compare.train_run(2, ["train.epochs=1"], tmp_path / "m.json", mpirun=str(stuck), timeout=1, what="digits")


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(compare.UserError, match="unknown 'bogus'; choose from sync, fp16"):
        compare._strategies("sync,bogus")


def test_summary_is_relative_to_the_first_strategy():
    def m(b, acc):
        return {"strategy": "x", "ranks": 4, "test_accuracy": acc, "wall_s": 1.0, "bytes_per_step": b / 10,
                "comm_bytes": b, "steps": 10}
    rows = compare.summarize({"a": [m(100, 0.9), m(300, 0.95), m(200, 0.8)], "b": [m(50, 0.9)]})
    assert rows[0]["comm_bytes"] == 200 and rows[0]["test_accuracy"] == 0.9  # medians
    assert rows[1]["bytes_vs_first"] == 0.25


def test_replot_keeps_strategies_whose_names_share_a_prefix_apart(tmp_path):
    for name in ("topk-0", "topk-1", "topk-noef-0"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"name": name}))
    runs = compare._load(tmp_path, ["topk", "topk-noef"])
    assert [m["name"] for m in runs["topk"]] == ["topk-0", "topk-1"]
    assert [m["name"] for m in runs["topk-noef"]] == ["topk-noef-0"]
