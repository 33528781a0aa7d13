"""Timers, ProgressBar and Trace (mpitrain.metrics)."""

import io
import json
import time

import pytest

from mpitrain.metrics import ProgressBar, StatusLine, Timers, Trace, format_rate


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


# --------------------------------------------------------------------------- Timers (serial)


def test_timers_accumulate_and_lap():
    clock = FakeClock()
    t = Timers(clock=clock)
    for _ in range(3):
        with t("comm"):
            clock.t += 0.01
    with t("compute"):
        clock.t += 0.02
    assert t.count("comm") == 3
    assert t.total("comm") == pytest.approx(0.03)
    assert t.total("compute") == pytest.approx(0.02)
    assert t.total("never") == 0.0
    lap = t.lap()
    assert set(lap) == {"comm", "compute"}
    assert lap["comm"] == pytest.approx(t.total("comm"))
    # a new lap starts empty, totals keep growing
    t.add("comm", 0.5)
    assert t.lap() == {"comm": 0.5}
    assert t.lap() == {}
    assert t.total("comm") == pytest.approx(0.53)
    f = t.fraction("comm")
    assert 0 < f < 1
    assert f == pytest.approx(t.total("comm") / (t.total("comm") + t.total("compute")))
    assert t.fraction("comm", of=["comm"]) == pytest.approx(1.0)
    assert "comm" in t.summary() and "%" in t.summary()
    t.reset()
    assert t.totals() == {} and t.count("comm") == 0 and t.fraction("comm") == 0.0


def test_timers_nested_same_name_counts_once_and_sync_called():
    calls = []
    t = Timers(sync=lambda: calls.append(1))
    with t("step"):
        with t("step"):
            pass
    assert t.count("step") == 1
    assert calls == [1, 1]  # once at each end of the outermost section
    with t("data"), t("compute"):  # different names nest independently
        pass
    assert t.count("data") == 1 and t.count("compute") == 1


def test_timers_exception_still_counts():
    t = Timers()
    with pytest.raises(RuntimeError):
        with t("comm"):
            raise RuntimeError("boom")
    assert t.count("comm") == 1
    with t("comm"):  # the section is usable again (depth was restored)
        pass
    assert t.count("comm") == 2


def test_format_rate():
    assert format_rate(870) == "870"
    assert format_rate(3200) == "3.2k"
    assert format_rate(12.5e6) == "12.5M"


# --------------------------------------------------------------------------- ProgressBar (serial)


def test_progress_non_tty_is_rate_limited():
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(total=1000, epochs=3, rank=0, stream=out, interval=10.0, tty=False, clock=clock)
    drawn = 0
    for step in range(1, 1001):  # 0.1 s per step: 100 s in all
        clock.t += 0.1
        drawn += bar.update(step, epoch=1, loss=0.5, accuracy=0.25, samples=64, comm_fraction=0.3)
    lines = out.getvalue().splitlines()
    assert len(lines) == drawn
    assert 9 <= len(lines) <= 11  # at most one line per 10 s, and not nothing
    assert "\r" not in out.getvalue()
    last = lines[-1]
    assert "epoch 1/3" in last and "/1000" in last
    assert "loss 0.5000" in last and "acc 25.0%" in last and "comm 30%" in last
    assert "640 samples/s" in last  # 64 samples per 0.1 s
    # force draws regardless of the throttle
    assert bar.update(1000, epoch=1, force=True)
    assert len(out.getvalue().splitlines()) == len(lines) + 1


def test_progress_tty_redraws_in_place():
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(total=10, rank=0, stream=out, tty=True, clock=clock)
    for step in range(1, 11):
        clock.t += 1.0
        bar.update(step, loss=1.0 / step, samples=8)
    text = out.getvalue()
    assert text.count("\r") == 10 and "\n" not in text
    assert "[" + "#" * 20 + "]" in text  # the bar is full at the end
    bar.close(keep=True)
    assert out.getvalue().endswith("\n")


def test_progress_silent_on_other_ranks():
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(total=10, rank=1, stream=out, tty=False, interval=0.0, clock=clock)
    for step in range(1, 11):
        clock.t += 100.0
        assert not bar.update(step, loss=0.1, samples=1, force=True)
    bar.close(keep=True)
    assert out.getvalue() == ""


