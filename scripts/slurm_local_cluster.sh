#!/usr/bin/env bash
# Bring up (or stop) a real one-node SLURM cluster on THIS machine (Debian/Ubuntu, as root).
#
# Usage:
#   bash scripts/slurm_local_cluster.sh               # install/configure/start + smoke test
#   bash scripts/slurm_local_cluster.sh --accounting  # same + slurmdbd/MariaDB so `sacct` works
#   bash scripts/slurm_local_cluster.sh --no-accounting  # switch accounting off again
#   bash scripts/slurm_local_cluster.sh --no-smoke    # skip the srun/sbatch smoke test
#   bash scripts/slurm_local_cluster.sh --status      # daemons + sinfo; exit 0 iff usable
#   bash scripts/slurm_local_cluster.sh --stop        # stop the daemons (state is kept)
# Idempotent: re-running on a healthy cluster only re-checks it (a few seconds); a changed
# configuration restarts the slurm daemons (running jobs survive).  --accounting is sticky
# (remembered through /etc/slurm/slurmdbd.conf) until --no-accounting.
#
# What you get:
#   * Debian's slurm-wlm + munge, daemons started directly (no systemd needed: containers).
#   * One node named `hostname -s`, CPUs from nproc, RealMemory = MemTotal - margin,
#     CR_CPU_Memory scheduling (each job gets its CPUs and --mem; DefMemPerCPU otherwise).
#   * Partitions: `debug` (Default=YES, preemptable, PreemptMode=REQUEUE, GraceTime) and
#     `urgent` (higher PriorityTier: its jobs preempt and requeue `debug` jobs).  A preempted
#     job first receives its `--signal` (submitit: USR2) thanks to
#     SlurmctldParameters=preempt_send_user_signal, then SIGKILL after GraceTime.
#   * JobRequeue=1: batch jobs can be `scontrol requeue`d (submitit does so itself on USR2);
#     a requeued job restarts after cred_expire+1 seconds (30s here instead of Slurm's 120s).
#   * Without --accounting there is no slurmdbd: `sacct` fails, submitit relies on its result
#     pickles and logs "Bypassing sacct error" while it waits, and a job killed from outside
#     (scancel, OOM, time limit) leaves the launching process waiting forever.
#
# Environment knobs (all optional):
#   SLURM_LOCAL_PARTITION        default partition name            (default: debug)
#   SLURM_LOCAL_CPUS             CPUs advertised for the node      (default: nproc; may oversubscribe)
#   SLURM_LOCAL_MEM_MARGIN_MB    MB of RAM kept away from slurm    (default: max(1024, 5% of RAM))
#   SLURM_LOCAL_TIMEOUT_S        how long to wait for the node     (default: 120)
#   SLURM_LOCAL_GRACE_S          GraceTime of the preemptable partition (default: 60)
#   SLURM_LOCAL_REQUEUE_DELAY_S  cred_expire: how long a requeued job stays PENDING (reason
#                                BeginTime) before it may restart   (default: 30)
#   SLURM_LOCAL_GPUS             GPUs advertised as gres gpu        (default: count of /dev/nvidia[0-9]*)
set -euo pipefail

ACTION=start
SMOKE=1
ACCT_ARG=""
for arg in "$@"; do
    case "$arg" in
        --stop) ACTION=stop ;;
        --status) ACTION=status ;;
        --no-smoke) SMOKE=0 ;;
        --accounting) ACCT_ARG=1 ;;
        --no-accounting) ACCT_ARG=0 ;;
        -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

log() { printf '[slurm-local] %s\n' "$*"; }
die() { printf '[slurm-local] ERROR: %s\n' "$*" >&2; exit 1; }

