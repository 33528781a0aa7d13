"""``python -m mpitrain bench``: one harness for every all-reduce algorithm (nccl-tests style).

For each message size (``--min`` .. ``--max``, times ``--step``) and each
algorithm, on the same buffers, interleaved (round k runs every algorithm once,
starting with a different one each round, so slow drifts hit all alike):

    reset buf from a pristine rank-dependent source   (copy, not timed)
    barrier
    t0 = perf_counter(); allreduce(buf, algorithm=a); t = perf_counter() - t0

    time    = max over ranks of the median t
    algbw   = bytes / time                    (GB/s, 1 GB = 1e9 bytes)
    busbw   = algbw * 2(n-1)/n                (what each link carries; = algbw for n = 1)
    speedup = native's time / this time       (native is always timed: it is the reference)
    #wrong  = elements that differ from native's result for the same input (exactly for
              integers, beyond rtol = 4 * ranks * eps for floats), on the worst rank; results
              that are not bitwise identical on every rank count too. Checked for every
              algorithm at every size, in the first (untimed) round and in the last timed one.

``--collective reduce_scatter|allgather`` times one of the all-reduce's halves instead (kinds.py):
algorithms ring, native, auto (tree and hier have no halves: refused); busbw = algbw * (n-1)/n;
#wrong against the formula -- reduce_scatter: this rank's chunk (``owned_chunk``) of the op over
every rank's input; allgather: every rank's chunk of its own input, exactly, at its place.

A ``memcpy`` row per size (one rank copying the same number of bytes, the
other ranks idle) shows the physical ceiling; its bandwidth is bytes / time.
A ``p2p`` row per size (2 ranks or more: ranks 0 and 1 ping-pong the same bytes, the others idle;
bytes / one-way time, perf/measure.py's ping-pong) shows the wire the algorithms run on; ``--fit``
fits the model's alpha and beta to these rows when they span small and large sizes.
With ``--backend cupy`` a ``d2h`` row per size (every rank copying the bytes from
its GPU into pinned host memory at the same time) shows the ceiling of the
staged ring (collectives/staging.py), which moves every byte over that link.

The harness is reusable: ``run_sweep`` (sweep.py) returns the rows as dicts (the same on
every rank), ``measure`` (timing.py) times one function, ``parse_size``/``size_range``
(mpitrain.units) make the sizes, ``format_table``/``write_csv``/``write_json``/``plot``
(report.py) present them; checks.py holds the inputs and the #wrong checks.
``--fit`` (fit.py) and ``--model`` (model.py) hand the numbers to mpitrain.perf; options.py
parses the command line, command.py runs it.
"""

from .command import main
from .options import add_arguments, build_parser
from .report import COLUMNS, format_table, plot, write_csv, write_json
from .sweep import exit_status, run_sweep
from .timing import measure

__all__ = ["COLUMNS", "add_arguments", "build_parser", "exit_status", "format_table", "main", "measure", "plot",
           "run_sweep", "write_csv", "write_json"]
