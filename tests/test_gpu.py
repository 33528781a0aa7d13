"""The GPU path.

Runs everywhere (no GPU needed):
  - the staged device ring and whole-buffer staging (collectives/staging.py) on a NumPy
    stand-in for the device (``FakeOps``) that runs copies and kernels LATE -- only when the
    algorithm synchronizes an event -- poisons copy destinations until then, and checks every
    buffer handed to MPI against unfinished device work (and every device op against MPI
    requests in flight, and every op against unordered work of the other stream). Results vs
    native, bitwise identity across ranks, the message schedule vs ring.py, a mixed host/device
    ring, the pipelining and the copy volumes; on its timing model (``Timing``, ``TimedComm``),
    ring busbw / d2h with one stream and with two;
  - device selection and its error messages (gpu_count etc. monkeypatched), local-rank
    detection, the CUDA-aware detection and its MPITRAIN_CUDA_AWARE override.

Needs a CUDA GPU (marked ``gpu``; skipped with the reason when none is visible, failed when
MPITRAIN_REQUIRE_GPU=1 as in `make gpu-check`): CuPy arrays through every algorithm, op and
dtype vs NumPy native, bitwise identity, tiny segments, the caller's stream; the model and
optimizers on CuPy vs NumPy; a short `train.backend=cupy` run on 2 ranks sharing one GPU; the
GPU bench.
"""

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections import deque

import numpy as np
import pytest
from mpi4py import MPI

from conftest import MPIRUN
from mpitrain import backend
from mpitrain.collectives import DTYPES, OPS, TAG_RING, allreduce, ring, staging, state_for
from mpitrain.collectives.partition import chunk_bounds
from mpitrain.runtime import UserError

HAVE_GPU = backend.gpu_available()
REQUIRE_GPU = os.environ.get("MPITRAIN_REQUIRE_GPU") == "1"
WHY_NO_GPU = backend.gpu_unavailable_reason()
needs_gpu = pytest.mark.skipif(not HAVE_GPU and not REQUIRE_GPU, reason=f"needs a CUDA GPU: {WHY_NO_GPU}")
ALGS = ("ring", "tree", "native")
LENGTHS = [1, 2, 3, 5, 7, 17, 100, 1001]
TINY = 24  # bytes per ring segment: a few hundred elements cross many segments and slots


def rank_data(n, r, dtype, op):
    i = np.arange(n)
    if op == "prod":  # small products for float16 and int32
        return ((i + r) % 2 + 1).astype(dtype)
    return ((i * 7 + r * 3) % 11 - 3 + r).astype(dtype)


def assert_matches(got, ref, dtype, where):
    got, ref = np.asarray(got), np.asarray(ref)
    if np.dtype(dtype).kind == "f":
        tol = 2e-3 if dtype == "float16" else 1e-6
        np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), rtol=tol, atol=tol,
                                   err_msg=where)
    else:
        np.testing.assert_array_equal(got, ref, err_msg=where)


def same_on_all_ranks(comm, arr) -> bool:
    d = hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()
    return len(set(comm.allgather(d))) == 1


# --------------------------------------------------------------------------- a NumPy "device"


class FakeDev(np.ndarray):
    """A NumPy array that claims to live on a GPU: backend.is_device() is True for it."""

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ctypes.data, False),
                "version": 3}


def on_dev(a):
    return np.array(a, copy=True).view(FakeDev)


def _poison(a):
    a.view(np.ndarray)[...] = np.nan if a.dtype.kind == "f" else -7777


def _overlaps(x, ys):
    return any(np.may_share_memory(x, y) for y in ys)


def _clash(xs, ys):
    return any(_overlaps(x, ys) for x in xs)


class _Op:
    __slots__ = ("kind", "fn", "reads", "writes", "seq", "deps")

    def __init__(self, kind, fn, reads, writes, seq, deps):
        self.kind, self.fn, self.reads, self.writes, self.seq, self.deps = kind, fn, reads, writes, seq, deps


class _Event:
    """Complete when the first ``upto`` ops of ``stream`` are, and what the stream waited for
    before it was recorded (``deps``: other stream -> ops of it); ``end``: simulated time."""

    def __init__(self, stream, upto, deps, end=0.0):
        self.stream, self.upto, self.deps, self.end = stream, upto, deps, end


