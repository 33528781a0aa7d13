"""ZeRO-2 and ZeRO-3 (train.zero = 2, 3; sync/zero.py, sync/zero3.py): gradients, then parameters, sharded.

The contract: with the ring, zero 2 and 3 give the parameters of zero 0 bit for bit at every step --
SGD, Adam, AdamW, with buckets, accumulation and norm clipping (the canonical norm from the shards) --
for the MLP, the GPT (whose blocks are gathered one at a time, prefetched) and the MPNN, with a
pipeline too; checkpoints are the full layout, so a run moves between zero levels and rank counts;
between steps a rank holds only its shards (measured); a layout that will not fit refuses at start."""

import json
import math
import time

import numpy as np
import pytest

from mpitrain import checkpoint, config, models
from mpitrain.models.gpt import GPT
from mpitrain.models.mlp import MLP
from mpitrain.sync import select
from mpitrain.train.control import NORM_BLOCK, shard_tensor_sums, tensor_sq
from mpitrain.train.loop import Loop
from mpitrain.train.session import Run


def _loop(comm, zero, make_model, optimizer="adam", bucket_bytes=0, **train):
    """A Loop over ``make_model()`` built inside the strategy's allocators (paged buffers for zero 2/3)."""
    cfg = config.JobConfig()
    cfg.comm.algorithm, cfg.comm.bucket_bytes = "ring", bucket_bytes
    cfg.train.optimizer, cfg.train.zero = optimizer, zero
    cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay = 0.01, 0.9, 1e-2
    for k, v in train.items():
        setattr(cfg.train, k, v)
    run = Run(cfg, comm)
    run.steps_per_epoch = run.total_steps = 1
    run.strategy = select(cfg)(cfg, comm)
    with models.grads_allocator(run.strategy.grads_allocator("numpy")), \
            models.params_allocator(run.strategy.params_allocator("numpy")):
        run.model = make_model()
    run.policy.bind(run.model)
    run.strategy.bind(run)
    run.strategy.fresh_start()
    return Loop(run)


def _params(loop) -> bytes:
    """Collective: the whole parameters (ZeRO-3: gathered group by group)."""
    return b"".join(c.tobytes() for c in loop.run.strategy.params_chunks())


def _steps(loops, batches, accum=1):
    for k, batch in enumerate(batches):
        for lp in loops:
            if accum == 1:
                lp.train_step(batch)
            else:
                lp.accum_step([batch] * accum)
            lp.run.step = k + 1
        want = _params(loops[0])
        for lp in loops[1:]:
            assert _params(lp) == want, f"zero {lp.cfg.train.zero}: parameters differ from zero 0 after step {k}"


def _close(loops):
    for lp in loops:
        lp.run.strategy.close()


def _mlp_batches(comm, steps, b=4):
    rng = np.random.default_rng(7 + comm.Get_rank())
    return [(rng.standard_normal((b, 12)), rng.integers(0, 5, size=b)) for _ in range(steps)]


@pytest.mark.mpi
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("buckets", [0, 8 * 40])
def test_zero2_and_3_are_bitwise_zero0_for_the_mlp_with_clipping(comm, optimizer, buckets):
    mlp = lambda: MLP(12, [9, 7], 5, xp=np, dtype=np.float64, seed=3)  # noqa: E731
    loops = [_loop(comm, z, mlp, optimizer, buckets, clip_norm=0.05, clip_value=0.5) for z in (0, 1, 2, 3)]
    try:
        _steps(loops, _mlp_batches(comm, 4))
    finally:
        _close(loops)
    n, p = loops[0].run.model.n_params, comm.Get_size()
    held = [lp.run.strategy.held_bytes() for lp in loops]
    assert held[0]["grads"] == held[1]["grads"] == 8 * n
    shard = 8 * sum(hi - lo for lo, hi in loops[2].run.strategy.mine)
    assert held[2]["grads"] <= shard + 8192 and held[3]["grads"] <= shard + 8192, "only the gradient shard is kept"
    assert held[3]["params"] <= shard + 8192, "only the parameter shard is kept"
    assert abs(shard - 8 * n / p) <= 8 * len(loops[2].run.strategy.mine)


def _gpt():
    return GPT(3, 2, 16, 8, 32, xp=np, dtype=np.float32, seed=5)


def _tokens(comm, steps, b=2):
    rng = np.random.default_rng(3 + comm.Get_rank())
    return [(rng.integers(0, 32, (b, 9)),) for _ in range(steps)]


