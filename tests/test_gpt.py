"""GPT: gradients against finite differences and a PyTorch reference, buffer layout, init,
token data (import, pycode, reader), training options, generation."""

import math

import numpy as np
import pytest

from mpitrain.models import GPT

TINY = dict(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=11)


def _tiny(tie=True, seed=3):
    m = GPT(**TINY, tie_embeddings=tie, dtype=np.float64, seed=seed)
    m.params += np.random.default_rng(7).normal(0, 0.05, m.params.size)  # non-trivial LN, biases
    return m


def _tokens(B=3, T=6, V=11, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(B, T + 1))


def _loss(m, tok):
    s, _ = m.evaluate((tok,))
    return s / (tok.shape[0] * (tok.shape[1] - 1))


# ------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("tie", [True, False])
def test_every_tensor_gradient_matches_finite_differences(tie):
    """Per tensor: a random direction over all its entries, and its largest entries one by one."""
    m, tok, h = _tiny(tie), _tokens(), 1e-5
    loss, _ = m.loss_and_grad((tok,))
    assert loss == pytest.approx(_loss(m, tok), rel=1e-12)
    ana = m.grads.copy()
    rng = np.random.default_rng(1)
    p = m.params
    for name, off, shape in m.tensors():
        n = math.prod(shape)
        sl = slice(off, off + n)
        d = rng.standard_normal(n)
        old = p[sl].copy()
        p[sl] = old + h * d
        fp = _loss(m, tok)
        p[sl] = old - h * d
        fm = _loss(m, tok)
        p[sl] = old
        num = (fp - fm) / (2 * h)
        got = float(ana[sl] @ d)
        assert abs(got - num) <= 1e-6 * max(abs(num), 1e-3), (name, got, num)
        for k in np.argsort(-np.abs(ana[sl]))[:3] + off:
            o = p[k]
            p[k] = o + h
            fp = _loss(m, tok)
            p[k] = o - h
            fm = _loss(m, tok)
            p[k] = o
            num = (fp - fm) / (2 * h)
            assert abs(ana[k] - num) <= 1e-6 * max(abs(num), 1e-3), (name, k, ana[k], num)


def test_short_sequences_and_split_batches():
    """T < block_size: unused position rows get zero gradient; (x, y) equals the window form."""
    m, tok = _tiny(), _tokens(B=2, T=4)
    m.grads[...] = 7.0
    loss, correct = m.loss_and_grad((tok,))
    wpe = m.g["wpe"]
    assert np.all(wpe[4:] == 0) and np.abs(wpe[:4]).max() > 0
    g1 = m.grads.copy()
    loss2, correct2 = m.loss_and_grad((tok[:, :-1], tok[:, 1:]))
    assert (loss2, correct2) == (loss, correct) and np.array_equal(m.grads, g1)
    assert m.count((tok,)) == 8 == m.count((tok[:, :-1], tok[:, 1:]))
    s, c = m.evaluate((tok,), batch_size=1)
    assert s / 8 == pytest.approx(loss, rel=1e-12) and c == correct
    with pytest.raises(ValueError, match="block_size"):
        m.loss_and_grad((_tokens(T=7),))


def test_grad_ready_prefixes_and_layout():
    m, seen = _tiny(), []
    m.loss_and_grad((_tokens(),), on_grad_ready=seen.append)
    assert seen == sorted(seen) and seen[-1] == m.n_params and len(seen) == TINY["n_layer"] + 2
    names = [t[0] for t in m.tensors()]
    assert names[0] == "lnf.w" and names[-2:] == ["wpe", "wte"] and names[2].startswith("h1.")
    lo = 0
    for name, off, shape in m.tensors():   # the tensors tile the buffer in order
        assert off == lo
        lo += math.prod(shape)
    assert lo == m.n_params
    # a hook sees the prefix already final: compare with the grads at the end
    snap = []
    m.loss_and_grad((_tokens(),), on_grad_ready=lambda hi: snap.append((hi, m.grads[:hi].copy())))
    for hi, g in snap:
        assert np.array_equal(g, m.grads[:hi])


