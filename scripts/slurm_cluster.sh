#!/usr/bin/env bash
# A real single-node SLURM cluster for tests and local trials:
#
#   scripts/slurm_cluster.sh start [DIR]    # prints: export SLURM_CONF=DIR/etc/slurm.conf
#   scripts/slurm_cluster.sh status [DIR]
#   scripts/slurm_cluster.sh stop [DIR]
#
# `start` installs the Debian packages when they are missing (slurmctld, slurmd,
# slurm-client, munge, slurmdbd, mariadb-server, eatmydata), then starts munged, a private MariaDB,
# slurmdbd (accounting, so sacct and submitit see job states), slurmctld and slurmd,
# and returns once a probe `srun true` has run. Everything they use (config, state,
# spool, logs, PID files, munge key and socket, database) lives under DIR (default
# /tmp/vggbench-slurm); the ports are chosen free at each start, so several clusters
# (say a developer's and the test suite's) can run side by side. `stop` ends exactly
# the daemons whose PID files are in DIR. Needs root (the daemons run as root, as on
# this project's dev and CI machines). Only the `export` line goes to stdout, so
#   eval "$(scripts/slurm_cluster.sh start)"
# points the current shell's SLURM clients at the cluster. SLURM_CLUSTER_TIMEOUT
# (default 60) bounds each start-up step, in seconds.
set -euo pipefail

ACTION=${1:-}
DIR=${2:-/tmp/vggbench-slurm}
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server eatmydata)
# Commands the cluster needs, one per package above (their presence means "installed").
COMMANDS=(slurmctld slurmd sbatch munged slurmdbd mariadbd eatmydata)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # in start order
READY_TIMEOUT=${SLURM_CLUSTER_TIMEOUT:-60}          # seconds each start-up step may take

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

pid_file() { echo "$DIR/run/$1.pid"; }

# The PID recorded for daemon $1, printed only if that process is alive and still is
# that daemon (a stale PID file may name a recycled PID of an unrelated process).
live_pid() {
    local file pid
    file=$(pid_file "$1")
    [ -s "$file" ] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm")" = "$1" ] || return 1
    echo "$pid"
}

