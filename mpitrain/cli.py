"""Subcommands: train (the default), bench, compare, data, info, checkpoint, generate, export, schedule."""

from __future__ import annotations

import argparse
import sys

from . import __version__

COMMANDS = ("train", "bench", "compare", "data", "info", "checkpoint", "generate", "export", "schedule")


def build_parser() -> argparse.ArgumentParser:
    from . import bench, compare, export, generate, info, train
    from .data import cli as data_cli

    ap = argparse.ArgumentParser(
        prog="python -m mpitrain",
        description="Training over MPI: data, pipeline and tensor parallelism. Run under mpirun: "
                    "mpirun -n 2 python -m mpitrain",
    )
    ap.add_argument("--version", action="version", version=f"mpitrain {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    train.add_arguments(sub.add_parser("train", help="train a job (the default)"))
    bench.add_arguments(sub.add_parser("bench", help="benchmark the all-reduce algorithms"))
    compare.add_arguments(sub.add_parser("compare", help="train one job with every synchronization strategy; "
                                         "table + plot (launches its own mpirun)"))
    data_cli.add_arguments(sub.add_parser("data", help="make, import and check HDF5 shards"))
    info.add_arguments(sub.add_parser("info", help="MPI library, ranks, hosts, backend"))
    generate.add_arguments(sub.add_parser("generate", help="continue a prompt with a trained GPT checkpoint"))
    export.add_arguments(sub.add_parser("export", help="a GPT checkpoint as Hugging Face GPT-2 files (safetensors)"))
    from .parallel import schedule_cli

    schedule_cli.add_arguments(sub.add_parser("schedule", help="a pipeline schedule (GPipe, 1F1B): its instruction "
                                              "lists checked, the predicted timeline and bubble, a plot; no MPI"))
    try:
        from . import checkpoint

        checkpoint.add_arguments(sub.add_parser("checkpoint", help="list or inspect checkpoints"))
    except ImportError:
        pass
    for action in sub._choices_actions:  # `COMMAND --help` opens with what the command does
        p = sub.choices[action.dest]
        p.description = p.description or action.help[:1].upper() + action.help[1:] + "."
    return ap


def main(argv=None) -> int:
    from .units import check_env

    check_env()  # every MPITRAIN_* knob, before anything starts (units.KNOBS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        argv = ["train", *argv]
    args = build_parser().parse_args(argv)
    if args.command not in ("data", "compare", "schedule"):
        from .runtime import check_launch, get_comm, single_rank_note

        check_launch()
        if args.command in ("train", "bench"):
            single_rank_note(args.command)
        if args.command in ("bench", "generate", "info"):  # train applies its own (train.threads)
            from . import threads

            threads.apply(get_comm())
    return int(args.func(args) or 0)
