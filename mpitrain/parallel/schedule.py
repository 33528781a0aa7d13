"""Pipeline schedules as per-stage instruction lists, a checker that runs them before any message is
sent, and their predicted timeline.

    GPipe, p = 3, m = 4 (F: forward of a micro-batch, B: its backward, . idle; B takes twice as long)
      stage 0  F0 F1 F2 F3 .. .. .. .. .. .. B0 B0 B1 B1 B2 B2 B3 B3       every forward, then
      stage 1  .. F0 F1 F2 F3 .. .. .. B0 B0 B1 B1 B2 B2 B3 B3 .. ..       every backward; stash M
      stage 2  .. .. F0 F1 F2 F3 B0 B0 B1 B1 B2 B2 B3 B3 .. .. .. ..
    1F1B, the same p and m (``python -m mpitrain schedule --pp 3 --micro-batches 4``):
      stage 0  F0 F1 F2 .. .. .. .. B0 B0 F3 B1 B1 .. B2 B2 .. B3 B3       stash 3
      stage 1  .. F0 F1 .. .. B0 B0 F2 B1 B1 F3 B2 B2 .. B3 B3 .. ..       stash 2
      stage 2  .. .. F0 B0 B0 F1 B1 B1 F2 B2 B2 F3 B3 B3 .. .. .. ..       stash 1
    1F1B (PipeDream-flush, Megatron's non-interleaved) runs min(p-r-1, m) warm-up forwards on stage r,
    then one forward one backward, then the cool-down backwards: at most p - r micro-batches live there.

Both take (m + p - 1)(t_f + t_b) with equal stages: the bubble, the share of a step a stage idles, is
(p - 1)/(m + p - 1) for both (GPipe, Huang et al. 2019; PipeDream-flush, Narayanan et al. 2021); 1F1B
only bounds the memory. Backwards run in micro-batch order 0..m-1 in both (as torch's ScheduleGPipe),
so every schedule adds the micro-batches' gradients in the same order: the same sums, bit for bit.

Instructions of stage r, in order: ``recv_act k`` (blocks until stage r-1's ``send_act k``), ``fwd k``,
``send_act k`` (non-blocking, to r+1), ``recv_grad k`` (blocks until r+1's ``send_grad k``), ``bwd k``,
``send_grad k`` (non-blocking, to r-1). Stage 0 reads its data (no ``recv_act``), the last stage's
``fwd`` ends in the loss (no ``send_act``, no ``recv_grad``). One tag per direction, so MPI matches
each channel's messages in order (FIFO): the checker proves every send has its receive in the same
order, no stage waits in a cycle (it executes the lists with blocking receives and non-blocking sends),
and the stash of live activations stays within its bound -- all before any message is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b")
OPS = ("recv_act", "fwd", "send_act", "recv_grad", "bwd", "send_grad")


@dataclass(frozen=True)
class Instr:
    op: str
    mb: int

    def __str__(self):
        return f"{self.op} {self.mb}"


@dataclass(frozen=True)
class Span:
    stage: int
    op: str      # "fwd" | "bwd"
    mb: int
    start: float
    end: float


class ScheduleError(ValueError):
    """A schedule that would hang or mismatch: the message names the stage and instruction."""


def bubble(pp: int, m: int) -> float:
    """(p - 1)/(m + p - 1): the predicted idle share of a step with equal stage times."""
    return (pp - 1) / (m + pp - 1)


def stash_bound(schedule: str, pp: int, m: int, r: int) -> int:
    """Most micro-batches whose activations stage ``r`` holds at once: GPipe M, 1F1B min(M, p - r)."""
    return m if schedule == "gpipe" else min(m, pp - r)


# ------------------------------------------------------------------------------------------ build

def _fwd(r: int, pp: int, k: int) -> list[Instr]:
    return ([Instr("recv_act", k)] if r > 0 else []) + [Instr("fwd", k)] + (
        [Instr("send_act", k)] if r < pp - 1 else [])


def _bwd(r: int, pp: int, k: int) -> list[Instr]:
    return ([Instr("recv_grad", k)] if r < pp - 1 else []) + [Instr("bwd", k)] + (
        [Instr("send_grad", k)] if r > 0 else [])


def build(schedule: str, pp: int, m: int) -> list[list[Instr]]:
    """One instruction list per stage r = 0..pp-1 for ``m`` micro-batches."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if pp < 1 or m < 1:
        raise ValueError(f"a schedule needs pp >= 1 and m >= 1 micro-batches (got pp = {pp}, m = {m})")
    programs = []
    for r in range(pp):
        prog = []
        if schedule == "gpipe":
            for k in range(m):
                prog += _fwd(r, pp, k)
            for k in range(m):
                prog += _bwd(r, pp, k)
        else:
            warm = min(pp - r - 1, m)
            for k in range(warm):
                prog += _fwd(r, pp, k)
            for i in range(m - warm):
                prog += _fwd(r, pp, warm + i) + _bwd(r, pp, i)
            for k in range(m - warm, m):
                prog += _bwd(r, pp, k)
        programs.append(prog)
    return programs


