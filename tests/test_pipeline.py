"""Pipeline parallelism (parallel/): the grid, stage parts, canonical accumulation, the runtime.

The contract: ``pp = P`` with M micro-batches trains exactly what ``pp = 1`` with ``accum_steps = M``
trains -- parameters and optimizer state bitwise equal -- with GPipe and 1F1B, tied and untied
embeddings, float32 and float64, clipping on; checkpoints are the full layout and move between any
layouts."""

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import run_mpitrain, same_checkpoints

from mpitrain import config
from mpitrain.models.gpt import GPT, Part
from mpitrain.optim import make_optimizer
from mpitrain.parallel.accumulate import Accumulator
from mpitrain.parallel.layout import checkpoint_for, from_full, to_full
from mpitrain.parallel.stages import split_blocks, stage_costs
from mpitrain.train.control import GradPolicy

ROOT = Path(__file__).resolve().parents[1]
KW = dict(n_head=2, n_embd=16, block_size=8, vocab_size=32, seed=3)


def _micro(m, b=2, T=8, V=32, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, V, (b, T + 1)),) for _ in range(m)]


def _policy(model, group=None, clip=0.05):
    t = config.TrainConfig(clip_norm=clip)
    pol = GradPolicy(t, None)
    pol.bind(model, group)
    return pol


def _reference_step(full, micro, pol, opt, lr=0.01):
    """One optimizer step of the whole model with accumulation, as the training loop takes it."""
    acc = Accumulator(full, len(micro))
    losses = []
    for batch in micro:
        loss, _ = full.loss_and_grad(batch, **acc.kwargs())
        losses.append(loss)
        if acc.k < len(micro) - 1:
            acc.add()
    acc.finish(0, full.grads.size)
    pol.clip(full.grads)
    opt.step(full.grads, lr)
    return float(np.mean(losses))


# ------------------------------------------------------------------------------------ serial

def test_split_blocks_is_contiguous_balanced_and_covers_every_block():
    for L in range(1, 9):
        for p in range(1, L + 1):
            for last in (0.0, 0.4, 3.0):
                s = split_blocks(L, p, 1.0, 0.01, last)
                assert s[0][0] == 0 and s[-1][1] == L and all(hi > lo for lo, hi in s)
                assert all(a[1] == b[0] for a, b in zip(s, s[1:]))
                best = max(stage_costs(s, 1.0, 0.01, last))
                for cut in range(1, L):  # no two-stage split is better than the one chosen
                    if p == 2:
                        assert best <= max(stage_costs([(0, cut), (cut, L)], 1.0, 0.01, last)) + 1e-12
    assert split_blocks(4, 2, 1.0, 0.0, 3.0) == [(0, 3), (3, 4)], "a heavy head takes fewer blocks"
    with pytest.raises(ValueError):
        split_blocks(2, 3)


@pytest.mark.parametrize("tie", [True, False])
def test_stage_parts_compose_to_the_whole_model_bitwise(tie):
    """Forward and backward through three parts give the whole model's loss and gradients, bit for bit
    (a tied wte: the first part's embedding part + the last part's head part)."""
    full = GPT(n_layer=4, tie_embeddings=tie, **KW)
    (tok,) = _micro(1)[0]
    loss, _ = full.loss_and_grad((tok,))
    parts = [GPT(n_layer=4, tie_embeddings=tie, part=Part(lo, hi, lo == 0, hi == 4), **KW)
             for lo, hi in [(0, 1), (1, 3), (3, 4)]]
    h, ctxs = tok[:, :-1], []
    for m in parts:
        h, ctx = m.stage_forward(h if m.part.embed else h.copy(), tok[:, 1:] if m.part.head else None)
        ctxs.append(ctx)
    loss_sum, _, n = h
    assert loss_sum / n == loss
    d = None
    for m, ctx in zip(reversed(parts), reversed(ctxs)):
        d = m.stage_backward(ctx, None if d is None else d.copy())
    for m in parts:
        for name, _, _ in m.tensors():
            assert np.array_equal(m.p[name], full.p[name]), name
            if name != "wte" or not tie:
                assert np.array_equal(m.g[name], full.g[name]), name
    if tie:
        assert np.array_equal(parts[0].g["wte"] + parts[-1].g["wte"], full.g["wte"])
    assert sum(m.params.size for m in parts) == full.params.size + (full.p["wte"].size if tie else 0)


