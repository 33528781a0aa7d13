import os
import sys

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

BIN = os.path.dirname(sys.executable)
MPIRUN = os.path.join(BIN, "mpirun")


@pytest.fixture
def comm():
    """The run's communicator (a Dup of COMM_WORLD), as library code uses it."""
    from mpitrain.runtime import get_comm

    return get_comm()


@pytest.fixture
def shared_tmp(tmp_path, comm):
    """One temporary directory shared by all ranks (rank 0's tmp_path)."""
    return type(tmp_path)(comm.bcast(str(tmp_path), root=0))
