"""Threads per rank (mpitrain/threads.py): the node's cores shared by its ranks, unless the user chose."""

import os
import subprocess
import sys

import pytest

from conftest import MPIRUN
from mpitrain import threads

ENV_VARS = threads.ENV_VARS


def test_choose_shares_the_cores():
    assert threads.choose(8, 1, env={}) == (8, "auto: 8 core(s) / 1 rank(s) on the node")
    assert threads.choose(8, 2, env={})[0] == 4
    assert threads.choose(8, 3, env={})[0] == 2
    assert threads.choose(2, 4, env={})[0] == 1, "at least one thread"


def test_choose_user_settings_win():
    assert threads.choose(8, 2, env={"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    assert threads.choose(8, 2, env={"MKL_NUM_THREADS": "5"}) == (5, "MKL_NUM_THREADS")
    assert threads.choose(8, 2, requested=6, env={"OMP_NUM_THREADS": "3"}) == (6, "train.threads")
    assert threads.choose(8, 2, env={"OMP_NUM_THREADS": "x"})[0] == 4, "a value that is no count is ignored"


def _clean_env(monkeypatch):
    for v in ENV_VARS:
        monkeypatch.delenv(v, raising=False)


@pytest.mark.mpi
def test_apply_limits_the_loaded_blas(comm, monkeypatch):
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits

    _clean_env(monkeypatch)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    cpus = set().union(*node.allgather(sorted(os.sched_getaffinity(0))))
    expected = max(1, len(cpus) // node.Get_size())
    node.Free()
    with threadpool_limits(limits=None):  # restores the pools afterwards
        n, source = threads.apply(comm)
        assert (n, source.split(":")[0]) == (expected, "auto")
        pools = threads.in_effect()
        assert pools and all(v == expected for v in pools.values()), pools
        n, source = threads.apply(comm, requested=expected + 1)
        assert (n, source) == (expected + 1, "train.threads")
        assert all(v == expected + 1 for v in threads.in_effect().values())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.apply(comm) == (1, "OMP_NUM_THREADS")


def _info(n, env):
    out = subprocess.run([MPIRUN, "-n", str(n), sys.executable, "-m", "mpitrain", "info"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return next(line for line in out.stdout.splitlines() if line.startswith("threads"))


@pytest.mark.parametrize("ranks", [1, 2])
def test_info_reports_the_share(ranks):
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    cores = len(os.sched_getaffinity(0))
    n = max(1, cores // ranks)
    line = _info(ranks, env)
    assert f"{n}/rank (auto: {cores} core(s) / {ranks} rank(s) on the node)" in line, line
    assert f"openblas {n}" in line, line
    line = _info(ranks, {**env, "OMP_NUM_THREADS": "1"})
    assert "1/rank (OMP_NUM_THREADS)" in line and "openblas 1" in line, line