def test_layout_maps_round_trip_and_checkpoints_move():
    full = GPT(n_layer=3, **KW)
    parts = [GPT(n_layer=3, part=Part(0, 2, True, False), **KW), GPT(n_layer=3, part=Part(2, 3, False, True), **KW)]
    flat = np.arange(full.params.size, dtype=np.float32)
    pieces = [(m.tensors(), from_full(flat, full.tensors(), m.tensors()), 0) for m in parts]
    assert np.array_equal(to_full(pieces, full.tensors(), np.float32), flat)
    ck = {"params": flat, "optimizer": {"kind": "adam", "step": 3, "exp_avg": flat * 2}}
    mine = checkpoint_for(ck, parts[1])
    assert mine["params"].size == parts[1].params.size and mine["optimizer"]["step"] == 3
    o = dict((n, o) for n, o, _ in parts[1].tensors())["lnf.w"]
    fo = dict((n, o) for n, o, _ in full.tensors())["lnf.w"]
    assert mine["optimizer"]["exp_avg"][o] == 2 * flat[fo]
    with pytest.raises(ValueError):
        to_full(pieces[:1], full.tensors(), np.float32)


def test_canonical_norm_does_not_depend_on_where_a_tensor_sits():
    full = GPT(n_layer=2, **KW)
    full.loss_and_grad(_micro(1)[0])
    part = GPT(n_layer=2, part=Part(1, 2, False, True), **KW)
    for name, _, _ in part.tensors():
        part.g[name][...] = full.g[name]
    a = _policy(full)
    sq = {n: float((full.g[n].astype(np.float64) ** 2).sum()) for n, _, _ in full.tensors()}
    assert a.grad_norm(full.grads) == math.sqrt(sum(sq[n] for n, _, _ in full.tensors()))
    mine = {n: float((part.g[n].astype(np.float64) ** 2).sum()) for n, _, _ in part.tensors()}
    assert all(mine[n] == sq[n] for n in mine), "a tensor's sum of squares is the same at any offset"


# --------------------------------------------------------------------------------------- MPI

@pytest.mark.mpi
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("tie,dtype", [(True, np.float32), (False, np.float64), (True, np.float64)])
def test_pipeline_is_bitwise_accumulation_on_one_rank(comm, schedule, tie, dtype):
    """All ranks form one pipeline (pp = ranks, an uneven split); three AdamW steps with clipping equal
    the whole model's with accumulation on every rank, parameters and optimizer state bit for bit."""
    from mpitrain.parallel.grid import Grid
    from mpitrain.parallel.pipeline import Pipeline

    p = comm.Get_size()
    if p < 2:
        pytest.skip("a pipeline needs 2 ranks")
    L, M = p + 1, 3
    grid = Grid(comm, 1, p)
    lo, hi = split_blocks(L, p)[grid.pp_rank]
    stage = GPT(n_layer=L, tie_embeddings=tie, dtype=dtype, part=Part(lo, hi, grid.first, grid.last), **KW)
    full = GPT(n_layer=L, tie_embeddings=tie, dtype=dtype, **KW)
    pipe = Pipeline(stage, grid, schedule, M, 2)
    pol, ref_pol = _policy(stage, grid.pp_comm), _policy(full)
    opt = make_optimizer("adamw", stage.params, lr=0.01, weight_decay=0.1, decay_segments=stage.decay_segments())
    ref = make_optimizer("adamw", full.params, lr=0.01, weight_decay=0.1, decay_segments=full.decay_segments())
    try:
        for step in range(3):
            micro = _micro(M, seed=step)
            loss, _ = pipe.step(micro)
            assert pol.finite(stage.grads, loss, step, 0, collective=True)
            pol.clip(stage.grads)
            opt.step(stage.grads, 0.01)
            assert loss == _reference_step(full, micro, ref_pol, ref), f"step {step}: the loss"
        for name, _, _ in stage.tensors():
            assert stage.p[name].tobytes() == full.p[name].tobytes(), name
        fo = {n: (o, math.prod(s)) for n, o, s in full.tensors()}
        for key in ("exp_avg", "exp_avg_sq"):
            mine, theirs = opt.state_dict()[key], ref.state_dict()[key]
            for name, o, s in stage.tensors():
                a, n = fo[name]
                assert mine[o:o + math.prod(s)].tobytes() == theirs[a:a + n].tobytes(), (key, name)
        limit = {"gpipe": M, "1f1b": min(M, p - grid.pp_rank)}[schedule]
        assert pipe.peak_stash == limit, "the stash of live activations reaches its bound, no more"
        B, T, C = pipe.shape
        per = M * B * T * C * stage.dtype.itemsize  # one direction of one boundary, per step
        tied = stage.p["wte"].nbytes if tie and (grid.first or grid.last) else 0
        sends = (0 if grid.first else per) + (0 if grid.last else per)
        assert pipe.sent_bytes == 3 * (sends + tied), "2·M·B·T·C per boundary and step"
    finally:
        grid.free()


