"""Atomic HDF5 checkpoints and resume.

    checkpoints/digits/
      ckpt-00000440.h5      params, optimizer state, step, epoch, config, version, checksum
      ckpt-00000418.h5      ... the newest `checkpoint.keep` are kept
      .ckpt-00000462.h5.tmp a write in progress (never read; removed on the next save)

A checkpoint is written by rank 0 only (parameters are replicated) to a
temporary name, flushed and fsync'ed, then renamed over the final name and the
directory fsync'ed: a crash at any moment leaves the previous checkpoint whole.
On resume the newest file whose checksum verifies wins; a corrupt one is
skipped with a warning. Shuffling is derived from (seed, epoch, rank), so the
data order needs no saved RNG stream: the epoch and step within it are enough.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .runtime import UserError, log0, warn

NAME = re.compile(r"^ckpt-(\d{8,})\.h5$")


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def probe(directory: str | Path) -> None:
    """Fail now, before training, if checkpoints cannot be written to ``directory``."""
    d = Path(directory)
    test = d / f".probe-{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        try:
            with open(test, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            with contextlib.suppress(OSError):
                test.unlink()  # also when the write failed (disk full)
    except OSError as e:
        raise UserError(f"checkpoint.dir {d}: cannot write there ({e.strerror or e}); "
                        "choose another with --set checkpoint.dir=PATH or set checkpoint.every=0") from None


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory, *, params, optimizer: dict, step: int, epoch: int, step_in_epoch: int,
         config: dict, ranks: int, keep: int = 3, extra: dict | None = None,
         before_rename=None, state: dict | None = None) -> Path:
    """Write one checkpoint atomically (call on one rank only) and prune old ones.

    ``state``: a synchronization strategy's own state (name -> array or JSON scalar), returned
    by ``load`` as ``ck["strategy"]``.
    """
    d = Path(directory)
    final = d / f"ckpt-{step:08d}.h5"
    tmp = d / f".ckpt-{step:08d}.h5.tmp"
    arrays = {"params": np.asarray(params)}
    scalars = {}
    for k, v in optimizer.items():
        if isinstance(v, np.ndarray):
            arrays[f"optimizer/{k}"] = v
        else:
            scalars[k] = v
    strategy_scalars = {}
    for k, v in (state or {}).items():
        if isinstance(v, np.ndarray):
            arrays[f"strategy/{k}"] = v
        else:
            strategy_scalars[k] = v
    meta = {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "ranks": ranks,
            "version": __version__, "config": config, "optimizer_scalars": scalars,
            "strategy_scalars": strategy_scalars, **(extra or {})}
    failed = None
    with _quiet_h5py_cleanup():
        try:
            d.mkdir(parents=True, exist_ok=True)
            with h5py.File(tmp, "w") as f:
                for k, a in arrays.items():
                    f.create_dataset(k, data=a)
                f.attrs["meta"] = json.dumps(meta)
                f.attrs["checksum"] = _digest(arrays)
                f.flush()
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            if before_rename is not None:  # testing aid: a crash between write and rename
                before_rename()
            os.replace(tmp, final)
            _fsync_dir(d)
        except (OSError, RuntimeError) as e:  # h5py reports failed writes (disk full) as RuntimeError
            failed, f = _io_reason(e), None
        if failed is not None:
            gc.collect()  # free the half-written file's h5py objects here, quietly
    if failed is not None:
        tmp.unlink(missing_ok=True)
        raise UserError(f"checkpoint {final}: write failed ({failed}); the previous checkpoint "
                        "is intact. Free space or change checkpoint.dir, then --resume")
    for old in list_checkpoints(d)[keep:]:
        old.unlink(missing_ok=True)
    for stale in d.glob(".ckpt-*.h5.tmp"):
        if stale != tmp:
            stale.unlink(missing_ok=True)
    return final


@contextlib.contextmanager
def _quiet_h5py_cleanup():
    """Silence h5py's 'Exception ignored in ObjectID.__dealloc__' tracebacks after a failed write.

    When the disk fills, h5py objects of the half-written file fail again as they are freed and
    print tracebacks to stderr (through sys.excepthook and sys.unraisablehook); the UserError
    raised by ``save`` already says it all. Anything not from h5py is passed on.
    """
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def from_h5py(tb) -> bool:
        while tb is not None:
            if "h5py" in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        return False

    def quiet_unraisable(u):
        if not (from_h5py(u.exc_traceback) or "h5py" in repr(getattr(u, "object", None))):
            unraisable(u)

    def quiet_excepthook(typ, value, tb):
        if not from_h5py(tb):
            excepthook(typ, value, tb)

    sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook
    try:
        yield
    finally:
        sys.unraisablehook, sys.excepthook = unraisable, excepthook


def _io_reason(exc: BaseException) -> str:
    """The OS's words for a failed write (``No space left on device``), also from inside h5py's messages."""
    e = exc
    while e is not None:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        m = re.search(r"error message = '([^']+)'", str(e))
        if m:
            return m.group(1)
        e = e.__context__
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def list_checkpoints(directory) -> list[Path]:
    """Checkpoint files in ``directory``, newest (highest step) first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load(path) -> dict:
    """Read and verify one checkpoint; raises ValueError when it is damaged."""
    try:
        with h5py.File(path, "r") as f:
            arrays = {}

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    arrays[name] = obj[()]

            f.visititems(visit)
            meta = json.loads(f.attrs["meta"])
            checksum = f.attrs["checksum"]
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if _digest(arrays) != checksum:
        raise ValueError(f"{path}: checksum mismatch (file damaged)")
    if "params" not in arrays:
        raise ValueError(f"{path}: no params")
    opt = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("optimizer/")}
    opt.update(meta.pop("optimizer_scalars", {}))
    strategy = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("strategy/")}
    strategy.update(meta.pop("strategy_scalars", {}))
    return {"params": arrays["params"], "optimizer": opt, "strategy": strategy, "path": str(path), **meta}


