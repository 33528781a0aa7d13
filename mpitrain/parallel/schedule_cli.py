"""``python -m mpitrain schedule``: a pipeline schedule's instruction lists, the checker's verdict, the
predicted timeline and bubble, and (``--plot``) its picture. Serial: no MPI, no message sent."""

from __future__ import annotations

from ..runtime import UserError
from . import schedule as S


def add_arguments(p) -> None:
    p.add_argument("--pp", type=int, default=4, help="pipeline stages (default 4)")
    p.add_argument("--micro-batches", "-m", type=int, default=8, help="micro-batches per step (default 8)")
    p.add_argument("--schedule", default="1f1b", help="1f1b | gpipe (default 1f1b)")
    p.add_argument("--fwd-time", type=float, default=1.0, help="a forward's time per stage (default 1)")
    p.add_argument("--bwd-time", type=float, default=2.0, help="a backward's time per stage (default 2)")
    p.add_argument("--comm-time", type=float, default=0.0, help="a message's time (default 0)")
    p.add_argument("--plot", metavar="F.png", help="draw the timeline (matplotlib)")
    p.set_defaults(func=main)


def _validate(args) -> None:
    if args.schedule not in S.SCHEDULES:
        raise UserError(f"--schedule {args.schedule!r}: known schedules are {', '.join(S.SCHEDULES)}")
    if args.pp < 1 or args.micro_batches < 1:
        raise UserError(f"--pp {args.pp} --micro-batches {args.micro_batches}: both must be >= 1")
    if args.pp * args.micro_batches > 100_000:
        raise UserError("--pp x --micro-batches > 100,000: too long a timeline to print")
    for name in ("fwd_time", "bwd_time", "comm_time"):
        v = getattr(args, name)
        if not (v == v and 0 <= v < float("inf")) or (name != "comm_time" and v <= 0):
            raise UserError(f"--{name.replace('_', '-')} {v}: must be a finite number > 0 (comm: >= 0)")


def main(args) -> int:
    _validate(args)
    p, m = args.pp, args.micro_batches
    programs = S.build(args.schedule, p, m)
    stats = S.check(programs, p, m, args.schedule)
    spans = S.simulate(programs, p, m, args.fwd_time, args.bwd_time, args.comm_time)
    print(f"{args.schedule} schedule, pp = {p}, {m} micro-batches: the instruction lists")
    for r, prog in enumerate(programs):
        print(f"  stage {r}: " + ", ".join(f"{i.op.replace('_', ' ')} {i.mb}" for i in prog))
    print(f"checked: every send has its receive in order, no cycle of waits, {stats['messages']} messages; live "
          f"micro-batches per stage {stats['max_stash']} (bound {stats['bound']})")
    print(S.render_text(spans, p, width=0 if (m + p) * 3 <= 120 else 60))
    idle = S.idle_fraction(spans, p)
    span = max(s.end for s in spans) - min(s.start for s in spans)
    print(f"step {span:g} time units; idle per stage {', '.join(f'{x:.1%}' for x in idle)}; predicted bubble "
          f"(p-1)/(m+p-1) = {S.bubble(p, m):.1%}")
    if args.plot:
        from pathlib import Path

        try:
            Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
            S.plot(spans, args.plot, f"{args.schedule}, pp={p}, M={m}")
        except OSError as e:
            raise UserError(f"--plot {args.plot}: cannot write it ({e.strerror or e})") from None
        print(f"wrote {args.plot}")
    return 0