@pytest.mark.mpi
def test_a_nonfinite_gradient_on_one_stage_is_skipped_by_every_stage(comm):
    from mpitrain.parallel.grid import Grid
    from mpitrain.parallel.pipeline import Pipeline

    p = comm.Get_size()
    if p < 2:
        pytest.skip("a pipeline needs 2 ranks")
    grid = Grid(comm, 1, p)
    lo, hi = split_blocks(p, p)[grid.pp_rank]
    stage = GPT(n_layer=p, part=Part(lo, hi, grid.first, grid.last), **KW)
    pipe = Pipeline(stage, grid, "1f1b", 2, 2)
    pol = GradPolicy(config.TrainConfig(nonfinite="skip"), comm)
    pol.bind(stage, grid.pp_comm)
    try:
        loss, _ = pipe.step(_micro(2))
        if grid.pp_rank == p - 1:
            stage.grads[3] = np.nan
        assert not pol.finite(stage.grads, loss, 0, 0, collective=True)
        assert pol.skipped == 1
        pipe.step(_micro(2, seed=1))
        assert pol.finite(stage.grads, loss, 1, 0, collective=True), "the next step goes on"
    finally:
        grid.free()


@pytest.mark.mpi
def test_grid_groups_and_rank_order(comm):
    from mpitrain.parallel.grid import Grid
    from mpitrain.runtime import UserError

    p = comm.Get_size()
    for pp in range(1, p + 1):
        if p % pp:
            with pytest.raises(UserError, match="does not divide"):
                Grid(comm, 1, pp)
            continue
        g = Grid(comm, 1, pp)
        try:
            assert g.dp * g.pp == p and g.rank_of(g.dp_rank, g.pp_rank, g.tp_rank) == comm.Get_rank()
            if pp > 1:
                members = g.pp_comm.allgather(comm.Get_rank())
                assert members == [g.rank_of(g.dp_rank, s) for s in range(pp)], "a replica's stages, in order"
                assert g.dp_comm.allgather(g.pp_rank) == [g.pp_rank] * g.dp, "a dp group holds one stage"
        finally:
            g.free()


# ------------------------------------------------------------------------------- end to end

_mpirun = run_mpitrain


def _job(corpus, ckpt, *extra):
    keys = [f"data.path={corpus}", f"checkpoint.dir={ckpt}", "model.n_layer=3", "model.n_embd=16",
            "model.block_size=16", "train.batch_size=2", "train.accum_steps=4", "train.max_steps=4",
            "train.eval_every=2", "train.eval_batches=2", "checkpoint.every_steps=2", "train.schedule=\"constant\"",
            "train.warmup_steps=0", *extra]
    return ["train", "jobs/gpt-tiny.toml"] + [a for k in keys for a in ("--set", k)]


_same = same_checkpoints


