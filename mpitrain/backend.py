"""One array module ``xp`` (NumPy on a CPU, CuPy on a GPU) and buffer moves for MPI.

CuPy wheels import on machines without a GPU, so ``gpu_available()`` asks the
CUDA runtime for a device instead of trusting the import.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from .runtime import UserError


@lru_cache(maxsize=1)
def _cupy():
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install
        return None
    return cupy


@lru_cache(maxsize=1)
def gpu_count() -> int:
    cp = _cupy()
    if cp is None:
        return 0
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def gpu_available() -> bool:
    return gpu_count() > 0


def get_xp(name: str = "numpy"):
    """The array module for ``train.backend``: ``numpy`` or ``cupy``."""
    if name == "numpy":
        return np
    if name == "cupy":
        if _cupy() is None:
            raise UserError("backend 'cupy' needs CuPy: pip install 'mpitrain[gpu]' (or train.backend='numpy')")
        if not gpu_available():
            raise UserError("backend 'cupy': CuPy is installed but no CUDA GPU is visible on this host "
                            "(check CUDA_VISIBLE_DEVICES / --gpus-per-task, or use train.backend='numpy')")
        return _cupy()
    raise UserError(f"unknown backend {name!r}: use 'numpy' or 'cupy'")


def array_module(buf):
    """numpy or cupy, whichever owns ``buf``."""
    if isinstance(buf, np.ndarray):
        return np
    cp = _cupy()
    if cp is not None and isinstance(buf, cp.ndarray):
        return cp
    raise TypeError(f"expected a NumPy or CuPy array, got {type(buf).__name__}")


def is_device(buf) -> bool:
    return not isinstance(buf, np.ndarray) and hasattr(buf, "__cuda_array_interface__")


def to_numpy(buf):
    """A host NumPy array with the contents of ``buf`` (a copy only when on the device)."""
    if isinstance(buf, np.ndarray):
        return buf
    return _cupy().asnumpy(buf)


def synchronize(buf=None) -> None:
    """Wait for the device so MPI never reads memory a kernel is still writing."""
    if buf is not None and not is_device(buf):
        return
    cp = _cupy()
    if cp is not None and gpu_available():
        cp.cuda.get_current_stream().synchronize()


@lru_cache(maxsize=1)
def cuda_aware_mpi() -> bool:
    """True when the MPI library can read device buffers directly.

    MPICH/Open MPI report it through MPIX_Query_cuda_support; the env var
    MPITRAIN_CUDA_AWARE=0/1 overrides the detection.
    """
    env = os.environ.get("MPITRAIN_CUDA_AWARE")
    if env is not None:
        return env.strip().lower() in ("1", "true", "yes", "on")
    try:
        from mpi4py import MPI

        q = getattr(MPI, "Query_cuda_support", None)
        if q is not None:
            return bool(q())
    except Exception:
        pass
    return False


def local_rank(comm) -> tuple[int, int]:
    """(this rank's index on its node, ranks on this node).

    Launcher variables first (Open MPI, MPICH/hydra, SLURM), else a split of
    ``comm`` by shared-memory node. Collective over ``comm``.
    """
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        on_node = node.Get_size()
        idx = node.Get_rank()
    finally:
        node.Free()
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v), on_node
    return idx, on_node


def select_device(comm, *, share: bool = False) -> int:
    """Make GPU ``local_rank % gpus`` current for this rank and return its index.

    More ranks on a node than GPUs is an error unless ``share`` (train.share_gpu).
    Collective over ``comm``.
    """
    idx, on_node = local_rank(comm)
    n = gpu_count()
    problem = None
    if n == 0:
        problem = "no CUDA GPU visible"
    elif on_node > n and not share:
        problem = (f"{on_node} ranks on this node but {n} GPU(s): start one rank per GPU, "
                   "or allow sharing with --set train.share_gpu=true")
    problems = comm.allgather(problem)
    bad = [(r, p) for r, p in enumerate(problems) if p]
    if bad:
        r, p = bad[0]
        raise UserError(f"backend 'cupy': rank {r}: {p}")
    dev = idx % n
    _cupy().cuda.Device(dev).use()
    return dev
