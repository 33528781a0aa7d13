"""Gradient compression: average the ranks' gradients with fewer bytes on the wire.

A ``Compressor`` is made once per job for one gradient buffer (its length ``n``
and its tensors, e.g. each layer's W and b) and keeps the scheme's state, the
error-feedback residual. ``allreduce_avg(grads, comm)`` replaces ``grads`` in
place by the average of the ranks' *compressed* contributions and returns the
bytes this rank handed to MPI for others (its own block is never counted).
Every rank decodes the same bytes with the same code, adding the ranks'
contributions in rank order 0, 1, ..., p-1, so the result is bitwise identical
everywhere and the replicas never diverge. All traffic runs on the library's
private communicator (``state_for(comm).comm``, a Dup), through MPI collectives
(no tags at all). p = 1: the compression is still applied (a 1-rank run shows
its effect on accuracy) but nothing is sent: 0 bytes.

fp16  -- half precision on the wire, reduced in float32
------------------------------------------------------

    rank r: g_r --cast--> h_r (float16), cut into p chunks (partition.py)

    reduce-scatter (Alltoallv)            all-gather (Allgatherv)
        r0: |a0|b0|c0|                      chunk k: s_k = f16( (f32 a0 + f32 a1 + ...) / p )
        r1: |a1|b1|c1|  -- chunk k -->      owner k sends s_k (float16) to every rank;
        r2: |a2|b2|c2|     to rank k        every rank casts the n halves back to g's dtype

    on the wire:  Alltoallv: the p-1 float16 chunks this rank does not own
                  Allgatherv: its own reduced float16 chunk, to p-1 ranks
    bytes/rank:   2(n - c_r) + 2(p-1)·c_r  (c_r = its chunk), on average 2(p-1)/p · n · 2
                  = half of a float32 ring all-reduce
    cost:         2·alpha·(p-1) + 2(p-1)/p · n·2·beta + (p-1)/p · n·gamma (float32 adds)

  Range: |g| above float16's largest finite value (65504) is *clamped* to
  ±65504 (counted in ``clamped``), so one large gradient does not turn the
  whole average into inf. inf and NaN stay inf and NaN, so the trainer still
  sees a non-finite gradient. Values below ~6e-8 become 0 (float16 underflow).
  No error feedback (``error_feedback`` applies to topk and sign).

topk  -- the k largest |g| as (index, value) pairs, with error feedback
----------------------------------------------------------------------

    acc = g + residual                       k = max(1, ceil(ratio · n))
    |acc|:  . . # . . . # . # . . . #        keep the k largest magnitudes
    sent:   idx = [2, 6, 8, 13], val = acc[idx]
    residual = acc with the sent entries set to 0   (without EF: 0)

    Allgather of one byte message per rank:  | values (k · itemsize) | indices (k · 4 or 8) |
    every rank: out = 0; for r in 0..p-1: out[idx_r] += val_r;  out /= p

    indices are int32 when n < 2**31, else int64; values in g's dtype; the
    larger items come first so neither array is misaligned (no padding).
    bytes/rank:   (p-1) · k · (index bytes + value bytes)   (float32: (p-1)·8k)
    cost:         ~log2(p)·alpha + (p-1)·k·(4+4)·beta, decode p·k scattered adds
    Ties at the k-th magnitude go to the lowest indices; NaN counts as the
    largest (it is sent, so the trainer sees it).

sign  -- 1 bit per element and one scale per block (scaled sign, EF-signSGD)
--------------------------------------------------------------------------

    acc = g + residual;  each tensor cut into blocks of `block` elements (comm.sign_block),
    its last block shorter; block = 0: one block per tensor.  per block b:
        scale_b = sqrt(mean(acc_b²))            ("rms", the default; "mean": mean|acc_b|)

    acc:    0.3 -0.1  0.0  -0.6  0.2 | 2.0 -1.0      two tensors, block = 3
    blocks: [   b0         ][ b1    ]| [  b2   ]     tensor 0: 3 + a tail of 2; tensor 1: 2
    bits:    1    0    1     0    1  |  1    0       sign(0) -> + (1 bit, no zero)
    sent:   .18 -.18  .18 -.45  .45  | 1.58 -1.58    scale_b · (2·bit - 1)
    residual = acc - sent                           (without EF: 0)

    Allgather of one byte message per rank:  | scales (B · float32) | np.packbits(bits) |
    every rank: out = 0; for r in 0..p-1: out += scale_r[block] · (2·bits_r - 1);  out /= p

    bytes/rank:   (p-1) · (ceil(n/8) + 4·B)        (B = number of blocks; block = 0: B = T tensors)
    cost:         ~log2(p)·alpha + (p-1)·(n/8 + 4B)·beta, decode p·n adds

  Why rms, not mean|acc|: mean|acc| is the scale that minimises |acc - sent| for one step,
  but the sent block then has norm sqrt(n)·mean|acc| <= |acc| -- far smaller when gradients
  are heavy-tailed (a few large entries, many near 0), which they are. Error feedback then keeps
  the difference and releases it many steps late, and momentum 0.9 turns the late mass into
  overshoot. On the default digits job (3 ranks, lr 0.1, momentum 0.9) mean|acc| gave test
  accuracy 0.73-0.79 (the residual held ~4.6x the gradient's norm); blocks alone do not fix it
  (0.69-0.94 with blocks of 1,024 down to 32 elements, 0.81-0.96 with 16 at 3x the bytes). rms
  sends each block with exactly acc's norm, so only the direction error stays behind (residual
  ~2.5x the gradient): 0.955-0.978 at every block size measured (3 ranks, seeds 0-2 or 0-4) and
  at 1, 2 and 4 ranks; without error feedback 0.96-0.97.
  It cannot run away: an element's new residual is at most max(|acc_i| - scale, scale), and
  scale <= max|acc| of its block. Blocks add 4 bytes per scale and did not add accuracy on this
  job, nor on jobs/synthetic.toml (4 epochs: per tensor 0.33, blocks of 256 0.29, ring 0.54), so
  the default is one scale per tensor. acc² is computed in the gradient's dtype; where it
  overflows or underflows (|acc| > ~1.8e19 or < ~1e-23 in float32) the block is rescaled by its max.
  docs/strategies.md has the table (benchmarks/sign_blocks.py).

Error feedback: what a rank did not send this step (``residual``) is added to
its next gradient, so nothing is lost, only delayed: over any number of steps
sum(sent) + residual == sum(gradients) (exactly for topk up to the rounding of
g + residual). The residual is per rank and not checkpointed: a resumed run
starts from a zero residual. When the averaged gradient is non-finite (the
trainer then fails or skips the step) the residual is reset to zero so that
one bad step does not poison the following ones.

Byte counts are the logical volume: each byte of this rank's message times the
number of ranks that receive it. An MPI library's allgather may forward other
ranks' blocks as well (a ring does), but summed over ranks it is the same.

CuPy: encoding and decoding use the gradient's array module; the messages
travel through host memory (small for topk and sign).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from . import check, state_for
from .partition import chunk_bounds
from .. import backend
from ..runtime import get_comm

SCHEMES = ("fp16", "topk", "sign")
FP16_MAX = float(np.finfo(np.float16).max)  # 65504


def _segments(n: int, segments) -> list[tuple[int, int]]:
    """Validated tensor ranges: contiguous, in order, covering [0, n). None: one tensor."""
    if segments is None:
        return [(0, n)] if n else []
    segs = [(int(lo), int(hi)) for lo, hi in segments]
    pos = 0
    for lo, hi in segs:
        if lo != pos or hi < lo:
            raise ValueError(f"compress: tensor segments must cover [0, {n}) in order without gaps or "
                             f"overlaps; got {segs}")
        pos = hi
    if pos != n:
        raise ValueError(f"compress: tensor segments cover [0, {pos}) but the gradient has {n} elements")
    return [s for s in segs if s[1] > s[0]]


class Compressor:
    """One scheme's state for one gradient buffer of ``n`` elements of ``dtype``."""

    name = "?"

    def __init__(self, n: int, segments=None, *, error_feedback: bool = True, dtype=np.float32):
        if n < 0:
            raise ValueError(f"compress: negative length {n}")
        self.n = int(n)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise ValueError(f"compress: gradients must be floating point, got {self.dtype}")
        self.segments = _segments(self.n, segments)
        self.error_feedback = bool(error_feedback)
        self.residual = None  # the error-feedback memory, made on first use in the gradient's module
        self._checked = []  # the library states (one per communicator) where the ranks agreed; held, so an id
                            # is never reused (a different answer on different ranks would skip a collective)

    # ---------------------------------------------------------------- local
    def _check_grads(self, grads):
        if grads.ndim != 1 or grads.size != self.n or grads.dtype != self.dtype:
            raise ValueError(f"compress[{self.name}]: expected a 1-D {self.dtype} array of {self.n} elements, "
                             f"got shape {grads.shape} {grads.dtype}")

    def _acc(self, grads):
        """g + residual (a new array; the gradient is not touched)."""
        if not self.error_feedback:
            return grads.copy()
        xp = backend.array_module(grads)
        if self.residual is None:
            self.residual = xp.zeros(self.n, dtype=self.dtype)
        return grads + self.residual

    def signature(self) -> str:
        """What every rank must agree on (scheme, length, dtype, tensors, parameters)."""
        return hashlib.sha1(repr((self.name, self.n, self.dtype.str, self.segments, self._params())).encode()
                            ).hexdigest()

    def _params(self):
        return ()

    def _params_text(self) -> str:
        p = self._params()
        if p and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in p):
            return ", ".join(f"{k}={v!r}" for k, v in p)
        return repr(p)

    def _agree(self, st):
        if any(s is st for s in self._checked):
            return
        sigs = st.comm.allgather(self.signature()) if st.size > 1 else [self.signature()]
        if len(set(sigs)) > 1:
            raise ValueError(f"compress[{self.name}]: the ranks built different compressors (length, dtype, "
                             f"tensors or parameters differ; this rank: n={self.n}, {self.dtype}, "
                             f"{len(self.segments)} tensors, {self._params_text()}); every rank must compress the "
                             "same gradient buffer with the same settings")
        self._checked.append(st)

    def _after(self, grads):
        """A non-finite average means a bad step: forget the residual so it does not carry over."""
        if self.residual is not None and not bool(backend.array_module(grads).isfinite(grads).all()):
            self.residual[...] = 0

    def allreduce_avg(self, grads, comm=None) -> int:
        """Replace ``grads`` by the average of every rank's compressed gradient; return bytes sent.

        Checked on every rank before anything is sent (collectives.check: the same length and
        dtype everywhere, a writable, aligned, contiguous array, no other thread's call on the
        communicator in progress), so a bad call raises ValueError on every rank.
        """
        st = state_for(comm if comm is not None else get_comm())
        what = f"compress[{self.name}]"
        call = st.calls.enter(what)
        try:
            self._agree(st)
            check(st, grads, "avg", "auto", call=call, what=what)
            flat = grads.reshape(-1)  # (a view: contiguous on every rank, checked)
            self._check_grads(flat)  # same verdict everywhere: same n and dtype, same compressor
            sent = self._allreduce(st, flat)
            st.calls.post_check(st, call, what)
        finally:
            st.calls.leave(call)
        return sent

    def _allreduce(self, st, grads) -> int:
        raise NotImplementedError


