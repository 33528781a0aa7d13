"""Device (GPU) buffers through MPI: a pipelined device ring, and whole-buffer staging.

When the MPI library cannot read GPU memory, the ring stages its segments
through pinned host memory one at a time, so the copies overlap the wire:

    rank r: GPU                          host (pinned)                          wire
    buf[s] ---D2H (stream)-------------> mirror[s] ---(event synced)--> Isend ---> r+1
    buf[s] <--reduce-- dslot <--H2D----- hslot <---------------------- Irecv <--- r-1
    buf[s] <--H2D--------------------- mirror[s] <-------------------- Irecv <--- r-1
                                           '---(forwarded, no copy)---> Isend ---> r+1

    time -->  seg k    D2H|Isend~~~~~~~~~~~~~~~~~           (~~ on the wire)
              seg k+1      D2H|Isend~~~~~~~~~~~~~~~~~       the copy of k+1 runs while k is sent
              recv j   Irecv~~~~~~|H2D|reduce|D2H|Isend~~~~~~~~~~~~
              recv j+1    Irecv~~~~~~~~~~|H2D|reduce|D2H|Isend~~~~~~~~~~~~

Steps (the plan, segment size, tag and message order of ring.py, so the two
interoperate message for message):
  0. the stream waits for the caller's current stream (the kernels that wrote
     ``buf``); receives are posted DEPTH segments ahead into 2·DEPTH pinned
     host slots (all-gather receives: into the mirror, in place).
  1. reduce-scatter step 0: each segment of my own chunk is copied D2H into
     its place in a pinned host mirror of the buffer; an event marks its end.
  2. each receive, in plan order:
     reduce-scatter: H2D hslot -> dslot (async; an event frees hslot), reduce
        buf[s] op= dslot on the device (avg: divide at the last step), D2H
        buf[s] -> mirror[s], event; the send is queued;
     all-gather: the data is in mirror[s]: H2D mirror[s] -> buf[s] (async),
        and mirror[s] is forwarded as it is.
  3. queued sends leave in order, each after ``synchronize(event)`` of its
     copy: MPI never reads memory a copy or kernel is still writing. Up to
     SEND_LAG wait while the host enqueues the next segment's copies; all of
     them are sent before the host blocks in MPI, so no rank ever waits for a
     message that its neighbour is holding back.
  4. a host slot takes a new receive only after the H2D that read it is
     complete; a mirror segment only after the send that read it completed
     (when that send is not even made yet -- chunks of fewer than DEPTH
     segments -- the receive waits to be posted; receives stay in plan order).
  5. wait for the sends, synchronize the stream: ``buf`` holds the result.

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
max(wire, copies) + one segment's copy per step. Whole-buffer staging:
n·beta_d2h + (host algorithm) + n·beta_h2d, one after the other. Memory:
pinned host n + 2·DEPTH·seg elements, device DEPTH·seg, allocated once per
dtype and reused.

The device is reached only through a small ``DeviceOps`` interface
(``CupyOps`` here; the CPU tests run the same code on a NumPy stand-in that
executes copies late and checks every MPI buffer against unfinished copies).
"""

from __future__ import annotations

from collections import deque

import numpy as np
from mpi4py import MPI

from . import TAG_RING, finish_avg, reducer
from . import ring as _ring
from .partition import chunk_bounds, segments
from .. import backend

SEND_LAG = 2  # D2H-copied segments that may wait for their Isend while the host enqueues more


# --------------------------------------------------------------------------- device operations


class DeviceOps:
    """What the staged algorithms need from a device. Everything is asynchronous on
    ``stream`` except ``synchronize`` (host waits for an event) and ``done`` (a query)."""

    xp = None  # array module of device arrays

    def stream(self):
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

    def synchronize(self, event):
        raise NotImplementedError

    def done(self, event) -> bool:
        raise NotImplementedError

    def sync_current(self):
        """Host waits for the caller's current stream."""
        raise NotImplementedError


class CupyOps(DeviceOps):
    """DeviceOps on CuPy: one non-blocking stream per device, cudaMemcpyAsync, CuPy ufuncs."""

    def __init__(self):
        import cupy

        self.cp = self.xp = cupy
        self._streams = {}

    def stream(self):
        dev = self.cp.cuda.Device().id
        s = self._streams.get(dev)
        if s is None:
            s = self._streams[dev] = self.cp.cuda.Stream(non_blocking=True)
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


