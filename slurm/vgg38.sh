#!/usr/bin/env bash
# Train VGG38 BN+RC with DistributedDataParallel on SLURM: one task per GPU, any number of nodes.
#
#   sbatch slurm/vgg38.sh [vggbench.train options]                      # 1 node x 4 GPUs (defaults below)
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 slurm/vgg38.sh --lr 0.01
#   VGGBENCH_EPOCHS=10 sbatch --partition=gpu --account=proj slurm/vgg38.sh
#
# CPU profile (a cluster without GPUs, e.g. scripts/slurm_cluster.sh): ask for no GPUs and
# one CPU task per rank; with no GPU in the allocation the ranks train on the CPU (gloo):
#
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/vgg38.sh --epochs 2
#
# sbatch options on the command line override the #SBATCH defaults below. Node, task
# and GPU counts are read from SLURM's environment here, never repeated: srun starts
# SLURM_NTASKS tasks (--ntasks-per-node of them on each of --nodes nodes), and every task
# finds its rank, local rank, world size and rendezvous (first node of the job) in the
# environment srun gives it (vggbench.distributed). With GPUs, --ntasks-per-node must
# equal --gpus-per-node: rank r uses GPU SLURM_LOCALID of its node. --batch-size is per
# rank: the global batch is SLURM_NTASKS x --batch-size.
#
# Settings (environment variables; sbatch passes the submitting shell's environment):
#   VGGBENCH_ROOT      repository to run from (default: the directory sbatch ran in)
#   VGGBENCH_PYTHON    interpreter (default: $VGGBENCH_ROOT/.venv/bin/python, else python3)
#   VGGBENCH_MODEL     model (default: vgg38)         VGGBENCH_VARIANT  variant (default: bn_rc)
#   VGGBENCH_EPOCHS    epochs (default: vggbench.train's, the study's 100)
#   VGGBENCH_LR, VGGBENCH_SEED, VGGBENCH_BATCH_SIZE    (default: vggbench.train's)
#   VGGBENCH_DATA      directory holding cifar-100-python/ (default: data)
#   VGGBENCH_OUT       run directory (default: runs/<model>-<variant>-lr<lr>-seed<seed>)
#   VGGBENCH_DEVICE    cuda or cpu (default: cuda when the allocation has GPUs, else cpu)
#   VGGBENCH_WORKERS   DataLoader workers per rank (default: --cpus-per-task - 1; results do not depend on it)
# Arguments after the script name go to `python -m vggbench.train` last, so they win over
# the variables (e.g. --epochs 2, --sync-bn, --precision bf16, --out-dir DIR).
#
# Requeue and time limits: the job is requeueable (--requeue). When the run directory
# already holds epoch checkpoints, training continues from the newest one (the tasks run
# `python -m vggbench.resume`, which adds --resume), so `scontrol requeue JOBID`,
# preemption, a node failure, or submitting the script again with the same run directory
# continues the run without losing a completed epoch.
# SLURM sends USR1 to this script 3 minutes before the time limit (--signal below); it
# then requeues the job, which continues in a new allocation (the epoch in progress is
# redone). The output file is appended to (--open-mode=append) across restarts.
#
# Job name: the script renames its job after what it trains, e.g. vggbench-vgg08-plain-lr0.01-seed3
# (`python -m vggbench.jobname` on the training options; `scontrol update ... JobName=`), so squeue
# and sacct say what runs. `sbatch --job-name=NAME` keeps NAME instead.
#
#SBATCH --job-name=vggbench
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=slurm-vggbench-%j.out
set -euo pipefail

