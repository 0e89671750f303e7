#!/usr/bin/env bash
# Test hosts on this machine: N network namespaces, each joined by a veth pair to one bridge
# on a private /24, each host's egress shaped with tc tbf (this kernel has no netem), its own
# host name (a UTS namespace per process started on it), and Open MPI run across them over
# TCP only. Needs root and iproute2.
#
#   scripts/testhosts.sh up N [RATE]      make hosts PREFIX-h1 .. PREFIX-hN (RATE default 1gbit)
#   scripts/testhosts.sh down             remove everything `up` made (idempotent)
#   scripts/testhosts.sh run N [RATE] -- CMD...   up, CMD on host 1, down (always, via trap)
#   scripts/testhosts.sh exec HOST CMD... run CMD on HOST (a name or a number) as that host
#   scripts/testhosts.sh mpirun-args      the mpirun flags for these hosts (hostfile, agent, TCP)
#   scripts/testhosts.sh rsh-agent HOST CMD   what mpirun calls instead of ssh
#   scripts/testhosts.sh cut HOST | restore HOST   take HOST's link down / up (bridge side)
#   scripts/testhosts.sh hosts            the hosts, one "name address" per line
#
# Several sets may exist at once: FB_HOSTS_PREFIX (default fbh; letters and digits, at most
# 8) names the namespaces PREFIX-hK, the bridge PREFIX-br and the veths PREFIX-vK;
# FB_HOSTS_SUBNET (default 10.213.0: the first three octets of a private /24) gives host K
# the address SUBNET.K. `up` refuses (exit 3) a prefix or subnet already in use, under a lock,
# so concurrent users pick another. State (hostfile, agent) lives in
# /run/falcon-batch-testhosts/PREFIX.
set -euo pipefail

PREFIX=${FB_HOSTS_PREFIX:-fbh}
SUBNET=${FB_HOSTS_SUBNET:-10.213.0}
ROOT=/run/falcon-batch-testhosts
STATE=$ROOT/$PREFIX
SELF=$(readlink -f "$0")
EXIT_IN_USE=3

die() { echo "testhosts: $*" >&2; exit 1; }

[[ $PREFIX =~ ^[a-z][a-z0-9]{0,7}$ ]] || die "FB_HOSTS_PREFIX='$PREFIX': expected a letter then at most 7 letters or digits"
[[ $SUBNET =~ ^(10\.[0-9]{1,3}|192\.168|172\.(1[6-9]|2[0-9]|3[01]))\.[0-9]{1,3}$ ]] \
    || die "FB_HOSTS_SUBNET='$SUBNET': expected the first three octets of a private /24 (10.x.y, 172.16-31.y, 192.168.y)"

ns_of() { # HOST (name PREFIX-hK or number K) -> namespace name
    case $1 in
        "$PREFIX"-h[0-9]*) echo "$1" ;;
        [0-9]*) echo "$PREFIX-h$1" ;;
        *) die "unknown host '$1': expected $PREFIX-hK or a number K" ;;
    esac
}
num_of() { local ns; ns=$(ns_of "$1"); echo "${ns#"$PREFIX"-h}"; }

need_root() {
    [[ $(id -u) == 0 ]] || die "needs root (network namespaces, veth, bridge, tc)"
    command -v ip >/dev/null || die "needs iproute2 (the ip command)"
}

our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-h[0-9]+$" || true; }

