"""One array module ``xp`` (NumPy on a CPU, CuPy on a GPU) and buffer moves for MPI.

CuPy wheels import on machines without a GPU, so ``gpu_available()`` asks the
CUDA runtime for a device instead of trusting the import.

GPU placement (``select_device``): one GPU per rank, chosen from the rank's
index on its node (the launcher's local-rank variable when it is consistent,
else a split of the communicator by shared-memory node). Two ranks on one
physical GPU is an error unless sharing is allowed (``train.share_gpu``).

CUDA-aware MPI (``cuda_aware_info``): asked once of the MPI library that is
loaded in this process (``MPIX_Query_cuda_support``, Open MPI and MPICH >= 4.1;
``MPIX_GPU_query_support``, MPICH >= 4.0); anything else counts as "no", so
device buffers are staged through pinned host memory. ``MPITRAIN_CUDA_AWARE=0/1``
overrides the detection.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

import numpy as np

from .runtime import UserError, hostname


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


def gpu_unavailable_reason() -> str:
    """Why ``gpu_available()`` is False, in words (for skip messages and errors)."""
    cp = _cupy()
    if cp is None:
        pkg = cupy_package(cuda_driver_version())
        return f"CuPy is not installed (pip install '{pkg or 'mpitrain[gpu]'}')"
    try:
        n = int(cp.cuda.runtime.getDeviceCount())
    except Exception as e:  # no driver, driver too old, ...
        return f"CuPy {cp.__version__} is installed but the CUDA runtime has no device: {e}"
    if n == 0:
        return (f"CuPy {cp.__version__} is installed but no CUDA GPU is visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')})")
    return ""


def cuda_driver_version() -> int | None:
    """The CUDA version the installed driver supports (e.g. 12040 for 12.4), from libcuda's
    cuDriverGetVersion -- no CuPy needed; None when there is no driver. MPITRAIN_CUDA_DRIVER
    (a number like 13000) overrides it (for tests and for machines whose libcuda hides)."""
    if os.environ.get("MPITRAIN_CUDA_DRIVER", "").strip():
        from .units import env_knob

        return env_knob("MPITRAIN_CUDA_DRIVER")
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0 or v.value <= 0:
            return None
        return int(v.value)
    except (OSError, AttributeError):
        return None


def cupy_package(driver: int | None) -> str | None:
    """The CuPy wheel for a driver (``cuda_driver_version()``), with the ``ctk`` extra that
    brings NVRTC, the CUDA headers and cuBLAS: a driver alone runs ``import cupy`` but no
    kernel. CUDA 12.x -> cupy-cuda12x, 13.x and later -> cupy-cuda13x; older or none: None."""
    if driver is None or driver < 12000:
        return None
    return "cupy-cuda12x[ctk]" if driver < 13000 else "cupy-cuda13x[ctk]"


def gpu_kernel_problem() -> str:
    """'' when CuPy runs a kernel (NVRTC) and a matrix product (cuBLAS) on the current GPU,
    else what failed and how to fix it. ``gpu_available()`` only asks for a device: with the
    driver alone that works, and the first kernel fails."""
    why = gpu_unavailable_reason()
    if why:
        return why
    cp = _cupy()
    problems = []
    for what, run in (("an elementwise kernel (NVRTC)", lambda: float((cp.arange(8.0) * 2).sum())),
                      ("a matrix product (cuBLAS)", lambda: float((cp.ones((8, 8)) @ cp.ones((8, 8))).sum()))):
        try:
            run()
        except Exception as e:  # CompileException, CUDARuntimeError, ImportError of a .so, ...
            problems.append(f"{what} failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    if not problems:
        return ""
    pkg = cupy_package(cuda_driver_version()) or "cupy-cuda12x[ctk]"
    return (f"CuPy {cp.__version__} sees a GPU but cannot run on it: " + "; ".join(problems)
            + f". The CUDA libraries CuPy loads at run time (NVRTC, headers, cuBLAS) are missing: "
            f"pip install '{pkg}' (make gpu-check picks it from the driver), or a CUDA toolkit for the driver")


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
    """True for arrays in GPU memory (anything exposing ``__cuda_array_interface__``)."""
    return hasattr(type(buf), "__cuda_array_interface__") or hasattr(buf, "__cuda_array_interface__")


def to_numpy(buf):
    """A host NumPy array with the contents of ``buf`` (a copy only when on the device)."""
    if isinstance(buf, np.ndarray):  # (np.asarray: a host-backed test stand-in becomes plain numpy)
        return np.asarray(buf)
    return _cupy().asnumpy(buf)


def synchronize(buf=None) -> None:
    """Wait for the device so MPI never reads memory a kernel is still writing."""
    if buf is not None and not is_device(buf):
        return
    cp = _cupy()
    if cp is not None and gpu_available():
        cp.cuda.get_current_stream().synchronize()


# ------------------------------------------------------------------ CUDA-aware MPI

_YES = ("1", "true", "yes", "on")
_NO = ("0", "false", "no", "off")
_MPIX_GPU_SUPPORT_CUDA = 0  # MPICH's enum: MPIX_GPU_SUPPORT_CUDA, _ZE, _HIP


def _loaded_mpi_libraries() -> list[str]:
    """Paths of the MPI shared libraries mapped into this process (from /proc/self/maps)."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6:
                    continue
                path = parts[5].strip()
                base = os.path.basename(path)
                if base.startswith(("libmpi", "libmpich")) and ".so" in base and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    return paths


