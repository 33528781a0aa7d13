"""Atomic HDF5 checkpoints and resume.

    checkpoints/digits/
      ckpt-00000440.h5      params, optimizer and strategy state, step, epoch, config, version
      ckpt-00000418.h5      ... the newest `checkpoint.keep` are kept
      .ckpt-00000462.h5.tmp a write in progress (never read; removed on the next save)

A checkpoint is written by rank 0 only (parameters are replicated) to a
temporary name, flushed and fsync'ed, then renamed over the final name and the
directory fsync'ed: a crash at any moment leaves the previous checkpoint whole.
On resume the newest file that verifies wins; a damaged one is skipped with a
warning. Shuffling is derived from (seed, epoch, rank), so the data order needs
no saved RNG stream: the epoch and step within it are enough.

Two checksums guard every file:

    offset 0    512-byte header (an HDF5 user block, which HDF5 skips):
                "MPITRAIN-CKPT 2\nsha256 <hex>\nbytes <n>\n", zero-padded --
                the SHA-256 of every byte after the header. Checked first, before
                HDF5 parses anything: a damaged HDF5 structure can make the HDF5
                library hang or fail in odd ways, so it never sees a damaged file.
    offset 512  the HDF5 file: datasets params, optimizer/<name>, strategy/<name>;
                attributes meta (JSON: step, epoch, ..., config, scalars) and
                checksum "v2:<hex>" = SHA-256 over the meta JSON and every dataset's
                name, dtype, shape and bytes.

Files written before the header existed (no user block, an arrays-only checksum)
still load. Any failure to read or verify raises ValueError, which ``latest`` skips.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .runtime import UserError, log0, warn
from .units import format_size

NAME = re.compile(r"^ckpt-(\d{8,})\.h5$")
HEADER_BYTES = 512  # the HDF5 user block holding the whole-file checksum
MAGIC = b"MPITRAIN-CKPT 2\n"
_HEADER = re.compile(rb"MPITRAIN-CKPT 2\nsha256 ([0-9a-f]{64})\nbytes ([0-9]{1,20})\n")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CHUNK = 4 << 20


def _digest_legacy(arrays: dict) -> str:
    """The checksum of files written before the header: arrays only."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _digest(meta_json: str, arrays: dict) -> str:
    """v2: the meta JSON and every dataset's name, dtype, shape and bytes, each length-prefixed."""
    h = hashlib.sha256(b"mpitrain-checkpoint-v2\0")

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    put(meta_json.encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        put(k.encode())
        put(a.dtype.str.encode())
        put(repr(tuple(a.shape)).encode())
        put(a.tobytes())
    return "v2:" + h.hexdigest()


def _header(sha: str, n: int) -> bytes:
    text = MAGIC + f"sha256 {sha}\nbytes {n}\n".encode()
    return text + b"\0" * (HEADER_BYTES - len(text))


def _hash_body(fh) -> tuple[str, int]:
    """SHA-256 and length of everything after the header of an open binary file."""
    fh.seek(HEADER_BYTES)
    h, n = hashlib.sha256(), 0
    while chunk := fh.read(_CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def _stamp(path: Path) -> None:
    """Write the whole-file checksum into the header of a closed checkpoint file, and fsync it."""
    with open(path, "rb+") as fh:
        sha, n = _hash_body(fh)
        fh.seek(0)
        fh.write(_header(sha, n))
        fh.flush()
        os.fsync(fh.fileno())


def _verify_header(path) -> bool:
    """True: a headed file whose bytes verify; False: a file from before the header. Else ValueError."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEADER_BYTES)
            if head.startswith(HDF5_SIGNATURE):
                return False
            m = _HEADER.match(head)
            if not m or head != _header(m.group(1).decode(), int(m.group(2))):
                raise ValueError(f"{path}: not a checkpoint, or its header is damaged")
            sha, n = _hash_body(fh)
    except OSError as e:
        raise ValueError(f"{path}: unreadable ({e.strerror or e})") from None
    if n != int(m.group(2)):
        raise ValueError(f"{path}: truncated or damaged (holds {n + HEADER_BYTES} bytes, "
                         f"{int(m.group(2)) + HEADER_BYTES} were written)")
    if sha != m.group(1).decode():
        raise ValueError(f"{path}: checksum mismatch (file damaged)")
    return True


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


def _split_state(group: str, state: dict, arrays: dict) -> dict:
    """Arrays of ``state`` go to ``arrays[group/name]``; the JSON-able rest is returned."""
    scalars = {}
    for k, v in state.items():
        if not isinstance(k, str) or not k or k.startswith("/") or "//" in k:
            raise ValueError(f"checkpoint {group} state: bad name {k!r}")
        if isinstance(v, np.ndarray):
            arrays[f"{group}/{k}"] = v
        else:
            scalars[k] = v.item() if isinstance(v, np.generic) else v
    return scalars


def save(directory, *, params, optimizer: dict, step: int, epoch: int, step_in_epoch: int,
         config: dict, ranks: int, keep: int = 3, extra: dict | None = None,
         before_rename=None, state: dict | None = None) -> Path:
    """Write one checkpoint atomically (call on one rank only) and prune old ones.

    ``state``: a synchronization strategy's own state, name -> NumPy array or JSON-able
    value; ``load`` returns it as ``ck["strategy"]``.
    """
    d = Path(directory)
    final = d / f"ckpt-{step:08d}.h5"
    tmp = d / f".ckpt-{step:08d}.h5.tmp"
    arrays = {"params": np.asarray(params)}
    scalars = _split_state("optimizer", optimizer, arrays)
    strategy = _split_state("strategy", state or {}, arrays)
    meta = {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "ranks": ranks,
            "version": __version__, "config": config, "optimizer_scalars": scalars,
            "strategy_scalars": strategy, **(extra or {})}
    meta_json = json.dumps(meta)  # a value JSON cannot hold is the caller's bug: raised here, nothing written
    failed = None
    with _quiet_h5py_cleanup():
        try:
            d.mkdir(parents=True, exist_ok=True)
            with h5py.File(tmp, "w", userblock_size=HEADER_BYTES) as f:
                for k, a in arrays.items():
                    f.create_dataset(k, data=a)
                f.attrs["meta"] = meta_json
                f.attrs["checksum"] = _digest(meta_json, arrays)
                f.flush()
            _stamp(tmp)
            if before_rename is not None:  # testing aid: a crash between write and rename
                before_rename()
            os.replace(tmp, final)
            _fsync_dir(d)
        except (OSError, RuntimeError) as e:  # h5py reports failed writes (disk full) as RuntimeError
            failed, f = _io_reason(e), None
        if failed is not None:
            gc.collect()  # free the half-written file's h5py objects here, quietly
    if failed is not None:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(f"checkpoint {final}: write failed ({failed}; {_free(d)}); {_what_is_left(d, final)}")
    _remember(final, extra)
    prune(d, keep, (extra or {}).get("run_id"), written=final)
    return final


def _free(d: Path) -> str:
    """``12MiB free there``: the free space of the file system ``d`` is on (or of its nearest parent)."""
    p = d.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{format_size(shutil.disk_usage(p).free)} free there"
    except OSError as e:
        return f"free space unknown: {e.strerror or e}"


def _what_is_left(d: Path, final: Path) -> str:
    """The truth about what a failed write leaves: the newest checkpoint that verifies, or none."""
    files = list_checkpoints(d)
    good = next((p for p in files if _good(p) is not None), None)
    if good is not None:
        return f"the newest good checkpoint, {good.name}, is intact. Free space or change checkpoint.dir, then --resume"
    what = "none of the checkpoints there verifies" if files else "there is no earlier checkpoint"
    return f"{what}: nothing to resume from. Free space or change checkpoint.dir and start again"


# What this process knows of checkpoint files, by path: ((size, mtime_ns, inode), verifies, run_id). Filled
# by ``load`` and ``save``, so pruning reads each file at most once per process (a damaged one too).
_VERIFIED: dict[str, tuple[tuple, bool, str | None]] = {}


def _stat_key(p: Path) -> tuple | None:
    try:
        st = p.lstat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _remember(p: Path, meta: dict | None, ok: bool = True) -> None:
    key = _stat_key(Path(p))
    if key is not None:
        _VERIFIED[str(p)] = (key, ok, (meta or {}).get("run_id"))


def _good(p: Path):
    """(run_id,) of a regular checkpoint file that verifies (read once, then remembered); None otherwise."""
    key = _stat_key(p)
    if key is None:
        return None
    hit = _VERIFIED.get(str(p))
    if hit is None or hit[0] != key:
        try:
            load(p)
        except ValueError:
            _remember(p, None, ok=False)
        hit = _VERIFIED.get(str(p))
    return (hit[2],) if hit is not None and hit[0] == key and hit[1] else None


def prune(d: Path, keep: int, run_id: str | None, written: Path | None = None) -> list[Path]:
    """Delete this run's own verified checkpoints beyond the newest ``keep`` (never the one just
    ``written``); damaged files, directories and other runs' files are left alone. Returns the deleted."""
    mine = [p for p in list_checkpoints(d) if (g := _good(p)) is not None and g[0] == run_id]
    gone = []
    for old in mine[max(keep, 1):]:
        if old != written:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
                gone.append(old)
    for stale in d.glob(".ckpt-*.h5.tmp"):
        if stale.is_file() and not stale.is_symlink():
            with contextlib.suppress(OSError):
                stale.unlink()
    return gone


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
    """The OS's words for a failed write (``No space left on device``), one short line, also from inside
    h5py's messages (never their file descriptors, buffer addresses and offsets)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and (e.strerror or isinstance(e.errno, int) and e.errno > 0):
            return e.strerror or os.strerror(e.errno)
        text = str(e)
        m = re.search(r"error message = '([^'\n]+)'", text) or re.search(r"\berrno = ([0-9]+)", text)
        if m:
            return m.group(1) if not m.group(1).isdigit() else os.strerror(int(m.group(1)))
        todo += [e.__cause__, e.__context__]
    first = " ".join(str(exc).split())  # one line
    first = re.sub(r"\s*\(.*", "", first) or type(exc).__name__  # HDF5's details are in parentheses
    return first[:160]


def list_checkpoints(directory) -> list[Path]:
    """Checkpoint files in ``directory``, newest (highest step) first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


REQUIRED = {"step": int, "epoch": int, "step_in_epoch": int, "ranks": int, "config": dict}


def _read_h5(path) -> tuple[str, dict, str]:
    """(meta JSON, arrays, stored checksum); any failure of h5py on a damaged file -> ValueError."""
    try:
        with h5py.File(path, "r") as f:
            arrays = {}

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    arrays[name] = obj[()]

            f.visititems(visit)
            meta_json, checksum = f.attrs["meta"], f.attrs["checksum"]
        if isinstance(meta_json, bytes):
            meta_json = meta_json.decode("utf-8")
        if isinstance(checksum, bytes):
            checksum = checksum.decode("ascii")
        if not isinstance(meta_json, str) or not isinstance(checksum, str):
            raise TypeError("meta and checksum must be strings")
    except Exception as e:  # noqa: BLE001 - OSError, KeyError, RuntimeError, TypeError, ...: all damage
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {first})" if first else
                         f"{path}: unreadable ({type(e).__name__})") from None
    return meta_json, arrays, checksum


