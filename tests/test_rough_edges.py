"""A newcomer's rough edges (#28 item 8): serial errors are one line (no MPI_Abort noise), data check says a
failure once, one rank without mpirun says so, --help describes every command, checkpoint list shows the
folders a new run set aside, compare names its times and its --set overrides."""

import json
import os
import subprocess
import sys

import pytest

from conftest import MPIRUN


def _run(*args, cwd, launcher=()):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, sys.executable, "-m", "mpitrain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, says", [
    (["checkpoint", "show", "nope.h5"], "nope.h5: unreadable"),
    (["generate", "--prompt", "x"], "no checkpoint in checkpoints/digits"),
    (["train", "--set", "train.lrr=1"], "unknown key train.lrr"),
])
def test_serial_errors_are_one_line(tmp_path, args, says):
    p = _run(*args, cwd=tmp_path)
    assert p.returncode == 1, p
    lines = [ln for ln in p.stderr.splitlines() if not ln.startswith("note: running on 1 rank")]
    assert len(lines) == 1 and lines[0].startswith("[rank 0@") and says in lines[0], p.stderr


def test_data_check_says_a_failure_once(tmp_path):
    assert _run("data", "make", "digits", "--out", "d", cwd=tmp_path).returncode == 0
    (tmp_path / "d" / "test.h5").unlink()
    p = _run("data", "check", "d", cwd=tmp_path)
    assert p.returncode == 1 and (p.stdout + p.stderr).count("missing (listed in manifest.json)") == 1, p
    assert "test.h5              test" in p.stdout and "FAIL" in p.stdout


def test_one_rank_without_mpirun_says_so_and_bench_explains_busbw(tmp_path):
    args = ["bench", "--max", "8B", "--algorithms", "ring", "--iters", "2"]
    p = _run(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr.startswith("note: running on 1 rank (no mpirun seen); for N ranks: mpirun -n N"), p.stderr
    assert "at 1 rank that is 0 (no bytes move), so busbw = algbw here" in p.stdout
    q = _run(*args, cwd=tmp_path, launcher=(MPIRUN, "-n", "1"))
    assert q.returncode == 0 and "note: running on 1 rank" not in q.stderr, q.stderr


def test_help_describes_every_command(tmp_path):
    from mpitrain.cli import COMMANDS, build_parser

    ap = build_parser()
    sub = next(a for a in ap._actions if a.dest == "command")
    assert all(sub.choices[c].description for c in COMMANDS if c in sub.choices)
    text = {c: " ".join(sub.choices[c].format_help().split()) for c in ("bench", "compare", "generate")}
    assert "element type of the buffers" in text["bench"] and "reduction operation (default sum)" in text["bench"]
    assert "(default runs/compare)" in text["compare"] and "(default 1)" in text["compare"]
    assert "(default 200)" in text["generate"]


def test_checkpoint_list_shows_runs_set_aside(tmp_path, capsys):
    from mpitrain.cli import main as cli_main

    prev = tmp_path / "ck" / "previous-abc-1"
    prev.mkdir(parents=True)
    for step in (5, 10):
        (prev / f"ckpt-{step:08d}.h5").write_bytes(b"")
    assert cli_main(["checkpoint", "list", str(tmp_path / "ck")]) == 1
    out = capsys.readouterr().out
    assert "no checkpoints in" in out and "(but in the folders set aside below)" in out
    assert f"{prev}/  set aside: another run's 2 checkpoint(s) (steps 10, 5)" in out
    assert f"--set checkpoint.dir={prev} --resume" in out


def test_compare_title_names_the_overrides_and_the_time(tmp_path, capsys):
    from mpitrain.cli import main as cli_main

    for name, acc in (("sync", 0.9), ("fp16", 0.8)):
        m = {"strategy": name, "ranks": 2, "test_accuracy": acc, "wall_s": 3.0, "bytes_per_step": 1e3,
             "comm_bytes": 1e5, "steps": 10, "history": [{"epoch": 1, "wall_s": 3.0, "test_accuracy": acc,
                                                         "comm_bytes": 1e5}]}
        (tmp_path / f"{name}-0.json").write_text(json.dumps(m))
    assert cli_main(["compare", "--replot", "--out", str(tmp_path), "--strategies", "sync,fp16",
                     "--set", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# the default digits job --set train.epochs=3, 2 rank(s)"), out
    assert "train s" in out and "wall s" not in out
