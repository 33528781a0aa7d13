#!/usr/bin/env bash
# Step time zero=0 vs zero=1, interleaved pairs, REPS repetitions (docs/zero.md).
#   benchmarks/zero_steps.sh OUTDIR [REPS] [RANKS...]
# JOBS="syn gpt" (default) picks the jobs; SYN_EPOCHS (2), GPT_STEPS (40) their length.
# Writes OUTDIR/{syn,gpt}-n{N}-z{Z}-r{K}.json (--metrics-out) and prints nothing else of its own;
# summarize with benchmarks/zero_summary.py OUTDIR.
set -euo pipefail
out=${1:?OUTDIR}; reps=${2:-3}; shift 2 || true
ranks=("${@:-2 4}"); [ $# -eq 0 ] && ranks=(2 4)
mkdir -p "$out"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
SYN=(jobs/synthetic.toml --set train.optimizer='"adam"' --set train.lr=0.001 --set train.epochs=${SYN_EPOCHS:-2}
     --set checkpoint.every=0)
GPT=(jobs/gpt-tiny.toml --set train.max_steps=${GPT_STEPS:-40} --set train.eval_every=0
     --set checkpoint.every_steps=0)
run() {  # job n z rep args...
  local job=$1 n=$2 z=$3 k=$4; shift 4
  mpirun -n "$n" python -m mpitrain train "$@" --set train.zero="$z" \
    --metrics-out "$out/$job-n$n-z$z-r$k.json" > "$out/$job-n$n-z$z-r$k.log" 2>&1
}
for n in "${ranks[@]}"; do
  for k in $(seq 1 "$reps"); do
    # alternate which of the pair goes first, so a drift in load hits both alike
    if (( k % 2 )); then zs="0 1"; else zs="1 0"; fi
    for job in ${JOBS:-syn gpt}; do
      if [ "$job" = syn ]; then args=("${SYN[@]}"); else args=("${GPT[@]}"); fi
      for z in $zs; do run "$job" "$n" "$z" "$k" "${args[@]}"; done
    done
  done
done
