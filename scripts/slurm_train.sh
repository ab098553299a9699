#!/usr/bin/env bash
# The body shared by run-model.sbatch and detectron_code/run-model.sbatch: train CONFIG with
# overrides on the GPUs of this allocation, resume from the run folder, requeue on a signal.
#
#   bash scripts/slurm_train.sh CONFIG [key=value ...]     (sourced by the sbatch files; also runs
#                                                           outside SLURM, as one process)
# Environment:
#   HPA_SCC_SIF   Singularity image to run in (singularity exec --nv); unset: the repo's .venv
#   HPA_SCC_BIND  extra bind paths for the container (e.g. /data), comma separated
#   RUN_DIR       run folder; default runs/<job name>-<job id>, so a requeued job finds its last.pt
#   GPUS          GPUs per node to use; default: what SLURM gave this node (0 = CPU)
#   NPROC         processes per node for torchrun; default: GPUS (at least 1)
# Launch: a job of several tasks (sbatch --ntasks=N / --ntasks-per-node=G) runs one rank per task
# through srun (ranks from SLURM_PROCID); a one-task job with several GPUs or nodes runs
# torchrun on each node with a rendezvous on the first; otherwise one plain process.
set -uo pipefail
REPO=${HPA_SCC_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$REPO" || exit 1
CONFIG=${1:?usage: slurm_train.sh CONFIG [key=value ...]}
shift

JOB_ID=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] && JOB_ID="${JOB_ID}_${SLURM_ARRAY_TASK_ID}"
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-train}-${JOB_ID}}
GPUS=${GPUS:-${SLURM_GPUS_ON_NODE:-0}}
NNODES=${SLURM_NNODES:-1}
NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}
NTASKS=${SLURM_NTASKS:-1}

if [ -n "${HPA_SCC_SIF:-}" ]; then
    PYTHON=(singularity exec --nv --bind "$REPO${HPA_SCC_BIND:+,$HPA_SCC_BIND}" "$HPA_SCC_SIF" python)
else
    PYTHON=("$REPO/.venv/bin/python")
fi
DEVICE=cpu
[ "$GPUS" -gt 0 ] && DEVICE=cuda
# '%a' in an override is the array task id, so one script runs a fold per task:
#   sbatch --array=0-4 run-model.sbatch configs/densenet121.yaml data.val_fold=%a
OVERRIDES=()
for arg in "$@"; do OVERRIDES+=("${arg//%a/${SLURM_ARRAY_TASK_ID:-0}}"); done
ARGS=(-m hpa_scc train "$CONFIG" "train.run_dir=$RUN_DIR" "train.device=$DEVICE" "${OVERRIDES[@]}")

HEAD=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)
if [ "$NTASKS" -gt 1 ]; then
    # One rank per SLURM task: hpa_scc.engine.distributed reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID.
    export MASTER_ADDR=${HEAD:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
    LAUNCH=(srun --kill-on-bad-exit=1 "${PYTHON[@]}" "${ARGS[@]}")
    NPROC=$NTASKS
elif [ "$NNODES" -gt 1 ] || [ "$NPROC" -gt 1 ]; then
    # One torchrun per node (srun), NPROC processes each, rendezvous on the first node.
    LAUNCH=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${PYTHON[@]}" -m torch.distributed.run
            --nnodes "$NNODES" --nproc-per-node "$NPROC" --rdzv-backend c10d --rdzv-endpoint "${HEAD:-localhost}:29500"
            --rdzv-id "$JOB_ID" "${ARGS[@]:1}")
else
    LAUNCH=("${PYTHON[@]}" "${ARGS[@]}")
fi

echo "job $JOB_ID restart ${SLURM_RESTART_COUNT:-0}: ${NNODES} node(s), ${NPROC} process(es) in all -> $RUN_DIR"
echo "+ ${LAUNCH[*]}"
# The trainer saves last.pt and exits 75 on SIGUSR1/SIGTERM; forward the batch shell's signal
# (sbatch --signal=B:USR1@300) to it, then requeue: the next start resumes from last.pt.
"${LAUNCH[@]}" &
CHILD=$!
trap 'echo "signal: asking the trainer to checkpoint"; kill -USR1 "$CHILD" 2>/dev/null' USR1 TERM
while true; do
    wait "$CHILD"
    STATUS=$?
    kill -0 "$CHILD" 2>/dev/null || break  # wait returned for the signal, not for the child's exit
done
if [ "$STATUS" -eq 75 ]; then
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        echo "checkpoint saved; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "checkpoint saved in $RUN_DIR; run the same command again to resume"
    fi
fi
exit "$STATUS"
