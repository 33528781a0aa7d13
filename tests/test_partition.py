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
