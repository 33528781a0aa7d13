"""The one results schema: the epoch line, the per-epoch history, the ``--metrics-out`` dict, the done line.

Every strategy reports through here (the parameter server too), so a run's JSON always holds:

    test_accuracy test_loss epochs steps ranks samples_per_s comm_fraction wall_s timers_s
    nonfinite_skipped algorithm backend stopped_early strategy comm_bytes bytes_per_step
    optimizer_bytes_per_rank history [+ strategy-specific sections, e.g. "ps"]

and, from the training loop (train/loop.py), what rank 0 holds between steps, measured from its arrays
(ZeRO's paged buffers: their resident pages), its peak RSS, and the start-up plan (train/memory.py):

    param_bytes_per_rank grad_bytes_per_rank peak_rss_bytes predicted_bytes_per_rank
    predicted_{params,grads,optimizer,gathered,in_flight,activations}_bytes

``history`` has one entry per epoch: epoch, step, wall_s, comm_bytes (sent by all ranks so far),
train_loss, train_accuracy (this epoch's, rank 0's batches), test_accuracy, test_loss (a run that ends by train.max_steps mid-epoch: a fractional last epoch).
``evals`` has one entry per train.eval_every evaluation: step, wall_s, train_loss, val_loss.

A language model (a model with ``flops_per_token``, the GPT) adds

    val_loss      nats per token: the last evaluation's loss over the val split (summed over ranks)
    val_bpb       bits per byte = val_loss / ln 2 (byte tokens, vocab <= 256; else null)
    baseline_bits gzip -9 / xz -9 on the val split, bits per byte (token sets; data/baseline.py)
    tokens_per_s  training tokens (all ranks) per second of wall time, evaluation time left out
    mfu           tokens_per_s x flops_per_token / peak, flops_per_token = 6·N_mm + 12·L·T·C
                  (models/gpt.py) and peak = the sum over ranks of a float matmul's FLOP/s
                  measured at start-up (``measure_peak_flops``: 2·n³ per n x n matmul)
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from .live import Live

from ..runtime import UserError, log0
from ..units import json_text


def check_writable(path, what: str) -> None:
    """Fail before training, not after it, when an output file cannot be written."""
    if not path:
        return
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        existed = p.exists()
        with open(p, "a"):
            pass
        if not existed:
            p.unlink()
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write there ({e.strerror or e}); choose another path") from None


class Results:
    def __init__(self, epochs: int):
        self.epochs = epochs
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.unit = "samples"  # what the rates count: samples | tokens (a language model) | graphs
        self.vocab_size = 0
        self.first_step = 0
        self.baseline = None  # token sets: {"gzip -9": bits, "xz -9": bits, "unit": ...} (data/baseline.py)
        self.live = Live()    # --log / --tensorboard (rank 0; live.py): a record per line printed here
        self.t_start = time.perf_counter()

    def start(self) -> None:
        """The clock of samples/s and wall_s starts here (after set-up)."""
        self.t_start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def epoch(self, epoch: int, step: int, comm_bytes: float, train: tuple, test: tuple, samples: int,
              comm_fraction: float, eval_s: float = 0.0) -> None:
        """One history entry and the epoch line (rank 0 prints). ``train`` = (loss sum, correct, seen);
        the rate leaves out ``eval_s`` seconds of evaluation."""
        elapsed = self.elapsed()
        test_loss, test_acc = test
        loss, correct, seen = train
        train_loss, train_acc = (loss / seen, correct / seen) if seen else (float("nan"), float("nan"))
        entry = {"epoch": epoch, "step": step, "wall_s": elapsed, "comm_bytes": comm_bytes,
                 "train_loss": float(train_loss), "train_accuracy": float(train_acc),
                 "test_accuracy": float(test_acc), "test_loss": float(test_loss)}
        self.history.append(entry)
        self.live.record("epoch", **entry, samples_per_s=samples / max(elapsed, 1e-9), comm_fraction=comm_fraction)
        rate = f"{samples / max(elapsed - eval_s, 1e-9):,.0f} {self.unit}/s"
        if self.unit == "tokens":
            log0(f"epoch {epoch:>3}/{self.epochs}  train loss {loss / max(seen, 1):.4f} (epoch mean)  val loss "
                 f"{test_loss:.4f} ({self.bits(test_loss)})  {rate}  comm {100 * comm_fraction:.0f}%")
            return
        log0(f"epoch {epoch:>3}/{self.epochs}  loss {loss / max(seen, 1):.4f}  train acc "
             f"{correct / max(seen, 1):.4f}  test loss {test_loss:.4f}  test acc {test_acc:.4f}  "
             f"{rate}  comm {100 * comm_fraction:.0f}%")

    def bits(self, loss: float) -> str:
        """A language model's loss (nats per token) in bits per byte (byte tokens) or per token."""
        per = (self.baseline or {}).get("unit", "byte" if 0 < self.vocab_size <= 256 else "token")
        return f"{loss / math.log(2):.3f} bits/{per}"

    def eval_line(self, step: int, total: int, train: tuple, val: tuple, rates: dict) -> None:
        """One train.eval_every entry and line: step, the train loss since the previous evaluation, val loss."""
        loss, correct, seen = train
        val_loss, steps = float(val[0]), step - (self.evals[-1]["step"] if self.evals else self.first_step)
        self.evals.append({"step": step, "wall_s": self.elapsed(), "train_loss": loss / max(seen, 1),
                           "val_loss": val_loss})
        self.live.record("eval", **self.evals[-1], val_bits=val_loss / math.log(2), **rates)
        head = f"step {step:>6}/{total}  train loss {loss / max(seen, 1):.4f} (last {steps} steps)"
        if self.unit != "tokens":
            log0(f"{head}  test loss {val_loss:.4f}  test acc {float(val[1]):.4f}  "
                 f"{rates['tokens_per_s']:,.0f} {self.unit}/s")
            return
        mfu = f"  mfu {100 * rates['mfu']:.1f}%" if "mfu" in rates else ""
        b = self.baseline
        ref = f"; gzip -9 {b['gzip -9']:.3f}, xz -9 {b['xz -9']:.3f}" if b else ""
        log0(f"{head}  val loss {val_loss:.4f} ({self.bits(val_loss)}{ref})  {rates['tokens_per_s']:,.0f} "
             f"tokens/s{mfu}")

    def done_line(self, test: tuple, steps: int, rates: dict, note: str = "") -> None:
        """The run's last line: what the model kind measures (val bits for a language model, else accuracy)."""
        took = f"{steps} steps in {self.elapsed():.1f} s"
        if self.unit == "tokens":
            mfu = f", mfu {100 * rates['mfu']:.1f}%" if "mfu" in rates else ""
            log0(f"done: val loss {float(test[0]):.4f} ({self.bits(float(test[0]))}), {took}, "
                 f"{rates['tokens_per_s']:,.0f} tokens/s{mfu}{note}")
        else:
            log0(f"done: test accuracy {test[1]:.4f}, {took}{note}")

    def lm_metrics(self, test: tuple, rates: dict, vocab_size: int) -> dict:
        val_loss = float(test[0])
        m = {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) if 0 < vocab_size <= 256 else float("nan"),
             "tokens_per_s": rates["tokens_per_s"], "mfu": rates.get("mfu", float("nan"))}
        if self.baseline:
            m["baseline_bits"] = dict(self.baseline)
        return m

    def metrics(self, *, test, epochs, steps, ranks, samples, comm_fraction, timers, skipped, algorithm,
                backend, stopped, strategy, comm_bytes, steps_done, bytes_divisor, optimizer_bytes, **extra):
        elapsed = self.elapsed()
        test_loss, test_acc = test
        last = self.history[-1] if self.history else {}
        if last.get("step") == steps and isinstance(last.get("epoch"), float):  # ended by max_steps mid-epoch
            epochs = last["epoch"]
        m = {"test_accuracy": float(test_acc), "test_loss": float(test_loss), "epochs": epochs, "steps": steps,
             "ranks": ranks, "samples_per_s": samples / max(elapsed, 1e-9), "comm_fraction": comm_fraction,
             "wall_s": elapsed, "timers_s": timers, "nonfinite_skipped": skipped, "algorithm": algorithm,
             "backend": backend, "stopped_early": bool(stopped), "strategy": strategy, "comm_bytes": comm_bytes,
             "bytes_per_step": comm_bytes / max(bytes_divisor, 1) / max(steps_done, 1),
             "optimizer_bytes_per_rank": int(optimizer_bytes), "history": self.history}
        if self.evals:
            m["evals"] = self.evals
        m.update(extra)
        return m

    @staticmethod
    def write(path, metrics: dict) -> None:
        """Rank 0 only. NaN/Infinity (nothing measured), at any depth, is written as null: strict JSON."""
        if not path:
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json_text(metrics, indent=2) + "\n")


def optimizer_bytes(opt) -> int:
    """Bytes of optimizer state this rank holds (momentum, Adam's m and v): its buffers, not copies."""
    bufs = getattr(opt, "_buffers", None)
    if bufs is not None:
        return sum(int(getattr(v, "nbytes", 0)) for v in bufs().values() if v is not None)
    return sum(getattr(v, "nbytes", 0) for v in opt.state_dict().values())


def measure_peak_flops(xp, dtype, n: int = 512, seconds: float = 0.3) -> float:
    """This rank's FLOP/s in an n x n x n matmul of ``dtype`` (best of repeats over ~``seconds``)."""
    import numpy as np

    from .. import backend

    rng = np.random.default_rng(0)
    a, b = (xp.asarray(rng.standard_normal((n, n)).astype(dtype)) for _ in range(2))
    c = xp.empty_like(a)
    xp.matmul(a, b, out=c)  # warm-up
    backend.synchronize(c)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == float("inf"):
        t0 = time.perf_counter()
        xp.matmul(a, b, out=c)
        backend.synchronize(c)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / max(best, 1e-12)
