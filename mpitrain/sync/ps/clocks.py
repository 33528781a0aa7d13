"""A server's stale-synchronous bookkeeping (pure: no MPI).

A server counts each worker's pushes (its clock). A pull from worker w is answered when
``clock[w] - min(clock[u] of unfinished u) <= s`` (s = comm.max_staleness), else held until a
slower worker pushes or finishes; a finished worker no longer counts in the minimum.
"""

from __future__ import annotations

from collections import Counter


class Clocks:
    """A server's stale-synchronous bookkeeping (pure: no MPI). Workers are any hashable ids."""

    def __init__(self, workers, max_staleness: int):
        self.s = int(max_staleness)
        self.clock = dict.fromkeys(workers, 0)  # pushes received from each worker
        self.done: set = set()
        self.pending: dict = {}                 # worker -> its clock when it asked to pull
        self.pulls = self.held = self.max_gap = 0
        self.gaps: Counter = Counter()          # gap at each answered pull -> count

    @property
    def all_done(self) -> bool:
        return len(self.done) == len(self.clock)

    def slowest(self):
        live = [c for w, c in self.clock.items() if w not in self.done]
        return min(live) if live else None

    def push(self, w) -> None:
        self.clock[w] += 1

    def pull(self, w) -> None:
        self.pulls += 1
        self.pending[w] = self.clock[w]
        if not self.ready(w):
            self.held += 1

    def ready(self, w) -> bool:
        return self.clock[w] - self.slowest() <= self.s

    def finish(self, w) -> None:
        self.done.add(w)
        self.pending.pop(w, None)

    def release(self, force: bool = False) -> list:
        """Pulls that may be answered now, as (worker, gap); ``force`` answers all (stopping)."""
        out = []
        for w in list(self.pending):
            gap = self.clock[w] - self.slowest()
            if force or gap <= self.s:
                del self.pending[w]
                if not force:
                    self.gaps[gap] += 1
                    self.max_gap = max(self.max_gap, gap)
                out.append((w, gap))
        return out

    def stats(self) -> dict:
        return {"pulls": self.pulls, "held_pulls": self.held, "max_gap": self.max_gap,
                "gap_counts": dict(self.gaps)}


