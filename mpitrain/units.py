"""Sizes, times and bandwidths: parsing, formatting and ranges, in one place.

    sizes       ``8B``, ``4KiB``, ``1MiB``, ``64M`` (= MiB), ``1GB`` (= 10**9), ``4096`` -> bytes
                (K/M/G and KiB/MiB/GiB binary, KB/MB/GB decimal); printed as 8B, 64KiB, 1.5KiB
    ranges      lo, lo*step, lo*step**2, ... (``geometric``; ``size_range`` also ends at hi)
    times       ``25us``, ``0.1ms``, ``2s`` -> seconds; printed in microseconds
    bandwidths  ``1.17GB/s``, ``10gbit`` -> bytes per second; printed as GB/s from beta (s per byte)

    knobs       MPITRAIN_* environment variables: KNOBS, env_knob (read and checked), check_env

Pure functions (the knobs read the environment); nothing here imports the rest of mpitrain but
runtime's UserError.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np

from .runtime import UserError

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


# --------------------------------------------------------------------------- environment knobs


class EnvError(UserError, ValueError):
    """A bad MPITRAIN_* environment variable: one line naming it (a user error, and a ValueError)."""


def _finite_seconds(text: str) -> float:
    import math

    v = float(text)
    if not math.isfinite(v) or v < 0:
        raise ValueError(text)
    return v


def _size_at_least(lo: int):
    def parse(text: str) -> int:
        v = parse_size(text)
        if v < lo:
            raise ValueError(text)
        return v
    return parse


def _one_of(*choices):
    def parse(text: str):
        for c in choices:
            if text.lower() == str(c):
                return c
        raise ValueError(text)
    return parse


def _positive_int_or_none(text: str):
    if text.lower() == "none":
        return None
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise ValueError(text)
    return int(text)


# Every numeric or choice knob read from the environment: name -> (parse, what it expects, zero allowed).
# Read only through env_knob(); tests walk this table (bad text, zero, negative -> EnvError naming it).
KNOBS = {
    "MPITRAIN_SHM_TILE": (_size_at_least(64), "a size of at least 64 bytes, e.g. 262144 or 256KiB", False),
    "MPITRAIN_RING_SEGMENT": (_size_at_least(64), "a size of at least 64 bytes, e.g. 1MiB", False),
    "MPITRAIN_RING_BOUND": (_one_of("ring", "direct"), "'ring' or 'direct'", False),
    "MPITRAIN_STAGING_STREAMS": (_one_of(1, 2), "1 (one CUDA stream) or 2 (copies out on one, copies in and "
                                 "reductions on the other)", False),
    "MPITRAIN_HIER_SHM": (_one_of(0, 1), "0 (message tree within hosts) or 1 (shared memory)", True),
    "MPITRAIN_TERM_GRACE_S": (_finite_seconds, "seconds >= 0, e.g. 20", True),
    "MPITRAIN_SLOW_S": (_finite_seconds, "seconds >= 0, e.g. 0.05 (the sleep per step of a 'slow' rank)", True),
    "MPITRAIN_CUDA_DRIVER": (_positive_int_or_none, "a CUDA driver version such as 12040, or 'none'", False),
}


def env_knob(name: str, default=None, text: str | None = None):
    """The value of the environment knob ``name`` (``text``: that value instead of the environment's),
    parsed and checked (KNOBS); unset or blank: ``default``. A bad value: one EnvError naming the variable."""
    parse, expect, _ = KNOBS[name]
    raw = os.environ.get(name) if text is None else text
    if raw is None or not raw.strip():
        return default
    try:
        return parse(raw.strip())
    except (ValueError, TypeError, OverflowError):
        shown = "" if default is None else f" ({default})"
        raise EnvError(f"{name}={raw!r}: expected {expect}; unset it for the default{shown}") from None


def check_env() -> None:
    """Every knob of KNOBS that is set, checked now (the CLI calls this first): a bad one is one line."""
    for name in KNOBS:
        env_knob(name)


# --------------------------------------------------------------------------- JSON numbers


def finite(obj):
    """``obj`` with every NaN/Infinity (nested in dicts, lists, tuples; Python or NumPy numbers, arrays) as
    None, NumPy scalars and arrays as Python ones: what strict JSON can hold."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_text(obj, **kw) -> str:
    """Strict JSON of ``obj`` (``finite`` first: null where a number is not finite; never NaN/Infinity)."""
    import json

    return json.dumps(finite(obj), allow_nan=False, **kw)


def format_duration(seconds: float) -> str:
    """45s, 2m10s, 1h05m: a duration as a person reads it (an ETA)."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
