"""Zero-copy shared-memory all-reduce (``algorithm="shm"``) and ``alloc_shared``: one node, no messages.

    p = 3 ranks on one node; B_q = rank q's buffer, in an MPI-3 shared window (alloc_shared)
    every rank maps every B_q; the buffer is cut into p slices (partition.py's chunks)

          slice 0     slice 1     slice 2
    B_0 | a0        | b0        | c0        |      rank 0 reads a0, a1, a2 (rank order), adds,
    B_1 | a1        | b1        | c1        |      and writes A = a0+a1+a2 into slice 0 of
    B_2 | a2        | b2        | c2        |      B_0, B_1 and B_2; rank 1: slice 1; rank 2: slice 2
          |   sync 1: every rank's input written   |   sync 2: every slice written everywhere
          v                                        v
    B_q | A         | B         | C         |      (on every rank q)

Steps (node communicator: ``Split_type(COMM_TYPE_SHARED)`` of the library's private Dup):
  1. sync 1 -- every rank's key (window, offset) gathered: it tells whether every rank's buffer
     sits at the same place of one alloc_shared window (zero-copy) or not (then every rank copies
     its buffer into its part of a scratch window first, and copies the result out after sync 2).
     The blocking call carries the key in the agreement check's Allgather (``checked``: no extra
     collective); otherwise (iallreduce, plans, hier, no node yet) a small Allreduce of it.
     ``Win.Sync`` (a memory fence) on either side of every sync, as MPI-3 shared memory needs.
  2. rank r reduces slice r in tiles of TILE_BYTES (the tile stays in cache): the tile of B_0
     op B_1, then op B_2, ... in rank order, avg divided once, float16 sum/avg/prod accumulated
     in float32 and rounded once; then the tile is written into slice r of every B_q.
  3. sync 2 (Barrier). Every slice is reduced once, by one rank, in one order, and copied: results
     are bitwise identical on every rank.
Only rank r reads or writes slice r during step 2, and nobody touches B_q after sync 2, so a rank
may return and write its next gradients into B_q at once: the next call's sync 1 orders them.

Cost, n bytes, p ranks, memory bandwidth beta_m (bytes read or written, per rank), sync latency
alpha_s (about one small node collective; the blocking call's sync 1 is the check it pays anyway):
    zero-copy:  2·alpha_s + (n + n)·beta_m + (p-1)/p·n·gamma       (read n: p slices of n/p;
                                                                     write n: p copies of n/p)
    scratch:    2·alpha_s + (3n + 3n)·beta_m + (p-1)/p·n·gamma     (+ copy in, copy out)
against the ring's 2(p-1)·alpha + 2(p-1)/p·n·beta: no messages, no protocol, one pass per byte.
The scratch path pays only where memory is much faster than MPI's shared-memory messages; on the
2-core box it measured 0.3-0.9x native at 256 KiB-64 MiB (docs/benchmarks.md), so the zero-copy
path is the point: allocate the buffers with alloc_shared (training does, for its gradients).

Windows and their lifetime. ``alloc_shared`` is collective on the node (Win.Allocate_shared): call
it in the same order on every rank. Freeing a window is collective too, so it is never freed by
the garbage collector directly (the ranks collect at different times: a hang): when an array and
all its views are gone the window is only *marked* dead on that rank; the next ``alloc_shared`` or
``free_shared`` on the communicator (collective anyway) frees the windows dead on every rank, in
one agreed order. ``free_shared(arr, comm)`` frees ``arr``'s window now (collective; do not touch
``arr`` or its views afterwards: every collective refuses them -- the check's problem FREED_SHARED,
carried to every rank -- and free_shared itself is refused on every rank while a plan or a handle in
flight still uses the window). What is left at exit is released by MPI_Finalize. A window larger than
the node's free shared memory is refused before MPI is asked (SharedMemoryError, one line, every rank).
A node of one rank (or ranks that share no node) gets plain NumPy memory; ``shm`` itself needs
every rank of the communicator on one node (ValueError on every rank otherwise: use ``hier``,
which runs this within each host and a ring across hosts). Host (NumPy) buffers: a device buffer
is staged through host memory (blocking call) or refused (iallreduce / allreduce_init).
Non-blocking: iallreduce and allreduce_init with ``shm`` run the whole reduction when started
(a barrier cannot be yielded safely while several operations are in flight), so they do not
overlap; they still give the same results.
"""

from __future__ import annotations

import os
import weakref

import numpy as np
from mpi4py import MPI

