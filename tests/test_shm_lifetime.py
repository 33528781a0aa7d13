"""alloc_shared / free_shared lifetimes: a freed array (or any view of it) is refused by every collective
on every rank -- also when only one rank passes it -- free_shared is refused while a plan or a handle in
flight uses the window, and an allocation the node cannot hold is one clear line on every rank."""

import numpy as np
import pytest

import mpitrain
from mpitrain.collectives import allgather, allreduce, allreduce_init, reduce_scatter, shm, state_for
from mpitrain.collectives.nonblocking import iallreduce, ireduce_scatter
from mpitrain.runtime import UserError

pytestmark = pytest.mark.mpi

ENTRY_POINTS = {
    **{f"allreduce[{a}]": (lambda b, c, a=a: allreduce(b, c, algorithm=a))
       for a in ("ring", "tree", "native", "auto", "shm", "hier")},
    "iallreduce": lambda b, c: iallreduce(b, c, algorithm="ring").wait(),
    "allreduce_init": lambda b, c: allreduce_init(b, c, algorithm="ring").free(),
    "reduce_scatter": lambda b, c: reduce_scatter(b, c, algorithm="ring"),
    "ireduce_scatter": lambda b, c: ireduce_scatter(b, c, algorithm="native").wait(),
    "allgather": lambda b, c: allgather(b, c, algorithm="native"),
}
VIEWS = {"whole": lambda a: a, "slice": lambda a: a[2:9], "reshaped": lambda a: a.reshape(4, 5)}


def _shared_node(comm):
    if shm.node(state_for(comm)).size == 1:
        pytest.skip("one rank on the node: plain memory, nothing is freed")


def _same_error_everywhere(comm, call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert len(set(comm.allgather(str(e.value)))) == 1, "ranks raised different errors"
    return str(e.value)


@pytest.mark.parametrize("view", sorted(VIEWS))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_freed_array_is_refused_by_every_entry_point(comm, entry, view):
    _shared_node(comm)
    a = mpitrain.alloc_shared(20, np.float64, comm)
    mpitrain.free_shared(a, comm)
    buf = VIEWS[view](a)
    _same_error_everywhere(comm, lambda: ENTRY_POINTS[entry](buf, comm), "freed")
    ok = np.arange(20.0) + comm.Get_rank()  # the communicator still works afterwards
    allreduce(ok, comm, algorithm="ring")
    np.testing.assert_allclose(ok, comm.Get_size() * np.arange(20.0) + sum(range(comm.Get_size())))


@pytest.mark.parametrize("entry", ["allreduce[ring]", "allreduce[shm]", "allreduce[auto]", "iallreduce",
                                   "allreduce_init", "reduce_scatter"])
def test_one_rank_passing_a_freed_array_raises_on_every_rank(comm, entry):
    """The agreement check carries rank 0's problem to the others: no hang, no SIGSEGV, one ValueError."""
    _shared_node(comm)
    a = mpitrain.alloc_shared(20, np.float64, comm)
    mpitrain.free_shared(a, comm)
    buf = a if comm.Get_rank() == 0 else np.zeros(20)
    msg = _same_error_everywhere(comm, lambda: ENTRY_POINTS[entry](buf, comm), "rank 0: buffer lies in a shared "
                                 "window that free_shared")
    assert "\n" not in msg


def test_free_shared_is_refused_while_a_plan_or_a_handle_uses_the_window(comm):
    _shared_node(comm)
    r, p = comm.Get_rank(), comm.Get_size()
    a = mpitrain.alloc_shared(30, np.float64, comm)
    h = allreduce_init(a, comm, algorithm="ring")
    _same_error_everywhere(comm, lambda: mpitrain.free_shared(a, comm), "persistent plan")
    a[...] = r + 1
    h()  # the plan still works: nothing was freed
    np.testing.assert_allclose(a, p * (p + 1) / 2)
    h.free()
    a[...] = r
    nb = iallreduce(a, comm, algorithm="ring")
    _same_error_everywhere(comm, lambda: mpitrain.free_shared(a, comm), "in flight")
    nb.wait()
    np.testing.assert_allclose(a, p * (p - 1) / 2)
    mpitrain.free_shared(a, comm)  # now it may go
    with pytest.raises(ValueError, match="freed"):
        allreduce(a, comm)


def test_an_allocation_the_node_cannot_hold_is_one_line_on_every_rank(comm):
    n = 2 ** 50
    with pytest.raises(MemoryError) as e:
        mpitrain.alloc_shared(n, np.float32, comm)
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg, msg
    assert f"{4 * n}" in msg and "is free" in msg and "alloc_shared" in msg, msg
    assert len(set(comm.allgather(type(e.value)))) == 1
    b = mpitrain.alloc_shared(8, np.float64, comm)  # the node is still usable, in step on every rank
    b[...] = comm.Get_rank()
    allreduce(b, comm, algorithm="shm")
    np.testing.assert_allclose(b, sum(range(comm.Get_size())))
    mpitrain.free_shared(b, comm)
