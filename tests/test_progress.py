"""Training progress (train/progress.py): lines every train.log_every steps or every 10 s in a log, the bar
on a terminal; the interval's loss, ms/step, rate, comm share and ETA from a fake clock."""

import io
import re
from types import SimpleNamespace

from mpitrain.metrics import Timers
from mpitrain.train.progress import AUTO_S, Progress
from mpitrain.train.results import Results
from mpitrain.units import format_duration


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _run(log_every=0, total=100, unit="rows", size=2):
    timers = Timers()
    timers._total.update(comm=1.0, compute=3.0)  # a 25 % comm share
    cfg = SimpleNamespace(train=SimpleNamespace(log_every=log_every))
    run = SimpleNamespace(cfg=cfg, rank=0, size=size, step=0, epoch=0, total_steps=total, timers=timers,
                          results=Results(1), data_unit=unit, spec=SimpleNamespace(kind="tokens", vocab_size=256))
    return SimpleNamespace(run=run, eval_s=0.0)


def _steps(p, loop, clock, losses, dt=0.05, items=8):
    for loss in losses:
        clock.t += dt
        loop.run.step += 1
        p.step(loop.run.step, loss, 3, items)


def test_log_every_lines_interval_loss_rate_and_eta(capsys):
    loop, clock = _run(log_every=4, unit="tokens"), Clock()
    p = Progress(loop, 100, stream=io.StringIO(), tty=False, clock=clock)
    _steps(p, loop, clock, [9.0, 9.0, 9.0, 9.0])
    loop.eval_s += 1.0  # an evaluation of 1 s inside the next interval: not in ms/step nor the rate
    clock.t += 1.0
    _steps(p, loop, clock, [1.0, 2.0, 3.0, 6.0])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[1].startswith("epoch 1/1  step   8/100  loss 3.0000  50.0 ms/step  "), lines[1]
    assert "320 tokens/s  comm 25%" in lines[1], "8 items x 2 ranks per 50 ms"
    # ETA: 92 steps left x (1.4 s of wall for 8 steps, evaluation included) = 16.1 s
    assert lines[1].endswith("eta 16s") and "acc" not in lines[1], lines[1]
    assert p.take_eval_window() == (8 * 9.0 * 4 + 8 * 12.0, 24, 64) and p.take_eval_window() == (0, 0, 0)


def test_pipe_gets_a_line_every_auto_seconds_and_a_terminal_the_bar(capsys):
    loop, clock = _run(), Clock()
    out = io.StringIO()
    p = Progress(loop, 100, stream=out, tty=False, clock=clock)
    _steps(p, loop, clock, [2.0] * 50, dt=AUTO_S / 20)  # 2.5 intervals: the first step, then two more
    lines = out.getvalue().splitlines()
    assert [re.search(r"step +(\d+)/", ln)[1] for ln in lines] == ["1", "21", "41"], lines
    assert "acc 37.5%" in lines[-1] and "samples/s" in lines[-1] and "[" not in lines[-1]
    assert capsys.readouterr().out == "", "no log_every lines on stdout"
    tty = io.StringIO()
    p = Progress(_run(), 10, stream=tty, tty=True, clock=clock)
    p.loop.run.step = 4
    p.step(5, 1.0, 1, 2)
    assert "\r" in tty.getvalue() and "[##########..........]" in tty.getvalue()


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 59, 61, 3599, 3725)] == ["0s", "59s", "1m01s", "59m59s", "1h02m"]


def test_language_model_lines_and_fractional_epochs(capsys):
    r = Results(1)
    r.unit, r.vocab_size = "tokens", 256
    r.epoch(0.25, 10, 0.0, (30.0, 1, 10), (2.0, 0.4), 1000, 0.1)
    r.done_line((2.0, 0.4), 10, {"tokens_per_s": 5000.0, "mfu": 0.05})
    out = capsys.readouterr().out
    assert "train loss 3.0000 (epoch mean)  val loss 2.0000 (2.885 bits/byte)" in out and "tokens/s" in out
    assert out.splitlines()[-1].startswith("done: val loss 2.0000 (2.885 bits/byte), 10 steps in ")
    assert "acc" not in out and "samples/s" not in out
    m = r.metrics(test=(2.0, 0.4), epochs=0, steps=10, ranks=1, samples=1000, comm_fraction=0.1, timers={},
                  skipped=0, algorithm="ring", backend="numpy", stopped=False, strategy="allreduce", comm_bytes=0,
                  steps_done=10, bytes_divisor=1, optimizer_bytes=0)
    assert m["epochs"] == 0.25
