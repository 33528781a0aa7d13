"""Job configuration: typed dataclasses, TOML job files, ``--set section.key=value`` overrides.

Unknown sections or keys, wrong types and out-of-range values are errors that
name the key (and the file, with line and column for TOML syntax errors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

from .runtime import UserError


@dataclass
class DataConfig:
    path: str = "data/digits"        # directory of shard files; made on first use for built-ins
    dataset: str = "digits"          # built-in to make when path is missing: digits | synthetic | pycode | ""
    shards: int = 4                  # shards to make for a built-in
    rows: int = 0                    # synthetic only: rows (0 = the generator's default)
    features: int = 0                # synthetic only: features (0 = default)
    classes: int = 0                 # synthetic only: classes (0 = default)


@dataclass
class ModelConfig:
    kind: str = "mlp"                # models/ registry: mlp | gpt | mpnn | graph-mlp
    hidden: list[int] = field(default_factory=lambda: [128])  # MLP widths
    activation: str = "relu"         # relu | tanh
    width: int = 32                  # mpnn: node state width
    rounds: int = 2                  # mpnn: message-passing rounds
    readout: str = "sum"             # mpnn: sum | mean over each graph's nodes
    residual: bool = False           # mpnn: h + g(h, messages) where the widths allow
    n_layer: int = 4                 # gpt: transformer blocks
    n_head: int = 4                  # gpt: attention heads (n_embd % n_head == 0)
    n_embd: int = 128                # gpt: channels
    block_size: int = 128            # gpt: context length (tokens); a batch row is block_size + 1 tokens
    vocab_size: int = 0              # gpt: 0 = the data set's (256 for byte tokens)
    tie_embeddings: bool = True      # gpt: the LM head is the token embedding


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 32             # per rank
    lr: float = 0.1
    optimizer: str = "sgd"           # sgd | adam | adamw
    momentum: float = 0.9
    weight_decay: float = 0.0
    beta1: float = 0.9               # adam
    beta2: float = 0.999             # adam
    clip_norm: float = 0.0           # clip by global norm; 0 = off
    clip_value: float = 0.0          # clip each gradient to [-v, v]; 0 = off
    schedule: str = "constant"       # constant | step | cosine
    warmup_steps: int = 0
    step_epochs: int = 10            # step schedule: decay every this many epochs
    gamma: float = 0.1               # step schedule: decay factor
    min_lr: float = 0.0              # cosine schedule floor
    seed: int = 0
    backend: str = "numpy"           # numpy | cupy
    share_gpu: bool = False          # cupy: allow several ranks on one GPU
    nonfinite: str = "error"         # error | skip: what to do with a NaN/Inf gradient
    check_every: int = 100           # steps between cross-rank parameter hash checks; 0 = off
    eval_batch_size: int = 512
    step_sleep: float = 0.0          # testing aid: seconds to sleep per step
    zero: int = 0                    # ZeRO over the dp group: 1 optimizer state, 2 + gradients (sync/zero.py),
                                     # 3 + parameters, gathered block by block (sync/zero3.py)
    memory_limit: int = 0            # bytes per rank the run may plan to hold; 0 = the node's free memory / its ranks
    sync_every: int = 1              # 1 = average gradients every step; T > 1 = local SGD: T local
                                     # steps, then average the parameters
    max_steps: int = 0               # > 0: train this many optimizer steps (epochs then ignored); 0 = by epochs
    accum_steps: int = 1             # micro-batches per optimizer step (gradient accumulation)
    eval_every: int = 0              # > 0: evaluate (val/test loss) every this many steps; 0 = at epoch ends only
    eval_batches: int = 0            # > 0: at most this many eval batches per rank per evaluation; 0 = all
    threads: int = 0                 # BLAS/OpenMP threads per rank; 0 = auto: the node's cores / its ranks
                                     # (or OMP_NUM_THREADS when set; mpitrain/threads.py)
    log_every: int = 0               # > 0: a progress line every this many steps (loss, ms/step, rate, comm,
                                     # ETA); 0 = the bar on a terminal, a line every 10 s otherwise


@dataclass
class CommConfig:
    algorithm: str = "ring"          # ring | tree | native | auto | hier | shm
    timeout_s: float = 0.0           # watchdog: abort when a rank is this late to a step; 0 = off
    bucket_bytes: int = 0            # >0: average gradients in buckets overlapped with backprop
    overlap: str = "progress"        # buckets: "progress" (between layers) | "thread" (comm thread)
    mode: str = "sync"               # sync (all-reduce) | ps (asynchronous parameter server)
    compress: str = "none"           # gradient compression: none | fp16 | topk | sign
    topk_ratio: float = 0.01         # topk: fraction of the gradient's elements sent per step
    sign_block: int = 0              # sign: elements per float32 scale (blocks inside each tensor); 0 = one per tensor
    error_feedback: bool = True      # topk/sign: keep what was not sent and add it next step
    servers: int = 1                 # ps: server ranks (ranks 0..servers-1); the rest are workers
    max_staleness: int = 4           # ps: a worker may run at most this many steps ahead of the slowest


@dataclass
class ParallelConfig:
    tp: int = 1                      # tensor-parallel ranks per stage (1 = off)
    pp: int = 1                      # pipeline stages (the model's blocks split across ranks); 1 = off
    schedule: str = "1f1b"           # pipeline schedule: 1f1b | gpipe
    sequence: bool = False           # with tp > 1: sequence parallelism (activations split by rows outside
                                     # attention and the MLP; reduce-scatter + all-gather for the all-reduces)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints/digits"
    every: int = 1                   # epochs; 0 = off
    every_steps: int = 0             # > 0: also every this many steps; 0 = off
    keep: int = 3                    # newest checkpoints kept


@dataclass
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    source: str = "<defaults>"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def digest(self) -> str:
        """A hash of the settings that must agree on every rank."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