@pytest.mark.mpi
@pytest.mark.parametrize("buckets,accum", [(0, 1), (4 * 1000, 2)])
def test_zero3_gathers_gpt_blocks_just_in_time_and_stays_bitwise(comm, buckets, accum):
    loops = [_loop(comm, z, _gpt, "adamw", buckets, clip_norm=0.3) for z in (0, 2, 3)]
    z3 = loops[2].run.strategy
    calls = []
    inner_needed, inner_done = z3.needed, z3.done
    z3.needed = lambda lo, hi: (calls.append(("need", lo, hi)), inner_needed(lo, hi))[1]  # noqa: E731
    z3.done = lambda lo, hi: (calls.append(("done", lo, hi)), inner_done(lo, hi))[1]  # noqa: E731
    try:
        _steps(loops, _tokens(comm, 3), accum)
    finally:
        _close(loops)
    blocks = loops[2].run.model.param_groups()
    per_step = 2 * len(blocks) * accum
    assert len(calls) == 2 * 3 * per_step, "each block needed before its forward and its backward, then done"
    assert [c[1:] for c in calls[:2]] == [blocks[0]] * 2 and calls[0][0] == "need", calls[:2]
    assert z3._orders["train"], "the order of the gathers is learned (the prefetch follows it)"
    assert not z3._held and not z3._inflight, "nothing stays gathered between steps"


@pytest.mark.mpi
def test_the_canonical_norm_from_shards_equals_the_whole_gradient(comm):
    """Tensors longer than a norm block, cut anywhere by the shards: the same float64 sums, bitwise."""
    rng = np.random.default_rng(0)  # the same gradient on every rank
    sizes = [3, NORM_BLOCK + 17, 5, 2 * NORM_BLOCK + 1, 40]
    tensors, off = [], 0
    for i, n in enumerate(sizes):
        tensors.append((f"t{i}", off, (n,)))
        off += n
    g = rng.standard_normal(off).astype(np.float32)
    p, r = comm.Get_size(), comm.Get_rank()
    cuts = sorted(set(rng.integers(1, off, 6).tolist()) | {0, off})
    pieces = []
    for k, (s, e) in enumerate(zip(cuts, cuts[1:])):  # piece k of every cut belongs to rank k mod p
        if k % p == r:
            pieces.append((s, e))
    shard = np.concatenate([g[a:b] for a, b in pieces]) if pieces else g[:0]
    got = shard_tensor_sums(np, tensors, pieces, shard, comm)
    for name, o, (n,) in tensors:
        assert got[name] == tensor_sq(np, g[o:o + n]), name
    assert tensor_sq(np, g[:40]) == float((g[:40].astype(np.float64) ** 2).sum()), "one block: the old sum"


# ------------------------------------------------------------------------------------ serial

def _mpirun(n, args, timeout=300, env=None):
    from conftest import run_mpitrain

    return run_mpitrain(n, args, env=env, timeout=timeout)


def _gpt_job(corpus, ckpt, *extra):
    keys = [f"data.path={corpus}", f"checkpoint.dir={ckpt}", "model.n_layer=3", "model.n_embd=16",
            "model.block_size=16", "train.batch_size=2", "train.accum_steps=2", "train.max_steps=3",
            "train.eval_every=0", "train.eval_batches=2", "checkpoint.every_steps=1", "train.schedule=\"constant\"",
            "train.warmup_steps=0", "train.clip_norm=0.5", "train.optimizer=\"adamw\"", "comm.bucket_bytes=4096",
            *extra]
    return ["train", "jobs/gpt-tiny.toml"] + [a for k in keys for a in ("--set", k)]


def _same(a, b):
    from conftest import same_checkpoints

    return same_checkpoints(a, b)


def test_zero3_with_pp_and_resume_across_zero_levels_and_rank_counts(tmp_path, corpus):
    """dp 2 throughout: zero 0 on 2 ranks is the reference; zero 3 (2 ranks) -> zero 0 with pp 2
    (4 ranks) -> zero 3 with pp 2 (4 ranks), one step each, ends bitwise where the reference ends."""
    ref = _mpirun(2, _gpt_job(corpus, tmp_path / "ref"))
    assert ref.returncode == 0, ref.stdout + ref.stderr
    mix = tmp_path / "mix"
    for n, steps, keys in ((2, 1, ["train.zero=3"]), (4, 2, ["parallel.pp=2"]),
                           (4, 3, ["parallel.pp=2", "train.zero=3"])):
        r = _mpirun(n, [*_gpt_job(corpus, mix, f"train.max_steps={steps}", *keys), *(["--resume"] if steps > 1 else [])])
        assert r.returncode == 0, r.stdout + r.stderr
        assert steps == 1 or "resumed from" in r.stdout, r.stdout
        assert "memory plan per rank" in r.stdout, r.stdout
    assert "sync=ring+buckets(4096)+zero3" in r.stdout and "dp 2 x pp 2" in r.stdout, r.stdout
    _same(tmp_path / "ref", mix)