class _Gathered(Compressor):
    """Schemes whose message has the same size on every rank: one Allgather of bytes, decode in rank order."""

    def message_nbytes(self) -> int:
        raise NotImplementedError

    def encode(self, grads):
        """This rank's message (1-D uint8, in ``grads``' module); updates the residual."""
        raise NotImplementedError

    def decode_add(self, msg, out) -> None:
        """``out += `` the dense gradient a message stands for."""
        raise NotImplementedError

    def decode(self, msg):
        xp = backend.array_module(msg)
        out = xp.zeros(self.n, dtype=self.dtype)
        self.decode_add(msg, out)
        return out

    def _allreduce(self, st, grads) -> int:
        xp = backend.array_module(grads)
        msg = self.encode(grads)
        p = st.size
        if p == 1:
            rows = [msg]
            sent = 0
        else:
            host = np.ascontiguousarray(backend.to_numpy(msg))
            gathered = np.empty((p, host.size), dtype=np.uint8)
            st.comm.Allgather(host, gathered)
            sent = (p - 1) * host.nbytes
            rows = [xp.asarray(gathered[r]) for r in range(p)]
        grads[...] = 0
        for row in rows:  # rank order, the same on every rank
            self.decode_add(row, grads)
        if p > 1:
            grads /= self.dtype.type(p)
        self._after(grads)
        return sent


