"""Hierarchical (topology-aware) all-reduce: reduce within each host, ring across hosts, broadcast.

    2 hosts, 5 ranks; the leader (L) of a host is its lowest rank

         host A                                 host B
    r0(L)   r1   r2                        r3(L)   r4
     ^      |    |    (1) reduce to the     ^      |
     +------+    |        leader, shared    +------+
     ^           |        memory (binomial
     +-----------+        tree)
     r0 <=============================> r3        (2) ring all-reduce across the
                  network                            leaders (ring.py)
     |      ^    ^    (3) broadcast from    |      ^
     +------+----+        the leader        +------+
                          (the same tree, reversed)

Steps, on the library's private communicator, split once per communicator:
  0. hosts: ``Split_type(COMM_TYPE_SHARED)`` (or MPITRAIN_HOSTS, below) gives each
     host's communicator (ordered by rank: local rank 0 = the leader); a second
     Split gives the leaders' communicator. Both are cached on the library's
     per-communicator state (``_State.hier``); hosts may have unequal rank counts.
  1. reduce to the leader over shared memory (MPICH moves intra-node messages
     through it): binomial tree on the host's communicator -- local rank q, for
     mask = 1, 2, 4, ...: if q & mask, send to q - mask and stop; otherwise
     receive from q + mask (if it exists) and reduce into buf. Pipelined in
     segments (ring.py's segment size): receives are posted DEPTH segments
     ahead into scratch slots, and each segment goes on to the parent as soon
     as all its children's parts are in. The children are always added in the
     same order, so the host's partial result does not depend on timing.
  2. ring all-reduce of the host partials across the leaders: ring.steps on the
     leaders' communicator (each chunk reduced once along a fixed chain, then
     copied). op avg runs as sum; the leader divides once, by the total number
     of ranks, at the end (finish_avg).
  3. broadcast within each host from the leader, segment by segment, down the
     same tree (a rank forwards each segment to its children as it arrives).
The blocking call does steps 1 and 3 in shared memory instead, where a host's ranks share it
(shm.py: copy into a node window, sync, each rank reduces its slice of every rank's copy into a
region of the leader's, sync; the leader runs the ring on that region in place; sync, every rank
copies it out; one host: shm's all-reduce, 2 syncs, no messages); MPITRAIN_HIER_SHM=0 keeps
the tree. iallreduce and plans keep the tree (their steps must be yieldable; a node barrier
is not, with several in flight).
The result is computed once (by the leaders' ring) and copied: bitwise
identical on every rank. One host: just steps 1 and 3 (a pipelined tree).

Cost, n bytes, p ranks on H hosts, at most m ranks on a host, l = ceil(log2 m);
intra-host (shared memory) alpha_s, beta_s; inter-host (network) alpha_n, beta_n:

    2·l·alpha_s + 2·l·n·beta_s + l·n·gamma                         (steps 1 and 3)
  + 2(H-1)·alpha_n + 2(H-1)/H·n·beta_n + (H-1)/H·n·gamma            (step 2)

(the leader receives and sends the whole buffer l times in steps 1 and 3;
segments overlap the levels of the tree, hiding all but about one segment's
worth per level). Over shared memory (the blocking call) steps 1 and 3 cost instead
3·alpha_m + about 5·n·beta_m + (m-1)/m·n·gamma per rank, in shm.py's terms: three node
syncs; copy in (2n), read its slice of every rank's copy (n) and write it (n/m), copy out (2n).
Against the flat ring over all p ranks --
2(p-1)·alpha_n + 2(p-1)/p·n·beta_n + (p-1)/p·n·gamma, every step paced by a
network hop -- it pays 2(H-1) instead of 2(p-1) network latencies and sends
one stream per host over the network instead of one per rank-pair crossing:
use it for short-to-medium messages on many ranks per host, or where the
network is much slower than shared memory.

MPITRAIN_HOSTS (testing and emulation): "block:K" groups the ranks of the
communicator into K contiguous blocks (sizes differ by at most one, as
partition.py's chunks), "cyclic:K" puts rank r on host r % K -- as if they ran
on K hosts -- instead of asking MPI which ranks share memory. Computed from
rank and size alone, so every rank agrees; every rank must see the same value
(checked when the hosts are made: a bad or differing value raises HostsError,
a ValueError naming the variable, on every rank). Unset or empty: the real
hosts. It is read once per communicator, by its first hier all-reduce;
``reset(st)`` (collective) makes the next one read it again.
"""

from __future__ import annotations

import os

from mpi4py import MPI

from . import TAG_HIER, finish_avg, reducer, wide
from . import ring as _ring
from .partition import segments
from .. import backend
from ..runtime import UserError
from ..units import env_knob

ENV = "MPITRAIN_HOSTS"
SHM_ENV = "MPITRAIN_HIER_SHM"  # "0": the blocking hier keeps the message tree within hosts
DEPTH = _ring.DEPTH  # receives posted ahead in the host reduce
KINDS = ("block", "cyclic")