def load(path) -> dict:
    """Read and verify one checkpoint; raises ValueError (and nothing else) when it is damaged.

    Returns {"params", "optimizer" (arrays and scalars), "strategy" (the same; {} when none
    was saved), "path", "step", "epoch", "step_in_epoch", "ranks", "config", "version",
    and the ``extra`` keys}.
    """
    headed = _verify_header(path)
    meta_json, arrays, checksum = _read_h5(path)
    expected = _digest(meta_json, arrays) if headed else _digest_legacy(arrays)
    if checksum != expected:
        raise ValueError(f"{path}: checksum mismatch (file damaged)")
    try:
        meta = json.loads(meta_json)
    except ValueError as e:
        raise ValueError(f"{path}: unreadable metadata ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: unreadable metadata (not a JSON object)")
    bad = [k for k, t in REQUIRED.items() if not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)]
    if bad or not isinstance(meta.get("optimizer_scalars", {}), dict) \
            or not isinstance(meta.get("strategy_scalars", {}), dict):
        raise ValueError(f"{path}: damaged metadata (missing or wrong: {', '.join(bad) or 'scalars'})")
    if "params" not in arrays:
        raise ValueError(f"{path}: no params")
    opt = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("optimizer/")}
    opt.update(meta.pop("optimizer_scalars", {}))
    strategy = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("strategy/")}
    strategy.update(meta.pop("strategy_scalars", {}))
    _remember(Path(path), meta)
    return {"params": arrays["params"], "optimizer": opt, "path": str(path), **meta, "strategy": strategy}


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
    aside = _list_aside(args.dir)
    if not files:
        log0(f"no checkpoints in {args.dir}" + (" (but in the folders set aside below)" if aside else ""))
        for line in aside:
            log0(line)
        return 1
    bad = 0
    for p in files:
        try:
            c = load(p)
            log0(f"{p}  step {c['step']}  epoch {c['epoch']}  ranks {c['ranks']}  ok")
        except ValueError as e:
            bad += 1
            log0(f"{p}  DAMAGED: {e}")
    for line in aside:
        log0(line)
    return 1 if bad == len(files) else 0