class FakeOps(staging.DeviceOps):
    """DeviceOps on NumPy, adversarial: an op runs only when an event after it is
    synchronized (or, at random, earlier -- a device making progress); a copy's destination
    holds garbage until then; an op that touches memory an MPI request in flight is using
    raises at once. Streams: ops of one stream run in order; an op that touches memory an op
    of another stream may still be using (not known complete to the host, not ordered
    before it by ``wait``) raises at once. ``CheckedComm`` checks MPI against device work
    the host does not know to be complete. With ``timing`` (a ``Timing``), every op also
    gets a simulated start and end, and ``done``/``synchronize`` follow that clock."""

    xp = np

    def __init__(self, seed=0, lazy=True, timing=None):
        self.queues = {}         # stream -> ops enqueued, not yet run, in order
        self.unknown = {}        # stream -> ops the host does not know to be complete (run or not)
        self.enqueued, self.ran, self.known = {}, {}, {}  # stream -> counts of ops
        self.waits = {}          # stream -> {other stream: its ops ordered before what comes next}
        self.lazy, self.timing = lazy, timing
        self.rng = random.Random(seed)
        self.comm = None         # the CheckedComm watching MPI, when there is one
        self.pinned = []
        self.stats = {"d2h": 0, "h2d": 0, "reduce": 0, "sync": 0}
        self.timeline = []       # ("d2h"/"h2d"/"reduce", address) in enqueue order (shared with CheckedComm)

    # allocation
    def stream(self, which=0):
        s = f"stream{which}"
        if s not in self.queues:
            self.queues[s], self.unknown[s], self.waits[s] = [], [], {}
            self.enqueued[s] = self.ran[s] = self.known[s] = 0
        return s

    def host_empty(self, dtype, n):
        a = np.empty(max(n, 1), dtype=dtype)
        _poison(a)
        self.pinned.append(a)
        return a[:n]

    def dev_empty(self, dtype, n):
        a = np.empty(max(n, 1), dtype=dtype).view(FakeDev)
        _poison(a)
        return a[:n]

    # asynchronous work
    def _check_streams(self, kind, reads, writes, stream):
        for other, ops in self.unknown.items():
            if other == stream:
                continue
            before = self.waits[stream].get(other, 0)
            for op in ops:
                if op.seq >= before and (_clash(writes, op.reads + op.writes) or _clash(reads, op.writes)):
                    raise AssertionError(f"device {kind} on {stream} touches memory that a {op.kind} on {other} "
                                         "may still be using: no wait orders them")

    def _enqueue(self, kind, fn, reads, writes, addr, stream, nbytes=0):
        if self.comm is not None:
            self.comm.check_device_op(kind, reads, writes)
        self._check_streams(kind, reads, writes, stream)
        unrun = [m for q in self.queues.values() for op in q for m in op.reads + op.writes]
        if self.lazy and kind in ("d2h", "h2d") and not _overlaps(writes[0], unrun):
            _poison(writes[0])  # "half written" until the copy is known to be done
        op = _Op(kind, fn, reads, writes, self.enqueued[stream], dict(self.waits[stream]))
        if self.timing is not None:
            self.timing.schedule(kind, stream, nbytes)
        self.queues[stream].append(op)
        self.unknown[stream].append(op)
        self.enqueued[stream] += 1
        self.timeline.append((kind, addr))
        if not self.lazy:
            self._run(stream, self.enqueued[stream])
        elif self.rng.random() < 0.2:  # the device makes progress on some stream
            s = self.rng.choice([s for s, q in self.queues.items() if q])
            self._run(s, self.ran[s] + 1)

    def _run(self, stream, upto):
        q = self.queues[stream]
        while self.ran[stream] < upto:
            for other, k in q[0].deps.items():  # what the stream waited for runs first
                self._run(other, k)
            q.pop(0).fn()
            self.ran[stream] += 1

    def _complete(self, ev):
        """Run everything ``ev`` covers; the host now knows it is complete."""
        for s, k in [*ev.deps.items(), (ev.stream, ev.upto)]:
            self._run(s, k)
            if k > self.known[s]:
                self.known[s] = k
                self.unknown[s] = [op for op in self.unknown[s] if op.seq >= k]

    def copy_d2h(self, dst_host, src_dev, stream):
        assert isinstance(src_dev, FakeDev) and not isinstance(dst_host, FakeDev), "d2h: wrong sides"
        assert dst_host.shape == src_dev.shape and dst_host.dtype == src_dev.dtype
        assert _overlaps(dst_host, self.pinned), "async copy into host memory that is not pinned"
        self.stats["d2h"] += src_dev.nbytes
        self._enqueue("d2h", lambda: np.copyto(dst_host, src_dev.view(np.ndarray)), [src_dev], [dst_host],
                      src_dev.ctypes.data, stream, src_dev.nbytes)

    def copy_h2d(self, dst_dev, src_host, stream):
        assert isinstance(dst_dev, FakeDev) and not isinstance(src_host, FakeDev), "h2d: wrong sides"
        assert dst_dev.shape == src_host.shape and dst_dev.dtype == src_host.dtype
        assert _overlaps(src_host, self.pinned), "async copy from host memory that is not pinned"
        self.stats["h2d"] += src_host.nbytes
        self._enqueue("h2d", lambda: np.copyto(dst_dev.view(np.ndarray), src_host), [src_host], [dst_dev],
                      dst_dev.ctypes.data, stream, src_host.nbytes)

    def reduce(self, op, dst_dev, src_dev, stream):
        assert isinstance(dst_dev, FakeDev) and isinstance(src_dev, FakeDev), "reduce must run on the device"
        f = staging.reducer(np, op)
        self.stats["reduce"] += 1
        self._enqueue("reduce", lambda: f(dst_dev, src_dev, out=dst_dev), [dst_dev, src_dev], [dst_dev],
                      dst_dev.ctypes.data, stream, dst_dev.nbytes)

    def finish_avg(self, dst_dev, p, stream):
        assert isinstance(dst_dev, FakeDev)
        self._enqueue("avg", lambda: staging.finish_avg(dst_dev, p), [dst_dev], [dst_dev], dst_dev.ctypes.data,
                      stream, dst_dev.nbytes)

    # events
    def record(self, stream):
        end = self.timing.ready.get(stream, 0.0) if self.timing is not None else 0.0
        return _Event(stream, self.enqueued[stream], dict(self.waits[stream]), end)

    def after_current(self, stream):
        pass  # the tests' "current stream" has nothing in flight

    def wait(self, stream, event):
        assert event.stream != stream, "a stream waiting for its own event: use the stream's order"
        w = self.waits[stream]
        for s, k in [*event.deps.items(), (event.stream, event.upto)]:  # ordering is transitive
            if s != stream:
                w[s] = max(w.get(s, 0), k)
        if self.timing is not None:
            self.timing.wait(stream, event.end)

    def synchronize(self, event):
        self.stats["sync"] += 1
        self._complete(event)
        if self.timing is not None:
            self.timing.host = max(self.timing.host, event.end)

    def done(self, event):
        if self.timing is not None:
            ok = event.end <= self.timing.host
        else:
            if self.lazy and self.ran[event.stream] < event.upto and self.rng.random() < 0.3:
                self._run(event.stream, self.ran[event.stream] + 1)
            ok = all(self.ran[s] >= k for s, k in [*event.deps.items(), (event.stream, event.upto)])
        if ok:
            self._complete(event)
        return ok

    def sync_current(self):
        self.stats["sync"] += 1
        for s in self.queues:
            self._complete(_Event(s, self.enqueued[s], {}))
        if self.timing is not None:
            self.timing.host = max([self.timing.host, *self.timing.ready.values()])

    def pending(self):
        """Device work the host does not know to be complete (whether the fake ran it or not)."""
        return [op for ops in self.unknown.values() for op in ops]


class _Req(MPI.Request):
    pass


