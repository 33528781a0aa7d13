#!/usr/bin/env bash
# Issue 17 and 15 measurements in one go, on a quiet box (docs/benchmarks.md "Issue 17 on a quiet
# box", docs/llm.md). Outputs: runs/q-* and docs/shm-n*.png. BEFORE=DIR: a checkout of the commit
# to compare training steps with (git worktree add /tmp/before 22496bd); TORCH_PYTHON: a python
# with torch and this package installed (the DDP rows; they skip without torch).
cd "$(dirname "$0")/.."
source .venv/bin/activate    # make install first
mkdir -p runs
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
set -x
uptime
"${TORCH_PYTHON:-python}" benchmarks/ddp_gpt.py --ranks 1,2,4 --steps 60 --repeats 3 --markdown runs/q-ddp.md > runs/q-ddp.txt 2>&1
"${TORCH_PYTHON:-python}" benchmarks/ddp_gpt.py --ranks 2 --steps 60 --repeats 3 --set comm.bucket_bytes=1048576 --markdown runs/q-ddp-b.md > runs/q-ddp-b.txt 2>&1
uptime
for n in 2 3 4; do
  mpirun -n $n python -m mpitrain bench --algorithms shm,ring,native --min 1KiB --max 256MiB --step 4 --json runs/q-bench-n$n.json --plot docs/shm-n$n.png > runs/q-bench-n$n.txt 2>&1
done
uptime
mpirun -n 2 python benchmarks/plan_latency.py --rounds 21 --json runs/q-plan.json > runs/q-plan.txt 2>&1
mpirun -n 2 python benchmarks/ring_wire.py --rounds 21 --budget 0.01 --max 64MiB --json runs/q-wire-n2.json > runs/q-wire-n2.txt 2>&1
mpirun -n 3 python benchmarks/ring_wire.py --rounds 11 --budget 0.02 --max 64MiB --json runs/q-wire-n3.json > runs/q-wire-n3.txt 2>&1
uptime
python benchmarks/train_steps.py --repeats 2 --markdown runs/q-steps-after.md > runs/q-steps-after.txt 2>&1
python benchmarks/train_steps.py --repeats 2 --code "${BEFORE:-/tmp/before}" --variants "ring,ring + buckets,native,native + buckets" --markdown runs/q-steps-before.md > runs/q-steps-before.txt 2>&1
bash benchmarks/plan_steps.sh 22496bd > runs/q-plan-steps.txt 2>&1
mpirun -n 2 python benchmarks/shm_floor.py > runs/q-shm-floor-n2.txt 2>&1
python benchmarks/gpt_profile.py --steps 20 > runs/q-profile.txt 2>&1
mpirun -n 2 python -m mpitrain bench --fit --max 64MiB --step 2 > runs/q-fit.txt 2>&1
uptime
echo ALL DONE