SECTIONS = {f.name: f.type for f in fields(JobConfig) if f.name != "source"}
CHOICES = {
    ("model", "kind"): ("mlp", "gpt", "mpnn", "graph-mlp"),
    ("model", "readout"): ("sum", "mean"),
    ("model", "activation"): ("relu", "tanh"),
    ("train", "optimizer"): ("sgd", "adam", "adamw"),
    ("train", "schedule"): ("constant", "step", "cosine"),
    ("train", "backend"): ("numpy", "cupy"),
    ("train", "nonfinite"): ("error", "skip"),
    ("comm", "algorithm"): ("ring", "tree", "native", "auto", "hier", "shm"),
    ("comm", "overlap"): ("progress", "thread"),
    ("comm", "mode"): ("sync", "ps"),
    ("comm", "compress"): ("none", "fp16", "topk", "sign"),
    ("data", "dataset"): ("digits", "synthetic", "graphs", "pycode", ""),
    ("parallel", "schedule"): ("1f1b", "gpipe"),
}


def _section_class(name):
    return get_type_hints(JobConfig)[name]


def keys() -> list[str]:
    """Every valid dotted key."""
    return [f"{s}.{f.name}" for s in SECTIONS for f in fields(_section_class(s))]


def _coerce(key: str, value: Any, typ, where: str):
    """Check ``value`` against the field type; ints are accepted for floats."""
    ok = False
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif typ is str:
        ok = isinstance(value, str)
    elif typ == list[int]:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok:
        tname = getattr(typ, "__name__", str(typ)).replace("list[int]", "list of integers")
        raise UserError(f"{where}: {key} must be {tname if typ != list[int] else 'a list of integers'}, "
                        f"got {value!r} ({type(value).__name__})")
    return value