class CheckedComm:
    """A communicator in front of another: logs every message, refuses device buffers
    unless ``allow_device`` (CUDA-aware), and refuses a buffer that unfinished device work
    writes (send) or touches (receive), and (``strict``) a buffer an MPI request in flight uses.
    (ring.py is not strict: with chunks of fewer than DEPTH segments it posts an all-gather
    receive into a region before it reduces and sends that region -- safe in practice, as the
    message cannot arrive before that send, but not what the MPI standard allows.)"""

    def __init__(self, comm, ops=None, allow_device=False, strict=True):
        self._comm, self.ops, self.allow_device, self.strict = comm, ops, allow_device, strict
        self.sends, self.recvs, self.inflight = [], [], []
        if ops is not None:
            ops.comm = self

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def _check(self, buf, kind):
        if not self.allow_device:
            assert not backend.is_device(buf), f"{kind}: device memory handed to MPI without CUDA-aware MPI"
        self.inflight = [(r, b, k) for r, b, k in self.inflight if r]
        for _, other, k in self.inflight if self.strict else ():
            if kind == "recv" or k == "recv":
                assert not _overlaps(buf, [other]), f"MPI {kind} of memory an MPI {k} in flight still uses"
        if self.ops is not None:
            for op in self.ops.pending():
                bad = op.writes if kind == "send" else op.reads + op.writes
                assert not _overlaps(buf, bad), (
                    f"MPI {kind} of memory that an unfinished device {op.kind} still "
                    f"{'writes' if kind == 'send' else 'uses'}: synchronize its event first")

    def check_device_op(self, kind, reads, writes):
        self.inflight = [(r, b, k) for r, b, k in self.inflight if r]
        for req, buf, k in self.inflight:
            if k == "send":
                assert not _overlaps(buf, writes), f"device {kind} writes memory an MPI send is reading"
            else:
                assert not _overlaps(buf, reads + writes), f"device {kind} touches memory an MPI receive fills"

    def _log(self, kind, buf, peer, tag):
        (self.sends if kind == "send" else self.recvs).append((peer, tag, int(buf.size), buf.dtype.str))
        if self.ops is not None:
            self.ops.timeline.append((kind, buf.ctypes.data))

    def Isend(self, buf, dest, tag=0):
        self._check(buf, "send")
        self._log("send", buf, dest, tag)
        req = _Req(self._comm.Isend(buf, dest=dest, tag=tag))
        self.inflight.append((req, buf, "send"))
        return req

    def Irecv(self, buf, source, tag=0):
        self._check(buf, "recv")
        self._log("recv", buf, source, tag)
        req = _Req(self._comm.Irecv(buf, source=source, tag=tag))
        self.inflight.append((req, buf, "recv"))
        return req

    def Send(self, buf, dest, tag=0):
        self._check(buf, "send")
        self._log("send", buf, dest, tag)
        return self._comm.Send(buf, dest=dest, tag=tag)

    def Recv(self, buf, source, tag=0):
        self._check(buf, "recv")
        self._log("recv", buf, source, tag)
        return self._comm.Recv(buf, source=source, tag=tag)

    def Allreduce(self, sendbuf, recvbuf, op):
        self._check(recvbuf, "recv")
        return self._comm.Allreduce(sendbuf, recvbuf, op=op)


class Timing:
    """Simulated time for one rank (FakeOps(timing=...) and TimedComm): one copy engine each
    way (D2H, H2D) and the SMs for reductions, each taking work in the order it is enqueued;
    work on one stream in order; the rank's own outgoing link for messages. The host's own
    work takes no time: it only waits (events, MPI). Bandwidths in bytes per unit of time."""

    def __init__(self, copy_bw=1.0, wire_bw=2.0, reduce_bw=20.0, latency=0.0):
        self.copy_bw, self.wire_bw, self.reduce_bw, self.latency = copy_bw, wire_bw, reduce_bw, latency
        self.host = 0.0
        self.ready = {}  # stream -> when its last op (or the event it waits for) ends
        self.engine = {"d2h": 0.0, "h2d": 0.0, "sm": 0.0}
        self.link = 0.0

    def schedule(self, kind, stream, nbytes):
        eng = kind if kind in ("d2h", "h2d") else "sm"
        start = max(self.host, self.ready.get(stream, 0.0), self.engine[eng])
        end = start + nbytes / (self.reduce_bw if eng == "sm" else self.copy_bw)
        self.engine[eng] = self.ready[stream] = end
        return end

    def wait(self, stream, t):
        self.ready[stream] = max(self.ready.get(stream, 0.0), t)

    def send(self, nbytes):
        """When a message posted now has arrived (the link carries one message at a time)."""
        start = max(self.host, self.link)
        self.link = start + nbytes / self.wire_bw
        return self.link + self.latency


class _TimedReq(MPI.Request):
    """A request whose Wait/Test follow the simulated clock (MPI.Request.Waitall still works)."""

    def Wait(self, status=None):
        super().Wait(status)
        self.owner.resolve(self)
        self.owner.timing.host = max(self.owner.timing.host, self.done_at)
        return True

    def Test(self, status=None):
        if not self.complete:  # done for MPI first (a send the peer has not taken yet is not done)
            # The other process may merely be behind in real time: give it a moment, so that
            # what the model sees depends on simulated time, not on how the OS ran the ranks.
            # (When the message waits for a send this rank holds back, it is also late in
            # simulated time, and False is the right answer.)
            deadline = time.perf_counter() + TimedComm.PATIENCE
            while not super().Test(status):
                if time.perf_counter() > deadline:
                    return False
                os.sched_yield()  # let the sender run (ranks may share a core); no fixed pause
            self.complete = True
        self.owner.resolve(self)
        return self.done_at <= self.owner.timing.host


class TimedComm:
    """A communicator in front of another that carries simulated time: each Isend also sends
    its arrival time on a side communicator; a receive completes at max(arrival, posted)."""

    PATIENCE = 1.0  # seconds of real time a Test waits for a message before it says "not yet"

    def __init__(self, comm, timing):
        self._comm, self.timing = comm, timing
        self.side = comm.Dup()
        self.side_sends, self.recvs, self.done = [], {}, []

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def Isend(self, buf, dest, tag=0):
        t = np.array([self.timing.send(buf.nbytes)])
        req = _TimedReq(self._comm.Isend(buf, dest=dest, tag=tag))
        self.side_sends.append((self.side.Isend(t, dest=dest, tag=tag), t))
        req.owner, req.done_at, req.complete = self, float(t[0]), False
        self.done.append(req.done_at)
        return req

    def Irecv(self, buf, source, tag=0):
        req = _TimedReq(self._comm.Irecv(buf, source=source, tag=tag))
        req.owner, req.done_at, req.complete = self, None, False
        req.posted, req.peer, req.tag = self.timing.host, source, tag
        self.recvs.setdefault((source, tag), deque()).append(req)
        return req

    def resolve(self, req):
        """Receives from one peer complete in the order they were posted: so do their times."""
        q = self.recvs.get((getattr(req, "peer", None), getattr(req, "tag", None)), deque())
        while req.done_at is None:
            first, t = q.popleft(), np.empty(1)
            self.side.Recv(t, source=first.peer, tag=first.tag)
            first.done_at = max(float(t[0]), first.posted)

    def finish(self) -> float:
        """This rank's simulated time at the end (the last event, message or host wait)."""
        MPI.Request.Waitall([r for r, _ in self.side_sends])
        assert not any(self.recvs.values()), "a receive whose time was never read"
        self.side.Free()
        return max([self.timing.host, *self.done, *self.timing.ready.values()])