def test_pp2_run_equals_accumulation_and_resumes_across_layouts(tmp_path, corpus):
    """pp = 2 (1F1B and GPipe) on 2 ranks ≡ pp = 1 with accum_steps = 4 on 1 rank (the full-layout
    checkpoints, bitwise); a run handed from pp = 1 to pp = 2 and back ends bitwise where they end;
    the layout and the bubble are printed."""
    one = _mpirun(1, _job(corpus, tmp_path / "one"))
    assert one.returncode == 0, one.stdout + one.stderr
    for sched in ("1f1b", "gpipe"):
        out = tmp_path / f"{sched}.json"
        two = _mpirun(2, [*_job(corpus, tmp_path / sched, "parallel.pp=2", f'parallel.schedule="{sched}"'),
                          "--metrics-out", str(out)])
        assert two.returncode == 0, two.stdout + two.stderr
        grid = __import__("json").loads(out.read_text())["grid"]
        assert grid["pp"] == 2 and grid["schedule"] == sched and grid["peak_stash"] == (4 if sched == "gpipe" else 2)
        assert grid["sent_by_kind"]["activation"] == 4 * 4 * 2 * 16 * 16 * 4, "4 steps x M = 4 activations of B·T·C·4 bytes (stage 0 sends them)"
        assert "dp 1 x pp 2 x tp 1" in two.stdout and "stage 1 (blocks" in two.stdout and "bubble 20%" in two.stdout
        evals = [[ln.split("val loss")[1][:8] for ln in r.stdout.splitlines() if ln.startswith("step ") and "val loss" in ln]
                 for r in (one, two)]
        assert len(evals[0]) == 2 and evals[0] == evals[1], "the same val losses, evaluated through the stages"
        _same(tmp_path / "one", tmp_path / sched)
    # pp = 1 -> pp = 2 -> pp = 1: one run handed over at steps 2 and 3 ends where the others end
    mix = tmp_path / "mix"
    for n, steps, pp in ((1, 2, 1), (2, 3, 2), (1, 4, 1)):
        r = _mpirun(n, [*_job(corpus, mix, f"train.max_steps={steps}", f"parallel.pp={pp}"),
                        *(["--resume"] if steps > 2 else [])])
        assert r.returncode == 0, r.stdout + r.stderr
        assert steps == 2 or f"resumed from" in r.stdout, r.stdout
    _same(tmp_path / "one", mix)


@pytest.mark.parametrize("fault,code", [("1:3:kill", None), ("0:1:usr1", 75)])
def test_pp2_killed_or_signalled_resumes_bitwise(tmp_path, corpus, fault, code):
    """A pipeline killed (rank 1, mid-step 3: the step-2 checkpoint is left) or stopped by SIGUSR1 (a
    checkpoint at once, exit 75) resumes in the same layout and ends bitwise where an uninterrupted run ends."""
    whole = _mpirun(2, _job(corpus, tmp_path / "whole", "parallel.pp=2"))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    cut = _mpirun(2, _job(corpus, tmp_path / "cut", "parallel.pp=2"), env={"MPITRAIN_FAULT": fault})
    assert cut.returncode != 0 and (code is None or cut.returncode == code), cut.stdout + cut.stderr
    again = _mpirun(2, [*_job(corpus, tmp_path / "cut", "parallel.pp=2"), "--resume"])
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stdout + again.stderr
    _same(tmp_path / "whole", tmp_path / "cut")


def test_dp2_by_pp2_on_four_ranks_equals_dp2(tmp_path, corpus):
    two = _mpirun(2, _job(corpus, tmp_path / "dp2", "train.max_steps=2"))
    assert two.returncode == 0, two.stdout + two.stderr
    four = _mpirun(4, _job(corpus, tmp_path / "dp2pp2", "train.max_steps=2",
                          "parallel.pp=2"), timeout=300)
    assert four.returncode == 0, four.stdout + four.stderr
    assert "dp 2 x pp 2 x tp 1" in four.stdout and "stage 0 (embeddings + blocks 0-1): ranks dp 0: 0; dp 1: 1" \
        in four.stdout
    _same(tmp_path / "dp2", tmp_path / "dp2pp2")


@pytest.mark.parametrize("keys,n,message", [
    (["parallel.pp=3"], 2, "does not divide the 2 rank(s)"),
    (["parallel.pp=2", "model.n_layer=1"], 2, "every stage needs at least one block"),
    (["parallel.pp=2", "model.kind=\"mlp\"", "data.dataset=\"digits\""], 2, "only the GPT"),
    (["parallel.pp=2", "comm.compress=\"fp16\""], 2, "comm.compress"),
    (["parallel.pp=2", "parallel.tp=2"], 2, "does not divide the 2 rank(s)"),
])
def test_bad_layouts_are_one_line_on_every_rank(tmp_path, corpus, keys, n, message):
    p = _mpirun(n, _job(corpus, tmp_path / "bad", *keys), timeout=120)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if message in ln]
    assert lines, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr


def test_a_rank_that_raises_inside_the_schedule_ends_the_job(tmp_path, corpus):
    import time

    t0 = time.perf_counter()
    p = _mpirun(2, _job(corpus, tmp_path / "f", "parallel.pp=2"), env={"MPITRAIN_FAULT": "1:1:raise"}, timeout=120)
    assert p.returncode != 0 and "injected fault at step 1" in p.stderr, p.stdout + p.stderr
    assert time.perf_counter() - t0 < 60
