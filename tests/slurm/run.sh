#!/usr/bin/env bash
# `make test-slurm`: the collect stages on a REAL Slurm (one node on this machine).
#
# Installs slurm-wlm + munge if missing (apt-get; needs root), starts a private munged,
# slurmctld and slurmd (tests/slurm/slurm.conf.in, state in a temp dir; stopped on exit),
# builds a small benchmark slice + a freshly initialized tiny model, runs collect-pt
# (offline corrector) and collect-ps single-process as the reference, then submits both as
# 4-task job arrays + merge jobs with `popen cluster submit` (tests/slurm/cluster.toml).
# While collect-pt runs, one array task is killed mid-run and requeued (`scontrol requeue`,
# Slurm's pre-emption path). Checks: the merged outputs equal the single-process files byte
# for byte (cmp), the requeued task resumed its parts, a missing shard is named by
# `popen merge`, and a second submit's tasks and merges find their outputs complete (same
# definition) and change nothing.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
POPEN=${POPEN:-$REPO/target/debug/popen}
TRAIN=${SLURM_TEST_TRAIN:-32}
source tests/slurm/daemons.sh

fail() { echo "slurm test FAILED: $*" >&2; exit 1; }
[ -x "$POPEN" ] || fail "$POPEN is not built (cargo build --bin popen)"
[ "$(id -u)" = 0 ] || fail "needs root (slurmd runs the jobs as root here)"
slurm_install

