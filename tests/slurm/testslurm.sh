#!/usr/bin/env bash
# A throw-away Slurm for mpimap's tests: Debian's slurm-wlm, two fake nodes on this one machine.
#
#   bash tests/slurm/testslurm.sh install   # as root: apt-get install the packages (idempotent;
#                                           # slurm, munge, libpmix-dev and Open MPI, ~20 s)
#   bash tests/slurm/testslurm.sh start     # bring the cluster up (a no-op if it is up); ~1 s
#   bash tests/slurm/testslurm.sh status    # exit 0 if every daemon is alive and both nodes idle
#   bash tests/slurm/testslurm.sh env       # print `export SLURM_CONF=...`: eval it to use sbatch etc.
#   bash tests/slurm/testslurm.sh stop      # cancel its jobs, stop its daemons, delete its state
#
# CI: `bash tests/slurm/testslurm.sh install`, then the test suite with MPIMAP_REQUIRE_SLURM=1
# (the pytest fixture in tests/slurm/conftest.py starts and stops the cluster itself).
#
# Everything lives under one directory, $MPIMAP_TESTSLURM_DIR (default /tmp/mpimap-testslurm):
# cluster/ holds config, munge key and socket, daemon state, logs and the per-node job scratch
# (stop deletes it); beside it only the start/stop lock, the pytest fixture's bookkeeping, and
# failed-logs/ after a failed start.  Daemons run in
# the foreground (-D / -F) in their own session (setsid), so the pid this script records is the
# daemon itself; `stop` signals those pids and the processes they forked (slurmscriptd,
# slurmstepd), found by the marker this script puts in the daemons' environment -- nothing else.
#
# Shape (facts: ../shared/design/SLURM.md):
#   nodes n1, n2   one `slurmd -N nX` each, NodeAddr=127.0.0.1, distinct ports, %n in their paths,
#                  CPUs=$MPIMAP_TESTSLURM_CPUS each (default 4; declared beyond the real cores
#                  with SlurmdParameters=config_overrides)
#   MpiDefault=pmi2 (the pip MPICH); srun --mpi=pmix works too when libpmix-dev is installed
#   SLURM_TMPDIR   per node and job: a TaskProlog prints `export SLURM_TMPDIR=...`, the Epilog
#                  deletes the directory when the job ends on that node
#   KillWait=$MPIMAP_TESTSLURM_KILLWAIT (default 10 s) between SIGTERM and SIGKILL on scancel

set -euo pipefail

ROOT=${MPIMAP_TESTSLURM_DIR:-/tmp/mpimap-testslurm}
DIR=$ROOT/cluster
PORT=${MPIMAP_TESTSLURM_PORT:-16817}      # slurmctld; the nodes use PORT+1, PORT+2
CPUS=${MPIMAP_TESTSLURM_CPUS:-4}
KILLWAIT=${MPIMAP_TESTSLURM_KILLWAIT:-10}
NODES=(n1 n2)
# libpmix-dev: `srun --mpi=pmix` dlopens the unversioned libpmix.so (must exist before slurmd
# starts).  openmpi-bin: so the tests also cover Open MPI (mpirun, and srun --mpi=pmix).
PACKAGES=(slurmctld slurmd slurm-client munge libpmix-dev openmpi-bin)
MARK="MPIMAP_TESTSLURM_MARK=$DIR"          # in every daemon's environment, so stop finds its own

die() { echo "testslurm: $*" >&2; exit 1; }

