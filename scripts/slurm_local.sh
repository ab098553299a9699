#!/usr/bin/env bash
# A two-node SLURM cluster on localhost, for tests and CI (needs root and Debian's slurmctld,
# slurmd, slurm-client and munge): nodes n1 and n2 are two slurmd on this host, each with the
# host's CPUs, so multi-node jobs (sbatch --nodes=2) run for real.
#   bash scripts/slurm_local.sh install   # apt-get the packages
#   bash scripts/slurm_local.sh start DIR # munge key, slurm.conf, state and logs under DIR; adds n1
#                                         # and n2 to /etc/hosts if missing; prints "up"
#   bash scripts/slurm_local.sh stop DIR  # stop the daemons started there (by their recorded pids)
# Tests find the cluster through SLURM_CONF=DIR/slurm.conf.
set -euo pipefail
cmd=${1:?install|start|stop}
dir=${2:-/tmp/hpa-slurm}

case "$cmd" in
install)
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
    ;;
start)
    mkdir -p "$dir"/{state,spool/n1,spool/n2,munge,log}
    # slurmctld and srun reach the nodes, and jobs their first node, by name
    for node in n1 n2; do
        getent hosts "$node" >/dev/null || echo "127.0.0.1 $node" >> /etc/hosts
    done
    chmod 700 "$dir/munge"
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --force --key-file "$dir/munge/munge.key" --socket "$dir/munge/munge.socket" \
        --pid-file "$dir/munge/munged.pid" --log-file "$dir/log/munged.log" --seed-file "$dir/munge/seed"
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
    proctrack=proctrack/cgroup
    # cgroup tracking needs a writable cgroup tree; containers often lack one
    [ -w /sys/fs/cgroup ] && [ -f /sys/fs/cgroup/cgroup.controllers ] || proctrack=proctrack/linuxproc
    cat > "$dir/slurm.conf" <<CONF
ClusterName=hpa-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# cred_expire: a requeued job may not start again on a node until its revoked credential expires
# (default 120 s; "Job credential revoked" if it is pushed earlier). Short here, for tests.
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
ProctrackType=$proctrack
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
SlurmctldPort=6917
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
MinJobAge=600
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=6918 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=6919 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    [ "$proctrack" = proctrack/cgroup ] && printf 'CgroupPlugin=autodetect\n' > "$dir/cgroup.conf"
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$dir/slurm.conf"
    slurmd -f "$dir/slurm.conf" -N n1
    slurmd -f "$dir/slurm.conf" -N n2
    for _ in $(seq 1 100); do
        if [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" -eq 2 ]; then echo up; exit 0; fi
        sleep 0.2
    done
    echo "slurm did not come up; logs in $dir/log" >&2
    tail -n 20 "$dir"/log/*.log >&2 || true
    exit 1
    ;;
stop)
    for pid_file in "$dir/slurmd.n1.pid" "$dir/slurmd.n2.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [ -f "$pid_file" ] && kill "$(cat "$pid_file")" 2>/dev/null || true
    done
    ;;
*) echo "usage: slurm_local.sh install|start|stop [DIR]" >&2; exit 2 ;;
esac