def latest(directory) -> dict | None:
    """The newest checkpoint that verifies; damaged newer ones are skipped with a warning."""
    for p in list_checkpoints(directory):
        try:
            return load(p)
        except ValueError as e:
            warn(f"skipping checkpoint {e}; trying the one before")
    return None


def add_arguments(p):
    sub = p.add_subparsers(dest="ckpt_command", metavar="{list,show}", required=True)
    ls = sub.add_parser("list", help="checkpoints in a directory, newest first, with their state")
    ls.add_argument("dir")
    ls.set_defaults(func=_cmd_list)
    sh = sub.add_parser("show", help="what one checkpoint holds")
    sh.add_argument("file")
    sh.set_defaults(func=_cmd_show)


def _cmd_list(args) -> int:
    files = list_checkpoints(args.dir)
    if not files:
        log0(f"no checkpoints in {args.dir}")
        return 1
    bad = 0
    for p in files:
        try:
            c = load(p)
            log0(f"{p}  step {c['step']}  epoch {c['epoch']}  ranks {c['ranks']}  ok")
        except ValueError as e:
            bad += 1
            log0(f"{p}  DAMAGED: {e}")
    return 1 if bad == len(files) else 0


def _cmd_show(args) -> int:
    try:
        c = load(args.file)
    except ValueError as e:
        raise UserError(str(e)) from None
    log0(json.dumps({k: v for k, v in c.items() if k not in ("params", "optimizer")}, indent=2))
    log0(f"params: {c['params'].size} x {c['params'].dtype}; optimizer state: "
         + ", ".join(f"{k}{getattr(v, 'shape', '')}" for k, v in c["optimizer"].items()))
    return 0


# ------------------------------------------------------------------ which run owns a directory
#
#   checkpoint.dir/RUN.json          {"run_id", "config_digest", "host", "pid"} of the run writing here
#   checkpoint.dir/ckpt-*.h5         that run's checkpoints (meta: run_id, config_digest)
#   checkpoint.dir/previous-<id>-N/  another run's checkpoints, set aside when a new run started here
#
# A fresh run (no --resume) sets aside whatever another run left, so pruning never deletes another
# run's files and --resume never loads them; a resumed run adopts the id of the checkpoint it loads.
# Before every write the owner is checked: a second job that took the directory over makes the
# first one fail with a message instead of both exiting 0 with one's files gone.

OWNER = "RUN.json"


def owner(directory) -> dict | None:
    try:
        return json.loads((Path(directory) / OWNER).read_text())
    except (OSError, ValueError):
        return None


def claim(directory, run_id: str, digest: str) -> None:
    """Rank 0: record ``run_id`` as the run writing checkpoints in ``directory`` (atomically)."""
    import socket

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{OWNER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id, "config_digest": digest, "host": socket.gethostname(),
                               "pid": os.getpid()}) + "\n")
    os.replace(tmp, d / OWNER)


def set_aside(directory) -> tuple[Path, dict] | None:
    """Rank 0, fresh run: move another run's checkpoints (and RUN.json) into ``previous-<id>-N/``."""
    d = Path(directory)
    files = list_checkpoints(d)
    if not files:
        return None
    prev = owner(d) or {}
    rid = re.sub(r"[^0-9A-Za-z]", "", str(prev.get("run_id", ""))) or "unknown"
    n = 1
    while (d / f"previous-{rid}-{n}").exists():
        n += 1
    dest = d / f"previous-{rid}-{n}"
    dest.mkdir()
    for p in [*files, d / OWNER]:
        if p.exists():
            os.replace(p, dest / p.name)
    _fsync_dir(d)
    return dest, {"run_id": rid, "steps": [int(NAME.match(p.name).group(1)) for p in files]}


def check_owner(directory, run_id: str) -> None:
    """Raise UserError when another run has taken ``directory`` over since this one claimed it."""
    now = owner(directory)
    if now is not None and now.get("run_id") != run_id:
        raise UserError(f"checkpoint.dir {directory} now belongs to another run (run {now.get('run_id')}, pid "
                        f"{now.get('pid')} on {now.get('host')}); this run ({run_id}) stops rather than mix "
                        "its checkpoints with that one's (its own are in a previous-* folder there). Run one "
                        "job per checkpoint.dir (--set checkpoint.dir=PATH)")