@pytest.fixture
def st(comm):
    s = state_for(comm)
    yield s
    s.__dict__.pop("_staging", None)  # the fake device's buffers


def _flat_with_guards(n, r, dtype, op):
    big = on_dev(np.full(n + 6, 99, dtype=dtype))
    big[3:3 + n] = rank_data(n, r, dtype, op)
    return big, big[3:3 + n]


# --------------------------------------------------------------------------- CPU: the device ring


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["staged", "one-stream", "direct"])
def test_device_ring_matches_native(comm, st, mode, dtype):
    """Every op, odd lengths, tiny segments, a lazy adversarial device: results as native,
    identical on every rank, nothing written outside the buffer, no device work left over.
    staged: two streams (the default), one-stream: everything on one (MPITRAIN_STAGING_STREAMS=1)."""
    r, p = comm.Get_rank(), comm.Get_size()
    streams = 1 if mode == "one-stream" else 2
    for op in OPS:
        for n in LENGTHS:
            ops = FakeOps(seed=hash((r, op, n, dtype)) & 0xFFFF)
            view = staging.StateView(st, CheckedComm(st.comm, ops, allow_device=(mode == "direct")))
            big, buf = _flat_with_guards(n, r, dtype, op)
            out = staging.ring(view, buf, op, ops=ops, direct=(mode == "direct"), seg_bytes=TINY, streams=streams)
            where = f"{mode} ring {op} n={n} {dtype} p={p} rank={r}"
            assert out is buf
            assert not ops.pending(), f"device work left unfinished: {where}"
            assert not any(req for req, _, _ in view.comm.inflight), f"MPI requests left: {where}"
            ref = allreduce(rank_data(n, r, dtype, op), comm, op=op, algorithm="native")
            assert_matches(buf, ref, dtype, where)
            assert same_on_all_ranks(comm, buf), f"ranks differ: {where}"
            g = big.view(np.ndarray)
            assert (g[:3] == 99).all() and (g[3 + n:] == 99).all(), f"wrote outside the buffer: {where}"
            if mode != "direct" and p > 1:
                assert ops.stats["d2h"] == n * buf.itemsize, f"every element copied out once: {where}"


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["staged", "direct"])
def test_device_ring_sends_what_ring_py_sends(comm, st, mode):
    """The same messages, in the same order, as the host ring (so the two interoperate)."""
    r, p = comm.Get_rank(), comm.Get_size()
    for n, seg in [(1001, TINY), (50, 8), (3, TINY), (257, 1 << 20)]:
        host = CheckedComm(st.comm, strict=False)
        ring.allreduce(staging.StateView(st, host), rank_data(n, r, np.float64, "sum"), "sum", seg_bytes=seg)
        ops = FakeOps(seed=r)
        dev = CheckedComm(st.comm, ops, allow_device=(mode == "direct"))
        _, buf = _flat_with_guards(n, r, np.float64, "sum")
        staging.ring(staging.StateView(st, dev), buf, "sum", ops=ops, direct=(mode == "direct"), seg_bytes=seg)
        assert dev.sends == host.sends, f"n={n} seg={seg}: the device ring sends differently"
        assert dev.recvs == host.recvs, f"n={n} seg={seg}: the device ring receives differently"
        assert all(tag == TAG_RING for _, tag, _, _ in dev.sends + dev.recvs)


@pytest.mark.mpi
def test_host_and_device_ranks_interoperate(comm, st):
    """Even ranks run ring.py on host arrays, odd ranks the staged device ring."""
    r, p = comm.Get_rank(), comm.Get_size()
    for dtype in ("float32", "int64"):
        for n in (7, 1001):
            if r % 2 == 0:
                buf = rank_data(n, r, dtype, "sum")
                ring.allreduce(st, buf, "sum", seg_bytes=TINY)
            else:
                ops = FakeOps(seed=r)
                _, buf = _flat_with_guards(n, r, dtype, "sum")
                staging.ring(staging.StateView(st, CheckedComm(st.comm, ops)), buf, "sum", ops=ops,
                             seg_bytes=TINY)
            ref = allreduce(rank_data(n, r, dtype, "sum"), comm, op="sum", algorithm="native")
            assert_matches(buf, ref, dtype, f"mixed ring n={n} {dtype}")
            assert same_on_all_ranks(comm, np.asarray(buf))