log() { echo "vgg38.sh [job ${SLURM_JOB_ID:-?}]: $*" >&2; }
die() { log "error: $*"; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "submit this script with sbatch (it reads its allocation from SLURM's environment)"

ROOT=${VGGBENCH_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT"
if [ -n "${VGGBENCH_PYTHON:-}" ]; then
    PYTHON=$VGGBENCH_PYTHON
elif [ -x .venv/bin/python ]; then
    PYTHON=$ROOT/.venv/bin/python
else
    PYTHON=python3
fi

# The allocation, as SLURM describes it.
nodes=${SLURM_NNODES:-1}
tasks=${SLURM_NTASKS:-1}
tasks_per_node=${SLURM_NTASKS_PER_NODE:-$((tasks / nodes))}
gpus_per_node=${SLURM_GPUS_ON_NODE:-0}
cpus_per_task=${SLURM_CPUS_PER_TASK:-1}
if [ "$gpus_per_node" -gt 0 ]; then default_device=cuda; else default_device=cpu; fi
device=${VGGBENCH_DEVICE:-$default_device}
case $device in
    cuda)
        [ "$gpus_per_node" -gt 0 ] || die "VGGBENCH_DEVICE=cuda, but the job has no GPUs: submit with --gpus-per-node=N"
        [ "$tasks_per_node" -eq "$gpus_per_node" ] ||
            die "one task per GPU: --ntasks-per-node ($tasks_per_node) must equal --gpus-per-node ($gpus_per_node)" ;;
    cpu) ;;
    *) die "VGGBENCH_DEVICE must be cuda or cpu, got '$device'" ;;
esac

# The training command. Variables first, forwarded arguments last (argparse: last wins).
train_args=(--model "${VGGBENCH_MODEL:-vgg38}" --variant "${VGGBENCH_VARIANT:-bn_rc}"
            --data-dir "${VGGBENCH_DATA:-data}" --device "$device"
            --workers "${VGGBENCH_WORKERS:-$((cpus_per_task > 1 ? cpus_per_task - 1 : 0))}")
[ -z "${VGGBENCH_EPOCHS:-}" ] || train_args+=(--epochs "$VGGBENCH_EPOCHS")
[ -z "${VGGBENCH_LR:-}" ] || train_args+=(--lr "$VGGBENCH_LR")
[ -z "${VGGBENCH_SEED:-}" ] || train_args+=(--seed "$VGGBENCH_SEED")
[ -z "${VGGBENCH_BATCH_SIZE:-}" ] || train_args+=(--batch-size "$VGGBENCH_BATCH_SIZE")
[ -z "${VGGBENCH_OUT:-}" ] || train_args+=(--out-dir "$VGGBENCH_OUT")
train_args+=("$@")

# Name the job after the training unless sbatch was given another name (a failure only costs the name).
if [ "${SLURM_JOB_NAME:-}" = vggbench ]; then
    name=$("$PYTHON" -m vggbench.jobname "${train_args[@]}") &&
        scontrol update JobId="$SLURM_JOB_ID" JobName="$name" ||
        log "could not rename the job after its training; it stays '$SLURM_JOB_NAME'"
fi

# Near the time limit: requeue (completed epochs are checkpointed; the new allocation resumes).
requeued=""
# shellcheck disable=SC2317  # called by the trap
on_time_limit() {
    requeued=1
    log "time limit near: requeueing; the next start continues from the newest epoch checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
}
trap on_time_limit USR1

# Threads per rank: the CPUs SLURM gave the task (torch would otherwise use every core).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus_per_task}
export PYTHONUNBUFFERED=1
log "$nodes node(s) x $tasks_per_node task(s), $gpus_per_node GPU(s) per node, device $device," \
    "$cpus_per_task CPU(s) per task (start $((${SLURM_RESTART_COUNT:-0} + 1)) of this job)"
# Every task runs vggbench.train through vggbench.resume, which adds --resume when the run
# directory already holds epoch checkpoints (a requeued or resubmitted job).
# srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05): pass it on.
# --kill-on-bad-exit: one failed rank ends the whole step instead of leaving the others
# waiting in a collective. srun runs in the background so the USR1 trap can fire.
srun --kill-on-bad-exit=1 --cpus-per-task="$cpus_per_task" "$PYTHON" -m vggbench.resume "${train_args[@]}" &
srun_pid=$!
status=0
wait "$srun_pid" || status=$?
if [ -n "$requeued" ]; then
    wait "$srun_pid" || true  # SLURM is ending the step for the requeue
    exit 0
fi
exit "$status"
