# Sourced by tests/slurm/run.sh: a private munged + slurmctld + slurmd on this machine.
# slurm_start DIR: starts them with state under DIR and waits for the node to be idle;
# slurm_stop: stops what slurm_start started (by pid), safe to call twice.

slurm_install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    echo "slurm test: installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

slurm_start() {
    SLURM_DIR=$1
    local here host cpus
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    host=$(hostname -s)
    cpus=${SLURM_TEST_CPUS:-4}
    mkdir -p "$SLURM_DIR"/{munge,state,spool}
    chmod 700 "$SLURM_DIR" "$SLURM_DIR/munge"
    # munged: its own key, socket and files, so a system munged (if any) is left alone.
    dd if=/dev/urandom of="$SLURM_DIR/munge/munge.key" bs=1 count=1024 status=none
    chmod 400 "$SLURM_DIR/munge/munge.key"
    munged --force --key-file="$SLURM_DIR/munge/munge.key" --socket="$SLURM_DIR/munge/munge.socket" \
        --pid-file="$SLURM_DIR/munge/munged.pid" --log-file="$SLURM_DIR/munge/munged.log" \
        --seed-file="$SLURM_DIR/munge/munged.seed"
    sed -e "s|@HOST@|$host|g" -e "s|@DIR@|$SLURM_DIR|g" -e "s|@CPUS@|$cpus|g" \
        -e "s|@PORT0@|${SLURM_TEST_PORT:-16817}|g" -e "s|@PORT1@|$(( ${SLURM_TEST_PORT:-16817} + 1 ))|g" \
        "$here/slurm.conf.in" > "$SLURM_DIR/slurm.conf"
    export SLURM_CONF=$SLURM_DIR/slurm.conf
    slurmctld -f "$SLURM_CONF" -i
    slurmd -f "$SLURM_CONF"
    local i
    for i in $(seq 1 60); do
        if sinfo -h -o '%t' 2>/dev/null | grep -qx 'idle'; then
            echo "slurm test: node $host idle ($cpus CPUs), SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 1
    done
    echo "slurm test: the node did not come up; logs:" >&2
    tail -n 30 "$SLURM_DIR"/slurmctld.log "$SLURM_DIR"/slurmd.log "$SLURM_DIR"/munge/munged.log >&2 || true
    return 1
}

slurm_stop() {
    [ -n "${SLURM_DIR:-}" ] || return 0
    local f pid
    for f in slurmd.pid slurmctld.pid munge/munged.pid; do
        pid=$(cat "$SLURM_DIR/$f" 2>/dev/null) || continue
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
    done
}