def test_status_line_clear_erases():
    out, clock = io.StringIO(), FakeClock()
    line = StatusLine(out, tty=True, clock=clock)
    assert line.update("hello world")
    line.clear()
    assert out.getvalue().endswith("\r" + " " * 11 + "\r")
    line.clear()  # nothing on screen: nothing written
    assert out.getvalue().count("\r") == 3


def test_status_line_delay_first():
    out, clock = io.StringIO(), FakeClock()
    line = StatusLine(out, tty=False, interval=10.0, clock=clock, delay_first=True)
    clock.t += 9.0
    assert not line.due() and not line.update("early")
    clock.t += 1.0
    assert line.due() and line.update("late")
    assert out.getvalue() == "late\n"


# --------------------------------------------------------------------------- MPI


@pytest.mark.mpi
def test_progress_only_rank0_prints(comm):
    out = io.StringIO()
    bar = ProgressBar(total=5, epochs=1, comm=comm, stream=out, tty=False, interval=0.0)
    for step in range(1, 6):
        bar.update(step, epoch=1, loss=0.1, samples=comm.Get_size())
    bar.close()
    got = comm.allgather(out.getvalue())
    assert got[0].count("\n") == 5
    assert all(g == "" for g in got[1:])


def _check_trace(doc, size, hosts):
    """Problems with a written trace, as a list of strings (empty when fine)."""
    errs = []
    if doc.get("displayTimeUnit") != "ms":
        errs.append("displayTimeUnit")
    evs = doc.get("traceEvents", [])
    pids = {e["pid"] for e in evs}
    if pids != set(range(size)):
        errs.append(f"pids {sorted(pids)}")
    for r in range(size):
        names = [e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "process_name" and e["pid"] == r]
        if names != [f"rank {r}@{hosts[r]}"]:
            errs.append(f"process_name of rank {r}: {names}")
        xs = [e for e in evs if e["ph"] == "X" and e["pid"] == r]
        if sorted(e["name"] for e in xs) != sorted(f"r{r}-e{i}" for i in range(r + 1)) + ["timed"]:
            errs.append(f"events of rank {r}: {[e['name'] for e in xs]}")
        for e in xs:
            if not (isinstance(e["ts"], (int, float)) and e["ts"] >= 0 and e["dur"] >= 0 and "tid" in e):
                errs.append(f"bad event {e}")
        spans = [e for e in xs if e["name"] == f"r{r}-e0"]
        if spans and spans[0]["dur"] < 1000:  # recorded as 2 ms
            errs.append(f"duration in microseconds? {spans[0]}")
        cs = [e for e in evs if e["ph"] == "C" and e["pid"] == r]
        if [c["args"] for c in cs] != [{"loss": float(r)}]:
            errs.append(f"counter of rank {r}: {cs}")
    return errs


@pytest.mark.mpi
def test_trace_gathers_one_process_per_rank(comm, shared_tmp):
    from mpitrain.runtime import hostname

    r, p = comm.Get_rank(), comm.Get_size()
    trace = Trace(comm)
    trace.add(f"r{r}-e0", "compute", time.perf_counter(), 0.002, args={"i": 0})  # a 2 ms event
    for i in range(1, r + 1):  # each rank records different events; these through `with trace(...)`
        with trace(f"r{r}-e{i}", "compute", args={"i": i}):
            pass
    trace.counter("loss", float(r))
    timers = Timers(trace=trace)
    with timers("timed"):
        pass
    path = shared_tmp / "trace.json"
    trace.write(path)
    comm.Barrier()
    hosts = comm.allgather(hostname())
    errs = None
    if r == 0:
        errs = _check_trace(json.loads(path.read_text()), p, hosts)
    errs = comm.bcast(errs, root=0)
    assert errs == []


@pytest.mark.mpi
def test_trace_disabled_and_capped(comm, shared_tmp):
    t = Trace(comm, enabled=False)
    with t("x"):
        pass
    t.counter("c", 1.0)
    assert t.events == []
    capped = Trace(comm, max_events=2)
    for _ in range(5):
        capped.instant("tick")
    assert len(capped.events) == 2 and capped.dropped == 3
    path = shared_tmp / "capped.json"
    capped.write(path)
    comm.Barrier()
    info = None
    if comm.Get_rank() == 0:
        info = json.loads(path.read_text())["otherData"]
    info = comm.bcast(info, root=0)
    assert info["dropped_events"] == 3 * comm.Get_size()
    assert info["ranks"] == comm.Get_size()
