#!/usr/bin/env bash
# The whole test suite, as `make test` runs it. Every MPI run sits under an outer
# `timeout` and pytest-timeout's thread method, and under `python -m mpi4py`, which
# aborts all ranks when one rank's session ends in an error: a deadlock fails the
# run instead of hanging it.
set -u
cd "$(dirname "$0")/.."
RANKS=${MPITRAIN_TEST_RANKS:-"1 2 3 4"}
PER_TEST=${MPITRAIN_TEST_TIMEOUT:-120}     # seconds, per test
PER_RUN=${MPITRAIN_RUN_TIMEOUT:-600}       # seconds, per mpirun
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
export PYTHONDONTWRITEBYTECODE=1
fail=0
summary=()
for n in $RANKS; do
  echo "=== MPI tests on $n rank(s) ==="
  timeout -k 10 "$PER_RUN" mpirun -n "$n" python -m mpi4py -m pytest --with-mpi -m mpi \
      -p no:cacheprovider --timeout="$PER_TEST" --timeout-method=thread -q -rs tests
  rc=$?
  if [ $rc -ne 0 ]; then fail=1; summary+=("mpi n=$n: FAILED (exit $rc)"); else summary+=("mpi n=$n: ok"); fi
done
if [ "${MPITRAIN_SKIP_SLURM:-0}" != 1 ]; then
  echo "=== SLURM tests (a private local SLURM; apt-installs it when missing, skips when it cannot) ==="
  timeout -k 10 "${MPITRAIN_SLURM_TIMEOUT:-900}" python -m pytest -m slurm -p no:cacheprovider --timeout=600 \
      -q -rs tests/test_slurm.py
  rc=$?
  if [ $rc -ne 0 ]; then fail=1; summary+=("slurm: FAILED (exit $rc)"); else summary+=("slurm: ok"); fi
fi
if [ "${MPITRAIN_SKIP_HOSTS:-0}" != 1 ]; then
  echo "=== emulated hosts (network namespaces, MPI over TCP; skips without root) ==="
  # --delay needs iptables where the kernel has no netem (tools/netns-hosts.sh); best effort, like SLURM's
  if ! command -v iptables >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { timeout 300 apt-get update -q && timeout 300 apt-get install -y -q --no-install-recommends iptables; } \
        >/tmp/mpitrain-iptables-apt.log 2>&1 || echo "(could not install iptables: the delay test will skip)"
  fi
  timeout -k 10 "${MPITRAIN_HOSTS_TIMEOUT:-300}" python -m pytest -m hosts -p no:cacheprovider --timeout=180 \
      -q -rs tests/test_hosts.py
  rc=$?
  if [ $rc -ne 0 ]; then fail=1; summary+=("hosts: FAILED (exit $rc)"); else summary+=("hosts: ok"); fi
fi
echo "=== serial tests ==="
timeout -k 10 "$PER_RUN" python -m pytest -m "not mpi and not slurm and not hosts" -p no:cacheprovider --timeout="$PER_TEST" \
    -q -rs tests
rc=$?
if [ $rc -ne 0 ]; then fail=1; summary+=("serial: FAILED (exit $rc)"); else summary+=("serial: ok"); fi
printf '%s\n' "${summary[@]}"
exit $fail
