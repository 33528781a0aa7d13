"""The MPI library's own Allreduce: the reference every other algorithm is checked against.

    rank 0  [a0]  \\                 / [a0+a1+a2]
    rank 1  [a1]  --- MPI_Allreduce ---  [a0+a1+a2]
    rank 2  [a2]  /                 \\ [a0+a1+a2]

Whatever the library does inside (MPICH: recursive doubling for short
messages, Rabenseifner reduce-scatter + all-gather for long ones); its cost is
at best log2(p)·alpha + 2(p-1)/p·n·beta + (p-1)/p·n·gamma.

float16 is reduced in float32 and rounded once at the end (MPI has no standard
float16 type), so it is the most accurate of the algorithms; avg is sum then
divide (floor division for integers).
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from . import _MPI_OP, finish_avg
from .wide import narrow


def allreduce(st, buf, op: str):
    if buf.dtype == np.float16:
        wide = buf.astype(np.float32)
        st.comm.Allreduce(MPI.IN_PLACE, wide, op=_MPI_OP[op])
        if op == "avg":
            finish_avg(wide, st.size)
        narrow(buf, wide)  # (beyond ±65504: inf, without a warning)
        return buf
    st.comm.Allreduce(MPI.IN_PLACE, buf, op=_MPI_OP[op])
    if op == "avg":
        finish_avg(buf, st.size)
    return buf