def _apply(cfg: JobConfig, table: dict, where: str) -> None:
    for sname, sval in table.items():
        if sname not in SECTIONS:
            raise UserError(f"{where}: unknown section [{sname}]; sections: {', '.join(SECTIONS)}")
        if not isinstance(sval, dict):
            raise UserError(f"{where}: {sname} must be a table ([{sname}])")
        section = getattr(cfg, sname)
        hints = get_type_hints(type(section))
        for k, v in sval.items():
            if k not in hints:
                raise UserError(f"{where}: unknown key {sname}.{k}; valid keys in [{sname}]: "
                                f"{', '.join(hints)}")
            setattr(section, k, _coerce(f"{sname}.{k}", v, hints[k], where))


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value); the value is parsed as TOML, else a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set {text!r}: expected section.key=value (e.g. --set train.lr=0.05)")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def validate(cfg: JobConfig, origins: dict | None = None) -> None:
    """Range and choice checks, each error naming the key (and the --set that gave it, if one did)."""
    origins = origins or {}
    _finite(cfg, origins)
    for (s, k), allowed in CHOICES.items():
        v = getattr(getattr(cfg, s), k)
        if v not in allowed:
            raise UserError(f"{origins.get(f'{s}.{k}', cfg.source)}: {s}.{k} = {v!r}; allowed: "
                            f"{', '.join(repr(a) for a in allowed)}")
    t = cfg.train
    rules = [
        ("train.epochs", t.epochs >= 1, "must be >= 1"),
        ("train.batch_size", t.batch_size >= 1, "must be >= 1"),
        ("train.lr", t.lr > 0, "must be > 0"),
        ("train.momentum", 0 <= t.momentum < 1, "must be in [0, 1)"),
        ("train.weight_decay", t.weight_decay >= 0, "must be >= 0"),
        ("train.beta1", 0 <= t.beta1 < 1, "must be in [0, 1)"),
        ("train.beta2", 0 <= t.beta2 < 1, "must be in [0, 1)"),
        ("train.clip_norm", t.clip_norm >= 0, "must be >= 0 (0 = off)"),
        ("train.clip_value", t.clip_value >= 0, "must be >= 0 (0 = off)"),
        ("train.warmup_steps", t.warmup_steps >= 0, "must be >= 0"),
        ("train.step_epochs", t.step_epochs >= 1, "must be >= 1"),
        ("train.gamma", 0 < t.gamma <= 1, "must be in (0, 1]"),
        ("train.check_every", t.check_every >= 0, "must be >= 0 (0 = off)"),
        ("train.eval_batch_size", t.eval_batch_size >= 1, "must be >= 1"),
        ("train.step_sleep", t.step_sleep >= 0, "must be >= 0"),
        ("train.min_lr", t.min_lr >= 0, "must be >= 0 (the cosine schedule's floor)"),
        ("train.seed", t.seed >= 0, "must be >= 0 (any non-negative integer)"),
        ("model.hidden", all(h >= 1 for h in cfg.model.hidden), "widths must be >= 1"),
        ("model.hidden", all(h <= MAX_WIDTH for h in cfg.model.hidden),
         f"widths must be <= {MAX_WIDTH} (2**20) each"),
        ("model.hidden", _hidden_weights(cfg.model.hidden) <= MAX_HIDDEN_WEIGHTS,
         f"needs {_hidden_weights(cfg.model.hidden):,} weights between hidden layers, more than "
         f"{MAX_HIDDEN_WEIGHTS:,} (2**31; every rank holds all parameters, gradients and optimizer "
         "state): use narrower or fewer layers"),
        ("model.width", cfg.model.width >= 1, "must be >= 1"),
        ("model.rounds", cfg.model.rounds >= 1, "must be >= 1"),
        ("model.n_layer", cfg.model.n_layer >= 1, "must be >= 1"),
        ("model.n_head", cfg.model.n_head >= 1, "must be >= 1"),
        ("model.n_embd", cfg.model.n_embd >= 1 and cfg.model.n_embd % max(cfg.model.n_head, 1) == 0,
         "must be >= 1 and a multiple of model.n_head"),
        ("model.block_size", cfg.model.block_size >= 1, "must be >= 1"),
        ("model.vocab_size", cfg.model.vocab_size == 0 or cfg.model.vocab_size >= 2, "must be >= 2 (or 0 = the data's)"),
        ("data.shards", cfg.data.shards >= 1, "must be >= 1"),
        ("data.rows", cfg.data.rows >= 0, "must be >= 0"),
        ("data.features", cfg.data.features >= 0, "must be >= 0"),
        ("data.classes", cfg.data.classes == 0 or cfg.data.classes >= 2, "must be >= 2 (or 0 = default)"),
        ("data.path", bool(cfg.data.path), "must not be empty"),
        ("comm.timeout_s", cfg.comm.timeout_s >= 0, "must be >= 0 (0 = off)"),
        ("comm.bucket_bytes", cfg.comm.bucket_bytes >= 0, "must be >= 0 (0 = off)"),
        ("train.sync_every", t.sync_every >= 1, "must be >= 1 (1 = synchronous)"),
        ("train.zero", t.zero in (0, 1, 2, 3), "must be 0 (replicated), 1 (optimizer state sharded), 2 (and "
         "gradients) or 3 (and parameters)"),
        ("train.memory_limit", t.memory_limit >= 0, "must be >= 0 bytes (0 = the node's free memory / its ranks)"),
        ("comm.topk_ratio", 0 < cfg.comm.topk_ratio <= 1, "must be in (0, 1]"),
        ("comm.sign_block", cfg.comm.sign_block >= 0, "must be >= 0 (0 = one scale per tensor)"),
        ("comm.servers", cfg.comm.servers >= 1, "must be >= 1"),
        ("comm.max_staleness", cfg.comm.max_staleness >= 0, "must be >= 0 (0 = lock-step)"),
        ("checkpoint.every", cfg.checkpoint.every >= 0, "must be >= 0 (0 = off)"),
        ("checkpoint.every_steps", cfg.checkpoint.every_steps >= 0, "must be >= 0 (0 = off)"),
        ("train.max_steps", t.max_steps >= 0, "must be >= 0 (0 = by epochs)"),
        ("train.accum_steps", t.accum_steps >= 1, "must be >= 1 (1 = no accumulation)"),
        ("train.eval_every", t.eval_every >= 0, "must be >= 0 (0 = at epoch ends only)"),
        ("train.eval_batches", t.eval_batches >= 0, "must be >= 0 (0 = all)"),
        ("train.threads", t.threads >= 0, "must be >= 0 (0 = auto: the node's cores / its ranks)"),
        ("train.log_every", t.log_every >= 0, "must be >= 0 (0 = the bar, or a line every 10 s in a log)"),
        ("checkpoint.keep", cfg.checkpoint.keep >= 1, "must be >= 1"),
        ("parallel.pp", cfg.parallel.pp >= 1, "must be >= 1 (1 = no pipeline)"),
        ("parallel.tp", cfg.parallel.tp >= 1, "must be >= 1 (1 = no tensor parallelism)"),
    ]
    for key, ok, why in rules:
        if not ok:
            s, k = key.split(".")
            raise UserError(f"{origins.get(key, cfg.source)}: {key} = {getattr(getattr(cfg, s), k)!r} {why}")
    _exclusive(cfg, origins)
    _model_parallel(cfg, origins)


