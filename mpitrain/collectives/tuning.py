"""What ``auto`` runs above SMALL_BYTES: a stored decision table, or the fixed threshold.

A decision table is, for one rank count (and node count), the message sizes from which
auto's choice changes -- read it as "from this many bytes on, run this":

    "auto": {"ranks": 4, "nodes": 1, "steps": [[0, "native"], [20481, "tree"], [524288, "ring"]]}

            n <  20481 B      native
    20481 <= n <  524288 B    tree
            n >= 524288 B     ring

The performance layer writes it (mpitrain/perf: from a fitted cost model's predictions, the same
pick as the model's ``best`` at every size) into the cost model's JSON file when it saves one;
``bench --fit`` stores it, ``python -m mpitrain.perf FILE`` adds it to a file written before
tables existed. This module only reads it: the collectives know nothing of how it was made.

Where: one file per host and rank count (and node count when > 1):
``~/.cache/mpitrain/cost-<host>-n<p>.json`` or ``...-n<p>-h<nodes>.json`` (``$XDG_CACHE_HOME``
respected); ``MPITRAIN_COST_FILE=PATH`` names the file instead, ``MPITRAIN_COST_FILE=off`` disables
it. ``shared(comm)`` -- called once per communicator, when the library's state for it is made --
has rank 0 read the file and broadcast the table, so every rank holds the same table and
``choose()`` (a lookup in it) decides the same on every rank. Without a table (no file, =off, a
file for another rank or node count, an unusable file, a file without a table), ``auto`` keeps its
fixed threshold AUTO_RING_MIN_BYTES; a file that is there but not used is said once.
A table may pick ``shm`` only when it was fitted on one node, and it is used only for a
communicator on one node (its node count must match), where shm runs.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

from ..runtime import hostname, warn

ENV = "MPITRAIN_COST_FILE"
OFF = ("off", "none", "0", "false", "no")
CANDIDATES = ("native", "ring", "tree", "shm")  # what auto may run above SMALL_BYTES (shm: one node only)
KEY = "auto"  # the table's key in the cost model's JSON
REFIT = "mpirun -n P python -m mpitrain bench --fit"


def safe_name(text: str) -> str:
    """``text`` with everything but letters, digits and ``-_.`` replaced (a file name part)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text)) or "host"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpitrain"


def default_path(host: str, ranks: int, nodes: int = 1) -> Path:
    return cache_dir() / (f"cost-{safe_name(host)}-n{int(ranks)}" + (f"-h{int(nodes)}" if nodes > 1 else "")
                          + ".json")


def cost_path(host: str, ranks: int, nodes: int = 1) -> Path | None:
    """Where the model (and auto's table) for ``ranks`` ranks with rank 0 on ``host`` lives (None: disabled)."""
    v = os.environ.get(ENV, "").strip()
    if v:
        return None if v.lower() in OFF else Path(v).expanduser()
    return default_path(host, ranks, nodes)