CONF_DIR=/etc/slurm
SLURM_CONF=$CONF_DIR/slurm.conf
GRES_CONF=$CONF_DIR/gres.conf
DBD_CONF=$CONF_DIR/slurmdbd.conf
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
DBD_PID=/run/slurmdbd.pid
MUNGE_PID=/run/munge/munged.pid
LOG_DIR=/var/log/slurm
CTLD_LOG=$LOG_DIR/slurmctld.log
SLURMD_LOG=$LOG_DIR/slurmd.log
DBD_LOG=$LOG_DIR/slurmdbd.log
MUNGE_LOG=/var/log/munge/munged.log
CLUSTER=localcluster
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
TIMEOUT_S=${SLURM_LOCAL_TIMEOUT_S:-120}
GRACE_S=${SLURM_LOCAL_GRACE_S:-60}
REQUEUE_DELAY_S=${SLURM_LOCAL_REQUEUE_DELAY_S:-30}
NODE=$(hostname -s)

if [ -n "$ACCT_ARG" ]; then ACCOUNTING=$ACCT_ARG
elif [ -f "$DBD_CONF" ]; then ACCOUNTING=1
else ACCOUNTING=0; fi

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"

# ---------------------------------------------------------------- helpers
pid_alive() {  # pid_alive PIDFILE EXE_NAME -> 0 if the pid in PIDFILE is alive and is EXE_NAME
    local f=$1 name=$2 pid
    [ -s "$f" ] || return 1
    pid=$(cat "$f" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ]
}

stop_pidfile() {  # stop_pidfile PIDFILE EXE_NAME
    local f=$1 name=$2 pid
    if pid_alive "$f" "$name"; then
        pid=$(cat "$f")
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not exit after 10s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$f"
}

mariadb_up() { mysqladmin --silent ping >/dev/null 2>&1; }

dump_logs() {
    local f
    for f in "$MUNGE_LOG" "$DBD_LOG" "$CTLD_LOG" "$SLURMD_LOG"; do
        [ "$f" = "$DBD_LOG" ] && [ "$ACCOUNTING" = 0 ] && continue
        echo "----- tail -n 40 $f -----" >&2
        tail -n 40 "$f" >&2 2>/dev/null || echo "(missing)" >&2
    done
    echo "----- sinfo / scontrol show node -----" >&2
    sinfo -N -l >&2 2>&1 || true
    scontrol show node "$NODE" >&2 2>&1 || true
}

node_state() {  # long form: idle, mixed, allocated, down*, drained, idle*, ... ("" if unknown)
    sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1
}

node_usable() {  # up and healthy (no down/drain/not-responding flag), busy or not
    case "$(node_state)" in
        idle|mixed|allocated|completing) return 0 ;;
        *) return 1 ;;
    esac
}

elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- stop / status
if [ "$ACTION" = stop ]; then
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    stop_pidfile "$DBD_PID" slurmdbd
    if [ -f "$DBD_CONF" ] && [ -x /etc/init.d/mariadb ] && mariadb_up; then
        log "stopping mariadb"
        /etc/init.d/mariadb stop >/dev/null || true
    fi
    stop_pidfile "$MUNGE_PID" munged
    log "stopped (state kept under /var/spool/slurmctld and /var/spool/slurmd)"
    exit 0
fi

if [ "$ACTION" = status ]; then
    daemons="munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID"
    [ "$ACCOUNTING" = 1 ] && daemons="$daemons slurmdbd:$DBD_PID"
    for d in $daemons; do
        if pid_alive "${d#*:}" "${d%%:*}"; then log "${d%%:*}: running (pid $(cat "${d#*:}"))"
        else log "${d%%:*}: NOT running"; fi
    done
    if command -v sinfo >/dev/null && node_usable; then sinfo; exit 0; fi
    log "cluster not usable"
    exit 1
fi

T0=$EPOCHREALTIME

# ---------------------------------------------------------------- 1. packages
pkgs=(slurm-wlm munge)
[ "$ACCOUNTING" = 1 ] && pkgs+=(slurmdbd mariadb-server)
need_pkgs=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]} with apt-get"
    t=$EPOCHREALTIME
    apt_log=$(mktemp)
    # policy-rc.d / no systemd may refuse to start services from postinst: fine, we start
    # every daemon ourselves below.
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
                "${need_pkgs[@]}"; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        die "apt-get install ${need_pkgs[*]} failed"
    fi
    rm -f "$apt_log"
    log "installed ${need_pkgs[*]} in $(elapsed "$t")s"