# ------------------------------------------------------------------------------------------ check

def _where(r: int, i: int, ins) -> str:
    return f"stage {r}, instruction {i} ({ins})"


def _check_stage(r: int, prog, pp: int, m: int) -> None:
    """Each micro-batch forwarded and backwarded once, in a valid order, with the right messages."""
    done = {}
    for i, ins in enumerate(prog):
        if ins.op not in OPS or not 0 <= ins.mb < m:
            raise ScheduleError(f"{_where(r, i, ins)}: not an instruction of this pipeline")
        if (ins.op, ins.mb) in done:
            raise ScheduleError(f"{_where(r, i, ins)}: repeats instruction {done[ins.op, ins.mb]}")
        if (ins.op in ("recv_act", "send_grad") and r == 0) or (ins.op in ("send_act", "recv_grad") and r == pp - 1):
            raise ScheduleError(f"{_where(r, i, ins)}: stage {r} has no neighbour that way")
        need = {"fwd": "recv_act" if r > 0 else None, "send_act": "fwd", "bwd": "fwd",
                "send_grad": "bwd"}.get(ins.op)
        if ins.op == "bwd" and r < pp - 1:
            need = "recv_grad"
            if ("fwd", ins.mb) not in done:
                raise ScheduleError(f"{_where(r, i, ins)}: backward before its forward")
        if need and (need, ins.mb) not in done:
            raise ScheduleError(f"{_where(r, i, ins)}: comes before {need} {ins.mb}")
        done[ins.op, ins.mb] = i
    expect = {(op, k) for k in range(m) for op in OPS
              if not ((op in ("recv_act", "send_grad") and r == 0) or (op in ("send_act", "recv_grad") and r == pp - 1))}
    missing = sorted(expect - set(done), key=lambda t: (t[1], OPS.index(t[0])))
    if missing:
        op, k = missing[0]
        raise ScheduleError(f"stage {r}: {op} {k} is missing ({len(missing)} instruction(s) in all)")


def _channels(programs, pp: int) -> None:
    """Every channel's receive order equals its send order (MPI matches one tag's messages FIFO)."""
    for r in range(pp - 1):
        pairs = (("send_act", r, "recv_act", r + 1), ("send_grad", r + 1, "recv_grad", r))
        for send, s, recv, d in pairs:
            sent = [x.mb for x in programs[s] if x.op == send]
            got = [x.mb for x in programs[d] if x.op == recv]
            if sent != got:
                i = next(j for j in range(min(len(sent), len(got)) + 1)
                         if j >= min(len(sent), len(got)) or sent[j] != got[j])
                raise ScheduleError(f"stage {s} -> stage {d}: {send} order {sent} but {recv} order {got} (the "
                                    f"{i + 1}th message would be matched to the wrong micro-batch)")


def _execute(programs, pp: int):
    """Run every list with blocking receives and non-blocking sends; yields (stage, instr) as executed.
    Raises ScheduleError naming the waits when no stage can go on (a cycle of waits)."""
    pc = [0] * pp
    sent = set()  # (op, from, mb)
    order = []
    while any(pc[r] < len(programs[r]) for r in range(pp)):
        moved = False
        for r in range(pp):
            while pc[r] < len(programs[r]):
                ins = programs[r][pc[r]]
                if ins.op == "recv_act" and ("send_act", r - 1, ins.mb) not in sent:
                    break
                if ins.op == "recv_grad" and ("send_grad", r + 1, ins.mb) not in sent:
                    break
                if ins.op.startswith("send"):
                    sent.add((ins.op, r, ins.mb))
                order.append((r, ins))
                pc[r] += 1
                moved = True
        if not moved:
            raise ScheduleError("a cycle of waits, no stage can go on: " + _cycle(programs, pc))
    return order


def _cycle(programs, pc) -> str:
    """The cycle among the blocked stages (each waits for the neighbour it receives from), in order."""
    def peer(r):
        return r - 1 if programs[r][pc[r]].op == "recv_act" else r + 1

    r, seen = next(r for r in range(len(programs)) if pc[r] < len(programs[r])), []
    while r not in seen:
        seen.append(r)
        r = peer(r)
    loop = seen[seen.index(r):]
    return "; ".join(f"{_where(s, pc[s], programs[s][pc[s]])} waits for stage {peer(s)}" for s in loop)