from . import META, _slot, enter, finish_avg, reducer
from .partition import chunk_bounds
from .. import backend
from ..runtime import UserError, get_comm
from ..units import env_knob
from ..units import format_size

TILE_BYTES = env_knob("MPITRAIN_SHM_TILE", 256 * 1024)  # accumulator tile (L2-sized), checked (units.KNOBS)
_OFF = 1 << 40  # key = window id * _OFF + byte offset


class NodeError(UserError, ValueError):
    """shm on ranks that span nodes: a user error (the CLI prints it without a traceback), and a ValueError."""


class SharedMemoryError(UserError, MemoryError):
    """alloc_shared asked for more than the node can give: one line (a user error), and a MemoryError."""


def free_shared_bytes() -> int:
    """Bytes of shared memory this node can still give: /dev/shm's free space and MemAvailable, the less."""
    free = []
    try:
        st = os.statvfs("/dev/shm")
        free.append(st.f_bavail * st.f_frsize)
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            free += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    return min(free) if free else 1 << 62


def _too_big(what: str, sizes, frees) -> SharedMemoryError:
    total, most = sum(sizes), max(sizes)
    return SharedMemoryError(f"{what}: cannot allocate {format_size(most)} ({most} bytes) per rank of node-shared "
                             f"memory ({format_size(total)} on this node's {len(sizes)} rank(s)); "
                             f"{format_size(min(frees))} is free (/dev/shm, MemAvailable): ask for less")