class TopK(_Gathered):
    """The ``k = max(1, ceil(ratio·n))`` largest magnitudes of grad + residual, as (index, value) pairs."""

    name = "topk"

    def __init__(self, n: int, segments=None, *, ratio: float = 0.01, error_feedback: bool = True,
                 dtype=np.float32):
        super().__init__(n, segments, error_feedback=error_feedback, dtype=dtype)
        if not 0 < ratio <= 1:
            raise ValueError(f"compress[topk]: ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)
        self.k = min(self.n, max(1, math.ceil(self.ratio * self.n))) if self.n else 0
        self.index_dtype = np.dtype(np.int32 if self.n < 2**31 else np.int64)
        # larger items first: both arrays stay aligned in the byte message
        self._values_first = self.dtype.itemsize >= self.index_dtype.itemsize

    def _params(self):
        return (self.ratio, self.k)

    def message_nbytes(self) -> int:
        return self.k * (self.dtype.itemsize + self.index_dtype.itemsize)

    def _views(self, msg):
        kv, ki = self.k * self.dtype.itemsize, self.k * self.index_dtype.itemsize
        if self._values_first:
            return msg[kv:kv + ki].view(self.index_dtype), msg[:kv].view(self.dtype)
        return msg[:ki].view(self.index_dtype), msg[ki:ki + kv].view(self.dtype)

    def select(self, acc):
        """Indices (sorted) of the k largest |acc|; ties at the k-th go to the lowest indices; NaN is largest."""
        xp = backend.array_module(acc)
        n, k = self.n, self.k
        if k >= n:
            return xp.arange(n, dtype=self.index_dtype)
        mag = xp.abs(acc)
        mag[xp.isnan(mag)] = xp.inf
        thr = xp.partition(mag, n - k)[n - k]  # the k-th largest magnitude
        above = xp.flatnonzero(mag > thr)
        tied = xp.flatnonzero(mag == thr)[:k - above.size]
        return xp.sort(xp.concatenate([above, tied])).astype(self.index_dtype, copy=False)

    def encode(self, grads):
        xp = backend.array_module(grads)
        acc = self._acc(grads)
        msg = xp.empty(self.message_nbytes(), dtype=np.uint8)
        if self.k == 0:
            return msg
        idx_out, val_out = self._views(msg)
        idx = self.select(acc)
        idx_out[...] = idx
        val_out[...] = acc[idx]
        if self.error_feedback:
            acc[idx] = 0
            self.residual = acc  # exactly acc - sent: the sent entries are acc's own values
        return msg

    def decode_add(self, msg, out) -> None:
        if self.k == 0:
            return
        idx, val = self._views(msg)
        out[idx] += val  # the indices of one message are distinct


SIGN_SCALES = ("rms", "mean")


class Sign(_Gathered):
    """1 bit per element (sign, 0 -> +) and one float32 scale per block of ``acc = grad + residual``.

    ``block`` (elements; ``comm.sign_block``): each tensor is cut into blocks of ``block``
    elements, its last block shorter; 0 = one block per tensor. ``scale``: ``"rms"``
    (sqrt(mean(acc²)) of the block: the sent block has the norm of ``acc``) or ``"mean"``
    (mean|acc|: the least-squares scale of one step, which holds mass back; see above).
    """

    name = "sign"

    def __init__(self, n: int, segments=None, *, block: int = 0, scale: str = "rms", error_feedback: bool = True,
                 dtype=np.float32):
        super().__init__(n, segments, error_feedback=error_feedback, dtype=dtype)
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 0:
            raise ValueError(f"compress[sign]: block must be an integer >= 0 (0 = one scale per tensor), "
                             f"got {block!r}")
        if scale not in SIGN_SCALES:
            raise ValueError(f"compress[sign]: unknown scale {scale!r}; known: {', '.join(SIGN_SCALES)}")
        self.block = int(block)
        self.scale = scale
        self.tensors = len(self.segments)
        # per tensor: (lo, hi, b, full): `full` whole blocks of b elements from lo, then a tail up to hi
        self._plan = []
        blocks = []
        for lo, hi in self.segments:
            b = self.block if 0 < self.block < hi - lo else hi - lo
            full = (hi - lo) // b
            self._plan.append((lo, hi, b, full))
            blocks += [(s, s + b) for s in range(lo, lo + full * b, b)]
            if lo + full * b < hi:
                blocks.append((lo + full * b, hi))
        self.blocks = blocks  # (lo, hi) of every scale, in buffer order
        self.nblocks = len(blocks)
        self.packed_nbytes = -(-self.n // 8)
        self._owner = {}  # per element: the index of its block (to expand the scales), made once per module

    def _params(self):
        return (("block", self.block), ("scale", self.scale))

    def message_nbytes(self) -> int:
        return 4 * self.nblocks + self.packed_nbytes

    def _block_of(self, xp):
        t = self._owner.get(xp.__name__)
        if t is None:
            sizes = np.array([hi - lo for lo, hi in self.blocks], dtype=np.int64)
            index = np.int32 if self.nblocks < 2**31 else np.int64
            t = xp.asarray(np.repeat(np.arange(self.nblocks, dtype=index), sizes))
            self._owner[xp.__name__] = t
        return t

    def _views(self, msg):
        return msg[:4 * self.nblocks].view(np.float32), msg[4 * self.nblocks:]

    def values(self, scales, bits):
        """The dense values a message stands for, in the gradient dtype: scale_b · (+1 | -1)."""
        xp = backend.array_module(bits)
        signs = xp.unpackbits(bits)[:self.n].astype(self.dtype) * 2 - 1
        return signs * scales.astype(self.dtype)[self._block_of(xp)]

    def _per_block(self, x, reduce):
        """``reduce`` (mean or max) of every block of ``x``: each tensor's whole blocks in one call, then its tail."""
        xp = backend.array_module(x)
        parts = []
        for lo, hi, b, full in self._plan:
            if full:
                parts.append(reduce(x[lo:lo + full * b].reshape(full, b), axis=1))
            if lo + full * b < hi:
                parts.append(reduce(x[lo + full * b:hi], keepdims=True))
        return xp.concatenate(parts) if parts else xp.zeros(0, dtype=x.dtype)

    def block_scales(self, acc):
        """The scale of every block, in ``acc``'s dtype: sqrt(mean(acc²)) ("rms") or mean|acc| ("mean")."""
        xp = backend.array_module(acc)
        mag = xp.abs(acc)
        if self.scale == "mean":
            return self._per_block(mag, xp.mean)
        with np.errstate(over="ignore", under="ignore"):
            s = xp.sqrt(self._per_block(mag * mag, xp.mean))
        # acc² overflows above ~1.8e19 (float32) and underflows below ~1e-23: there, rescale by the block's max
        ok = xp.isfinite(s) & (s > 0)
        if not bool(ok.all()):
            top = self._per_block(mag, xp.max)
            fix = ~ok & xp.isfinite(top) & (top > 0)  # an inf or NaN in the block keeps its non-finite scale
            if bool(fix.any()):
                safe = xp.where(top > 0, top, 1).astype(acc.dtype)
                with np.errstate(invalid="ignore"):
                    ratio = mag / safe[self._block_of(xp)]
                    s = xp.where(fix, top * xp.sqrt(self._per_block(ratio * ratio, xp.mean)), s)
        return s

    def encode(self, grads):
        xp = backend.array_module(grads)
        acc = self._acc(grads)
        msg = xp.empty(self.message_nbytes(), dtype=np.uint8)
        if self.n == 0:
            return msg
        scales, bits = self._views(msg)
        with np.errstate(over="ignore"):
            scales[...] = self.block_scales(acc)  # in the gradient's dtype, then rounded to float32 for the wire
        bits[...] = xp.packbits(acc >= 0)  # sign(0) -> +; NaN -> 0 (its scale is NaN anyway)
        if self.error_feedback:
            acc -= self.values(scales, bits)  # what the others decode, exactly
            self.residual = acc
        return msg

    def decode_add(self, msg, out) -> None:
        if self.n == 0:
            return
        scales, bits = self._views(msg)
        out += self.values(scales, bits)


class FP16(Compressor):
    """float16 on the wire: reduce-scatter by Alltoallv, float32 sums in rank order, Allgatherv."""

    name = "fp16"

    def __init__(self, n: int, segments=None, *, error_feedback: bool = False, dtype=np.float32):
        super().__init__(n, segments, error_feedback=False, dtype=dtype)  # no error feedback (see above)
        self.clamped = 0  # elements clamped to ±65504 so far, on this rank

    def encode(self, grads):
        """grads as float16, values beyond ±65504 clamped (inf and NaN kept)."""
        xp = backend.array_module(grads)
        with np.errstate(over="ignore"):
            h = grads.astype(np.float16)
        self.clamped += _clamp(xp, h, grads)
        return h

    def _allreduce(self, st, grads) -> int:
        xp = backend.array_module(grads)
        h = self.encode(grads)
        p, r, n = st.size, st.rank, self.n
        if p == 1:
            grads[...] = h.astype(self.dtype)  # the round trip a 1-rank job pays for the compression
            return 0
        host = np.ascontiguousarray(backend.to_numpy(h)).view(np.uint16)  # MPI has no standard float16
        bounds = [chunk_bounds(n, p, k) for k in range(p)]
        counts = np.array([hi - lo for lo, hi in bounds], dtype=np.int64)
        displs = np.array([lo for lo, _ in bounds], dtype=np.int64)
        mine = int(counts[r])
        # reduce-scatter: chunk k of every rank goes to rank k
        recv = np.empty((p, max(mine, 1)), dtype=np.uint16)
        st.comm.Alltoallv([host, (counts, displs)],
                          [recv, (np.full(p, mine), np.arange(p) * recv.shape[1])])
        total = recv[0, :mine].view(np.float16).astype(np.float32)
        for k in range(1, p):  # rank order
            total += recv[k, :mine].view(np.float16)
        total /= np.float32(p)
        with np.errstate(over="ignore"):
            chunk = total.astype(np.float16)  # an average of clamped values stays in range
        # all-gather the reduced float16 chunks
        out = np.empty(max(n, 1), dtype=np.uint16)
        st.comm.Allgatherv(chunk.view(np.uint16), [out, (counts, displs)])
        grads[...] = xp.asarray(out[:n].view(np.float16)).astype(self.dtype)
        return 2 * (n - mine) + 2 * (p - 1) * mine


def _clamp(xp, h, src) -> int:
    """Set the float16 overflows of finite ``src`` values to ±FP16_MAX; return how many there were."""
    if bool(xp.isfinite(h).all()):
        return 0
    over = xp.isinf(h) & xp.isfinite(src)
    count = int(over.sum())
    if count:
        h[over] = xp.where(src[over] > 0, FP16_MAX, -FP16_MAX).astype(np.float16)
    return count


def make(scheme: str, n: int, segments=None, *, topk_ratio: float = 0.01, sign_block: int = 0,
         sign_scale: str = "rms", error_feedback: bool = True, dtype=np.float32) -> Compressor:
    """The compressor for ``scheme`` (fp16 | topk | sign) of an ``n``-element gradient made of ``segments``."""
    if scheme == "fp16":
        return FP16(n, segments, dtype=dtype)
    if scheme == "topk":
        return TopK(n, segments, ratio=topk_ratio, error_feedback=error_feedback, dtype=dtype)
    if scheme == "sign":
        return Sign(n, segments, block=sign_block, scale=sign_scale, error_feedback=error_feedback, dtype=dtype)
    raise ValueError(f"unknown compression {scheme!r}; known: {', '.join(SCHEMES)}")
