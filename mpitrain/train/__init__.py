"""``python -m mpitrain train``: set-up (session.py), the loop (loop.py), control (control.py) and
results (results.py), the same for every synchronization strategy (sync/).

    Trainer(cfg, comm).run(resume=False, metrics_out=None, trace=None, log=None, tensorboard=None) -> exit status
        0 done | 75 stopped by SIGUSR1/SIGTERM (a checkpoint was written; --resume continues)
"""

from __future__ import annotations

from .. import config
from ..runtime import EXIT_STOPPED, get_comm, log0
from .live import Live
from .loop import Loop, run_loop
from .results import check_writable
from .session import Run, params_digest


def add_arguments(p):
    p.add_argument("job", nargs="?", help="job file (TOML); default: the built-in digits job")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a job key, e.g. --set train.lr=0.05 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--metrics-out", metavar="FILE.json", help="write final metrics (rank 0)")
    p.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace (one process per rank; "
                   "open it in ui.perfetto.dev)")
    p.add_argument("--log", metavar="FILE.jsonl", help="stream metrics as JSON lines: one per epoch/eval line "
                   "(rank 0, flushed at once)")
    p.add_argument("--tensorboard", metavar="DIR", help="stream metrics as TensorBoard scalars (rank 0; needs "
                   "tensorboardX: pip install 'mpitrain[tb]')")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective job (every key after defaults, the job file and --set) and its "
                        "layout on this many ranks, then exit (a run saves it as job.toml beside its checkpoints)")
    p.set_defaults(func=main)


def main(args) -> int:
    cfg = config.load(args.job, args.overrides)
    if args.print_config:
        from .effective import print_config

        return print_config(cfg, get_comm())
    return Trainer(cfg, get_comm()).run(resume=args.resume, metrics_out=args.metrics_out, trace=args.trace,
                                        log=args.log, tensorboard=args.tensorboard)


class Trainer:
    """One training run of a job on ``comm``, with whichever strategy the job names."""

    def __init__(self, cfg, comm):
        self.session = Run(cfg, comm)

    @property
    def history(self):
        return self.session.results.history

    def run(self, resume=False, metrics_out=None, trace=None, log=None, tensorboard=None) -> int:
        s = self.session
        s.stop.install()  # before set-up: a signal while data is made or a checkpoint read is kept
        try:
            if s.rank == 0:
                check_writable(metrics_out, "--metrics-out")
                check_writable(trace, "--trace")
                check_writable(log, "--log")
                s.results.live = Live(log, tensorboard, append=resume)
            s.setup(resume)
            if s.strategy.owns_loop:  # the parameter server: servers and workers run loops of their own
                return s.strategy.run_loop(metrics_out, trace)
            if Loop(s).should_stop():
                log0("stopped by a signal during set-up, before the first step; nothing to save; "
                     "run again (with --resume to continue from an existing checkpoint)")
                return EXIT_STOPPED
            return run_loop(s, metrics_out, trace)
        finally:
            s.results.live.close()
            s.close()


__all__ = ["Trainer", "Run", "Loop", "add_arguments", "main", "params_digest"]
