#!/usr/bin/env bash
# The body shared by run-model.sbatch and detectron_code/run-model.sbatch: train CONFIG with
# overrides on the CPUs/GPUs of this allocation, resume from the run folder, requeue on a signal.
#
#   bash scripts/slurm_train.sh CONFIG [key=value ...]     (run by the sbatch files; also runs
#                                                           outside SLURM, as one process)
# Environment (besides scripts/slurm_env.sh's container settings):
#   RUN_DIR   run folder; default runs/<job name>-<job id>, so a requeued job finds its last.pt
#             (a train.run_dir=... override wins)
#   GPUS      GPUs per node to use; default: what SLURM gave this node (SLURM_GPUS_ON_NODE), else
#             CUDA_VISIBLE_DEVICES, else 0 = CPU
#   NPROC     processes per node when the job has one task per node; default: GPUS (at least 1)
#   HPA_SCC_SHUTDOWN_S  seconds torchrun gives its workers to save after a signal (default 240,
#             inside the 300 s of '#SBATCH --signal=B:USR1@300')
#
# How the job is launched (plan_launch; docs/CLUSTER.md has the table of sbatch flags):
#   several tasks per node          -> srun, one rank per task (ranks from SLURM_PROCID/LOCALID)
#   one task per node, NPROC > 1    -> torchrun on every node (srun when several nodes), NPROC each
#   one task per node, several nodes -> srun, one rank per node
#   otherwise                       -> one plain process
set -uo pipefail
REPO=${HPA_SCC_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
CONFIG=${1:?usage: slurm_train.sh CONFIG [key=value ...]}
shift
# A config path is taken from where the job was submitted, else from the repository.
[[ "$CONFIG" == /* ]] || [ -f "$CONFIG" ] || CONFIG="$REPO/$CONFIG"
source "$REPO/scripts/slurm_env.sh"

JOB_ID=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] && JOB_ID="${JOB_ID}_${SLURM_ARRAY_TASK_ID}"
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-train}-${JOB_ID}}
if [ -z "${GPUS:-}" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then GPUS=$SLURM_GPUS_ON_NODE
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then GPUS=$(awk -F, '{print NF}' <<< "$CUDA_VISIBLE_DEVICES")
    else GPUS=0; fi
fi
if [ "$GPUS" -eq 0 ] && [ -n "${SLURM_JOB_ID:-}" ] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "warning: this node has GPUs but SLURM gave none to the job (no GRES?): training on CPU;" \
         "set GPUS=N to use them" >&2
fi

# '%a' in an override is the array task id, so one script runs a fold per task:
#   sbatch --array=0-4 run-model.sbatch configs/densenet121.yaml data.val_fold=%a
OVERRIDES=()
for arg in "$@"; do
    OVERRIDES+=("${arg//%a/${SLURM_ARRAY_TASK_ID:-0}}")
    case "$arg" in train.run_dir=*) RUN_DIR=${arg#train.run_dir=} ;; esac
done
DEVICE=cpu
[ "$GPUS" -gt 0 ] && DEVICE=cuda
ARGS=(-m hpa_scc train "$CONFIG" "train.run_dir=$RUN_DIR" "train.device=$DEVICE" "${OVERRIDES[@]}")

plan_launch() {
    # Sets LAUNCH (the command) and MODE from the allocation; no side effects, so tests can call it.
    local nnodes=${SLURM_NNODES:-1} ntasks=${SLURM_NTASKS:-${SLURM_NNODES:-1}}
    local per_node=$(( (ntasks + nnodes - 1) / nnodes )) nproc=${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}
    local head port
    head=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)
    # one port per job, so two jobs sharing a node do not collide
    port=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
    if [ "$per_node" -gt 1 ] || { [ "$nnodes" -gt 1 ] && [ "$nproc" -eq 1 ]; }; then
        MODE="srun: $ntasks ranks, one per task"
        export MASTER_ADDR=${head:-127.0.0.1} MASTER_PORT=$port
        LAUNCH=(srun --kill-on-bad-exit=1 "${PYTHON[@]}" "${ARGS[@]}")
    elif [ "$nproc" -gt 1 ]; then
        MODE="torchrun: $nnodes node(s) x $nproc processes"
        # torchrun forwards SIGUSR1 to its workers only when asked, and waits for them to save.
        local torchrun=(-m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$nproc"
                        --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
                        --shutdown-timeout "${HPA_SCC_SHUTDOWN_S:-240}")
        if [ "$nnodes" -gt 1 ]; then
            torchrun+=(--rdzv-backend c10d --rdzv-endpoint "${head:-localhost}:$port" --rdzv-id "$JOB_ID")
            LAUNCH=(srun --ntasks-per-node=1 --ntasks="$nnodes" --kill-on-bad-exit=1 "${PYTHON[@]}" "${torchrun[@]}" "${ARGS[@]}")
        else
            LAUNCH=("${PYTHON[@]}" "${torchrun[@]}" --standalone "${ARGS[@]}")
        fi
    else
        MODE="one process"
        LAUNCH=("${PYTHON[@]}" "${ARGS[@]}")
    fi
}
plan_launch

echo "job $JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $MODE, device $DEVICE -> $RUN_DIR"
echo "+ ${LAUNCH[*]}"
# The trainer saves last.pt, writes RUN_DIR/preempted.json and exits 75 on SIGUSR1/SIGTERM;
# forward the batch shell's signal (sbatch --signal=B:USR1@300) to it, then requeue: the next
# start resumes from last.pt. (The marker's name is utils.checkpoint.PREEMPTED_FILE, which owns the
# run folder's names; a shell script cannot import it, so tests/test_launch.py checks they agree.)
rm -f "$RUN_DIR/preempted.json"
SIGNALLED=0
"${LAUNCH[@]}" &
CHILD=$!
trap 'echo "signal: asking the trainer to checkpoint"; SIGNALLED=1; kill -USR1 "$CHILD" 2>/dev/null' USR1 TERM
while true; do
    wait "$CHILD"
    STATUS=$?
    kill -0 "$CHILD" 2>/dev/null || break  # wait returned for the signal, not for the child's exit
done
if [ "$STATUS" -ne 75 ] && [ "$STATUS" -ne 0 ] && [ "$SIGNALLED" -eq 1 ] && [ -f "$RUN_DIR/preempted.json" ]; then
    # torchrun exits 1 when a signal ends its workers, even after they saved and exited 75
    echo "the launcher exited $STATUS after the trainer saved ($RUN_DIR/preempted.json): preempted"
    STATUS=75
fi
if [ "$STATUS" -eq 75 ]; then
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        echo "checkpoint saved; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "checkpoint saved in $RUN_DIR; run the same command again to resume"
    fi
fi
exit "$STATUS"