def check(programs, pp: int, m: int, schedule: str | None = None) -> dict:
    """Prove ``programs`` safe before any message is sent (module docstring); raises ScheduleError.
    Returns {"max_stash": [per stage], "bound": [per stage] or None, "messages": count}."""
    if len(programs) != pp:
        raise ScheduleError(f"{len(programs)} instruction lists for {pp} stages")
    for r, prog in enumerate(programs):
        _check_stage(r, prog, pp, m)
    _channels(programs, pp)
    _execute(programs, pp)
    stash = []
    for r, prog in enumerate(programs):
        live = peak = 0
        for ins in prog:
            live += (ins.op == "fwd") - (ins.op == "bwd")
            peak = max(peak, live)
        stash.append(peak)
    bound = [stash_bound(schedule, pp, m, r) for r in range(pp)] if schedule else None
    if bound:
        for r in range(pp):
            if stash[r] > bound[r]:
                raise ScheduleError(f"stage {r}: {stash[r]} live micro-batches at once, more than {schedule}'s "
                                    f"bound {bound[r]}")
    messages = sum(1 for prog in programs for ins in prog if ins.op.startswith("send"))
    return {"max_stash": stash, "bound": bound, "messages": messages}


# --------------------------------------------------------------------------------------- timeline

def simulate(programs, pp: int, m: int, t_fwd: float = 1.0, t_bwd: float = 2.0, t_comm: float = 0.0) -> list[Span]:
    """The predicted timeline: every forward takes ``t_fwd``, every backward ``t_bwd``, a message ``t_comm``;
    a stage starts an instruction when it is free and (for a receive) the message has arrived."""
    clock = [0.0] * pp
    arrive = {}
    spans = []
    for r, ins in _execute(programs, pp):
        if ins.op == "recv_act":
            clock[r] = max(clock[r], arrive[("act", r - 1, ins.mb)])
        elif ins.op == "recv_grad":
            clock[r] = max(clock[r], arrive[("grad", r + 1, ins.mb)])
        elif ins.op in ("fwd", "bwd"):
            t = t_fwd if ins.op == "fwd" else t_bwd
            spans.append(Span(r, ins.op, ins.mb, clock[r], clock[r] + t))
            clock[r] += t
        else:
            arrive[("act" if ins.op == "send_act" else "grad", r, ins.mb)] = clock[r] + t_comm
    return spans


def idle_fraction(spans, pp: int) -> list[float]:
    """Per stage: 1 - (its forward and backward time) / (the step's makespan, first start to last end)."""
    if not spans:
        return [0.0] * pp
    t0, t1 = min(s.start for s in spans), max(s.end for s in spans)
    span = max(t1 - t0, 1e-300)
    busy = [0.0] * pp
    for s in spans:
        busy[s.stage] += s.end - s.start
    return [1.0 - b / span for b in busy]


def render_text(spans, pp: int, width: int = 0) -> str:
    """An ASCII timeline, one row per stage: ``F3`` a forward of micro-batch 3, ``B3`` a backward, ``..`` idle.
    ``width`` cells across (0: one cell per unit of the shortest span)."""
    if not spans:
        return ""
    t0, t1 = min(s.start for s in spans), max(s.end for s in spans)
    unit = min(s.end - s.start for s in spans) if width <= 0 else (t1 - t0) / width
    cells = max(1, round((t1 - t0) / unit))
    rows = [[".."] * cells for _ in range(pp)]
    for s in spans:
        a, b = round((s.start - t0) / unit), max(round((s.start - t0) / unit) + 1, round((s.end - t0) / unit))
        for c in range(a, min(b, cells)):
            rows[s.stage][c] = f"{'F' if s.op == 'fwd' else 'B'}{s.mb % 10}"
    return "\n".join(f"stage {r:<3} " + " ".join(row) for r, row in enumerate(rows))


def plot(spans, path, title: str, measured=None) -> None:
    """A PNG of the timeline (forwards blue, backwards orange, labelled by micro-batch); with ``measured``
    spans, the prediction above and the measurement below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [("predicted", spans)] + ([("measured", measured)] if measured else [])
    pp = 1 + max(s.stage for _, ss in sets for s in ss)
    fig, axes = plt.subplots(len(sets), 1, figsize=(11, 1.0 + 0.55 * pp * len(sets)), squeeze=False)
    for ax, (name, ss) in zip(axes[:, 0], sets):
        t0 = min(s.start for s in ss)
        for s in ss:
            ax.broken_barh([(s.start - t0, s.end - s.start)], (s.stage - 0.4, 0.8),
                           facecolors="tab:blue" if s.op == "fwd" else "tab:orange", edgecolor="white")
            ax.text(s.start - t0 + (s.end - s.start) / 2, s.stage, f"{'F' if s.op == 'fwd' else 'B'}{s.mb}",
                    ha="center", va="center", fontsize=7, color="white")
        idle = idle_fraction(ss, pp)
        ax.set_yticks(range(pp), [f"stage {r} (idle {idle[r]:.0%})" for r in range(pp)])
        ax.invert_yaxis()
        ax.set_title(f"{title}: {name}", fontsize=9)
        ax.set_xlabel("time units" if name == "predicted" else "seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