else
    log "packages already installed: ${pkgs[*]} ($(dpkg-query -W -f='slurm ${Version}' slurm-wlm))"
fi

# ---------------------------------------------------------------- 2. munge
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

if pid_alive "$MUNGE_PID" munged; then
    log "munged already running (pid $(cat "$MUNGE_PID"))"
else
    log "starting munged"
    rm -f "$MUNGE_PID" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" \
        || { tail -n 20 "$MUNGE_LOG" >&2 || true; die "munged failed to start"; }
fi
for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
munge -n | unmunge >/dev/null 2>&1 || { tail -n 20 "$MUNGE_LOG" >&2 || true; die "munge round trip failed"; }

# ---------------------------------------------------------------- 3. accounting (optional)
restart_slurm=0
if [ "$ACCOUNTING" = 1 ]; then
    if mariadb_up; then
        log "mariadb already running"
    else
        log "starting mariadb"
        /etc/init.d/mariadb start >/dev/null || die "mariadb failed to start (see /var/log/mysql/)"
    fi
    # Reuse the password of an existing slurmdbd.conf so re-runs do not change anything.
    db_pass=$(sed -n 's/^StoragePass=//p' "$DBD_CONF" 2>/dev/null || true)
    [ -n "$db_pass" ] || db_pass=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
    mysql -u root <<EOF || die "could not create the slurm accounting database"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$db_pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$db_pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
    dbd_desired=$(mktemp)
    cat >"$dbd_desired" <<EOF
