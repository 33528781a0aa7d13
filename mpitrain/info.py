"""``python -m mpitrain info``: what this job runs on (MPI library, ranks, hosts, backend, SLURM)."""

from __future__ import annotations

import os
import platform

from .runtime import get_comm, hostname, log0


def add_arguments(p):
    p.add_argument("--pp", type=int, default=1, help="show the process grid of this many pipeline stages "
                   "(parallel.pp; default 1)")
    p.add_argument("--tp", type=int, default=1, help="... and tensor-parallel ranks (parallel.tp; default 1)")
    p.set_defaults(func=main)


def slurm_info() -> dict:
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return {}
    keys = {"job id": "SLURM_JOB_ID", "nodes": "SLURM_JOB_NODELIST", "nnodes": "SLURM_JOB_NUM_NODES",
            "ntasks": "SLURM_NTASKS", "tasks per node": "SLURM_TASKS_PER_NODE",
            "cpus per task": "SLURM_CPUS_PER_TASK", "partition": "SLURM_JOB_PARTITION"}
    return {k: env[v] for k, v in keys.items() if v in env}


def rank_ranges(ranks) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, ranks = [], sorted(ranks)
    for i, r in enumerate(ranks):
        if i and r == ranks[i - 1] + 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def main(args) -> int:
    import h5py
    import mpi4py
    import numpy as np
    from mpi4py import MPI

    from . import __version__, backend, threads

    comm = get_comm()
    lib = MPI.Get_library_version().strip().splitlines()[0]
    levels = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
              MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
    local, _ = backend.local_rank(comm)
    ngpu = backend.gpu_count()
    gpu = (local % ngpu) if ngpu else None
    row = (comm.Get_rank(), hostname(), local, os.getpid(), gpu, os.environ.get("CUDA_VISIBLE_DEVICES", "-"))
    rows = comm.gather(row, root=0)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # what MPI sees as one shared-memory node
    nodes = comm.allreduce(int(node.Get_rank() == 0))
    node.Free()
    log0(f"mpitrain      {__version__}")
    log0(f"MPI library   {lib}")
    log0(f"MPI standard  {'.'.join(map(str, MPI.Get_version()))}; thread level {levels.get(MPI.Query_thread(), '?')}")
    log0(f"versions      python {platform.python_version()}, mpi4py {mpi4py.__version__}, "
         f"numpy {np.__version__}, h5py {h5py.__version__}")
    pools = ", ".join(f"{k} {v}" for k, v in threads.in_effect().items()) or "threadpoolctl not installed"
    log0(f"threads       {threads.describe()}; in effect on rank 0: {pools}; "
         f"set train.threads or OMP_NUM_THREADS to choose")
    cupy = backend._cupy()
    log0(f"CuPy          {cupy.__version__ if cupy else 'not installed'}; GPUs visible on rank 0: {ngpu}")
    aware, why = backend.cuda_aware_info()
    log0(f"CUDA-aware    {'yes' if aware else 'no'} ({why}); device buffers are "
         f"{'passed to MPI directly' if aware else 'staged through pinned host memory'}")
    if comm.Get_rank() == 0:
        hosts = sorted({r[1] for r in rows})
        log0(f"ranks         {comm.Get_size()} on {len(hosts)} host(s): {', '.join(hosts)}")
        by_first_rank = sorted(hosts, key=lambda h: min(r[0] for r in rows if r[1] == h))
        log0(f"hosts         {len(hosts)}: " + ", ".join(
             f"{h} (ranks {rank_ranges(r[0] for r in rows if r[1] == h)})" for h in by_first_rank)
             + f"; shared-memory nodes (MPI_COMM_TYPE_SHARED): {nodes}")
        sl = slurm_info()
        if sl:
            log0("SLURM         " + "; ".join(f"{k} {v}" for k, v in sl.items()))
        log0("rank  host              local  pid      gpu  CUDA_VISIBLE_DEVICES")
        for r, h, lr, pid, g, cvd in rows:
            log0(f"{r:<5} {h:<17} {lr:<6} {pid:<8} {'-' if g is None else g:<4} {cvd}")
    _grid(comm, getattr(args, "tp", 1), getattr(args, "pp", 1), rows)
    return 0


def _grid(comm, tp: int, pp: int, rows) -> None:
    """The process grid for ``--tp``/``--pp`` (parallel/grid.py): each stage's ranks and their hosts."""
    from .parallel.grid import Grid

    grid = Grid(comm, tp, pp)
    try:
        log0(f"grid          {grid.describe()} (rank = (stage * dp + replica) * tp + tp slot)")
        for line in grid.table():
            log0(line)
        if comm.Get_rank() == 0 and tp > 1:
            host = {r[0]: r[1] for r in rows}
            split = [g for g in range(0, comm.Get_size(), tp) if len({host[g + t] for t in range(tp)}) > 1]
            if split:
                log0(f"note: the tp groups starting at ranks {split} span hosts; place tp ranks on one node")
    finally:
        grid.free()
