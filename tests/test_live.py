"""Live metrics: --log FILE.jsonl and --tensorboard DIR, written as the run goes and read back."""

import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import MPIRUN
from mpitrain.runtime import UserError
from mpitrain.train.live import Live


def _strict(text):
    """JSON lines, refusing NaN / Infinity (the writer must use null)."""
    def no(c):
        raise AssertionError(f"non-JSON constant {c} written")
    return [json.loads(ln, parse_constant=no) for ln in text.splitlines()]


def tb_scalars(logdir):
    """{tag: [(step, value), ...]} from every event file in ``logdir``: TFRecord frames (u64 length,
    u32 crc, data, u32 crc) holding Event protos (tensorboardX's copy of TensorBoard's schema)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for name in sorted(os.listdir(logdir)):
        data, off = open(os.path.join(logdir, name), "rb").read(), 0
        while off + 12 <= len(data):
            (n,) = struct.unpack_from("<Q", data, off)
            ev = event_pb2.Event()
            ev.ParseFromString(data[off + 12:off + 12 + n])
            off += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_records_are_on_disk_before_close(tmp_path):
    pytest.importorskip("tensorboardX")
    live = Live(tmp_path / "run.jsonl", tmp_path / "tb")
    live.record("eval", 5, val_loss=float("nan"), tokens_per_s=np.float32(1.5), note="x")
    live.record("epoch", 9, epoch=1, train_loss=0.25, test=[1.0, float("inf")])
    recs = _strict((tmp_path / "run.jsonl").read_text())  # still open: each line flushed when written
    assert [(r["event"], r["step"]) for r in recs] == [("eval", 5), ("epoch", 9)]
    assert recs[0]["val_loss"] is None and recs[0]["tokens_per_s"] == 1.5 and recs[1]["test"] == [1.0, None]
    sc = tb_scalars(tmp_path / "tb")
    assert sc["eval/tokens_per_s"] == [(5, 1.5)] and sc["epoch/train_loss"] == [(9, 0.25)]
    assert "eval/val_loss" not in sc and "eval/note" not in sc  # NaN and text are not plotted
    live.close()
    Live(tmp_path / "run.jsonl", append=True).record("epoch", 10, epoch=2)
    assert [r["step"] for r in _strict((tmp_path / "run.jsonl").read_text())] == [5, 9, 10]


def test_tensorboard_without_its_library_says_how_to_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboardX"] + ["tensorboardX"]:
        monkeypatch.setitem(sys.modules, name, None)  # an import of it now fails
    with pytest.raises(UserError, match=r"pip install 'mpitrain\[tb\]'"):
        Live(tensorboard=tmp_path / "tb")
    Live(log=tmp_path / "ok.jsonl").close()  # --log alone needs nothing


def test_a_two_rank_run_streams_what_its_metrics_say(tmp_path):
    pytest.importorskip("tensorboardX")
    log, tb, m = tmp_path / "run.jsonl", tmp_path / "tb", tmp_path / "m.json"
    cmd = [MPIRUN, "-n", "2", sys.executable, "-m", "mpitrain", "--set", f"data.path={tmp_path / 'digits'}",
           "--set", "data.dataset=digits", "--set", "checkpoint.every=0", "--set", "train.epochs=2", "--set", "model.hidden=[16]",
           "--set", "train.eval_every=10", "--log", str(log), "--tensorboard", str(tb), "--metrics-out", str(m)]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout + p.stderr
    metrics, recs = json.loads(m.read_text()), _strict(log.read_text())
    epochs = [r for r in recs if r["event"] == "epoch"]
    evals = [r for r in recs if r["event"] == "eval"]
    assert [r["step"] for r in epochs] == [22, 44] and [r["step"] for r in evals] == [10, 20, 30, 40]
    assert len(recs) == 6  # rank 0 alone writes
    for rec, h in zip(epochs, metrics["history"], strict=True):
        assert {k: rec[k] for k in h} == h  # the history, train loss included, as it was streamed
        assert 0 < h["train_loss"] < 3 and 0 <= h["train_accuracy"] <= 1
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    for rec, e in zip(evals, metrics["evals"], strict=True):
        assert {k: rec[k] for k in e} == e and rec["val_bits"] == pytest.approx(e["val_loss"] / math.log(2))
    assert len(os.listdir(tb)) == 1
    sc = tb_scalars(tb)
    for tag, rows in (("epoch/train_loss", epochs), ("epoch/test_accuracy", epochs), ("eval/val_loss", evals)):
        key = tag.split("/")[1]
        assert [s for s, _ in sc[tag]] == [r["step"] for r in rows]
        np.testing.assert_allclose([v for _, v in sc[tag]], [r[key] for r in rows], rtol=1e-6)
