"""The asynchronous parameter server (``comm.mode = "ps"``, mpitrain/sync/ps/).

Serial tests launch ``mpirun`` themselves under a timeout (like test_faults.py): training to a
stated accuracy at 2, 3, 4 ranks and with 2 servers, the staleness bound (and lock-step at 0),
workers that finish at different times, signals and --resume, and the failures (bad rank
count, an exception on a worker, a stuck worker) -- each must end every rank, quickly.
The bookkeeping of the bound (``Clocks``) is tested without MPI; one in-process MPI test
runs the trainer at the suite's rank counts (skipped at 1 rank: a server needs a worker).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import MPIRUN
from test_faults import _env
from test_faults import Job as FaultsJob
from mpitrain import checkpoint
from mpitrain.sync.ps import Clocks, bytes_per_step

PY = sys.executable
BOUND = 20.0   # a failing job must end within this many seconds (launch included)
LIMIT = 90     # hard subprocess timeout: a hang fails the test, never the suite
PS = ["--set", 'comm.mode="ps"']
SPE = {1: 44, 2: 22, 3: 11}  # digits (1438 rows, 4 shards), batch 32: steps per epoch per worker, by workers
N_PARAMS = 64 * 128 + 128 + 128 * 10 + 10  # the default MLP 64-128-10
SYNC_KEYS = {"test_accuracy", "test_loss", "epochs", "steps", "ranks", "samples_per_s", "comm_fraction", "wall_s",
             "timers_s", "nonfinite_skipped", "algorithm", "backend", "stopped_early", "strategy", "comm_bytes",
             "bytes_per_step", "history"}


@dataclass
class Job(FaultsJob):
    metrics: dict | None = None


def ps(n, tmp: Path, data, *extra, fault=None, env=None, epochs=2, ckpt="c") -> Job:
    """``mpirun -n N python -m mpitrain`` in ps mode on the digits set; metrics read back."""
    m = tmp / "m.json"
    m.unlink(missing_ok=True)
    cmd = [MPIRUN, "-n", str(n), PY, "-m", "mpitrain", *PS, "--set", f"data.path={data}", "--set",
           f"checkpoint.dir={tmp / ckpt}", "--set", f"train.epochs={epochs}", "--metrics-out", str(m), *extra]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=tmp, env=_env(fault, **(env or {})), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=LIMIT)
    finally:
        if p.poll() is None:  # a hung job fails the test and leaves no rank behind
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    return Job(p.returncode, out, err, time.monotonic() - t0, json.loads(m.read_text()) if m.exists() else None)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ps-data") / "digits"
    p = subprocess.run([PY, "-m", "mpitrain", "data", "make", "digits", "--out", str(d)], env=_env(),
                       capture_output=True, text=True, timeout=LIMIT)
    assert p.returncode == 0, p.stdout + p.stderr
    return d


# ======================================================== the staleness bookkeeping (no MPI)


def test_clocks_hold_a_worker_that_is_too_far_ahead():
    c = Clocks(["a", "b"], max_staleness=1)
    c.pull("a"), c.pull("b")
    assert c.release() == [("a", 0), ("b", 0)]
    c.push("a"), c.pull("a")           # a at 1, b at 0: gap 1 <= 1
    assert c.release() == [("a", 1)]
    c.push("a"), c.pull("a")           # a at 2, b at 0: held
    assert c.release() == [] and c.held == 1
    c.push("b")                        # b reaches 1: a's gap is 1 again
    assert c.release() == [("a", 1)]
    assert c.max_gap == 1 and c.stats()["gap_counts"] == {0: 2, 1: 2}


def test_clocks_finished_worker_never_holds_the_others():
    c = Clocks([1, 2, 3], max_staleness=0)
    for w in (1, 2, 3):
        c.pull(w)
    c.release()
    c.push(1), c.pull(1)
    assert c.release() == []           # 2 and 3 are still at 0
    c.finish(2)
    assert c.release() == []           # 3 still at 0
    c.finish(3)                        # only 1 is left: it is the slowest
    assert c.release() == [(1, 0)]
    c.finish(1)
    assert c.all_done and c.slowest() is None


def test_clocks_stopping_releases_everyone_unrecorded():
    c = Clocks([1, 2], max_staleness=0)
    c.push(1), c.push(1), c.pull(1)
    assert c.release() == []
    assert c.release(force=True) == [(1, 2)]
    assert c.max_gap == 0 and not c.gaps  # a stop reply carries no parameters to compute with


def test_bytes_per_step_formula():
    # pull request + reply + push, each with an 80-byte header per server
    assert bytes_per_step(N_PARAMS, 4, 1) == 2 * N_PARAMS * 4 + 240
    assert bytes_per_step(N_PARAMS, 4, 2) == 2 * N_PARAMS * 4 + 480


# ======================================================== training, end to end


@pytest.mark.parametrize("n,servers", [(2, 1), (3, 1), (4, 1), (4, 2)])
def test_trains_the_default_job(digits, tmp_path, n, servers):
    # measured (18 runs at 3 and 4 ranks): 0.955-0.969 after 10 epochs; async order makes runs differ
    job = ps(n, tmp_path, digits, "--set", f"comm.servers={servers}", epochs=10)
    assert job.rc == 0, job
    m, w = job.metrics, n - servers
    print(f"ps n={n} servers={servers}: accuracy {m['test_accuracy']:.4f}, {m['wall_s']:.2f} s training, "
          f"{job.wall:.1f} s in all, {m['bytes_per_step']:.0f} B/step")
    assert m["test_accuracy"] >= 0.92, job
    assert SYNC_KEYS <= set(m), set(m) ^ SYNC_KEYS
    assert m["ranks"] == n and m["epochs"] == 10 and m["steps"] == 10 * SPE[w] * w and not m["stopped_early"]
    assert m["strategy"] == f"ps(servers={servers},staleness=4)"
    assert [h["epoch"] for h in m["history"]] == list(range(1, 11)), m["history"]
    assert [h["step"] for h in m["history"]] == [k * SPE[w] * w for k in range(1, 11)]
    for a, b in zip(m["history"], m["history"][1:]):
        assert a["comm_bytes"] < b["comm_bytes"] and a["wall_s"] <= b["wall_s"]
    assert m["history"][-1]["test_accuracy"] == m["test_accuracy"]
    # every message counted: the per-step formula, plus little (snapshots, the final gather, DONE)
    model = bytes_per_step(N_PARAMS, 4, servers)
    assert model <= m["bytes_per_step"] <= 1.05 * model, m
    p = m["ps"]
    assert p["max_gap"] <= 4 and p["worker_steps"] == [10 * SPE[w]] * w and p["pulls"] == servers * m["steps"]
    assert p["updates_per_server"] == [m["steps"]] * servers
    lines = [ln for ln in job.out.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 10 and "test acc" in lines[-1], job
    assert "done: test accuracy" in job.out and f"{servers} server(s) + {w} worker(s)" in job.out
    cks = checkpoint.list_checkpoints(tmp_path / "c")
    assert cks and checkpoint.latest(tmp_path / "c")["step"] == m["steps"], cks


# ======================================================== the staleness bound


@pytest.mark.parametrize("staleness", [0, 2])
def test_staleness_bound_holds_with_a_slow_worker(digits, tmp_path, staleness):
    """Worker rank 3 sleeps 20 ms a step: the two fast workers run ahead exactly as far as allowed."""
    job = ps(4, tmp_path, digits, "--set", f"comm.max_staleness={staleness}", fault="3:0:slow",
             env={"MPITRAIN_SLOW_S": "0.02"})
    assert job.rc == 0, job
    p = job.metrics["ps"]
    print(f"staleness {staleness}: gaps {p['gap_counts']}, {p['held_pulls']} of {p['pulls']} pulls held")
    assert p["max_gap"] == staleness, p          # reached (the slow worker lags), never exceeded
    assert max(int(g) for g in p["gap_counts"]) <= staleness
    assert p["held_pulls"] > 0 and sum(p["gap_counts"].values()) == p["pulls"]
    if staleness == 0:  # lock-step: every pull answered with all workers at the same step
        assert p["gap_counts"] == {"0": p["pulls"]}


def test_without_a_bound_fast_workers_run_far_ahead_and_finish_first(digits, tmp_path):
    job = ps(4, tmp_path, digits, "--set", "comm.max_staleness=1000", fault="3:0:slow",
             env={"MPITRAIN_SLOW_S": "0.02"})
    assert job.rc == 0 and job.wall < BOUND, job
    p = job.metrics["ps"]
    assert p["held_pulls"] == 0 and p["max_gap"] >= 5, p  # the fast workers finished while rank 3 trained on
    assert p["worker_steps"] == [2 * SPE[3]] * 3


def test_a_worker_that_finishes_early_releases_the_others(digits, tmp_path):
    """Rank 1 stops after 5 steps; with max_staleness=1 rank 2 would wait for it for ever without DONE."""
    job = ps(3, tmp_path, digits, "--set", "comm.max_staleness=1", fault="1:5:finish")
    assert job.rc == 0 and job.wall < BOUND, job
    m = job.metrics
    assert m["ps"]["worker_steps"] == [5, 2 * SPE[2]] and m["steps"] == 5 + 2 * SPE[2], m["ps"]
    assert m["ps"]["max_gap"] <= 1 and "done: test accuracy" in job.out


# ======================================================== signals and resume


def test_sigusr1_on_a_worker_stops_every_rank_and_resume_continues(digits, tmp_path):
    job = ps(3, tmp_path, digits, fault="2:30:usr1")
    assert job.rc == 75, job
    assert job.metrics["stopped_early"] and "stopped by signal SIGUSR1" in job.out, job
    ck = checkpoint.latest(tmp_path / "c")
    assert ck["mode"] == "ps" and ck["step"] == job.metrics["steps"] and 30 < ck["step"] < 2 * 2 * SPE[2], ck
    assert ck["worker_steps"][1] == 31, ck  # rank 2 finished the step it was signalled in, then stopped
    again = ps(3, tmp_path, digits, "--resume")
    assert again.rc == 0, again
    assert f"resumed from {ck['path']}: update {ck['step']}" in again.out, again
    m = again.metrics
    assert m["steps"] == 2 * 2 * SPE[2] and m["ps"]["worker_steps"] == [2 * SPE[2]] * 2, m["ps"]
    assert m["epochs"] == 2 and m["history"][-1]["epoch"] == 2


# ======================================================== failures end every rank


def test_too_few_ranks_for_the_servers(digits, tmp_path):
    job = ps(2, tmp_path, digits, "--set", "comm.servers=2")
    assert job.rc != 0 and job.wall < BOUND, job
    assert len(job.errors) == 1, job
    assert "comm.servers=2 needs at least 3 ranks" in job.errors[0] and "this job has 2 rank(s)" in job.errors[0]
    assert "Traceback" not in job.err and "epoch" not in job.out


def test_an_exception_on_a_worker_ends_every_rank(digits, tmp_path):
    job = ps(3, tmp_path, digits, fault="2:5:raise")
    assert job.rc != 0 and job.wall < BOUND, job
    assert len(job.errors) == 1 and "[rank 2@" in job.errors[0], job
    assert "RuntimeError: injected fault at step 5" in job.errors[0], job


def test_watchdog_names_a_stuck_worker(digits, tmp_path):
    job = ps(3, tmp_path, digits, "--set", "comm.timeout_s=2", fault="2:10:hang")
    assert job.rc != 0 and 2 <= job.wall < BOUND, job
    assert len(job.errors) == 1, job
    assert job.errors[0].startswith("[rank 0@") and "worker rank(s) [2] sent this server nothing" in job.errors[0]


# ======================================================== in process, at the suite's rank counts


@pytest.mark.mpi
def test_ps_trainer_in_process(comm, shared_tmp):
    from mpitrain import config
    from mpitrain.train import Trainer

    n = comm.Get_size()
    if n < 2:
        pytest.skip("the parameter server needs a server and at least one worker (2 ranks or more)")
    servers = 2 if n >= 4 else 1
    cfg = config.load(None, [f"data.path={shared_tmp / 'digits'}", "data.dataset=digits", f"checkpoint.dir={shared_tmp / 'c'}",
                             'comm.mode="ps"', f"comm.servers={servers}", "train.epochs=2", "model.hidden=[16]",
                             "checkpoint.every=0", "comm.max_staleness=1"])
    out = shared_tmp / "m.json"
    code = Trainer(cfg, comm).run(metrics_out=str(out))
    assert code == 0
    if comm.Get_rank() == 0:
        m = json.loads(out.read_text())
        w = n - servers
        assert m["ranks"] == n and m["steps"] == 2 * SPE[w] * w, m
        assert m["ps"]["max_gap"] <= 1 and m["test_accuracy"] > 0.5, m