def test_zero2_and_3_equal_zero0_for_the_mpnn(tmp_path):
    out = {}
    for z in (0, 2, 3):
        keys = [f"data.path={tmp_path / 'g'}", 'data.dataset="graphs"', "data.rows=160", f"checkpoint.dir={tmp_path / f'z{z}'}",
                "train.max_steps=3", "checkpoint.every_steps=3", "train.batch_size=8", f"train.zero={z}",
                "train.clip_norm=0.1", "train.eval_batches=1"]
        r = _mpirun(3, ["train", "jobs/graph.toml", "--metrics-out", str(tmp_path / f"m{z}.json"),
                        *[a for k in keys for a in ("--set", k)]])
        assert r.returncode == 0, r.stdout + r.stderr
        out[z] = json.loads((tmp_path / f"m{z}.json").read_text())
    _same(tmp_path / "z0", tmp_path / "z2")
    _same(tmp_path / "z0", tmp_path / "z3")
    for key in ("param_bytes_per_rank", "grad_bytes_per_rank", "optimizer_bytes_per_rank"):
        assert out[0][key] > 0 and out[3][key] < out[0][key], (key, out[0][key], out[3][key])
    assert out[2]["param_bytes_per_rank"] == out[0]["param_bytes_per_rank"]


def test_a_rank_that_fails_inside_a_gather_ends_the_job(tmp_path, corpus):
    t0 = time.perf_counter()
    r = _mpirun(2, _gpt_job(corpus, tmp_path / "f", "train.zero=3"), env={"MPITRAIN_FAULT": "1:1:raise"},
                timeout=120)
    assert r.returncode != 0 and "injected fault at step 1" in r.stderr, r.stdout + r.stderr
    assert time.perf_counter() - t0 < 60


def test_a_model_that_only_fits_sharded_refuses_at_start_and_trains_with_zero3(tmp_path, corpus):
    keys = ["model.n_layer=4", "model.n_embd=128", "model.n_head=4", "train.accum_steps=1", "train.max_steps=2",
            "checkpoint.every_steps=0", "comm.bucket_bytes=65536"]
    plan = {}
    for n, z in ((1, 0), (4, 3)):
        r = _mpirun(n, _gpt_job(corpus, tmp_path / "big", *keys, f"train.zero={z}", "train.memory_limit=1"))
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
        line = [ln for ln in r.stderr.splitlines() if "this layout needs" in ln]
        assert len(line) >= 1 and "train.memory_limit" in line[0], r.stderr
        plan[z] = float(line[0].split("needs ~")[1].split("MiB")[0])
    limit = int((plan[0] + plan[3]) / 2 * 2**20)  # between zero 0 on 1 rank and zero 3 on 4
    r = _mpirun(1, _gpt_job(corpus, tmp_path / "big", *keys, f"train.memory_limit={limit}"))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "would fit: train.zero = 3 on " in r.stderr, r.stderr
    r = _mpirun(4, _gpt_job(corpus, tmp_path / "big", *keys, "train.zero=3", f"train.memory_limit={limit}"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "memory plan per rank (zero 3, dp 4)" in r.stdout and math.isfinite(plan[3])


def test_a_paged_buffer_hands_pages_back_and_reads_zeros_there():
    from mpitrain.sync.paged import PAGE, Paged

    n = 16 * PAGE // 4
    buf = Paged(n, np.float32)
    assert buf.resident_bytes() == 0, "reserved, not yet written"
    buf.array[:] = 1.5
    assert buf.resident_bytes() == 16 * PAGE
    lo, hi = PAGE // 4 + 3, 9 * PAGE // 4 + 5  # pages 2..8 lie wholly inside [lo, hi)
    buf.release(lo, hi)
    assert buf.resident_bytes() == 9 * PAGE
    inside = np.zeros(n, bool)
    inside[2 * PAGE // 4:9 * PAGE // 4] = True
    assert (buf.array[inside] == 0).all() and (buf.array[~inside] == 1.5).all(), "only whole pages, zeros after"
    buf.release_all()
    assert buf.resident_bytes() == 0