down() {
    need_root
    local ns
    for ns in $(our_namespaces); do
        # Processes left on a host (orted, ranks) would keep its namespace alive.
        local pids=()
        mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null || true)
        if [[ ${#pids[@]} -gt 0 ]]; then kill -9 "${pids[@]}" 2>/dev/null || true; fi
        ip netns del "$ns" 2>/dev/null || true
    done
    local link
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^$PREFIX-(v[0-9]+|br)$" || true); do
        ip link del "$link" 2>/dev/null || true
    done
    rm -rf "$STATE"
}

subnet_in_use() {
    local ns
    ip -o -4 addr show 2>/dev/null | grep -q " $SUBNET\.[0-9]*/" && return 0
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        ip -n "$ns" -o -4 addr show 2>/dev/null | grep -q " $SUBNET\.[0-9]*/" && return 0
    done
    return 1
}

up() {
    need_root
    local n=${1:-}; local rate=${2:-1gbit}
    [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 64 ]] || die "up N [RATE]: N must be 1..64, got '${n}'"
    mkdir -p "$ROOT"
    exec 9>"$ROOT/.lock"
    flock 9
    if [[ -n $(our_namespaces) ]] || ip link show "$PREFIX-br" >/dev/null 2>&1; then
        echo "testhosts: prefix '$PREFIX' is in use (run 'FB_HOSTS_PREFIX=$PREFIX $0 down' if it is stale)" >&2
        exit $EXIT_IN_USE
    fi
    if subnet_in_use; then
        echo "testhosts: subnet $SUBNET.0/24 is already in use here; choose another with FB_HOSTS_SUBNET" >&2
        exit $EXIT_IN_USE
    fi
    trap 'down; exit 1' ERR
    mkdir -p "$STATE"
    ip link add "$PREFIX-br" type bridge
    ip link set "$PREFIX-br" up
    : >"$STATE/hostfile"
    : >"$STATE/hosts"
    local i
    for i in $(seq 1 "$n"); do
        local ns=$PREFIX-h$i
        ip netns add "$ns"
        ip link add "$PREFIX-v$i" type veth peer name "$PREFIX-p$i"
        ip link set "$PREFIX-v$i" master "$PREFIX-br" up
        ip link set "$PREFIX-p$i" netns "$ns"
        ip -n "$ns" link set "$PREFIX-p$i" name eth0
        ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        # A cut link must fail the daemons' TCP connections in seconds, not after Linux's
        # default ~15 minutes of retransmissions (tcp_retries2=15): mpirun waits on the
        # daemon behind the cut, and that daemon on its lifeline. 5 retries: about 12 s.
        ip netns exec "$ns" sysctl -qw net.ipv4.tcp_retries2="${FB_HOSTS_TCP_RETRIES:-5}"
        # tbf needs a bucket of at least rate/HZ; 1 MB covers 1gbit at HZ=250.
        ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$rate" burst 1mb latency 100ms
        echo "$ns slots=16" >>"$STATE/hostfile"
        echo "$ns $SUBNET.$i" >>"$STATE/hosts"
    done
    # The agent mpirun calls: this script with this set's prefix and subnet baked in.
    printf '#!/bin/sh\nFB_HOSTS_PREFIX=%s FB_HOSTS_SUBNET=%s exec %s rsh-agent "$@"\n' "$PREFIX" "$SUBNET" "$SELF" >"$STATE/rsh-agent"
    chmod +x "$STATE/rsh-agent"
    # Wait until every host answers on its address (no ping on the image: a TCP connect
    # that is refused proves the host is there).
    for i in $(seq 1 "$n"); do
        local tries=0
        until reachable "$PREFIX-h1" "$SUBNET.$i"; do
            tries=$((tries + 1))
            [[ $tries -lt 50 ]] || { echo "testhosts: $PREFIX-h$i ($SUBNET.$i) did not come up" >&2; down; exit 1; }
            sleep 0.1
        done
    done
    trap - ERR
    echo "testhosts: $n hosts $PREFIX-h1..$PREFIX-h$n on $SUBNET.0/24, egress $rate each" >&2
}

# reachable FROM_NS ADDRESS: a TCP connect to a closed port from FROM_NS. "Connection
# refused" means the host answered; a timeout or "No route to host" means it is unreachable.
reachable() {
    local err
    err=$(ip netns exec "$1" timeout 3 bash -c "exec 3<>/dev/tcp/$2/9" 2>&1) && return 0
    [[ $err == *"refused"* ]]
}

# on_host NS CMD...: CMD in namespace NS and in a UTS namespace of its own, so that it and
# everything it starts see the host name NS.
on_host() {
    local ns=$1; shift
    # shellcheck disable=SC2016 # $0 and $@ are the inner shell's
    ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$ns" "$@"
}

host_exec() { # HOST CMD...: CMD on HOST
    need_root
    local ns; ns=$(ns_of "$1"); shift
    [[ $# -gt 0 ]] || die "exec HOST CMD...: no command"
    ip netns list | awk '{print $1}' | grep -qx "$ns" || die "host $ns does not exist (run '$0 up N' first)"
    on_host "$ns" "$@"
}

# What mpirun runs instead of `ssh [options] HOST COMMAND...`: like ssh, it fails, naming
# the host, when the host does not answer from where mpirun runs.
rsh_agent() {
    while [[ $# -gt 0 && $1 == -* ]]; do shift; done
    [[ $# -ge 2 ]] || die "rsh-agent HOST COMMAND...: got '$*'"
    local host=$1; shift
    local ns num; ns=$(ns_of "$host"); num=$(num_of "$host")
    local here; here=$(ip netns identify $$ 2>/dev/null || true)
    [[ -n $here ]] || here=$PREFIX-h1
    if ! reachable "$here" "$SUBNET.$num"; then
        echo "testhosts rsh-agent: connect to host $ns ($SUBNET.$num): no route to host" >&2
        exit 255
    fi
    on_host "$ns" sh -c "$*"
}

mpirun_args() {
    [[ -f $STATE/hostfile ]] || die "no hosts with prefix '$PREFIX' (run '$0 up N' first)"
    # TCP only, on the test subnet; daemons launched one by one through the agent; the
    # daemons' own links probed every few seconds so a cut one is noticed. No binding: Open
    # MPI binds each rank to one core when -np <= 2, and every test host reports the same
    # cores, so one rank per host would put all ranks (and all their threads) on CPU 0.
    echo "--bind-to none --hostfile $STATE/hostfile --mca plm_rsh_agent $STATE/rsh-agent --mca plm_rsh_no_tree_spawn 1" \
        "--mca btl tcp,self --mca btl_tcp_if_include $SUBNET.0/24 --mca oob_tcp_if_include $SUBNET.0/24" \
        "--mca oob_tcp_keepalive_time 4 --mca oob_tcp_keepalive_intvl 2 --mca oob_tcp_keepalive_probes 3"
}

link() { # cut|restore HOST
    need_root
    local num; num=$(num_of "$2")
    ip link set "$PREFIX-v$num" "$1"
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case $cmd in
    up) up "$@" ;;
    down) down ;;
    run)
        n=${1:-}; shift || true
        rate=1gbit
        if [[ ${1:-} != "--" && $# -gt 0 ]]; then rate=$1; shift; fi
        [[ ${1:-} == "--" ]] && shift
        [[ $# -gt 0 ]] || die "run N [RATE] -- CMD...: no command"
        up "$n" "$rate"
        trap down EXIT INT TERM
        rc=0
        on_host "$PREFIX-h1" "$@" || rc=$?
        exit $rc
        ;;
    exec) host_exec "$@" ;;
    rsh-agent) rsh_agent "$@" ;;
    mpirun-args) mpirun_args ;;
    hosts) cat "$STATE/hosts" 2>/dev/null || die "no hosts with prefix '$PREFIX'" ;;
    cut) link down "${1:?cut HOST}" ;;
    restore) link up "${1:?restore HOST}" ;;
    *) sed -n '2,21p' "$SELF" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