def _list_aside(directory) -> list[str]:
    """One line per ``previous-*`` folder: another run's checkpoints a fresh run set aside, and how to resume it."""
    d = Path(directory)
    out = []
    for sub in sorted(d.glob("previous-*")) if d.is_dir() else []:
        files = list_checkpoints(sub)
        steps = ", ".join(NAME.match(p.name).group(1).lstrip("0") or "0" for p in files) or "none"
        out.append(f"{sub}/  set aside: another run's {len(files)} checkpoint(s) (steps {steps}); continue it with "
                   f"--set checkpoint.dir={sub} --resume")
    return out


def _cmd_show(args) -> int:
    try:
        c = load(args.file)
    except ValueError as e:
        raise UserError(str(e)) from None
    log0(json.dumps({k: v for k, v in c.items() if k not in ("params", "optimizer", "strategy")}, indent=2))
    log0(f"params: {c['params'].size} x {c['params'].dtype}; optimizer state: "
         + ", ".join(f"{k}{getattr(v, 'shape', '')}" for k, v in c["optimizer"].items()))
    if c["strategy"]:
        log0("strategy state: " + ", ".join(f"{k}{getattr(v, 'shape', '')}" if isinstance(v, np.ndarray)
                                            else f"{k}={v!r}" for k, v in c["strategy"].items()))
    return 0