@pytest.mark.mpi(min_size=2)
def test_staged_ring_pipelines_and_copies_the_minimum(comm, st):
    """Copies run ahead of the sends (segment k+1 is copied out before segment k is sent),
    every element leaves the device once, and only received data comes back."""
    r, p = comm.Get_rank(), comm.Get_size()
    n, seg = 4001, 64
    ops = FakeOps(seed=r)
    checked = CheckedComm(st.comm, ops)
    _, buf = _flat_with_guards(n, r, np.float32, "sum")
    staging.ring(staging.StateView(st, checked), buf, "sum", ops=ops, seg_bytes=seg)
    kinds = [k for k, _ in ops.timeline]
    first_send = kinds.index("send")
    assert kinds[:first_send].count("d2h") >= 2, f"no copy ahead of the first send: {kinds[:first_send + 1]}"
    lo, hi = chunk_bounds(n, p, r)
    flo, fhi = chunk_bounds(n, p, (r + 1) % p)
    item = buf.itemsize
    assert ops.stats["d2h"] == n * item
    assert ops.stats["h2d"] == (2 * n - (hi - lo) - (fhi - flo)) * item
    assert len(checked.sends) == len(checked.recvs) > 2 * (p - 1)
    rs_units = [u for u in ring.plan(n, p, r, seg // item) if u[0] <= p - 2]
    assert ops.stats["reduce"] == len(rs_units), "one device reduction per reduce-scatter segment"
    ref = allreduce(rank_data(n, r, np.float32, "sum"), comm, op="sum", algorithm="native")
    assert_matches(buf, ref, "float32", "pipelined")


def test_staging_streams_knob(monkeypatch):
    monkeypatch.delenv("MPITRAIN_STAGING_STREAMS", raising=False)
    assert staging.staging_streams() == staging.STREAMS == 2
    monkeypatch.setenv("MPITRAIN_STAGING_STREAMS", "1")
    assert staging.staging_streams() == 1
    monkeypatch.setenv("MPITRAIN_STAGING_STREAMS", "3")
    with pytest.raises(ValueError, match="MPITRAIN_STAGING_STREAMS='3': expected 1"):
        staging.staging_streams()


def test_fake_device_orders_streams_only_by_wait():
    """The checker itself: work on two streams touching the same memory needs a wait (or the
    host knowing the first is complete) between them."""
    ops = FakeOps(seed=1)
    s0, s1 = ops.stream(), ops.stream(1)
    dev, host = on_dev(np.arange(8.0)), ops.host_empty(np.float64, 8)
    ops.reduce("sum", dev, on_dev(np.ones(8)), s1)
    with pytest.raises(AssertionError, match="no wait orders them"):
        ops.copy_d2h(host, dev, s0)
    ops.wait(s0, ops.record(s1))
    ops.copy_d2h(host, dev, s0)
    ops.synchronize(ops.record(s0))  # runs the reduction first: s0 waited for it
    np.testing.assert_array_equal(host, np.arange(8.0) + 1)
    assert not ops.pending(), "synchronizing s0 completes what it waited for on s1"
    ops.copy_h2d(dev, host, s1)
    ops.synchronize(ops.record(s1))
    ops.copy_d2h(host, dev, s0)  # fine: the host knows the copy in is complete


@pytest.mark.mpi(min_size=2)
def test_staged_ring_orders_its_two_streams(comm, st):
    """Without the wait between the reduction (second stream) and the copy out (first stream)
    the fake device sees the race on every rank."""
    r = comm.Get_rank()
    ops = FakeOps(seed=r)
    races = []
    check = ops._check_streams

    def record_races(*args):
        try:
            check(*args)
        except AssertionError as e:
            races.append(str(e))

    ops._check_streams, ops.wait = record_races, lambda stream, event: None
    _, buf = _flat_with_guards(1001, r, np.float32, "sum")
    staging.ring(st, buf, "sum", ops=ops, seg_bytes=TINY, streams=2)
    assert races and "d2h on stream0" in races[0] and "reduce on stream1" in races[0], races[:1]


def _modelled_ring(comm, st, streams, wire_bw, n=1 << 15, seg=4096):
    """(busbw / d2h ceiling, result) of one staged ring on the timing model (copies at 1 byte per
    unit of time each way, the wire at ``wire_bw``, reductions at 20)."""
    r, p = comm.Get_rank(), comm.Get_size()
    timing = Timing(copy_bw=1.0, wire_bw=wire_bw, reduce_bw=20.0)
    ops = FakeOps(seed=r, lazy=False, timing=timing)
    tc = TimedComm(st.comm, timing)
    _, buf = _flat_with_guards(n, r, np.float32, "sum")
    staging.ring(staging.StateView(st, tc), buf, "sum", ops=ops, seg_bytes=seg, streams=streams)
    t = comm.allreduce(tc.finish(), op=MPI.MAX)
    busbw = 2 * (p - 1) / p * buf.nbytes / t
    return busbw / timing.copy_bw, np.asarray(buf).copy()  # the d2h ceiling: every rank copying n bytes alone


@pytest.mark.mpi(min_size=2)
def test_second_stream_lifts_the_copy_bound(comm, st):
    """issue 20, item 8, on the fake's timing model: with one stream a rank's D2H and H2D
    copies run one after the other, so ring busbw / d2h stays under (2(p-1)/p) / (1 + 2(p-1)/p)
    (0.5 at 2 ranks); a second stream for the copies in and the reductions overlaps them."""
    p = comm.Get_size()
    bound = (2 * (p - 1) / p) / (1 + 2 * (p - 1) / p)
    ratios = {}
    for wire_bw in (4.0, 1.0):
        for streams in (1, 2):
            ratios[wire_bw, streams], got = _modelled_ring(comm, st, streams, wire_bw)
            ref = allreduce(rank_data(got.size, comm.Get_rank(), np.float32, "sum"), comm, algorithm="native")
            assert_matches(got, ref, "float32", f"modelled ring streams={streams}")
    if comm.Get_rank() == 0:
        print(f"\n[timing model, {p} ranks] ring busbw / d2h ceiling (copy-bound limit with one stream "
              f"{bound:.2f}): " + ", ".join(f"wire {w:g}x PCIe, {s} stream(s): {v:.2f}"
                                          for (w, s), v in ratios.items()))
    for w in (4.0, 1.0):  # (a rank the OS holds back can only make the model's overlap smaller)
        assert ratios[w, 1] <= bound + 1e-9, ratios
        assert ratios[w, 2] >= 1.25 * ratios[w, 1], ratios
    assert ratios[4.0, 2] >= 0.75, ratios  # measured 0.92 / 0.82 / 0.87 at 2 / 3 / 4 ranks


@pytest.mark.mpi
@pytest.mark.parametrize("cuda_aware", [False, True])
@pytest.mark.parametrize("algorithm", ALGS)
def test_allreduce_dispatches_device_buffers(comm, st, monkeypatch, algorithm, cuda_aware):
    """mpitrain.allreduce on a (fake) device buffer: staged, or straight to MPI when CUDA-aware."""
    r, p = comm.Get_rank(), comm.Get_size()
    ops = FakeOps(seed=r)
    monkeypatch.setattr(staging, "ops_for", lambda buf: ops)
    monkeypatch.setattr(backend, "cuda_aware_mpi", lambda: cuda_aware)
    monkeypatch.setattr(ring, "SEGMENT_BYTES", TINY)
    for dtype in ("float16", "float64", "int32"):
        for op in ("sum", "avg", "max"):
            for n in (5, 100, 1001):
                ops.stats.update(d2h=0, h2d=0, sync=0)
                buf = on_dev(rank_data(n, r, dtype, op))
                out = allreduce(buf, comm, op=op, algorithm=algorithm)
                where = f"{algorithm} cuda_aware={cuda_aware} {op} n={n} {dtype}"
                assert out is buf and isinstance(out, FakeDev)
                assert not ops.pending(), where
                ref = allreduce(rank_data(n, r, dtype, op), comm, op=op, algorithm="native")
                assert_matches(buf, ref, dtype, where)
                assert same_on_all_ranks(comm, np.asarray(buf)), where
                if p > 1 and not cuda_aware:
                    assert ops.stats["d2h"] >= n * buf.itemsize, f"not staged: {where}"
                if p > 1 and cuda_aware:
                    assert ops.stats["d2h"] == ops.stats["h2d"] == 0, f"staged although CUDA-aware: {where}"
                    assert ops.stats["sync"] > 0, f"never synchronized before MPI: {where}"


def test_fake_device_catches_a_missing_synchronize():
    """The checker itself: MPI on memory with unfinished device work is refused."""
    ops = FakeOps(seed=1)
    ops.rng.random = lambda: 1.0  # never run anything early
    comm = CheckedComm(MPI.COMM_SELF, ops)
    s = ops.stream()
    dev = on_dev(np.arange(8.0))
    host = ops.host_empty(np.float64, 8)
    ops.copy_d2h(host, dev, s)
    assert np.isnan(host).all(), "the destination of an unfinished copy is garbage"
    with pytest.raises(AssertionError, match="unfinished device d2h"):
        comm.Isend(host, dest=0, tag=5)
    ops.synchronize(ops.record(s))
    np.testing.assert_array_equal(host, np.arange(8.0))
    got = ops.host_empty(np.float64, 8)
    req = comm.Irecv(got, source=0, tag=5)
    with pytest.raises(AssertionError, match="touches memory an MPI receive fills"):
        ops.copy_h2d(on_dev(np.zeros(8)), got, s)
    comm.Send(host, dest=0, tag=5)
    req.Wait()
    ops.copy_h2d(on_dev(np.zeros(8)), got, s)  # fine once the receive is complete
    with pytest.raises(AssertionError, match="without CUDA-aware"):
        comm.Isend(dev, dest=0, tag=6)


def test_fake_device_refuses_pageable_copies_and_wrong_sides():
    ops = FakeOps()
    with pytest.raises(AssertionError, match="not pinned"):
        ops.copy_d2h(np.zeros(4), on_dev(np.zeros(4)), ops.stream())
    with pytest.raises(AssertionError, match="wrong sides"):
        ops.copy_h2d(np.zeros(4), ops.host_empty(np.float64, 4), ops.stream())


# --------------------------------------------------------------------------- CPU: devices, detection


def _rows(spec, visible="0,1"):
    """spec: [(host, gpus, dev, ident)] -> select_device's allgathered rows."""
    return [{"host": h, "local": i, "gpus": g, "dev": d, "ident": ident, "visible": visible}
            for i, (h, g, d, ident) in enumerate(spec)]


def test_device_problem_messages():
    one_per_gpu = _rows([("a", 2, 0, "pci0"), ("a", 2, 1, "pci1"), ("b", 2, 0, "pci0"), ("b", 2, 1, "pci1")])
    assert backend.device_problem(one_per_gpu) is None
    crowded = _rows([("a", 2, 0, "pci0"), ("a", 2, 1, "pci1"), ("a", 2, 0, "pci0"), ("a", 2, 1, "pci1")])
    msg = backend.device_problem(crowded)
    assert "4 ranks on a but only 2 GPU(s)" in msg and "ranks 0, 2 would share GPU 0 (pci0)" in msg
    assert "--set train.share_gpu=true" in msg and "--ntasks-per-node=2" in msg
    assert backend.device_problem(crowded, share=True) is None
    # --gpus-per-task=1: every rank sees one GPU, index 0, but they are different GPUs
    bound = _rows([("a", 1, 0, "pci0"), ("a", 1, 0, "pci1"), ("a", 1, 0, "pci2")], visible="0")
    assert backend.device_problem(bound) is None
    # ... unless the binding failed and they all got the same one
    same = _rows([("a", 1, 0, "pci0"), ("a", 1, 0, "pci0")], visible="0")
    assert "ranks 0, 1 would share GPU 0" in backend.device_problem(same)
    none = _rows([("a", 1, 0, "pci0"), ("b", 0, -1, None), ("c", 0, -1, None)], visible="")
    msg = backend.device_problem(none, share=True)
    assert "no CUDA GPU visible to ranks 1, 2 on b, c" in msg and "CUDA_VISIBLE_DEVICES=" in msg


@pytest.fixture
def fake_gpus(monkeypatch):
    """select_device with ``k`` pretend GPUs: returns the list of devices made current."""
    used = []

    def setup(k, ident=lambda dev: f"pci{dev}"):
        monkeypatch.setattr(backend, "gpu_count", lambda: k)
        monkeypatch.setattr(backend, "_device_ident", ident)
        monkeypatch.setattr(backend, "_use_device", used.append)
        return used

    return setup


@pytest.mark.mpi
@pytest.mark.parametrize("gpus", [0, 1, 2, 4])
def test_select_device_is_collective_and_clear(comm, fake_gpus, gpus):
    r, p = comm.Get_rank(), comm.Get_size()
    used = fake_gpus(gpus)
    if gpus == 0:
        with pytest.raises(UserError, match="no CUDA GPU visible to rank"):
            backend.select_device(comm)
    elif p > gpus:
        with pytest.raises(UserError, match=rf"{p} ranks on \S+ but only {gpus} GPU\(s\)") as e:
            backend.select_device(comm)
        assert "train.share_gpu=true" in str(e.value)
        assert len(set(comm.allgather(str(e.value)))) == 1, "every rank reports the same problem"
        assert used == []
        assert backend.select_device(comm, share=True) == used[-1]
    else:
        dev = backend.select_device(comm)
        assert used == [dev]
        assert sorted(comm.allgather(dev)) == list(range(p)), "one GPU per rank"


@pytest.mark.mpi
def test_local_rank_trusts_the_launcher_only_when_consistent(comm, monkeypatch):
    r, p = comm.Get_rank(), comm.Get_size()
    idx, on_node = backend.local_rank(comm)
    assert on_node == p and sorted(comm.allgather(idx)) == list(range(p))  # one host here
    for var in backend.LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_LOCALID", str(p - 1 - r))  # a consistent launcher: believed
    assert backend.local_rank(comm) == (p - 1 - r, p)
    monkeypatch.setenv("SLURM_LOCALID", "0")  # mpirun inside sbatch: every rank inherits 0
    idx, _ = backend.local_rank(comm)
    assert sorted(comm.allgather(idx)) == list(range(p))


@pytest.fixture
def fresh_detection():
    backend.cuda_aware_info.cache_clear()
    yield
    backend.cuda_aware_info.cache_clear()


@pytest.mark.parametrize("value, expect", [("1", True), ("yes", True), ("ON", True), ("0", False), ("off", False)])
def test_cuda_aware_override(monkeypatch, fresh_detection, value, expect):
    monkeypatch.setenv("MPITRAIN_CUDA_AWARE", value)
    assert backend.cuda_aware_mpi() is expect
    assert "MPITRAIN_CUDA_AWARE" in backend.cuda_aware_info()[1]


def test_cuda_aware_detection_is_conservative(monkeypatch, fresh_detection):
    monkeypatch.delenv("MPITRAIN_CUDA_AWARE", raising=False)
    monkeypatch.setenv("MPITRAIN_CUDA_AWARE", "maybe")  # not 0/1: ignored, and said so
    aware, how = backend.cuda_aware_info()
    assert "ignored" in how
    lib = MPI.Get_library_version()
    if "MPICH" in lib and not HAVE_GPU:  # the pip MPICH wheel: no CUDA support compiled in
        assert aware is False and ("MPIX_" in how or "cannot tell" in how), how
    backend.cuda_aware_info.cache_clear()
    monkeypatch.delenv("MPITRAIN_CUDA_AWARE")
    monkeypatch.setenv("MPIR_CVAR_ENABLE_GPU", "0")
    assert backend.cuda_aware_info() == (False, "MPIR_CVAR_ENABLE_GPU=0 turns the MPI library's GPU support off")


@pytest.mark.parametrize("driver, package", [(None, None), (11080, None), (12000, "cupy-cuda12x[ctk]"),
                                             (12090, "cupy-cuda12x[ctk]"), (13000, "cupy-cuda13x[ctk]"),
                                             (13020, "cupy-cuda13x[ctk]")])
def test_cupy_package_follows_the_driver(driver, package):
    assert backend.cupy_package(driver) == package


def test_cuda_driver_version(monkeypatch):
    monkeypatch.setenv("MPITRAIN_CUDA_DRIVER", "12040")
    assert backend.cuda_driver_version() == 12040
    monkeypatch.setenv("MPITRAIN_CUDA_DRIVER", "none")
    assert backend.cuda_driver_version() is None
    monkeypatch.delenv("MPITRAIN_CUDA_DRIVER")
    v = backend.cuda_driver_version()  # the real libcuda, or None without a driver: never raises
    assert v is None or v >= 10000


class _CupyWithoutToolkit:
    """What cupy-cuda12x without [ctk] does on a driver-only machine: devices, but no kernels."""

    __version__ = "14.2.0"

    @staticmethod
    def arange(*a, **k):
        raise RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: cannot open shared "
                           "object file: No such file or directory")

    class ones:  # noqa: N801
        def __init__(self, *a, **k):
            pass

        def __matmul__(self, other):
            raise ImportError("libcublas.so.12: cannot open shared object file: No such file or directory")


def test_gpu_kernel_problem_names_what_is_missing(monkeypatch):
    if not HAVE_GPU:
        assert backend.gpu_kernel_problem() == WHY_NO_GPU  # no device: the same reason as everywhere
    monkeypatch.setattr(backend, "_cupy", lambda: _CupyWithoutToolkit)
    monkeypatch.setattr(backend, "gpu_unavailable_reason", lambda: "")
    monkeypatch.setenv("MPITRAIN_CUDA_DRIVER", "13000")
    msg = backend.gpu_kernel_problem()
    assert "CuPy 14.2.0 sees a GPU but cannot run on it" in msg
    assert "(NVRTC) failed: RuntimeError: CuPy failed to load libnvrtc.so.12" in msg
    assert "(cuBLAS) failed: ImportError: libcublas.so.12" in msg
    assert "pip install 'cupy-cuda13x[ctk]'" in msg


def test_loaded_mpi_library_is_found():
    paths = backend._loaded_mpi_libraries()
    assert paths, "no libmpi among the loaded shared objects"
    answer, how = backend._query_library(paths[0])
    assert answer in (True, False, None) and how


def test_is_device_and_to_numpy():
    assert not backend.is_device(np.zeros(3))
    d = on_dev(np.arange(3))
    assert backend.is_device(d)
    h = backend.to_numpy(d)
    assert type(h) is np.ndarray and (h == np.arange(3)).all()


def test_without_a_gpu_the_cupy_backend_is_a_clear_error():
    if HAVE_GPU:
        pytest.skip("a GPU is present")
    assert WHY_NO_GPU
    with pytest.raises(UserError, match="backend 'cupy'"):
        backend.get_xp("cupy")


def test_bench_with_cupy_and_no_gpu_fails_clearly(tmp_path):
    if HAVE_GPU:
        pytest.skip("a GPU is present")
    p = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-m", "mpitrain", "bench", "--backend", "cupy",
                        "--max", "64B"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "backend 'cupy'" in p.stderr and "Traceback" not in p.stderr, p.stderr


# --------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def cp():
    if not HAVE_GPU:
        pytest.fail(f"MPITRAIN_REQUIRE_GPU=1 but no GPU: {WHY_NO_GPU}")
    import cupy

    from mpitrain.runtime import get_comm

    backend.select_device(get_comm(), share=True)
    return cupy


@pytest.mark.gpu
@pytest.mark.mpi
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ALGS)
def test_gpu_allreduce_matches_native(comm, cp, monkeypatch, algorithm, dtype):
    """CuPy arrays through every algorithm and op, odd lengths, tiny ring segments: as NumPy
    native, bitwise identical on every rank, nothing written outside the buffer."""
    r, p = comm.Get_rank(), comm.Get_size()
    monkeypatch.setattr(ring, "SEGMENT_BYTES", TINY)
    paths = [False] + ([True] if backend.cuda_aware_mpi() else [])
    for direct in paths:
        monkeypatch.setattr(backend, "cuda_aware_mpi", lambda d=direct: d)
        for op in OPS:
            for n in LENGTHS + [0]:
                big = cp.full(n + 6, 99, dtype=dtype)
                buf = big[3:3 + n]
                buf[...] = cp.asarray(rank_data(n, r, dtype, op))
                out = allreduce(buf, comm, op=op, algorithm=algorithm)
                assert out is buf
                where = f"{algorithm} direct={direct} {op} n={n} {dtype} p={p}"
                ref = allreduce(rank_data(n, r, dtype, op), comm, op=op, algorithm="native")
                got = cp.asnumpy(big)
                assert_matches(got[3:3 + n], ref, dtype, where)
                assert (got[:3] == 99).all() and (got[3 + n:] == 99).all(), f"wrote outside: {where}"
                assert same_on_all_ranks(comm, got[3:3 + n]), f"ranks differ: {where}"


