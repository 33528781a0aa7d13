#!/usr/bin/env bash
# The all-reduce's halves, ring vs native (docs/zero.md): one bench run per collective and rank count,
# 1 KiB..64 MiB; the all-reduce (ring, native) on the same sizes for reference.
#   benchmarks/halves_bench.sh OUTDIR [RANKS...]      (default ranks: 2 4)
set -euo pipefail
out=${1:?OUTDIR}; shift
ranks=("$@"); [ ${#ranks[@]} -eq 0 ] && ranks=(2 4)
mkdir -p "$out"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
for n in "${ranks[@]}"; do
  for c in reduce_scatter allgather; do
    mpirun -n "$n" python -m mpitrain bench --collective "$c" --min 1KiB --max 64MiB \
      --json "$out/$c-n$n.json" --csv "$out/$c-n$n.csv" | tee "$out/$c-n$n.txt"
  done
  mpirun -n "$n" python -m mpitrain bench --algorithms ring,native --min 1KiB --max 64MiB \
    --json "$out/allreduce-n$n.json" | tee "$out/allreduce-n$n.txt"
done
