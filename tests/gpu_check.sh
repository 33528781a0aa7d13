#!/usr/bin/env bash
# `make gpu-check`: everything that needs a CUDA GPU, on one machine (docs/gpu.md).
#
#   1. the GPU tests of tests/test_gpu.py: under mpirun on $NP ranks (-m "mpi and gpu") and
#      serially (-m "gpu and not mpi": model/optimizers on CuPy, a short training run on 2
#      ranks sharing one GPU, the GPU bench; the MPNN and graph-mlp on CuPy vs NumPy in
#      tests/test_graphs.py); MPITRAIN_REQUIRE_GPU=1 turns a skip into a failure;
#   2. a short training run, train.backend=cupy, $NP ranks sharing the GPU(s): test accuracy;
#   3. the speed check: jobs/synthetic.toml with backend=numpy and backend=cupy, samples/s;
#   4. the GPU bench: ring and native on device buffers up to $MAX, with the memcpy and the
#      device-to-host (d2h) ceiling rows; ring busbw / d2h at the largest size (goal >= 0.80).
#
# Exits non-zero (loudly) when there is no GPU, or when any test, run or bench fails. The speed
# numbers are printed, not enforced: record them in docs/gpu.md. Output files go to $OUT.
# Knobs: MPITRAIN_GPU_NP (2), MPITRAIN_GPU_OUT (runs/gpu-check), MPITRAIN_GPU_BENCH_MAX (256MiB),
# MPITRAIN_TEST_TIMEOUT (s per test, 600), MPITRAIN_RUN_TIMEOUT (s per step, 1800).
set -u -o pipefail
cd "$(dirname "$0")/.."
NP=${MPITRAIN_GPU_NP:-2}
OUT=${MPITRAIN_GPU_OUT:-runs/gpu-check}
MAX=${MPITRAIN_GPU_BENCH_MAX:-256MiB}
PER_TEST=${MPITRAIN_TEST_TIMEOUT:-600}
PER_RUN=${MPITRAIN_RUN_TIMEOUT:-1800}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
export MPITRAIN_REQUIRE_GPU=1

echo "=== GPU ==="
if ! python - <<'EOF'
import sys
from mpitrain import backend
if not backend.gpu_available():
    print(f"gpu-check: FAILED: no CUDA GPU here: {backend.gpu_unavailable_reason()}", file=sys.stderr)
    sys.exit(1)
import cupy
names = [cupy.cuda.runtime.getDeviceProperties(i)["name"] for i in range(backend.gpu_count())]
names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
print(f"CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
      f"{len(names)} GPU(s): {', '.join(names)}")
EOF
then
  echo "gpu-check: FAILED (no GPU: nothing was checked)" >&2
  exit 2
fi
mkdir -p "$OUT" || exit 1

fail=0
summary=()
step() {  # step NAME COMMAND...: run it, remember how it went
  local name=$1; shift
  echo "=== $name ==="
  "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then fail=1; summary+=("$name: FAILED (exit $rc)"); else summary+=("$name: ok"); fi
  return $rc
}
metric() {  # metric FILE.json KEY
  python -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2" 2>/dev/null || echo "?"
}

step "info ($NP ranks)" timeout -k 10 120 mpirun -n "$NP" python -m mpitrain info

step "MPI GPU tests ($NP ranks)" timeout -k 10 "$PER_RUN" mpirun -n "$NP" python -m mpi4py -m pytest --with-mpi \
    -m "mpi and gpu" -p no:cacheprovider --timeout="$PER_TEST" --timeout-method=thread -q -rs tests/test_gpu.py

step "serial GPU tests" timeout -k 10 "$PER_RUN" python -m pytest -m "gpu and not mpi" -p no:cacheprovider \
    --timeout="$PER_TEST" -q -rs -s tests/test_gpu.py tests/test_graphs.py

step "training, backend=cupy, $NP ranks sharing the GPU(s)" timeout -k 10 "$PER_RUN" mpirun -n "$NP" \
    python -m mpitrain train --set train.backend=cupy --set train.share_gpu=true --set train.epochs=5 \
    --set data.path="$OUT/data/digits" --set checkpoint.dir="$OUT/ckpt-digits" --metrics-out "$OUT/train-cupy.json" \
  && echo "test accuracy (digits, 5 epochs, cupy, $NP ranks): $(metric "$OUT/train-cupy.json" test_accuracy)"

for be in numpy cupy; do
  step "speed: jobs/synthetic.toml, backend=$be, $NP ranks" timeout -k 10 "$PER_RUN" mpirun -n "$NP" \
      python -m mpitrain train jobs/synthetic.toml --set train.backend=$be --set train.share_gpu=true \
      --set train.epochs=1 --set data.path="$OUT/data/synthetic" --metrics-out "$OUT/synthetic-$be.json"
done

step "bench --backend cupy (ring, native; up to $MAX)" timeout -k 10 "$PER_RUN" mpirun -n "$NP" \
    python -m mpitrain bench --backend cupy --algorithms ring,native --max "$MAX" \
    --json "$OUT/bench-cupy.json" --csv "$OUT/bench-cupy.csv"

echo "=== results (record them in docs/gpu.md) ==="
python - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
t = load("train-cupy.json")
if t:
    print(f"training (digits, cupy): test accuracy {t['test_accuracy']:.4f}, {t['samples_per_s']:,.0f} samples/s, "
          f"comm {100 * t['comm_fraction']:.0f}%")
a, b = load("synthetic-numpy.json"), load("synthetic-cupy.json")
if a and b:
    print(f"synthetic job samples/s: numpy {a['samples_per_s']:,.0f}, cupy {b['samples_per_s']:,.0f} "
          f"-> cupy/numpy {b['samples_per_s'] / max(a['samples_per_s'], 1e-9):.2f}x")
bench = load("bench-cupy.json")
if bench:
    rows = bench["rows"]
    print(bench["meta"].get("cuda_aware", ""))
    d2h = {r["size"]: r["busbw"] for r in rows if r["algorithm"] == "d2h"}
    for alg in ("ring", "native"):
        big = [r for r in rows if r["algorithm"] == alg and r["size"] in d2h and r["size"] >= 16 << 20]
        for r in big:
            ratio = r["busbw"] / d2h[r["size"]] if d2h[r["size"]] else float("nan")
            goal = "  (goal >= 0.80: " + ("met" if ratio >= 0.8 else "NOT met") + ")" if alg == "ring" else ""
            print(f"{alg:>6} {r['size'] / 2**20:6.0f} MiB: busbw {r['busbw']:7.2f} GB/s, d2h ceiling "
                  f"{d2h[r['size']]:7.2f} GB/s, ratio {ratio:.2f}{goal}")
EOF

echo "=== summary ==="
printf '%s\n' "${summary[@]}"
if [ $fail -ne 0 ]; then echo "gpu-check: FAILED" >&2; else echo "gpu-check: ok"; fi
exit $fail
