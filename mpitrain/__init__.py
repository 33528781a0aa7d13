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


def allreduce_init(buf, comm=None, *, op="sum", algorithm="auto"):
    """A persistent all-reduce plan of ``buf``: checked once, then ``start()``/``test()``/``wait()`` every
    step and ``free()`` (or ``with``) at the end; ``buf``'s contents may change between starts, not its
    identity, length or dtype (see mpitrain.collectives.plan)."""
    from .collectives import allreduce_init as _init

    return _init(buf, comm, op=op, algorithm=algorithm)


def alloc_shared(n, dtype="float32", comm=None):
    """A zeroed array of ``n`` x ``dtype`` in a window shared by the node's ranks (collective), which
    ``allreduce(..., algorithm="shm")`` reduces without copies (see mpitrain.collectives.shm)."""
    from .collectives import alloc_shared as _alloc

    return _alloc(n, dtype, comm)


def free_shared(arr, comm=None):
    """Free ``arr``'s shared window now (collective; see mpitrain.collectives.shm)."""
    from .collectives import free_shared as _free

    _free(arr, comm)


__all__ = ["allreduce", "allreduce_init", "reduce_scatter", "allgather", "alloc_shared", "free_shared",
           "__version__"]
