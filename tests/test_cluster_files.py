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
    assert header["Bootstrap"] == "docker" and header["From"] == "{{ BASE }}"
    assert {"arguments", "files", "post", "runscript", "test", "environment", "help"} <= set(sections)
    args = dict(line.strip().split("=", 1) for line in sections["arguments"].splitlines() if line.strip())
    assert re.fullmatch(r"pytorch/pytorch:2\.1[1-4]\.\d+-cuda[\d.]+-cudnn\d+-runtime", args["BASE"]), args["BASE"]
    assert args["EXTRAS"] == "--hpacellseg"  # hpacellseg in the image; detectron2 on request
    # the one set-up script of the README, into the image's python, from GitHub
    post = [line.strip() for line in sections["post"].splitlines()]
    assert "cd /opt/hpa-scc && PYTHON=python HPA_SCC_WHEELS=github bash scripts/setup.sh --system {{ EXTRAS }}" in post
    assert not [line for line in post if "pip install" in line]
    copied = [line.split()[0] for line in sections["files"].splitlines() if line.strip()]
    for path in copied:
        assert (REPO / path).exists(), path
    assert {"requirements.txt", "requirements-hpacellseg.txt", "scripts/setup.sh", "src", "configs"} <= set(copied)
    assert 'exec python -m hpa_scc "$@"' in sections["runscript"]
    assert "python -m hpa_scc --version" in sections["test"] and "import hpacellseg" in sections["test"]
    assert "cuda12.6" in sections["help"]  # the build for V100/P100 nodes is documented


def test_setup_script_options(tmp_path):
    """setup.sh: --help, an unknown option, a wheel folder without the wheel (before any install),
    and --system into a given interpreter (here the venv's own, where all is installed already)."""
    setup = REPO / "scripts" / "setup.sh"
    run = lambda *args, **env: subprocess.run(["bash", str(setup), *args], capture_output=True, text=True,  # noqa: E731
                                              env={**os.environ, **env}, timeout=600)
    shown = run("--help")
    assert shown.returncode == 0 and "--hpacellseg --detectron2" in shown.stdout and "set -e" not in shown.stdout
    wrong = run("--cellpose")
    assert wrong.returncode == 2 and "unknown option --cellpose" in wrong.stderr
    empty = run("--hpacellseg", HPA_SCC_WHEELS=str(tmp_path))
    assert empty.returncode == 1
    assert f"no hpacellseg wheel in {tmp_path}; put one there, or set HPA_SCC_WHEELS=github" in empty.stderr
    (tmp_path / "wheels").mkdir()
    relative = subprocess.run(["bash", str(setup), "--detectron2"], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "HPA_SCC_WHEELS": "wheels"}, timeout=600)
    assert relative.returncode == 1 and f"no detectron2 wheel in {tmp_path / 'wheels'};" in relative.stderr  # where it was run
    absent = run("--hpacellseg", HPA_SCC_WHEELS=str(tmp_path / "nope"))
    assert absent.returncode == 1 and f"HPA_SCC_WHEELS={tmp_path / 'nope'}: no such folder" in absent.stderr
    system = run("--system", PYTHON=sys.executable)
    assert system.returncode == 0, system.stderr
    assert f"installing the project into {sys.executable}" in system.stdout


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
    alone = ask("both")  # outside an array job: refused, not resnet101 in silence
    assert alone.returncode == 2 and "sbatch --array=0-1 detectron_code/run-model.sbatch both" in alone.stderr
    for name in ("resnet101_fpn.yaml", "resnext101_32x8d_fpn.yaml"):
        assert (REPO / "configs" / name).is_file()
        assert name not in (REPO / "detectron_code" / "run-model.sbatch").read_text()


