"""Device (GPU) buffers through MPI: a pipelined device ring, and whole-buffer staging.

When the MPI library cannot read GPU memory, the ring stages its segments
through pinned host memory one at a time, so the copies overlap the wire. Two
CUDA streams per rank: ``out`` for the copies to the host, ``in`` for the copies
from the host and the reductions (``MPITRAIN_STAGING_STREAMS=1``: both on one):

    rank r: GPU                          host (pinned)                          wire
    buf[s] ---D2H (out)----------------> mirror[s] ---(event synced)--> Isend ---> r+1
    buf[s] <--reduce (in)-- dslot <--H2D (in)-- hslot <--------------- Irecv <--- r-1
    buf[s] <--H2D (in)---------------- mirror[s] <-------------------- Irecv <--- r-1
                                           '---(forwarded, no copy)---> Isend ---> r+1

    time -->  out: D2H own k | D2H own k+1 | ... | D2H red j | D2H red j+1 |
              in :         H2D j|red j | H2D j+1|red j+1 | ...   (~~ the wire, meanwhile)
    (one stream: the same work in one line, D2H and H2D one after the other)

Steps (the plan, segment size, tag and message order of ring.py, so the two
interoperate message for message):
  0. both streams wait for the caller's current stream (the kernels that wrote
     ``buf``); receives are posted DEPTH segments ahead into 2·DEPTH pinned
     host slots (all-gather receives: into the mirror, in place).
  1. reduce-scatter step 0: each segment of my own chunk is copied D2H into
     its place in a pinned host mirror of the buffer; an event marks its end.
  2. each receive, in plan order:
     reduce-scatter: H2D hslot -> dslot (async, ``in``; an event frees hslot),
        reduce buf[s] op= dslot (``in``; avg: divide at the last step); ``out``
        waits for that (an event of ``in``), D2H buf[s] -> mirror[s], event;
        the send is queued;
     all-gather: the data is in mirror[s]: H2D mirror[s] -> buf[s] (``in``),
        and mirror[s] is forwarded as it is.
  3. queued sends leave in order, each after ``synchronize(event)`` of its
     copy: MPI never reads memory a copy or kernel is still writing. After
     each receive the host posts those whose copies are done; while it waits
     for a receive it posts the others one by one as their copies finish
     (looking at the receive in between); it blocks in MPI only when none is
     held back, so no rank ever waits for a message its neighbour holds back.
  4. a host slot takes a new receive only after the H2D that read it is
     complete; a mirror segment only after the send that read it completed
     (when that send is not even made yet -- chunks of fewer than DEPTH
     segments -- the receive waits to be posted; receives stay in plan order).
  5. wait for the sends, synchronize both streams: ``buf`` holds the result.

Each chunk is reduced once, on one rank, in a fixed order, then copied:
bitwise identical results on every rank, as ring.py. With CUDA-aware MPI
(``direct``) the same loop runs without copies: receives land in device
slots (reduce-scatter) or in ``buf`` (all-gather), sends read ``buf``, and
the events guard the kernels instead of the copies. Tree and native on
device buffers use whole-buffer staging (copy out, host algorithm, copy
back), or, CUDA-aware, the algorithm itself with the stream synchronized
before every MPI call.

Cost, per rank, staged: the ring's 2(p-1)·alpha + 2(p-1)/p·n·beta +
(p-1)/p·n·gamma (gamma on the GPU), plus n·beta_d2h + 2(p-1)/p·n·beta_h2d of
PCIe copies, overlapped with the wire segment by segment: about
max(wire, n·beta_d2h, 2(p-1)/p·n·beta_h2d) + a few segments' copies with two
streams; with one, the two directions add up (busbw / d2h <= 0.5 at p = 2).
Whole-buffer staging: n·beta_d2h + (host algorithm) + n·beta_h2d, one after
the other. Memory:
pinned host n + 2·DEPTH·seg elements, device DEPTH·seg, allocated once per
dtype and reused.

The device is reached only through a small ``DeviceOps`` interface
(``CupyOps`` here; the CPU tests run the same code on a NumPy stand-in that
executes copies late, checks every MPI buffer against unfinished copies and
every op against unordered work of the other stream, and can simulate time).
"""