# Generated by diffrun scripts/slurm_local_cluster.sh -- edits are overwritten.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$db_pass
LogFile=$DBD_LOG
PidFile=$DBD_PID
DebugLevel=info
EOF
    if ! cmp -s "$dbd_desired" "$DBD_CONF"; then
        install -m 0600 -o root -g root "$dbd_desired" "$DBD_CONF"
        log "wrote $DBD_CONF"
        stop_pidfile "$DBD_PID" slurmdbd
    fi
    rm -f "$dbd_desired"
    mkdir -p "$LOG_DIR"
    if pid_alive "$DBD_PID" slurmdbd; then
        log "slurmdbd already running (pid $(cat "$DBD_PID"))"
    else
        log "starting slurmdbd"
        /usr/sbin/slurmdbd || { dump_logs; die "slurmdbd failed to start"; }
        # slurmdbd answers on 6819 once it has created/upgraded its tables.
        for _ in $(seq 1 150); do (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.2; done
        (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null || { dump_logs; die "slurmdbd not listening on 6819"; }
    fi
else
    if pid_alive "$DBD_PID" slurmdbd || [ -f "$DBD_CONF" ]; then
        log "accounting off: stopping slurmdbd, removing $DBD_CONF (the database is kept)"
        stop_pidfile "$DBD_PID" slurmdbd
        rm -f "$DBD_CONF"
    fi
fi

# ---------------------------------------------------------------- 4. slurm.conf for this machine
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
mem_total_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
margin=${SLURM_LOCAL_MEM_MARGIN_MB:-$(( mem_total_mb / 20 > 1024 ? mem_total_mb / 20 : 1024 ))}
REAL_MEM=$(( mem_total_mb - margin ))
[ "$REAL_MEM" -ge 256 ] || REAL_MEM=$(( mem_total_mb / 2 ))

# Use the detected topology when it agrees with the CPU count, else just CPUs=.
TOPO=""
if [ -z "${SLURM_LOCAL_CPUS:-}" ] && hw=$(slurmd -C 2>/dev/null | head -n1); then
    get() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
    b=$(get Boards); s=$(get SocketsPerBoard); c=$(get CoresPerSocket); t=$(get ThreadsPerCore)
    if [ -n "$b" ] && [ -n "$s" ] && [ -n "$c" ] && [ -n "$t" ] && [ $(( b * s * c * t )) -eq "$CPUS" ]; then
        TOPO="Boards=$b SocketsPerBoard=$s CoresPerSocket=$c ThreadsPerCore=$t"
    fi
fi

# GPUs: only when NVIDIA device files exist (a GPU workstation); CI machines have none.
GRES_LINE="" NODE_GRES=""
shopt -s nullglob
gpu_devs=(/dev/nvidia[0-9]*)
shopt -u nullglob
N_GPUS=${SLURM_LOCAL_GPUS:-${#gpu_devs[@]}}
if [ "$N_GPUS" -gt 0 ]; then
    GRES_LINE="GresTypes=gpu"
    NODE_GRES="Gres=gpu:$N_GPUS"
fi

if [ "$ACCOUNTING" = 1 ]; then
    ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
else
    ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi

mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
chmod 0755 /var/spool/slurmctld /var/spool/slurmd

desired=$(mktemp)
cat >"$desired" <<EOF
# Generated by diffrun scripts/slurm_local_cluster.sh for host $NODE -- edits are overwritten.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays the restart of a requeued job (BeginTime = requeue + cred_expire + 1).
AuthInfo=cred_expire=$REQUEUE_DELAY_S
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT_LINES
JobCompType=jobcomp/none
SwitchType=switch/none
$GRES_LINE

SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info

# Scheduling: per-CPU allocation with memory tracking so several 1-CPU jobs share the node.
# Short scheduler periods: a requeued job whose BeginTime passes starts within seconds
# instead of waiting for the next 30-60s pass (cheap on a one-node cluster).
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$(( REAL_MEM / CPUS ))
# Trust this file over what slurmd detects (allows SLURM_LOCAL_CPUS oversubscription).
SlurmdParameters=config_overrides

# Requeue + preemption: jobs in partition 'urgent' preempt (requeue) jobs in '$PARTITION';
# preempted jobs get their --signal (submitit: USR2) first, then GraceTime seconds.
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal

# Timers: recover fast, keep finished jobs visible in squeue/scontrol for 5 minutes.
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=15
MinJobAge=300
Waittime=0
MessageTimeout=20

NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS $TOPO RealMemory=$REAL_MEM $NODE_GRES State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_S
PartitionName=urgent Nodes=$NODE Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF

if ! cmp -s "$desired" "$SLURM_CONF"; then
    restart_slurm=1
    [ -f "$SLURM_CONF" ] && cp "$SLURM_CONF" "$SLURM_CONF.bak"
    install -m 0644 "$desired" "$SLURM_CONF"
    log "wrote $SLURM_CONF (node $NODE: CPUs=$CPUS RealMemory=${REAL_MEM}MB GPUs=$N_GPUS;" \
        "partitions $PARTITION (default), urgent; accounting=$([ "$ACCOUNTING" = 1 ] && echo slurmdbd || echo none))"
else
    log "$SLURM_CONF unchanged"
fi
rm -f "$desired"

if [ "$N_GPUS" -gt 0 ]; then
    gres_desired="# Generated by diffrun scripts/slurm_local_cluster.sh
AutoDetect=off
Name=gpu File=/dev/nvidia[0-$(( N_GPUS - 1 ))]"
    if [ "$(cat "$GRES_CONF" 2>/dev/null)" != "$gres_desired" ]; then
        printf '%s\n' "$gres_desired" >"$GRES_CONF"
        restart_slurm=1
        log "wrote $GRES_CONF ($N_GPUS GPUs)"
    fi
fi
# No cgroup.conf: proctrack/linuxproc + task/none + jobacct_gather/none load no cgroup plugin.

# ---------------------------------------------------------------- 5. slurm daemons
if [ "$restart_slurm" = 1 ] && { pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; }; then
    log "configuration changed: restarting slurmctld/slurmd (running jobs survive in the saved state)"
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
fi

if pid_alive "$CTLD_PID" slurmctld; then
    log "slurmctld already running (pid $(cat "$CTLD_PID"))"
else
    log "starting slurmctld"
    /usr/sbin/slurmctld || { dump_logs; die "slurmctld failed to start"; }
fi
for _ in $(seq 1 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q 'is UP' || { dump_logs; die "slurmctld does not answer 'scontrol ping'"; }

if pid_alive "$SLURMD_PID" slurmd; then
    log "slurmd already running (pid $(cat "$SLURMD_PID"))"
else
    log "starting slurmd"
    /usr/sbin/slurmd || { dump_logs; die "slurmd failed to start"; }
fi

if [ "$ACCOUNTING" = 1 ]; then
    # slurmctld registers the cluster itself on recent versions; make sure either way.
    if ! sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        log "registering cluster $CLUSTER with slurmdbd"
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || { dump_logs; die "sacctmgr add cluster failed"; }
    fi
fi

# ---------------------------------------------------------------- 6. wait for the node
deadline=$(( $(date +%s) + TIMEOUT_S ))
resumed=0
until node_usable; do
    st=$(node_state)
    # A node left down/drained by an earlier run ("Kill task failed", "Not responding", a
    # reboot): once its slurmd answers (no '*' suffix), put it back in service.
    if [ "$resumed" = 0 ] && [ -n "$st" ] && pid_alive "$SLURMD_PID" slurmd \
        && [[ "$st" == drain* || "$st" == down* ]] && [[ "$st" != *'*' ]]; then
        log "node $NODE is '$st', resuming it"
        scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
        resumed=1
    fi
    pid_alive "$SLURMD_PID" slurmd || { dump_logs; die "slurmd exited"; }
    pid_alive "$CTLD_PID" slurmctld || { dump_logs; die "slurmctld exited"; }
    if [ "$(date +%s)" -ge "$deadline" ]; then
        dump_logs
        die "node $NODE not usable after ${TIMEOUT_S}s (state: '${st:-unknown}')"
    fi
    sleep 1
done
log "node $NODE is $(node_state); cluster up"
sinfo

# ---------------------------------------------------------------- 7. smoke test
if [ "$SMOKE" = 1 ]; then
    if [ "$(node_state)" = allocated ]; then
        log "node fully allocated by running jobs: skipping the smoke test"
    else
        t=$EPOCHREALTIME
        out=$(timeout 120 srun -N1 -n1 -c1 --mem=100M -t 1 -J slurm-local-smoke hostname) \
            || { dump_logs; die "srun smoke test failed"; }
        [ "$out" = "$(hostname)" ] || [ "$out" = "$NODE" ] || die "srun printed '$out', expected $(hostname)"
        log "srun hostname -> $out ($(elapsed "$t")s)"
        smoke_out=$(mktemp /tmp/slurm-local-smoke.XXXXXX)
        t=$EPOCHREALTIME
        timeout 120 sbatch --wait -Q -J slurm-local-smoke -c1 --mem=100M -t 1 -o "$smoke_out" \
            --wrap 'echo "ok from job $SLURM_JOB_ID on $(hostname)"' \
            || { cat "$smoke_out" >&2 || true; dump_logs; die "sbatch --wait smoke test failed"; }
        grep -q '^ok from job' "$smoke_out" || { cat "$smoke_out" >&2; die "batch job output unexpected"; }
        log "sbatch --wait -> $(cat "$smoke_out") ($(elapsed "$t")s)"
        rm -f "$smoke_out"
        if [ "$ACCOUNTING" = 1 ]; then
            jid=$(timeout 60 sbatch --parsable --wait -J slurm-local-smoke -c1 --mem=100M -t 1 -o /dev/null --wrap true)
            for _ in $(seq 1 20); do
                sacct -n -X -P -j "$jid" -o State 2>/dev/null | grep -q COMPLETED && break
                sleep 0.5
            done
            sacct -n -X -P -j "$jid" -o State 2>/dev/null | grep -q COMPLETED \
                || { dump_logs; die "sacct does not report job $jid as COMPLETED"; }
            log "sacct reports job $jid COMPLETED"
        fi
    fi
fi
log "done in $(elapsed "$T0")s"