@pytest.mark.gpu
@pytest.mark.mpi
@needs_gpu
@pytest.mark.parametrize("op", ["sum", "avg"])
def test_gpu_large_buffers_default_segments(comm, cp, op):
    """A few MiB (many default-size segments, multi-dimensional): exact for integers-valued floats."""
    r, p = comm.Get_rank(), comm.Get_size()
    for algorithm in ALGS:
        x = cp.full((1031, 1537), r + 1, dtype=cp.float32)  # ~6 MiB, not divisible by p
        allreduce(x, comm, op=op, algorithm=algorithm)
        want = p * (p + 1) / 2 / (p if op == "avg" else 1)
        assert bool((x == cp.float32(want)).all()), f"{algorithm} {op}"


@pytest.mark.gpu
@pytest.mark.mpi
@needs_gpu
def test_gpu_waits_for_the_callers_stream(comm, cp):
    """The buffer is still being written by a kernel on the caller's (non-default) stream."""
    r, p = comm.Get_rank(), comm.Get_size()
    for algorithm in ALGS:
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            a = cp.arange(1 << 22, dtype=cp.float64)
            x = cp.sin(a) ** 2 + cp.cos(a) ** 2 + r  # a few kernels, still running
            allreduce(x, comm, algorithm=algorithm)
            y = x - (p + p * (p - 1) / 2)
        s.synchronize()
        assert float(cp.abs(y).max()) < 1e-9, algorithm