class Window:
    """One MPI-3 shared window on a node: every rank's segment mapped as uint8 arrays (``segs``)."""

    def __init__(self, node, nbytes: int, wid: int):
        nbytes = max(64, -(-nbytes // 64) * 64)
        sizes, frees = zip(*node.comm.allgather((nbytes, free_shared_bytes())))  # the same verdict everywhere
        if sum(sizes) > min(frees):
            raise _too_big("alloc_shared", sizes, frees)
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")  # each rank's segment on its own pages (its NUMA node)
        try:
            self.win = MPI.Win.Allocate_shared(nbytes, 1, info=info, comm=node.comm)
        except MPI.Exception:  # (MPI's error stack is many lines; every rank of the node gets it)
            raise _too_big("alloc_shared", sizes, frees) from None
        finally:
            info.Free()
        self.freed = False
        self.users = weakref.WeakSet()  # plans bound to it, handles in flight on it (hold / holding)
        self.win.Lock_all(MPI.MODE_NOCHECK)  # a passive epoch, so that Win.Sync (the fence) is legal
        self.id = wid
        self.segs = [np.frombuffer(self.win.Shared_query(q)[0], dtype=np.uint8) for q in range(node.size)]
        self.mine = self.segs[node.rank]
        self.base = self.mine.__array_interface__["data"][0]
        self.nbytes = min(s.size for s in self.segs)  # what fits in every rank's segment

    def free(self) -> None:
        """Collective on the node."""
        self.freed = True  # every array on it is refused from now on (guard.freed_memory)
        self.segs = self.mine = None
        self.win.Unlock_all()
        self.win.Free()


class _Segment:
    """The owner of an alloc_shared array's memory: views keep it alive; when it dies the window is
    marked dead (freed later, collectively)."""

    def __init__(self, w: Window, dtype, n: int):
        self.window = w
        self.__array_interface__ = {"data": (w.base, False), "shape": (n,), "typestr": np.dtype(dtype).str,
                                    "version": 3}

    @property
    def released(self) -> bool:
        """The window was freed (free_shared): the memory is gone (guard.freed_memory reads this)."""
        return self.window.freed


def window_of(arr):
    """The alloc_shared Window ``arr`` (or the array it views) lies in, or None (local: no MPI)."""
    b = getattr(arr, "base", None)
    while b is not None:
        if isinstance(b, _Segment):
            return b.window
        b = getattr(b, "base", None)
    return None


def hold(arr, user) -> None:
    """``user`` (a plan, a handle) uses ``arr``'s window while ``user.holding()``: free_shared refuses it."""
    w = window_of(arr)
    if w is not None:
        w.users.add(user)


class Node:
    """The ranks of one communicator that share memory: their communicator, windows and scratch."""

    def __init__(self, comm, split: bool = True):
        self.comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank()) if split else comm
        self.owned = split
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.windows = {}  # id -> Window (alloc_shared's)
        self.next_id = 0
        self.dead = []  # ids whose arrays were collected on this rank
        self.scratch = None  # Window for buffers outside alloc_shared (2 regions: in, out)
        self.key = np.zeros(2, dtype=np.int64)
        self.tiles = {}  # accumulator dtype -> one tile

    def window(self, nbytes: int) -> Window:
        self.sweep()
        w = Window(self, nbytes, self.next_id)
        self.windows[w.id] = w
        self.next_id += 1
        return w

    def sweep(self) -> None:
        """Free the windows whose arrays died on every rank (collective; the agreed ids in order)."""
        mine = sorted(set(self.dead))
        everywhere = set(mine)
        for ids in self.comm.allgather(mine):
            everywhere &= set(ids)
        for wid in sorted(everywhere):
            w = self.windows.pop(wid, None)  # (None: free_shared freed it already)
            if w is not None:
                w.free()
        for wid in everywhere:  # in place: the finalizers hold this list's append
            while wid in self.dead:
                self.dead.remove(wid)

    def free_window(self, wid: int, what: str = "free_shared") -> None:
        w = self.windows.get(wid)
        busy = w is not None and any(u.holding() for u in list(w.users))
        ids, busy = zip(*self.comm.allgather((wid, busy)))
        if len(set(ids)) > 1:
            raise ValueError(f"{what}: ranks passed arrays of different windows ({list(ids)}); call it with the "
                             "same alloc_shared array on every rank, in the same order")
        if any(busy):
            raise ValueError(f"{what}: a persistent plan (allreduce_init) or a non-blocking operation in flight still "
                             f"uses this array on rank(s) {[r for r, b in enumerate(busy) if b]}; free() the plan / "
                             "wait() the handle first")
        if wid >= 0:
            self.windows.pop(wid).free()

    def scratch_for(self, nbytes: int) -> Window:
        """The scratch window, at least ``nbytes`` per region (grown collectively: same n everywhere)."""
        if self.scratch is None or self.scratch.nbytes < 2 * nbytes:
            if self.scratch is not None:
                self.scratch.free()
            self.scratch = None
            self.scratch = Window(self, 2 * max(nbytes, 1 << 16), -1)
        return self.scratch

    def find(self, flat):
        """(window, byte offset) of ``flat`` in one of this node's alloc_shared windows, or None."""
        addr = flat.__array_interface__["data"][0]
        for w in self.windows.values():
            off = addr - w.base
            if 0 <= off and off + flat.nbytes <= w.nbytes:
                return w, off
        return None

    def sync(self, win) -> None:
        win.Sync()
        self.comm.Barrier()
        win.Sync()

    def free(self) -> None:
        """Collective: every window and, when made here, the communicator."""
        for w in list(self.windows.values()) + ([self.scratch] if self.scratch else []):
            w.free()
        self.windows, self.scratch = {}, None
        if self.owned:
            self.comm.Free()


def node(st) -> Node:
    """The node of ``st``'s communicator (made collectively on first use, cached on the state)."""
    base = getattr(st, "_st", st)  # staging.StateView
    nd = getattr(base, "shm", None)
    if nd is None:
        nd = base.shm = Node(base.comm)
    return nd


# --------------------------------------------------------------------------- alloc_shared


def alloc_shared(n: int, dtype=np.float32, comm=None):
    """A zeroed 1-D array of ``n`` x ``dtype`` in a window shared by the ranks of ``comm`` on this node.

    Collective (call it in the same order on every rank). ``allreduce(arr, comm, algorithm="shm")``
    then reduces it without copies. One rank on the node: plain memory. See shm.py for freeing.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"alloc_shared: n must be a non-negative integer, got {n!r}")
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise ValueError(f"alloc_shared: dtype {dt} holds Python objects, which cannot live in shared memory; "
                         "use a numeric dtype")
    st, call = enter(comm, "alloc_shared")  # one call at a time on this communicator in this process
    try:
        nd = node(st)
        if nd.size == 1:
            try:
                return np.zeros(int(n), dtype=dt)
            except MemoryError:
                raise _too_big("alloc_shared", [int(n) * dt.itemsize], [free_shared_bytes()]) from None
        w = nd.window(int(n) * dt.itemsize)
    finally:
        st.calls.leave(call)
    seg = _Segment(w, dt, int(n))
    weakref.finalize(seg, nd.dead.append, w.id)
    arr = np.asarray(seg)
    arr[...] = 0  # first touch by the owner: its pages on its NUMA node
    return arr


def free_shared(arr, comm=None) -> None:
    """Free ``arr``'s shared window now (collective on the node; a no-op for plain memory). Do not use
    ``arr`` or any view of it afterwards."""
    st, call = enter(comm, "free_shared")
    try:
        nd = node(st)
        if nd.size == 1:
            return
        hit = nd.find(arr.reshape(-1)) if isinstance(arr, np.ndarray) else None
        nd.free_window(hit[0].id if hit else -1)
        nd.sweep()
    finally:
        st.calls.leave(call)


def is_shared(arr, comm=None) -> bool:
    """True when ``arr`` lies in an alloc_shared window of ``comm``'s node (local: no MPI)."""
    if not isinstance(arr, np.ndarray):
        return False
    slot = _slot(comm if comm is not None else get_comm())
    nd = getattr(slot.state, "shm", None)
    return nd is not None and nd.size > 1 and nd.find(arr.reshape(-1)) is not None


# --------------------------------------------------------------------------- the reduction


def _views(w: Window, off: int, flat):
    return [s[off:off + flat.nbytes].view(flat.dtype) for s in w.segs]


def reduce_tiles(bufs, me: int, lo: int, hi: int, op: str, p: int | None, targets, tiles) -> None:
    """Reduce ``bufs[0..][lo:hi]`` in rank order, tile by tile, into ``targets[..][lo:hi]``.

    ``me``: the index of ``targets[0]`` in ``bufs`` (-1: none; it is reduced into directly unless it
    is an input read after the first op, then through a tile); ``p``: avg's divisor (None: no division); ``tiles``:
    a tile of the accumulator's dtype (float16 sum/avg/prod accumulates in float32 there: wide.py).
    """
    f = reducer(np, op)
    dt = bufs[0].dtype
    wide = tiles.dtype != dt
    direct = not wide and me <= 1
    tile = max(1, TILE_BYTES // tiles.itemsize)
    for a in range(lo, hi, tile):
        b = min(a + tile, hi)
        t = targets[0][a:b] if direct else tiles[:b - a]
        if len(bufs) == 1:
            t[...] = bufs[0][a:b]
        else:
            f(bufs[0][a:b], bufs[1][a:b], out=t, dtype=t.dtype)
            for q in range(2, len(bufs)):
                f(t, bufs[q][a:b], out=t, dtype=t.dtype)
        if p is not None and op == "avg":
            finish_avg(t, p)
        for k, dst in enumerate(targets):
            if k or not direct:
                with np.errstate(over="ignore"):
                    dst[a:b] = t


def tiles_for(nd, dt, op: str):
    """The accumulator tile for ``op`` on ``dt``: float32 for float16 sum/avg/prod (wide.py)."""
    acc = np.dtype(np.float32) if dt == np.float16 and op in ("sum", "avg", "prod") else np.dtype(dt)
    cache = nd.tiles
    t, want = cache.get(acc.str), max(1, TILE_BYTES // acc.itemsize)
    if t is None or t.size < want:
        t = cache[acc.str] = np.empty(want, dtype=acc)
    return t


def allreduce(st, buf, op: str):
    """Blocking shared-memory all-reduce of ``buf`` (every rank of ``st`` on one node)."""
    nd = node(st)
    if nd.size != st.size:
        raise NodeError(f"allreduce: algorithm='shm' needs every rank on one node (this node has {nd.size} of "
                         f"the {st.size} ranks); use algorithm='hier' (shared memory within each node, a ring "
                         "across nodes) or 'ring'")
    flat = buf.reshape(-1)
    if backend.is_device(flat):
        raise ValueError("allreduce: algorithm='shm' reduces host (NumPy) buffers; this is a device buffer")
    allreduce_on(nd, flat, op, p=st.size)
    return buf


def allreduce_on(nd: Node, flat, op: str, p: int | None = None) -> None:
    """The all-reduce over ``nd``'s ranks (``p``: avg's divisor, default the node size)."""
    if flat.size == 0 or nd.size == 1:
        return
    prep = prepare(nd, flat)
    nd.key[0], nd.key[1] = prep[1], -prep[1]
    nd.comm.Allreduce(MPI.IN_PLACE, nd.key, op=MPI.MAX)  # sync 1
    finish(nd, flat, op, p, prep, int(nd.key[0]), -int(nd.key[1]))


def prepare(nd: Node, flat):
    """Before sync 1, local: (hit, key, ready, copied). ``key`` >= 0: ``flat`` is at that place of an
    alloc_shared window; -1: not. A buffer outside the windows is copied into the scratch window now
    when it is big enough (nobody reads my region after the last call's sync 2)."""
    hit = nd.find(flat)
    key = -1 if hit is None else hit[0].id * _OFF + hit[1]
    ready = nd.scratch is not None and nd.scratch.nbytes >= 2 * flat.nbytes  # the same on every rank
    copied = hit is None and ready
    if copied:
        _views(nd.scratch, 0, flat)[nd.rank][...] = flat
    fence = hit[0] if hit else nd.scratch
    if fence is not None:
        fence.win.Sync()
    return hit, key, ready, copied


def finish(nd: Node, flat, op: str, p, prep, hi_key: int, lo_key: int) -> None:
    """After sync 1 (every rank's key known: the largest and smallest): the reduction and sync 2."""
    hit, _key, ready, copied = prep
    scratch = None
    if hi_key == lo_key and hi_key >= 0:  # every rank's buffer at one place of one window
        w, off = hit
        w.win.Sync()
        bufs = _views(w, off, flat)
    else:
        scratch = nd.scratch_for(flat.nbytes)  # (collective when it grows: on every rank alike)
        bufs = _views(scratch, 0, flat)
        if not copied:
            bufs[nd.rank][...] = flat
        if not ready or hi_key >= 0:  # someone copied in after sync 1
            nd.sync(scratch.win)
        else:
            scratch.win.Sync()
        w = scratch
    lo, hi = chunk_bounds(flat.size, nd.size, nd.rank)
    me = nd.rank
    reduce_tiles(bufs, me, lo, hi, op, p or nd.size, [bufs[me]] + bufs[:me] + bufs[me + 1:],
                 tiles_for(nd, flat.dtype, op))
    nd.sync(w.win)  # sync 2
    if scratch is not None:
        flat[...] = bufs[nd.rank]


NOT_PREPARED = -2  # the key of a rank that took the plain path (its check carried no key)


def checked(st, call, buf, op: str, check, problem) -> bool:
    """The blocking allreduce's shm with sync 1 folded into the agreement check: the check's Allgather
    carries each rank's key (``check(..., shm_key=)``). False, having done no MPI, where that cannot
    be (no node yet, ranks on several nodes, a buffer the check will refuse, no room in the row):
    then the caller runs the plain check and ``allreduce``. Raises what the check raises."""
    nd = getattr(st, "shm", None)
    if nd is None or nd.size != st.size or st.size == 1 or st._row.size <= META or problem(buf):
        return False
    flat = buf.reshape(-1)
    if flat.size == 0:
        check(st, buf, op, "shm", call=call, shm_key=NOT_PREPARED)
        return True
    prep = prepare(nd, flat)
    check(st, buf, op, "shm", call=call, shm_key=prep[1])  # sync 1 (raises on every rank alike)
    keys = st._rows[:, META]
    if (keys == NOT_PREPARED).any():  # some rank took the plain path: sync 1 the plain way, with it
        allreduce_on(nd, flat, op, p=st.size)
    else:
        finish(nd, flat, op, st.size, prep, int(keys.max()), int(keys.min()))
    return True


# --------------------------------------------------------------------------- for hier.py


def host_reduce(nd: Node, flat, op: str):
    """op over the node's ``flat`` (no avg division) into node rank 0's second scratch region, returned
    (a view, the same memory on every rank): copy in, sync, each rank reduces its slice of every
    rank's copy into it, sync. The leader may then work on it in place (hier: the ring across
    hosts); ``host_bcast`` copies it out."""
    w = nd.scratch_for(flat.nbytes)
    bufs = _views(w, 0, flat)
    bufs[nd.rank][...] = flat
    nd.sync(w.win)
    out = w.segs[0][w.nbytes // 2:w.nbytes // 2 + flat.nbytes].view(flat.dtype)
    lo, hi = chunk_bounds(flat.size, nd.size, nd.rank)
    reduce_tiles(bufs, -1, lo, hi, op, None, [out], tiles_for(nd, flat.dtype, op))
    nd.sync(w.win)
    return out


def host_bcast(nd: Node, flat, out) -> None:
    """Every rank's ``flat`` becomes ``out`` (host_reduce's region, once the leader is done with it).
    The region is not the one the next host_reduce fills before its first sync, and it is written
    again only after that sync, which every rank enters once it has copied: no third sync needed."""
    nd.sync(nd.scratch.win)
    flat[...] = out


def steps(st, buf, op: str):
    """For iallreduce / allreduce_init: the whole reduction when started (see the module doc)."""
    if backend.is_device(buf):
        raise ValueError("iallreduce/allreduce_init: algorithm='shm' takes host (NumPy) buffers; use the "
                         "blocking allreduce (it stages device buffers through host memory) or 'ring'")
    allreduce(st, buf, op)
    return
    yield  # a generator that yields nothing
