"""Live metrics, written as the run goes (rank 0): JSON lines (``--log``) and TensorBoard scalars
(``--tensorboard``).

    live = Live(log="run.jsonl", tensorboard="tb/", append=resume)   # rank 0 only; UserError if unusable
    live.record("epoch", step=440, epoch=20, train_loss=0.12, test_loss=None, ...)
        run.jsonl   {"event": "epoch", "step": 440, "time": 1764.9, "epoch": 20, "train_loss": 0.12, ...}
                    one object per line, flushed at once (tail -f works); NaN / inf are written as null
        tb/         scalars "epoch/train_loss", ... at global step 440, flushed at once
                    (tensorboard --logdir tb/ shows the curves of a running job)
    live.close()

``Results`` calls ``record`` where it prints a line: one "epoch" record per epoch line, one "eval"
record per train.eval_every line; a progress line would add a "train" record the same way.
The TensorBoard writer is tensorboardX's (the ``tb`` extra); without it ``--tensorboard`` is a
one-line error saying how to install it.
"""

from __future__ import annotations

import json
import math
import os
import time

from ..runtime import UserError

TB_INSTALL = "pip install 'mpitrain[tb]' (or: pip install tensorboardX)"


def clean(value):
    """JSON-safe: NaN and inf (nothing measured) become None; NumPy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if getattr(value, "ndim", None) == 0:  # a NumPy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class TBWriter:
    """Scalars into a TensorBoard event file in ``logdir``, each batch written and flushed at once.

    tensorboardX's synchronous ``EventsWriter`` (its SummaryWriter queues events for a background
    thread and flushes every ``flush_secs``; a running job's curves would lag, the last ones be lost
    on a crash). A UserError naming the install when tensorboardX is missing."""

    def __init__(self, logdir):
        try:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto import event_pb2, summary_pb2
        except ImportError:
            raise UserError(f"--tensorboard needs the tensorboardX library: {TB_INSTALL}") from None
        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        try:
            os.makedirs(logdir, exist_ok=True)
            self._w = EventsWriter(os.path.join(logdir, "events"))
        except OSError as e:
            raise UserError(f"--tensorboard {logdir}: cannot write there ({e.strerror or e}); choose another "
                            "directory") from None

    def scalars(self, step: int, pairs) -> None:
        values = [self._summary.Value(tag=tag, simple_value=float(v)) for tag, v in pairs]
        self._w.write_event(self._event(wall_time=time.time(), step=int(step), summary=self._summary(value=values)))
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class Live:
    """Rank 0's live outputs; both optional (a ``Live()`` with neither does nothing)."""

    def __init__(self, log=None, tensorboard=None, append: bool = False):
        self._f = self._tb = None
        if log:
            try:
                self._f = open(log, "a" if append else "w", buffering=1)  # line-buffered: one write per line
            except OSError as e:
                raise UserError(f"--log {log}: cannot write there ({e.strerror or e}); choose another path") from None
        if tensorboard:
            self._tb = TBWriter(tensorboard)

    def record(self, event: str, step: int, **values) -> None:
        """One JSON line and one scalar per finite number (tag ``event/key``) at ``step``."""
        rec = clean({"event": event, "step": int(step), "time": round(time.time(), 3), **values})
        if self._f is not None:
            self._f.write(json.dumps(rec, allow_nan=False) + "\n")
            self._f.flush()
        if self._tb is not None:
            self._tb.scalars(step, [(f"{event}/{k}", v) for k, v in rec.items() if k not in ("step", "time")
                                    and isinstance(v, (int, float)) and not isinstance(v, bool)])

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
