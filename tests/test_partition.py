import random

import pytest

from mpitrain.collectives.partition import chunk_bounds, partition, segments


def _pairs():
    rnd = random.Random(0)
    pairs = [(n, p) for n in range(0, 40) for p in range(1, 10)]
    pairs += [(rnd.randrange(0, 10**7), rnd.randrange(1, 300)) for _ in range(300)]
    return pairs


def test_partition_covers_disjoint_balanced():
    for n, p in _pairs():
        parts = partition(n, p)
        assert len(parts) == p
        assert parts[0][0] == 0 and parts[-1][1] == n, (n, p)
        for (a, b), (c, d) in zip(parts, parts[1:]):
            assert b == c, (n, p)  # contiguous, no gap, no overlap
        sizes = [b - a for a, b in parts]
        assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1, (n, p, sizes)
        assert sizes == sorted(sizes, reverse=True), "remainder goes to the first chunks"
        assert all(chunk_bounds(n, p, i) == parts[i] for i in range(p))


def test_segments_cover_chunk():
    for lo, hi, seg in [(0, 0, 4), (3, 4, 4), (0, 10, 3), (5, 105, 7), (0, 8, 8), (1, 2, 100)]:
        segs = segments(lo, hi, seg)
        assert sum(b - a for a, b in segs) == hi - lo
        assert all(0 < b - a <= seg for a, b in segs)
        if segs:
            assert segs[0][0] == lo and segs[-1][1] == hi


@pytest.mark.parametrize("bad", [(5, 0, 0), (-1, 2, 0)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        chunk_bounds(*bad)
    with pytest.raises(IndexError):
        chunk_bounds(5, 2, 2)
    with pytest.raises(ValueError):
        segments(0, 4, 0)


# ----------------------------------------------------------------------------- every (n, p, rank) function


def _rank_functions():
    """Every function of the partition family that takes (n, p, rank-or-chunk): rank r of p, n elements."""
    from mpitrain.collectives import owned_chunk as public_owned
    from mpitrain.collectives import ring, scatter
    from mpitrain.data.reader import plan_segments

    return {"chunk_bounds": chunk_bounds, "ring.owned": ring.owned, "scatter.owned_chunk": scatter.owned_chunk,
            "collectives.owned_chunk": public_owned, "ring.plan": lambda n, p, r: ring.plan(n, p, r, 4),
            "reader.plan_segments": lambda n, p, r: plan_segments([n], p, r)}


@pytest.mark.parametrize("name", sorted(_rank_functions()))
@pytest.mark.parametrize("n, p, r", [(10, 4, 4), (10, 4, -1), (10, 4, 7), (10, 1, 1), (0, 3, -3), (5, 2, 2)])
def test_a_rank_outside_the_communicator_is_refused(name, n, p, r):
    """The class: any rank outside 0..p-1 raises ValueError naming it -- never wraps to another rank's range."""
    with pytest.raises(ValueError, match=f"{r}.*out of range"):
        _rank_functions()[name](n, p, r)


@pytest.mark.parametrize("name", sorted(_rank_functions()))
def test_every_rank_in_range_still_answers(name):
    f = _rank_functions()[name]
    for n, p in [(10, 4), (3, 5), (0, 2), (7, 1)]:
        for r in range(p):
            f(n, p, r)  # no error


@pytest.mark.parametrize("bad", [(10.0, 4, 0), (10, 4.0, 0), (10, 4, 1.0), (10, 4, True), ("10", 4, 0)])
def test_non_integer_arguments_are_refused(bad):
    from mpitrain.collectives import owned_chunk

    for f in (chunk_bounds, owned_chunk):
        with pytest.raises(ValueError, match="must be an integer"):
            f(*bad)


def test_owned_chunks_tile_the_buffer():
    """owned_chunk over all ranks is a permutation of the partition (the formula ZeRO relies on)."""
    from mpitrain.collectives import owned_chunk

    for n, p in _pairs()[:200]:
        owned = sorted(owned_chunk(n, p, r) for r in range(p))
        assert owned == partition(n, p), (n, p)
        assert all(owned_chunk(n, p, r) == chunk_bounds(n, p, (r + 1) % p) for r in range(p))