MAX_WIDTH = 2**20              # model.hidden: widest layer accepted
MAX_HIDDEN_WEIGHTS = 2**31    # model.hidden: most weights between consecutive hidden layers


def _hidden_weights(hidden: list[int]) -> int:
    return sum(a * b for a, b in zip(hidden, hidden[1:]))


def _finite(cfg: JobConfig, origins: dict) -> None:
    """Every float key (of every section, present and future) must be a finite number."""
    for sname in SECTIONS:
        section = getattr(cfg, sname)
        for name, typ in get_type_hints(type(section)).items():
            v = getattr(section, name)
            if typ is float and isinstance(v, float) and not math.isfinite(v):
                key = f"{sname}.{name}"
                raise UserError(f"{origins.get(key, cfg.source)}: {key} = {v!r} must be a finite number "
                                "(not nan or inf)")


ZERO_ALGORITHMS = ("ring", "native", "auto")  # those with reduce-scatter + all-gather halves (= scatter.ALGORITHMS)


def zero_problem(zero: int, algorithm: str) -> str | None:
    """Why ``train.zero`` cannot run on ``comm.algorithm`` (None: it can). ZeRO-1 steps between the
    all-reduce's two halves, which tree, hier and shm do not have as collectives of their own."""
    if zero and algorithm not in ZERO_ALGORITHMS:
        return (f"train.zero = {zero} needs an all-reduce split into reduce-scatter and all-gather, which "
                f"comm.algorithm = {algorithm!r} does not have; use comm.algorithm = "
                f"{', '.join(repr(a) for a in ZERO_ALGORITHMS)} or train.zero = 0")
    return None


def _exclusive(cfg: JobConfig, origins: dict) -> None:
    """Strategies that do not combine: one error naming both keys and what to drop."""
    c, t = cfg.comm, cfg.train
    problem = zero_problem(t.zero, c.algorithm)
    if problem:
        raise UserError(f"{origins.get('comm.algorithm', origins.get('train.zero', cfg.source))}: {problem}")
    on = {"comm.compress": c.compress != "none", "train.sync_every": t.sync_every > 1,
          "comm.mode": c.mode == "ps", "comm.bucket_bytes": c.bucket_bytes > 0}
    shown = {"comm.compress": repr(c.compress), "train.sync_every": t.sync_every, "comm.mode": repr(c.mode),
             "comm.bucket_bytes": c.bucket_bytes}
    active = [k for k, v in on.items() if v]
    if t.zero and [k for k in active if k != "comm.bucket_bytes"]:  # ZeRO-1 shards the all-reduce's halves
        shown["train.zero"] = t.zero
        active = ["train.zero", next(k for k in active if k != "comm.bucket_bytes")]
    if len(active) > 1:
        a, b = active[:2]
        where = origins.get(b, origins.get(a, cfg.source))
        raise UserError(f"{where}: {a} = {shown[a]} and {b} = {shown[b]} do not combine (one synchronization "
                        f"strategy per job); keep one and reset the other to its default "
                        f"(comm.compress=\"none\", train.sync_every=1, comm.mode=\"sync\", comm.bucket_bytes=0, "
                        "train.zero=0)")


