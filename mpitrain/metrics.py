"""Timers (compute vs communication), a rank-0 progress bar, and Chrome-trace export.

    timers = Timers()                         trace = Trace(comm)          # collective
    with timers("data"):    x, y = next(it)   with trace("allreduce", "comm"):
    with timers("compute"): g = grad(x, y)        allreduce(g)
    with timers("comm"):    allreduce(g)      trace.write("trace.json")  # collective; rank 0 writes
    step = timers.lap()   # {"data": s, "compute": s, "comm": s} since the last lap

    bar = ProgressBar(total=steps_per_epoch, epochs=20)   # silent on ranks != 0
    bar.update(step, epoch=e, loss=l, accuracy=a, samples=global_batch, comm_fraction=f)
    bar.close()

Everything here is cheap enough to leave on: a timed section is two
``perf_counter`` calls and a dict update; a trace event is one tuple appended
to a list.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import defaultdict

from .units import json_text

__all__ = ["Timers", "ProgressBar", "StatusLine", "Trace", "format_rate"]


# --------------------------------------------------------------------------- timers


class _Section:
    """Context manager for one named timer; reused for every ``with timers(name)``."""

    __slots__ = ("_timers", "_name", "_t0", "_depth", "_trace_cat")

    def __init__(self, timers: "Timers", name: str):
        self._timers = timers
        self._name = name
        self._t0 = 0.0
        self._depth = 0  # nested use of the same name counts once (the outermost)
        self._trace_cat = name

    def __enter__(self):
        self._depth += 1
        if self._depth == 1:
            t = self._timers
            if t._sync is not None:
                t._sync()
            self._t0 = t._clock()
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            t = self._timers
            if t._sync is not None:
                t._sync()
            t1 = t._clock()
            dt = t1 - self._t0
            t._total[self._name] += dt
            t._lap[self._name] += dt
            t._count[self._name] += 1
            if t.trace is not None:
                t.trace.add(self._name, self._trace_cat, self._t0, dt)
        return False


class Timers:
    """Named accumulating wall-clock timers.

    ``with timers("comm"): ...`` adds the elapsed time to "comm"; ``totals()``
    gives the sums since creation (or ``reset()``), ``lap()`` the sums since
    the previous lap (one training step: data / compute / comm) and starts a
    new one. ``sync`` (e.g. a CUDA stream synchronize) is called at both ends
    of every section so asynchronous device work is charged to the right
    timer. With ``trace`` set, every section is also recorded as a trace
    event (category = the timer's name). ``clock`` returns seconds (a trace
    needs the default, ``time.perf_counter``; tests pass a fake one).
    """

    def __init__(self, sync=None, trace: "Trace | None" = None, clock=time.perf_counter):
        self._sync = sync
        self._clock = clock
        self.trace = trace
        self._sections: dict[str, _Section] = {}
        self._total: defaultdict[str, float] = defaultdict(float)
        self._lap: defaultdict[str, float] = defaultdict(float)
        self._count: defaultdict[str, int] = defaultdict(int)

    def __call__(self, name: str) -> _Section:
        s = self._sections.get(name)
        if s is None:
            s = self._sections[name] = _Section(self, name)
        return s

    def add(self, name: str, seconds: float) -> None:
        """Charge ``seconds`` measured elsewhere to ``name``."""
        self._total[name] += seconds
        self._lap[name] += seconds
        self._count[name] += 1

    def total(self, name: str) -> float:
        return self._total.get(name, 0.0)

    def count(self, name: str) -> int:
        return self._count.get(name, 0)

    def totals(self) -> dict[str, float]:
        return dict(self._total)

    def fraction(self, name: str, of=None) -> float:
        """Share of ``name`` in the sum of the timers ``of`` (default: all timers); 0 when empty."""
        names = self._total.keys() if of is None else of
        whole = sum(self._total.get(k, 0.0) for k in names)
        return self._total.get(name, 0.0) / whole if whole > 0 else 0.0

    def lap(self) -> dict[str, float]:
        """Per-step breakdown: the time per timer since the previous ``lap()``; starts a new lap."""
        out = dict(self._lap)
        self._lap.clear()
        return out

    def reset(self) -> None:
        self._total.clear()
        self._lap.clear()
        self._count.clear()

    def summary(self) -> str:
        """``data 1.20 s (10%)  compute 8.0 s (70%)  comm 2.3 s (20%)``."""
        whole = sum(self._total.values())
        return "  ".join(f"{k} {v:.3g} s ({100 * v / whole:.0f}%)" if whole > 0 else f"{k} {v:.3g} s"
                         for k, v in self._total.items())


# --------------------------------------------------------------------------- progress


def format_rate(x: float) -> str:
    """3.2k, 12.5M, 870 -- for samples/s."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _rank0(rank, comm) -> bool:
    if rank is not None:
        return rank == 0
    if comm is None:
        from .runtime import get_comm

        comm = get_comm()
    return comm.Get_rank() == 0


