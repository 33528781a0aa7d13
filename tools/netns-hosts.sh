#!/usr/bin/env bash
# Emulated hosts on one machine: K network namespaces joined by a bridge, so that an MPI job
# spans "hosts" whose ranks talk over TCP (through veth pairs, optionally slowed down) while
# ranks on the same host share memory, as on a real cluster.
#
#   root namespace                                 one namespace per host (hostname = its name)
#   +---------------------------------+            +------------------------------------------+
#   | mpiexec (hydra)                 |            | mpt-h1  eth0 10.77.0.1/24  proxy + ranks |
#   | bridge mptbr0  10.77.0.254/24 --+- mpt-v1 ===+= eth0   (egress: delay D, rate R)        |
#   |                               --+- mpt-v2 ===+= mpt-h2 eth0 10.77.0.2/24 ...            |
#   +---------------------------------+  (veth,    +------------------------------------------+
#                                         egress toward the host: rate R)
#
# mpiexec stays in the root namespace and starts one hydra_pmi_proxy per host through
# tools/netns-launch (an "ssh" that enters the namespace and sets the hostname); the proxies
# connect back to 10.77.0.254 (-localhost), the ranks to each other at 10.77.0.i.
#
#   tools/netns-hosts.sh start K [--delay 100us] [--rate 10gbit]   K = 2..4 hosts mpt-h1..mpt-hK
#   tools/netns-hosts.sh stop                 remove namespaces, veths, bridge, hosts files (idempotent)
#   tools/netns-hosts.sh status               hosts, addresses, shaping, bytes sent/received
#   tools/netns-hosts.sh env [--ppn P]        print MPIRUN="..." (eval it; then $MPIRUN -n N CMD)
#   tools/netns-hosts.sh mpirun N [--ppn P] [--] CMD...
#                                             run CMD on N ranks, P per host in blocks
#                                             (default ceil(N/K)); prints the mpirun line it runs
#   tools/netns-hosts.sh run K [--delay D] [--rate R] -- CMD...
#                                             start, run CMD (MPIRUN and NETNS_HOSTS exported),
#                                             stop, also on failure or Ctrl-C; exits with CMD's status
#
# Shaping: a host's eth0 delays what it sends by D and sends at most R; the root end of its
# veth limits what it receives to R. Host-to-host traffic is delayed once (one way D, round
# trip 2D) and every host has a full-duplex "NIC" of rate R. With tc's netem when the kernel
# has it; otherwise the rate with tbf (burst: 1 ms at R) and the delay in user space by
# tools/netns-delay.py (NFQUEUE; needs iptables; adds its wake-up time, ~20-100 us, to D).
#
# MPI transport: -genv MPIR_CVAR_CH4_NETMOD ofi FI_PROVIDER tcp FI_TCP_IFACE eth0 (see MPI_ENV).
# Name resolution: /etc/netns/mpt-hI/hosts (which `ip netns exec` mounts over /etc/hosts) lists
# all hosts; the root namespace's /etc/hosts is not touched (mpiexec needs no names: -localhost
# is an address and unresolvable hosts are handed to the launcher as they are).
#
# Knobs (environment):
#   MPITRAIN_NETNS_DIR      state directory (hosts file, settings, logs)    [/tmp/mpitrain-netns]
#   MPITRAIN_NETNS_SUBNET   first three octets of the hosts' /24            [10.77.0]
#   MPITRAIN_NETNS_PYTHON   python for the user-space delayer               [python3]
#   MPIRUN_BIN              the MPICH (hydra) mpirun to use                 [mpirun on PATH]
# Needs root, iproute2 (ip, tc) and util-linux (unshare). Nothing outside the names mpt-h*,
# mpt-v*, mptbr0, /etc/netns/mpt-h* and the state directory is created or changed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${MPITRAIN_NETNS_DIR:-/tmp/mpitrain-netns}
NET=${MPITRAIN_NETNS_SUBNET:-10.77.0}
PREFIX=mpt-h         # namespaces mpt-h1.., also the host names
VPREFIX=mpt-v        # root ends of the veth pairs
BRIDGE=mptbr0
GW=$NET.254
LAUNCH=$HERE/netns-launch
# The pip MPICH's default netmod, ch4:ucx, sees all "hosts" as one machine (same boot id and
# IPC namespace) and moves inter-host bytes through shared memory; forced onto TCP
# (UCX_TLS=tcp,self) it hangs now and then (test_collectives' in-flight-messages test, also
# on one host with MPIR_CVAR_NOLOCAL=1). libfabric's tcp provider crosses the veths, is faster
# and has not hung: use it. Within a host MPICH still uses shared memory (same host name).
MPI_ENV=(MPIR_CVAR_CH4_NETMOD ofi FI_PROVIDER tcp FI_TCP_IFACE eth0)