from __future__ import annotations

from collections import deque

import numpy as np
from mpi4py import MPI

from . import TAG_RING, finish_avg, reducer
from . import ring as _ring
from .partition import chunk_bounds, segments
from .. import backend
from ..units import env_knob

STREAMS = 2  # staged ring, per rank: D2H on one stream, H2D + reductions on the other (MPITRAIN_STAGING_STREAMS)


# --------------------------------------------------------------------------- device operations


class DeviceOps:
    """What the staged algorithms need from a device. Everything is asynchronous on
    ``stream`` except ``synchronize`` (host waits for an event) and ``done`` (a query).
    Work on one stream runs in order; work on two streams is ordered only by ``wait``."""

    xp = None  # array module of device arrays

    def stream(self, which: int = 0):
        """This device's stream number ``which`` (0: the first; 1: a second one), made once."""
        raise NotImplementedError

    def host_empty(self, dtype, n):
        """A pinned (page-locked) host array of ``n`` elements."""
        raise NotImplementedError

    def dev_empty(self, dtype, n):
        raise NotImplementedError

    def copy_d2h(self, dst_host, src_dev, stream):
        raise NotImplementedError

    def copy_h2d(self, dst_dev, src_host, stream):
        raise NotImplementedError

    def reduce(self, op, dst_dev, src_dev, stream):
        """``dst = op(dst, src)`` elementwise on the device."""
        raise NotImplementedError

    def finish_avg(self, dst_dev, p, stream):
        raise NotImplementedError

    def record(self, stream):
        """An event that completes when everything enqueued on ``stream`` so far has."""
        raise NotImplementedError

    def after_current(self, stream):
        """Make ``stream`` wait (on the device) for the caller's current stream."""
        raise NotImplementedError

    def wait(self, stream, event):
        """Make ``stream`` wait (on the device, the host goes on) for ``event`` of another stream."""
        raise NotImplementedError

    def synchronize(self, event):
        raise NotImplementedError

    def done(self, event) -> bool:
        raise NotImplementedError

    def sync_current(self):
        """Host waits for the caller's current stream."""
        raise NotImplementedError


class CupyOps(DeviceOps):
    """DeviceOps on CuPy: non-blocking streams (made once per device), cudaMemcpyAsync, CuPy ufuncs."""

    def __init__(self):
        import cupy

        self.cp = self.xp = cupy
        self._streams = {}

    def stream(self, which: int = 0):
        key = (self.cp.cuda.Device().id, which)
        s = self._streams.get(key)
        if s is None:
            s = self._streams[key] = self.cp.cuda.Stream(non_blocking=True)
        return s

    def host_empty(self, dtype, n):
        dtype = np.dtype(dtype)
        mem = self.cp.cuda.alloc_pinned_memory(max(n, 1) * dtype.itemsize)
        return np.frombuffer(mem, dtype=dtype, count=max(n, 1))[:n]  # keeps ``mem`` alive

    def dev_empty(self, dtype, n):
        return self.cp.empty(max(n, 1), dtype=dtype)[:n]

    def copy_d2h(self, dst_host, src_dev, stream):
        if src_dev.nbytes:
            self.cp.cuda.runtime.memcpyAsync(dst_host.ctypes.data, src_dev.data.ptr, src_dev.nbytes,
                                             self.cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)

    def copy_h2d(self, dst_dev, src_host, stream):
        if src_host.nbytes:
            self.cp.cuda.runtime.memcpyAsync(dst_dev.data.ptr, src_host.ctypes.data, src_host.nbytes,
                                             self.cp.cuda.runtime.memcpyHostToDevice, stream.ptr)

    def reduce(self, op, dst_dev, src_dev, stream):
        with stream:
            reducer(self.cp, op)(dst_dev, src_dev, out=dst_dev)

    def finish_avg(self, dst_dev, p, stream):
        with stream:
            finish_avg(dst_dev, p)

    def record(self, stream):
        ev = self.cp.cuda.Event(block=False, disable_timing=True)
        ev.record(stream)
        return ev

    def after_current(self, stream):
        stream.wait_event(self.record(self.cp.cuda.get_current_stream()))

    def wait(self, stream, event):
        stream.wait_event(event)

    def synchronize(self, event):
        event.synchronize()

    def done(self, event) -> bool:
        return bool(event.done)

    def sync_current(self):
        self.cp.cuda.get_current_stream().synchronize()


