"""Issue 27, round 3, checkpoints: a resume compares the model it builds with the one the checkpoint
records (not the parameter count alone); a failed write says in one line what failed, the free space
and what is left; pruning deletes only this run's own verified files (docs/failure-modes.md)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from mpitrain import checkpoint, models
from mpitrain.models import GPT, MLP
from mpitrain.models.graph_mlp import GraphMLP
from mpitrain.models.mpnn import MPNN
from mpitrain.runtime import UserError
from test_faults import BOUND, STEPS, digits, failed_cleanly, train  # noqa: F401

# (model A, model B): the same parameter count, another model
SAME_COUNT = [
    (lambda: GPT(1, 2, 8, 8, 32), lambda: GPT(1, 4, 8, 8, 32), ["model.n_head 2 != 4"]),
    (lambda: MLP(10, [8, 16], 10), lambda: MLP(10, [16, 8], 10), ["model.hidden [8, 16] != [16, 8]"]),
    (lambda: MLP(10, [8], 10, "relu"), lambda: MLP(10, [8], 10, "tanh"), ["model.activation 'relu' != 'tanh'"]),
    (lambda: GraphMLP(10, [8, 16], 10), lambda: GraphMLP(10, [16, 8], 10), ["model.hidden [8, 16] != [16, 8]"]),
    (lambda: MPNN(4, 0, 2, readout="sum"), lambda: MPNN(4, 0, 2, readout="mean"), ["model.readout 'sum' != 'mean'"]),
    (lambda: MPNN(4, 0, 2, residual=False), lambda: MPNN(4, 0, 2, residual=True), ["model.residual False != True"]),
    (lambda: GPT(1, 2, 8, 8, 32), lambda: MLP(10, [8], 10), ["model.kind 'gpt' != 'mlp'"]),
]


def _save_model(d, model, step=1, extra=None, record=True):
    ex = dict(models.record(model) if record else {}, **(extra or {}))
    return checkpoint.save(d, params=model.params, optimizer={}, step=step, epoch=0, step_in_epoch=step,
                           config={}, ranks=1, extra=ex)


@pytest.mark.parametrize("a, b, words", SAME_COUNT)
def test_a_model_of_another_shape_is_refused_naming_the_keys(tmp_path, a, b, words):
    m1, m2 = a(), b()
    if m1.kind == m2.kind:
        assert m1.n_params == m2.n_params, "the case needs an equal parameter count"
    ck = checkpoint.load(_save_model(tmp_path, m1))
    with pytest.raises(UserError) as e:
        models.check(ck, m2)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)
    models.check(ck, a())  # the same model resumes


def test_tensor_shapes_are_compared_when_the_config_is_silent(tmp_path):
    """A checkpoint that records only tensors (or a config without the differing key) is still checked
    by names and shapes; one with neither by the parameter count."""
    m1, m2 = MLP(10, [8, 16], 10), MLP(10, [16, 8], 10)
    rec = models.record(m1)
    ck = checkpoint.load(_save_model(tmp_path / "t", m1, record=False, extra={"model_tensors": rec["model_tensors"]}))
    with pytest.raises(UserError, match=r"tensor fc0\.W \[10, 8\] != \[10, 16\]"):
        models.check(ck, m2)
    partial = checkpoint.load(_save_model(tmp_path / "p", m1, record=False,
                                          extra={"model_config": {"kind": "mlp", "hidden": [8, 16]}}))
    models.check(partial, MLP(10, [8, 16], 10, "tanh"))  # an older record without activation and dtype
    with pytest.raises(UserError, match=r"model\.hidden \[8, 16\] != \[16, 8\]"):
        models.check(partial, m2)
    old = checkpoint.load(_save_model(tmp_path / "o", m1, record=False))
    models.check(old, m2)       # nothing recorded but the count: it matches, as before
    with pytest.raises(UserError, match="parameter count 402 != "):
        models.check(old, MLP(10, [9], 10))


def test_resume_with_another_activation_is_one_line_and_loses_nothing(digits, tmp_path):  # noqa: F811
    """End to end: 1 rank writes, 2 ranks resume with a same-count model: refused on every rank in one
    line naming the key, and the checkpoints are untouched."""
    first = train(1, tmp_path, digits)
    assert first.rc == 0, first
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    job = train(2, tmp_path, digits, "--resume", "--set", "model.activation=\"tanh\"")
    failed_cleanly(job, "holds another model than this job's", "model.activation 'relu' != 'tanh'", rank=0)
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == before


# ----------------------------------------------------------------------------- a failed write


def _fail_writes(monkeypatch, exc):
    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(checkpoint, "_stamp", boom)


H5_ENOSPC = OSError("Unable to synchronously create dataset (file write failed: time = Thu Dec  3 09:00:00 2026\n"
                    ", filename = '/x/.ckpt-00000002.h5.tmp', file descriptor = 5, errno = 28, error message = "
                    "'No space left on device', buf = 0x55d0c8a1e2a0, total write size = 4096, bytes this sub-write "
                    "= 4096, bytes actually written = 18446744073709551615, offset = 0)")


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), H5_ENOSPC,
                                 RuntimeError("Can't decrement id ref count (errno = 28,\n buf = 0x1)")])
def test_a_full_disk_is_one_true_line(tmp_path, monkeypatch, exc):
    """Disk full (simulated): one line with what failed, the path, the free space and what is left --
    no earlier checkpoint, or the newest good one -- and nothing of the failed write remains."""
    m = MLP(4, [3], 2)
    _fail_writes(monkeypatch, exc)
    with pytest.raises(UserError) as e:
        _save_model(tmp_path / "c", m, step=2)
    msg = str(e.value)
    assert f"checkpoint {tmp_path / 'c' / 'ckpt-00000002.h5'}: write failed (No space left on device; " in msg
    assert " free there)" in msg and "there is no earlier checkpoint: nothing to resume from" in msg
    assert "\n" not in msg and "0x" not in msg and "descriptor" not in msg and "intact" not in msg
    monkeypatch.undo()
    _save_model(tmp_path / "c", m, step=1)
    _fail_writes(monkeypatch, exc)
    with pytest.raises(UserError, match=r"the newest good checkpoint, ckpt-00000001\.h5, is intact\. .*--resume"):
        _save_model(tmp_path / "c", m, step=2)
    (tmp_path / "c" / "ckpt-00000001.h5").write_bytes(b"damaged")
    with pytest.raises(UserError, match="none of the checkpoints there verifies: nothing to resume from"):
        _save_model(tmp_path / "c", m, step=3)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["ckpt-00000001.h5"]


def test_full_disk_during_a_first_run_says_there_is_no_earlier_checkpoint(digits, tmp_path):  # noqa: F811
    """RLIMIT_FSIZE (EFBIG) lets the 4 KiB probe through but not the first ~18 KB checkpoint."""
    from test_faults import _FILE_LIMIT

    wrap = tmp_path / "limit.py"
    wrap.write_text(_FILE_LIMIT)
    job = train(2, tmp_path, digits, prog=(str(wrap), "8192"))
    failed_cleanly(job, f"checkpoint {tmp_path / 'c' / f'ckpt-{STEPS:08d}.h5'}: write failed (File too large; ",
                   "there is no earlier checkpoint: nothing to resume from", rank=0)
    assert "intact" not in job.err


# ----------------------------------------------------------------------------- pruning


def _run_files(d, run, steps, model):
    return [_save_model(d, model, step=s, extra={"run_id": run}) for s in steps]


def test_pruning_deletes_only_this_runs_verified_files(tmp_path):
    """A directory named like a checkpoint, damaged files (newer and older), another run's files: all stay;
    this run keeps its newest `keep` good ones, including the one it resumed from when it is among them."""
    d, m = tmp_path / "c", MLP(4, [3], 2)
    d.mkdir()
    (d / "ckpt-00000099.h5").mkdir()                                   # a sub-directory, newest by name
    (d / "ckpt-00000098.h5").write_bytes(b"damaged")                   # damaged, newer than everything
    (d / "ckpt-00000001.h5").write_bytes(b"damaged too")
    other = _run_files(d, "other", [2], m)
    mine = _run_files(d, "me", [3, 4], m)
    checkpoint.latest(d)                                                # a resume reads (and skips) the damaged
    new = _run_files(d, "me", [5], m)
    names = sorted(p.name for p in d.iterdir())
    assert names == ["ckpt-00000001.h5", "ckpt-00000002.h5", "ckpt-00000003.h5", "ckpt-00000004.h5",
                     "ckpt-00000005.h5", "ckpt-00000098.h5", "ckpt-00000099.h5"], names
    _save_model(d, m, step=6, extra={"run_id": "me"})                 # keep = 3: only step 3 goes
    left = {p.name for p in d.iterdir()}
    assert mine[0].name not in left and {mine[1].name, new[0].name, other[0].name} <= left
    assert {"ckpt-00000098.h5", "ckpt-00000099.h5", "ckpt-00000001.h5"} <= left
    assert checkpoint.prune(d, 1, "me") == [d / "ckpt-00000005.h5", d / "ckpt-00000004.h5"]
    assert checkpoint.latest(d)["step"] == 6


def test_resume_into_a_directory_with_damage_and_a_subdirectory(digits, tmp_path):  # noqa: F811
    """End to end (2 ranks, keep = 1): the run resumes from its good checkpoint, writes the next ones,
    exits 0; the damaged files and the directory are still there, and the newest good file is its own."""
    first = train(2, tmp_path, digits, "--set", "train.epochs=1", "--set", "checkpoint.keep=1")
    assert first.rc == 0, first
    c = tmp_path / "c"
    (c / "ckpt-99999999.h5").mkdir()
    (c / "ckpt-99999998.h5").write_bytes(b"not a checkpoint")
    job = train(2, tmp_path, digits, "--resume", "--set", "checkpoint.keep=1")
    assert job.rc == 0 and "Traceback" not in job.err, job
    assert f"resumed from {c / f'ckpt-{STEPS:08d}.h5'}" in job.out, job
    names = sorted(p.name for p in c.iterdir())
    assert names == ["RUN.json", f"ckpt-{2 * STEPS:08d}.h5", "ckpt-99999998.h5", "ckpt-99999999.h5", "job.toml"], names
    assert checkpoint.latest(c)["step"] == 2 * STEPS


def test_stale_temporary_directories_are_left_alone(tmp_path):
    d, m = tmp_path / "c", MLP(4, [3], 2)
    d.mkdir()
    (d / ".ckpt-00000007.h5.tmp").mkdir()
    (d / ".ckpt-00000008.h5.tmp").write_bytes(b"debris")
    _save_model(d, m, step=9)
    assert sorted(os.listdir(d)) == [".ckpt-00000007.h5.tmp", "ckpt-00000009.h5"]


def test_a_full_disk_while_claiming_the_directory_is_one_line(tmp_path, monkeypatch):
    from pathlib import Path

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError) as e:
        checkpoint.claim(tmp_path / "c", "abc", "digest")
    msg = str(e.value)
    assert f"checkpoint.dir {tmp_path / 'c'}: cannot record this run in RUN.json (No space left on device; " in msg
    assert "there is no earlier checkpoint" in msg and "\n" not in msg
    assert os.listdir(tmp_path / "c") == []
