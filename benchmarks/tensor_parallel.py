#!/usr/bin/env python3
"""Tensor parallelism measured: step time at tp = ranks against one rank, and its all-reduces against
the cost model, in one run.

    mpirun -n 2 python benchmarks/tensor_parallel.py [--layers 4 --embd 512 --heads 8 --ctx 256 --batch 4]
                                                     [--steps 3] [--json F]

  1. rank 0 alone: the whole GPT's forward + backward on one batch (the other ranks wait quietly): tp = 1;
  2. every rank: the same batch through its tp slice, the f/g all-reduces on the project's ring over all
     ranks, each timed: the step, the exposed all-reduce time, the bytes;
  3. the cost model, fitted here and now: the ring all-reduce timed alone at n/8, n/4, n/2 and 2n
     (n = B·T·C·4 bytes) and t = a + b·n fitted to it predicts each of the step's 4·L all-reduces of n;
     the wire floor beside it: one-way ping-pong -> (alpha, beta), np.add -> gamma in the ring's
     2(p-1)·s·alpha + 2(p-1)/p·n·beta + (p-1)/p·n·gamma.
Speed-up against the ideal p (compute split p ways, all-reduces free); bytes per step against 4·L·B·T·C·4
(payload: 2 all-reduces forward, 2 backward per block), times 2(p-1)/p on the wire per rank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from mpi4py import MPI

from mpitrain.collectives import allreduce
from mpitrain.models.gpt import GPT
from mpitrain.models.gpt_shard import TP
from mpitrain.perf.fit import fit_alpha_beta, fit_gamma
from mpitrain.perf.formulas import ring_segments, ring_time
from mpitrain.perf.measure import measure_pingpong, measure_reduce
from mpitrain.runtime import get_comm, log0


_FLUSH = None


def _ring_alone(comm, nbytes, reps=15) -> float:
    """Median seconds of the project's ring all-reduce of ``nbytes`` float32 alone, each after a barrier and
    after 32 MiB of other writes (in a step the matmuls between all-reduces leave the caches as cold)."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = np.zeros(8 << 20, np.float32)
    buf = np.ones(nbytes // 4, np.float32)
    ts = []
    for _ in range(reps):
        _FLUSH += 1.0
        comm.Barrier()
        t0 = time.perf_counter()
        allreduce(buf, comm, op="sum", algorithm="ring")
        ts.append(time.perf_counter() - t0)
        buf[...] = 1
    return comm.allreduce(statistics.median(ts), op=MPI.MAX)


def _sequence_slot(comm, reduce, C):
    """The TP slot with sequence parallelism: rows, reduce-scatter and all-gather on the ring (as a run's)."""
    from mpitrain.collectives import allgather, owned_chunk, reduce_scatter

    p, r = comm.Get_size(), comm.Get_rank()

    def rows(N):
        lo, hi = owned_chunk(N * C, p, r)
        return lo // C, hi // C

    def rs(a):
        return reduce_scatter(a.reshape(-1), comm, op="sum", algorithm="ring").reshape(-1, C).copy()

    def ag(a_s, N):
        whole = np.empty((N, C), a_s.dtype)
        lo, hi = rows(N)
        whole[lo:hi] = a_s
        return allgather(whole.reshape(-1), comm, algorithm="ring").reshape(N, C)

    return TP(p, r, reduce, True, rows, rs, ag)


def _activation_bytes(model, tok) -> int:
    """Bytes of what backward keeps for one batch (every block's caches and the head's)."""
    from mpitrain.parallel.pipeline import _nbytes

    _, ctx = model.stage_forward(tok[:, :-1], tok[:, 1:])
    return _nbytes(ctx)


def _step_time(model, tok, steps):
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        model.loss_and_grad((tok,))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--embd", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up); medians")
    ap.add_argument("--json", metavar="F")
    args = ap.parse_args(argv)
    comm = get_comm()
    p, r = comm.Get_size(), comm.Get_rank()
    kw = dict(n_layer=args.layers, n_head=args.heads, n_embd=args.embd, block_size=args.ctx, vocab_size=256, seed=0)
    tok = np.random.default_rng(0).integers(0, 256, (args.batch, args.ctx + 1))
    whole = _step_time(GPT(**kw), tok, args.steps) if r == 0 else None
    comm.Barrier()
    whole = comm.bcast(whole, root=0)

    spent, waited, calls, payload = [0.0], [0.0], [0], [0]

    def reduce(a):  # a barrier first splits the exposed time: waiting for the slower rank, then the transfer
        t0 = time.perf_counter()
        comm.Barrier()
        t1 = time.perf_counter()
        allreduce(a, comm, op="sum", algorithm="ring")
        waited[0] += t1 - t0
        spent[0] += time.perf_counter() - t1
        calls[0] += 1
        payload[0] += a.nbytes
        return a

    part = GPT(**kw, tp=TP(p, r, reduce))
    part.loss_and_grad((tok,))  # warm-up (the first all-reduce sets up its scratch: tens of ms)
    spent[0] = waited[0] = calls[0] = payload[0] = 0
    comm.Barrier()
    step = _step_time(part, tok, args.steps - 1)
    per_step = args.steps
    comm_s, ncalls, nbytes = spent[0] / per_step, calls[0] // per_step, payload[0] // per_step
    wait_s = waited[0] / per_step
    step, comm_s = comm.allreduce(step, op=MPI.MAX), comm.allreduce(comm_s, op=MPI.MAX)
    wait_s = comm.allreduce(wait_s, op=MPI.MAX)

    plain_act = _activation_bytes(part, tok)
    seq = GPT(**kw, tp=_sequence_slot(comm, lambda a: allreduce(a, comm, op="sum", algorithm="ring"), args.embd))
    seq_act = _activation_bytes(seq, tok)
    seq_step = comm.allreduce(_step_time(seq, tok, args.steps), op=MPI.MAX)
    whole_act = _activation_bytes(GPT(**kw), tok) if r == 0 else None
    whole_act = comm.bcast(whole_act, root=0)

    n = args.batch * args.ctx * args.embd * 4
    sizes = [n // 16, n // 4, n]
    alpha, beta = fit_alpha_beta(sizes, measure_pingpong(comm, sizes))
    gamma, _ = fit_gamma(sizes, measure_reduce(comm, sizes))
    floor = ncalls * ring_time(n, p, alpha, beta, gamma, ring_segments(n, p))
    fit_sizes = [n // 8, n // 4, n // 2, 2 * n]
    a, b = fit_alpha_beta(fit_sizes, [_ring_alone(comm, k) for k in fit_sizes])
    predicted = ncalls * (a + b * n)
    formula = 4 * args.layers * n
    row = {"ranks": p, "args": vars(args), "tp1_step_s": whole, "tp_step_s": step, "speedup": whole / step,
           "allreduce_calls": ncalls, "allreduce_s": comm_s, "wait_s": wait_s, "predicted_allreduce_s": predicted,
           "payload_bytes": nbytes, "payload_formula": formula, "wire_bytes_per_rank": nbytes * 2 * (p - 1) / p,
           "activation_bytes": {"tp1": whole_act, "tp": plain_act, "sequence": seq_act}, "sequence_step_s": seq_step,
           "wire_floor_s": floor, "ring_fit": [a, b], "alpha": alpha, "beta": beta, "gamma": gamma}
    log0(f"GPT {args.layers}L {args.embd}C {args.heads}H ctx {args.ctx}, batch {args.batch}: one step (forward + "
         f"backward), medians of {args.steps}")
    log0(f"  tp = 1 on 1 rank  {whole * 1e3:8.1f} ms")
    log0(f"  tp = {p} on {p} ranks {step * 1e3:8.1f} ms   speed-up {whole / step:.2f}x (ideal {p}x; "
         f"{whole / step / p:.0%} of it)")
    log0(f"  waits             {wait_s * 1e3:.1f} ms in the barriers before them (the slower rank's lead: "
         "load imbalance, not the wire)")
    log0(f"  all-reduces       {ncalls} of {n / 2**20:.2f} MiB: {comm_s * 1e3:.1f} ms measured, "
         f"{predicted * 1e3:.1f} ms predicted by the ring's cost model (measured/predicted {comm_s / predicted:.2f}; "
         f"fitted alone: {a * 1e6:.0f} us + n / {1 / b / 1e9:.2f} GB/s)")
    log0(f"  wire floor        {floor * 1e3:.1f} ms (ping-pong alpha {alpha * 1e6:.1f} us, {1 / beta / 1e9:.2f} GB/s, "
         f"add {1 / gamma / 1e9:.2f} GB/s in the ring's formula)")
    log0(f"  bytes per step    {nbytes:,} payload = 4·L·B·T·C·4 = {formula:,} ({nbytes == formula}); on the wire "
         f"{nbytes * 2 * (p - 1) / p:,.0f} per rank (x 2(p-1)/p)")
    log0(f"  compute share     {(step - comm_s - wait_s) * 1e3:.1f} ms = {(step - comm_s - wait_s) / whole:.0%} of tp = 1's "
         f"(ideal {1 / p:.0%}: replicated LayerNorms, embeddings and head)")
    log0(f"  activations kept  {whole_act / 2**20:.1f} MiB at tp = 1, {plain_act / 2**20:.1f} MiB per rank at tp = {p}, "
         f"{seq_act / 2**20:.1f} MiB with parallel.sequence ({seq_act / plain_act:.0%} of plain tp); sequence-parallel "
         f"step {seq_step * 1e3:.1f} ms")
    if args.json and r == 0:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
