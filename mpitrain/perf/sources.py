"""Where the extrapolation's parameters come from: cost model files, the cache, literals, bench JSON, defaults.

Where the parameters come from (``--link intra=SRC,inter=SRC``, each also ``default``):

    intra   a single-host cost model JSON (``bench --fit``); default: the one stored for this
            host with the most ranks not above its core count (~/.cache/mpitrain/cost-<host>-n<p>.json)
    inter   a cost model JSON fitted on more than one host (its ``links.inter``, with its
            ``exchange`` when it has one); a small JSON {"alpha": s, "beta": s/B[, "exchange":
            {"alpha", "beta"}]}; a ping-pong table {"results": [{"bytes", "one_way_us"}][,
            "exchange": [{"bytes", "time_us"}]]} (each fitted t = alpha + n·beta, and kept as a table
            for the terms listed in extrapolate.py, like a cost model's tables); a literal
            ALPHA@BANDWIDTH (``25us@1.17GB/s``, ``100us@10gbit``: ping-pong only); or bench JSON
            files of multi-host runs (``--from-json``), whose ring rows are fitted for one
            (alpha_n, beta_n) used for both ways (an effective link), the intra overheads fixed;
            default: the newest multi-host cost model in the cache
    when none is found: DEFAULT_INTRA / DEFAULT_INTER (links.py), and the output says so.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from ..collectives.tuning import ENV, OFF, cache_dir, safe_name
from ..runtime import hostname
from .fit import fit_alpha_beta
from .formulas import link_table
from .links import DEFAULT_INTER, DEFAULT_INTRA, Link, Params, parse_link_literal, parse_link_specs
from .model import CostModel, parse_regimes
from .validate import fit_inter


def read_json(path) -> dict:
    """The JSON document at ``path``; ValueError saying what is wrong (absent, not JSON)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _intra_from_model(m: CostModel, source: str) -> Params:
    if m.nodes > 1:
        raise ValueError(f"{source}: fitted on {m.nodes} nodes, its ring and tree parameters mix link types; "
                         "the intra-host parameters need a single-host fit (bench --fit on one host)")
    ln = m.links.get("intra") or {"alpha": m.alpha, "beta": m.beta}
    x = ln.get("exchange") or {}
    intra = Link(ln["alpha"], ln["beta"], f"ping-pong in {source}", xalpha=x.get("alpha"), xbeta=x.get("beta"))
    return Params(m.gamma, intra, Link(0.0, 0.0), m.ring, m.tree,
                  f"{source} ({m.ranks} ranks on {m.host or '?'}, {m.created or 'undated'})", m.ranks)


def default_intra(note: str) -> Params:
    d = DEFAULT_INTRA
    P = Params(d["gamma"], Link(d["alpha"], d["beta"], d["source"], True), Link(0.0, 0.0),
               parse_regimes(d["ring"]), parse_regimes(d["tree"]), d["source"], d["ranks"], True)
    P.notes.append(f"intra-host: {note}; using DEFAULT parameters ({d['source']}). Measure this host with: "
                   "mpirun -n 2 python -m mpitrain bench --fit")
    return P


def find_intra(host: str | None = None, cores: int | None = None) -> tuple[Path | None, str]:
    """The single-host model stored for this host to extrapolate from: the most ranks not above its
    core count (ranks sharing cores inflate alpha), else the fewest. (path or None, why)."""
    host = host or hostname()
    cores = cores or os.cpu_count() or 1
    env = os.environ.get(ENV, "").strip()
    if env:
        if env.lower() in OFF:
            return None, f"{ENV}={env} disables the stored model"
        return Path(env).expanduser(), f"{ENV}"
    found = []
    for f in sorted(cache_dir().glob(f"cost-{safe_name(host)}-n*.json")):
        m = re.fullmatch(rf"cost-{re.escape(safe_name(host))}-n(\d+)\.json", f.name)
        if m:
            found.append((int(m.group(1)), f))
    if not found:
        return None, f"no fitted model for this host ({cache_dir()}/cost-{safe_name(host)}-n<p>.json)"
    fit = [x for x in found if x[0] <= cores]
    p, f = max(fit) if fit else min(found)
    return f, f"the stored fit for {p} ranks on {host} ({cores} cores)"