say() { echo "netns-hosts: $*" >&2; }
die() { echo "netns-hosts: error: $*" >&2; exit 1; }

usage() { sed -n '/^#   tools/,/^#$/p' "$0" | sed 's/^#//' >&2; exit 2; }

need_root() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, veth, bridge): run it with sudo"
  command -v ip >/dev/null || die "ip (iproute2) is missing: apt-get install iproute2"
  command -v unshare >/dev/null || die "unshare (util-linux) is missing: apt-get install util-linux"
}

hosts_up() { [ -s "$DIR/hosts" ]; }
nhosts() { wc -l <"$DIR/hosts"; }
host_names() { awk '{print $2}' "$DIR/hosts"; }

mpirun_bin() {
  if [ -n "${MPIRUN_BIN:-}" ]; then echo "$MPIRUN_BIN"
  elif command -v mpirun >/dev/null; then command -v mpirun
  elif [ -x "$HERE/../.venv/bin/mpirun" ]; then cd "$HERE/../.venv/bin" && echo "$PWD/mpirun"
  else die "no mpirun on PATH: activate the venv (. .venv/bin/activate) or set MPIRUN_BIN"
  fi
}

# The mpirun command (as words) that reaches the hosts; hosts "a,b,c" or "a:2,b:2,...".
mpirun_words() {
  local hostlist=$1 i
  WORDS=("$(mpirun_bin)" -launcher ssh -launcher-exec "$LAUNCH" -localhost "$GW" -hosts "$hostlist")
  for ((i = 0; i < ${#MPI_ENV[@]}; i += 2)); do WORDS+=(-genv "${MPI_ENV[i]}" "${MPI_ENV[i + 1]}"); done
}

parse_netem() {  # sets DELAY RATE REST from "[--delay D] [--rate R] ..."
  DELAY="" RATE="" REST=()
  while [ $# -gt 0 ]; do
    case $1 in
      --delay) DELAY=${2:?--delay needs a value like 100us}; shift 2 ;;
      --rate) RATE=${2:?--rate needs a value like 10gbit}; shift 2 ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  [ -z "$RATE" ] || rate_bits "$RATE" >/dev/null
  [[ -z $DELAY || $DELAY =~ ^[0-9.]+(us|usec|ms|msec|s|sec)$ ]] || die "--delay $DELAY: use e.g. 100us, 2ms"
}

cmd_start() {
  local k=${1:-}; shift || true
  parse_netem "$@"
  [ ${#REST[@]} = 0 ] || die "start: unknown argument '${REST[0]}' (usage: start K [--delay D] [--rate R])"
  [[ $k =~ ^[2-4]$ ]] || die "start: K must be 2, 3 or 4 hosts (got '$k')"
  need_root
  if hosts_up; then die "$(nhosts) emulated hosts are already up; run '$0 stop' first"; fi
  { [ -n "$DELAY$RATE" ] && ! command -v tc >/dev/null; } && die "tc (iproute2) is missing: needed for --delay/--rate"
  ip netns add "mpt-probe-$$" 2>/dev/null \
    || die "cannot create network namespaces here (ip netns add failed): not in a container that allows it?"
  ip netns del "mpt-probe-$$"
  if ip route show | grep -v "dev $BRIDGE" | grep -q "^$NET\."; then
    die "the subnet $NET.0/24 is already routed here: pick another with MPITRAIN_NETNS_SUBNET=10.x.y"
  fi
  stop_quietly                                    # leftovers of a crashed run
  mkdir -p "$DIR"
  [ -d /etc/netns ] || { mkdir /etc/netns; touch "$DIR/created-etc-netns"; }
  trap 'say "start did not finish; cleaning up"; stop_quietly' EXIT   # failure, Ctrl-C, kill
  ip link add "$BRIDGE" type bridge
  ip addr add "$GW/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local i ns v hosts=""
  for i in $(seq "$k"); do hosts+="$NET.$i $PREFIX$i"$'\n'; done
  for i in $(seq "$k"); do
    ns=$PREFIX$i v=$VPREFIX$i
    ip netns add "$ns"
    ip link add "$v" type veth peer name eth0 netns "$ns"
    ip link set "$v" master "$BRIDGE" up
    ip -n "$ns" addr add "$NET.$i/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    shape "$ns" "$v"
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n%s%s %s\n' "$hosts" "$GW" "mpt-root" >"/etc/netns/$ns/hosts"
  done
  printf '%s' "$hosts" >"$DIR/hosts"
  echo "delay=${DELAY:-none}${DELAY:+ ($DELAY_HOW)} rate=${RATE:-none}${RATE:+ ($RATE_HOW)}" >"$DIR/netem"
  trap - EXIT
  say "$k hosts up: $(host_names | tr '\n' ' ')(netem: $(cat "$DIR/netem"))"
}

rate_bits() {  # "10gbit" -> 10000000000 (tc's units: [kmgt]bit, [kmgt]bps = bytes/s)
  local n u
  [[ ${1,,} =~ ^([0-9]+)([kmgt]?)(bit|bps)$ ]] || die "--rate $1: use e.g. 10gbit, 100mbit, 1gbps"
  n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]}
  case $u in k) n=$((n * 1000)) ;; m) n=$((n * 1000000)) ;; g) n=$((n * 1000000000)) ;; t) n=$((n * 1000000000000)) ;; esac
  [ "${BASH_REMATCH[3]}" = bit ] || n=$((n * 8))
  echo "$n"
}