class HostsError(UserError, ValueError):
    """A bad MPITRAIN_HOSTS: a user error (the CLI prints it without a traceback), and a ValueError."""


def parse_hosts(spec: str | None) -> tuple[str, int] | None:
    """``(kind, K)`` from a MPITRAIN_HOSTS value ("block:K" or "cyclic:K"); None when unset or empty."""
    text = (spec or "").strip()
    if not text:
        return None
    kind, sep, count = text.partition(":")
    kind = kind.strip().lower()
    try:
        k = int(count.strip())
    except ValueError:
        k = 0
    if not sep or kind not in KINDS or k < 1:
        raise HostsError(f"{ENV}={spec!r} is not understood: use 'block:K' (ranks in K contiguous groups, "
                         f"as if on K hosts) or 'cyclic:K' (rank r on host r % K), K a positive integer; "
                         f"unset it to use the real hosts")
    return kind, k


def host_of(rank: int, size: int, kind: str, k: int) -> int:
    """The emulated host of ``rank`` among ``size`` ranks on ``k`` hosts (from rank and size only)."""
    if kind == "cyclic":
        return rank % k
    q, extra = divmod(size, k)  # block: partition.py's chunks -- the first `extra` get q + 1 ranks
    if rank < extra * (q + 1):
        return rank // (q + 1)
    return extra + (rank - extra * (q + 1)) // q


def _tree(q: int, m: int) -> tuple[list[int], int | None]:
    """Children (in the order they are added) and parent of local rank ``q`` in the binomial tree of ``m``."""
    children, mask = [], 1
    while mask < m and not q & mask:
        if q + mask < m:
            children.append(q + mask)
        mask <<= 1
    return children, (q - (q & -q) if q else None)


class _Leaders:
    """What ring.steps needs of a state, for the leaders' communicator."""

    def __init__(self, st, comm):
        self._st, self.comm, self.rank, self.size = st, comm, comm.Get_rank(), comm.Get_size()

    def scratch(self, xp, dtype, n):
        return self._st.scratch(xp, dtype, n)


class Topology:
    """The hosts of one (private) communicator: this rank's host communicator, the leaders' one.

    ``local`` / ``lrank`` / ``lsize``: this rank's host; ``leader``: lrank == 0;
    ``leaders``: the leaders' ring state (None on other ranks); ``hosts``: H;
    ``sizes``: the ranks per host, in the leaders' order; ``spec``: the MPITRAIN_HOSTS
    value it was made for. Made collectively, once per communicator and value.
    """

    def __init__(self, st, spec: str):
        comm = st.comm
        rank, size = comm.Get_rank(), comm.Get_size()
        self.spec = spec
        try:
            parsed, problem = parse_hosts(spec), None
        except HostsError as e:
            parsed, problem = None, e
        specs = comm.allgather(spec)  # once: every rank raises alike, none is left in a Split
        if problem is None and len(set(specs)) > 1:
            seen = "; ".join(f"rank {r}: {s!r}" for r, s in enumerate(specs))
            problem = HostsError(f"{ENV} differs between ranks ({seen}); every rank must see the same value")
        if problem is not None:
            raise problem
        if parsed is None:
            self.local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        else:
            self.local = comm.Split(host_of(rank, size, *parsed), key=rank)
        self.lrank, self.lsize = self.local.Get_rank(), self.local.Get_size()
        self.leader = self.lrank == 0
        lead = comm.Split(0 if self.leader else MPI.UNDEFINED, key=rank)
        self.leaders = _Leaders(st, lead) if self.leader else None
        self.sizes = [s for s in comm.allgather(self.lsize if self.leader else 0) if s]
        self.hosts = len(self.sizes)
        self.children, self.parent = _tree(self.lrank, self.lsize)
        self._node = False  # not yet asked (node())

    def node(self):
        """The host's shared-memory node (shm.py) when every rank of the host shares memory and there are
        at least two, else None; made on first use (collective on the host: the same answer there)."""
        if self._node is False:
            self._node = None
            if self.lsize > 1 and env_knob(SHM_ENV, 1) != 0:
                from . import shm

                nd = shm.Node(self.local)
                self._node = nd if nd.size == self.lsize else None
                if self._node is None:
                    nd.free()
        return self._node

    def free(self) -> None:
        """Free the communicators and windows (collective, as their creation was)."""
        if self._node:
            self._node.free()
        if self.leaders is not None:
            self.leaders.comm.Free()
        self.local.Free()


def topology(st) -> Topology:
    """The hosts of ``st``'s communicator: made (collectively) on first use, then cached on the state."""
    base = getattr(st, "_st", st)  # staging.StateView puts another comm object in front of the state
    topo = getattr(base, "hier", None)
    if topo is None:
        topo = base.hier = Topology(base, os.environ.get(ENV, ""))
    return topo


def reset(st) -> None:
    """Forget (and free) the cached hosts of ``st``'s communicator, so that the next hier call reads
    MPITRAIN_HOSTS again. Collective: call it on every rank of the communicator."""
    base = getattr(st, "_st", st)
    topo = getattr(base, "hier", None)
    if topo is not None:
        base.hier = None
        topo.free()


