"""Failure modes (docs/failure-modes.md): every failure ends every rank fast, non-zero, with one
clear rank-tagged message, and leaves the last good checkpoint intact and resumable.

Serial tests: each one launches ``mpirun`` itself, under a timeout, and checks the exit status,
the wall time (< BOUND s), the one ``[rank r@host] error: ...`` line (no traceback for user
errors) and the files left behind. Faults are injected with ``MPITRAIN_FAULT=rank:step:kind``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import MPIRUN, h5_edit, h5_replace
from mpitrain import checkpoint

PY = sys.executable
BOUND = 30.0                  # every failing job must end within this many seconds
LIMIT = 90                    # hard subprocess timeout (a hang fails the test, never the suite)
TINY = ["--set", "train.epochs=2", "--set", "model.hidden=[16]"]
STEPS = 22                    # steps per epoch: digits (1438 rows, 4 shards), 2 ranks x batch 32
ERROR = re.compile(r"^\[rank (\d+)@[^\]]+\] error: (.*)$")


@dataclass
class Job:
    rc: int
    out: str
    err: str
    wall: float

    @property
    def errors(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ERROR.match(ln)]

    def __str__(self):
        return f"rc={self.rc} wall={self.wall:.1f}s\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def _env(fault=None, **extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    env.pop("MPITRAIN_FAULT", None)
    if fault:
        env["MPITRAIN_FAULT"] = fault
    return env


def _kill_group(p) -> None:
    """End a launched job and everything it started (its own session), then reap it."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


def launch(cmd, cwd, fault=None, timeout=LIMIT) -> Job:
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=_env(fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        _kill_group(p)  # a hung job fails the test and leaves no rank behind
    return Job(p.returncode, out, err, time.monotonic() - t0)


def train(n, tmp, data, *extra, fault=None, ckpt="c", prog=("-m", "mpitrain")) -> Job:
    args = [*prog, "--set", f"data.path={data}", "--set", f"checkpoint.dir={tmp / ckpt}", *TINY, *extra]
    return launch([MPIRUN, "-n", str(n), PY, *args], tmp, fault)


def failed_cleanly(job: Job, *fragments, traceback=False, rank=None) -> str:
    """Non-zero, within BOUND, exactly one rank-tagged error line holding ``fragments``; returns it."""
    assert job.rc != 0, job
    assert job.wall < BOUND, job
    errs = job.errors
    assert len(errs) == 1, f"expected one error line, got {len(errs)}\n{job}"
    for f in fragments:
        assert f in errs[0], f"{f!r} not in the message\n{job}"
    if rank is not None:
        assert ERROR.match(errs[0]).group(1) == str(rank), job
    if not traceback:
        assert "Traceback" not in job.err + job.out, job
    return errs[0]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The default digits set, made once for the whole module (never modified)."""
    d = tmp_path_factory.mktemp("faults-data") / "digits"
    job = launch([PY, "-m", "mpitrain", "data", "make", "digits", "--out", str(d)], d.parent)
    assert job.rc == 0, job
    return d


@pytest.fixture
def data_copy(digits, tmp_path) -> Path:
    """A private copy of the digits set, to damage."""
    d = tmp_path / "d"
    shutil.copytree(digits, d)
    return d


# ============================================================== 1. one rank fails at step k


@pytest.mark.parametrize("kind", ["raise", "exit", "kill"])
def test_one_rank_failing_ends_the_job(digits, tmp_path, kind):
    job = train(2, tmp_path, digits, fault=f"1:30:{kind}")
    assert job.rc != 0 and job.wall < BOUND, job
    if kind == "raise":  # a bug: the traceback, then the one tagged line naming the rank
        failed_cleanly(job, "RuntimeError: injected fault at step 30", traceback=True, rank=1)
    else:  # the rank vanished without a word; the launcher ends the others
        assert not job.errors, job
    # the epoch-1 checkpoint (step 22) survived and is the one --resume would use
    ck = checkpoint.latest(tmp_path / "c")
    assert ck is not None and ck["step"] == STEPS, job


# ================================================= 2. kill -9 from outside, inside the all-reduce


def _rank_pids(marker: str) -> dict[int, int]:
    """{rank: pid} of the processes whose command line holds ``marker`` (hydra sets PMI_RANK)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker not in (d / "cmdline").read_bytes().decode(errors="replace"):
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"PMI_RANK="):
                found[int(kv[9:])] = int(d.name)
    return found


