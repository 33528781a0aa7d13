"""User errors end to end: one rank-tagged line naming the key, file or variable, exit status 1,
no traceback (docs/failure-modes.md). Unit tests of the same rules live in test_config.py,
test_data.py and below; these run the real command line (under mpirun where ranks matter).
"""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

from conftest import MPIRUN
from mpitrain import faults
from mpitrain.runtime import UserError
from test_faults import BOUND, LIMIT, PY, TINY, Job, _env, _kill_group, digits, failed_cleanly  # noqa: F401


def run(cmd, cwd, fault=None, **env) -> Job:
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=_env(fault, **env), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=LIMIT)
    finally:
        _kill_group(p)
    return Job(p.returncode, out, err, time.monotonic() - t0)


def train(n, tmp, data, *extra, fault=None, **env) -> Job:
    args = ["-m", "mpitrain", "--set", f"data.path={data}", "--set", f"checkpoint.dir={tmp / 'c'}", *TINY, *extra]
    return run([MPIRUN, "-n", str(n), PY, *args] if n else [PY, *args], tmp, fault, **env)


# ----------------------------------------------------------------------------- MPITRAIN_FAULT / _SLOW_S


@pytest.mark.parametrize("spec", ["\u00b2:3:raise", "1:\u0663:raise", "-1:3:raise", "1:3"])
def test_fault_spec_takes_ascii_digits_only(spec):
    with pytest.raises(UserError, match="expected rank:step:kind"):
        faults.parse(spec)


def test_fault_for_a_rank_the_job_lacks_is_an_error():
    with pytest.raises(UserError, match=r"rank\(s\) \[2, 5\] do not exist in this job of 2 rank\(s\) \(0..1\)"):
        faults.Faults(0, "1:3:nan,5:3:raise,2:1:hang", size=2)
    assert faults.Faults(1, "1:3:nan", size=2).plan == [(3, "nan")]


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf", "soon"])
def test_slow_seconds_must_be_finite_and_not_negative(value):
    with pytest.raises(UserError, match=f"MPITRAIN_SLOW_S='{value}': expected seconds >= 0"):
        faults.slow_seconds(value)
    assert faults.slow_seconds("") == faults.SLOW_S and faults.slow_seconds("0") == 0.0


@pytest.mark.parametrize("fault, env, words", [
    ("\u00b2:3:raise", {}, "MPITRAIN_FAULT='\u00b2:3:raise': expected rank:step:kind"),
    ("5:3:raise", {}, "MPITRAIN_FAULT='5:3:raise': rank(s) [5] do not exist in this job of 2 rank(s)"),
    ("1:3:slow", {"MPITRAIN_SLOW_S": "nan"}, "MPITRAIN_SLOW_S='nan': expected seconds >= 0"),
])
def test_fault_variables_end_to_end(digits, tmp_path, fault, env, words):  # noqa: F811
    job = train(2, tmp_path, digits, fault=fault, **env)
    failed_cleanly(job, words, rank=0)
    assert "epoch" not in job.out, job


def test_exit_fault_status_at_three_ranks(digits, tmp_path):  # noqa: F811
    """``exit`` is os._exit(3) on one rank. mpirun (MPICH hydra) then SIGKILLs the others and reports
    either that rank's 3 or the 9 of a rank it killed (measured at 3 ranks: 3 in 8 of 16 runs):
    what is guaranteed is a non-zero status, fast, and no error line (the rank said nothing)."""
    job = train(3, tmp_path, digits, fault="1:15:exit")
    assert job.rc in (3, 9) and job.wall < BOUND, job
    assert not job.errors and "Traceback" not in job.err, job


# ----------------------------------------------------------------------------- config, end to end


@pytest.mark.parametrize("sets, words", [
    (["train.seed=-1"], "--set train.seed=-1: train.seed = -1 must be >= 0"),
    (["train.min_lr=-1"], "--set train.min_lr=-1: train.min_lr = -1.0 must be >= 0"),
    (["train.min_lr=nan"], "--set train.min_lr=nan: train.min_lr = nan must be a finite number"),
    (["model.hidden=[1000000000000]"], "model.hidden = [1000000000000] widths must be <= 1048576 (2**20) each"),
    ([], "not UTF-8 text (byte 0xe9 at line 1)"),
])
def test_config_errors_end_to_end(digits, tmp_path, sets, words):  # noqa: F811
    extra = [a for s in sets for a in ("--set", s)]
    if not sets:
        (tmp_path / "latin1.toml").write_bytes("# caf\u00e9\n[train]\nlr = 0.1\n".encode("latin-1"))
        extra = [str(tmp_path / "latin1.toml")]
    failed_cleanly(train(0, tmp_path, digits, *extra), words, rank=0)


# ----------------------------------------------------------------------------- data make / import


def test_data_command_errors_end_to_end(tmp_path):
    np.savez(tmp_path / "zero.npz", x=np.ones((0, 4)), y=np.zeros(0, dtype=int))
    np.savez(tmp_path / "ok.npz", x=np.ones((10, 2)), y=np.arange(10) % 2)
    cases = [
        (["make", "digits", "--out", "d", "--seed", "-1"], "d: --seed must be a non-negative integer (got -1)"),
        (["import", "ok.npz", "--out", "o", "--seed", "-1"], "ok.npz: --seed must be a non-negative integer"),
        (["import", "zero.npz", "--out", "o"], "zero.npz: holds no rows"),
        (["make", "digits", "--out", "d", "--test-fraction", "0.9999"],
         "--test-fraction 0.9999 holds out all 1797 rows and leaves none for training; use at most 0.9994"),
        (["make", "digits", "--out", "d", "--test-fraction", "0"], "the test set would have no rows"),
    ]
    for argv, words in cases:
        job = run([PY, "-m", "mpitrain", "data", *argv], tmp_path)
        assert job.rc == 1, job
        failed_cleanly(job, words, rank=0)
    job = run([MPIRUN, "-n", "2", PY, "-m", "mpitrain", "data", "import", "zero.npz", "--out", "o"], tmp_path)
    failed_cleanly(job, "zero.npz: holds no rows", rank=0)  # under mpirun: still one line, from rank 0


def test_a_non_ascii_slurm_task_count_is_not_a_traceback(monkeypatch):
    from mpitrain.runtime import check_launch

    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "\u00b2")
    check_launch()  # not a number SLURM writes: ignored, like an unset one
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(UserError, match="SLURM started 2 tasks but each one is an MPI job of size 1"):
        check_launch()