for v in PORT CPUS KILLWAIT; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "MPIMAP_TESTSLURM_$v must be a whole number (got '${!v}')"
done
case "$ROOT" in
    /*) ;;
    *) die "MPIMAP_TESTSLURM_DIR must be an absolute path (got '$ROOT')" ;;
esac
case "$ROOT" in
    *[[:space:]]* | *'"'* | *"'"* | *'#'*) die "MPIMAP_TESTSLURM_DIR='$ROOT': slurm.conf cannot hold" \
        "spaces, quotes or # in paths; choose another directory" ;;
esac

need_binaries() {
    local missing=()
    for b in munged slurmctld slurmd sbatch srun salloc scontrol sinfo squeue scancel; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    if ((${#missing[@]})); then
        echo "testslurm: missing programs: ${missing[*]}; run \`bash $0 install\` as root" \
             "(it apt-get installs ${PACKAGES[*]})" >&2
        return 1
    fi
}

cmd_install() {
    local p missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if ! ((${#missing[@]})) && need_binaries; then
        echo "testslurm: packages already installed"; return 0
    fi
    [ "$(id -u)" = 0 ] || die "install needs root (it runs apt-get install ${PACKAGES[*]})"
    command -v apt-get >/dev/null || die "install needs apt-get (Debian/Ubuntu); install" \
        "${PACKAGES[*]} by other means"
    export DEBIAN_FRONTEND=noninteractive
    # The packages' maintainer scripts try to start the daemons; there is no init here, and we
    # want our own instances anyway.  policy-rc.d = 101 tells invoke-rc.d not to start anything.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; created_policy=1
    fi
    local rc=0
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"${TMPDIR:-/tmp}/testslurm-apt.log" 2>&1; then
        # A fresh machine may not have package lists yet.
        apt-get update -q >>"${TMPDIR:-/tmp}/testslurm-apt.log" 2>&1 || true
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" \
            >>"${TMPDIR:-/tmp}/testslurm-apt.log" 2>&1 || rc=$?
    fi
    [ "$created_policy" = 1 ] && rm -f "$policy"
    if [ "$rc" != 0 ]; then
        tail -20 "${TMPDIR:-/tmp}/testslurm-apt.log" >&2
        die "apt-get install ${PACKAGES[*]} failed (exit $rc); log: ${TMPDIR:-/tmp}/testslurm-apt.log"
    fi
    need_binaries
    echo "testslurm: installed ${PACKAGES[*]}"
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# Is the recorded pid still the daemon we started (pids are reused)?
ours() {
    local name=$1 pid
    pid=$(cat "$DIR/run/$name.pid" 2>/dev/null) || return 1
    pid_alive "$pid" || return 1
    tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF "$MARK"
}

cmd_status() {
    [ -f "$DIR/etc/slurm.conf" ] || { echo "testslurm: not started (no $DIR/etc/slurm.conf)"; return 1; }
    for d in munged slurmctld "${NODES[@]/#/slurmd-}"; do
        ours "$d" || { echo "testslurm: $d is not running"; return 1; }
    done
    local states
    states=$(SLURM_CONF=$DIR/etc/slurm.conf sinfo -h -N -o '%N %T' 2>&1) || {
        echo "testslurm: sinfo failed: $states"; return 1; }
    echo "$states"
    local n
    for n in "${NODES[@]}"; do
        echo "$states" | grep -Eq "^$n (idle|mixed|allocated|completing)" || return 1
    done
}

write_config() {
    local host; host=$(hostname)
    mkdir -p "$DIR"/{etc,run,log,ctld,spool,tmp,scratch,munge,munge-key}
    chmod 755 "$ROOT" "$DIR" "$DIR/munge"  # munged wants a world-executable socket directory
    chmod 700 "$DIR/munge-key"
    chmod 1777 "$DIR/scratch"
    [ -f "$DIR/munge-key/munge.key" ] || {
        head -c 1024 /dev/urandom >"$DIR/munge-key/munge.key"; chmod 400 "$DIR/munge-key/munge.key"; }

    cat >"$DIR/etc/taskprolog.sh" <<EOF
#!/bin/sh
# Per node and job scratch, as sites provide it: the TaskProlog's "export" lines reach the task.
d="$DIR/scratch/\${SLURMD_NODENAME:-unknown}/job\${SLURM_JOB_ID:-0}"
mkdir -p "\$d" && chmod 700 "\$d" && echo "export SLURM_TMPDIR=\$d"
EOF
    cat >"$DIR/etc/epilog.sh" <<EOF
#!/bin/sh
# Runs as root on each node when a job ends there: delete that node's scratch for the job.
[ -n "\${SLURM_JOB_ID:-}" ] && rm -rf "$DIR/scratch/\${SLURMD_NODENAME:-unknown}/job\${SLURM_JOB_ID}"
exit 0
EOF
    chmod 755 "$DIR/etc/taskprolog.sh" "$DIR/etc/epilog.sh"

    {
        cat <<EOF
# Written by tests/slurm/testslurm.sh -- a throw-away test cluster; everything lives in $DIR.
ClusterName=mpimaptest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/ctld
SlurmctldPidFile=$DIR/run/slurmctld.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/run/slurmd-%n.daemon.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
TmpFS=$DIR/tmp/%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=pmi2
MailProg=/bin/true
ReturnToService=2
TaskProlog=$DIR/etc/taskprolog.sh
Epilog=$DIR/etc/epilog.sh
KillWait=$KILLWAIT
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
SchedulerParameters=sched_interval=1
# Job ids never repeat on this machine (as on a real cluster): MPICH names its node-level init
# segment after the PMI kvsname "<job>.<step>", and a segment a killed job left in /dev/shm
# would make MPI_Init fail in every later job with the same id (in any test cluster here).
FirstJobId=$(( ($(date +%s) % 60000) * 1000 + PORT % 1000 + 1 ))
EOF
        local i=1 n
        for n in "${NODES[@]}"; do
            echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$CPUS RealMemory=1000 State=UNKNOWN"
            i=$((i + 1))
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
    } >"$DIR/etc/slurm.conf"
    for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n" "$DIR/tmp/$n" "$DIR/scratch/$n"; done
    chmod 1777 "$DIR"/scratch/*
}

# Start one daemon in the foreground in its own session; record its pid.
launch() {
    local name=$1; shift
    # 9>&-: the daemon must not inherit the start/stop lock (it would hold it forever).
    env "$MARK" setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 9>&- &
    echo $! >"$DIR/run/$name.pid"
}

cmd_start() {
    need_binaries || exit 1
    if cmd_status >/dev/null 2>&1; then echo "testslurm: already up ($DIR)"; cmd_env; return 0; fi
    # Anything half-alive from an earlier start is ours: stop it before starting afresh.
    [ -d "$DIR/run" ] && cmd_stop >/dev/null 2>&1 || true
    rm -rf "$DIR/ctld" "$DIR/spool" "$DIR/run" "$DIR/log" "$DIR/scratch" "$DIR/tmp"
    write_config
    local conf=$DIR/etc/slurm.conf
    launch munged munged -F --socket="$DIR/munge/munge.socket.2" \
        --key-file="$DIR/munge-key/munge.key" --pid-file="$DIR/run/munged.daemon.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge-key/munged.seed" --force
    local t
    for t in $(seq 100); do [ -S "$DIR/munge/munge.socket.2" ] && break; sleep 0.05; done
    [ -S "$DIR/munge/munge.socket.2" ] || { tail "$DIR/log/munged.out" "$DIR/log/munged.log" >&2 || true
        start_failed "munged did not start"; }
    launch slurmctld slurmctld -D -i -f "$conf"
    local n
    for n in "${NODES[@]}"; do launch "slurmd-$n" slurmd -D -f "$conf" -N "$n"; done
    for t in $(seq 300); do   # up to 30 s; usually under 1 s
        if cmd_status >/dev/null 2>&1; then
            echo "testslurm: up in $DIR (nodes ${NODES[*]}, $CPUS CPUs each)"; cmd_env; return 0
        fi
        for d in munged slurmctld "${NODES[@]/#/slurmd-}"; do
            ours "$d" || { tail -20 "$DIR/log/$d.out" "$DIR"/log/"$d".log >&2 2>/dev/null || true
                start_failed "$d exited during start"; }
        done
        sleep 0.1
    done
    cmd_status >&2 || true
    start_failed "nodes did not become idle within 30 s"
}

# A failed start stops what it started; the logs are kept beside the state directory.
start_failed() {
    local keep="$ROOT/failed-logs"
    rm -rf "$keep"; cp -r "$DIR/log" "$keep" 2>/dev/null || true
    cmd_stop >/dev/null 2>&1 || true
    die "$* (logs in $keep)"
}

cmd_env() { echo "export SLURM_CONF=$DIR/etc/slurm.conf"; }

# Pids of every process that carries this cluster's marker in its environment: the daemons and
# what they forked (slurmscriptd, slurmstepd).  Job tasks get the job's environment, not this.
marked() {
    local f p
    for f in /proc/[0-9]*/environ; do
        p=${f#/proc/}; p=${p%/environ}
        [ "$p" = "$$" ] && continue
        tr '\0' '\n' 2>/dev/null <"$f" | grep -qxF "$MARK" && echo "$p"
    done
    return 0
}