_CUPY_OPS = None


def ops_for(buf) -> DeviceOps:
    """The DeviceOps for a device buffer (CuPy's; the tests substitute a NumPy stand-in)."""
    global _CUPY_OPS
    if _CUPY_OPS is None:
        _CUPY_OPS = CupyOps()
    return _CUPY_OPS


# --------------------------------------------------------------------------- helpers


def _cache(st) -> dict:
    base = getattr(st, "_st", st)
    c = base.__dict__.get("_staging")
    if c is None:
        c = base.__dict__["_staging"] = {}
    return c


def _buffer(st, ops, kind: str, dtype, n: int):
    """A reusable pinned-host (``kind`` starting with 'host') or device array of ``n`` elements."""
    key = (id(ops), kind, np.dtype(dtype).str)
    c = _cache(st)
    got = c.get(key)
    if got is None or got[1].size < n:
        arr = ops.host_empty(dtype, n) if kind.startswith("host") else ops.dev_empty(dtype, n)
        c[key] = got = (ops, arr)  # (ops kept alive so that id(ops) is not reused)
    return got[1][:n]


def _segment_bytes(nbytes: int, p: int) -> int:
    """ring.py's segment size for this message (the same rule, so the schedules match)."""
    f = getattr(_ring, "segment_bytes", None)
    if f is not None:
        return int(f(nbytes, p))
    return int(_ring.SEGMENT_BYTES)


class StateView:
    """The library state ``st`` with another communicator object in front (same ranks)."""

    def __init__(self, st, comm):
        self._st, self.comm, self.rank, self.size = st, comm, st.rank, st.size

    def scratch(self, xp, dtype, n):
        return self._st.scratch(xp, dtype, n)

    def __getattr__(self, name):
        return getattr(self._st, name)


class SyncedComm:
    """A communicator that waits for the device before every call that touches a buffer
    (for tree/native on device buffers with a CUDA-aware MPI: a kernel may still be
    writing the buffer, or reading a scratch array a receive is about to overwrite)."""

    _GUARDED = ("Send", "Recv", "Isend", "Irecv", "Sendrecv", "Allreduce", "Iallreduce",
                "Bcast", "Reduce", "Allgather")

    def __init__(self, comm, sync):
        self._comm, self._sync = comm, sync

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name not in self._GUARDED:
            return attr
        sync = self._sync

        def guarded(*args, **kwargs):
            sync()
            return attr(*args, **kwargs)

        return guarded


# --------------------------------------------------------------------------- the device ring


def staging_streams() -> int:
    """CUDA streams the staged ring uses per rank: ``MPITRAIN_STAGING_STREAMS`` (1 or 2), else STREAMS."""
    return env_knob("MPITRAIN_STAGING_STREAMS", STREAMS)


