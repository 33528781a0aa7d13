"""The sbatch scripts in slurm/, run on a real SLURM controller and node daemon.

A wrong batch script wastes a queue wait, so these tests submit the scripts users
submit, to a private one-node SLURM that ``slurm/local-cluster.sh`` starts on this
machine (installing the Debian packages when it may: root and apt reachable), and
check what a user would look at: the job's state and exit code, the output file,
the metrics and checkpoint files.

The module starts the cluster once (and stops it at the end if it started it);
without root, apt or SLURM it skips with the reason. Every subprocess has a
timeout and every job a deadline, after which it is cancelled: nothing here can hang.
Jobs are tiny (the digits job, 1-2 epochs); the whole module takes about 2 minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "slurm"
CLUSTER = SLURM_DIR / "local-cluster.sh"
SCRIPTS = ("train.sbatch", "bench.sbatch", "train-gpu.sbatch")
BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
FAKE_GPUS = 4


def _run(cmd, *, env=None, cwd=None, timeout=60):
    """subprocess.run with a timeout, text output, never raising on a non-zero status."""
    try:
        return subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, timeout=timeout,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n"
                    f"stdout: {e.stdout}\nstderr: {e.stderr}")


# ----------------------------------------------------------------------------- without SLURM
@pytest.mark.parametrize("script", [*SCRIPTS, "local-cluster.sh"])
def test_scripts_are_valid_bash(script):
    p = _run(["bash", "-n", SLURM_DIR / script], timeout=30)
    assert p.returncode == 0, p.stderr
    if shutil.which("shellcheck"):
        p = _run(["shellcheck", "-S", "error", SLURM_DIR / script], timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_sbatch_header_has_the_knobs(script):
    text = (SLURM_DIR / script).read_text()
    lines = [ln.split()[1].split("=")[0] for ln in text.splitlines() if ln.startswith("#SBATCH ")]
    for opt in ("--job-name", "--nodes", "--ntasks-per-node", "--time", "--output"):
        assert opt in lines, f"{script}: no #SBATCH {opt}"
    assert "##SBATCH --partition" in text, f"{script}: no (commented) partition line to edit"
    assert "%j" in text, f"{script}: the output file should carry the job id"
    if script != "bench.sbatch":
        assert "--requeue" in lines and "--signal" in lines, f"{script}: needs --requeue and --signal"
        assert re.search(r"^#SBATCH --signal=B:USR1@\d+", text, re.M), \
            f"{script}: the signal must go to the batch shell (B:), which requeues the job"


# ----------------------------------------------------------------------------- the cluster
class Cluster:
    def __init__(self, conf: str, gpus: int):
        self.conf = conf
        self.gpus = gpus

    def env(self, **extra) -> dict:
        """The submitting shell's environment: no leftovers of an enclosing job or MPI launch."""
        drop = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI_", "PMIX_", "HYDRA_", "OMPI_", "MPITRAIN_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.pop("MPI_LOCALRANKID", None)
        env.pop("MPI_LOCALNRANKS", None)
        env["SLURM_CONF"] = self.conf
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        if (Path(sys.prefix) / "bin" / "activate").exists():
            env["MPITRAIN_VENV"] = sys.prefix          # what users do: the script activates it
        else:
            env["MPITRAIN_PYTHON"] = sys.executable
        env.update({k: str(v) for k, v in extra.items()})
        return env


