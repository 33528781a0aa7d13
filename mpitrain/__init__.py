"""mpitrain: data-parallel training over MPI with a hand-written ring all-reduce."""

__version__ = "0.1.0"


def allreduce(buf, comm=None, *, op="sum", algorithm="auto"):
    """Reduce ``buf`` in place across ``comm`` and return it (see mpitrain.collectives)."""
    from .collectives import allreduce as _allreduce

    return _allreduce(buf, comm, op=op, algorithm=algorithm)


def reduce_scatter(buf, comm=None, *, op="sum", algorithm="auto"):
    """Reduce ``buf`` across ``comm``; return this rank's chunk (see mpitrain.collectives.scatter)."""
    from .collectives import reduce_scatter as _rs

    return _rs(buf, comm, op=op, algorithm=algorithm)


def allgather(buf, comm=None, *, algorithm="auto"):
    """Fill ``buf`` in place with every rank's chunk (see mpitrain.collectives.scatter)."""
    from .collectives import allgather as _ag

    return _ag(buf, comm, algorithm=algorithm)


__all__ = ["allreduce", "reduce_scatter", "allgather", "__version__"]