class Watched:
    """A job in its own session whose output (stdout and stderr together) is read as it comes:
    ``wait_for(text)`` returns once a line holds ``text`` -- an event, not a guess at how long it takes."""

    def __init__(self, cmd, cwd, env):
        self.p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        self.lines, self.closed, self._cond = [], False, threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.p.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = 60) -> bool:
        seen = lambda: any(text in ln for ln in self.lines)  # noqa: E731
        with self._cond:
            self._cond.wait_for(lambda: seen() or self.closed, timeout)
            return seen()

    def text(self) -> str:
        """All the output (the job has ended: its pipe is drained first)."""
        self._reader.join(10)
        return "".join(self.lines)


def test_kill_9_during_allreduce_ends_the_job(digits, tmp_path):
    """Rank 1 stops before the all-reduce of step 5 (a hang fault, which says so) while rank 0 goes on
    into the ring and waits there for it; then rank 1 is SIGKILLed. The job must end, promptly."""
    ck = tmp_path / "kill9-ckpt"
    cmd = [MPIRUN, "-n", "2", PY, "-m", "mpitrain", "--set", f"data.path={digits}", "--set",
           f"checkpoint.dir={ck}", "--set", "train.epochs=50", "--set", "checkpoint.every=0"]
    t0 = time.monotonic()
    job = Watched(cmd, tmp_path, _env("1:5:hang"))
    try:
        assert job.wait_for("fault: hanging before the gradient all-reduce of step 5"), "".join(job.lines)
        pids = _rank_pids(str(ck))
        assert set(pids) == {0, 1}, pids
        killed = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        rc = job.p.wait(timeout=LIMIT)
    finally:
        _kill_group(job.p)
    text = job.text()
    print(f"kill -9 of rank 1: the job ended {time.monotonic() - killed:.1f} s later")
    assert rc != 0, text
    assert time.monotonic() - killed < BOUND, text
    assert "signal 9" in text or "Killed" in text, text  # the launcher names the cause
    assert not _rank_pids(str(ck)), "a rank outlived the job"
    assert time.monotonic() - t0 < LIMIT


# =============================================================== 3. one rank stuck: the watchdog


@pytest.mark.parametrize("stuck", [1, 0])
def test_watchdog_names_the_stuck_rank(digits, tmp_path, stuck):
    job = train(2, tmp_path, digits, "--set", "comm.timeout_s=5", fault=f"{stuck}:30:hang")
    if stuck == 1:  # rank 0 collects arrivals and names the ranks that did not come
        msg = failed_cleanly(job, "watchdog: rank(s) [1] did not reach the gradient all-reduce of step 30",
                             "comm.timeout_s=5", "--resume", rank=0)
    else:  # rank 0 itself is stuck: the others wait 5 s + grace, then name it
        msg = failed_cleanly(job, "watchdog: rank 0 did not reach the gradient all-reduce of step 30",
                             "comm.timeout_s=5 s + 2.5 s grace", rank=1)
    assert job.wall >= 5, job
    print(f"stuck rank {stuck}: ended in {job.wall:.1f} s: {msg}")
    # nothing was lost: the epoch-1 checkpoint resumes and the job finishes
    again = train(2, tmp_path, digits, "--set", "comm.timeout_s=5", "--resume")
    assert again.rc == 0, again
    assert f"resumed from {tmp_path / 'c' / 'ckpt-00000022.h5'}" in again.out, again


def test_watchdog_three_ranks_names_only_the_stuck_one(digits, tmp_path):
    job = train(3, tmp_path, digits, "--set", "comm.timeout_s=3", "--set", "checkpoint.every=0",
                fault="2:4:hang")
    failed_cleanly(job, "rank(s) [2] did not reach", "arrived: 0-1", rank=0)


