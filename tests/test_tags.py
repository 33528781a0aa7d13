"""Tags on the library's private communicator (the map: collectives/__init__.py): no two operations
that can be in flight at once share one. Persistent plans take the lowest tag free on every rank and
hold it until free() / collection; non-blocking handles refuse (on every rank) a slot still in flight."""

import gc

import numpy as np
import pytest

import mpitrain
from mpitrain import collectives
from mpi4py import MPI

from mpitrain.collectives import allreduce, nonblocking, plan
from mpitrain.collectives.nonblocking import iallreduce

pytestmark = pytest.mark.mpi


def data(n, r, k):
    return np.random.default_rng(7919 * r + 31 * k + n).standard_normal(n).astype(np.float64)


def expect(n, p, k):
    return np.sum([data(n, q, k) for q in range(p)], axis=0)


@pytest.fixture
def fresh(comm):
    """A communicator of its own, so the tags start free and nothing else holds them."""
    c = comm.Dup()
    yield c
    c.Free()


def _run_all(plans, bufs, r, keys):
    """Start every plan with its data, wait in reverse order (all in flight together)."""
    for h, b, k in zip(plans, bufs, keys):
        b[...] = data(b.size, r, k)
        h.start()
    for h in reversed(plans):
        h.wait()


def test_the_tag_map_has_no_overlap(comm):
    spans = [range(a, a + n) for a, n in (collectives.NB_TAGS, collectives.PLAN_TAGS)]
    fixed = {collectives.TAG_CHECK, collectives.TAG_RING, collectives.TAG_TREE, collectives.TAG_HIER}
    assert not set(spans[0]) & set(spans[1]) and not fixed & (set(spans[0]) | set(spans[1]))
    assert min(fixed) > 0 and max(spans[1]) <= min(32767, comm.Get_attr(MPI.TAG_UB))
    assert (nonblocking.TAG_BASE, nonblocking.TAG_SPAN) == collectives.NB_TAGS
    assert (plan.TAG_BASE, plan.TAG_SPAN) == collectives.PLAN_TAGS


@pytest.mark.parametrize("algorithm", ["ring", "tree", "auto"])
def test_many_live_plans_after_free_and_remake_give_native_sums(fresh, algorithm):
    """Plans freed and made again in between; every live plan's tag is unique, the same on every rank."""
    r, p = fresh.Get_rank(), fresh.Get_size()
    sizes = [1, 5, 37, 103, 1001, 2]
    bufs = [np.zeros(sizes[i % len(sizes)]) for i in range(12)]
    plans = [mpitrain.allreduce_init(b, fresh, algorithm=algorithm) for b in bufs]
    for i in (1, 4, 5, 9):  # free some, then make them again (the freed tags come back, lowest first)
        plans[i].free()
    for i in (9, 1, 5, 4):
        bufs[i] = np.zeros(bufs[i].size + 3)
        plans[i] = mpitrain.allreduce_init(bufs[i], fresh, algorithm=algorithm)
    plans.append(mpitrain.allreduce_init(b13 := np.zeros(64), fresh, algorithm=algorithm))
    bufs.append(b13)
    tags = [h._tag for h in plans if h._tag is not None]
    assert len(tags) == len(set(tags)), tags
    assert len(set(map(tuple, fresh.allgather(tags)))) == 1
    for rnd in range(2):
        keys = [10 * rnd + i for i in range(len(plans))]
        _run_all(plans, bufs, r, keys)
        for b, k in zip(bufs, keys):
            np.testing.assert_allclose(b, expect(b.size, p, k), rtol=1e-12, atol=1e-12)
            native = allreduce(data(b.size, r, k), fresh, algorithm="native")
            np.testing.assert_allclose(b, native, rtol=1e-12, atol=1e-12)
    for h in plans:
        h.free()