@pytest.mark.gpu
@needs_gpu
def test_gpu_model_and_optimizers_match_numpy(cp):
    from mpitrain.models import MLP
    from mpitrain.optim import clip_by_global_norm, make_optimizer

    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((64, 20)), rng.integers(0, 5, 64)
    for name in ("sgd", "adam"):
        m_np = MLP(20, [32, 16], 5, xp=np, dtype=np.float64, seed=1)
        m_cp = MLP(20, [32, 16], 5, xp=cp, dtype=np.float64, seed=1)
        assert (cp.asnumpy(m_cp.params) == m_np.params).all(), "same initial parameters"
        o_np = make_optimizer(name, m_np.params, lr=0.05, momentum=0.9, weight_decay=1e-3)
        o_cp = make_optimizer(name, m_cp.params, lr=0.05, momentum=0.9, weight_decay=1e-3)
        for _ in range(5):
            l1, c1 = m_np.loss_and_grad((X, Y))
            l2, c2 = m_cp.loss_and_grad((cp.asarray(X), cp.asarray(Y)))
            assert abs(l1 - l2) < 1e-9 and c1 == c2
            np.testing.assert_allclose(cp.asnumpy(m_cp.grads), m_np.grads, rtol=1e-9, atol=1e-12)
            n1, n2 = clip_by_global_norm(m_np.grads, 0.5), clip_by_global_norm(m_cp.grads, 0.5)
            assert abs(n1 - n2) < 1e-9
            assert bool(cp.isfinite(m_cp.grads).all())
            o_np.step(m_np.grads)
            o_cp.step(m_cp.grads)
        np.testing.assert_allclose(cp.asnumpy(m_cp.params), m_np.params, rtol=1e-8, atol=1e-10)
        st = o_cp.state_dict()
        assert all(isinstance(v, np.ndarray) for k, v in st.items() if k not in ("kind", "step"))