# Slow down host NS (veth root end V): netem where the kernel has it; else tbf for the rate
# and tools/netns-delay.py (a user-space NFQUEUE delayer, needs iptables) for the delay.
shape() {
  local ns=$1 v=$2 i
  DELAY_HOW=netem RATE_HOW=netem
  [ -n "$DELAY$RATE" ] || return 0
  if ip netns exec "$ns" tc qdisc add dev eth0 root netem ${DELAY:+delay "$DELAY"} ${RATE:+rate "$RATE"} 2>/dev/null; then
    [ -z "$RATE" ] || tc qdisc add dev "$v" root netem rate "$RATE"
    return 0
  fi
  if [ -n "$RATE" ]; then     # burst: 1 ms at the rate, at least one 64 KiB TSO segment
    local burst=$(( $(rate_bits "$RATE") / 8000 ))
    [ "$burst" -ge 65536 ] || burst=65536
    RATE_HOW="tbf, burst $burst B"
    ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$RATE" burst "$burst" latency 50ms
    tc qdisc add dev "$v" root tbf rate "$RATE" burst "$burst" latency 50ms
  fi
  [ -n "$DELAY" ] || return 0
  DELAY_HOW="no netem in this kernel: user-space delayer, expect D plus 20-100 us"
  command -v iptables >/dev/null \
    || die "this kernel has no netem (sch_netem), so --delay needs iptables for tools/netns-delay.py: apt-get install iptables"
  ip netns exec "$ns" "${MPITRAIN_NETNS_PYTHON:-python3}" "$HERE/netns-delay.py" "$DELAY" \
    </dev/null >"$DIR/delay-$ns.log" 2>&1 &
  ip netns exec "$ns" iptables -A OUTPUT -o eth0 -j NFQUEUE --queue-num 0 --queue-bypass
  for i in $(seq 20); do grep -q "^ready" "$DIR/delay-$ns.log" && return 0; sleep 0.1; done
  die "the delayer of $ns did not start: $(cat "$DIR/delay-$ns.log")"
}

