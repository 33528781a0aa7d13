#!/usr/bin/env python3
"""mpitrain against PyTorch DistributedDataParallel: same MLP, same data, same batch, same rank count.

    python benchmarks/ddp_compare.py                      # N = 1, 2, 4; prints a markdown table
    python benchmarks/ddp_compare.py --ranks 1,2 --repeats 3 --set comm.bucket_bytes=4194304
    python benchmarks/ddp_compare.py --markdown docs/ddp.md

One invocation launches, for each N, ``mpirun -n N python benchmarks/ddp_compare.py
--worker ...``. Each worker (every rank) trains the job twice per repeat, interleaved,
in one process:

  mpitrain  Trainer(cfg, comm).run() -- the real training loop (data -> grads ->
            allreduce -> step), its samples/s from --metrics-out
  DDP       torch.nn.Sequential of Linear/ReLU with the same widths and the same initial
            weights (copied from mpitrain's MLP), DistributedDataParallel over a gloo
            process group (rank and size from MPI, rendezvous through a file:// in a
            temporary directory), SGD with the same momentum and lr schedule, the same
            mini-batches from mpitrain.data.open_dataset, and the same per-epoch test
            evaluation; samples/s = training samples / wall time of the epochs

Fairness: OMP_NUM_THREADS = MKL_NUM_THREADS = OPENBLAS_NUM_THREADS = 1 for both and
torch.set_num_threads(1) / set_num_interop_threads(1): one compute thread per rank.
Start-up (process group, data set open, parameter broadcast) is outside both timings.

torch is optional: without it the script says so and exits 0. The CPU build is enough.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JOB = ROOT / "jobs" / "synthetic.toml"
# a smaller variant of the synthetic job (same widths and batch): one epoch of 16 Ki rows
DEFAULT_SET = ["data.path=data/bench/synthetic-16k", "data.rows=16384", "train.epochs=1",
               "checkpoint.every=0", "data.dataset=synthetic"]
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def have_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


# --------------------------------------------------------------------------- worker (under mpirun)


def _tmpdir(comm) -> Path:
    d = tempfile.mkdtemp(prefix="ddp-compare-") if comm.Get_rank() == 0 else None
    return Path(comm.bcast(d, root=0))


def _step_median(comm, times) -> float:
    """Median over steps of the slowest rank's step time (the step is done when every rank is)."""
    import numpy as np
    from mpi4py import MPI

    t = np.asarray(times, dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, t, op=MPI.MAX)
    return float(np.median(t)) if t.size else float("nan")


def run_ours(cfg, comm, tmp: Path) -> dict:
    """mpitrain's own training loop; its metrics (rank 0's, broadcast) and its median step time."""
    from mpitrain.train import Loop, Trainer

    step_times = []
    plain = Loop.train_step

    def timed(self, batch):  # times train_step: compute + allreduce + optimizer step, as for DDP
        t0 = time.perf_counter()
        out = plain(self, batch)
        step_times.append(time.perf_counter() - t0)
        return out

    out = tmp / "ours.json"
    Loop.train_step = timed
    try:
        Trainer(cfg, comm).run(metrics_out=str(out))
    finally:
        Loop.train_step = plain
    m = json.loads(out.read_text()) if comm.Get_rank() == 0 else None
    m = comm.bcast(m, root=0)
    m["step_s"] = _step_median(comm, step_times)
    m["global_batch"] = cfg.train.batch_size * comm.Get_size()
    return m