@pytest.fixture(scope="module")
def cluster():
    state = os.environ.get("MPITRAIN_SLURM_DIR", "/tmp/mpitrain-slurm")
    conf = f"{state}/etc/slurm.conf"
    started = False
    if _run([CLUSTER, "status"], timeout=60).returncode != 0:
        if os.environ.get("MPITRAIN_NO_SLURM") == "1":
            pytest.skip("MPITRAIN_NO_SLURM=1")
        if not shutil.which("sbatch") and not shutil.which("apt-get"):
            pytest.skip("SLURM is not installed and there is no apt-get to install it")
        if os.geteuid() != 0 and not shutil.which("slurmd"):
            pytest.skip("SLURM is not installed and installing it needs root")
        env = dict(os.environ, MPITRAIN_SLURM_GPUS=str(FAKE_GPUS))
        t0 = time.monotonic()
        p = _run([CLUSTER, "start"], env=env, timeout=480)
        if p.returncode == 3:
            pytest.skip(f"cannot run a local SLURM here: {p.stderr.strip().splitlines()[-1]}")
        assert p.returncode == 0, f"slurm/local-cluster.sh start failed:\n{p.stdout}\n{p.stderr}"
        print(f"local SLURM started in {time.monotonic() - t0:.1f} s")
        started = True
    env = dict(os.environ, SLURM_CONF=conf)
    node = _run(["scontrol", "show", "node"], env=env, timeout=30).stdout
    m = re.search(r"Gres=gpu:(\d+)", node)
    yield Cluster(conf, int(m.group(1)) if m else 0)
    if started:
        p = _run([CLUSTER, "stop"], timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The digits shards, shared by all jobs of this module (made here: a job makes nothing at a --set
    data.path that names no data set)."""
    from mpitrain.data import make_digits

    d = tmp_path_factory.mktemp("slurm-data") / "digits"
    make_digits(d, shards=4)
    return d


# ----------------------------------------------------------------------------- helpers
def submit(cluster, cwd, script, *args, opts=(), **env):
    p = _run(["sbatch", "--parsable", *opts, SLURM_DIR / script, *args],
             env=cluster.env(**env), cwd=cwd, timeout=30)
    assert p.returncode == 0, f"sbatch failed: {p.stderr}"
    return p.stdout.strip().split(";")[0]


def job(cluster, jid) -> dict:
    p = _run(["scontrol", "-o", "show", "job", jid], env=cluster.env(), timeout=30)
    assert p.returncode == 0, p.stderr
    rec = {}
    for key in ("JobState", "Reason", "Restarts", "ExitCode", "StdOut", "JobName"):
        m = re.search(rf"\b{key}=(\S*)", p.stdout)
        rec[key] = m.group(1) if m else ""
    return rec


def output(cluster, jid) -> str:
    path = Path(job(cluster, jid)["StdOut"])
    return path.read_text(errors="replace") if path.exists() else f"(no output file {path})"


def poll(probe, deadline_s):
    """Call ``probe()`` until it returns something true, or None after ``deadline_s``.

    SLURM tells nobody when a job changes state (short of `sbatch --wait`, which ends only with
    the job), so its controller and the job's output file are asked every 0.25 s, up to a deadline.
    """
    t0 = time.monotonic()
    while True:
        got = probe()
        if got or time.monotonic() - t0 > deadline_s:
            return got or None
        time.sleep(0.25)  # sleep-ok: SLURM has no events to wait on (docstring)


def wait_for(cluster, jid, until, deadline_s, what):
    """Poll the job until ``until(record)``; on the deadline cancel it and fail with its output."""
    seen = {}

    def probe():
        seen["rec"] = rec = job(cluster, jid)
        return rec if until(rec) else None

    rec = poll(probe, deadline_s)
    if rec is None:
        rec = seen["rec"]
        _run(["scancel", jid], env=cluster.env(), timeout=30)
        pytest.fail(f"job {jid}: not {what} after {deadline_s}s (state {rec['JobState']}, "
                    f"reason {rec['Reason']}); output:\n{output(cluster, jid)}")
    return rec


def finish(cluster, jid, deadline_s=120):
    return wait_for(cluster, jid, lambda r: r["JobState"] in TERMINAL, deadline_s, "finished")


def assert_ok(cluster, jid, rec):
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", \
        f"job {jid}: {rec['JobState']} exit {rec['ExitCode']}; output:\n{output(cluster, jid)}"


def epoch_lines(text):
    """Rank 0's per-epoch summary lines, as (epoch, total) pairs."""
    return [(int(a), int(b)) for a, b in re.findall(r"^epoch\s+(\d+)/(\d+)\s+loss", text, re.M)]


def assert_rank0_once(text, epochs):
    got = epoch_lines(text)
    assert sorted(got) == [(e, epochs) for e in range(1, epochs + 1)], \
        f"each epoch line should appear exactly once (rank 0 only); got {got}:\n{text}"
    assert len(re.findall(r"^done: ", text, re.M)) == 1, text


def requeue_now(cluster, jid, *settings):
    """SLURM holds a requeued job for ~2 minutes (BeginTime); let it start in 2 s instead.

    Only once the requeue is complete (the job PENDING for its BeginTime): an update made
    while the old run is still ending is overwritten. And not at once: a job started in the
    same second as its requeue is killed with 'Job credential revoked' (SLURM 22.05)."""
    wait_for(cluster, jid, lambda r: r["JobState"] == "PENDING" and r["Reason"] == "BeginTime", 60,
             "pending after its requeue")
    p = _run(["scontrol", "update", f"JobId={jid}", "StartTime=now+2", *settings], env=cluster.env(), timeout=30)
    assert p.returncode == 0, p.stderr


def usr1_requeue_and_finish(cluster, jid, job_file):
    """`scancel --signal=USR1 --batch JOB`; the job must be requeued; then let it run to the end fast."""
    p = _run(["scancel", "--signal=USR1", "--batch", jid], env=cluster.env(), timeout=30)
    assert p.returncode == 0, p.stderr
    rec = wait_for(cluster, jid, lambda r: r["Restarts"] == "1" or r["JobState"] in TERMINAL, 60, "requeued")
    assert rec["Restarts"] == "1", f"not requeued: {rec}\n{output(cluster, jid)}"
    job_file.write_text(job_file.read_text().replace("step_sleep = 0.2", "step_sleep = 0"))
    requeue_now(cluster, jid)
    rec = finish(cluster, jid)
    assert_ok(cluster, jid, rec)


# ----------------------------------------------------------------------------- tests
@pytest.mark.slurm
def test_local_cluster_start_is_idempotent(cluster):
    p = _run([CLUSTER, "start"], timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "already running" in p.stdout
    p = _run([CLUSTER, "status"], timeout=60)
    assert p.returncode == 0 and re.search(r"\b(idle|mix|alloc)\b", p.stdout), p.stdout + p.stderr


@pytest.mark.parametrize("launcher", ["mpirun", "srun"])
@pytest.mark.parametrize("ntasks", [2, 3])
@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_train_sbatch(cluster, tmp_path, data_dir, launcher, ntasks):
    jid = submit(cluster, tmp_path, "train.sbatch", "--set", "train.epochs=2", "--set", f"data.path={data_dir}",
                 opts=[f"--ntasks-per-node={ntasks}"], MPITRAIN_LAUNCHER=launcher)
    rec = finish(cluster, jid)
    assert_ok(cluster, jid, rec)
    out = output(cluster, jid)
    assert f"{ntasks} task(s)" in out and f"via {launcher}" in out, out
    assert_rank0_once(out, 2)
    tag = f"mpitrain-{jid}"
    assert Path(rec["StdOut"]) == tmp_path / f"{tag}.out"      # the #SBATCH --output=%x-%j.out line
    metrics = json.loads((tmp_path / "runs" / tag / "metrics.json").read_text())
    assert metrics["ranks"] == ntasks, metrics
    assert metrics["epochs"] == 2 and metrics["test_accuracy"] > 0.8, metrics
    assert sorted((tmp_path / "checkpoints" / tag).glob("*.h5")), "no checkpoint in the per-job directory"


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, tmp_path, data_dir):
    """--time=1 with USR1 at 58 s before the end: SLURM signals the batch shell (within its
    ~30 s check period), the trainer checkpoints mid-epoch and exits 75, the script requeues
    the job, and the same job id resumes from the checkpoint."""
    job_file = tmp_path / "job.toml"
    job_file.write_text(f'[train]\nepochs = 30\nstep_sleep = 0.1\n[data]\npath = "{data_dir}"\n')
    jid = submit(cluster, tmp_path, "train.sbatch", "job.toml",
                 opts=["--time=1", "--signal=B:USR1@58"], MPITRAIN_LAUNCHER="mpirun")
    rec = wait_for(cluster, jid, lambda r: r["Restarts"] == "1" or r["JobState"] in TERMINAL, 90,
                   "requeued by its USR1")
    assert rec["Restarts"] == "1", f"not requeued: {rec}\n{output(cluster, jid)}"
    out = output(cluster, jid)
    assert "got USR1" in out and re.search(r"stopped by signal SIGUSR1 .*resume with --resume", out), out
    ckpts = sorted((tmp_path / "checkpoints" / f"mpitrain-{jid}").glob("*.h5"))
    assert ckpts, "no checkpoint written on the signal"
    stopped_at = int(re.search(r"stopped by signal SIGUSR1 at epoch \d+, step (\d+)", out).group(1))
    job_file.write_text(job_file.read_text().replace("step_sleep = 0.1", "step_sleep = 0"))  # a fast second run
    requeue_now(cluster, jid, "TimeLimit=10")     # no second USR1 2 s into the resumed run
    rec = finish(cluster, jid)
    assert_ok(cluster, jid, rec)
    out = output(cluster, jid)
    assert "restart 1" in out and "--resume" in out, out
    assert re.search(rf"resumed from .*ckpt-0*{stopped_at}\.h5", out), out
    assert_rank0_once(out, 30)         # across both runs: nothing repeated, nothing lost
    metrics = json.loads((tmp_path / "runs" / f"mpitrain-{jid}" / "metrics.json").read_text())
    assert metrics["epochs"] == 30 and not metrics["stopped_early"] and metrics["test_accuracy"] > 0.8, metrics


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_usr1_by_hand_requeues_and_resumes_with_srun(cluster, tmp_path, data_dir):
    """`scancel --signal=USR1 --batch JOB`: checkpoint now, requeue, resume (srun launcher)."""
    job_file = tmp_path / "job.toml"
    job_file.write_text(f'[train]\nepochs = 6\nstep_sleep = 0.2\n[data]\npath = "{data_dir}"\n')
    jid = submit(cluster, tmp_path, "train.sbatch", "job.toml", MPITRAIN_LAUNCHER="srun")
    wait_for(cluster, jid, lambda r: r["JobState"] in TERMINAL or epoch_lines(output(cluster, jid)), 60,
             "through its first epoch")
    usr1_requeue_and_finish(cluster, jid, job_file)
    out = output(cluster, jid)
    assert "stopped by signal SIGUSR1" in out and "resumed from" in out, out
    assert_rank0_once(out, 6)
    metrics = json.loads((tmp_path / "runs" / f"mpitrain-{jid}" / "metrics.json").read_text())
    assert metrics["epochs"] == 6 and metrics["ranks"] == 2 and not metrics["stopped_early"], metrics


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_usr1_while_starting_still_requeues(cluster, tmp_path, data_dir):
    """A USR1 that comes before the trainer can checkpoint (the script is still setting up, or
    the ranks are starting) must not lose the job: it is requeued and the next run completes."""
    job_file = tmp_path / "job.toml"
    job_file.write_text(f'[train]\nepochs = 3\nstep_sleep = 0.2\n[data]\npath = "{data_dir}"\n')
    jid = submit(cluster, tmp_path, "train.sbatch", "job.toml")
    wait_for(cluster, jid, lambda r: r["JobState"] != "PENDING", 60, "started")
    usr1_requeue_and_finish(cluster, jid, job_file)
    assert_rank0_once(output(cluster, jid), 3)


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_scancel_checkpoints_and_does_not_requeue(cluster, tmp_path, data_dir):
    """scancel sends TERM: the trainer writes a checkpoint within KillWait; no requeue."""
    jid = submit(cluster, tmp_path, "train.sbatch", "--set", "train.epochs=50", "--set", "train.step_sleep=0.2",
                 "--set", f"data.path={data_dir}", "--set", "checkpoint.every=0")
    wait_for(cluster, jid, lambda r: r["JobState"] in TERMINAL or epoch_lines(output(cluster, jid)), 60,
             "through its first epoch")
    p = _run(["scancel", jid], env=cluster.env(), timeout=30)
    assert p.returncode == 0, p.stderr
    rec = finish(cluster, jid, 60)
    assert rec["JobState"] == "CANCELLED" and rec["Restarts"] == "0", rec
    # SLURM closes the job record at scancel; the ranks write their checkpoint during KillWait and
    # say so (after the rename) in the output: wait for that line, not for time to pass
    said = poll(lambda: "stopped by signal SIGTERM" in output(cluster, jid), 10)
    assert said, f"no 'stopped by signal SIGTERM' after scancel:\n{output(cluster, jid)}"
    ckpt_dir = tmp_path / "checkpoints" / f"mpitrain-{jid}"
    assert sorted(ckpt_dir.glob("*.h5")), f"no checkpoint after scancel:\n{output(cluster, jid)}"


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_bench_sbatch(cluster, tmp_path):
    jid = submit(cluster, tmp_path, "bench.sbatch", "--min", "8B", "--max", "4KiB", "--algorithms", "ring,native",
                 opts=["--nodes=1", "--ntasks-per-node=2"])
    rec = finish(cluster, jid)
    assert_ok(cluster, jid, rec)
    out = output(cluster, jid)
    rows = json.loads((tmp_path / "runs" / f"mpitrain-bench-{jid}" / "bench.json").read_text())["rows"]
    algos = {r["algorithm"] for r in rows}
    assert {"ring", "native"} <= algos, algos
    assert all(r["wrong"] == 0 for r in rows if r["algorithm"] in ("ring", "native")), rows
    assert rows and all(r["ranks"] == 2 for r in rows if r["algorithm"] in ("ring", "native")), rows
    assert len(re.findall(r"wrong results: 0", out)) == 1, out       # the table once, from rank 0


def _gpu_job(cluster, tmp_path, data_dir, launcher, gpu_opt, **env):
    if cluster.gpus < FAKE_GPUS:
        pytest.skip(f"the running SLURM declares {cluster.gpus} GPU(s); start it with "
                    f"MPITRAIN_SLURM_GPUS={FAKE_GPUS} to test GPU binding")
    jid = submit(cluster, tmp_path, "train-gpu.sbatch", "--set", "train.backend=numpy", "--set", "train.epochs=1",
                 "--set", f"data.path={data_dir}",
                 opts=["--nodes=1", f"--ntasks-per-node={FAKE_GPUS}", "--cpus-per-task=1", *gpu_opt],
                 MPITRAIN_LAUNCHER=launcher, **env)
    rec = finish(cluster, jid)
    assert_ok(cluster, jid, rec)
    out = output(cluster, jid)
    table = re.findall(r"^(\d+)\s+\S+\s+(\d+)\s+\d+\s+\S+\s+(\S+)\s*$", out, re.M)   # rank host local pid gpu CVD
    assert len(table) == FAKE_GPUS, f"no per-rank table from `mpitrain info`:\n{out}"
    assert_rank0_once(out, 1)
    return out, {int(r): cvd for r, _, cvd in table}


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_gpu_sbatch_per_node_gres(cluster, tmp_path, data_dir):
    """The script as shipped (--gres=gpu:N per node), mpirun: every rank sees the node's GPUs."""
    out, cvd = _gpu_job(cluster, tmp_path, data_dir, "mpirun", [])
    allgpus = ",".join(map(str, range(FAKE_GPUS)))
    assert set(cvd.values()) == {allgpus}, cvd


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_gpu_sbatch_gpus_per_task_with_srun(cluster, tmp_path, data_dir):
    """--gpus-per-task=1 with srun: SLURM binds one distinct GPU to each rank."""
    out, cvd = _gpu_job(cluster, tmp_path, data_dir, "srun", ["--gpus-per-task=1"])
    assert sorted(cvd.values()) == [str(i) for i in range(FAKE_GPUS)], cvd


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_gpu_sbatch_gpus_per_task_with_mpirun_widens_the_proxy_step(cluster, tmp_path, data_dir):
    """--gpus-per-task=1 with mpirun: hydra starts ONE proxy task per node with srun, which
    would get one GPU for all the node's ranks; the script gives that step all the GPUs.
    A wrapper around python records SLURM_STEP_GPUS as each rank sees it."""
    log = tmp_path / "ranks.log"
    wrapper = tmp_path / "python-wrapper.sh"
    wrapper.write_text(f'#!/bin/bash\necho "$PMI_RANK ${{SLURM_STEP_GPUS:-}}" >> {log}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    _gpu_job(cluster, tmp_path, data_dir, "mpirun", ["--gpus-per-task=1"], MPITRAIN_PYTHON=wrapper)
    seen = {ln.split()[1] for ln in log.read_text().splitlines() if len(ln.split()) == 2}
    assert seen == {",".join(map(str, range(FAKE_GPUS)))}, log.read_text()


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_srun_without_pmi_is_explained(cluster, tmp_path, data_dir):
    """`srun -n 2` without --mpi=pmi2 starts two MPI jobs of one rank each; the trainer must say so."""
    p = _run(["srun", "-n", "2", "--mpi=none", "--time=2", "python", "-m", "mpitrain", "train",
              "--set", "train.epochs=1", "--set", f"data.path={data_dir}",
              "--set", f"checkpoint.dir={tmp_path / 'ck'}"],
             env=cluster.env(), cwd=tmp_path, timeout=120)
    text = p.stdout + p.stderr
    if "--mpi=pmi2" not in text:
        pytest.xfail(f"the trainer does not detect srun without PMI yet (exit {p.returncode}):\n{text[-2000:]}")
    assert p.returncode != 0, text
    assert "each one is an MPI job of size 1" in text or "size 1" in text, text
    assert "Traceback" not in text, text
