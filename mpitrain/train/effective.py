"""``train --print-config``: the effective job (every key after defaults, the job file and ``--set``) and
the layout it gives on this many ranks; the same TOML is saved as job.toml beside the checkpoints."""

from __future__ import annotations

from .. import config
from ..runtime import log0


def layout(cfg, ranks: int) -> str:
    """What one step is on ``ranks`` ranks: per-rank batch, micro-steps, global batch, how long the run is."""
    t = cfg.train
    per = "windows" if cfg.model.kind == "gpt" else "graphs" if cfg.model.kind in ("mpnn", "graph-mlp") else "samples"
    scope = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs} epochs"
    ps = " (comm.mode = \"ps\": some ranks serve, the rest train)" if cfg.comm.mode == "ps" else ""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = ranks // (tp * pp) if ranks % (tp * pp) == 0 else 0
    grid = ""
    if tp * pp > 1:
        grid = (f" = dp {dp} x pp {pp} x tp {tp}" if dp else f" (parallel.tp x parallel.pp = {tp * pp} does not divide "
                f"them)") + (f", {cfg.parallel.schedule} over {t.accum_steps} micro-batches" if pp > 1 else "")
    replicas = dp if tp * pp > 1 else ranks
    return (f"# layout: {ranks} rank(s){grid}{ps}; a step = {t.batch_size} {per}/replica x {t.accum_steps} "
            f"micro-step(s) x {replicas} replica(s) = {t.batch_size * t.accum_steps * replicas} {per}; {scope}; "
            f"checkpoints in {cfg.checkpoint.dir}/ (with job.toml)")


def print_config(cfg, comm) -> int:
    """Rank 0 prints the effective job and its layout; nothing is trained. Returns 0."""
    log0(config.to_toml(cfg) + "\n" + layout(cfg, comm.Get_size()), comm=comm)
    return 0
