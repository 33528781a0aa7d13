"""mpitrain: data-parallel training over MPI with a hand-written ring all-reduce."""

__version__ = "0.1.0"


def allreduce(buf, comm=None, *, op="sum", algorithm="auto"):
    """Reduce ``buf`` in place across ``comm`` and return it (see mpitrain.collectives)."""
    from .collectives import allreduce as _allreduce

    return _allreduce(buf, comm, op=op, algorithm=algorithm)


__all__ = ["allreduce", "__version__"]
