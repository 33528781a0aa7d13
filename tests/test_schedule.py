"""Pipeline schedules (parallel/schedule.py): built, checked and timed without a single message."""

import subprocess
import sys

import pytest

from mpitrain.parallel import schedule as S
from mpitrain.parallel.schedule import Instr, ScheduleError


@pytest.mark.parametrize("name", S.SCHEDULES)
def test_every_schedule_checks_and_takes_m_plus_p_minus_1_slots(name):
    for p in range(1, 6):
        for m in range(1, 10):
            progs = S.build(name, p, m)
            stats = S.check(progs, p, m, name)
            assert stats["max_stash"] == [S.stash_bound(name, p, m, r) for r in range(p)]
            assert stats["messages"] == 2 * m * (p - 1)
            spans = S.simulate(progs, p, m, 1.0, 2.0)
            assert max(s.end for s in spans) == pytest.approx((m + p - 1) * 3.0)
            assert S.idle_fraction(spans, p) == pytest.approx([S.bubble(p, m)] * p)
            for r in range(p):  # backwards in micro-batch order: every schedule adds the same sums
                assert [s.mb for s in spans if s.stage == r and s.op == "bwd"] == list(range(m))


def test_1f1b_holds_fewer_activations_than_gpipe():
    assert S.check(S.build("1f1b", 4, 8), 4, 8)["max_stash"] == [4, 3, 2, 1]
    assert S.check(S.build("gpipe", 4, 8), 4, 8)["max_stash"] == [8, 8, 8, 8]
    with pytest.raises(ScheduleError, match="more than 1f1b's bound"):
        S.check(S.build("gpipe", 4, 8), 4, 8, "1f1b")


def _broken(edit):
    progs = S.build("1f1b", 3, 4)
    edit(progs)
    return progs


@pytest.mark.parametrize("edit,match", [
    (lambda p: p[1].remove(Instr("recv_act", 2)), r"stage 1, instruction \d+ \(fwd 2\): comes before recv_act 2"),
    (lambda p: p[2].remove(Instr("send_grad", 3)), r"stage 2: send_grad 3 is missing"),
    (lambda p: p[0].append(Instr("send_act", 1)), r"stage 0, instruction \d+ \(send_act 1\): repeats"),
    (lambda p: p[0].insert(0, Instr("bwd", 0)), r"stage 0, instruction 0 \(bwd 0\): backward before its forward"),
    (lambda p: p[2].insert(0, Instr("send_act", 0)), r"stage 2 has no neighbour that way"),
])
def test_the_checker_names_the_stage_and_instruction_at_fault(edit, match):
    with pytest.raises(ScheduleError, match=match):
        S.check(_broken(edit), 3, 4)


def test_the_checker_rejects_a_swapped_channel_order():
    progs = S.build("gpipe", 2, 3)
    i, j = progs[1].index(Instr("recv_act", 0)), progs[1].index(Instr("recv_act", 1))
    progs[1][i], progs[1][j] = progs[1][j], progs[1][i]
    fwd0, fwd1 = progs[1].index(Instr("fwd", 0)), progs[1].index(Instr("fwd", 1))
    progs[1][fwd0], progs[1][fwd1] = progs[1][fwd1], progs[1][fwd0]
    with pytest.raises(ScheduleError, match="stage 0 -> stage 1: send_act order"):
        S.check(progs, 2, 3)


def test_the_checker_finds_a_cycle_of_waits_without_sending():
    """Stage 0 waits for a gradient before it sends any activation: stage 1 waits for that activation."""
    progs = S.build("gpipe", 2, 2)
    first_recv = progs[0].index(Instr("recv_grad", 0))
    progs[0].insert(0, progs[0].pop(first_recv))
    progs[0].insert(1, progs[0].pop(progs[0].index(Instr("bwd", 0))))
    progs[0] = [Instr("fwd", 0)] + [x for x in progs[0] if x != Instr("fwd", 0)]
    with pytest.raises(ScheduleError, match=r"cycle of waits.*stage 0, instruction 1 \(recv_grad 0\) waits for stage 1"
                                            r".*stage 1, instruction 0 \(recv_act 0\) waits for stage 0"):
        S.check(progs, 2, 2)


def test_only_the_stages_in_the_cycle_are_named():
    """Stages 0 and 1 wait on each other; stage 2 waits on stage 1 too but is not part of the cycle."""
    progs = S.build("gpipe", 3, 1)
    progs[0] = [Instr("recv_grad", 0), Instr("fwd", 0), Instr("send_act", 0), Instr("bwd", 0)]
    with pytest.raises(ScheduleError) as e:
        S.check(progs, 3, 1)
    assert "stage 0" in str(e.value) and "stage 1, instruction 0" in str(e.value)
    assert "stage 2, instruction" not in str(e.value)


def test_text_timeline_and_plot(tmp_path):
    spans = S.simulate(S.build("gpipe", 2, 2), 2, 2)
    text = S.render_text(spans, 2)
    assert text.splitlines()[0].startswith("stage 0   F0 F1 .. .. .. B0 B0 B1 B1")
    out = tmp_path / "t.png"
    S.plot(spans, out, "gpipe", measured=spans)
    assert out.stat().st_size > 1000


def test_schedule_command_prints_checks_and_plots(tmp_path):
    png = tmp_path / "s.png"
    p = subprocess.run([sys.executable, "-m", "mpitrain", "schedule", "--pp", "4", "--micro-batches", "8",
                        "--schedule", "1f1b", "--plot", str(png)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "live micro-batches per stage [4, 3, 2, 1]" in p.stdout and "predicted bubble (p-1)/(m+p-1) = 27.3%" in p.stdout
    assert png.stat().st_size > 1000
    deep = tmp_path / "new" / "dir" / "s.png"
    d = subprocess.run([sys.executable, "-m", "mpitrain", "schedule", "--plot", str(deep)], capture_output=True,
                       text=True, timeout=120)
    assert d.returncode == 0 and deep.exists(), d.stderr
    for bad, msg in ((["--pp", "0"], "must be >= 1"), (["--schedule", "zb"], "known schedules"),
                     (["--fwd-time", "nan"], "finite number")):
        b = subprocess.run([sys.executable, "-m", "mpitrain", "schedule", *bad], capture_output=True, text=True,
                           timeout=120)
        assert b.returncode != 0 and msg in b.stderr and "Traceback" not in b.stderr, b.stderr
