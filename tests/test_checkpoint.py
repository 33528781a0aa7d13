"""Checkpoints: every damaged file is detected (ValueError, which ``latest`` skips), never loaded
with wrong content and never a traceback; strategy state round-trips; older files still load.

Serial tests: ``checkpoint.save``/``load`` need no MPI.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from mpitrain import checkpoint

CONFIG = {"train": {"lr": 0.1, "seed": 3}, "model": {"hidden": [16]}}
STATE = {"residual": np.linspace(-1, 1, 37, dtype=np.float32), "counts": np.arange(5, dtype=np.int64),
         "rounds": 12, "scale": np.float64(0.25), "name": "topk", "history": [1, 2, 3]}


def _save(d, step=7, state=STATE, **kw):
    rng = np.random.default_rng(step)
    return checkpoint.save(
        d, params=rng.standard_normal(101).astype(np.float32),
        optimizer={"kind": "adam", "step": step, "m": rng.standard_normal(101).astype(np.float32),
                   "v": rng.random(101).astype(np.float32)},
        step=step, epoch=step, step_in_epoch=0, config=CONFIG, ranks=2, state=state, **kw)


def _same(a: dict, b: dict) -> bool:
    """Equal content: arrays bitwise (dtype and shape too), everything else by value."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not isinstance(y, dict) or not _same(x, y):
                return False
        elif isinstance(x, np.ndarray):
            if not (isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape
                    and x.tobytes() == y.tobytes()):
                return False
        elif x != y or type(x) is not type(y):
            return False
    return True


def test_round_trip_with_strategy_state(tmp_path):
    p = _save(tmp_path)
    ck = checkpoint.load(p)
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"], ck["ranks"], ck["config"]) == (7, 7, 0, 2, CONFIG)
    assert set(ck["optimizer"]) == {"kind", "step", "m", "v"} and ck["optimizer"]["kind"] == "adam"
    s = ck["strategy"]
    assert set(s) == set(STATE)
    assert s["residual"].dtype == np.float32 and np.array_equal(s["residual"], STATE["residual"])
    assert s["counts"].dtype == np.int64 and np.array_equal(s["counts"], STATE["counts"])
    assert (s["rounds"], s["scale"], s["name"], s["history"]) == (12, 0.25, "topk", [1, 2, 3])
    assert checkpoint.load(_save(tmp_path / "none", state=None))["strategy"] == {}


def test_strategy_state_is_covered_by_the_checksum(tmp_path):
    p = _save(tmp_path)
    with h5py.File(p, "r+") as f:  # an edit through HDF5, the whole-file checksum made to match again
        f["strategy/residual"][3] += 1
    checkpoint._stamp(p)
    with pytest.raises(ValueError, match="checksum mismatch"):
        checkpoint.load(p)


def _flip(p, off, bit):
    with open(p, "r+b") as fh:
        fh.seek(off)
        b = fh.read(1)[0]
        fh.seek(off)
        fh.write(bytes([b ^ (1 << bit)]))


def test_a_flipped_bit_anywhere_is_detected(tmp_path):
    """Every byte of a real checkpoint, one bit at a time: the exact content or ValueError, nothing else."""
    p = _save(tmp_path)
    good = checkpoint.load(p)
    size = p.stat().st_size
    outcomes = {"ValueError": 0, "same": 0}
    for off in range(size):
        bit = off % 8
        _flip(p, off, bit)
        try:
            ck = checkpoint.load(p)
        except ValueError as e:
            assert str(p) in str(e)
            outcomes["ValueError"] += 1
        else:  # only acceptable if nothing that load returns changed
            assert _same(ck, good), f"flipped bit {bit} of byte {off}: load returned other content"
            outcomes["same"] += 1
        finally:
            _flip(p, off, bit)
    assert outcomes["ValueError"] > 0.99 * size, outcomes
    assert _same(checkpoint.load(p), good)  # restored


