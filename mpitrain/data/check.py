"""``check_dataset(path)``: validate a whole data set, every file, every row (serial).

Checks: the directory and manifest.json (keys, types, schema version, contiguous
shard offsets, row totals); for each shard and the test file: present, opens (not
truncated), x float32 [rows, features] / y int64 [rows], attributes agree with the
manifest (schema version, features, classes, rows, offset, checksum), labels in
[0, classes), no NaN/Inf in x, and the content checksum recomputed from the rows
equals the recorded one. Graph sets (manifest kind "graphs", graphs.py): per file the arrays,
edges in range of their graph, offsets monotone, sizes agreeing, labels, finite values and the
checksum, each problem naming the file and the graph. Leftover temporary files and shard files the manifest
does not list are reported as notes (harmless, safe to delete).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .graphs import is_graph_manifest, read_graph_file
from .shards import (MANIFEST, TMP_MARK, DataProblem, block_rows_for, is_shard_name, open_checked,
                     read_manifest, scan)


@dataclass
class FileReport:
    file: str
    kind: str            # manifest | train | test | val
    rows: int | None     # tokens for a token data set
    problem: str | None  # None when the file is fine


@dataclass
class CheckReport:
    path: str
    files: list[FileReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest: dict | None = None

    @property
    def problems(self) -> list[str]:
        return [f"{r.file}: {r.problem}" for r in self.files if r.problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"data set {self.path}"]
        m = self.manifest
        if m and m.get("kind") == "graphs":
            made = (m.get("made") or {}).get("how", "?")
            lines.append(f"  {m['train_rows']} train graphs in {len(m['shards'])} shards, {m['test']['rows']} test "
                         f"graphs, {m['features']} node features, {m.get('edge_features', 0)} edge features, "
                         f"{m['classes']} classes, schema v{m['schema_version']} ({made})")
        elif m and m.get("kind") == "tokens":
            lines.append(f"  {m['train_tokens']:,} train tokens in {len(m['shards'])} shards, {m['val']['tokens']:,} "
                         f"val tokens, vocab {m['vocab_size']} ({m.get('dtype')}), "
                         f"{len(m.get('sources', []))} source file(s) ({(m.get('made') or {}).get('how', '?')})")
        elif m:
            made = (m.get("made") or {}).get("how", "?")
            lines.append(f"  {m['train_rows']} train rows in {len(m['shards'])} shards, "
                         f"{m['test']['rows']} test rows, {m['features']} features, "
                         f"{m['classes']} classes, schema v{m['schema_version']} ({made})")
        for r in self.files:
            unit = {"graphs": "graphs", "tokens": "tokens"}.get((m or {}).get("kind"), "rows")
            rows = "" if r.rows is None else f"{r.rows:>9} {unit}"
            status = "ok" if r.problem is None else "FAIL (the error below says why)"
            lines.append(f"  {Path(r.file).name:<20} {r.kind:<8} {rows:>14}  {status}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        n = len(self.problems)
        lines.append("  all files ok" if n == 0 else f"  {n} problem(s)")
        return "\n".join(lines)


def check_dataset(path) -> CheckReport:
    """Validate the data set in ``path``; never raises for bad data (see the report)."""
    from .tokens import KIND as TOKENS, manifest_kind

    path = Path(path)
    rep = CheckReport(str(path))
    if manifest_kind(path) == TOKENS:
        check_tokens(path, rep)
        return rep
    try:
        m = read_manifest(path)
    except DataProblem as e:
        rep.files.append(FileReport(e.file, "manifest", None, e.reason))
        return rep
    rep.manifest = m
    rep.files.append(FileReport(str(path / MANIFEST), "manifest", None, None))
    if is_graph_manifest(m):
        return _check_graphs(path, m, rep)
    br = block_rows_for(m["features"])
    entries = [(e, "train") for e in m["shards"]] + [(m["test"], "test")]
    for entry, kind in entries:
        fp = path / entry["file"]
        problem = None
        try:
            f = open_checked(fp, manifest=m, entry=entry, kind=kind)
            try:
                got = scan(f, fp, 0, entry["rows"], classes=m["classes"], block_rows=br,
                           checksum=True)
            finally:
                f.close()
            if got != entry["checksum"]:
                problem = ("checksum mismatch: the contents changed since the set was made "
                           "(corrupted or edited)")
        except DataProblem as e:
            problem = e.reason
        rep.files.append(FileReport(str(fp), kind, entry["rows"], problem))
    listed = {e["file"] for e, _ in entries}
    for p in sorted(path.iterdir()):
        if p.name.startswith(".") and TMP_MARK in p.name:
            rep.notes.append(f"{p.name}: temporary file left by an interrupted writer (safe to delete)")
        elif is_shard_name(p.name) and p.name not in listed:
            rep.notes.append(f"{p.name}: not listed in {MANIFEST} (ignored; safe to delete)")
    return rep


def _check_graphs(path: Path, m: dict, rep: CheckReport) -> CheckReport:
    """Every graph file, read whole and validated (graphs.read_graph_file)."""
    for entry, kind in [(e, "train") for e in m["shards"]] + [(m["test"], "test")]:
        fp = path / entry["file"]
        problem = None
        try:
            read_graph_file(fp, manifest=m, entry=entry, kind=kind, verify=True)
        except DataProblem as e:
            problem = e.reason
        rep.files.append(FileReport(str(fp), kind, entry["rows"], problem))
    listed = {e["file"] for e in m["shards"]} | {m["test"]["file"]}
    for p in sorted(path.iterdir()):
        if is_shard_name(p.name) and p.name not in listed:
            rep.notes.append(f"{p.name}: not listed in {MANIFEST} (ignored; safe to delete)")
    return rep


def check_tokens(path, rep) -> None:
    """Fill a data.check.CheckReport for a token data set: every file, vocab range, checksums."""
    from .tokens import open_token_file, read_token_manifest, token_checksum

    try:
        m = read_token_manifest(path)
    except DataProblem as e:
        rep.files.append(FileReport(e.file, "manifest", None, e.reason))
        return
    rep.manifest = m
    rep.files.append(FileReport(str(Path(path) / MANIFEST), "manifest", None, None))
    for entry, kind in [(e, "train") for e in m["shards"]] + [(m["val"], "val")]:
        fp, problem = Path(path) / entry["file"], None
        try:
            with open_token_file(fp, m, entry, kind) as f:
                t = f["tokens"][...]
            if t.size and int(t.max()) >= m["vocab_size"]:
                problem = f"token {int(t.max())} outside the vocabulary [0, {m['vocab_size']})"
            elif token_checksum(t) != entry["checksum"]:
                problem = "checksum mismatch: the contents changed since the set was made (corrupted or edited)"
        except DataProblem as e:
            problem = e.reason
        rep.files.append(FileReport(str(fp), kind, entry["tokens"], problem))
