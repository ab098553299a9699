# Sourced by the batch scripts (scripts/slurm_train.sh, prepare.sbatch): what every job step needs,
# whatever the site. Expects REPO (the repository) to be set; sets PYTHON (an array).
#
#   HPA_SCC_SIF        container image to run in; unset: the repo's .venv
#   HPA_SCC_CONTAINER  apptainer or singularity (default: whichever is installed, apptainer first)
#   HPA_SCC_BIND       extra bind paths for the container (e.g. /data), comma separated
#   HPA_SCC_PYTHON     the interpreter outside a container (default: REPO/.venv/bin/python)

# Since Slurm 22.05 srun no longer inherits --cpus-per-task from the job: without this every
# rank gets one CPU and its data loader workers starve.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

if [ -n "${HPA_SCC_SIF:-}" ]; then
    CONTAINER=${HPA_SCC_CONTAINER:-$(command -v apptainer >/dev/null && echo apptainer || echo singularity)}
    PYTHON=("$CONTAINER" exec --nv --bind "$REPO${HPA_SCC_BIND:+,$HPA_SCC_BIND}" "$HPA_SCC_SIF" python)
else
    PYTHON=("${HPA_SCC_PYTHON:-$REPO/.venv/bin/python}")
fi