class StatusLine:
    """One status line on ``stream``: redrawn in place (``\\r``) on a TTY, throttled to
    ``tty_interval`` seconds; on a file or pipe (a SLURM log) a plain line at most every
    ``interval`` seconds. ``force=True`` draws regardless of the throttle; ``delay_first``
    waits one interval before the first line (short work then prints nothing)."""

    def __init__(self, stream=None, *, interval: float = 30.0, tty_interval: float = 0.1,
                 enabled: bool = True, tty: bool | None = None, clock=time.monotonic,
                 delay_first: bool = False):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            try:
                tty = bool(isatty and isatty())
            except ValueError:  # closed stream
                tty = False
        self.tty = tty
        self.interval = tty_interval if tty else interval
        self.clock = clock
        self._last = clock() if delay_first else None  # time of the last draw
        self._drawn = False  # a \r line is on screen
        self._width = 0

    def due(self) -> bool:
        """Would ``update`` draw now? (lets callers skip building the text)"""
        return self.enabled and (self._last is None or self.clock() - self._last >= self.interval)

    def update(self, text: str, force: bool = False) -> bool:
        if not self.enabled:
            return False
        now = self.clock()
        if not force and self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        return True

    def clear(self) -> None:
        """Erase a TTY status line (before other output goes to the same terminal)."""
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._drawn = False
            self._width = 0

    def close(self, keep: bool = False) -> None:
        """End the line: keep it on screen (newline) or erase it."""
        if self.enabled and self.tty and self._drawn:
            if keep:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = False
                self._width = 0
            else:
                self.clear()


class ProgressBar:
    """Training progress on rank 0: epoch, step/total, loss, accuracy, samples/s, comm share.

    On a TTY it redraws in place; otherwise (log files) it prints a plain line at
    most every ``interval`` seconds. Ranks other than 0 print nothing. ``samples``
    passed to ``update`` are added up (pass the global batch, i.e. the samples all
    ranks processed in that step); samples/s is measured since the previous draw.
    """

    def __init__(self, total: int, *, epochs: int | None = None, comm=None, rank: int | None = None,
                 stream=None, interval: float = 30.0, tty: bool | None = None, width: int = 20,
                 clock=time.monotonic, enabled: bool = True):
        self.total = int(total)
        self.epochs = epochs
        self.width = width
        self.clock = clock
        on = enabled and _rank0(rank, comm)
        self.line = StatusLine(stream, interval=interval, enabled=on, tty=tty, clock=clock)
        self.enabled = on
        self._samples = 0
        self._mark = (clock(), 0)  # (time, samples) at the previous draw
        self._rate = 0.0

    def text(self, step, epoch=None, loss=None, accuracy=None, comm_fraction=None) -> str:
        parts = []
        if epoch is not None:
            parts.append(f"epoch {epoch}/{self.epochs}" if self.epochs else f"epoch {epoch}")
        n = len(str(self.total))
        parts.append(f"step {step:>{n}}/{self.total}")
        if self.line.tty and self.total > 0:
            done = int(self.width * min(step, self.total) / self.total)
            parts.append("[" + "#" * done + "." * (self.width - done) + "]")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if accuracy is not None:
            parts.append(f"acc {100 * accuracy:.1f}%")
        if self._rate > 0:
            parts.append(f"{format_rate(self._rate)} samples/s")
        if comm_fraction is not None:
            parts.append(f"comm {100 * comm_fraction:.0f}%")
        return "  ".join(parts)

    def update(self, step: int, *, epoch=None, loss=None, accuracy=None, samples: int = 0,
               comm_fraction=None, force: bool = False) -> bool:
        """Record progress; draw when the throttle allows (or ``force``). Returns True if drawn."""
        if not self.enabled:
            return False
        self._samples += samples
        if not (force or self.line.due()):
            return False
        now = self.clock()
        t0, s0 = self._mark
        if now > t0 and self._samples > s0:
            self._rate = (self._samples - s0) / (now - t0)
        self._mark = (now, self._samples)
        return self.line.update(self.text(step, epoch, loss, accuracy, comm_fraction), force=True)

    def clear(self) -> None:
        self.line.clear()

    def close(self, keep: bool = False) -> None:
        self.line.close(keep=keep)