def run_ddp(cfg, comm, tmp: Path, seq: int) -> dict:
    """The same job with torch DDP over gloo."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from mpi4py import MPI
    from torch import nn

    from mpitrain.data import open_dataset
    from mpitrain.models import MLP
    from mpitrain.optim import LRSchedule

    rank, size = comm.Get_rank(), comm.Get_size()
    t = cfg.train
    if t.optimizer != "sgd" or cfg.model.activation != "relu":
        raise SystemExit("ddp_compare supports optimizer = sgd and activation = relu")
    data = open_dataset(cfg.data.path, comm, batch_size=t.batch_size, seed=t.seed)
    try:
        ref = MLP(data.features, cfg.model.hidden, data.classes, cfg.model.activation, seed=t.seed)
        layers = []
        for i, L in enumerate(ref.layers):
            lin = nn.Linear(L.fan_in, L.fan_out)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(L.W.T)))
                lin.bias.copy_(torch.from_numpy(L.b.copy()))
            layers.append(lin)
            if i < len(ref.layers) - 1:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers)
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{tmp}/pg-{seq}", rank=rank, world_size=size)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        steps = data.steps_per_epoch
        sched = LRSchedule(t.schedule, t.lr, total_steps=t.epochs * steps, warmup_steps=t.warmup_steps,
                           step_size=t.step_epochs * steps, gamma=t.gamma, min_lr=t.min_lr)
        lossf = nn.CrossEntropyLoss()
        dist.barrier()
        t0 = time.perf_counter()
        step = samples = 0
        step_times = []
        for epoch in range(t.epochs):
            ddp.train()
            for x, y in data.batches(epoch):
                t1 = time.perf_counter()
                for g in opt.param_groups:
                    g["lr"] = sched(step)
                xb, yb = torch.from_numpy(x), torch.from_numpy(y)
                opt.zero_grad(set_to_none=True)
                loss = lossf(ddp(xb), yb)
                loss.backward()
                opt.step()
                step_times.append(time.perf_counter() - t1)
                step += 1
                samples += len(y) * size
            ddp.eval()
            tot = torch.zeros(3, dtype=torch.float64)
            with torch.no_grad():
                for x, y in data.test_batches(t.eval_batch_size):
                    z = model(torch.from_numpy(x))
                    yb = torch.from_numpy(y)
                    tot[0] += float(nn.functional.cross_entropy(z, yb, reduction="sum"))
                    tot[1] += float((z.argmax(1) == yb).sum())
                    tot[2] += len(y)
            dist.all_reduce(tot)
        elapsed = time.perf_counter() - t0
        elapsed = comm.allreduce(elapsed, op=MPI.MAX)
        return {"samples_per_s": samples / elapsed, "wall_s": elapsed, "steps": step,
                "step_s": _step_median(comm, step_times), "global_batch": t.batch_size * size,
                "test_accuracy": float(tot[1] / max(tot[2], 1)), "test_loss": float(tot[0] / max(tot[2], 1))}
    finally:
        data.close()


def torch_comm():
    """One compute thread per rank for torch; the run's communicator."""
    import torch

    from mpitrain.runtime import get_comm

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    return get_comm()


def interleaved(comm, cfg, repeats: int, ours, theirs) -> int:
    """``repeats`` rounds of ``ours(tmp)`` and ``theirs(tmp, rep)``, the order alternating each round;
    rank 0 prints the RESULT line the driver reads."""
    import torch

    tmp = _tmpdir(comm)
    results = {"ours": [], "ddp": []}
    try:
        for rep in range(repeats):
            for which in (("ours", "ddp") if rep % 2 == 0 else ("ddp", "ours")):
                results[which].append(ours(tmp) if which == "ours" else theirs(tmp, rep))
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    if comm.Get_rank() == 0:
        print("RESULT " + json.dumps({"ranks": comm.Get_size(), "config": cfg.to_dict(),
                                      "torch": torch.__version__, **results}), flush=True)
    return 0


def worker(args) -> int:
    from mpitrain import config
    from mpitrain.data import ensure_dataset

    comm = torch_comm()
    cfg = config.load(args.job, [*DEFAULT_SET, *args.set])
    d = cfg.data
    ensure_dataset(d.path, d.dataset, comm, shards=d.shards, seed=cfg.train.seed,
                   rows=d.rows or None, features=d.features or None, classes=d.classes or None)
    return interleaved(comm, cfg, args.repeats, lambda tmp: run_ours(cfg, comm, tmp),
                       lambda tmp, rep: run_ddp(cfg, comm, tmp, rep))


# --------------------------------------------------------------------------- driver


def launch(n: int, args, script: Path = Path(__file__).resolve(), extra=()) -> dict:
    """``mpirun -n n python -m mpi4py script --worker ...``; the worker's RESULT line, parsed."""
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
    cmd = [mpirun, "-n", str(n), sys.executable, "-m", "mpi4py", str(script), "--worker",
           "--job", str(args.job), "--repeats", str(args.repeats), *extra]
    for s in args.set:
        cmd += ["--set", s]
    env = dict(os.environ, **THREAD_ENV)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    print(f"# N={n}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    log = Path(args.log_dir) / f"{script.stem}-n{n}.log" if args.log_dir else None
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(res.stdout + res.stderr)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if res.returncode != 0 or line is None:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-4000:])
        raise SystemExit(f"N={n}: worker failed (exit {res.returncode})")
    return json.loads(line[len("RESULT "):])


