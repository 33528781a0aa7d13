#!/usr/bin/env python3
"""mpitrain's GPT against PyTorch DistributedDataParallel: same model, same data, same batch, same N.

    python benchmarks/ddp_gpt.py                                  # N = 1, 2, 4; jobs/gpt.toml shapes
    python benchmarks/ddp_gpt.py --ranks 2 --steps 60 --set comm.bucket_bytes=1048576
    python benchmarks/ddp_gpt.py --markdown runs/ddp_gpt.md

For each N, ``mpirun -n N python benchmarks/ddp_gpt.py --worker ...``; every rank trains the job
twice per repeat, interleaved (the order alternates), in one process:

  mpitrain  Trainer(cfg, comm).run() -- the real loop (tokens -> hand-written backprop -> ring
            all-reduce -> AdamW), ``--steps`` optimizer steps, no evaluation
  DDP       benchmarks/torch_gpt.py: the same network as an nn.Module whose parameters are copies
            of mpitrain's initial flat buffer (so both start from the same weights), autograd,
            F.scaled_dot_product_attention (causal) as nanoGPT uses it, DistributedDataParallel over
            gloo (rank and size from MPI, file:// rendezvous), torch.optim.AdamW with the same betas,
            eps, lr schedule and weight-decay groups, clip_grad_norm_ at train.clip_norm, and the
            same (B, T+1) windows from mpitrain's token reader

tokens/s: all ranks' training tokens over the wall time of the steps (ours: ``tokens_per_s`` of
--metrics-out; theirs: the same count over their loop's time); per-step: global tokens per step /
the median over steps of the slowest rank's step time. One compute thread per rank for both
(OMP/MKL/OPENBLAS_NUM_THREADS=1, torch.set_num_threads(1)). torch is optional: without it the
script says so and exits 0 (``pip install torch`` -- the CPU build).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_compare as dc  # noqa: E402  (the launcher, the timers, the step-time median)

DEFAULT_JOB = dc.ROOT / "jobs" / "gpt.toml"
DEFAULT_SET = ["train.eval_every=0", "checkpoint.every=0", "checkpoint.every_steps=0"]


def run_ddp(cfg, comm, tmp: Path, seq: int, steps: int) -> dict:
    """The same GPT job with torch DDP over gloo."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    from mpitrain.data.token_reader import open_tokens
    from mpitrain.models import build
    from mpitrain.optim import LRSchedule
    from torch_gpt import TorchGPT

    rank, size = comm.Get_rank(), comm.Get_size()
    t, mc = cfg.train, cfg.model
    data = open_tokens(cfg.data.path, comm, batch_size=t.batch_size, seed=t.seed, window=mc.block_size + 1)
    try:
        ours = build("gpt", vars(mc), data.spec, xp=np, seed=t.seed)
        model = TorchGPT(ours)
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{tmp}/pg-{seq}", rank=rank, world_size=size)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        decay, rest = model.groups()
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}],
                                lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
        sched = LRSchedule(t.schedule, t.lr, total_steps=t.max_steps, warmup_steps=t.warmup_steps,
                           min_lr=t.min_lr)
        dist.barrier()
        t0 = time.perf_counter()
        times, tokens, step = [], 0, 0
        for xb, yb in data.batches(0):
            if step == steps:
                break
            t1 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = sched(step)
            x, y = torch.from_numpy(xb), torch.from_numpy(yb)
            opt.zero_grad(set_to_none=True)
            loss = ddp(x, y)
            if step == 0:  # the same weights and batch: the same loss (float32 rounding apart)
                ref = float(ours.loss_and_grad((xb, yb))[0])
                if abs(float(loss) - ref) > 1e-4 * abs(ref):
                    raise SystemExit(f"rank {rank}: torch's first loss {float(loss):.6f} != ours {ref:.6f}")
            loss.backward()
            if t.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), t.clip_norm)
            opt.step()
            times.append(time.perf_counter() - t1)
            tokens += x.numel() * size
            step += 1
        elapsed = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        return {"tokens_per_s": tokens / elapsed, "wall_s": elapsed, "steps": step, "loss": float(loss),
                "step_s": dc._step_median(comm, times), "global_tokens": tokens // max(step, 1)}
    finally:
        data.close()


def worker(args) -> int:
    from mpitrain import config
    from mpitrain.data import ensure_dataset

    comm = dc.torch_comm()
    cfg = config.load(args.job, [*DEFAULT_SET, f"train.max_steps={args.steps}", *args.set])
    ensure_dataset(cfg.data.path, cfg.data.dataset, comm, shards=cfg.data.shards, seed=cfg.train.seed)

    def ours(tmp):
        r = dc.run_ours(cfg, comm, tmp)
        r["global_tokens"] = cfg.train.batch_size * cfg.model.block_size * comm.Get_size()
        return r

    return dc.interleaved(comm, cfg, args.repeats, ours, lambda tmp, rep: run_ddp(cfg, comm, tmp, rep, args.steps))


def table(results) -> str:
    lines = ["| N | mpitrain tokens/s | DDP (gloo) tokens/s | mpitrain / DDP | per-step: mpitrain | "
             "per-step: DDP | per-step ratio | mpitrain comm share |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ours = max(x["tokens_per_s"] for x in r["ours"])
        ddp = max(x["tokens_per_s"] for x in r["ddp"])
        so = statistics.median(x["global_tokens"] / x["step_s"] for x in r["ours"])
        sd = statistics.median(x["global_tokens"] / x["step_s"] for x in r["ddp"])
        comm = statistics.median(x["comm_fraction"] for x in r["ours"])
        note = " (oversubscribed)" if r.get("oversubscribed") else ""
        lines.append(f"| {r['ranks']}{note} | {ours:,.0f} | {ddp:,.0f} | **{ours / ddp:.2f}x** | {so:,.0f} | "
                     f"{sd:,.0f} | {so / sd:.2f}x | {100 * comm:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = dc.parser(__doc__, DEFAULT_JOB, "override a job key for both")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    args = ap.parse_args(argv)
    if not dc.have_torch():
        print("ddp_gpt: PyTorch is not installed; skipping (pip install torch -- the CPU build is enough)")
        return 0
    if args.worker:
        return worker(args)
    def header(results, cores):
        m, t = results[0]["config"]["model"], results[0]["config"]["train"]
        return (f"GPT {m['n_layer']}L {m['n_head']}H {m['n_embd']}C ctx {m['block_size']}, batch {t['batch_size']} "
                f"windows per rank, {args.steps} steps of AdamW, mpitrain allreduce="
                f"{results[0]['config']['comm']['algorithm']}; torch {results[0]['torch']} (gloo, SDPA attention); "
                f"1 thread per rank; {cores} cores.\ntokens/s: best of {args.repeats} interleaved runs; per-step: "
                "global tokens per step / median step time (slowest rank), median over the runs")

    return dc.drive(args, argv, Path(__file__).resolve(), "tokens_per_s", "tokens/s", header, table,
                    extra=["--steps", str(args.steps)])


if __name__ == "__main__":
    sys.exit(main())
