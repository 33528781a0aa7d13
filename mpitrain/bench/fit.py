"""``bench --fit``: more sweeps, the primitives measured, the cost model fitted, stored and used (collective).

    1. FIT_PASSES sweeps over the same sizes: the bench's own, then again with the sizes largest
       first (with shm too when every rank is on one node); merged per size and algorithm (the
       lowest time: other processes only ever add time)
    2. the primitives on the library's private communicator (perf/measure.py): ping-pong,
       exchange, np.add, and per link type when the job spans more than one node; the ping-pong
       is the sweep's own p2p rows when they span the latency and the bandwidth regimes
       (``wire_pingpong``: from <= 4 KiB to >= 64 KiB, 3 sizes or more), else timed here
    3. rank 0 fits (perf/fit.py) and stores the model with auto's decision table (perf/store.py,
       where collectives/tuning.py will read it); every rank installs the same model, so ``auto``
       uses it on this communicator from now on
"""

from __future__ import annotations

from ..collectives import state_for
from ..collectives.tuning import cost_path, node_ids
from ..perf.fit import fit, merge_passes
from ..perf.measure import measure_primitives
from ..perf.model import CostModel
from ..perf.report import format_fit_report
from ..perf.store import install, save
from ..runtime import UserError, hostname, log0
from .sweep import run_sweep

FIT_PASSES = 2  # sweeps bench --fit fits: its own, then one more with the sizes largest first


def wire_pingpong(rows):
    """([sizes], [one-way seconds]) of the sweep's p2p rows, or None when they cannot fit alpha and
    beta (fewer than 3 sizes, none <= 4 KiB or none >= 64 KiB)."""
    wire = sorted((r["size"], r["time_us"] * 1e-6) for r in rows if r["algorithm"] == "p2p" and r["time_us"] > 0)
    if len(wire) < 3 or wire[0][0] > 4096 or wire[-1][0] < 65536:
        return None
    return [n for n, _ in wire], [t for _, t in wire]


def _passes(comm, rows, meta: dict) -> list[dict]:
    """The bench's ``rows`` and FIT_PASSES - 1 more sweeps over the same sizes, merged."""
    sizes = sorted({r["size"] for r in rows})
    # shm is fitted where it can run (every rank on one node): timed in the later passes at least
    one_node = len(set(node_ids(state_for(comm).comm))) == 1
    algorithms = ("ring", "tree", "native", "auto") + (("shm",) if one_node and comm.Get_size() > 1 else ())
    passes = [rows]
    for k in range(1, FIT_PASSES):
        log0(f"# fit: pass {k + 1}/{FIT_PASSES} over the same sizes, {'largest' if k % 2 else 'smallest'} first",
             comm=comm)
        passes.append(run_sweep(comm, sizes[::-1] if k % 2 else sizes, algorithms,
                                meta.get("dtype", "float32"), meta.get("op", "sum"), iters=meta.get("iters") or None,
                                memcpy=False, warmup=1))
    return merge_passes(passes)


def _fit_and_store(rows, prims, meta, p: int, hosts, nodes):
    """Rank 0: (the model's parameters, None, path or None) or (None, the problem, None)."""
    try:
        model = fit(rows, prims, ranks=p, host=hosts[0], nodes=max(len(set(hosts)), len(set(nodes))),
                    mpi=meta.get("mpi", ""), dtype=meta.get("dtype", "float32"))
        path = cost_path(model.host, p, model.nodes)
        if path is not None:
            save(model, path)
        return model.params(), None, None if path is None else str(path)
    except (OSError, ValueError) as e:
        return None, f"bench --fit: {e}", None


def fit_for_bench(comm, rows, meta: dict) -> dict:
    """Collective (``python -m mpitrain bench --fit``): measure the primitives, fit the model to the
    sweep's ``rows``, store it (rank 0) and make ``auto`` use it on ``comm`` from now on.

    The fit uses FIT_PASSES sweeps: the bench's own ``rows`` and more over the same sizes,
    largest first, merged (per size and algorithm the lowest time), so that a burst of load
    during one pass does not shape the model.

    Returns {"model", "path" (None: not stored), "prims", "rows" (the merged rows that were
    fitted), "report" (text for rank 0)}.
    """
    st = state_for(comm)
    wire = wire_pingpong(rows)
    rows = _passes(comm, rows, meta)
    nodes = node_ids(st.comm)
    prims = measure_primitives(st.comm, int(meta.get("max") or max(r["size"] for r in rows)),
                               meta.get("dtype", "float32"), nodes=nodes, pingpong=wire)
    hosts = st.comm.gather(hostname(), root=0)
    done = _fit_and_store(rows, prims, meta, st.size, hosts, nodes) if st.rank == 0 else None
    d, problem, path = st.comm.bcast(done, root=0)
    if problem:
        raise UserError(problem)
    model = CostModel.from_dict(d)
    install(st, model)
    return {"model": model, "path": path, "prims": prims, "rows": rows,
            "report": format_fit_report(model, prims, rows, path)}
