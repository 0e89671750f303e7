#!/usr/bin/env bash
# A real Slurm cluster on this machine, from Debian's packages, for the Slurm tests: munged
# and slurmctld in the root network namespace, one slurmd per test host (scripts/testhosts.sh),
# each slurmd with a private /tmp (its node-local disk), a generated slurm.conf. Needs root.
#
#   scripts/slurm-cluster.sh up N [RATE]   hosts PREFIX-h1..N, nodes node1..N, partition `test`
#   scripts/slurm-cluster.sh down          stop what `up` started, remove the hosts (idempotent)
#   scripts/slurm-cluster.sh conf          the slurm.conf path (export SLURM_CONF=...)
#   scripts/slurm-cluster.sh tmp K         node K's local disk (what the node sees as /tmp)
#
# FB_HOSTS_PREFIX (default fbs) and FB_HOSTS_SUBNET (default 10.215.0) pick the hosts as in
# testhosts.sh; the controller listens on SUBNET.254 on their bridge. Everything Slurm
# writes lives under /srv/falcon-batch-slurm/PREFIX (not /tmp: slurmd's /tmp is private).
# Packages: scripts/setup-deps.sh --slurm.
set -euo pipefail

export FB_HOSTS_PREFIX=${FB_HOSTS_PREFIX:-fbs}
export FB_HOSTS_SUBNET=${FB_HOSTS_SUBNET:-10.215.0}
PREFIX=$FB_HOSTS_PREFIX
SUBNET=$FB_HOSTS_SUBNET
HERE=$(dirname "$(readlink -f "$0")")
HOSTS="$HERE/testhosts.sh"
STATE=/srv/falcon-batch-slurm/$PREFIX
CONF=$STATE/slurm.conf

die() { echo "slurm-cluster: $*" >&2; exit 1; }

write_conf() { # N
    local n=$1 ctl; ctl=$(hostname -s)
    mkdir -p "$STATE"/{state,log,spool}
    cat >"$CONF" <<EOF
ClusterName=falconbatch$PREFIX
SlurmctldHost=$ctl($SUBNET.254)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Preemption in the tests: SIGTERM, then SIGKILL after KillWait seconds.
KillWait=20
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
EOF
    local k
    for k in $(seq 1 "$n"); do
        echo "NodeName=node$k NodeAddr=$SUBNET.$k NodeHostname=$PREFIX-h$k CPUs=2 State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=test Nodes=node[1-$n] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >>"$CONF"
}

up() {
    local n=${1:?up N [RATE]} rate=${2:-1gbit}
    [[ $(id -u) == 0 ]] || die "needs root"
    for cmd in slurmctld slurmd munged sbatch; do
        command -v "$cmd" >/dev/null || die "$cmd not found: run scripts/setup-deps.sh --slurm"
    done
    "$HOSTS" up "$n" "$rate"
    trap 'down; exit 1' ERR
    # The controller's address on the hosts' bridge, so slurmd can reach slurmctld.
    ip addr add "$SUBNET.254/24" dev "$PREFIX-br"
    write_conf "$n"
    if ! munge -n </dev/null >/dev/null 2>&1; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        runuser -u munge -- munged
        # `down` stops it again: a munged left to die with the test leaves its socket behind,
        # and PMIx then retries that socket for 2.25 s in every later Open MPI start.
        touch "$STATE/munged-ours"
    fi
    slurmctld -f "$CONF" -i
    local k
    for k in $(seq 1 "$n"); do
        mkdir -p "$STATE/node$k/tmp"
        chmod 1777 "$STATE/node$k/tmp"
        # `ip netns exec` remounts /sys, and slurmd needs the real /sys/fs/cgroup: enter only
        # the network namespace, with a private mount namespace for the node's own /tmp.
        nsenter --net="/var/run/netns/$PREFIX-h$k" unshare -m --propagation private \
            sh -c 'mount --bind "$0" /tmp && exec slurmd -f "$1" -N "$2"' \
            "$STATE/node$k/tmp" "$CONF" "node$k"
    done
    local tries=0
    until [[ $(sinfo -h -o '%t' -p test 2>/dev/null | sort -u) == idle ]]; do
        tries=$((tries + 1))
        if [[ $tries -gt 100 ]]; then
            sinfo -N 2>&1 || true
            tail -5 "$STATE"/log/*.log >&2 || true
            die "nodes did not become idle within 20 s"
        fi
        sleep 0.2
    done
    trap - ERR
    echo "slurm-cluster: $n nodes idle; export SLURM_CONF=$CONF" >&2
}

down() {
    [[ $(id -u) == 0 ]] || die "needs root"
    if [[ -f $CONF ]]; then
        scancel --quiet -f "$CONF" --full 2>/dev/null || SLURM_CONF=$CONF scancel --quiet --user root 2>/dev/null || true
    fi
    local pidfile
    for pidfile in "$STATE"/slurmd.*.pid "$STATE"/slurmctld.pid; do
        [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 0.5
    for pidfile in "$STATE"/slurmd.*.pid "$STATE"/slurmctld.pid; do
        [[ -f $pidfile ]] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
    if [[ -f $STATE/munged-ours && -f /run/munge/munged.pid ]]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    fi
    "$HOSTS" down
    rm -rf "$STATE"
}

export SLURM_CONF=$CONF
cmd=${1:-}
[[ $# -gt 0 ]] && shift
case $cmd in
    up) up "$@" ;;
    down) down ;;
    conf) echo "$CONF" ;;
    tmp) echo "$STATE/node${1:?tmp K}/tmp" ;;
    *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
