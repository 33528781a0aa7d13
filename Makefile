# The two commands: `make run` and `make test`. Both work on a bare machine with
# only python3 (>= 3.11) and make: they create .venv and install everything.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
NP     ?= 2
STAMP  := $(VENV)/.installed-stamp
# one BLAS thread per rank: N ranks already share the cores (override: make run OMP_NUM_THREADS=4)
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS

.PHONY: install run test test-slurm test-hosts bench gpu-check clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,plot]'
	@touch $(STAMP)

install: $(STAMP)

run: install              ## train the default job on $(NP) ranks
	$(BIN)/mpirun -n $(NP) $(BIN)/python -m mpitrain

test: install             ## the whole suite: serial tests, then MPI tests at 1, 2, 3, 4 ranks
	PATH=$(CURDIR)/$(BIN):$$PATH bash tests/run_suite.sh

test-slurm: install       ## only the SLURM tests (starts a private local SLURM; needs root + apt)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -m slurm -p no:cacheprovider -q -rs tests/test_slurm.py

test-hosts: install       ## only the emulated multi-host tests (network namespaces; needs root)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -m hosts -p no:cacheprovider -q -rs tests/test_hosts.py

bench: install            ## the all-reduce bench on $(NP) ranks
	$(BIN)/mpirun -n $(NP) $(BIN)/python -m mpitrain bench

gpu-check: install        ## GPU tests, a short cupy training run, the GPU bench (needs a CUDA GPU)
	PATH=$(CURDIR)/$(BIN):$$PATH bash tests/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info data checkpoints runs .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
