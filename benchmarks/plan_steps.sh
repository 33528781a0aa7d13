#!/usr/bin/env bash
# Whole training jobs before/after a change (default: the branch `main` vs the working tree), interleaved,
# 2 ranks, one all-reduce vs buckets of 256 KiB, on the synthetic job (8 Ki rows) and jobs/gpt-tiny.toml.
#   bash benchmarks/plan_steps.sh [BASE_REF]      (docs/benchmarks.md "Training on plans")
# "before" runs BASE_REF's mpitrain package (git archive into a temporary directory, on PYTHONPATH;
# PYTHONSAFEPATH=1, or `python -m` would put the working tree first on sys.path and run it instead).
# The in-process A/B (plans vs per-step calls, alternating steps): benchmarks/plan_steps.py.
cd "$(dirname "$0")/.."
BASE=${1:-main}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
git archive "$BASE" mpitrain | tar -x -C "$T"
SYN="jobs/synthetic.toml --set data.path=data/bench/synthetic-8k --set data.dataset=synthetic --set data.rows=8192 --set train.epochs=1"
GPT="jobs/gpt-tiny.toml --set train.eval_every=0"
for rep in 1 2; do
for job in syn gpt; do
for b in 0 262144; do
for who in before after; do
  pp=""; [ "$who" = before ] && pp=$T
  J=$SYN; [ "$job" = gpt ] && J=$GPT
  out=$T/$job-$b-$who-$rep.json
  PYTHONSAFEPATH=1 PYTHONPATH=$pp OMP_NUM_THREADS=1 timeout 300 .venv/bin/mpirun -n 2 .venv/bin/python -m mpitrain train $J \
    --set checkpoint.every=0 --set checkpoint.dir="$T/ck" --set comm.bucket_bytes=$b --metrics-out "$out" \
    > "$T/log" 2>&1 || { echo "FAILED: $job $b $who"; tail -3 "$T/log"; continue; }
  .venv/bin/python -c "
import json; m=json.load(open('$out')); t=m['timers_s']; st=m['steps']
print('$rep $job bucket_bytes=$b $who', 'step_ms', round(1000*m['wall_s']/st,2), 'exposed_comm_ms',
      round(1000*t.get('comm',0)/st,2), 'test_loss', round(m['test_loss'],5), m['strategy'])"
done; done; done; done
