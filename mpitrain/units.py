"""Sizes, times and bandwidths: parsing, formatting and ranges, in one place.

    sizes       ``8B``, ``4KiB``, ``1MiB``, ``64M`` (= MiB), ``1GB`` (= 10**9), ``4096`` -> bytes
                (K/M/G and KiB/MiB/GiB binary, KB/MB/GB decimal); printed as 8B, 64KiB, 1.5KiB
    ranges      lo, lo*step, lo*step**2, ... (``geometric``; ``size_range`` also ends at hi)
    times       ``25us``, ``0.1ms``, ``2s`` -> seconds; printed in microseconds
    bandwidths  ``1.17GB/s``, ``10gbit`` -> bytes per second; printed as GB/s from beta (s per byte)

Pure functions; nothing here imports the rest of mpitrain.
"""

from __future__ import annotations

import math
import re

import numpy as np

_SIZE_UNITS = {"": 1, "b": 1,
               "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
               "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9}
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
BANDWIDTH_UNITS = {"gb/s": 1e9, "mb/s": 1e6, "kb/s": 1e3, "gib/s": 2 ** 30, "mib/s": 2 ** 20,
                   "gbit/s": 1.25e8, "gbit": 1.25e8, "gb": 1.25e8, "gbps": 1.25e8,
                   "mbit/s": 1.25e5, "mbit": 1.25e5, "mbps": 1.25e5}


# --------------------------------------------------------------------------- sizes


def parse_size(text) -> int:
    """``8B``, ``4KiB``, ``1MiB``, ``64M`` (= MiB), ``1GB`` (= 10**9), ``4096`` -> bytes."""
    if isinstance(text, (int, np.integer)):
        value = int(text)
    else:
        s = str(text).strip().replace("_", "")
        i = len(s)
        while i > 0 and s[i - 1].isalpha():
            i -= 1
        num, unit = s[:i].strip(), s[i:].lower()
        if unit not in _SIZE_UNITS or not num:
            raise ValueError(f"bad size {text!r}: use a number with an optional unit "
                             "B, K/KiB, M/MiB, G/GiB (binary) or KB, MB, GB (decimal), e.g. 8B, 4KiB, 64M")
        try:
            x = float(num)
        except ValueError:
            raise ValueError(f"bad size {text!r}: {num!r} is not a number") from None
        if not math.isfinite(x):
            raise ValueError(f"bad size {text!r}")
        value = int(round(x * _SIZE_UNITS[unit]))
    if value <= 0:
        raise ValueError(f"bad size {text!r}: must be at least 1 byte")
    return value


def format_size(n: int) -> str:
    """8B, 64KiB, 1MiB, 1.5KiB, 1000B."""
    n = int(n)
    for name, unit in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= unit:
            return f"{n // unit}{name}" if n % unit == 0 else f"{n / unit:.3g}{name}"
    return f"{n}B"


def geometric(lo, hi, step: float = 4) -> list[int]:
    """lo, lo*step, lo*step**2, ... (rounded to integers) while not above hi; [] when lo > hi."""
    out, s = [], float(lo)
    while int(round(s)) <= hi:
        out.append(int(round(s)))
        s *= step
    return out


def size_range(lo: int, hi: int, step: float = 4) -> list[int]:
    """lo, lo*step, lo*step**2, ... up to hi; hi itself is added when the steps miss it."""
    if lo > hi:
        raise ValueError(f"--min ({format_size(lo)}) is larger than --max ({format_size(hi)})")
    if not step > 1:
        raise ValueError(f"--step must be > 1 (a size multiplier), got {step}")
    out = geometric(lo, hi, step)
    if out[-1] != hi:
        out.append(hi)
    return out


# --------------------------------------------------------------------------- times and bandwidths


def format_us(t) -> str:
    """Seconds as microseconds: one decimal below 10 ms, none above; ``-`` for None or not finite."""
    if t is None or not math.isfinite(t):
        return "-"
    return f"{t * 1e6:.1f}" if t < 1e-2 else f"{t * 1e6:.0f}"


def format_gbs(beta: float, spec: str = ".2f") -> str:
    """The bandwidth of ``beta`` seconds per byte in GB/s (1 GB = 1e9 bytes); ``inf`` for beta 0."""
    return f"{1e-9 / beta:{spec}} GB/s" if beta > 0 else "inf"


def parse_quantity(text: str, units: dict, what: str) -> float:
    """A number with one of ``units`` (name -> factor), finite and >= 0; ValueError naming ``what``."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-zµ/]*)\s*", text)
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"bad {what} {text!r}: a number with one of the units {', '.join(sorted(set(units)))}")
    try:
        x = float(m.group(1)) * units[m.group(2).lower()]
    except ValueError:
        raise ValueError(f"bad {what} {text!r}") from None
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"bad {what} {text!r}: must be finite and >= 0")
    return x


def parse_time(text: str, what: str = "latency") -> float:
    """``25us``, ``0.1ms``, ``2s`` -> seconds."""
    return parse_quantity(text, TIME_UNITS, what)


def parse_bandwidth(text: str, what: str = "bandwidth") -> float:
    """``1.17GB/s``, ``10gbit``, ``100mbps`` -> bytes per second."""
    return parse_quantity(text, BANDWIDTH_UNITS, what)


def format_duration(seconds: float) -> str:
    """45s, 2m10s, 1h05m: a duration as a person reads it (an ETA)."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
