"""``python -m mpi4py -m mpitrain.bench ...``: the bench without the full CLI."""

import sys

from . import build_parser, main

sys.exit(main(build_parser().parse_args()))
