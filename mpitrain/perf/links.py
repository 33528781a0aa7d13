"""The parameters the extrapolation (extrapolate.py) runs on: one ``Link`` per link type, and ``Params``.

    Link      one link type (intra: shared memory within a host; inter: the network between hosts):
              a ping-pong's (alpha, beta), a simultaneous exchange's (xalpha, xbeta) when measured,
              and the measured tables behind them when the source has them
    Params    the intra-host fit (ring's and tree's regimes, gamma, the intra link) and the inter link

A literal link (``--link inter=25us@1.17GB/s``): a latency and a bandwidth, beta = 1 / bandwidth,
ping-pong only. Where the parameters come from (files, the cache, DEFAULT_INTRA / DEFAULT_INTER
below): sources.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..units import format_gbs, format_size, parse_bandwidth, parse_time
from .formulas import table_time
from .model import LINK_TYPES

DEFAULT_INTRA = {
    "source": "DEFAULT: the 2-core reference VM of docs/benchmarks.md (bench --fit, N = 2)",
    "alpha": 1.62e-6, "beta": 0.075e-9, "gamma": 0.035e-9, "ranks": 2,
    "ring": {"alpha": 13.4e-6, "beta": 1.81e-9, "knees": [2048, 1 << 20],
             "above": [[20.6e-6, 0.335e-9], [57.2e-6, 0.095e-9]]},
    "tree": {"alpha": 6.95e-6, "beta": 0.598e-9, "knees": [32768, 1 << 20],
             "above": [[3.36e-6, 0.334e-9], [170e-6, 0.096e-9]]},
}
DEFAULT_INTER = {"source": "DEFAULT: 10 GbE under MPI over TCP (typical values, not measured)",
                 "alpha": 25e-6, "beta": 1 / 1.17e9}


def _ab_text(a: float, b: float) -> str:
    return f"alpha {a * 1e6:.2f} us, beta {b * 1e9:.4f} ns/B ({format_gbs(b, '.3g')})"


@dataclass
class Link:
    """One link type: a ping-pong's alpha (s) and beta (s/B), the simultaneous exchange's (xalpha,
    xbeta) -- None: not measured, ``exchange()`` falls back to the ping-pong -- and the source."""

    alpha: float
    beta: float
    source: str = ""
    default: bool = False
    xalpha: float | None = None
    xbeta: float | None = None
    table: list | None = None   # the measured ping-pong [[n, one-way s], ...] (formulas.link_table), None: line only
    xtable: list | None = None  # the measured exchange [[n, s], ...]; used only with (xalpha, xbeta)

    @property
    def has_exchange(self) -> bool:
        return self.xalpha is not None and self.xbeta is not None

    def pingpong_at(self, m: float) -> tuple[float, float]:
        """(alpha, beta) of one one-way message of ``m`` bytes: with a measured table alpha is the
        table's time at m less m·beta (so alpha + m·beta = the table, formulas.table_time), else the
        fitted line."""
        if self.table is None:
            return self.pingpong()
        return table_time(self.table, m, self.beta) - m * self.beta, self.beta

    def exchange_at(self, m: float) -> tuple[float, float]:
        """``pingpong_at`` for a simultaneous exchange of ``m`` bytes each way (falls back like
        ``exchange()``: no exchange measured -> the ping-pong, its table included)."""
        if not self.has_exchange:
            return self.pingpong_at(m)
        if self.xtable is None:
            return self.xalpha, self.xbeta
        return table_time(self.xtable, m, self.xbeta) - m * self.xbeta, self.xbeta

    def exchange(self) -> tuple[float, float]:
        """(alpha, beta) of a simultaneous exchange: measured, else the ping-pong's."""
        return (self.xalpha, self.xbeta) if self.has_exchange else (self.alpha, self.beta)

    def pingpong(self) -> tuple[float, float]:
        return self.alpha, self.beta

    def text(self) -> str:
        s = "ping-pong " + _ab_text(self.alpha, self.beta)
        if self.has_exchange:
            s += "; exchange " + _ab_text(self.xalpha, self.xbeta)
        else:
            s += "; exchange: not measured (= the ping-pong)"
        tabs = [w for w, t in (("ping-pong", self.table), ("exchange", self.xtable if self.has_exchange else None))
                if t is not None]
        if tabs:
            s += (f"; measured tables used between {format_size(min(t[0][0] for t in (self.table, self.xtable) if t))}"
                  f" and {format_size(max(t[-1][0] for t in (self.table, self.xtable) if t))} "
                  f"({' and '.join(tabs)}: log-log interpolation; the line outside)")
        return s


@dataclass
class Params:
    """Everything the extrapolation needs: the intra-host fit (ring, tree, gamma, ping-pong) and the
    inter-host link."""

    gamma: float
    intra: Link
    inter: Link
    ring: dict
    tree: dict
    source: str = ""       # where ring, tree and gamma come from
    ranks: int = 2         # the rank count they were fitted at
    default: bool = False  # ring, tree, gamma are DEFAULT_INTRA
    notes: list = field(default_factory=list)  # lines the output must show (fallbacks, caveats)

    def with_inter(self, inter: Link) -> "Params":
        return Params(self.gamma, self.intra, inter, self.ring, self.tree, self.source, self.ranks,
                      self.default, list(self.notes))


def parse_link_literal(text: str) -> Link:
    """``25us@1.17GB/s`` or ``100us@10gbit``: a latency and a bandwidth (beta = 1 / bandwidth)."""
    lat, _, bw = text.partition("@")
    alpha = parse_time(lat, "latency")
    b = parse_bandwidth(bw, "bandwidth")
    if b <= 0:
        raise ValueError(f"bad bandwidth in {text!r}: must be > 0")
    return Link(alpha, 1.0 / b, f"given: {text}")


def parse_link_specs(specs) -> dict:
    """``["intra=A.json,inter=B.json,C.json", "inter=25us@1GB/s"]`` -> {"intra": [A], "inter": [...]}.
    An item without ``=`` continues the previous key (several bench JSON files for one link)."""
    out, key = {}, None
    for spec in specs or ():
        for item in str(spec).split(","):
            item = item.strip()
            if not item:
                continue
            if "=" in item:
                key, _, val = item.partition("=")
                key = key.strip()
                if key not in LINK_TYPES:
                    raise ValueError(f"--link {spec!r}: unknown link type {key!r} (known: "
                                     f"{', '.join(LINK_TYPES)})")
                out[key] = [val.strip()]
            elif key is None:
                raise ValueError(f"--link {spec!r}: use TYPE=SOURCE, e.g. intra=cost.json,inter=25us@1.17GB/s")
            else:
                out[key].append(item)
    return out
