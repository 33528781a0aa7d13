"""--trace: named tracks (the tracer API) and a training run's trace read back: numbered steps, an eval
span, and with buckets one track per bucket whose all-reduces overlap backprop."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import MPIRUN
from mpitrain.metrics import Trace


def tracks(doc):
    """{(pid, track name): [events]} of a written trace (its thread_name metadata)."""
    evs = doc["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    out = {}
    for e in evs:
        if e["ph"] != "M":
            out.setdefault((e["pid"], names[(e["pid"], e["tid"])]), []).append(e)
    return out


class _Handle:
    """A fake non-blocking operation: done after ``n`` progress calls."""

    def __init__(self, n):
        self.n = n

    def progress(self):
        self.n -= 1
        return self.n <= 0

    def wait(self):
        self.n = 0
        return "buf"


@pytest.mark.mpi
def test_spans_on_named_tracks(comm, shared_tmp):
    r = comm.Get_rank()
    t = Trace(comm)
    for i in range(r + 1):  # rank r: r + 1 spans on "stage r"
        with t.span(f"stage {r}", f"fwd {i}", micro=i):
            time.sleep(0.001)  # sleep-ok: a span that lasts a measurable time
    t.add_span("steps", "step 1", time.perf_counter() - 0.002, 0.002, step=1)
    t.instant("recv", track=f"stage {r}", src=r - 1)
    h = t.pending(_Handle(2), "bucket 0", "allreduce 0", bytes=8)
    assert h.progress() is False and h.progress() is True and h.wait() == "buf"  # one span, at the first done
    with t("plain", "compute"):  # the thread's own track, as Timers record
        pass
    t.write(shared_tmp / "t.json")
    comm.Barrier()
    doc = json.loads((shared_tmp / "t.json").read_text())
    tr = tracks(doc)
    mine = tr[(r, f"stage {r}")]
    spans = [e for e in mine if e["ph"] == "X"]
    assert [e["name"] for e in spans] == [f"fwd {i}" for i in range(r + 1)]
    assert [e["args"]["micro"] for e in spans] == list(range(r + 1)) and all(e["dur"] >= 1000 for e in spans)
    inst = [e for e in mine if e["ph"] == "i"]
    assert len(inst) == 1 and inst[0]["args"] == {"src": r - 1}
    assert [(e["name"], e["args"]) for e in tr[(r, "steps")]] == [("step 1", {"step": 1})]
    assert [(e["name"], e["args"]) for e in tr[(r, "bucket 0")]] == [("allreduce 0", {"bytes": 8})]
    assert [e["name"] for e in tr[(r, "MainThread")]] == ["plain"]
    assert {p for p, _ in tr} == set(range(comm.Get_size()))
    assert not any(name.startswith("stage") and p != int(name.split()[1]) for p, name in tr)


def _train(tmp_path, *sets):
    cmd = [MPIRUN, "-n", "2", sys.executable, "-m", "mpitrain", "--set", f"data.path={tmp_path / 'digits'}",
           "--set", "data.dataset=digits", "--set", "checkpoint.every=0", "--set", "train.epochs=1", "--set", "model.hidden=[32,32,32]",
           "--set", "train.eval_every=10", "--trace", str(tmp_path / "t.json")]
    for s in sets:
        cmd += ["--set", s]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout + p.stderr
    return tracks(json.loads((tmp_path / "t.json").read_text()))


def test_a_bucketed_run_shows_steps_evals_and_each_bucket_overlapping_backprop(tmp_path):
    tr = _train(tmp_path, "comm.bucket_bytes=2048")
    n_params = 64 * 32 + 32 + 2 * (32 * 32 + 32) + 32 * 10 + 10
    n_buckets = -(-n_params * 4 // 2048)
    steps = 22  # digits: 1438 rows in 4 shards, 2 ranks x batch 32
    for r in (0, 1):
        st = [e for e in tr[(r, "steps")] if e["ph"] == "X"]
        assert [e["name"] for e in st] == [f"step {i}" for i in range(1, steps + 1)]
        assert [e["args"]["step"] for e in st] == list(range(1, steps + 1))
        ev = tr[(r, "eval")]
        assert [e["args"]["step"] for e in ev] == [10, 20, 22] and all(e["dur"] > 0 for e in ev)
        bw = {e["args"]["step"]: e for e in tr[(r, "MainThread")] if e["name"] == "backward"}
        assert sorted(bw) == list(range(1, steps + 1))
        buckets = sorted(name for p, name in tr if p == r and name.startswith("allreduce bucket"))
        assert buckets == sorted(f"allreduce bucket {i}" for i in range(n_buckets))
        overlapped = 0
        for i in range(n_buckets):
            spans = tr[(r, f"allreduce bucket {i}")]
            assert [e["args"]["step"] for e in spans] == list(range(1, steps + 1))
            assert all(e["args"]["bytes"] == min(2048, n_params * 4 - 2048 * i) for e in spans)
            for e in spans:  # inside its step; started once backprop had begun
                s, b = st[e["args"]["step"] - 1], bw[e["args"]["step"]]
                assert s["ts"] <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"] + 1
                assert e["ts"] >= b["ts"]
                overlapped += e["ts"] < b["ts"] + b["dur"]  # started while backprop still ran
        assert overlapped >= steps  # the first bucket leaves before the first layer's gradients exist


def test_without_buckets_no_bucket_tracks(tmp_path):
    tr = _train(tmp_path)
    assert not [name for _, name in tr if name.startswith("allreduce bucket")]
    comm = [e for e in tr[(0, "MainThread")] if e["name"] == "comm"]
    assert len(comm) >= 22  # the one blocking all-reduce per step, on the loop's own track