def load_intra(src: str | None = None) -> Params:
    """The intra-host parameters from ``src`` (a cost model JSON, or ``default``); None: this host's."""
    if src is not None and src.strip().lower() == "default":
        return default_intra("--link intra=default")
    if src is None:
        path, why = find_intra()
        if path is None:
            return default_intra(why)
        if not path.exists():
            return default_intra(f"{why} names {path}, which does not exist")
    else:
        path = Path(src).expanduser()
    try:
        m = CostModel.from_dict(read_json(path))
    except ValueError as e:
        raise ValueError(f"intra-host parameters from {path}: {e}") from None
    P = _intra_from_model(m, str(path))
    if src is None and m.ranks > (os.cpu_count() or 1):
        P.notes.append(f"intra-host: fitted with {m.ranks} ranks on {os.cpu_count()} cores (shared cores "
                       "inflate alpha); fit with fewer ranks for a better extrapolation")
    return P


def find_inter() -> tuple[Path | None, str]:
    """The newest stored cost model with an inter-host link (a ``bench --fit`` across hosts)."""
    best_f, best_t = None, ""
    for f in sorted(cache_dir().glob("cost-*.json")):
        try:
            d = read_json(f)
            m = CostModel.from_dict(d)
        except ValueError:
            continue
        if "inter" in m.links and (best_f is None or m.created > best_t):
            best_f, best_t = f, m.created
    if best_f is None:
        return None, f"no model fitted across hosts in {cache_dir()}"
    return best_f, "the newest model fitted across hosts"


