"""MPI jobs across emulated hosts: network namespaces on this machine (tools/netns-hosts.sh).

    root namespace: mpiexec ---- bridge mptbr0 ----+---- mpt-h1 (eth0 10.77.0.1): ranks 0..
                                                   +---- mpt-h2 (eth0 10.77.0.2): ranks ..
                                                   +---- mpt-h3 (eth0 10.77.0.3): ranks ..

The module starts three hosts once (and always removes them), then checks what a multi-host
run must get right: ranks land on the hosts in blocks, MPI sees one shared-memory node per
host, the bytes between hosts really cross the veths (and those within a host do not), the
collectives and the bench are correct over TCP, and a short training run converges. The first
test checks that ``run`` and ``stop`` leave nothing behind, also after a failure or Ctrl-C.

Needs root and working ``ip netns``; skips with the reason otherwise. Every subprocess has a
timeout. The module takes about 15 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.hosts

ROOT = Path(__file__).resolve().parents[1]
HOSTS_SH = ROOT / "tools" / "netns-hosts.sh"
STATE = Path(os.environ.get("MPITRAIN_NETNS_DIR", "/tmp/mpitrain-netns"))
BIN = Path(sys.executable).parent
K = 3
PY = str(sys.executable)

PROBE = """
import json, socket
from mpi4py import MPI
c = MPI.COMM_WORLD
node = c.Split_type(MPI.COMM_TYPE_SHARED)
row = dict(rank=c.rank, host=socket.gethostname(), proc=MPI.Get_processor_name(),
           node_size=node.size, node_ranks=node.allgather(c.rank))
rows = c.gather(row)
if c.rank == 0:
    print("ROWS " + json.dumps(rows))