class AutoTable:
    """Auto's choice per message size on ``ranks`` ranks (on ``nodes`` nodes): ``steps`` [[from_bytes,
    algorithm], ...], the first from 0 bytes, the sizes increasing."""

    def __init__(self, ranks: int, nodes: int, steps):
        self.ranks, self.nodes = int(ranks), int(nodes)
        self.steps = [[int(n), str(a)] for n, a in steps]
        self._from = [n for n, _ in self.steps]
        if not self.steps or self._from[0] != 0 or any(b <= a for a, b in zip(self._from, self._from[1:])):
            raise ValueError("a decision table's sizes must start at 0 and increase")
        bad = sorted({a for _, a in self.steps} - set(CANDIDATES))
        if bad:
            raise ValueError(f"unknown algorithm(s) {', '.join(map(repr, bad))} in the decision table "
                             f"(known: {', '.join(CANDIDATES)})")
        if self.ranks < 1 or self.nodes < 1:
            raise ValueError("a decision table needs ranks and nodes >= 1")

    def pick(self, nbytes: int) -> str:
        """The algorithm for a message of ``nbytes``."""
        return self.steps[bisect.bisect_right(self._from, int(nbytes)) - 1][1]

    def to_dict(self) -> dict:
        return {"ranks": self.ranks, "nodes": self.nodes, "steps": [list(s) for s in self.steps]}

    @classmethod
    def from_dict(cls, d) -> "AutoTable":
        """ValueError naming the problem when ``d`` is not a valid table."""
        try:
            return cls(d["ranks"], d["nodes"], d["steps"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed decision table ({type(e).__name__}: {e})") from None

    def __eq__(self, other):
        return isinstance(other, AutoTable) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"AutoTable({self.ranks} ranks on {self.nodes} node(s): {self.steps})"


# --------------------------------------------------------------------------- reading, once, on rank 0

_FILES = {}   # path -> AutoTable or None, read once per process (rank 0)
_WARNED = set()
_LAST = {}    # ranks -> the table most recently shared for a communicator of that size


def forget(path) -> None:
    """Read ``path`` again next time (it was just written)."""
    _FILES.pop(str(path), None)


def warn_once(key, msg) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warn(msg)


def _read(path: Path) -> AutoTable | None:
    """The table in the file at ``path``; None (and a warning, once) when the file has none or is unusable."""
    try:
        with open(path) as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if KEY not in d:
            warn_once(("no table", str(path)),
                      f"cost model {path} has no decision table for auto (written before mpitrain stored one): "
                      "auto uses its fixed threshold (AUTO_RING_MIN_BYTES); add one with: python -m mpitrain.perf "
                      f"{path}, or refit with: {REFIT}")
            return None
        return AutoTable.from_dict(d[KEY])
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        problem = f"not valid JSON ({e})"
    except (OSError, ValueError) as e:
        problem = str(e)
    warn_once(str(path), f"cost model {path}: {problem}; auto uses its fixed thresholds (refit with: {REFIT})")
    return None


def _read_for(host: str, ranks: int, nodes: int) -> AutoTable | None:
    """Rank 0: auto's table for (host, ranks, nodes), or None, with a warning when a file is not used."""
    path = cost_path(host, ranks, nodes)
    if path is None:
        return None
    key = str(path)
    if key not in _FILES:
        _FILES[key] = _read(path)
    t = _FILES[key]
    if t is not None and (t.ranks != ranks or t.nodes != nodes):
        warn_once((key, ranks, nodes), f"cost model {path} was fitted for {t.ranks} rank(s) on {t.nodes} "
                                       f"node(s), this communicator has {ranks} on {nodes}: not used")
        return None
    return t


def node_ids(comm) -> list[int]:
    """Collective. For every rank of ``comm``, the index (0, 1, ... in rank order) of its node:
    the ranks that share memory (MPI Split_type SHARED -- emulated hosts count as nodes)."""
    from mpi4py import MPI

    shm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        leader = shm.allreduce(comm.Get_rank(), op=MPI.MIN)
    finally:
        shm.Free()
    leaders = comm.allgather(leader)
    index = {}
    return [index.setdefault(x, len(index)) for x in leaders]


def shared(comm) -> AutoTable | None:
    """Collective, once per communicator: rank 0 reads auto's table for this host and size, all get it."""
    p = comm.Get_size()
    if p == 1:
        return None  # one rank: auto always runs native, nothing to decide
    hosts = comm.gather(hostname(), root=0)
    nnodes = len(set(node_ids(comm)))  # emulated hosts (network namespaces) share a host name
    d = None
    if comm.Get_rank() == 0:
        try:  # never leave the other ranks waiting in the bcast
            t = _read_for(hosts[0], p, max(len(set(hosts)), nnodes))
        except Exception as e:  # noqa: BLE001 - e.g. no home directory: no table, say why
            warn_once(("read", type(e).__name__), f"cost model not read ({type(e).__name__}: {e}); "
                                                  "auto uses its fixed thresholds")
            t = None
        d = None if t is None else t.to_dict()
    d = comm.bcast(d, root=0)
    t = None if d is None else AutoTable.from_dict(d)
    _remember(p, t)
    return t


def _remember(ranks: int, table: AutoTable | None) -> None:
    if table is not None:
        _LAST[ranks] = table
    else:
        _LAST.pop(ranks, None)


def last_for(ranks: int) -> AutoTable | None:
    """The table most recently shared for a communicator of ``ranks`` ranks (None: none stored)."""
    return _LAST.get(ranks)


def install(st, table: AutoTable | None) -> None:
    """Make ``table`` the one ``auto`` uses on the library state ``st`` (collective: same on every rank)."""
    st.auto = table
    _remember(st.size, table)