def test_watchdog_backstop_thread_catches_a_rank_stuck_inside_a_collective(tmp_path):
    """Both ranks announce their arrival, then rank 1 never joins the barrier: rank 0's thread aborts."""
    script = tmp_path / "stall.py"
    script.write_text(textwrap.dedent("""
        import time
        from mpitrain import watchdog
        from mpitrain.runtime import get_comm

        comm = get_comm()
        wd = watchdog.start(comm, 2.0)
        wd.arrive(0, "the test barrier")
        if comm.Get_rank() == 1:
            time.sleep(3600)  # sleep-ok: the hung rank is what the watchdog test needs
        with wd.guard("the test barrier", 0):
            comm.Barrier()
        print("not reached")
    """))
    job = launch([MPIRUN, "-n", "2", PY, str(script)], tmp_path)
    failed_cleanly(job, "watchdog: this rank has been inside the test barrier of step 0",
                   "every rank it can see reached it, but it has not finished", rank=0)
    assert "not reached" not in job.out and job.wall >= 2, job


def test_sigterm_ends_a_job_with_a_stuck_rank(digits, tmp_path):
    """Without the watchdog, SIGTERM to mpirun (timeout, kill) must still end a job whose rank 1 hangs.

    SIGTERM asks for a checkpoint at the next step boundary, which rank 0 -- blocked inside the
    all-reduce -- never reaches; hydra forwards the signal but never escalates. The grace thread
    ends the job (MPITRAIN_TERM_GRACE_S s later; 20 s by default).
    """
    cmd = [MPIRUN, "-n", "2", PY, "-m", "mpitrain", "--set", f"data.path={digits}", "--set",
           f"checkpoint.dir={tmp_path / 'c'}", *TINY]
    job = Watched(cmd, tmp_path, _env("1:30:hang", MPITRAIN_TERM_GRACE_S="3"))
    try:  # rank 1 says it stopped; rank 0 is then in (or on its way into) the all-reduce it never leaves
        assert job.wait_for("fault: hanging before the gradient all-reduce of step 30"), "".join(job.lines)
        t0 = time.monotonic()
        job.p.send_signal(signal.SIGTERM)
        rc = job.p.wait(timeout=LIMIT)
        wall = time.monotonic() - t0
    finally:
        _kill_group(job.p)
    text = job.text()
    job = Job(rc, "", text, wall)
    failed_cleanly(job, "got SIGTERM 3 s ago, but the ranks could not stop at a step boundary", "--resume",
                   rank=0)
    assert wall >= 3, job
    assert checkpoint.latest(tmp_path / "c")["step"] == STEPS


# ============================================================== 4. ranks that disagree


def test_allreduce_length_or_dtype_mismatch_raises_on_every_rank(tmp_path):
    script = tmp_path / "mismatch.py"
    script.write_text(textwrap.dedent("""
        import sys

        import numpy as np
        from mpitrain import allreduce
        from mpitrain.runtime import get_comm

        comm = get_comm()
        r = comm.Get_rank()
        cases = {"length": np.ones(10 + r, np.float32),
                 "dtype": np.ones(10, np.float32 if r == 0 else np.float64)}
        for name, buf in cases.items():
            for algorithm in ("ring", "tree", "native"):
                try:
                    allreduce(buf, comm, algorithm=algorithm)
                    line = f"rank {r} {name} {algorithm}: no error"
                except ValueError as e:
                    line = f"rank {r} {name} {algorithm}: ValueError {e}"
                sys.stdout.write(line + "\\n")  # one write: lines of different ranks do not interleave
                sys.stdout.flush()
        comm.Barrier()
    """))
    job = launch([MPIRUN, "-n", "3", PY, str(script)], tmp_path)
    assert job.rc == 0 and job.wall < BOUND, job
    lines = [ln for ln in job.out.splitlines() if ln.startswith("rank ")]
    assert len(lines) == 3 * 2 * 3, job
    assert all("ValueError allreduce: ranks disagree" in ln for ln in lines), job


def test_ranks_with_different_job_config(digits, tmp_path):
    args = ["-m", "mpitrain", "--set", f"data.path={digits}", "--set", f"checkpoint.dir={tmp_path / 'c'}", *TINY]
    job = launch([MPIRUN, "-n", "1", PY, *args, ":", "-n", "1", PY, *args, "--set", "train.lr=0.2"], tmp_path)
    failed_cleanly(job, "the job configuration differs across ranks: train.lr is 0.1 on ranks [0], "
                        "0.2 on ranks [1]", "same job file")
    assert "epoch" not in job.out


