"""The launch decision of scripts/slurm_train.sh, topology by topology, with stand-in `srun`,
`scontrol`, container runtimes and interpreter that record what they were given (the real
scheduler runs the same script in tests/test_slurm.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_train.sh"

# Every stand-in appends {"tool", "args", "env"} to $REC; scontrol answers 'show hostnames'.
# The interpreter stand-in can wait for USR1 like the trainer: then it writes preempted.json
# (as rank 0 does after saving last.pt) and exits with STANDIN_EXIT, as torchrun would (1).
STANDIN = r'''#!/usr/bin/env bash
python3 - "$(basename "$0")" "$@" <<'PY'
import json, os, sys
keys = ("MASTER_ADDR", "MASTER_PORT", "SRUN_CPUS_PER_TASK")
with open(os.environ["REC"], "a") as fh:
    fh.write(json.dumps({"tool": sys.argv[1], "args": sys.argv[2:],
                         "env": {k: os.environ[k] for k in keys if k in os.environ}}) + "\n")
PY
if [ "$(basename "$0")" = scontrol ] && [ "$1" = show ]; then printf 'n1\nn2\n'; fi
if [ "$(basename "$0")" = python ] && [ -n "${STANDIN_WAIT:-}" ]; then
    run_dir=$(printf '%s\n' "$@" | sed -n 's/^train.run_dir=//p')
    trap 'echo "{}" > "$run_dir/preempted.json"; exit "$STANDIN_EXIT"' USR1
    touch "$STANDIN_WAIT"
    while true; do sleep 0.1; done
fi
exit 0
'''

def outside_env() -> dict:
    """This process's environment without anything that would shape the launch."""
    keep = {"GPUS", "NPROC", "CUDA_VISIBLE_DEVICES", "HPA_SCC_SIF", "RUN_DIR"}
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "MASTER_")) and k not in keep}


@pytest.fixture
def bin_dir(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("srun", "scontrol", "python", "apptainer", "singularity"):
        (folder / tool).write_text(STANDIN)
        (folder / tool).chmod(0o755)
    return folder


def launch(tmp_path, bin_dir, env: dict, without=(), popen=False, overrides=("data.prepared_dir=/data/p",)):
    """Run the script as a job of this shape, from outside the repository (a config path falls back
    to the repository); returns (process, the stand-ins' records)."""
    for tool in without:
        (bin_dir / tool).unlink()
    rec = tmp_path / "rec.jsonl"
    rec.unlink(missing_ok=True)
    full = outside_env()
    full.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "REC": str(rec), "HPA_SCC_PYTHON": str(bin_dir / "python"),
                 "RUN_DIR": str(tmp_path / "run"), **env})
    args = ["bash", str(SCRIPT), "configs/smoke.yaml", *overrides]
    if popen:
        return subprocess.Popen(args, cwd=tmp_path, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True), rec
    proc = subprocess.run(args, cwd=tmp_path, env=full, capture_output=True, text=True, timeout=60)
    records = [json.loads(line) for line in rec.read_text().splitlines()] if rec.is_file() else []
    return proc, [r for r in records if r["tool"] != "scontrol"]


def job(nodes: int, tasks: int, gpus: int | None, **extra) -> dict:
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "t", "SLURM_NNODES": str(nodes), "SLURM_NTASKS": str(tasks),
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_CPUS_PER_TASK": "8"}
    if gpus is not None:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    return {**env, **extra}


TRAIN = ["-m", "hpa_scc", "train", str(REPO / "configs" / "smoke.yaml")]
TORCHRUN_SIGNALS = ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]

# (name, environment, expected launcher, the start of its arguments)
TOPOLOGIES = [
    ("cpu, outside slurm", {}, "python", TRAIN),
    ("1 node x 1 gpu", job(1, 1, 1), "python", TRAIN),
    ("1 node x 4 gpus, one task", job(1, 1, 4), "python",
     ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "4", *TORCHRUN_SIGNALS]),
    ("1 node x 4 tasks", job(1, 4, 4), "srun", ["--kill-on-bad-exit=1", "BIN/python", *TRAIN]),
    ("2 nodes x 4 gpus, one task each", job(2, 2, 4), "srun",
     ["--ntasks-per-node=1", "--ntasks=2", "--kill-on-bad-exit=1", "BIN/python", "-m", "torch.distributed.run",
      "--nnodes", "2", "--nproc-per-node", "4", *TORCHRUN_SIGNALS]),
    ("2 nodes x 1 gpu", job(2, 2, 1), "srun", ["--kill-on-bad-exit=1", "BIN/python", *TRAIN]),
    ("2 nodes x 4 tasks", job(2, 8, 4), "srun", ["--kill-on-bad-exit=1", "BIN/python", *TRAIN]),
    ("cpu, NPROC=2", job(1, 1, 0, NPROC="2"), "python",
     ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]),
    ("gpus without GRES", {**job(1, 1, None), "CUDA_VISIBLE_DEVICES": "0,1"}, "python",
     ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]),
]