def _best(runs, key="samples_per_s"):
    return max(x[key] for x in runs)


def _per_step(runs):
    """Samples/s from the median step time (robust to bursts of load from other processes)."""
    return statistics.median(x["global_batch"] / x["step_s"] for x in runs)


def table(results) -> str:
    lines = ["| N | mpitrain samples/s | DDP (gloo) samples/s | mpitrain / DDP | per-step: mpitrain | "
             "per-step: DDP | per-step ratio | mpitrain comm share | test acc mpitrain / DDP |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ours, ddp = _best(r["ours"]), _best(r["ddp"])
        so, sd = _per_step(r["ours"]), _per_step(r["ddp"])
        comm = statistics.median(x["comm_fraction"] for x in r["ours"])
        acc = f"{r['ours'][-1]['test_accuracy']:.3f} / {r['ddp'][-1]['test_accuracy']:.3f}"
        note = " (oversubscribed)" if r.get("oversubscribed") else ""
        lines.append(f"| {r['ranks']}{note} | {ours:,.0f} | {ddp:,.0f} | **{ours / ddp:.2f}x** | {so:,.0f} | "
                     f"{sd:,.0f} | {so / sd:.2f}x | {100 * comm:.0f}% | {acc} |")
    return "\n".join(lines)


def parser(doc: str, job: Path, set_help: str) -> argparse.ArgumentParser:
    """The options both comparisons take (ddp_gpt.py adds --steps)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts (default 1,2,4)")
    ap.add_argument("--job", default=str(job), help=f"job file (default {job.relative_to(ROOT)})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each per N (default 3)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table (and the command) to FILE")
    ap.add_argument("--log-dir", default="runs", help="worker logs go here (default runs/)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mpirun")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    ap = parser(__doc__, DEFAULT_JOB, "override a job key for both (after the defaults: " + " ".join(DEFAULT_SET) + ")")
    args = ap.parse_args(argv)
    if not have_torch():
        print("ddp_compare: PyTorch is not installed; skipping (pip install torch -- the CPU build is enough)")
        return 0
    if args.worker:
        return worker(args)

    def header(results, cores):
        cfg = results[0]["config"]
        return (f"MLP {cfg['data'].get('features') or '?'}-{'-'.join(map(str, cfg['model']['hidden']))}-"
                f"{cfg['data'].get('classes') or '?'} {cfg['model']['activation']}, batch "
                f"{cfg['train']['batch_size']} per rank, {cfg['train']['epochs']} epoch(s) of {cfg['data']['rows']} "
                f"rows, SGD momentum {cfg['train']['momentum']}, mpitrain allreduce={cfg['comm']['algorithm']}"
                f"{', buckets ' + str(cfg['comm']['bucket_bytes']) + ' B' if cfg['comm'].get('bucket_bytes') else ''}; "
                f"torch {results[0]['torch']} (gloo); 1 thread per rank; {cores} cores.\n"
                f"samples/s: wall clock of the epochs (training + per-epoch test), best of {args.repeats} "
                "interleaved runs; per-step: global batch / median step time (forward, backward, gradient "
                "averaging, optimizer step; slowest rank), median over the runs")

    return drive(args, argv, Path(__file__).resolve(), "samples_per_s", "samples/s", header, table)


def drive(args, argv, script: Path, key: str, unit: str, header, table, extra=()) -> int:
    """The driver of both comparisons: one mpirun per N, the per-N line, the header and the table."""
    cores = os.cpu_count() or 1
    results = []
    for n in [int(x) for x in args.ranks.split(",") if x.strip()]:
        r = launch(n, args, script=script, extra=extra)
        r["oversubscribed"] = n > cores
        results.append(r)
        print(f"# N={n}: mpitrain {[round(x[key]) for x in r['ours']]} {unit}, "
              f"DDP {[round(x[key]) for x in r['ddp']]}", file=sys.stderr, flush=True)
    text = header(results, cores) + "\n\n" + table(results)
    print(text)
    if args.markdown:
        cmd = f"python benchmarks/{script.name} " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.markdown).write_text(f"`{cmd.strip()}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