def test_ranks_with_different_data_sets_behind_the_same_path(digits, tmp_path):
    """Node-local copies that differ: the same relative data.path, a different set in each rank's cwd."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(digits, a / "d")
    made = launch([PY, "-m", "mpitrain", "data", "make", "synthetic", "--out", str(b / "d"), "--rows", "1500",
                   "--features", "32", "--test-rows", "300"], tmp_path)
    assert made.rc == 0, made
    args = ["-m", "mpitrain", "--set", "data.path=d", "--set", "checkpoint.dir=c", *TINY]
    job = launch([MPIRUN, "-n", "1", "-wdir", str(a), PY, *args, ":", "-n", "1", "-wdir", str(b), PY, *args],
                 tmp_path)
    failed_cleanly(job, "ranks disagree on the data set", "features=64", "features=32")


# ============================================================== 5. data


DAMAGE = {  # how -> (damage shard 1 of DIR, words the message must hold)
    "missing_shard": (lambda s: s.unlink(), "missing (listed in manifest.json)"),
    "truncated": (lambda s: s.write_bytes(s.read_bytes()[: s.stat().st_size // 2]), "truncated"),
    "x_dtype": (lambda s: h5_edit(s, lambda f: h5_replace(f, "x", f["x"][...].astype(np.float64))),
                "x has dtype float64, expected float32"),
    "x_shape": (lambda s: h5_edit(s, lambda f: h5_replace(f, "x", f["x"][:, :60])), "x has shape"),
    "schema": (lambda s: h5_edit(s, lambda f: f.attrs.__setitem__("features", 60)), "schema mismatch"),
    "labels": (lambda s: h5_edit(s, lambda f: f["y"].__setitem__(3, 12)), "labels out of range (found 12"),
    "nan": (lambda s: h5_edit(s, lambda f: f["x"].__setitem__((5, 1), np.nan)), "NaN or Inf"),
    "inf": (lambda s: h5_edit(s, lambda f: f["x"].__setitem__((0, 0), np.inf)), "NaN or Inf"),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_data_set(data_copy, tmp_path, how):
    damage, words = DAMAGE[how]
    damage(data_copy / "train-00001.h5")
    job = train(2, tmp_path, data_copy)
    failed_cleanly(job, str(data_copy / "train-00001.h5"), words)
    assert "epoch" not in job.out and not checkpoint.list_checkpoints(tmp_path / "c")


def test_missing_data_directory_is_not_made_when_dataset_is_empty(tmp_path):
    missing = tmp_path / "nowhere"
    job = train(2, tmp_path, missing, "--set", 'data.dataset=""')
    failed_cleanly(job, f"data set {missing} does not exist", "data make", "data import")
    assert not missing.exists()


# ============================================================== 6. non-finite gradients


def test_nonfinite_gradient_error(digits, tmp_path):
    job = train(2, tmp_path, digits, fault="1:5:nan")
    failed_cleanly(job, "non-finite gradient at step 5", 'train.nonfinite="skip"', rank=0)


def test_nonfinite_gradient_skip_is_collective_and_counted(digits, tmp_path):
    metrics = tmp_path / "m.json"
    # check_every=1: the replicas' parameter hashes are compared after every step, so a rank that
    # skipped alone would fail the job; the watchdog is on too (it must not disturb a healthy run)
    job = train(2, tmp_path, digits, "--set", "train.nonfinite=skip", "--set", "train.check_every=1",
                "--set", "comm.timeout_s=30", "--metrics-out", str(metrics), fault="1:5:nan,0:9:nan")
    assert job.rc == 0, job
    import json

    m = json.loads(metrics.read_text())
    assert m["nonfinite_skipped"] == 2 and m["steps"] == 2 * STEPS and m["test_accuracy"] > 0.5, m
    skipped = [ln for ln in job.out.splitlines() if "non-finite gradient" in ln]
    assert len(skipped) == 2 and skipped[0].startswith("step 5:") and "(1 so far)" in skipped[0], job
    assert "(2 non-finite step(s) skipped)" in job.out, job


# ============================================================== 7. config


BAD_CONFIG = {  # name -> (job file text or None, --set options, words of the message)
    "toml_syntax": ("[train]\nepochs = 2\nlr = = 0.1\n", [], "TOML syntax error: Invalid value (at line 3, column 6)"),
    "toml_unknown_key": ("[train]\nlearning_rate = 0.1\n", [], "bad.toml: unknown key train.learning_rate"),
    "set_unknown_key": (None, ["train.learning_rate=0.1"], "unknown key train.learning_rate; valid keys"),
    "set_unknown_section": (None, ["trian.lr=0.1"], "unknown section [trian]"),
    "wrong_type": (None, ["train.epochs=two"], "train.epochs must be int, got 'two'"),
    "lr_zero": (None, ["train.lr=0"], "--set train.lr=0: train.lr = 0.0 must be > 0"),
    "lr_negative": ("[train]\nlr = -0.5\n", [], "bad.toml: train.lr = -0.5 must be > 0"),
    "batch_zero": (None, ["train.batch_size=0"], "train.batch_size = 0 must be >= 1"),
    "batch_too_big": (None, ["train.batch_size=5000"], "fewer than batch_size=5000"),
    "more_shards_than_rows": (None, ["data.shards=5000", "data.path=NEW", "data.dataset=digits"],
                              "5000 shards requested but only 1438 training rows"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_config(digits, tmp_path, case):
    text, sets, words = BAD_CONFIG[case]
    extra = []
    if text is not None:
        (tmp_path / "bad.toml").write_text(text)
        extra.append(str(tmp_path / "bad.toml"))
    for s in sets:
        extra += ["--set", s.replace("NEW", str(tmp_path / "new"))]
    job = train(2, tmp_path, digits, *extra)
    failed_cleanly(job, words, rank=0)  # every rank fails alike; rank 0 reports once
    assert "epoch" not in job.out


def test_malformed_fault_spec_is_a_user_error(digits, tmp_path):
    job = train(2, tmp_path, digits, fault="1:x:boom")
    failed_cleanly(job, "MPITRAIN_FAULT='1:x:boom': expected rank:step:kind")


# ============================================================== 8. checkpoints


def test_unwritable_checkpoint_dir_fails_before_training(digits, tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    for where, why in ((tmp_path / "a-file" / "ckpt", "Not a directory"),
                       (Path("/proc/mpitrain-ckpt"), "No such file or directory")):
        job = train(2, tmp_path, digits, "--set", f"checkpoint.dir={where}")
        failed_cleanly(job, f"checkpoint.dir {where}: cannot write there ({why})", "checkpoint.every=0", rank=0)
        assert "epoch" not in job.out, job


_FILE_LIMIT = """
import resource, sys
from mpi4py import MPI
from mpitrain.runtime import get_comm
get_comm().allreduce(1)  # MPI's shared-memory files exist now; then cap the size of any file written
lim = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))
from mpitrain.__main__ import main
sys.exit(main())
"""


def test_full_disk(digits, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past N bytes (EFBIG), like a full disk."""
    wrap = tmp_path / "limit.py"
    wrap.write_text(_FILE_LIMIT)
    ok = train(2, tmp_path, digits)
    assert ok.rc == 0, ok
    # full before training: the 4 KiB probe fails
    job = train(2, tmp_path, digits, "--resume", prog=(str(wrap), "1024"))
    failed_cleanly(job, f"checkpoint.dir {tmp_path / 'c'}: cannot write there (File too large)", rank=0)
    # full while writing the next checkpoint (~18 KB): a clean error, the previous one intact, no debris
    job = train(2, tmp_path, digits, "--resume", "--set", "train.epochs=3", prog=(str(wrap), "8192"))
    failed_cleanly(job, f"checkpoint {tmp_path / 'c' / 'ckpt-00000066.h5'}: write failed (File too large; ",
                   "the newest good checkpoint, ckpt-00000044.h5, is intact", rank=0)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["RUN.json", "ckpt-00000022.h5", "ckpt-00000044.h5", "job.toml"], names  # and the owner record
    assert checkpoint.latest(tmp_path / "c")["step"] == 2 * STEPS


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(digits, tmp_path):
    job = train(2, tmp_path, digits, fault="0:30:ckptkill")  # rank 0 dies between write and rename
    assert job.rc != 0 and job.wall < BOUND, job
    c = tmp_path / "c"
    names = sorted(p.name for p in c.iterdir())
    assert names == [".ckpt-00000044.h5.tmp", "RUN.json", "ckpt-00000022.h5", "job.toml"], names
    assert checkpoint.latest(c)["step"] == STEPS
    again = train(2, tmp_path, digits, "--resume")
    assert again.rc == 0, again
    assert f"resumed from {c / 'ckpt-00000022.h5'}: epoch 2, step 22" in again.out, again
    names = sorted(p.name for p in c.iterdir())
    assert names == ["RUN.json", "ckpt-00000022.h5", "ckpt-00000044.h5", "job.toml"], names  # the debris is gone