def _seg(nbytes: int, topo: Topology, itemsize: int) -> int:
    """Elements per segment of the host reduce and broadcast (ring.py's rule, per host size)."""
    return max(1, _ring.segment_bytes(nbytes, topo.lsize) // itemsize)


def slot_elems(topo: Topology, n: int, itemsize: int) -> int:
    """Elements of scratch ``steps`` needs on this rank (the host reduce's and the ring's, used in turn)."""
    if n == 0:
        return 0
    intra = DEPTH * min(_seg(n * itemsize, topo, itemsize), n) if topo.children else 0
    inter = _ring.slot_elems(n, topo.hosts, itemsize) if topo.leader and topo.hosts > 1 else 0
    return max(intra, inter)


def allreduce(st, buf, op: str):
    """Blocking hierarchical all-reduce of ``buf`` on the library state ``st`` (float16 sums in float32: wide.py)."""
    if wide.needed(buf, op):
        return wide.blocking(st, buf, op, allreduce)
    flat = buf.reshape(-1)
    if st.size > 1 and flat.size and not backend.is_device(flat):
        topo = topology(st)
        nd = topo.node()
        if nd is not None:
            return _over_shm(st, topo, nd, flat, op) and buf
    for req in steps(st, buf, op):
        req.Wait()
    return buf


def _over_shm(st, topo, nd, flat, op: str) -> bool:
    """The blocking hierarchy with steps 1 and 3 in shared memory (shm.py): one host is shm itself."""
    from . import shm

    if topo.hosts == 1:
        shm.allreduce_on(nd, flat, op, p=st.size)
        return True
    part = shm.host_reduce(nd, flat, "sum" if op == "avg" else op)  # the host's partial, in the window
    if topo.leader:  # the ring runs on it in place
        for req in _ring.steps(topo.leaders, part, "sum" if op == "avg" else op, tag=TAG_HIER):
            req.Wait()
        if op == "avg":
            finish_avg(part, st.size)
    shm.host_bcast(nd, flat, part)
    return True


def steps(st, buf, op: str, *, tag: int = TAG_HIER, slots=None):
    """The hierarchy as a generator that yields each request it must see completed (see ring.steps).

    ``slots``: scratch of ``slot_elems`` elements (default: the state's shared scratch).
    ``tag`` is used on the host and the leaders' communicators (both private).
    """
    flat = buf.reshape(-1)
    n, p = flat.size, st.size
    if p == 1 or n == 0:
        return
    topo = topology(st)
    xp = backend.array_module(flat)
    f = reducer(xp, op)
    dev = backend.is_device(flat)  # CUDA-aware MPI: finish each kernel before MPI reads the buffer
    if slots is None:
        slots = st.scratch(xp, flat.dtype, slot_elems(topo, n, flat.itemsize))
    if dev:  # the caller's kernels that wrote buf
        backend.synchronize(flat)
    local, children, parent = topo.local, topo.children, topo.parent
    seg = _seg(flat.nbytes, topo, flat.itemsize)
    parts = segments(0, n, seg)
    width = min(seg, n)

    # (1) reduce to the leader: units (segment, child) in a fixed order, receives DEPTH ahead
    units = [(a, b, c) for a, b in parts for c in children]
    recvs = [None] * len(units)

    def post(j):
        if j < len(units):
            a, b, c = units[j]
            k = j % DEPTH
            dst = slots[k * width:k * width + (b - a)]
            recvs[j] = (local.Irecv(dst, source=c, tag=tag), dst)

    for j in range(min(DEPTH, len(units))):
        post(j)
    sends = []
    j = 0
    for a, b in parts:
        view = flat[a:b]
        for _ in children:
            req, dst = recvs[j]
            yield req
            recvs[j] = None
            f(view, dst, out=view)
            if dev:  # the kernel is done before MPI reads the segment or refills the slot
                backend.synchronize(view)
            post(j + DEPTH)  # slot j % DEPTH is free again
            j += 1
        if parent is not None:
            sends.append(local.Isend(view, dest=parent, tag=tag))
    yield from sends  # the broadcast below receives into these regions

    # (2) ring across the leaders; avg: sum there, divide once here
    if topo.leader:
        if topo.hosts > 1:
            yield from _ring.steps(topo.leaders, flat, "sum" if op == "avg" else op, tag=tag, slots=slots)
        if op == "avg":
            finish_avg(flat, p)
        if dev:
            backend.synchronize(flat)

    # (3) broadcast down the same tree: receive every segment in place, forward each as it lands
    down = children[::-1]  # the deepest subtree first
    if parent is None:
        sends = [local.Isend(flat[a:b], dest=c, tag=tag) for a, b in parts for c in down]
    else:
        incoming = [local.Irecv(flat[a:b], source=parent, tag=tag) for a, b in parts]
        sends = []
        for (a, b), req in zip(parts, incoming):
            yield req
            sends += [local.Isend(flat[a:b], dest=c, tag=tag) for c in down]
    yield from sends