# Print the tail of every daemon log (why a start-up step failed) and exit.
fail_with_logs() {
    log "error: $*"
    local f
    for f in "$DIR"/log/*.log; do
        [ -f "$f" ] || continue
        echo "----- $f (last 30 lines) -----" >&2
        tail -n 30 "$f" >&2
    done
    exit 1
}

# Wait until command "$@" succeeds; $1 says what we wait for (for the error message).
wait_for() {
    local what=$1 deadline=$((SECONDS + READY_TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail_with_logs "timed out after ${READY_TIMEOUT}s waiting for $what"
        sleep 0.1
    done
}

ensure_packages() {
    local missing=() cmd
    for cmd in "${COMMANDS[@]}"; do
        PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; as root run: apt-get install ${PACKAGES[*]}"
    log "installing ${PACKAGES[*]} (missing: ${missing[*]}; ~20 s)"
    # Package scripts would start the system-wide services with their default config
    # (and ports); a policy-rc.d that refuses keeps them off. Only ours, only now.
    local policy=/usr/sbin/policy-rc.d created_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
    fi
    local apt=(apt-get -q -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)
    local rc=0
    { DEBIAN_FRONTEND=noninteractive "${apt[@]}" update -qq &&
      DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq --no-install-recommends "${PACKAGES[@]}"; } \
        >"${TMPDIR:-/tmp}/vggbench-slurm-apt.log" 2>&1 || rc=$?
    [ -z "$created_policy" ] || rm -f "$policy"
    [ "$rc" -eq 0 ] || { tail -n 20 "${TMPDIR:-/tmp}/vggbench-slurm-apt.log" >&2; die "apt-get failed (rc $rc)"; }
}

# TCP ports someone listens on (IPv4 and IPv6), one decimal number per line.
listening_ports() {
    local hex
    # State 0A is LISTEN; the local address is HEXIP:HEXPORT (mawk has no hex parsing).
    awk 'FNR > 1 && $4 == "0A" { split($2, a, ":"); print a[2] }' /proc/net/tcp /proc/net/tcp6 2>/dev/null |
        while read -r hex; do echo $((16#$hex)); done
}

listening() { listening_ports | grep -qx "$1"; }

# Set PORTS to $1 consecutive free ports, starting from a base derived from DIR (so a
# restart usually gets the same ones) and moving on while any is taken.
pick_ports() {
    local count=$1 used base port i ok
    used=" $(listening_ports | tr '\n' ' ') "
    base=$((20000 + $(echo "$DIR" | cksum | cut -d' ' -f1) % 20000))
    for ((port = base; port < 60000; port += count)); do
        ok=1
        for ((i = 0; i < count; i++)); do
            case $used in *" $((port + i)) "*) ok="" ;; esac
        done
        if [ -n "$ok" ]; then
            mapfile -t PORTS < <(seq "$port" $((port + count - 1)))
            return
        fi
    done
    die "no $count free consecutive ports between $base and 60000"
}

write_configs() {
    local ctld_port=$1 slurmd_port=$2 dbd_port=$3 db_port=$4 host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    # RealMemory must not exceed what slurmd detects, or the node is drained: use 90%.
    mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
    cat >"$DIR/etc/slurm.conf" <<EOF
# Generated by scripts/slurm_cluster.sh: a single-node test cluster under $DIR.
ClusterName=vggbench
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (120 s by
# default); short keeps requeue tests fast.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
# No systemd and no cgroups on these machines: track processes by /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Schedule at once, and look at pending jobs every second (tests wait on jobs; the
# defaults batch them for seconds, and a requeued job would wait a minute to restart).
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_min_interval=0,sched_interval=1
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
JobRequeue=1
# Refuse at submission a job no node can run (instead of leaving it pending forever).
EnforcePartLimits=ALL
# Short grace between SIGTERM and SIGKILL on cancel/requeue, so requeued jobs restart fast.
KillWait=5
InactiveLimit=0
MinJobAge=300
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$(pid_file slurmd)
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Accounting through slurmdbd: sacct, and the job states submitit reads from it.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$DIR/munge/munge.socket
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmdbd refuses a config readable by others (it holds the database password).
    (umask 077 && cat >"$DIR/etc/slurmdbd.conf" <<EOF
# Generated by scripts/slurm_cluster.sh.
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$(pid_file slurmdbd)
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$(cat "$DIR/etc/db.pass")
StorageLoc=slurm_acct_db
EOF
    )
    # The database port, for the `mariadbd` command line (it has no config file of ours).
    echo "$db_port" >"$DIR/etc/db.port"
}

start_munged() {
    if [ ! -s "$DIR/etc/munge.key" ]; then
        (umask 077 && head -c 1024 /dev/urandom >"$DIR/etc/munge.key")
    fi
    # --force: munged would refuse to run as root and with the key outside /etc/munge.
    munged --force --key-file="$DIR/etc/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$(pid_file munged)" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/state/munge.seed" </dev/null >>"$DIR/log/munged.log" 2>&1 9>&-
    wait_for "munged" live_pid munged
}

db_client() { mariadb --no-defaults --socket="$DIR/run/mysqld.sock" --user=root "$@"; }

# The database is scratch (a test cluster's accounting records): eatmydata turns its
# fsyncs into no-ops, which makes a fresh cluster start 3x faster on a slow disk. A
# machine crash could leave it corrupt; then `stop`, remove DIR, and `start` again.
start_mariadbd() {
    if [ ! -d "$DIR/db/mysql" ]; then
        eatmydata mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --skip-test-db \
            --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1 ||
            fail_with_logs "mariadb-install-db failed (see $DIR/log/mariadb-install.log)"
    fi
    # mariadbd does not daemonise: run it in its own session, detached from our stdio
    # (a caller capturing our output would otherwise wait for it to exit). Log size and
    # lock timeout are what slurmdbd asks for; it would also like a 4 GB buffer pool,
    # but only warns about a small one, and a test database needs no more.
    setsid eatmydata mariadbd --no-defaults --datadir="$DIR/db" --user=root --bind-address=127.0.0.1 \
        --port="$(cat "$DIR/etc/db.port")" --socket="$DIR/run/mysqld.sock" --pid-file="$(pid_file mariadbd)" \
        --log-error="$DIR/log/mariadbd.log" --skip-name-resolve \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
        </dev/null >/dev/null 2>&1 9>&- &
    wait_for "MariaDB" db_client -e "SELECT 1"
    db_client -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$DIR/etc/db.pass")';
                  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
        fail_with_logs "could not create the slurm database user"
}

start_slurm_daemons() {
    slurmdbd </dev/null >>"$DIR/log/slurmdbd.log" 2>&1 9>&- || fail_with_logs "slurmdbd did not start"
    # slurmctld exits if slurmdbd does not answer yet: wait until it listens.
    wait_for "slurmdbd" listening "${PORTS[2]}"
    slurmctld </dev/null >>"$DIR/log/slurmctld.log" 2>&1 9>&- || fail_with_logs "slurmctld did not start"
    wait_for "slurmctld" scontrol ping
    slurmd </dev/null >>"$DIR/log/slurmd.log" 2>&1 9>&- || fail_with_logs "slurmd did not start"
    wait_for "the node to register" node_idle
    # A job end to end: the first one after slurmctld starts can wait a few seconds.
    timeout "$READY_TIMEOUT" srun --quiet --ntasks=1 --time=1 true >>"$DIR/log/probe.log" 2>&1 ||
        fail_with_logs "the probe job 'srun true' failed (output in $DIR/log/probe.log)"
}

node_idle() { [ "$(sinfo --noheader --format=%t 2>/dev/null)" = idle ]; }

cmd_start() {
    [ "$(id -u)" -eq 0 ] || die "needs root (the SLURM daemons and munged run as root here)"
    ensure_packages
    export PATH=$PATH:/usr/sbin:/sbin
    export SLURM_CONF="$DIR/etc/slurm.conf"
    local running=() d
    for d in "${DAEMONS[@]}"; do
        live_pid "$d" >/dev/null && running+=("$d")
    done
    if [ ${#running[@]} -eq ${#DAEMONS[@]} ]; then
        log "already running in $DIR"
        echo "export SLURM_CONF=$SLURM_CONF"
        return
    fi
    [ ${#running[@]} -eq 0 ] || cmd_stop  # half a cluster (a crashed daemon): restart it whole
    mkdir -p "$DIR"/{etc,state/ctld,spool/slurmd,log,run,db}
    # munged and the clients need a socket directory everybody can traverse.
    mkdir -p "$DIR/munge"
    chmod 755 "$DIR" "$DIR/munge"
    if [ ! -s "$DIR/etc/db.pass" ]; then
        (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DIR/etc/db.pass")
    fi
    pick_ports 4
    write_configs "${PORTS[@]}"
    log "starting in $DIR (slurmctld port ${PORTS[0]}, $(nproc) CPUs)"
    start_munged
    start_mariadbd
    start_slurm_daemons
    log "ready after ${SECONDS}s"
    echo "export SLURM_CONF=$SLURM_CONF"
}

# SIGTERM the named daemons together, wait up to 15 s for them to exit (then SIGKILL).
stop_daemons() {
    local d pid pids=() deadline=$((SECONDS + 15))
    for d in "$@"; do
        pid=$(live_pid "$d") || continue
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    for pid in "${pids[@]}"; do
        while [ -d "/proc/$pid" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
        if [ -d "/proc/$pid" ]; then
            log "pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) ignored SIGTERM for 15 s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for d in "$@"; do rm -f "$(pid_file "$d")"; done
}

cmd_stop() {
    # In three steps, each waiting for what it still needs: slurmctld sends its last
    # accounting records to slurmdbd, which writes them to MariaDB; all use munged.
    stop_daemons slurmd slurmctld
    stop_daemons slurmdbd
    stop_daemons mariadbd munged
    log "stopped the daemons of $DIR"
}

cmd_status() {
    local d pid rc=0
    for d in "${DAEMONS[@]}"; do
        if pid=$(live_pid "$d"); then
            echo "$d: running (pid $pid)"
        else
            echo "$d: not running"
            rc=1
        fi
    done
    if [ "$rc" -eq 0 ]; then
        SLURM_CONF="$DIR/etc/slurm.conf" sinfo
        echo "export SLURM_CONF=$DIR/etc/slurm.conf"
    fi
    return "$rc"
}

# One start or stop at a time per DIR (say, two test sessions sharing one). The daemons
# are started with fd 9 closed (`9>&-`), so they do not hold the lock after we exit.
lock() {
    mkdir -p "$DIR"
    exec 9>>"$DIR/lock"
    flock 9
}

case $ACTION in
    start) lock && cmd_start ;;
    stop) lock && cmd_stop ;;
    status) cmd_status ;;
    *) usage ;;
esac