cmd_stop() {
    [ -d "$DIR/run" ] || { echo "testslurm: not running ($DIR)"; return 0; }
    if ours slurmctld && command -v scancel >/dev/null; then
        SLURM_CONF=$DIR/etc/slurm.conf timeout 10 scancel --full --quiet -u "$(id -un)" 2>/dev/null || true
        local t
        for t in $(seq 50); do   # let the steps end their tasks (KillWait applies)
            [ -z "$(SLURM_CONF=$DIR/etc/slurm.conf timeout 5 squeue -h -o %i 2>/dev/null || true)" ] && break
            sleep 0.2
        done
    fi
    local pids=() d p
    for d in "${NODES[@]/#/slurmd-}" slurmctld munged; do
        ours "$d" && pids+=("$(cat "$DIR/run/$d.pid")")
    done
    for p in $(marked); do [[ " ${pids[*]} " == *" $p "* ]] || pids+=("$p"); done
    ((${#pids[@]})) && kill -TERM "${pids[@]}" 2>/dev/null || true
    for t in $(seq 50); do
        local alive=()
        for p in "${pids[@]}"; do pid_alive "$p" && alive+=("$p"); done
        ((${#alive[@]})) || break
        sleep 0.1
    done
    for p in "${pids[@]}" $(marked); do pid_alive "$p" && kill -KILL "$p" 2>/dev/null || true; done
    rm -rf "$DIR"
    echo "testslurm: stopped; removed $DIR"
}

# start/stop are serialised, so two test sessions never start two clusters in one directory.
# (The pytest fixture holds the same lock itself and sets MPIMAP_TESTSLURM_LOCKED=1.)
locked() {
    if [ "${MPIMAP_TESTSLURM_LOCKED:-}" = 1 ]; then "$@"; return; fi
    mkdir -p "$ROOT"
    exec 9>"$ROOT/lock"
    flock -w 120 9 || die "could not lock $ROOT/lock within 120 s"
    "$@"
}

case "${1:-}" in
    install) cmd_install ;;
    start) locked cmd_start ;;
    stop) locked cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