def _query_library(path: str):
    """(True/False, how) from one already-loaded MPI library, or (None, why not)."""
    try:  # RTLD_NOLOAD: never load a second MPI, only look into the one mpi4py loaded
        lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 1))
    except OSError as e:
        return None, f"cannot open {path}: {e}"
    name = os.path.basename(path)
    try:
        fn = lib.MPIX_Query_cuda_support
    except AttributeError:
        fn = None
    if fn is not None:
        fn.restype, fn.argtypes = ctypes.c_int, []
        v = int(fn())
        return v == 1, f"MPIX_Query_cuda_support() = {v} in {name}"
    try:
        fn = lib.MPIX_GPU_query_support
    except AttributeError:
        return None, f"{name} has no MPIX_Query_cuda_support / MPIX_GPU_query_support"
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    v = ctypes.c_int(0)
    rc = int(fn(_MPIX_GPU_SUPPORT_CUDA, ctypes.byref(v)))
    if rc != 0:
        return None, f"MPIX_GPU_query_support failed (error {rc}) in {name}"
    return v.value == 1, f"MPIX_GPU_query_support(CUDA) = {v.value} in {name}"


@lru_cache(maxsize=1)
def cuda_aware_info() -> tuple[bool, str]:
    """(whether device buffers may be passed to MPI directly, how that was decided).

    Conservative: only an MPI library that says so is CUDA-aware. Order:
    1. ``MPITRAIN_CUDA_AWARE=1/0`` (also true/false/yes/no/on/off) decides;
    2. ``MPIR_CVAR_ENABLE_GPU=0`` (MPICH's switch for GPU support) means no;
    3. the loaded library's ``MPIX_Query_cuda_support()`` (Open MPI, MPICH >= 4.1) or
       ``MPIX_GPU_query_support(CUDA)`` (MPICH >= 4.0) decides;
    4. otherwise no (and the reason names the variable a site with a CUDA-aware MPI that
       cannot be queried -- Cray MPICH, MVAPICH2 -- may set).
    """
    env = os.environ.get("MPITRAIN_CUDA_AWARE")
    if env is not None and env.strip().lower() in _YES + _NO:
        yes = env.strip().lower() in _YES
        return yes, f"MPITRAIN_CUDA_AWARE={env.strip()} (detection skipped)"
    note = f"MPITRAIN_CUDA_AWARE={env!r} is not 0/1, ignored; " if env is not None else ""
    if os.environ.get("MPIR_CVAR_ENABLE_GPU", "").strip().lower() in _NO:
        return False, note + "MPIR_CVAR_ENABLE_GPU=0 turns the MPI library's GPU support off"
    try:
        from mpi4py import MPI

        if not MPI.Is_initialized() or MPI.Is_finalized():
            return False, note + "MPI is not initialised: cannot ask the library"
        version = MPI.Get_library_version().strip().splitlines()[0]
    except Exception as e:  # pragma: no cover - mpi4py is a dependency
        return False, note + f"cannot ask mpi4py: {e}"
    reasons = []
    for path in _loaded_mpi_libraries():
        answer, how = _query_library(path)
        if answer is not None:
            return answer, note + how
        reasons.append(how)
    hint = ""
    if "CRAY" in version.upper() and os.environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1":
        hint = "; Cray MPICH with MPICH_GPU_SUPPORT_ENABLED=1 is probably CUDA-aware: set MPITRAIN_CUDA_AWARE=1"
    elif os.environ.get("MV2_USE_CUDA") == "1":
        hint = "; MVAPICH2 with MV2_USE_CUDA=1 is probably CUDA-aware: set MPITRAIN_CUDA_AWARE=1"
    why = "; ".join(reasons) or "no MPI library found among the loaded shared objects"
    return False, note + f"{version}: cannot tell ({why}), assuming not{hint}"


def cuda_aware_mpi() -> bool:
    """True when the MPI library can read and write device buffers directly (see ``cuda_aware_info``)."""
    return cuda_aware_info()[0]