@pytest.mark.slow
def test_sbatch_script_trains_checkpoints_on_usr1_and_resumes(tmp_path):
    """Outside SLURM the script runs one process; USR1 to it -> last.pt mid-epoch, exit 75; rerun finishes."""
    from hpa_scc.apps.prepare import prepare_dataset
    from hpa_scc.data.synth import write_synth_set

    write_synth_set(tmp_path / "set", 6, size=256, seed=41, progress=False)
    prepare_dataset(tmp_path / "set", tmp_path / "prepared", size=128, n_folds=2, progress=False)
    prepared = tmp_path / "prepared"
    run = tmp_path / "run"
    env = {**os.environ, "RUN_DIR": str(run), "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    args = ["bash", str(REPO / "run-model.sbatch"), "configs/smoke.yaml", f"data.prepared_dir={prepared}",
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


def test_prepare_sbatch_wants_a_gpu_for_hpacellseg(tmp_path):
    """prepare.sbatch outside a scheduler: hpacellseg without a GPU in the job stops with the
    sbatch line to use; with a GPU (or HPA_SCC_ALLOW_CPU=1), or with the builtin segmenter, it
    runs prepare (which here stops on the missing data folder, naming it)."""
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS")}
    run = lambda *args, **env: subprocess.run(  # noqa: E731
        ["bash", str(REPO / "prepare.sbatch"), str(tmp_path / "none"), str(tmp_path / "out"), *args],
        capture_output=True, text=True, env={**base, **env}, timeout=120)
    refused = run("--segmenter", "hpacellseg")
    assert refused.returncode == 2 and "submit it with 'sbatch --gpus=1 prepare.sbatch ...'" in refused.stderr
    assert run("--segmenter=hpacellseg").returncode == 2
    for args, env in ((("--segmenter", "hpacellseg"), {"SLURM_GPUS_ON_NODE": "1"}),
                      (("--segmenter", "hpacellseg"), {"HPA_SCC_ALLOW_CPU": "1"}),
                      (("--segmenter", "builtin"), {})):
        ran = run(*args, **env)
        assert ran.returncode == 1 and f"data folder {tmp_path / 'none'} does not exist" in ran.stderr, ran.stderr


def github_archive(gh: Path, repo: str, commit: str, wheel: Path, setup_py: str) -> None:
    """GitHub's archive of ``repo`` at ``commit`` (one top folder REPO-COMMIT/), made from the
    package files of ``wheel`` (the upstream sources, unmodified) and ``setup_py``."""
    import zipfile

    top = f"{repo.split('/')[1]}-{commit}"
    archive = gh / repo / "archive" / f"{commit}.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(archive, "w") as out:
        for name in src.namelist():
            if ".dist-info/" not in name:
                out.writestr(f"{top}/{name}", src.read(name))
        out.writestr(f"{top}/setup.py", setup_py)


@pytest.mark.slow
def test_setup_installs_hpacellseg_from_github_archives(tmp_path):
    """The users' path (HPA_SCC_WHEELS=github), with GitHub's archive URLs served from a file://
    copy (HPA_SCC_GITHUB): hpacellseg and pytorch_zoo built from the archives at the pinned
    commits, pytorch_zoo's setup.py (no 'import setuptools', as upstream) patched, into a fresh
    interpreter (--system, as in the container). detectron2's archive is not tried: it compiles
    for minutes."""
    wheels = REPO.parent / "shared" / "wheels"
    if not list(wheels.glob("hpacellseg-*.whl")):
        pytest.skip(f"no hpacellseg wheel in {wheels} to make the archives from")
    script = (REPO / "scripts" / "setup.sh").read_text()
    commit = lambda name: re.search(rf"^{name}_COMMIT=(\w+)", script, re.M)[1]  # noqa: E731
    gh = tmp_path / "gh"
    github_archive(gh, "CellProfiling/HPA-Cell-Segmentation", commit("HPACELLSEG"), next(wheels.glob("hpacellseg-*.whl")),
                   "import setuptools\nsetuptools.setup(name='hpacellseg', version='0.1.8', packages=['hpacellseg'],\n"
                   "                 package_data={'hpacellseg': ['VERSION']})\n")
    github_archive(gh, "haoxusci/pytorch_zoo", commit("PYTORCH_ZOO"), next(wheels.glob("pytorch_zoo-*.whl")),
                   "from setuptools import find_packages\n\n"  # upstream's bug: setuptools itself never imported
                   "setuptools.setup(name='pytorch_zoo', version='0.0.0', packages=find_packages())\n")
    # A fresh interpreter that sees this venv's packages (torch and the rest: no reinstall) behind its own.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    own = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip())
    import sysconfig
    (own / "hpa-scc-test.pth").write_text(sysconfig.get_path("purelib") + "\n")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "--system", "--hpacellseg"], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHON": str(venv / "bin" / "python"),
                                                       "HPA_SCC_WHEELS": "github", "HPA_SCC_GITHUB": gh.as_uri()})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "installing hpacellseg (from github)" in proc.stdout
    # installed into the fresh interpreter itself, from the archives (not found in this venv behind it)
    assert (own / "hpacellseg" / "cellsegmentator.py").is_file() and (own / "hpacellseg" / "VERSION").is_file()
    assert (own / "pytorch_zoo" / "unet.py").is_file()
    assert {p.name.split("-")[0] for p in own.glob("*.dist-info")} >= {"hpacellseg", "pytorch_zoo"}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import hpacellseg, pytorch_zoo.unet; "
                            "print('AT', hpacellseg.__file__); print('AT', pytorch_zoo.unet.__file__)"],
                           capture_output=True, text=True, timeout=300)
    found = [line.split(" ", 1)[1] for line in where.stdout.splitlines() if line.startswith("AT ")]  # pytorch_zoo prints too
    assert where.returncode == 0 and len(found) == 2 and all(f.startswith(f"{own}/") for f in found), (own, where.stdout)
