#!/usr/bin/env bash
# `make gpu-check`: everything that needs a CUDA GPU, on one machine, in about 8 minutes (docs/gpu.md).
#
#   tests/gpu_check.sh                    # the project's venv (make gpu-check): installs CuPy for the
#                                         #   driver (cupy-cuda12x/13x[ctk]) when the venv has none
#   tests/gpu_check.sh --system [--wheels DIR]
#                                         # the system python3, no registry (a lent GPU machine): takes
#                                         #   what it lacks (mpich, pytest-mpi; mpi4py if it cannot load
#                                         #   MPICH) from wheels carried in DIR (default .whl, made by
#                                         #   `make gpu-wheels`), never installs CuPy
#   GPU_CHECK_DRY_RUN=1 tests/gpu_check.sh [--system] ...   # print the plan, change nothing
#
# Steps, each under `timeout`, in a total budget (a step that would overrun it is skipped, so the
# summary always comes back):
#   1. mpirun -n $NP python -m mpitrain info;
#   2. the MPI GPU tests of tests/test_gpu.py (-m "mpi and gpu") on $NP ranks, 3. the serial ones
#      (-m "gpu and not mpi"); MPITRAIN_REQUIRE_GPU=1 turns a skip into a failure;
#   4. digits, train.backend=cupy, $NP ranks sharing the GPU(s), 5 epochs: test accuracy;
#   5. jobs/synthetic.toml, 1 epoch, backend=numpy then cupy: samples/s, comm_fraction;
#   6. bench --backend cupy --algorithms ring,native up to $MAX, with the d2h ceiling rows;
#   7. benchmarks/gpu_streams.py: the staged ring with one vs two CUDA streams, 16 MiB..$MAX;
#   then tests/gpu_summary.py prints every owed number.
# Data and checkpoints stay in $WORK (runs/gpu-check); the log (everything printed) and the result
# files (JSON only) go to $RESULTS: $MPITRAIN_GPU_OUT, else $OUT (the folder a lent machine sends
# back), else $WORK. Exits 2 when there is no usable GPU (nothing was checked), 1 when a step failed.
# Knobs: MPITRAIN_GPU_NP (2), MPITRAIN_GPU_BENCH_MAX (256MiB), MPITRAIN_TEST_TIMEOUT (s per test, 120),
# MPITRAIN_RUN_TIMEOUT (s per step, 300), MPITRAIN_GPU_BUDGET (s for everything, 480),
# MPITRAIN_GPU_PYTHON (--system: python3), MPITRAIN_GPU_PREFIX (--system installs: /tmp/mpitrain-gpu),
# MPITRAIN_GPU_STEPS (which steps, e.g. "6 7" to rerun the benches; default all).
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$SECONDS