W=$(mktemp -d /tmp/popen-slurm.XXXXXX)
cleanup() {
    rc=$?
    if [ -n "${SLURM_CONF:-}" ]; then scancel --user=root >/dev/null 2>&1 || true; fi
    slurm_stop
    if [ $rc -ne 0 ]; then
        echo "slurm test: logs of the failed run:" >&2
        tail -n 20 "$W"/slurm/slurmctld.log "$W"/work/out/logs/* >&2 2>/dev/null || true
    fi
    rm -rf "$W"
    exit $rc
}
trap cleanup EXIT INT TERM
slurm_start "$W/slurm"

# Inputs: a benchmark slice and a fresh tiny model (random weights: the stages' logic, not
# the model's quality, is under test).
mkdir -p "$W/work"
cd "$W/work"
"$POPEN" synth --config "$REPO/pipelines/synth.toml" --train-samples "$TRAIN" --val-samples 4 --test-samples 4 --out data >/dev/null
"$POPEN" tokenizer-tiny --data data --out tok/tokenizer.json >/dev/null
"$POPEN" model-init --config "$REPO/pipelines/model-tiny.toml" --tokenizer tok/tokenizer.json --out init --seed 0 >/dev/null

# The reference: one process each.
t0=$(date +%s)
"$POPEN" collect-pt --config "$REPO/tests/slurm/collect-pt.toml" --model init --samples data/train.parquet \
    --lexicon data/lexicon.json --out single/pt.parquet >/dev/null 2>&1
"$POPEN" collect-ps --config "$REPO/tests/slurm/collect-ps.toml" --model init --samples data/train.parquet \
    --out single/ps.parquet --phase 2 >/dev/null 2>&1
echo "slurm test: single-process references in $(( $(date +%s) - t0 )) s"

# The cluster run: paths of this run win over tests/slurm/cluster.toml's [env].
export POPEN DATA=data OUT=out MODEL=init PT_CONFIG=$REPO/tests/slurm/collect-pt.toml \
    PS_CONFIG=$REPO/tests/slurm/collect-ps.toml
# The scripts are referenced from the repository; jobs run in this folder (sbatch's cwd).
sed "s|pipelines/slurm/|$REPO/pipelines/slurm/|" "$REPO/tests/slurm/cluster.toml" > cluster.toml
"$POPEN" cluster submit --config cluster.toml | tee jobs.txt
PT_JOB=$(awk '$1 == "collect-pt" {print $2}' jobs.txt)
[ -n "$PT_JOB" ] || fail "no collect-pt job submitted"

# Kill task 1 of collect-pt after its first committed part and requeue it.
parts=out/prefs/pt-00001-of-00004.parquet.parts
for _ in $(seq 1 600); do
    [ -f "$parts/part-00000.parquet" ] && break
    [ -f out/prefs/pt-00001-of-00004.parquet ] && fail "task 1 finished before it could be killed"
    sleep 0.2
done
[ -f "$parts/part-00000.parquet" ] || fail "task 1 committed no part in 2 minutes"
state=$(squeue -h -j "${PT_JOB}_1" -o %T)
[ "$state" = RUNNING ] || fail "task ${PT_JOB}_1 is '$state', expected RUNNING"
scontrol requeue "${PT_JOB}_1"
# A requeued job waits ~2 minutes (Slurm's requeue delay); let it start now.
sleep 1
scontrol update JobId="${PT_JOB}_1" StartTime=now
echo "slurm test: requeued task ${PT_JOB}_1 mid-run ($(ls "$parts" | grep -c '^part-') parts committed)"

# Wait for every job (arrays, merges) to leave the queue.
for _ in $(seq 1 900); do
    [ -z "$(squeue -h -o %i)" ] && break
    sleep 1
done
[ -z "$(squeue -h -o %i)" ] && echo "slurm test: all jobs done" || { squeue; fail "jobs still queued after 15 minutes"; }
bad=$(scontrol show job -o | grep -v 'JobState=COMPLETED' || true)
[ -z "$bad" ] || fail "jobs not COMPLETED: $bad"
restarts=$(scontrol show job -o "${PT_JOB}_1" | grep -o 'Restarts=[0-9]*')
[ "$restarts" = Restarts=1 ] || fail "task ${PT_JOB}_1: $restarts, expected Restarts=1"
grep -q '"resumed"' out/prefs/pt-00001-of-00004.manifest.json || fail "the requeued task did not resume its parts"

cmp out/prefs/pt.parquet single/pt.parquet || fail "merged collect-pt differs from the single-process run"
cmp out/prefs/ps.parquet single/ps.parquet || fail "merged collect-ps differs from the single-process run"
echo "slurm test: merged collect-pt ($(stat -c %s out/prefs/pt.parquet) B) and collect-ps ($(stat -c %s out/prefs/ps.parquet) B) equal the single-process files"

# A rerun of the pipeline resubmits the array stages (only a stage knows its definition):
# every task finds its output complete for the same definition and does nothing, each merge
# finds the merged file complete, and the files stay as they were.
"$POPEN" cluster submit --config cluster.toml > resubmit.txt 2> resubmit.err
[ "$(grep -c . resubmit.txt)" = 4 ] || fail "second submit: expected 2 arrays + 2 merges: $(cat resubmit.txt) $(cat resubmit.err)"
for _ in $(seq 1 300); do
    [ -z "$(squeue -h -o %i)" ] && break
    sleep 1
done
[ -z "$(squeue -h -o %i)" ] || fail "resubmitted jobs still queued after 5 minutes"
for stage in collect-pt collect-ps; do
    job=$(awk -v s=$stage '$1 == s {print $2}' resubmit.txt)
    n=$(grep -l 'is complete: same definition' out/logs/$stage-${job}_*.out 2>/dev/null | wc -l)
    [ "$n" = 4 ] || fail "$stage resubmitted: $n of 4 tasks said complete: $(cat out/logs/$stage-${job}_*.out)"
    m=$(awk -v s=$stage-merge '$1 == s {print $2}' resubmit.txt)
    grep -q 'is complete' out/logs/$stage-merge-$m.out || fail "$stage-merge did not find the merged file complete: $(cat out/logs/$stage-merge-$m.out)"
done
cmp out/prefs/pt.parquet single/pt.parquet || fail "resubmit changed the merged collect-pt"
cmp out/prefs/ps.parquet single/ps.parquet || fail "resubmit changed the merged collect-ps"
echo "slurm test: resubmit: every task and merge found its output complete"

# A missing shard is named.
mv out/prefs/ps-00002-of-00004.parquet ps2.parquet
if msg=$("$POPEN" merge --out out/prefs/ps.parquet --shards 4 --samples data/train.parquet --force 2>&1); then
    fail "merge succeeded without shard 2"
fi
echo "$msg" | grep -q 'shard 2/4 (array task 2): output out/prefs/ps-00002-of-00004.parquet is missing' \
    || fail "merge error does not name shard 2: $msg"
echo "slurm test: passed ($(( $(date +%s) - t0 )) s)"