"""


def _env() -> dict:
    """A clean launching environment: the venv first on PATH, no leftovers of an enclosing MPI job."""
    drop = ("PMI_", "PMIX_", "HYDRA_", "OMPI_", "SLURM_", "MPITRAIN_FAULT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


def _run(cmd, *, timeout=60, cwd=None, **kw):
    try:
        return subprocess.run([str(c) for c in cmd], env=_env(), cwd=cwd, timeout=timeout,
                              capture_output=True, text=True, **kw)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\nstdout: {e.stdout}\nstderr: {e.stderr}")


def _mpirun(n, *cmd, ppn=None, timeout=60, cwd=None):
    opts = ["--ppn", str(ppn)] if ppn else []
    return _run([HOSTS_SH, "mpirun", n, *opts, "--", *cmd], timeout=timeout, cwd=cwd)


def _ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def _cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, bridge)"
    for tool in ("ip", "unshare"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    name = f"mpt-probe-{os.getpid()}"
    p = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=20)
    if p.returncode != 0:
        return f"ip netns does not work here: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
    return None


def _ours() -> list[str]:
    """Everything of ours that exists now: namespaces, links, hosts files, the state dir."""
    left = [ln.split()[0] for ln in _run(["ip", "netns", "list"]).stdout.splitlines()
            if re.match(r"mpt-h\d+\b", ln)]
    left += re.findall(r"^\d+: (mpt-v\d+|mptbr0)\b", _run(["ip", "-o", "link", "show"]).stdout, re.M)
    left += [str(p) for p in Path("/etc/netns").glob("mpt-h*")] if Path("/etc/netns").exists() else []
    left += [str(STATE)] if STATE.exists() else []
    return left


@pytest.fixture(scope="module")
def can_run():
    reason = _cannot_run()
    if reason:
        pytest.skip(reason)
    if _ours():
        pytest.skip(f"emulated hosts are already up ({', '.join(_ours())}): tools/netns-hosts.sh stop")


@pytest.fixture(scope="module")
def hosts(can_run):
    t0 = time.monotonic()
    _ok(_run([HOSTS_SH, "start", K], timeout=60))
    print(f"{K} hosts up in {time.monotonic() - t0:.1f} s")
    try:
        yield [f"mpt-h{i}" for i in range(1, K + 1)]
    finally:
        _ok(_run([HOSTS_SH, "stop"], timeout=60))
        assert not _ours(), f"stop left {_ours()}"


def _veth_bytes() -> dict:
    """Bytes each host sent (rx of its veth's root end)."""
    return {i: int(Path(f"/sys/class/net/mpt-v{i}/statistics/rx_bytes").read_text()) for i in range(1, K + 1)}


# ----------------------------------------------------------------------------- run / stop
@pytest.mark.parametrize("script", ["netns-hosts.sh", "netns-launch"])
def test_scripts_are_valid_shell(script):
    p = _run(["bash", "-n", ROOT / "tools" / script])
    assert p.returncode == 0, p.stderr
    if shutil.which("shellcheck"):
        p = _run(["shellcheck", "-S", "warning", ROOT / "tools" / script])
        assert p.returncode == 0, p.stdout + p.stderr


def test_run_and_stop_leave_nothing_behind(can_run):
    routes = _run(["ip", "route", "show"]).stdout
    links = {ln.split(":")[1].strip() for ln in _run(["ip", "-o", "link", "show"]).stdout.splitlines()}
    # the command sees the hosts and MPIRUN, and its status becomes run's
    check = f'test -s {STATE}/hosts || exit 1; case "$MPIRUN" in *-launcher-exec*) exit 3 ;; esac; exit 1'
    p = _run([HOSTS_SH, "run", 2, "--rate", "1gbit", "--", "sh", "-c", check], timeout=60)
    assert p.returncode == 3, p.stdout + p.stderr
    assert not _ours(), f"run left {_ours()}"
    # Ctrl-C while the command runs: run removes the hosts and exits 130
    proc = subprocess.Popen([str(HOSTS_SH), "run", "2", "--", "sh", "-c", "echo COMMAND-RUNNING; exec sleep 60"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the command itself says when it runs (the hosts are up and run's traps are set by then)
        seen, deadline = b"", time.monotonic() + 30
        while b"COMMAND-RUNNING" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
            chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                break
            seen += chunk
        assert b"COMMAND-RUNNING" in seen, "the command did not start:\n" + seen.decode(errors="replace")
        assert (STATE / "hosts").exists(), "the hosts are not up while the command runs"
        os.killpg(proc.pid, signal.SIGINT)       # what the terminal does on Ctrl-C
        out, _ = proc.communicate(timeout=30)
        out = (seen + out).decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out
    assert not _ours(), f"Ctrl-C left {_ours()}"
    assert _run(["ip", "route", "show"]).stdout == routes, "the root namespace's routes changed"
    now = {ln.split(":")[1].strip() for ln in _run(["ip", "-o", "link", "show"]).stdout.splitlines()}
    assert now == links, f"links changed: {now ^ links}"
    p = _run([HOSTS_SH, "stop"])
    assert p.returncode == 0 and "0 host(s)" in p.stderr, p.stderr   # idempotent


PINGPONG = """
import time, numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
for n, k in ((8, 20), (1 << 21, 3)):
    buf = np.zeros(n, np.uint8)
    for rounds in (1, k):                        # warm-up, then timed
        c.Barrier(); t = time.perf_counter()
        for _ in range(rounds):
            if c.rank == 0: c.Send(buf, 1); c.Recv(buf, 1)
            else: c.Recv(buf, 0); c.Send(buf, 0)
    if c.rank == 0: print(f"PP {n} {(time.perf_counter() - t) / k / 2}")
"""


def test_delay_and_rate_slow_the_links(can_run):
    """--delay D --rate R: one way at least D for a small message, at most R for a large one."""
    p = _run([HOSTS_SH, "run", 2, "--delay", "2ms", "--rate", "200mbit", "--", HOSTS_SH, "mpirun", 2, "--ppn", 1,
              "--", PY, "-c", PINGPONG], timeout=90)
    if p.returncode != 0 and "apt-get install iptables" in p.stderr:
        pytest.skip("no netem in this kernel and no iptables for the user-space delayer")
    _ok(p)
    t = {int(n): float(s) for n, s in re.findall(r"^PP (\d+) (\S+)", p.stdout, re.M)}
    assert 2e-3 <= t[8] < 20e-3, f"one-way time of 8 B with --delay 2ms: {t[8] * 1e3:.2f} ms"
    mbit = (1 << 21) * 8 / t[1 << 21] / 1e6
    assert mbit < 200 * 1.1, f"2 MiB at {mbit:.0f} Mbit/s with --rate 200mbit"
    assert not _ours(), f"run left {_ours()}"


def test_bad_arguments_say_what_to_do(can_run):
    p = _run([HOSTS_SH, "start", 9])
    assert p.returncode != 0 and "2, 3 or 4" in p.stderr
    p = _run([HOSTS_SH, "mpirun", 2, "--", "true"])
    assert p.returncode != 0 and "start K" in p.stderr
    assert _run([HOSTS_SH, "bogus"]).returncode == 2


# ----------------------------------------------------------------------------- placement
@pytest.mark.parametrize("n,ppn", [(3, 1), (6, 2)])
def test_ranks_land_on_their_hosts_in_blocks(hosts, n, ppn):
    p = _ok(_mpirun(n, PY, "-c", PROBE, ppn=ppn))
    assert f"-hosts {','.join(f'{h}:{ppn}' for h in hosts)}" in p.stderr, "the mpirun line is not printed"
    rows = json.loads(p.stdout.split("ROWS ", 1)[1].splitlines()[0])
    for r in rows:
        want = hosts[r["rank"] // ppn]
        assert r["host"] == want and r["proc"] == want, r
        assert r["node_size"] == ppn, r           # one shared-memory node per emulated host
        assert r["node_ranks"] == [rr["rank"] for rr in rows if rr["host"] == want], r


def test_info_reports_ranks_per_host(hosts):
    p = _ok(_mpirun(6, PY, "-m", "mpitrain", "info"))
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("hosts "))
    assert "3: mpt-h1 (ranks 0-1), mpt-h2 (ranks 2-3), mpt-h3 (ranks 4-5)" in line, line
    assert re.search(r"shared-memory nodes.*: 3\b", line), line


def test_bytes_between_hosts_cross_the_veths(hosts):
    code = ("import numpy as np; from mpi4py import MPI; c = MPI.COMM_WORLD; "
            "a = np.full(1 << 20, c.rank + 1.0); c.Allreduce(MPI.IN_PLACE, a); "
            "assert a[0] == c.size * (c.size + 1) / 2")
    before = _veth_bytes()
    _ok(_mpirun(3, PY, "-c", code, ppn=1))
    sent = {i: b - before[i] for i, b in _veth_bytes().items()}
    assert all(s > 4 << 20 for s in sent.values()), f"8 MiB all-reduced, bytes sent per host: {sent}"
    before = _veth_bytes()                      # two ranks on one host: shared memory, not TCP
    _ok(_mpirun(2, PY, "-c", code, ppn=2))
    sent = _veth_bytes()[1] - before[1]
    assert sent < 1 << 20, f"{sent} bytes left mpt-h1 for an all-reduce inside it"


# ----------------------------------------------------------------------------- correctness
def test_bench_is_correct_across_hosts(hosts, tmp_path):
    out = tmp_path / "bench.json"
    p = _mpirun(3, PY, "-m", "mpitrain", "bench", "--algorithms", "ring,tree,native,auto", "--min", "8B",
                "--max", "1MiB", "--step", "16", "--iters", "3", "--json", out, ppn=1, timeout=120)
    _ok(p)
    rows = json.loads(out.read_text())["rows"]
    assert {r["algorithm"] for r in rows} >= {"ring", "tree", "native", "auto"}, rows
    assert all(r["ranks"] == 3 for r in rows if r["algorithm"] not in ("memcpy", "p2p"))  # the ceilings: 1, 2 ranks
    assert [r for r in rows if r["wrong"]] == [], "wrong results across hosts"


def test_collective_tests_across_hosts(hosts):
    p = _mpirun(3, PY, "-m", "mpi4py", "-m", "pytest", "--with-mpi", "-m", "mpi", "-p", "no:cacheprovider",
                "--timeout=60", "--timeout-method=thread", "-q", "-x", ROOT / "tests" / "test_collectives.py",
                ppn=1, timeout=120, cwd=ROOT)
    _ok(p)
    assert re.search(r"\d+ passed", p.stdout), p.stdout[-2000:]


def test_training_across_hosts(hosts, tmp_path):
    m = tmp_path / "metrics.json"
    p = _mpirun(3, PY, "-m", "mpitrain", "--set", "train.epochs=2", "--set", f"data.path={tmp_path / 'digits'}", "--set", "data.dataset=digits",
                "--set", f"checkpoint.dir={tmp_path / 'ck'}", "--metrics-out", m, ppn=1, timeout=120, cwd=tmp_path)
    _ok(p)
    metrics = json.loads(m.read_text())
    assert metrics["ranks"] == 3 and metrics["test_accuracy"] > 0.8, metrics