usage() {
  sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

SYSTEM=${MPITRAIN_GPU_SYSTEM:-0}
WHEELS=${MPITRAIN_GPU_WHEELS:-}
DRY=${GPU_CHECK_DRY_RUN:-0}
while [ $# -gt 0 ]; do
  case $1 in
    --system) SYSTEM=1 ;;
    --wheels) [ $# -ge 2 ] || { echo "gpu-check: --wheels needs a folder" >&2; exit 64; }; WHEELS=$2; shift ;;
    --wheels=*) WHEELS=${1#--wheels=} ;;
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check: unknown argument '$1' (try --help)" >&2; exit 64 ;;
  esac
  shift
done

NP=${MPITRAIN_GPU_NP:-2}
WORK=${MPITRAIN_GPU_WORK:-runs/gpu-check}
RESULTS=${MPITRAIN_GPU_OUT:-${OUT:-$WORK}}
case $WORK in /*) ;; *) WORK=$ROOT/$WORK ;; esac
case $RESULTS in /*) ;; *) RESULTS=$ROOT/$RESULTS ;; esac
MAX=${MPITRAIN_GPU_BENCH_MAX:-256MiB}
PER_TEST=${MPITRAIN_TEST_TIMEOUT:-120}
PER_RUN=${MPITRAIN_RUN_TIMEOUT:-300}
BUDGET=${MPITRAIN_GPU_BUDGET:-480}
PREFIX=${MPITRAIN_GPU_PREFIX:-/tmp/mpitrain-gpu}
RESULT_FILES="train-cupy.json synthetic-numpy.json synthetic-cupy.json bench-cupy.json streams-cupy.json"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export MPITRAIN_REQUIRE_GPU=1

if [ "$SYSTEM" = 1 ]; then
  PY=${MPITRAIN_GPU_PYTHON:-python3}
  if [ -z "$WHEELS" ] && [ -d .whl ]; then WHEELS=.whl; fi
else
  PY=python
fi
plan() { if [ "$DRY" = 1 ]; then echo "plan: $*"; else echo "setup: $*"; fi; }
die() { echo "gpu-check: FAILED: $*" >&2; exit "${RC:-1}"; }

if [ "$DRY" != 1 ]; then  # everything from here on is also in the log that comes back
  mkdir -p "$WORK" "$RESULTS" || exit 1
  exec > >(tee -a "$RESULTS/gpu-check.log") 2>&1
  TEE=$!
  trap 'exec 1>&- 2>&-; wait $TEE 2>/dev/null' EXIT
  echo "gpu-check: $(date -u +%FT%TZ) on $(uname -n), $([ "$SYSTEM" = 1 ] && echo system || echo venv) mode, results in $RESULTS"
fi

# ---------------------------------------------------------------- the Python environment

PYPATH=$(command -v "$PY" 2>/dev/null) || { RC=2 die "no '$PY' on PATH"; }
PYVER=$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
plan "mode: $([ "$SYSTEM" = 1 ] && echo system || echo venv), python $PYPATH (Python $PYVER)"

missing_modules() {  # the modules of "$@" that $PY cannot find (without importing them)
  "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
wheel_for() {  # wheel_for DIST: the one wheel of DIST in $WHEELS (none: empty)
  [ -n "$WHEELS" ] || return 0
  local name=${1//-/_}
  ls "$WHEELS"/"$name"-[0-9]*.whl "$WHEELS"/"${1}"-[0-9]*.whl 2>/dev/null | sort -u | head -1
}
dist_of() {
  case $1 in pytest_mpi) echo pytest-mpi ;; pytest_timeout) echo pytest-timeout ;; sklearn) echo scikit-learn ;;
    *) echo "$1" ;; esac
}
pip_install() {  # pip_install DIST...: from the carried wheels into $PREFIX, nothing else
  local cmd=("$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" --no-deps
             --ignore-installed --no-compile --no-cache-dir --prefix "$PREFIX" "$@")
  plan "install: ${cmd[*]}"
  [ "$DRY" = 1 ] || "${cmd[@]}" || die "pip could not install $* from $WHEELS"
}
export_prefix() {  # put what pip_install put under $PREFIX on PATH, LD_LIBRARY_PATH, PYTHONPATH
  local site bin lib
  site=$(find "$PREFIX" -maxdepth 5 -type d \( -name site-packages -o -name dist-packages \) 2>/dev/null | head -1)
  bin=$(dirname "$(find "$PREFIX" -maxdepth 4 -name mpirun 2>/dev/null | head -1)" 2>/dev/null)
  lib=$(dirname "$(find "$PREFIX" -maxdepth 4 -name 'libmpi.so.12' 2>/dev/null | head -1)" 2>/dev/null)
  if [ "$DRY" = 1 ]; then  # nothing installed yet: where pip's --prefix puts it
    site=$PREFIX/lib/python${PYVER%.*}/site-packages bin=$PREFIX/bin lib=$PREFIX/lib
  fi
  if [ -n "$bin" ] && [ "$bin" != . ]; then export PATH=$bin:$PATH; fi
  if [ -n "$lib" ] && [ "$lib" != . ]; then  # mpi4py >= 4 loads the MPI named here
    export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} MPI4PY_LIBMPI=$lib/libmpi.so.12
    plan "env: MPI4PY_LIBMPI=$MPI4PY_LIBMPI"
  fi
  export PYTHONPATH=$ROOT${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}
  plan "env: PATH=$PATH"
  plan "env: LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  plan "env: PYTHONPATH=$PYTHONPATH"
}

system_setup() {
  local need=() blocked=() m w
  plan "wheels: ${WHEELS:-(none)}$( [ -n "$WHEELS" ] && printf ' (%s)' "$(cd "$WHEELS" 2>/dev/null && ls -- *.whl 2>/dev/null | tr '\n' ' ' | sed 's/ $//')")"
  if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then RC=2 die "--wheels $WHEELS: no such folder"; fi
  if command -v mpirun >/dev/null; then
    plan "mpirun: $(command -v mpirun) (on PATH; the mpich wheel is not installed)"
  elif w=$(wheel_for mpich) && [ -n "$w" ]; then
    need+=(mpich)
  else
    blocked+=("mpirun (no MPI on PATH and no mpich wheel in ${WHEELS:-the wheel folder})")
  fi
  for m in $(missing_modules pytest_mpi pytest_timeout pytest mpi4py numpy h5py sklearn); do
    w=$(wheel_for "$(dist_of "$m")")
    if [ -n "$w" ]; then need+=("$(dist_of "$m")"); else blocked+=("$(dist_of "$m") (not installed, no wheel)"); fi
  done
  if [ "$(missing_modules cupy)" = cupy ]; then
    blocked+=("cupy (not importable by $PY; --system never installs CuPy: use the image's)")
  else
    plan "cupy: the image's ($("$PY" -c 'import importlib.metadata as m; print(", ".join(sorted(d.metadata["Name"] + " " + d.version for d in m.distributions() if d.metadata["Name"] and d.metadata["Name"].lower().startswith("cupy"))))' 2>/dev/null)); never installed here"
  fi
  if [ ${#blocked[@]} -gt 0 ]; then
    printf 'gpu-check: missing: %s\n' "${blocked[@]}" >&2
    RC=2 die "cannot run here; on a machine with a registry: make gpu-wheels (then carry .whl)"
  fi
  if [ ${#need[@]} -gt 0 ]; then
    pip_install "${need[@]}"
    export_prefix
  else
    plan "install: nothing (all present)"
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    plan "env: PYTHONPATH=$PYTHONPATH"
  fi
  local check='from mpi4py import MPI; MPI.Get_library_version()'
  case " ${need[*]:-} " in  # the carried MPICH went in: mpi4py must load it, not another MPI
    *" mpich "*) check='from mpi4py import MPI; v = MPI.Get_library_version(); assert "MPICH" in v, v' ;;
  esac
  if [ "$DRY" = 1 ]; then
    plan "mpi4py: checked after the install; when it cannot load the MPI library (or loads another than the carried MPICH), the carried mpi4py wheel goes in"
    return 0
  fi
  if ! "$PY" -c "$check" >/dev/null 2>&1; then
    w=$(wheel_for mpi4py)
    [ -n "$w" ] || die "mpi4py cannot load the MPI library and there is no mpi4py wheel in ${WHEELS:-(none)}: $("$PY" -c "$check" 2>&1 | tail -1)"
    plan "mpi4py: the installed one cannot load MPICH: the carried $(basename "$w") goes in"
    pip_install mpi4py
    local site
    site=$(dirname "$(find "$PREFIX" -maxdepth 6 -path '*-packages/mpi4py' -type d | head -1)")
    case ":$PYTHONPATH:" in *":$site:"*) ;; *) export PYTHONPATH=$ROOT:$site:$PYTHONPATH ;; esac
    "$PY" -c "$check" || die "the carried mpi4py cannot load MPICH either"
  fi
}

venv_setup() {  # the project's venv: CuPy for the driver when it has none, never a second one
  local installed driver pkg
  if [ "$(missing_modules cupy)" != cupy ]; then plan "cupy: present"; return 0; fi
  installed=$("$PY" -m pip list --disable-pip-version-check 2>/dev/null | awk 'tolower($1) ~ /^cupy/ {print $1}' | tr '\n' ' ')
  [ -z "$installed" ] || RC=2 die "$installed is installed but not importable: fix it by hand (a second CuPy would clash)"
  driver=$("$PY" -c 'from mpitrain import backend; print(backend.cuda_driver_version() or "")' 2>/dev/null)
  pkg=$("$PY" -c "from mpitrain import backend; print(backend.cupy_package(${driver:-None}) or '')" 2>/dev/null)
  [ -n "$pkg" ] || RC=2 die "no CUDA >= 12 driver found (libcuda.so.1: cuDriverGetVersion): no GPU to check"
  if [ "$("$PY" -c 'import sys; print(sys.prefix)')" != "$ROOT/.venv" ]; then
    RC=2 die "CuPy is missing from $PYPATH; install it yourself: $PY -m pip install '$pkg' (or use make gpu-check)"
  fi
  plan "cupy: driver supports CUDA $((driver / 1000)).$((driver % 1000 / 10)): install $pkg"
  if [ "$DRY" != 1 ]; then
    "$PY" -m pip install -q --disable-pip-version-check "$pkg" || die "pip install $pkg failed"
  fi
}

if [ "$SYSTEM" = 1 ]; then system_setup; else venv_setup; fi

# ---------------------------------------------------------------- steps

TRAIN_SET=(--set train.share_gpu=true --set data.path="$WORK/data/digits" --set data.dataset=digits --set checkpoint.dir="$WORK/ckpt-digits")
STEPS=(
  "info ($NP ranks)|60|mpirun -n $NP $PY -m mpitrain info"
  "MPI GPU tests ($NP ranks)|$PER_RUN|mpirun -n $NP $PY -m mpi4py -m pytest --with-mpi -m 'mpi and gpu' -p no:cacheprovider --timeout=$PER_TEST --timeout-method=thread -q -rs tests/test_gpu.py"
  "serial GPU tests|$PER_RUN|$PY -m pytest -m 'gpu and not mpi' -p no:cacheprovider --timeout=$PER_TEST -q -rs -s tests/test_gpu.py tests/test_graphs.py"
  "training, digits, backend=cupy, $NP ranks sharing the GPU(s)|$PER_RUN|mpirun -n $NP $PY -m mpitrain train --set train.backend=cupy --set train.epochs=5 ${TRAIN_SET[*]} --metrics-out $WORK/train-cupy.json"
  "speed: jobs/synthetic.toml, backend=numpy, $NP ranks|$PER_RUN|mpirun -n $NP $PY -m mpitrain train jobs/synthetic.toml --set train.backend=numpy --set train.share_gpu=true --set train.epochs=1 --set data.path=$WORK/data/synthetic --set data.dataset=synthetic --metrics-out $WORK/synthetic-numpy.json"
  "speed: jobs/synthetic.toml, backend=cupy, $NP ranks|$PER_RUN|mpirun -n $NP $PY -m mpitrain train jobs/synthetic.toml --set train.backend=cupy --set train.share_gpu=true --set train.epochs=1 --set data.path=$WORK/data/synthetic --set data.dataset=synthetic --metrics-out $WORK/synthetic-cupy.json"
  "bench --backend cupy (ring, native; up to $MAX)|$PER_RUN|mpirun -n $NP $PY -m mpitrain bench --backend cupy --algorithms ring,native --max $MAX --json $WORK/bench-cupy.json --csv $WORK/bench-cupy.csv"
  "staged ring, 1 vs 2 streams (16MiB..$MAX)|$PER_RUN|mpirun -n $NP $PY benchmarks/gpu_streams.py --min 16MiB --max $MAX --json $WORK/streams-cupy.json"
)
RESERVE=20  # seconds kept for the summary
ONLY=${MPITRAIN_GPU_STEPS:-$(seq -s ' ' 1 ${#STEPS[@]})}
for i in $ONLY; do
  case $i in *[!0-9]*|'') die "MPITRAIN_GPU_STEPS='$ONLY': step numbers 1..${#STEPS[@]}, e.g. '6 7'" ;; esac
  [ "$i" -ge 1 ] && [ "$i" -le ${#STEPS[@]} ] || die "MPITRAIN_GPU_STEPS: no step $i (1..${#STEPS[@]})"
done

if [ "$DRY" = 1 ]; then
  plan "limits: $PER_TEST s per test, $PER_RUN s per step, $BUDGET s in all (a step that would overrun is skipped)"
  plan "results: log and JSON to $RESULTS ($RESULTS/gpu-check.log, $RESULTS/summary.txt, $RESULT_FILES); data and checkpoints in $WORK"
  i=0
  for s in "${STEPS[@]}"; do
    i=$((i + 1)); IFS='|' read -r name limit cmd <<<"$s"
    case " $ONLY " in *" $i "*) plan "step $i: $name (timeout $limit s): $cmd" ;; *) plan "step $i: $name: skipped (MPITRAIN_GPU_STEPS)" ;; esac
  done
  plan "then: $PY tests/gpu_summary.py $WORK"
  exit 0
fi


echo "=== MPI ==="
if ! timeout -k 5 60 mpirun -n "$NP" "$PY" -c 'import sys; from mpi4py import MPI; c = MPI.COMM_WORLD; v = c.allreduce(1); c.Get_rank() or print(f"MPI: {v} ranks, {MPI.Get_library_version().splitlines()[0]}"); sys.exit(v != int(sys.argv[1]))' "$NP"; then
  echo "gpu-check: FAILED: mpirun -n $NP did not start one MPI job of $NP ranks ($(command -v mpirun); mpi4py and mpirun from different MPIs?)" >&2
  exit 1
fi
echo "=== GPU ==="
if ! "$PY" - <<'EOF'
import sys
from mpitrain import backend
problem = backend.gpu_kernel_problem()
if problem:
    print(f"gpu-check: FAILED: no usable CUDA GPU here: {problem}", file=sys.stderr)
    sys.exit(1)
import cupy
names = [cupy.cuda.runtime.getDeviceProperties(i)["name"] for i in range(backend.gpu_count())]
names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
print(f"CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, driver "
      f"{backend.cuda_driver_version()}, {len(names)} GPU(s): {', '.join(names)}; a kernel and a matmul ran")
EOF
then
  echo "gpu-check: FAILED (no usable GPU: nothing was checked)" >&2
  exit 2
fi

fail=0
summary=()
collect() {  # copy the numbers (not data or checkpoints) to the folder that comes back
  local f
  [ "$RESULTS" -ef "$WORK" ] && return 0
  for f in $RESULT_FILES; do [ -f "$WORK/$f" ] && cp -f "$WORK/$f" "$RESULTS/"; done
  return 0
}
run_step() {  # run_step NAME LIMIT COMMAND: under timeout, inside what is left of the budget
  local name=$1 limit=$2 cmd=$3 left rc
  left=$((BUDGET - (SECONDS - T0) - RESERVE))
  [ "$limit" -le "$left" ] || limit=$left
  echo "=== $name ==="
  if [ "$limit" -lt 30 ]; then
    echo "(not run: ${BUDGET} s budget spent)"
    fail=1; summary+=("$name: NOT RUN (out of time)"); return
  fi
  echo "+ timeout $limit $cmd"
  local t=$SECONDS
  timeout -k 10 "$limit" bash -c "$cmd"
  rc=$?
  collect
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    fail=1; summary+=("$name: TIMED OUT after $limit s")
  elif [ $rc -ne 0 ]; then
    fail=1; summary+=("$name: FAILED (exit $rc, $((SECONDS - t)) s)")
  else
    summary+=("$name: ok ($((SECONDS - t)) s)")
  fi
}
i=0
for s in "${STEPS[@]}"; do
  i=$((i + 1))
  case " $ONLY " in *" $i "*) ;; *) continue ;; esac
  IFS='|' read -r name limit cmd <<<"$s"
  run_step "$name" "$limit" "$cmd"
done

echo "=== results (record them in docs/gpu.md) ==="
"$PY" tests/gpu_summary.py "$WORK" | tee "$RESULTS/summary.txt"
echo "=== summary ($((SECONDS - T0)) s) ==="
printf '%s\n' "${summary[@]}" | tee -a "$RESULTS/summary.txt"
if [ $fail -ne 0 ]; then echo "gpu-check: FAILED" >&2; else echo "gpu-check: ok"; fi
exit $fail
