"""Sizes, times and bandwidths (mpitrain.units): parsing, formatting, ranges. Serial and fast."""

import math

import numpy as np
import pytest

from mpitrain.units import (format_gbs, format_size, format_us, geometric, parse_bandwidth, parse_size, parse_time,
                            size_range)

# --------------------------------------------------------------------------- sizes (serial)


@pytest.mark.parametrize("text,want", [
    ("8B", 8), ("8", 8), ("4096", 4096), ("4KiB", 4096), ("4K", 4096), ("4k", 4096), ("1MiB", 1 << 20),
    ("64M", 64 << 20), ("256MiB", 256 << 20), ("1G", 1 << 30), ("1GiB", 1 << 30), (" 2 KiB ", 2048),
    ("1.5K", 1536), ("1KB", 1000), ("1MB", 10 ** 6), ("1GB", 10 ** 9), (16, 16),
])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "B", "abc", "0B", "-8", "8XB", "nanB", "1..5K", "infK"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (8, 1000, 1024, 1536, 64 << 10, 1 << 20, 256 << 20, 1 << 30)] == \
        ["8B", "1000B", "1KiB", "1.5KiB", "64KiB", "1MiB", "256MiB", "1GiB"]
    for n in (8, 4096, 64 << 20):
        assert parse_size(format_size(n)) == n


def test_size_range():
    assert size_range(8, 64 << 10, 4) == [8, 32, 128, 512, 2048, 8192, 32768, 65536]  # max appended
    assert size_range(8, 128, 2) == [8, 16, 32, 64, 128]
    assert size_range(100, 100, 4) == [100]
    with pytest.raises(ValueError, match="larger"):
        size_range(1024, 8, 4)
    with pytest.raises(ValueError, match="step"):
        size_range(8, 1024, 1)


def test_parse_size_takes_numpy_integers():
    assert parse_size(np.int64(4096)) == 4096 and parse_size(np.int32(8)) == 8


def test_geometric():
    assert geometric(8, 1 << 10, 4) == [8, 32, 128, 512]  # hi is not added
    assert geometric(2, 16, 2) == [2, 4, 8, 16]
    assert geometric(4096, 1000, 4) == []


# --------------------------------------------------------------------------- times and bandwidths


def test_format_us_and_gbs():
    assert [format_us(t) for t in (1.25e-6, 9.99e-3, 1e-2, 0.25)] == ["1.2", "9990.0", "10000", "250000"]
    assert format_us(None) == format_us(math.inf) == format_us(math.nan) == "-"
    assert format_gbs(1e-9) == "1.00 GB/s" and format_gbs(0.8e-9, ".3g") == "1.25 GB/s"
    assert format_gbs(0.0) == "inf"


def test_parse_time_and_bandwidth():
    assert parse_time("25us") == pytest.approx(25e-6) and parse_time("0.1ms") == pytest.approx(1e-4)
    assert parse_time("2 s") == 2.0 and parse_time("5µs") == pytest.approx(5e-6)
    assert parse_bandwidth("1.25GB/s") == pytest.approx(1.25e9) and parse_bandwidth("10gbit") == pytest.approx(1.25e9)
    assert parse_bandwidth("100mbps") == pytest.approx(1.25e7)
    for bad in ("25", "fast", "-1us", "nanus", "1e999s"):
        with pytest.raises(ValueError, match="latency"):
            parse_time(bad)
    with pytest.raises(ValueError, match="bandwidth"):
        parse_bandwidth("1GB/h")
