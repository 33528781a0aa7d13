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
