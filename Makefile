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

.PHONY: install run test test-slurm test-hosts bench gpu-check gpu-check-system gpu-wheels clean

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

gpu-check: install        ## GPU tests, cupy training, GPU benches (needs a CUDA GPU; adds CuPy for the driver to .venv)
	PATH=$(CURDIR)/$(BIN):$$PATH bash tests/gpu_check.sh

gpu-check-system:         ## the same with the system python3 and the wheels in .whl/, no registry (docs/gpu.md)
	bash tests/gpu_check.sh --system --wheels .whl

# What a GPU machine without a package registry lacks, as wheels for its Python (x86-64 Linux):
# run here, carry .whl/ (git-ignored, ~15 MB) with the work tree, then `make gpu-check-system` there.
GPU_WHEELS ?= mpich==5.0.2 pytest-mpi==0.6 mpi4py==4.1.2
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
                 manylinux_2_5_x86_64 manylinux1_x86_64
gpu-wheels:               ## download those wheels into .whl/ (mpich, pytest-mpi; mpi4py as a fallback)
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
	    --python-version $(GPU_PYTHON_VERSION) --implementation cp $(addprefix --platform ,$(GPU_PLATFORMS)) \
	    -d .whl $(GPU_WHEELS)
	@ls -l .whl

clean:
	rm -rf $(VENV) build *.egg-info data checkpoints runs .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