def test_corrupt_newest_checkpoint_is_skipped_on_resume(digits, tmp_path):
    first = train(2, tmp_path, digits)
    assert first.rc == 0, first
    c = tmp_path / "c"
    newest = c / "ckpt-00000044.h5"
    newest.write_bytes(newest.read_bytes()[:5000])  # torn write / disk damage
    job = train(2, tmp_path, digits, "--resume", "--set", "train.epochs=3")
    assert job.rc == 0, job
    assert f"warning: skipping checkpoint {newest}: truncated or damaged" in job.err, job
    assert f"resumed from {c / 'ckpt-00000022.h5'}: epoch 2, step 22" in job.out, job
    assert checkpoint.latest(c)["step"] == 3 * STEPS


# ============================================================== 9. resume on another number of ranks


def test_resume_on_a_different_number_of_ranks(digits, tmp_path):
    stop = train(2, tmp_path, digits, fault="0:30:usr1")  # a mid-epoch checkpoint, written by 2 ranks
    assert stop.rc == 75, stop
    ck = checkpoint.latest(tmp_path / "c")
    assert (ck["step"], ck["ranks"], ck["step_in_epoch"]) == (31, 2, 31 - STEPS), ck
    metrics = tmp_path / "m.json"
    job = train(3, tmp_path, digits, "--resume", "--metrics-out", str(metrics))
    assert job.rc == 0, job
    assert "written by 2 data-parallel rank(s), now 3: the data is re-partitioned" in job.out, job
    import json

    m = json.loads(metrics.read_text())
    assert m["ranks"] == 3 and m["epochs"] == 2 and m["steps"] > 31, m
    assert checkpoint.latest(tmp_path / "c")["ranks"] == 3