def ring(st, buf, op: str, *, ops: DeviceOps | None = None, direct: bool = False,
         seg_bytes: int | None = None, tag: int = TAG_RING, depth: int | None = None,
         streams: int | None = None):
    """Ring all-reduce of the device buffer ``buf`` in place (see the module comment).

    ``direct``: the MPI library reads and writes device memory (CUDA-aware), no
    staging. ``seg_bytes``/``depth`` default to ring.py's, and must match it on the
    other ranks. ``streams`` (staged only; default ``staging_streams()``): 1 runs every
    copy and reduction on one stream, 2 puts the copies in and the reductions on a second.
    """
    ops = ops or ops_for(buf)
    flat = buf.reshape(-1)
    if st.size == 1 or flat.size == 0:
        return buf
    seg = max(1, (seg_bytes or _segment_bytes(flat.nbytes, st.size)) // flat.itemsize)
    _DeviceRing(st, flat, op, ops, direct=direct, seg=seg, tag=tag, depth=depth or _ring.DEPTH,
                streams=streams or staging_streams()).run()
    return buf


class _DeviceRing:
    """One call of ``ring``: its plan, streams and buffers, and the bookkeeping of its messages
    (steps 0-5 of the module comment)."""

    def __init__(self, st, flat, op, ops, *, direct, seg, tag, depth, streams):
        self.ops, self.comm, self.flat, self.op, self.direct, self.tag = ops, st.comm, flat, op, direct, tag
        r, p, n = st.rank, st.size, flat.size
        self.p, self.seg, self.depth = p, seg, depth
        self.nslots = 2 * depth  # receive slots: one is refilled `depth` receives after the copy that read it
        self.left, self.right = (r - 1) % p, (r + 1) % p
        self.last_rs, self.last = p - 2, 2 * (p - 1) - 1
        self.units = _ring.plan(n, p, r, seg)
        self.own = chunk_bounds(n, p, r)
        self.width = width = min(seg, -(-n // p))
        # out: copies to the host (direct: everything); inb: copies from the host and the reductions
        self.out = ops.stream()
        self.inb = ops.stream(1) if streams > 1 and not direct else self.out
        self.streams = [self.out] if self.inb is self.out else [self.out, self.inb]
        for s in self.streams:  # before any allocation: the caller's kernels may still use that memory
            ops.after_current(s)
        if direct:
            self.mirror = self.dslots = None
            self.rslots = _buffer(st, ops, "dev-recv", flat.dtype, self.nslots * width)
        else:
            self.mirror = _buffer(st, ops, "host-mirror", flat.dtype, n)
            self.rslots = _buffer(st, ops, "host-recv", flat.dtype, self.nslots * width)
            self.dslots = _buffer(st, ops, "dev-slots", flat.dtype, depth * width)
        self.sends = {}  # (send step, lo) -> request, posted
        self.queued = deque()  # (event, send step, lo, hi): copied (or reduced) but not yet posted
        self.slot_free = [None] * self.nslots  # event after which receive slot k may be overwritten
        self.recvs = [None] * len(self.units)
        self.posted = 0  # receives are posted in plan order (MPI matches them in that order)

    def wire(self, a, b):
        """What MPI sends from / all-gather receives into, for region [a, b)."""
        return self.flat[a:b] if self.direct else self.mirror[a:b]

    def send_queued(self, everything=True):
        """Post the queued sends in order, each once its copy is done (step 3): all of them
        (waiting for their copies), or only those whose copies are done already."""
        q = self.queued
        while q and (everything or self.ops.done(q[0][0])):
            self._send_first()

    def _send_first(self):
        ev, t, a, b = self.queued.popleft()
        self.ops.synchronize(ev)
        self.sends[(t, a)] = self.comm.Isend(self.wire(a, b), dest=self.right, tag=self.tag)

    def block(self, req):
        """Wait for ``req`` in MPI, but never while holding back a send: meanwhile post the
        queued sends one by one as their copies finish, looking at ``req`` between them (so
        a message that arrives is taken while later copies out still run)."""
        while self.queued and not req.Test():
            self._send_first()
        req.Wait()

    def post_ahead(self, limit):
        """Post the receives of units [posted, limit) in plan order (step 4)."""
        while self.posted < min(limit, len(self.units)):
            j = self.posted
            t, a, b = self.units[j]
            dst = self._recv_slot(j, b - a) if t <= self.last_rs else self._gather_target(t, a, b)
            if dst is None:
                return  # posted later, when the send of its region exists
            self.recvs[j] = (self.comm.Irecv(dst, source=self.left, tag=self.tag), dst)
            self.posted += 1

    def _recv_slot(self, j, m):
        """A reduce-scatter receive's slot, once the copy (or kernel) that last read it is done."""
        k = j % self.nslots
        if self.slot_free[k] is not None:
            self.ops.synchronize(self.slot_free[k])
            self.slot_free[k] = None
        return self.rslots[k * self.width:k * self.width + m]

    def _gather_target(self, t, a, b):
        """An all-gather receive lands in place, once the send that read the region is done;
        None when that send is not even made yet (tiny chunks)."""
        key = (t - (self.p - 1), a)
        if key not in self.sends:
            if all(q[1:3] != key for q in self.queued):
                return None
            while key not in self.sends:  # post the queued sends up to that one (not the later ones)
                self._send_first()
        self.block(self.sends.pop(key))
        return self.wire(a, b)

    def _reduce(self, i, t, a, b, dst):
        """Reduce-scatter: fold the received segment into buf[a:b], queue its send (step 2)."""
        ops, view, k = self.ops, self.flat[a:b], i % self.nslots
        if self.direct:
            ops.reduce(self.op, view, dst, self.inb)
            self.slot_free[k] = ops.record(self.inb)
        else:
            d = self.dslots[(i % self.depth) * self.width:(i % self.depth) * self.width + (b - a)]
            ops.copy_h2d(d, dst, self.inb)
            self.slot_free[k] = ops.record(self.inb)
            ops.reduce(self.op, view, d, self.inb)
        if t == self.last_rs and self.op == "avg":
            ops.finish_avg(view, self.p, self.inb)
        if not self.direct:
            if self.inb is not self.out:  # the copy out waits for the reduction on the other stream
                ops.wait(self.out, ops.record(self.inb))
            ops.copy_d2h(self.mirror[a:b], view, self.out)
        self.queued.append((ops.record(self.out), t + 1, a, b))

    def _gather(self, t, a, b, dst):
        """All-gather: the data is in place in the mirror: copy it into buf, forward it (step 2)."""
        if not self.direct:
            self.ops.copy_h2d(self.flat[a:b], dst, self.inb)
        if t < self.last:  # forward what just arrived: host data (or MPI-written), no event needed
            self.send_queued()
            self.sends[(t + 1, a)] = self.comm.Isend(dst, dest=self.right, tag=self.tag)

    def run(self):
        ops = self.ops
        for a, b in segments(*self.own, self.seg):  # reduce-scatter step 0: my own chunk (step 1)
            if not self.direct:
                ops.copy_d2h(self.mirror[a:b], self.flat[a:b], self.out)
            self.queued.append((ops.record(self.out), 0, a, b))
        self.post_ahead(self.depth)
        for i, (t, a, b) in enumerate(self.units):
            if self.posted <= i:  # deferred above; its region's send exists by now (an earlier unit made it)
                self.post_ahead(i + 1)
            req, dst = self.recvs[i]
            self.block(req)
            self.recvs[i] = None
            if t <= self.last_rs:
                self._reduce(i, t, a, b, dst)
            else:
                self._gather(t, a, b, dst)
            self.post_ahead(i + 1 + self.depth)
            self.send_queued(everything=False)
        self.send_queued()  # step 5
        MPI.Request.Waitall(list(self.sends.values()))
        for s in self.streams:
            ops.synchronize(ops.record(s))


# --------------------------------------------------------------------------- whole-buffer staging


def staged(run, st, buf, op, *, ops: DeviceOps | None = None):
    """``run`` (a host algorithm) on a pinned host copy of the device buffer ``buf``.

        GPU buf --D2H--> pinned host copy --(run on the host)--> --H2D--> GPU buf
    """
    ops = ops or ops_for(buf)
    flat = buf.reshape(-1)
    host = _buffer(st, ops, "host-mirror", flat.dtype, flat.size)
    stream = ops.stream()
    ops.after_current(stream)
    ops.copy_d2h(host, flat, stream)
    ops.synchronize(ops.record(stream))
    run(st, host, op)
    ops.copy_h2d(flat, host, stream)
    ops.synchronize(ops.record(stream))
    return buf


def allreduce(algorithm: str, run, st, buf, op: str, *, ops: DeviceOps | None = None,
              direct: bool | None = None):
    """A device buffer through algorithm ``algorithm`` (``run`` is its host implementation).

    CUDA-aware MPI (``direct``, default: ``backend.cuda_aware_mpi()``): the device ring,
    or ``run`` itself with the stream synchronized before each MPI call. Otherwise the
    pipelined staged ring for ``ring``, whole-buffer staging for the others.
    """
    ops = ops or ops_for(buf)
    if direct is None:
        direct = backend.cuda_aware_mpi()
    if algorithm == "ring":
        return ring(st, buf, op, ops=ops, direct=direct)
    if direct and algorithm != "shm":  # shm reads host memory only: always staged
        return run(StateView(st, SyncedComm(st.comm, ops.sync_current)), buf, op)
    return staged(run, st, buf, op, ops=ops)
