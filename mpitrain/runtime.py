"""The run's communicator, rank-0 logging and rank-tagged errors.

Library code never talks on COMM_WORLD: ``get_comm()`` returns one Dup of it,
made once per process, and every module takes ``comm`` as a parameter that
defaults to it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from mpi4py import MPI

_COMM = None

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early by a signal, a checkpoint was written, --resume continues


class UserError(Exception):
    """A problem with the user's input (config, data, files): reported without a traceback."""


def get_comm():
    """The run's communicator: a Dup of COMM_WORLD, created on first use."""
    global _COMM
    if _COMM is None:
        _COMM = MPI.COMM_WORLD.Dup()
    return _COMM


def hostname() -> str:
    return socket.gethostname().split(".")[0]


def tag(comm=None) -> str:
    """``[rank r@host]`` for messages; the rank is COMM_WORLD's so it matches mpirun's numbering."""
    return f"[rank {MPI.COMM_WORLD.Get_rank()}@{hostname()}]"


def log0(*args, comm=None, file=None, end="\n", flush=True) -> None:
    """Print on rank 0 of ``comm`` only. All normal output goes through here."""
    comm = comm or get_comm()
    if comm.Get_rank() == 0:
        print(*args, file=file or sys.stdout, end=end, flush=flush)


def warn(msg: str, comm=None) -> None:
    """A rank-tagged warning on stderr, from whichever rank calls it."""
    print(f"{tag(comm)} warning: {msg}", file=sys.stderr, flush=True)


def error_message(exc: BaseException, comm=None) -> str:
    """One line: ``[rank r@host] error: ...``."""
    text = str(exc) or type(exc).__name__
    if text.startswith(tag(comm)):  # already tagged where it was raised
        text = text[len(tag(comm)):].lstrip()
    if not isinstance(exc, UserError):
        text = f"{type(exc).__name__}: {text}"
    return f"{tag(comm)} error: {text}"


# Seconds a failing rank waits between printing its message and MPI_Abort: without it the
# launcher (MPICH's hydra) sometimes tears the job down before forwarding the message (~1%).
ABORT_LINGER_S = 0.2
# Seconds ranks other than 0 wait before reporting an error, so that an error every rank
# hits (bad config, bad data) is reported once, by rank 0, whose Abort ends the others.
DEFER_TO_RANK0_S = 2.0


def job_size() -> int:
    """Ranks in the whole job (no communication: safe on an error path)."""
    return MPI.COMM_WORLD.Get_size()


def abort(code: int = 1) -> None:
    """End every rank of the job now. Never returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    if job_size() == 1:  # no other rank to end: exit without MPI_Abort's own line after the message
        os._exit(code)
    time.sleep(ABORT_LINGER_S)
    MPI.COMM_WORLD.Abort(code)
    os._exit(code)  # pragma: no cover - Abort does not return


def report(text: str) -> None:
    """Write one line to stderr in one write (so lines of different ranks do not interleave)."""
    sys.stderr.write(text.rstrip("\n") + "\n")
    sys.stderr.flush()


def defer_to_rank0(exc: BaseException | None = None) -> None:
    """On ranks other than 0, give rank 0 a moment to report (and Abort) first.

    Errors every rank raises alike then print once; an error only this rank knows
    about (``exc.rank_local``) is reported at once.
    """
    if getattr(exc, "rank_local", False):
        return
    world = MPI.COMM_WORLD
    if world.Get_size() > 1 and world.Get_rank() != 0:
        time.sleep(DEFER_TO_RANK0_S)


def check_launch(comm=None) -> None:
    """Stop when SLURM started N > 1 tasks that each came up as rank 0 of 1.

    That happens with ``srun`` and no PMI plug-in matching the MPI library
    (the pip MPICH wheel needs ``srun --mpi=pmi2``).
    """
    comm = comm or get_comm()
    ntasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS") or ""
    if comm.Get_size() == 1 and ntasks.isascii() and ntasks.isdigit() and int(ntasks) > 1 \
            and "SLURM_STEP_ID" in os.environ:
        raise UserError(
            f"(SLURM task {os.environ.get('SLURM_PROCID', '?')}) SLURM started {ntasks} tasks but each "
            "one is an MPI job of size 1: srun did not give MPI its process manager. Launch with "
            "`srun --mpi=pmi2 python -m mpitrain ...` (the pip MPICH wheel), "
            "the --mpi plug-in your site's MPI needs (see `srun --mpi=list`), or run `mpirun -n "
            f"{ntasks} python -m mpitrain ...` inside the allocation")


def agree(comm, value, what: str, hint: str) -> None:
    """Every rank must hold the same ``value``; otherwise a UserError naming the odd ranks, on every rank."""
    values = comm.allgather(value)
    if len(set(values)) > 1:
        groups = {}
        for r, v in enumerate(values):
            groups.setdefault(v, []).append(r)
        desc = "; ".join(f"ranks {rs}: {v}" for v, rs in groups.items())
        raise UserError(f"{what} differs across ranks ({desc}); {hint}")


def agree_config(comm, cfg) -> None:
    """Every rank must run the same job (``cfg.digest()``); otherwise a UserError naming the keys that differ."""
    if len(set(comm.allgather(cfg.digest()))) == 1:
        return
    flat = comm.allgather({f"{s}.{k}": repr(v) for s, sec in cfg.to_dict().items() for k, v in sec.items()})
    diffs = []
    for key in sorted({k for f in flat for k in f}):
        groups = {}
        for r, f in enumerate(flat):
            groups.setdefault(f.get(key, "<missing>"), []).append(r)
        if len(groups) > 1:
            diffs.append(f"{key} is " + ", ".join(f"{v} on ranks {rs}" for v, rs in groups.items()))
    raise UserError(f"the job configuration differs across ranks: {'; '.join(diffs) or 'unknown keys'}; "
                    "start every rank with the same job file and --set options")


def signal_name(signum: int) -> str:
    """``SIGUSR1`` for 10; the number itself for anything that is not a signal."""
    return signal.Signals(signum).name if signum in iter(signal.Signals) else str(signum)


LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID", "SLURM_STEP_ID",
                 "HYDRA_CONTROL_FD", "MPIEXEC_HOSTNAME")


def launcher_seen(env=None) -> bool:
    """True when a launcher (mpirun/mpiexec/srun) started this process, as its environment shows."""
    env = os.environ if env is None else env
    return any(v in env for v in LAUNCHER_VARS)


def single_rank_note(command: str, comm=None) -> None:
    """Started without a launcher at one rank: say so once (stderr), and how to use more ranks."""
    comm = comm or get_comm()
    if comm.Get_size() == 1 and not launcher_seen():
        report(f"note: running on 1 rank (no mpirun seen); for N ranks: mpirun -n N python -m mpitrain {command} "
               "... (N = the cores you have; `mpitrain info` shows them)")
