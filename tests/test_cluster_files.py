"""The cluster-facing files: Singularity.def, the sbatch scripts (outside a scheduler)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpa_scc.apps.prepare import prepare_dataset
from hpa_scc.data.synth import write_synth_set

REPO = Path(__file__).resolve().parents[1]


def definition_sections(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Singularity definition -> (header {key: value}, {section: body})."""
    header, sections, current = {}, {}, None
    for line in text.splitlines():
        match = re.match(r"^%(\w+)\s*$", line)
        if match:
            current = match[1]
            sections[current] = ""
        elif current is None:
            if ":" in line and not line.lstrip().startswith("#"):
                key, value = line.split(":", 1)
                header[key.strip()] = value.strip()
        else:
            sections[current] += line + "\n"
    return header, sections


def test_singularity_definition():
    header, sections = definition_sections((REPO / "Singularity.def").read_text())
    assert header["Bootstrap"] == "docker"
    assert re.fullmatch(r"pytorch/pytorch:2\.1[1-4]\.\d+-cuda[\d.]+-cudnn\d+-runtime", header["From"]), header["From"]
    assert {"files", "post", "runscript", "test", "environment", "help"} <= set(sections)
    # it installs exactly requirements.txt, then the package without other dependencies
    assert "requirements.txt /opt/hpa-scc/requirements.txt" in sections["files"]
    installs = [line.strip() for line in sections["post"].splitlines() if "pip install" in line]
    assert installs == ["python -m pip install --no-cache-dir -r /opt/hpa-scc/requirements.txt",
                        "python -m pip install --no-cache-dir --no-deps -e /opt/hpa-scc"]
    assert 'exec python -m hpa_scc "$@"' in sections["runscript"]
    assert "python -m hpa_scc --version" in sections["test"]
    for path in ("requirements.txt", "pyproject.toml", "src", "configs"):
        assert (REPO / path).exists()


def test_sbatch_headers():
    for path in (REPO / "run-model.sbatch", REPO / "detectron_code" / "run-model.sbatch"):
        text = path.read_text()
        assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "slurm_train.sh")]).returncode == 0
    proc = subprocess.run(["bash", str(REPO / "detectron_code" / "run-model.sbatch"), "vgg16"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "use resnet101, resnext101" in proc.stderr


def test_one_backbone_table_for_the_fpn_runs():
    """detectron_code/main.py owns backbone -> config; the sbatch file asks it and names no config."""
    main = REPO / "detectron_code" / "main.py"
    ask = lambda name, task=None: subprocess.run(  # noqa: E731
        [sys.executable, str(main), "--config-path", name], capture_output=True, text=True,
        env={**os.environ, **({"SLURM_ARRAY_TASK_ID": task} if task else {})})
    assert ask("resnet101").stdout.strip() == str(REPO / "configs" / "resnet101_fpn.yaml")
    assert ask("both", "1").stdout.strip() == str(REPO / "configs" / "resnext101_32x8d_fpn.yaml")
    assert ask("both", "0").stdout.strip() == str(REPO / "configs" / "resnet101_fpn.yaml")
    wrong = ask("both", "2")
    assert wrong.returncode == 2 and "array task 2 has no backbone" in wrong.stderr
    for name in ("resnet101_fpn.yaml", "resnext101_32x8d_fpn.yaml"):
        assert (REPO / "configs" / name).is_file()
        assert name not in (REPO / "detectron_code" / "run-model.sbatch").read_text()


@pytest.mark.slow
def test_sbatch_script_trains_checkpoints_on_usr1_and_resumes(tmp_path):
    """Outside SLURM the script runs one process; USR1 to it -> last.pt mid-epoch, exit 75; rerun finishes."""
    write_synth_set(tmp_path / "set", 6, size=256, seed=41, progress=False)
    prepare_dataset(tmp_path / "set", tmp_path / "prepared", size=128, n_folds=2, progress=False)
    run = tmp_path / "run"
    env = {**os.environ, "RUN_DIR": str(run), "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    args = ["bash", str(REPO / "run-model.sbatch"), "configs/smoke.yaml", f"data.prepared_dir={tmp_path / 'prepared'}",
            "data.image_size=128", "train.images_per_gpu=1", "train.max_iters_per_epoch=4", "data.max_val_images=1",
            "-q"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.is_file() and '"train"' in metrics.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out
    assert "checkpoint saved" in out
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["epoch"] == 0 and 1 <= state["step_in_epoch"] < 4
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    final = torch.load(run / "last.pt", weights_only=False)
    assert final["epoch"] == 2 and final["global_step"] == 8