def test_sigterm_delivered_twice_at_once_is_one_kill_but_a_later_one_ends_the_rank(monkeypatch):
    """srun and the batch script's trap may both forward one scancel: that must not skip the checkpoint."""
    from mpitrain import watchdog

    def fire(self, what):
        fired.append(what)
        ended.set()

    monkeypatch.setattr(watchdog.TermGrace, "_fire", fire)
    fired, ended = [], threading.Event()
    old = signal.signal(signal.SIGTERM, lambda *a: None)  # the trainer's stop flag stands in here
    grace = watchdog.TermGrace(grace_s=60)
    try:
        assert grace.install()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the same kill, forwarded a second time
        time.sleep(0.3)  # sleep-ok: still inside the duplicate window (what is tested)
        assert fired == [], fired
        time.sleep(watchdog.TERM_DUPLICATE_S)  # sleep-ok: past the duplicate window (what is tested)
        os.kill(os.getpid(), signal.SIGTERM)  # the user insists
        ended.wait(5)
        assert fired and fired[0].startswith("a second SIGTERM"), fired
    finally:
        grace.restore()
        signal.signal(signal.SIGTERM, old)


def test_term_grace_env_must_be_seconds(monkeypatch):
    from mpitrain.runtime import UserError
    from mpitrain.watchdog import TermGrace

    monkeypatch.setenv("MPITRAIN_TERM_GRACE_S", "abc")
    with pytest.raises(UserError, match="MPITRAIN_TERM_GRACE_S='abc': expected seconds >= 0"):
        TermGrace()
    monkeypatch.setenv("MPITRAIN_TERM_GRACE_S", "-1")
    with pytest.raises(UserError, match=">= 0"):
        TermGrace()
    monkeypatch.setenv("MPITRAIN_TERM_GRACE_S", "2.5")
    assert TermGrace().grace_s == 2.5