cuda_aware_mpi.cache_clear = cuda_aware_info.cache_clear  # type: ignore[attr-defined]


# ------------------------------------------------------------------ GPU placement

# Launcher variables holding the rank's index on its node, in the order they are trusted.
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                   "PALS_LOCAL_RANKID", "SLURM_LOCALID")


def launcher_local_rank() -> int | None:
    """This process's node-local index from the first launcher variable that has one."""
    for var in LOCAL_RANK_VARS:
        v = os.environ.get(var, "").strip()
        if v.isdigit():
            return int(v)
    return None


def local_rank(comm) -> tuple[int, int]:
    """(this rank's index on its node, ranks of ``comm`` on this node). Collective over ``comm``.

    The launcher's variable (Open MPI, MPICH/hydra, MVAPICH2, PALS, SLURM) when the ranks of
    the node hold exactly 0..k-1 in it -- under ``mpirun`` inside a SLURM job every rank
    inherits SLURM_LOCALID=0 from hydra's proxy, and a sub-communicator may hold only some
    of the node's ranks -- else the rank in a split of ``comm`` by shared-memory node.
    """
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        on_node = node.Get_size()
        idx = node.Get_rank()
        env = launcher_local_rank()
        seen = node.allgather(env)
    finally:
        node.Free()
    if None not in seen and sorted(seen) == list(range(on_node)):
        return env, on_node
    return idx, on_node


def _device_ident(dev: int) -> str:
    """A name of the physical GPU behind visible device ``dev`` (PCI bus id; same on every rank)."""
    cp = _cupy()
    try:
        return str(cp.cuda.runtime.deviceGetPCIBusId(dev))
    except Exception:
        pass
    try:
        uuid = cp.cuda.runtime.getDeviceProperties(dev).get("uuid")
        if uuid:
            return "GPU-" + bytes(uuid).hex()
    except Exception:
        pass
    return f"device {dev}"


def _use_device(dev: int) -> None:
    _cupy().cuda.Device(dev).use()


def _ranks(rs) -> str:
    rs = list(rs)
    return f"rank {rs[0]}" if len(rs) == 1 else "ranks " + ", ".join(map(str, rs))


def device_problem(rows, share: bool = False) -> str | None:
    """The error for a device assignment, or None when it is fine. Pure (tested without a GPU).

    ``rows[r]`` describes rank r: ``host``, ``gpus`` (visible to it), ``dev`` (the index it
    would use), ``ident`` (the physical GPU behind ``dev``), ``visible`` (CUDA_VISIBLE_DEVICES).
    """
    none = [r for r, row in enumerate(rows) if not row["gpus"]]
    if none:
        hosts = sorted({rows[r]["host"] for r in none})
        vis = sorted({str(rows[r]["visible"]) for r in none})
        return (f"backend 'cupy': no CUDA GPU visible to {_ranks(none)} on {', '.join(hosts)} "
                f"(CUDA_VISIBLE_DEVICES={' / '.join(vis)}); ask the scheduler for GPUs "
                "(--gres=gpu:N or --gpus-per-node=N), check CUDA_VISIBLE_DEVICES, or use train.backend='numpy'")
    if share:
        return None
    users = {}
    for r, row in enumerate(rows):
        users.setdefault((row["host"], row["ident"]), []).append(r)
    for (host, ident), rs in users.items():
        if len(rs) < 2:
            continue
        on_host = [r for r, row in enumerate(rows) if row["host"] == host]
        gpus = len({rows[r]["ident"] for r in on_host})
        return (f"backend 'cupy': {len(on_host)} ranks on {host} but only {gpus} GPU(s) among them: "
                f"{_ranks(rs)} would share GPU {rows[rs[0]]['dev']} ({ident}). Start at most {gpus} "
                f"rank(s) per node, one per GPU (mpirun -n / #SBATCH --ntasks-per-node={gpus}), "
                "or allow sharing with --set train.share_gpu=true")
    return None


def select_device(comm, *, share: bool = False) -> int:
    """Make GPU ``local_rank % visible GPUs`` current for this rank and return its index.

    Two ranks on one physical GPU (same host, same PCI bus id) is an error unless
    ``share`` (train.share_gpu); so is a rank that sees no GPU. Collective over ``comm``:
    every rank raises the same UserError, naming the ranks and the host.
    """
    idx, _ = local_rank(comm)
    n = gpu_count()
    dev = idx % n if n else -1
    row = {"host": hostname(), "local": idx, "gpus": n, "dev": dev,
           "ident": _device_ident(dev) if n else None,
           "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")}
    problem = device_problem(comm.allgather(row), share)
    if problem:
        raise UserError(problem)
    _use_device(dev)
    return dev