def test_init_is_gpt2_style_and_seeded():
    m = GPT(n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=64, seed=5)
    assert m.p["wte"].std() == pytest.approx(0.02, rel=0.1)
    assert m.p["h0.attn_proj.w"].std() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert m.p["h3.mlp_proj.w"].std() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert np.all(m.p["h1.ln1.w"] == 1) and np.all(m.p["h1.attn_qkv.b"] == 0)
    again = GPT(n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=64, seed=5)
    assert np.array_equal(m.params, again.params)
    assert m.params.dtype == np.float32
    decayed = {n for n, o, s in m.tensors() if any(lo == o for lo, _ in m.decay_segments())}
    assert "h0.mlp_fc.w" in decayed and not decayed & {"wte", "wpe", "lnf.w", "h0.ln1.b", "h0.mlp_fc.b"}


def test_untrained_loss_is_log_vocab():
    m = GPT(**TINY, seed=0)
    loss, _ = m.loss_and_grad((_tokens(),))
    assert loss == pytest.approx(math.log(11), rel=0.05)


# ------------------------------------------------------------------------------ PyTorch reference

def _torch_loss(torch, m, tok):
    """The same network in PyTorch, from the same flat parameters (float64, autograd)."""
    F = torch.nn.functional
    flat = torch.tensor(m.params, dtype=torch.float64, requires_grad=True)
    P = {n: flat[o:o + math.prod(s)].view(*s) for n, o, s in m.tensors()}
    x, y = torch.tensor(tok[:, :-1]), torch.tensor(tok[:, 1:])
    B, T = x.shape
    C, nh = m.n_embd, m.n_head
    h = P["wte"][x] + P["wpe"][:T]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(m.n_layer):
        q = lambda t: P[f"h{i}.{t}"]  # noqa: E731
        a = F.layer_norm(h, (C,), q("ln1.w"), q("ln1.b"), eps=1e-5)
        qq, kk, vv = (a @ q("attn_qkv.w") + q("attn_qkv.b")).split(C, dim=-1)
        qq, kk, vv = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (qq, kk, vv))
        att = (qq @ kk.transpose(-2, -1)) / math.sqrt(C // nh)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        yy = (att @ vv).transpose(1, 2).reshape(B, T, C)
        h = h + yy @ q("attn_proj.w") + q("attn_proj.b")
        a = F.layer_norm(h, (C,), q("ln2.w"), q("ln2.b"), eps=1e-5)
        h = h + F.gelu(a @ q("mlp_fc.w") + q("mlp_fc.b"), approximate="tanh") @ q("mlp_proj.w") + q("mlp_proj.b")
    h = F.layer_norm(h, (C,), P["lnf.w"], P["lnf.b"], eps=1e-5)
    logits = h @ (P["wte"] if m.tie else P["lm_head"]).T
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    return float(loss.detach()), flat.grad.numpy()


@pytest.mark.parametrize("tie", [True, False])
def test_matches_pytorch_reference(tie):
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - not installed, or a build that cannot load here
        pytest.skip(f"torch is not usable here ({type(e).__name__}: {e})")
    m, tok = _tiny(tie), _tokens()
    loss, _ = m.loss_and_grad((tok,))
    ref_loss, ref_grad = _torch_loss(torch, m, tok)
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    for name, off, shape in m.tensors():
        sl = slice(off, off + math.prod(shape))
        err = np.abs(m.grads[sl] - ref_grad[sl]).max() / max(np.abs(ref_grad[sl]).max(), 1e-12)
        assert err < 1e-6, (name, err)


# ------------------------------------------------------------------------------------- token data

def _text(tmp_path, n=3000, name="a.txt", seed=0):
    rng = np.random.default_rng(seed)
    data = bytes(rng.integers(32, 127, size=n).astype(np.uint8))
    p = tmp_path / name
    p.write_bytes(data)
    return p, data


def test_import_text_round_trip_and_check(tmp_path, comm):
    from mpitrain.data import check_dataset, import_text
    from mpitrain.data.token_reader import open_tokens

    a, da = _text(tmp_path, 2000, "a.txt", 0)
    (tmp_path / "d").mkdir()
    b, db = _text(tmp_path / "d", 1000, "b.txt", 1)
    m = import_text([a, tmp_path / "d"], tmp_path / "set", shards=3, val_fraction=0.1)
    stream = np.frombuffer(da + db, dtype=np.uint8)
    assert m["kind"] == "tokens" and m["dtype"] == "uint8" and m["vocab_size"] == 256
    assert m["train_tokens"] == 2700 and m["val"]["tokens"] == 300
    assert [s["sha256"] for s in m["sources"]] == [__import__("hashlib").sha256(d).hexdigest() for d in (da, db)]
    assert check_dataset(tmp_path / "set").ok
    if comm.Get_size() > 1:
        return
    r = open_tokens(tmp_path / "set", comm, batch_size=4, seed=1, window=9)
    assert r.spec.kind == "tokens" and r.spec.vocab_size == 256 and r.train_rows == 2700
    assert r.steps_per_epoch == ((2700 - 8) // 8) // 4
    got = list(r.batches(0))
    assert len(got) == r.steps_per_epoch
    for x, y in got:                        # every window is a run of the stream, shifted by one
        assert x.shape == (4, 8) and np.array_equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            s = bytes(row_x.astype(np.uint8)) + bytes([int(row_y[-1])])
            assert s in stream[:2700].tobytes()
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(r.batches(0, start=5), got[5:]))  # resumable
    assert not np.array_equal(next(r.batches(1))[0], got[0][0])          # a new order per epoch
    val = list(r.test_batches(10))
    assert sum(len(x) for x, _ in val) == (300 - 1) // 8
    assert np.array_equal(val[0][0][0], stream[2700:2708])
    assert len(list(r.test_batches(1, limit=3))) == 3
    r.close()


def test_token_set_damage_and_uint16(tmp_path, comm):
    import h5py

    from mpitrain.data import check_dataset
    from mpitrain.data.tokens import write_token_set

    if comm.Get_size() > 1:
        pytest.skip("serial")
    rng = np.random.default_rng(0)
    m = write_token_set(tmp_path / "w", rng.integers(0, 300, 500), rng.integers(0, 300, 50), vocab_size=300,
                        shards=2, made={}, sources=[])
    assert m["dtype"] == "uint16" and check_dataset(tmp_path / "w").ok
    with h5py.File(tmp_path / "w" / "train-00001.h5", "r+") as f:
        f["tokens"][3] = 299 if f["tokens"][3] != 299 else 298
    rep = check_dataset(tmp_path / "w")
    assert not rep.ok and "checksum mismatch" in rep.problems[0] and "train-00001.h5" in rep.problems[0]


def test_compressor_baseline(tmp_path, comm, capsys):
    import json
    import shutil
    import subprocess

    from mpitrain.cli import main
    from mpitrain.data import import_text
    from mpitrain.data.baseline import compressor_bits

    if comm.Get_size() > 1:
        pytest.skip("serial")
    rng = np.random.default_rng(0)
    noise = bytes(rng.integers(32, 127, size=20_000).astype(np.uint8))   # 95 symbols: ~6.6 bits
    (tmp_path / "n.txt").write_bytes(noise)
    import_text([tmp_path / "n.txt"], tmp_path / "noise", shards=2, val_fraction=0.5)
    b = compressor_bits(tmp_path / "noise")
    assert b["unit"] == "byte" and b["tokens"] == 10_000
    assert 6.5 < b["xz -9"] < 7.2 and 6.5 < b["gzip -9"] < 7.5     # no better than the symbols' entropy
    val = noise[10_000:]
    for tool, key in (("gzip", "gzip -9"), ("xz", "xz -9")):      # the same as the command-line tools
        if shutil.which(tool):
            size = len(subprocess.run([tool, "-9", "-c"], input=val, capture_output=True, check=True).stdout)
            assert b[key] == pytest.approx(8 * size / 10_000, rel=0.01), tool
    cache = json.loads((tmp_path / "noise" / "baselines.json").read_text())
    assert cache["xz -9"] == b["xz -9"] and cache["val_checksum"].startswith("sha256:")
    (tmp_path / "r.txt").write_bytes(b"def f(x):\n    return x\n" * 800)  # repetitive: far below 1 bit
    import_text([tmp_path / "r.txt"], tmp_path / "noise", shards=2, val_fraction=0.5, overwrite=True)
    assert compressor_bits(tmp_path / "noise")["xz -9"] < 0.5          # a new val split: measured again
    assert main(["data", "baseline", str(tmp_path / "noise")]) == 0
    assert "xz -9 0." in capsys.readouterr().out
    assert main(["data", "baseline", str(tmp_path)]) == 1               # not a token set: a clear error
    assert "needs a token data set" in capsys.readouterr().err


def test_make_pycode_small(tmp_path, comm):
    import sys

    from mpitrain.data.tokens import make_pycode, stdlib_sources

    if comm.Get_size() > 1:
        pytest.skip("serial")
    srcs = stdlib_sources()
    rel = [p.as_posix() for p in srcs]
    assert rel == sorted(rel)
    assert not any("/test/" in s or "site-packages" in s or s.rsplit("/", 1)[-1].startswith("test_") for s in rel)
    m = make_pycode(tmp_path / "pc", shards=2, max_bytes=300_000)
    assert m["made"]["params"]["python"] == sys.version.split()[0]
    splits = {s["path"]: s["split"] for s in m["sources"]}
    assert set(splits.values()) == {"train", "val"} and len(splits) == len(m["sources"])
    total = sum(s["bytes"] for s in m["sources"])
    assert total <= 300_000 and m["train_tokens"] + m["val"]["tokens"] == total


@pytest.mark.mpi
def test_mpi_token_reader_ranks_read_disjoint_ranges(comm, shared_tmp):
    from mpitrain.data import open_dataset
    from mpitrain.data.tokens import write_token_set

    if comm.Get_rank() == 0:
        write_token_set(shared_tmp / "t", np.arange(4000) % 251, np.arange(400) % 251, vocab_size=256, shards=3,
                        made={}, sources=[])
    comm.Barrier()
    r = open_dataset(shared_tmp / "t", comm, batch_size=2, seed=0, window=5)
    firsts = {int(x[0, 0]) for x, _ in r.batches(0)}
    spes = comm.allgather(r.steps_per_epoch)
    assert len(set(spes)) == 1 and spes[0] == ((4000 // comm.Get_size() - 4) // 4) // 2
    lo = sum(comm.allgather(r.rows_local)[:comm.Get_rank()])
    assert lo == (4000 * comm.Get_rank()) // comm.Get_size() or abs(lo - 4000 * comm.Get_rank() / comm.Get_size()) < 2
    assert len(firsts) > 1
    n_val = comm.allreduce(sum(len(x) for x, _ in r.test_batches(7)))
    assert n_val == sum(max((len(range(a, b)) - 1) // 4, 0) for a, b in
                        __import__("mpitrain.data.shards", fromlist=["x"]).split_bounds(400, comm.Get_size()))
    r.close()
    with pytest.raises(Exception, match="block_size"):
        open_dataset(shared_tmp / "t", comm, batch_size=2)


# ------------------------------------------------------------------------------------- training

def _gpt_loop(comm, optimizer="adamw", comm_keys=None, **train):
    """A Loop over a tiny float64 GPT (no data set), like tests/test_train.py's ``_trainer``."""
    from mpitrain import config, sync
    from mpitrain.optim import LRSchedule
    from mpitrain.train import Loop, Run

    cfg = config.JobConfig()
    cfg.train.optimizer, cfg.train.weight_decay = optimizer, 0.1
    for k, v in train.items():
        setattr(cfg.train, k, v)
    for k, v in (comm_keys or {}).items():
        setattr(cfg.comm, k, v)
    run = Run(cfg, comm)
    run.xp, run.peak_flops = np, 0.0
    run.model = GPT(**TINY, dtype=np.float64, seed=3)
    run.steps_per_epoch = run.total_steps = 1
    run.strategy = sync.select(cfg)(cfg, comm)
    run.strategy.bind(run)
    run.schedule = LRSchedule("constant", 0.01)
    return Loop(run)


def test_adamw_decays_only_its_segments():
    from mpitrain.optim import Adam, make_optimizer

    p0 = np.linspace(-1, 1, 10)
    g = np.linspace(0.5, -0.3, 10)
    a, b = p0.copy(), p0.copy()
    w = make_optimizer("adamw", a, lr=0.1, weight_decay=0.5, decay_segments=[(2, 5)])
    ref = Adam(b, 0.1)
    w.step(g)
    want = p0.copy()
    want[2:5] *= 1 - 0.1 * 0.5
    ref.params[...] = want
    ref.step(g)
    assert np.array_equal(a, b) and w.state_dict()["kind"] == "adamw"


def test_accumulation_equals_one_big_batch(comm):
    if comm.Get_size() > 1:
        pytest.skip("serial")
    tok = _tokens(B=4, T=6, seed=5)
    acc, ref = _gpt_loop(comm, accum_steps=2), _gpt_loop(comm)
    for _ in range(3):
        acc.accum_step([(tok[:2, :-1], tok[:2, 1:]), (tok[2:, :-1], tok[2:, 1:])])
        ref.train_step((tok[:, :-1], tok[:, 1:]))
    np.testing.assert_allclose(acc.run.model.params, ref.run.model.params, rtol=1e-10, atol=1e-13)
    assert not np.allclose(acc.run.model.params, GPT(**TINY, dtype=np.float64, seed=3).params)


@pytest.mark.mpi
def test_mpi_gpt_n_ranks_match_one_rank_with_n_times_the_batch(comm):
    r, p, b = comm.Get_rank(), comm.Get_size(), 2
    tok = _tokens(B=p * b, T=6, seed=9)   # the same global batch on every rank
    dist, ref = _gpt_loop(comm), _gpt_loop(comm)
    for k in range(3):
        dist.train_step((tok[r * b:(r + 1) * b, :-1], tok[r * b:(r + 1) * b, 1:]))
        ref.run.model.loss_and_grad((tok,))
        ref.run.opt.step(ref.run.model.grads, 0.01)
        dist.run.step = ref.run.step = k + 1
    np.testing.assert_allclose(dist.run.model.params, ref.run.model.params, rtol=1e-10, atol=1e-13)
    digests = comm.allgather(dist.run.model.params.tobytes())
    assert all(d == digests[0] for d in digests), "replicas differ"


@pytest.mark.mpi
def test_mpi_gpt_buckets_with_accumulation_match_one_allreduce(comm):
    """Buckets leave on the GPT's on_grad_ready prefixes, through the accumulation wrapper."""
    r, b = comm.Get_rank(), 2
    tok = _tokens(B=comm.Get_size() * 2 * b, T=6, seed=11)
    mine = tok[r * 2 * b:(r + 1) * 2 * b]
    loops = [_gpt_loop(comm, accum_steps=2, comm_keys={"bucket_bytes": 4000}), _gpt_loop(comm, accum_steps=2)]
    for loop in loops:
        for k in range(2):
            loop.accum_step([(mine[:b, :-1], mine[:b, 1:]), (mine[b:, :-1], mine[b:, 1:])])
            loop.run.step = k + 1
    np.testing.assert_allclose(loops[0].run.model.params, loops[1].run.model.params, rtol=1e-12, atol=1e-14)
    assert loops[0].run.strategy.sent_bytes == loops[1].run.strategy.sent_bytes > 0 or comm.Get_size() == 1


# ---------------------------------------------------------------------------------- end to end

def _mpirun(n, args, cwd, env=None, timeout=240):
    from conftest import run_mpitrain

    return run_mpitrain(n, args, env, timeout, cwd)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from conftest import make_corpus

    return make_corpus(tmp_path_factory, 150_000)


def _tiny_job(corpus, ckpt, *extra):
    keys = [f"data.path={corpus}", f"checkpoint.dir={ckpt}", "model.n_embd=16", "model.block_size=16",
            "train.batch_size=2", "train.accum_steps=2", "train.max_steps=12", "train.eval_every=6", "train.eval_batches=2",
            "checkpoint.every_steps=5", *extra]
    return ["train", "jobs/gpt-tiny.toml"] + [a for k in keys for a in ("--set", k)]


def test_gpt_job_metrics_final_checkpoint_and_bitwise_resume(tmp_path, small_corpus):
    """2 ranks, 2 micro-steps per step: max_steps ends the run with a checkpoint; killed at step 8 and
    resumed from step 5's checkpoint it ends bitwise equal to the uninterrupted run; --metrics-out
    has the LM numbers."""
    from pathlib import Path

    from mpitrain import checkpoint

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "m.json"
    a = _mpirun(2, [*_tiny_job(small_corpus, tmp_path / "a", "train.log_every=4"), "--metrics-out", str(out)], root)
    assert a.returncode == 0, a.stdout + a.stderr
    m = __import__("json").loads(out.read_text())
    _check_lm_lines(a.stdout, m)
    assert m["steps"] == 12 and m["val_loss"] > 0 and m["val_bpb"] == pytest.approx(m["val_loss"] / math.log(2))
    assert m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1 and [e["step"] for e in m["evals"]] == [6, 12]
    assert m["val_loss"] < math.log(256), "it learned something"
    assert checkpoint.latest(tmp_path / "a")["step"] == 12, "a final checkpoint at max_steps"
    from mpitrain import config                      # the effective job beside the checkpoints
    job = config.load(tmp_path / "a" / "job.toml")
    assert job.train.log_every == 4 and job.data.path == str(small_corpus) and job.train.max_steps == 12
    b = _mpirun(2, _tiny_job(small_corpus, tmp_path / "b"), root, env={"MPITRAIN_FAULT": "0:8:kill"})
    assert b.returncode != 0 and checkpoint.latest(tmp_path / "b")["step"] == 5
    c = _mpirun(2, [*_tiny_job(small_corpus, tmp_path / "b"), "--resume"], root)
    assert c.returncode == 0 and "resumed from" in c.stdout, c.stdout + c.stderr
    pa, pb = checkpoint.latest(tmp_path / "a"), checkpoint.latest(tmp_path / "b")
    assert pa["step"] == pb["step"] == 12 and pa["params"].tobytes() == pb["params"].tobytes()
    d = _mpirun(2, [*_tiny_job(small_corpus, tmp_path / "b"), "--resume"], root)
    assert d.returncode == 0 and "already complete (12/12 steps)" in d.stdout, d.stdout + d.stderr

    from mpitrain.cli import main as cli_main        # generate from the job's newest checkpoint
    assert cli_main(["generate", str(root / "jobs" / "gpt-tiny.toml"), "--set", f"checkpoint.dir={tmp_path / 'a'}", "--prompt",
                     "import ", "--tokens", "12", "--top-k", "5", "--seed", "1"]) == 0


def _check_lm_lines(out, m):
    """A language model's lines say tokens/s, the loss of the last interval, val bits; log_every lines have an ETA."""
    import re

    logged = [ln for ln in out.splitlines() if re.match(r"epoch 1/1  step +\d+/12  loss ", ln)]
    assert [int(re.search(r"step +(\d+)/", ln)[1]) for ln in logged] == [4, 8, 12], out
    assert all(re.search(r" [\d.]+ ms/step  [\d,]+ tokens/s  comm \d+%  eta \d+s$", ln) for ln in logged), out
    evals = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(evals) == 2 and all("(last 6 steps)  val loss" in ln and "bits/byte" in ln for ln in evals), out
    done = out.splitlines()[-1]
    assert done.startswith("done: val loss ") and "bits/byte" in done and "tokens/s" in done, out
    assert "test acc" not in out and "samples/s" not in out, out
    assert 0 < m["epochs"] < 1, "the fraction of an epoch that max_steps trained, not 0"


def test_local_sgd_run_that_ends_by_max_steps_mid_epoch_ends_in_agreement(tmp_path, small_corpus):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = _mpirun(2, _tiny_job(small_corpus, tmp_path / "c", "train.sync_every=4", "train.max_steps=6",
                             "train.eval_every=0", "checkpoint.every_steps=0"), root)
    assert p.returncode == 0, p.stdout + p.stderr   # the run's end checks that the replicas agree
    assert "done:" in p.stdout


def test_generate_samples_and_its_errors(tmp_path, capsys):
    from mpitrain import checkpoint
    from mpitrain.cli import main as cli_main
    from mpitrain.generate import sample
    from mpitrain.runtime import UserError

    m = GPT(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=256, seed=1)
    greedy = sample(m, list(b"ab"), 20, temperature=0)
    assert len(greedy) == 20 and greedy == sample(m, list(b"ab"), 20, temperature=0, seed=5)
    assert sample(m, list(b"ab"), 20, top_k=3, seed=2) == sample(m, list(b"ab"), 20, top_k=3, seed=2)
    path = checkpoint.save(tmp_path / "g", params=m.params, optimizer={}, step=3, epoch=0, step_in_epoch=3,
                           config={"model": {"kind": "gpt"}}, ranks=1,
                           extra={"model_config": {"kind": "gpt", **m.config()}})
    assert cli_main(["generate", "--checkpoint", str(path), "--prompt", "ab", "--tokens", "20",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "ab" + bytes(greedy).decode("utf-8", errors="replace") + "\n"
    with pytest.raises(UserError, match="no checkpoint in"):
        cli_main(["generate", "--set", f"checkpoint.dir={tmp_path / 'none'}", "--prompt", "x", "--tokens", "1"])
    mlp = checkpoint.save(tmp_path / "m", params=np.zeros(5, np.float32), optimizer={}, step=1, epoch=0,
                          step_in_epoch=1, config={"model": {"kind": "mlp"}}, ranks=1,
                          extra={"model_config": {"kind": "mlp"}})
    with pytest.raises(UserError, match="kind 'mlp'; generate needs"):
        cli_main(["generate", "--checkpoint", str(mlp), "--prompt", "x", "--tokens", "1"])


def test_data_cli_text_import_pycode_and_a_model_that_does_not_fit(tmp_path, capsys):
    import subprocess
    import sys

    from mpitrain.cli import main as cli_main

    a, _ = _text(tmp_path, 4000)
    assert cli_main(["data", "import", str(a), "--out", str(tmp_path / "t"), "--shards", "2",
                     "--val-fraction", "0.25"]) == 0
    assert "3,000 train tokens in 2 shards, 1,000 val tokens" in capsys.readouterr().out
    assert cli_main(["data", "check", str(tmp_path / "t")]) == 0
    assert cli_main(["data", "make", "pycode", "--out", str(tmp_path / "p"), "--max-bytes", "50000"]) == 0
    assert cli_main(["data", "import", str(a), "--out", str(tmp_path / "t")]) == 1   # exists: --force
    assert "pass --force" in capsys.readouterr().err
    p = subprocess.run([sys.executable, "-m", "mpitrain", "train", "--set", f"data.path={tmp_path / 't'}",
                        "--set", "checkpoint.every=0", "--set", "train.batch_size=2"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "model.kind = 'mlp' trains on features+labels data, but the data set yields tokens (vocab 256)" in p.stderr


def test_new_keys_are_validated():
    from mpitrain import config
    from mpitrain.runtime import UserError

    cfg = config.load(__import__("pathlib").Path(__file__).resolve().parents[1] / "jobs" / "gpt-tiny.toml")
    assert cfg.model.kind == "gpt" and cfg.train.optimizer == "adamw" and cfg.train.max_steps == 60
    for bad, key in [("train.accum_steps=0", "train.accum_steps"), ("model.n_head=3", "model.n_embd"),
                     ("train.max_steps=-1", "train.max_steps"), ("checkpoint.every_steps=-2", "checkpoint.every_steps"),
                     ("model.kind=\"gpt2\"", "model.kind")]:
        with pytest.raises(UserError, match=key):
            config.load(None, [bad])