@pytest.mark.parametrize("edit", ["epoch", "meta_key", "dataset_name", "dtype", "no_checksum", "meta_type"])
def test_edits_through_hdf5_are_detected(tmp_path, edit):
    """The inner checksum covers the metadata and the dataset names, not only the arrays' bytes."""
    p = _save(tmp_path)
    with h5py.File(p, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        if edit == "epoch":
            meta["epoch"] = 8
            f.attrs["meta"] = json.dumps(meta)
        elif edit == "meta_key":
            meta["epocj"] = meta.pop("epoch")
            f.attrs["meta"] = json.dumps(meta)
        elif edit == "dataset_name":
            f.move("optimizer/m", "optimizer/n")
        elif edit == "dtype":
            a = f["params"][()]
            del f["params"]
            f.create_dataset("params", data=a.astype(np.float64))
        elif edit == "no_checksum":
            del f.attrs["checksum"]
        else:
            f.attrs["meta"] = np.arange(3)
    checkpoint._stamp(p)  # as if the file had been written so: only the inner checksum can tell
    with pytest.raises(ValueError) as e:
        checkpoint.load(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "extend", "empty", "header", "garbage", "missing"])
def test_damaged_files_raise_value_error(tmp_path, damage):
    p = _save(tmp_path)
    raw = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(raw[:5000])
    elif damage == "extend":
        p.write_bytes(raw + b"\0" * 100)
    elif damage == "empty":
        p.write_bytes(b"")
    elif damage == "header":
        p.write_bytes(raw.replace(b"MPITRAIN-CKPT 2", b"MPITRAIN-CKPT 3", 1))
    elif damage == "garbage":
        p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 20)  # looks like an old-style file
    else:
        p.unlink()
    with pytest.raises(ValueError):
        checkpoint.load(p)


def test_latest_skips_damaged_newer_checkpoints_with_a_warning(tmp_path, capsys):
    _save(tmp_path, step=7)
    newest = _save(tmp_path, step=14)
    _flip(newest, newest.stat().st_size // 2, 3)
    ck = checkpoint.latest(tmp_path)
    assert ck["step"] == 7
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {newest}: checksum mismatch" in err and "trying the one before" in err


def test_list_marks_a_damaged_checkpoint(tmp_path, capsys):
    import argparse

    _save(tmp_path, step=7)
    p = _save(tmp_path, step=14)
    raw = bytearray(p.read_bytes())
    i = raw.index(b'"epoch": 14')
    raw[i + 10] ^= 0x01  # epoch 14 -> 15 in the stored JSON
    p.write_bytes(bytes(raw))
    assert checkpoint._cmd_list(argparse.Namespace(dir=str(tmp_path))) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{p}  DAMAGED: {p}: checksum mismatch"), out
    assert out[1].endswith("epoch 7  ranks 2  ok"), out


def test_files_from_before_the_header_still_load(tmp_path):
    """A checkpoint of the previous format (no user block, arrays-only checksum) resumes as before."""
    p = tmp_path / "ckpt-00000022.h5"
    arrays = {"params": np.arange(10, dtype=np.float32), "optimizer/velocity": np.ones(10, np.float32)}
    meta = {"step": 22, "epoch": 1, "step_in_epoch": 0, "ranks": 2, "version": "0.1", "config": CONFIG,
            "optimizer_scalars": {"kind": "sgd", "step": 22}}
    with h5py.File(p, "w") as f:
        for k, a in arrays.items():
            f.create_dataset(k, data=a)
        f.attrs["meta"] = json.dumps(meta)
        f.attrs["checksum"] = checkpoint._digest_legacy(arrays)
    ck = checkpoint.latest(tmp_path)
    assert ck["step"] == 22 and ck["strategy"] == {} and ck["optimizer"]["kind"] == "sgd"
    assert np.array_equal(ck["optimizer"]["velocity"], np.ones(10))
    with h5py.File(p, "r+") as f:
        f["params"][0] = 5
    with pytest.raises(ValueError, match="checksum mismatch"):
        checkpoint.load(p)


def test_state_that_json_cannot_hold_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError):
        _save(tmp_path, state={"bad": object()})
    assert not list(tmp_path.iterdir()) or not checkpoint.list_checkpoints(tmp_path)
