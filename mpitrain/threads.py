"""Compute threads per rank: each rank takes its share of the cores its node gives the job.

NumPy's BLAS starts one thread per core in every process, so N ranks on a node would run N x cores
threads (7.7x slower for the GPT on 2 cores, 2 ranks). At start-up every rank picks

    train.threads (> 0)                      the job's key wins, then
    OMP_NUM_THREADS / OPENBLAS_NUM_THREADS /  a variable the user set (left as the BLAS read it), else
      MKL_NUM_THREADS / BLIS_NUM_THREADS
    auto = max(1, cores // ranks on node)    cores = the CPUs the node's ranks may run on (the union of
                                             their affinity masks, at most this rank's own), ranks on
                                             node = the size of a COMM_TYPE_SHARED split

and limits the already loaded BLAS (and OpenMP) pools with threadpoolctl.
"""

from __future__ import annotations

import os

ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")

_STATE = {"threads": None, "source": "", "limiter": None}


def env_threads(env=None) -> tuple[int, str] | None:
    """(count, variable) of the first thread variable set to a positive integer, or None."""
    env = os.environ if env is None else env
    for name in ENV_VARS:
        v = env.get(name, "").strip()
        if v.isdigit() and int(v) > 0:
            return int(v), name
    return None


def node_share(comm) -> tuple[int, int]:
    """(cores, ranks) of this rank's node: CPUs in the node's ranks' affinity masks, ranks in the job there."""
    from mpi4py import MPI

    mine = set(os.sched_getaffinity(0))
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        cpus = set().union(*node.allgather(sorted(mine)))
        return min(len(cpus), len(mine) * node.Get_size()), node.Get_size()
    finally:
        node.Free()


def choose(cores: int, ranks: int, requested: int = 0, env=None) -> tuple[int, str]:
    """(threads, where the number came from): the job key, else a thread variable, else the node share."""
    if requested > 0:
        return requested, "train.threads"
    given = env_threads(env)
    if given:
        return given[0], given[1]
    return max(1, cores // max(ranks, 1)), f"auto: {cores} core(s) / {ranks} rank(s) on the node"


def apply(comm, requested: int = 0) -> tuple[int, str]:
    """Collective over ``comm``: choose this rank's thread count and limit the loaded pools to it."""
    cores, ranks = node_share(comm)
    n, source = choose(cores, ranks, requested)
    if source not in ENV_VARS:  # a user's variable was read by the BLAS itself: leave it alone
        limit(n)
    _STATE.update(threads=n, source=source)
    return n, source


def limit(n: int) -> None:
    """Limit every thread pool threadpoolctl finds (BLAS, OpenMP) to ``n`` threads (kept for the process)."""
    import numpy  # noqa: F401 - loads the BLAS, so that there is a pool to limit

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an install without it: the BLAS keeps its own default
        return
    _STATE["limiter"] = threadpool_limits(limits=n)


def current() -> tuple[int | None, str]:
    """(threads, source) chosen by ``apply``; (None, "") before it ran."""
    return _STATE["threads"], _STATE["source"]


def in_effect() -> dict:
    """{library: threads} as threadpoolctl sees the loaded pools now ({} without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {}
    return {f"{i.get('internal_api')}": i.get("num_threads") for i in threadpool_info()}


def describe() -> str:
    """``2/rank (auto: 4 core(s) / 2 rank(s) on the node)`` for the start-up line and ``info``."""
    n, source = current()
    return "not set" if n is None else f"{n}/rank ({source})"