# ------------------------------------------------------------------ which run owns a directory
#
#   checkpoint.dir/RUN.json          {"run_id", "config_digest", "host", "pid"} of the run writing here
#   checkpoint.dir/ckpt-*.h5         that run's checkpoints (meta: run_id, config_digest)
#   checkpoint.dir/job.toml          that run's effective job: every key after defaults, job file, --set
#   checkpoint.dir/previous-<id>-N/  another run's checkpoints, set aside when a new run started here
#
# A fresh run (no --resume) sets aside whatever another run left, so pruning never deletes another
# run's files and --resume never loads them; a resumed run adopts the id of the checkpoint it loads.
# Before every write the owner is checked: a second job that took the directory over makes the
# first one fail with a message instead of both exiting 0 with one's files gone.

OWNER = "RUN.json"
JOB = "job.toml"  # the effective job of the run that owns the directory (every key resolved)


def owner(directory) -> dict | None:
    try:
        return json.loads((Path(directory) / OWNER).read_text())
    except (OSError, ValueError):
        return None


def claim(directory, run_id: str, digest: str, job: str | None = None) -> None:
    """Rank 0: record ``run_id`` as the run writing checkpoints in ``directory`` (atomically), and its
    effective job (``job``, TOML text) as job.toml beside them."""
    import socket

    d = Path(directory)
    tmp = d / f".{OWNER}.{os.getpid()}.tmp"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if job is not None:
            jtmp = d / f".{JOB}.{os.getpid()}.tmp"
            jtmp.write_text(job)
            os.replace(jtmp, d / JOB)
        tmp.write_text(json.dumps({"run_id": run_id, "config_digest": digest, "host": socket.gethostname(),
                                   "pid": os.getpid()}) + "\n")
        os.replace(tmp, d / OWNER)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(f"checkpoint.dir {d}: cannot record this run in {OWNER} ({_io_reason(e)}; {_free(d)}); "
                        f"{_what_is_left(d, d / OWNER)}") from None


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
    for p in [*files, d / OWNER, d / JOB]:
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