stop_quietly() {
  local ns pid i
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+\$"); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
    for i in $(seq 20); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.1; done
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  for v in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${VPREFIX}[0-9]+\$"); do
    ip link del "$v" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  if [ -e "$DIR/created-etc-netns" ]; then rmdir /etc/netns 2>/dev/null || true; fi
  rm -rf "$DIR"
}

cmd_stop() {
  need_root
  local had
  had=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -cE "^${PREFIX}[0-9]+\$" || true)
  stop_quietly
  say "stopped ($had host(s) removed)"
}

cmd_status() {
  if ! hosts_up; then say "no emulated hosts are up"; return 1; fi
  say "$(nhosts) hosts, netem $(cat "$DIR/netem"), bridge $BRIDGE $GW/24, state $DIR"
  local ip ns
  while read -r ip ns; do
    printf '%-8s %-12s sent %s B, received %s B\n' "$ns" "$ip" \
      "$(cat "/sys/class/net/$VPREFIX${ns#"$PREFIX"}/statistics/rx_bytes" 2>/dev/null || echo '?')" \
      "$(cat "/sys/class/net/$VPREFIX${ns#"$PREFIX"}/statistics/tx_bytes" 2>/dev/null || echo '?')"
  done <"$DIR/hosts"
  mpirun_words "$(host_names | paste -sd,)"
  echo "MPIRUN=\"${WORDS[*]}\""
}

cmd_env() {
  hosts_up || die "no emulated hosts are up: run '$0 start K' first"
  local ppn=""
  [ "${1:-}" = --ppn ] && ppn=${2:?--ppn needs a number}
  mpirun_words "$(host_names | paste -sd,)"
  [ -z "$ppn" ] || WORDS+=(-ppn "$ppn")
  echo "MPIRUN=\"${WORDS[*]}\""
  if [ -n "$ppn" ]; then echo "# \$MPIRUN -n N CMD: ranks in blocks of $ppn per host"
  else echo "# \$MPIRUN -n N CMD: ranks round-robin over the hosts (env --ppn P, or add -ppn P: blocks of P)"; fi
}

cmd_mpirun() {
  hosts_up || die "no emulated hosts are up: run '$0 start K' first"
  local n=${1:-} ppn="" k
  shift || true
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "mpirun: N must be a number of ranks (usage: mpirun N [--ppn P] [--] CMD...)"
  if [ "${1:-}" = --ppn ]; then ppn=${2:?--ppn needs a number}; shift 2; fi
  [ "${1:-}" = -- ] && shift
  [ $# -gt 0 ] || die "mpirun: no command given"
  k=$(nhosts)
  [ -n "$ppn" ] || ppn=$(((n + k - 1) / k))
  mpirun_words "$(host_names | sed "s/\$/:$ppn/" | paste -sd,)"
  say "running: ${WORDS[*]} -n $n $*"
  exec "${WORDS[@]}" -n "$n" "$@"
}

cmd_run() {
  local k=${1:-}; shift || true
  local args=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do args+=("$1"); shift; done
  [ "${1:-}" = -- ] && shift
  [ $# -gt 0 ] || die "run: no command given (usage: run K [--delay D] [--rate R] -- CMD...)"
  need_root
  hosts_up && die "emulated hosts are already up; 'run' starts its own: '$0 stop' first, or use '$0 mpirun'"
  cmd_start "$k" "${args[@]}"
  trap 'stop_quietly; say "stopped"' EXIT
  NETNS_HOSTS=$(host_names | paste -sd,)
  mpirun_words "$NETNS_HOSTS"
  MPIRUN=${WORDS[*]}
  export MPIRUN NETNS_HOSTS
  say "MPIRUN=\"$MPIRUN\""
  local rc=0
  "$@" || rc=$?
  exit $rc
}

trap 'exit 130' INT     # so that the EXIT traps clean up after Ctrl-C and kill
trap 'exit 143' TERM
case "${1:-}" in
  start|stop|status|env|mpirun|run) c=$1; shift; "cmd_$c" "$@" ;;
  *) usage ;;
esac
