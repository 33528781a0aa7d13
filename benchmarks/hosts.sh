#!/usr/bin/env bash
# Measurements across emulated hosts (tools/netns-hosts.sh), for docs/scaling.md. Root; ~2 minutes.
#
#   bash benchmarks/hosts.sh [OUT]          # default OUT = runs/hosts
#
# Per network condition (plain | --rate 10gbit | --delay 100us --rate 10gbit), with the hosts up:
#   1. bench --fit on 2 hosts x 1 rank: the inter-host link (ping-pong and exchange tables) -> OUT/cost-<c>.json
#   2. bench ring/tree/native on 2 hosts x 1 rank and 3 hosts x 1 rank      -> OUT/bench-2x1-<c>.json, bench-3x1-<c>.json
#   3. bench ring/tree/hier/native on 2 hosts x 2 ranks                     -> OUT/bench-2x2-<c>.json
# then validates the model against every file:
#   python -m mpitrain bench --model --link inter=OUT/cost-<c>.json --validate ... -> OUT/validate-<c>.txt
# 3 hosts x 1 and 2 hosts x 2 put 3-4 busy-polling ranks on this 2-core machine: oversubscribed.
# The hosts are always stopped at the end, also on failure or Ctrl-C.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/hosts}
mkdir -p "$OUT"
export PATH=$PWD/.venv/bin:$PATH OMP_NUM_THREADS=1
H=tools/netns-hosts.sh
trap '$H stop >/dev/null 2>&1 || true' EXIT INT TERM
SWEEP="--min 8B --max 16MiB --step 4 --iters 5"
for cfg in "plain:" "10gbit:--rate 10gbit" "delay100us-10gbit:--delay 100us --rate 10gbit"; do
  c=${cfg%%:*} opts=${cfg#*:}
  {
    # shellcheck disable=SC2086
    $H start 3 $opts || { echo "could not start the hosts ($c): skipped"; $H stop; continue; }
    eval "$($H env --ppn 1)"
    echo "### $c: bench --fit, 2 hosts x 1 rank"
    $MPIRUN -genv MPITRAIN_COST_FILE "$PWD/$OUT/cost-$c.json" -n 2 python -m mpitrain bench --fit $SWEEP
    echo "### $c: bench, 2 hosts x 1 rank"
    $MPIRUN -n 2 python -m mpitrain bench --algorithms ring,tree,native $SWEEP --json "$OUT/bench-2x1-$c.json"
    echo "### $c: bench, 3 hosts x 1 rank (3 ranks on 2 cores)"
    $MPIRUN -n 3 python -m mpitrain bench --algorithms ring,tree,native $SWEEP --json "$OUT/bench-3x1-$c.json"
    eval "$($H env --ppn 2)"
    echo "### $c: bench, 2 hosts x 2 ranks (4 ranks on 2 cores)"
    $MPIRUN -n 4 -ppn 2 python -m mpitrain bench --algorithms ring,tree,hier,native $SWEEP \
        --json "$OUT/bench-2x2-$c.json"
    $H stop
  } 2>&1 | tee "$OUT/log-$c.txt"
  [ -f "$OUT/cost-$c.json" ] || continue
  python -m mpitrain bench --model --link "inter=$OUT/cost-$c.json" \
      --validate "$OUT/bench-2x1-$c.json,$OUT/bench-3x1-$c.json,$OUT/bench-2x2-$c.json" \
      --json "$OUT/validate-$c.json" 2>&1 | tee "$OUT/validate-$c.txt"
done
$H status