def _model_parallel(cfg: JobConfig, origins: dict) -> None:
    """What a pipeline or tensor parallelism does not combine with (yet): one line naming both keys."""
    pp, tp, t, c, m = cfg.parallel.pp, cfg.parallel.tp, cfg.train, cfg.comm, cfg.model
    if cfg.parallel.sequence and tp == 1:
        raise UserError(f"{origins.get('parallel.sequence', cfg.source)}: parallel.sequence = true needs "
                        "parallel.tp > 1 (it splits tensor parallelism's activations); set parallel.tp or drop it")
    for key, n in (("parallel.pp", pp), ("parallel.tp", tp)):
        if n == 1:
            continue
        where = origins.get(key, cfg.source)
        clash = [("model.kind", m.kind, m.kind != "gpt", "only the GPT (model.kind = \"gpt\") is split across "
                  "ranks"),
                 ("comm.compress", c.compress, c.compress != "none", "reset comm.compress = \"none\""),
                 ("train.sync_every", t.sync_every, t.sync_every > 1, "reset train.sync_every = 1"),
                 ("comm.mode", c.mode, c.mode == "ps", "reset comm.mode = \"sync\"")]
        if key == "parallel.pp":
            clash.append(("model.n_layer", m.n_layer, m.n_layer < pp, "every stage needs at least one block"))
        else:
            clash += [("model.block_size", m.block_size, cfg.parallel.sequence and m.block_size % tp != 0,
                       "parallel.sequence splits the tokens of every window evenly: make model.block_size a "
                       "multiple of parallel.tp"),
                      ("model.n_head", m.n_head, m.n_head % tp != 0, "each tp rank takes whole heads: make "
                       "model.n_head a multiple of parallel.tp"),
                      ("model.n_embd", m.n_embd, (4 * m.n_embd) % tp != 0, "4 x model.n_embd (the MLP's width) "
                       "must be a multiple of parallel.tp")]
        for k, value, bad, hint in clash:
            if bad:
                raise UserError(f"{where}: {key} = {n} and {k} = {value!r} do not combine: {hint}")


def default_job_path() -> Path:
    """The packaged default job (a copy of jobs/digits.toml)."""
    return Path(str(resources.files("mpitrain") / "jobs" / "digits.toml"))


def load(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    """Defaults <- job file <- ``--set`` overrides, then validated."""
    cfg = JobConfig()
    if path is None:
        path = default_job_path()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"job file {path} not found (jobs ship in jobs/; the default is jobs/digits.toml)") from None
    except OSError as e:
        raise UserError(f"job file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"job file {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}); TOML job "
                        "files must be UTF-8: re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: TOML syntax error: {e}") from None
    cfg.source = str(path)
    _apply(cfg, table, str(path))
    origins = {f"{s}.{k}": str(path) for s, sec in table.items() for k in sec}
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(cfg, {section: {key: value}}, f"--set {text}")
        origins[f"{section}.{key}"] = f"--set {text}"
    validate(cfg, origins)
    cfg.origins = origins  # key -> the job file or --set that gave it (keys not in it: defaults)
    return cfg


def may_make_builtin(cfg: JobConfig) -> bool:
    """Whether a missing data.path may be filled with the built-in data.dataset: only where the data set was
    named with that path (a --set data.path needs a --set data.dataset beside it; a job file's path a
    dataset key), or data.path is the default -- so a typo in a path never becomes a freshly made set."""
    origins = getattr(cfg, "origins", None)
    if origins is None:  # built in code, not loaded: the caller said what it wants
        return True
    path, dataset = origins.get("data.path"), origins.get("data.dataset")
    if path is None:
        return True
    if path.startswith("--set"):
        return bool(dataset and dataset.startswith("--set"))
    return dataset is not None


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v) if isinstance(v, str) else repr(v)


def to_toml(cfg: JobConfig) -> str:
    """The job with every key resolved (defaults, job file, --set), as a TOML job file that loads back to it."""
    lines = [f"# the effective job: {cfg.source}"
             + "".join(f" {o}" for o in dict.fromkeys(getattr(cfg, "origins", {}).values()) if o.startswith("--set"))
             + " (every key, defaults filled in)"]
    for sname, section in cfg.to_dict().items():
        lines += ["", f"[{sname}]"] + [f"{k} = {_toml_value(v)}" for k, v in section.items()]
    return "\n".join(lines) + "\n"