def _train(tmp_path, backend_name, extra=(), n=2):
    out = tmp_path / f"{backend_name}.json"
    cmd = [MPIRUN, "-n", str(n), sys.executable, "-m", "mpitrain", "train",
           "--set", f"data.path={tmp_path / 'digits'}", "--set", "data.dataset=digits",
           "--set", f"checkpoint.dir={tmp_path / ('ckpt-' + backend_name)}",
           "--set", "train.epochs=5", "--set", f"train.backend={backend_name}", *extra,
           "--metrics-out", str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    return p, (json.loads(out.read_text()) if p.returncode == 0 else None)


@pytest.mark.gpu
@needs_gpu
def test_gpu_training_two_ranks_sharing_one_gpu(cp, tmp_path):
    p, m = _train(tmp_path, "cupy", ["--set", "train.share_gpu=true"])
    assert p.returncode == 0, p.stdout + p.stderr
    print(f"cupy, 2 ranks on one GPU: test accuracy {m['test_accuracy']:.4f}, {m['samples_per_s']:.0f} samples/s")
    assert m["backend"] == "cupy" and m["ranks"] == 2 and m["epochs"] == 5
    assert m["test_accuracy"] >= 0.90, m
    p2, m2 = _train(tmp_path, "numpy")
    assert p2.returncode == 0, p2.stdout + p2.stderr
    assert abs(m["test_accuracy"] - m2["test_accuracy"]) <= 0.03, (m, m2)


@pytest.mark.gpu
@needs_gpu
def test_gpu_two_ranks_on_one_gpu_without_sharing_is_an_error(cp, tmp_path):
    if backend.gpu_count() >= 2:
        pytest.skip("this host has a GPU per rank")
    p, _ = _train(tmp_path, "cupy")
    assert p.returncode != 0
    assert "share_gpu=true" in p.stderr and "Traceback" not in p.stderr, p.stderr


@pytest.mark.gpu
@needs_gpu
def test_gpu_bench_rows(cp, tmp_path):
    out = tmp_path / "b.json"
    p = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-m", "mpitrain", "bench", "--backend", "cupy",
                        "--algorithms", "ring,native", "--max", "1MiB", "--iters", "3", "--json", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(out.read_text())["rows"]
    algs = {r["algorithm"] for r in rows}
    assert {"ring", "native", "memcpy", "d2h"} <= algs, algs
    assert all(r["wrong"] == 0 for r in rows)
    assert "busbw / d2h ceiling" in p.stdout