@pytest.mark.parametrize("second", ["ring", "tree"])
def test_plan_0_and_plan_4096_alive_together(fresh, second):
    """The reported case: plan #0 lives while 4095 more are made and freed; #4096 must not share its tag.
    Different sizes too (the truncation seen before)."""
    r, p = fresh.Get_rank(), fresh.Get_size()
    a, b = np.zeros(301), np.zeros(77)
    p0 = mpitrain.allreduce_init(a, fresh, algorithm="ring")
    for _ in range(plan.TAG_SPAN - 1):
        mpitrain.allreduce_init(np.zeros(1), fresh, algorithm="tree").free()
    p4096 = mpitrain.allreduce_init(b, fresh, algorithm=second)
    assert p0._tag != p4096._tag or p == 1
    for k in range(2):
        _run_all([p0, p4096], [a, b], r, [k, k + 5])
        np.testing.assert_allclose(a, expect(a.size, p, k), rtol=1e-12)
        np.testing.assert_allclose(b, expect(b.size, p, k + 5), rtol=1e-12)
    p0.free()
    p4096.free()


def test_all_tags_held_is_a_clear_error_on_every_rank(fresh, monkeypatch):
    monkeypatch.setattr(plan, "TAG_SPAN", 4)
    p = fresh.Get_size()
    bufs = [np.zeros(9) for _ in range(5)]
    plans = [mpitrain.allreduce_init(b, fresh, algorithm="tree") for b in bufs[:4]]
    if p == 1:  # nothing sends: no tags needed
        assert all(h._tag is None for h in plans)
        return
    with pytest.raises(ValueError, match="all 4 plan tags of this communicator are held by live plans"):
        mpitrain.allreduce_init(bufs[4], fresh, algorithm="tree")
    plans[2].free()
    again = mpitrain.allreduce_init(bufs[4], fresh, algorithm="tree")
    assert again._tag == plan.TAG_BASE + 2  # the lowest free one
    _run_all(plans[:2] + [plans[3], again], bufs[:2] + [bufs[3], bufs[4]], fresh.Get_rank(), [1, 2, 3, 4])
    np.testing.assert_allclose(bufs[4], expect(9, p, 4), rtol=1e-12)


def test_a_plan_collected_on_one_rank_only_does_not_split_the_tags(fresh):
    """Garbage collection runs at different times on different ranks: a tag dropped on rank 0 while
    rank 1 still holds its plan must not be handed out (the ranks would disagree)."""
    r, p = fresh.Get_rank(), fresh.Get_size()
    keep = mpitrain.allreduce_init(np.zeros(5), fresh, algorithm="ring")
    old = keep._tag
    if r == 0:
        del keep
        gc.collect()
    b = np.zeros(11)
    h = mpitrain.allreduce_init(b, fresh, algorithm="ring")
    tags = fresh.allgather(h._tag)
    assert len(set(tags)) == 1 and (p == 1 or tags[0] != old), tags
    b[...] = data(11, r, 3)
    h()
    np.testing.assert_allclose(b, expect(11, p, 3), rtol=1e-12)
    h.free()


def test_a_handle_slot_still_in_flight_is_refused_on_every_rank(fresh, monkeypatch):
    """Non-blocking handles: slot = count mod span; the slot's last holder still in flight anywhere -> all raise."""
    monkeypatch.setattr(nonblocking, "TAG_SPAN", 3)
    r, p = fresh.Get_rank(), fresh.Get_size()
    bufs = [np.zeros(50) for _ in range(4)]
    for k, b in enumerate(bufs):
        b[...] = data(50, r, k)
    hs = [iallreduce(b, fresh, algorithm="ring") for b in bufs[:3]]
    if p > 1:
        with pytest.raises(ValueError, match="non-blocking operations are still in flight"):
            iallreduce(bufs[3], fresh, algorithm="ring")
    for h in hs:
        h.wait()
    h4 = iallreduce(bufs[3], fresh, algorithm="ring") if p > 1 else None
    if h4 is not None:
        h4.wait()
    for k, b in enumerate(bufs if p > 1 else bufs[:3]):
        np.testing.assert_allclose(b, expect(50, p, k), rtol=1e-12)