# --------------------------------------------------------------------------- trace


class _Span:
    __slots__ = ("_trace", "_name", "_cat", "_args", "_t0", "_tid")

    def __init__(self, trace, name, cat, args, tid=None):
        self._trace, self._name, self._cat, self._args, self._tid = trace, name, cat, args, tid

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._trace.add(self._name, self._cat, self._t0, time.perf_counter() - self._t0, tid=self._tid,
                        args=self._args)
        return False


class _Pending:
    """A started non-blocking operation whose span (start -> seen complete) goes on a track."""

    __slots__ = ("_h", "_trace", "_tid", "_name", "_args", "_t0", "_open")

    def __init__(self, handle, trace, tid, name, args):
        self._h, self._trace, self._tid, self._name, self._args = handle, trace, tid, name, args
        self._t0, self._open = time.perf_counter(), True

    def _close(self):
        if self._open:
            self._open = False
            self._trace.add(self._name, "comm", self._t0, time.perf_counter() - self._t0, tid=self._tid,
                            args=self._args)

    def progress(self) -> bool:
        done = self._h.progress()
        if done:
            self._close()
        return done

    test = progress

    def wait(self):
        out = self._h.wait()
        self._close()
        return out


class Trace:
    """Chrome-trace events ("ph": "X", microseconds), one process per rank, on named tracks.

    Construction is collective: the ranks meet in a barrier and each takes the
    moment it leaves as its time zero, so events line up across ranks to within
    the barrier's exit skew (microseconds on one host; more across hosts, and
    ``perf_counter`` clocks of different hosts may drift over long runs). The
    wall-clock start (rank 0's ``time.time()``) is stored in the file.

    ``with trace(name, cat): ...`` or ``trace.add(name, cat, start, dur)`` with
    ``start`` from ``time.perf_counter()``; ``trace.counter(name, value)`` for a
    counter track (loss, lr). At most ``max_events`` are kept per rank (the rest
    are counted as dropped). ``enabled=False`` makes every call a no-op.

    Tracks (a Chrome trace's threads, "tid"): each thread that records gets one (named after it),
    and any code can put spans on a named track of its own:

        with trace.span("eval", "eval @ step 40", step=40): ...        # a span on track "eval"
        trace.add_span("steps", "step 41", t0, dur, step=41)           # start from perf_counter()
        trace.instant("marks", track="pipeline", stage=1)              # a point in time
        h = trace.pending(plan.start(), "allreduce bucket 3", "allreduce", bytes=n)
            # h.progress() / h.test() / h.wait() as the handle's; the span ends when it is seen complete

    Tracks appear in the order they were first used (the thread that made the Trace first).
    """

    def __init__(self, comm=None, *, enabled: bool = True, max_events: int = 1_000_000):
        if comm is None:
            from .runtime import get_comm

            comm = get_comm()
        self.comm = comm
        self.enabled = enabled
        self.max_events = int(max_events)
        self.events: list[tuple] = []
        self.dropped = 0
        self._tids: dict = {}      # thread ident or track name -> tid
        self._names: list[str] = []  # tid -> track name
        self._tid()
        comm.Barrier()
        self.t0 = time.perf_counter()
        self.start_unix = comm.bcast(time.time() if comm.Get_rank() == 0 else None, root=0)

    def _tid(self) -> int:
        ident = threading.get_ident()
        t = self._tids.get(ident)
        if t is None:
            t = self._new_track(ident, threading.current_thread().name)
        return t

    def _new_track(self, key, name: str) -> int:
        t = self._tids[key] = len(self._names)
        self._names.append(name)
        return t

    def track(self, name: str) -> int:
        """The tid of the track called ``name`` (made on first use)."""
        t = self._tids.get(("track", name))
        return t if t is not None else self._new_track(("track", name), name)

    def span(self, track: str, name: str, **args):
        """``with trace.span(track, name, **args): ...`` -- a span on a named track."""
        return _Span(self, name, track, args or None, self.track(track))

    def add_span(self, track: str, name: str, start: float, dur: float, **args) -> None:
        """A span on a named track measured elsewhere (``start`` from ``time.perf_counter()``)."""
        self.add(name, track, start, dur, tid=self.track(track), args=args or None)

    def pending(self, handle, track: str, name: str, **args):
        """Wrap a started non-blocking ``handle`` (progress/wait) so its life becomes a span on ``track``."""
        if not self.enabled:
            return handle
        return _Pending(handle, self, self.track(track), name, args or None)

    def __call__(self, name: str, cat: str = "", args: dict | None = None):
        return _Span(self, name, cat, args)

    def add(self, name: str, cat: str, start: float, dur: float, tid: int | None = None,
            args: dict | None = None) -> None:
        """A complete event: ``start`` is a ``time.perf_counter()`` value, ``dur`` seconds."""
        if not self.enabled:
            return
        if len(self.events) >= self.max_events:
            self.dropped += 1
            return
        self.events.append(("X", name, cat, start, dur, self._tid() if tid is None else tid, args))

    def counter(self, name: str, value: float, t: float | None = None) -> None:
        """A counter sample (drawn as a track): loss, learning rate, bytes, ..."""
        if not self.enabled:
            return
        if len(self.events) >= self.max_events:
            self.dropped += 1
            return
        self.events.append(("C", name, "", time.perf_counter() if t is None else t, 0.0, 0,
                            {name: float(value)}))

    def instant(self, name: str, cat: str = "", *, track: str | None = None, **args) -> None:
        """A point in time (on the calling thread's track, or on ``track``)."""
        if not self.enabled:
            return
        if len(self.events) >= self.max_events:
            self.dropped += 1
            return
        tid = self._tid() if track is None else self.track(track)
        self.events.append(("i", name, cat or track or "", time.perf_counter(), 0.0, tid, args or None))

    def _json_events(self, rank: int, host: str) -> list[dict]:
        out = [
            {"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}@{host}"}},
            {"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}},
        ]
        for tid, track in enumerate(self._names):
            out += [{"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": track}},
                    {"ph": "M", "name": "thread_sort_index", "pid": rank, "tid": tid, "args": {"sort_index": tid}}]
        t0 = self.t0
        for ph, name, cat, start, dur, tid, args in self.events:
            ev = {"name": name, "cat": cat or "default", "ph": ph, "ts": round((start - t0) * 1e6, 3),
                  "pid": rank, "tid": tid}
            if ph == "X":
                ev["dur"] = round(dur * 1e6, 3)
            elif ph == "i":
                ev["s"] = "t"  # an instant on its thread's track
            if args:
                ev["args"] = args
            out.append(ev)
        return out

    def write(self, path, comm=None) -> None:
        """Collective: gather every rank's events to rank 0, which writes ``path`` (atomically)."""
        from .runtime import hostname

        comm = comm if comm is not None else self.comm
        rank = comm.Get_rank()
        mine = self._json_events(rank, hostname())
        parts = comm.gather((mine, self.dropped), root=0)
        if rank != 0:
            return
        events = [e for evs, _ in parts for e in evs]
        doc = {"traceEvents": events, "displayTimeUnit": "ms",
               "otherData": {"ranks": comm.Get_size(), "start_unix": self.start_unix,
                             "clock": "perf_counter, zero at a barrier at Trace() creation",
                             "dropped_events": sum(d for _, d in parts)}}
        path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(json_text(doc, separators=(",", ":")))
        os.replace(tmp, path)