def ring(st, buf, op: str, *, ops: DeviceOps | None = None, direct: bool = False,
         seg_bytes: int | None = None, tag: int = TAG_RING, depth: int | None = None):
    """Ring all-reduce of the device buffer ``buf`` in place (see the module comment).

    ``direct``: the MPI library reads and writes device memory (CUDA-aware), no
    staging. ``seg_bytes``/``depth`` default to ring.py's, and must match it on the
    other ranks.
    """
    ops = ops or ops_for(buf)
    comm, r, p = st.comm, st.rank, st.size
    flat = buf.reshape(-1)
    n = flat.size
    if p == 1 or n == 0:
        return buf
    seg = max(1, (seg_bytes or _segment_bytes(flat.nbytes, p)) // flat.itemsize)
    depth = depth or _ring.DEPTH
    nslots = 2 * depth  # receive slots: one is refilled `depth` receives after the copy that read it
    left, right = (r - 1) % p, (r + 1) % p
    last_rs, last = p - 2, 2 * (p - 1) - 1
    units = _ring.plan(n, p, r, seg)
    width = min(seg, -(-n // p))
    stream = ops.stream()
    ops.after_current(stream)

    if direct:
        mirror = None
        rslots = _buffer(st, ops, "dev-recv", flat.dtype, nslots * width)
    else:
        mirror = _buffer(st, ops, "host-mirror", flat.dtype, n)
        rslots = _buffer(st, ops, "host-recv", flat.dtype, nslots * width)
        dslots = _buffer(st, ops, "dev-slots", flat.dtype, depth * width)

    def wire(a, b):  # what MPI sends from / all-gather receives into, for region [a, b)
        return flat[a:b] if direct else mirror[a:b]

    sends = {}  # (send step, lo) -> request, posted
    queued = deque()  # (event, send step, lo, hi): copied (or reduced) but not yet posted
    slot_free = [None] * nslots  # event after which receive slot k may be overwritten
    recvs = [None] * len(units)

    def send_queued(everything=True):
        while queued and (everything or len(queued) > SEND_LAG or ops.done(queued[0][0])):
            ev, t, a, b = queued.popleft()
            ops.synchronize(ev)
            sends[(t, a)] = comm.Isend(wire(a, b), dest=right, tag=tag)

    def block(req):  # wait in MPI, but never while holding back a send
        if queued and not req.Test():
            send_queued()
        req.Wait()

    posted = 0  # receives are posted in plan order (MPI matches them in that order)

    def post_ahead(limit):
        nonlocal posted
        while posted < min(limit, len(units)):
            j = posted
            t, a, b = units[j]
            if t <= last_rs:
                k = j % nslots
                if slot_free[k] is not None:
                    ops.synchronize(slot_free[k])
                    slot_free[k] = None
                dst = rslots[k * width:k * width + (b - a)]
            else:  # all-gather: in place, once the send that read the region is done
                key = (t - (p - 1), a)
                if key not in sends and all(q[1:3] != key for q in queued):
                    return  # that send is not even made yet (tiny chunks): post this one later
                send_queued()
                block(sends.pop(key))
                dst = wire(a, b)
            recvs[j] = (comm.Irecv(dst, source=left, tag=tag), dst)
            posted += 1

    # reduce-scatter step 0: my own chunk, segment by segment
    lo0, hi0 = chunk_bounds(n, p, r)
    for a, b in segments(lo0, hi0, seg):
        if not direct:
            ops.copy_d2h(mirror[a:b], flat[a:b], stream)
        queued.append((ops.record(stream), 0, a, b))
    post_ahead(depth)

    for i, (t, a, b) in enumerate(units):
        if posted <= i:  # deferred above; its region's send exists by now (an earlier unit made it)
            post_ahead(i + 1)
        req, dst = recvs[i]
        block(req)
        recvs[i] = None
        view = flat[a:b]
        if t <= last_rs:
            k = i % nslots
            if direct:
                ops.reduce(op, view, dst, stream)
                slot_free[k] = ops.record(stream)
            else:
                d = dslots[(i % depth) * width:(i % depth) * width + (b - a)]
                ops.copy_h2d(d, dst, stream)
                slot_free[k] = ops.record(stream)
                ops.reduce(op, view, d, stream)
            if t == last_rs and op == "avg":
                ops.finish_avg(view, p, stream)
            if not direct:
                ops.copy_d2h(mirror[a:b], view, stream)
            queued.append((ops.record(stream), t + 1, a, b))
        else:
            if not direct:
                ops.copy_h2d(view, dst, stream)
            if t < last:  # forward what just arrived: host data (or MPI-written), no event needed
                send_queued()
                sends[(t + 1, a)] = comm.Isend(dst, dest=right, tag=tag)
        post_ahead(i + 1 + depth)
        send_queued(everything=False)

    send_queued()
    MPI.Request.Waitall(list(sends.values()))
    ops.synchronize(ops.record(stream))
    return buf


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
    if direct:
        return run(StateView(st, SyncedComm(st.comm, ops.sync_current)), buf, op)
    return staged(run, st, buf, op, ops=ops)
