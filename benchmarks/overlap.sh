#!/usr/bin/env bash
# Gradient buckets overlapped with backprop vs one all-reduce after it (docs/benchmarks.md).
# Run from anywhere; uses the repo venv. Prints samples/s and per-step ms (wall, exposed comm, compute).
cd "$(dirname "$0")/.."
S="--set data.path=data/bench/synthetic-16k --set data.dataset=synthetic --set data.rows=16384 --set train.epochs=1 --set checkpoint.every=0 --set comm.algorithm=ring"
for rep in 1 2; do
for n in 2 4; do
  for cfg in "none:--set comm.bucket_bytes=0" "progress:--set comm.bucket_bytes=4194304 --set comm.overlap=progress" "thread:--set comm.bucket_bytes=4194304 --set comm.overlap=thread"; do
    name=${cfg%%:*}; args=${cfg#*:}
    OMP_NUM_THREADS=1 timeout 300 .venv/bin/mpirun -n $n .venv/bin/python -m mpitrain train jobs/synthetic.toml $S $args --metrics-out runs/ov-$n-$name-$rep.json > /dev/null 2>&1
    python3 -c "
import json; m=json.load(open('runs/ov-$n-$name-$rep.json')); t=m['timers_s']; st=m['steps']
print('$rep', $n, '$name', round(m['samples_per_s']), 'step_ms', round(1000*m['wall_s']/st,2), 'comm_ms/step', round(1000*t.get('comm',0)/st,2), 'compute_ms/step', round(1000*t.get('compute',0)/st,2))"
  done
done
done
