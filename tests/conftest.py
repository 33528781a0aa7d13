import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

BIN = os.path.dirname(sys.executable)


def find_mpirun(bin_dir=BIN, path=None) -> str:
    """The ``mpirun`` beside the interpreter (a venv's, from the mpich wheel), else the one on
    ``path`` (default: $PATH; a system Python with an MPI installed elsewhere, as on the GPU
    machine's image), else the path beside the interpreter (so the error names it)."""
    beside = os.path.join(bin_dir, "mpirun")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpirun", path=path) or beside


MPIRUN = find_mpirun()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_mpitrain(n, args, env=None, timeout=240, cwd=ROOT):
    """``mpirun -n n python -m mpitrain ARGS`` from the checkout (one BLAS thread per rank); the result."""
    import subprocess

    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([MPIRUN, "-n", str(n), sys.executable, "-m", "mpitrain", *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


def same_checkpoints(a, b):
    """The newest checkpoints in directories ``a`` and ``b``: the same step, parameters and optimizer state,
    bit for bit. Returns a's."""
    import numpy as np

    from mpitrain import checkpoint

    ca, cb = checkpoint.latest(a), checkpoint.latest(b)
    assert ca["step"] == cb["step"]
    assert ca["params"].tobytes() == cb["params"].tobytes(), "parameters bitwise"
    for k, v in ca["optimizer"].items():
        if isinstance(v, np.ndarray):
            assert v.tobytes() == cb["optimizer"][k].tobytes(), f"optimizer state {k} bitwise"
    return ca


def make_corpus(tmp_path_factory, max_bytes=120_000):
    """A small byte-token set of the stdlib's sources (2 shards) for end-to-end GPT runs."""
    from mpitrain.data import make_pycode

    d = tmp_path_factory.mktemp("pycode") / "pc"
    make_pycode(d, shards=2, max_bytes=max_bytes)
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory)


def h5_edit(path, fn):
    """Open an HDF5 file for writing and apply ``fn(f)`` (tests damage data sets with it)."""
    import h5py

    with h5py.File(path, "r+") as f:
        fn(f)


def h5_replace(f, name, data):
    """Replace dataset ``name`` of open file ``f`` with ``data`` (another dtype or shape)."""
    del f[name]
    f.create_dataset(name, data=data)


@pytest.fixture
def comm():
    """The run's communicator (a Dup of COMM_WORLD), as library code uses it."""
    from mpitrain.runtime import get_comm

    return get_comm()


@pytest.fixture
def shared_tmp(tmp_path, comm):
    """One temporary directory shared by all ranks (rank 0's tmp_path)."""
    return type(tmp_path)(comm.bcast(str(tmp_path), root=0))


def pytest_configure(config):
    """Under mpirun every rank gets its own pytest base temp dir (no races between ranks)."""
    if config.getoption("with_mpi", default=False) and config.getoption("basetemp") is None:
        from mpi4py import MPI

        config.option.basetemp = tempfile.mkdtemp(prefix=f"mpitrain-tests-r{MPI.COMM_WORLD.Get_rank()}-")
        config._mpitrain_basetemp = config.option.basetemp


def pytest_unconfigure(config):
    base = getattr(config, "_mpitrain_basetemp", None)
    if base:
        from mpi4py import MPI

        MPI.COMM_WORLD.Barrier()  # rank 0's dir may be another rank's shared_tmp
        shutil.rmtree(base, ignore_errors=True)