@pytest.mark.parametrize("name,env,tool,start", TOPOLOGIES, ids=[t[0] for t in TOPOLOGIES])
def test_launch_decision(tmp_path, bin_dir, name, env, tool, start):
    proc, records = launch(tmp_path, bin_dir, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(records) == 1 and records[0]["tool"] == tool, records
    args = [a.replace(str(bin_dir), "BIN") for a in records[0]["args"]]
    assert args[:len(start)] == start, args
    # the trainer's own arguments always arrive whole: '-m hpa_scc train CONFIG' (torchrun once dropped '-m')
    i = args.index("hpa_scc")
    assert args[i - 1:i + 3] == ["-m", "hpa_scc", "train", str(REPO / "configs" / "smoke.yaml")], args
    gpus = int(env.get("SLURM_GPUS_ON_NODE", "2" if "CUDA_VISIBLE_DEVICES" in env else "0"))
    assert f"train.device={'cuda' if gpus else 'cpu'}" in args
    assert f"train.run_dir={tmp_path / 'run'}" in args and "data.prepared_dir=/data/p" in args
    if "torch.distributed.run" in args:
        nodes = int(env.get("SLURM_NNODES", "1"))
        assert ("--standalone" in args) == (nodes == 1)  # one node: a free port, no collision
        if nodes > 1:
            assert args[args.index("--rdzv-endpoint") + 1] == "n1:20007"  # port from the job id
    if tool == "srun":
        assert records[0]["env"]["SRUN_CPUS_PER_TASK"] == "8"  # Slurm >= 22.05 no longer passes it on
        if "torch.distributed.run" not in args:
            assert records[0]["env"]["MASTER_ADDR"] == "n1" and records[0]["env"]["MASTER_PORT"] == "20007"


def test_container_runtime_apptainer_first_then_singularity(tmp_path, bin_dir):
    env = {**job(1, 1, 1), "HPA_SCC_SIF": "/images/hpa.sif"}
    _, records = launch(tmp_path, bin_dir, env)
    assert records[0]["tool"] == "apptainer" and records[0]["args"][:3] == ["exec", "--nv", "--bind"]
    assert records[0]["args"][4:6] == ["/images/hpa.sif", "python"]
    _, records = launch(tmp_path, bin_dir, env, without=("apptainer",))
    assert records[0]["tool"] == "singularity"


def test_run_dir_override_is_where_the_script_looks(tmp_path, bin_dir):
    """A train.run_dir=... override wins over RUN_DIR, for the trainer and for the script."""
    other = tmp_path / "other"
    proc, records = launch(tmp_path, bin_dir, {}, overrides=(f"train.run_dir={other}",))
    assert proc.returncode == 0 and f"-> {other}" in proc.stdout, proc.stdout + proc.stderr
    assert records[0]["args"][-1] == f"train.run_dir={other}"  # after the script's own: it wins


@pytest.mark.parametrize("marker", [True, False])
def test_signal_requeues_only_when_the_trainer_saved(tmp_path, bin_dir, marker):
    """A launcher that exits 1 after a USR1 (torchrun does) is a preemption when the trainer wrote
    preempted.json: exit 75 and requeue. Without it, exit 1 and no requeue."""
    ready = tmp_path / "ready"
    (tmp_path / "run").mkdir()
    env = {**job(1, 1, 2), "STANDIN_WAIT": str(ready), "STANDIN_EXIT": "1"}
    if not marker:  # a launcher that dies of the signal without the trainer saving
        (bin_dir / "python").write_text(STANDIN.replace('echo "{}" > "$run_dir/preempted.json"; ', ""))
    proc, rec = launch(tmp_path, bin_dir, env, popen=True)
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    requeues = [json.loads(line) for line in rec.read_text().splitlines() if '"requeue"' in line]
    if marker:
        assert proc.returncode == 75 and "requeueing job 7" in out, out
        assert [r["args"] for r in requeues] == [["requeue", "7"]]
    else:
        assert proc.returncode == 1 and not requeues, out


def test_gpus_the_job_was_not_given_are_named(tmp_path, bin_dir):
    """A site that hands out GPUs without GRES: SLURM says 0, nvidia-smi sees some -> a warning, CPU."""
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'GPU 0: NVIDIA H100'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    proc, records = launch(tmp_path, bin_dir, job(1, 1, 0))
    assert proc.returncode == 0 and "SLURM gave none to the job" in proc.stderr and "set GPUS=N" in proc.stderr
    assert "train.device=cpu" in records[0]["args"]
    proc, records = launch(tmp_path, bin_dir, {**job(1, 1, 0), "GPUS": "2"})
    assert "train.device=cuda" in records[0]["args"] and "--nproc-per-node" in records[0]["args"]


def test_the_script_names_the_run_folders_preemption_marker():
    """The shell reads the marker the trainer writes by name: the name must be the run folder
    owner's (utils.checkpoint.PREEMPTED_FILE), or a requeue after a signal would never happen."""
    from hpa_scc.utils.checkpoint import PREEMPTED_FILE

    text = SCRIPT.read_text()
    uses = [line for line in text.splitlines() if "preempt" in line and ".json" in line and not line.startswith("#")]
    assert uses and all(f'$RUN_DIR/{PREEMPTED_FILE}' in line for line in uses), uses