def _measured(path, entries, what: str, field: str, key: str) -> tuple[list[int], list[float]]:
    """(sizes, seconds) of a measured table's ``entries`` [{"bytes", key (us)}], two sizes at least."""
    try:
        pts = [(int(r["bytes"]), float(r[key]) * 1e-6) for r in entries]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: {what} needs {field}: [{{\"bytes\", \"{key}\"}}]") from None
    pts = [(n, t) for n, t in pts if n > 0 and t > 0]
    if len(pts) < 2:
        raise ValueError(f"{path}: {what} needs two sizes at least")
    return [n for n, _ in pts], [t for _, t in pts]


def _link_from_tables(path, d: dict) -> Link:
    """A ping-pong table {"results": [{"bytes", "one_way_us"}][, "exchange": [{"bytes", "time_us"}]]}."""
    ns, ts = _measured(path, d["results"], "a ping-pong table", "results", "one_way_us")
    a, b = fit_alpha_beta(ns, ts)
    xa = xb = xt = None
    if d.get("exchange") is not None:
        xns, xts = _measured(path, d["exchange"], "an exchange table", "exchange", "time_us")
        xa, xb = fit_alpha_beta(xns, xts)
        xt = link_table(xns, xts)
    return Link(a, b, f"{path} (ping-pong{' and exchange' if xa is not None else ''} table, "
                      f"{len(ns)} sizes, fitted t = alpha + n·beta)", xalpha=xa, xbeta=xb,
                table=link_table(ns, ts), xtable=xt)


def _link_from_model(path, d: dict) -> Link:
    """The ``links.inter`` of a cost model fitted across hosts (with its tables when it has them)."""
    try:
        m = CostModel.from_dict(d)
    except ValueError as e:
        raise ValueError(f"inter-host parameters from {path}: {e}") from None
    if "inter" not in m.links:
        raise ValueError(f"{path}: no inter-host link in this model (fitted on {m.nodes} node(s)); "
                         "fit one with bench --fit on ranks spanning two hosts or more")
    ln = m.links["inter"]
    x = ln.get("exchange") or {}
    what = "ping-pong and exchange" if x else "ping-pong"
    pp, xt = ln.get("pingpong"), x.get("times")
    return Link(ln["alpha"], ln["beta"], f"{path} ({what}, ranks {ln['ranks'][0]}<->{ln['ranks'][1]}, "
                                         f"{m.created or 'undated'})", xalpha=x.get("alpha"), xbeta=x.get("beta"),
                table=link_table(*pp) if pp else None, xtable=link_table(*xt) if xt else None)


def _inter_from_file(path: Path) -> Link | None:
    """A Link from a cost model (links.inter), a ping-pong table or a {"alpha", "beta"} JSON; None for a
    bench JSON."""
    d = read_json(path)
    if isinstance(d, dict) and "rows" in d:
        return None
    if isinstance(d, dict) and isinstance(d.get("results"), list):
        return _link_from_tables(path, d)
    if isinstance(d, dict) and "ranks" in d and "ring" in d:
        return _link_from_model(path, d)
    try:
        a, b = float(d["alpha"]), float(d["beta"])
        x = d.get("exchange")
        xa, xb = (None, None) if x is None else (float(x["alpha"]), float(x["beta"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: neither a cost model, a bench JSON nor {{\"alpha\": s, \"beta\": s/B}}") from None
    if not all(math.isfinite(v) and v >= 0 for v in (a, b, *(v for v in (xa, xb) if v is not None))):
        raise ValueError(f"{path}: alpha and beta must be finite and >= 0")
    return Link(a, b, str(path), xalpha=xa, xbeta=xb)


def load_inter(srcs, P: Params) -> Link:
    """The inter-host link from ``srcs`` (see the module docstring); ``P``: the intra parameters
    (fitting from bench rows needs their overheads). Missing: the stored one, else DEFAULT_INTER."""
    if not srcs:
        path, why = find_inter()
        if path is None:
            d = DEFAULT_INTER
            P.notes.append(f"inter-host: {why}; using DEFAULT parameters ({d['source']}: "
                           f"{Link(d['alpha'], d['beta']).text()}). Measure them with bench --fit on ranks spanning "
                           "two hosts, or give them: --link inter=FILE or inter=25us@1.17GB/s")
            return Link(d["alpha"], d["beta"], d["source"], True)
        return _inter_from_file(path)
    if len(srcs) == 1 and srcs[0].strip().lower() == "default":
        d = DEFAULT_INTER
        P.notes.append(f"inter-host: --link inter=default: DEFAULT parameters ({d['source']})")
        return Link(d["alpha"], d["beta"], d["source"], True)
    if len(srcs) == 1 and "@" in srcs[0]:
        return parse_link_literal(srcs[0])
    docs = []
    for s in srcs:
        path = Path(s).expanduser()
        ln = _inter_from_file(path)
        if ln is not None:
            if len(srcs) > 1:
                raise ValueError(f"{path}: several inter-host sources are only for bench JSON files (--from-json)")
            return ln
        docs.append((str(path), read_json(path)))
    return fit_inter(P, docs)


def load_params(link_specs=None, from_json=None) -> Params:
    """Intra and inter parameters from ``--link`` specs and ``--from-json`` files."""
    specs = parse_link_specs(link_specs)
    inter = list(specs.get("inter", []))
    if from_json:
        if inter:
            raise ValueError("give the inter-host link once: --from-json FILES or --link inter=SRC")
        inter = [f for f in str(from_json).split(",") if f.strip()]
    intra = specs.get("intra")
    if intra is not None and len(intra) != 1:
        raise ValueError("--link intra= takes one cost model JSON (or default)")
    P = load_intra(intra[0] if intra else None)
    P.inter = load_inter(inter, P)
    for kind, ln in (("inter-host", P.inter), ("intra-host", P.intra)):
        if not ln.has_exchange and not ln.default:  # DEFAULT parameters have their own NOTE
            P.notes.append(
                f"{kind}: no exchange measurement in {ln.source or 'the source'} (an older file, a ping-pong "
                "table or a literal): the exchange terms (ring steps, the check) fall back to its ping-pong"
                + (" -- likely too low where a simultaneous exchange is slower (refit: mpirun -n P python -m "
                   "mpitrain bench --fit on ranks spanning two hosts)" if kind == "inter-host" else
                   " (in shared memory the two are close; refit with bench --fit to measure it)"))
    return P
