"""The whole flow at scale on a SLURM cluster, with the commands a user types, each stage timed.

    bash scripts/slurm_local.sh start /tmp/hpa-slurm && export SLURM_CONF=/tmp/hpa-slurm/slurm.conf
    .venv/bin/python bench/scale_flow.py --images 3000 --tasks 4 --work runs/scale-flow --json flow.json

Stages (job arrays spread over the cluster's nodes; a merge job after each array):
  synth       N training and N/8 test images (512 px), the built-in synthetic generator
  prepare     sbatch --array prepare.sbatch DATA PREP --size S --folds 5, then the same with --merge
  cell-store  sbatch --array: python -m hpa_scc cell-store PREP --kind features, then --merge
  train-feat  sbatch run-model.sbatch configs/cell_features.yaml (the per-cell features model)
  train-ddp   sbatch --nodes=2 run-model.sbatch configs/densenet121.yaml, DDP over both nodes for
              --steps steps (gloo on CPU)
  refine      sbatch --array: python -m hpa_scc refine RUN PREP --name r1 ..., then --merge
  predict     sbatch --array: python -m hpa_scc predict RUN TEST --out PRED, then --merge
  evaluate    python -m hpa_scc evaluate --solution TEST/solution.csv --submission PRED/submission.csv
Prints a table of each stage's wall time (submission to the end of its last job) and writes the
figures as JSON with --json. Needs a cluster that answers ``sinfo``; stops at the first failed job,
naming its log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python")
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def sbatch(args: list[str], logs: Path, name: str) -> str:
    pattern = "%A_%a" if any(a.startswith("--array") for a in args) else "%j"
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", f"--job-name={name}",
           f"--output={logs}/{name}-{pattern}.out", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr}")
    return proc.stdout.strip().split(";")[0]


def states(jid: str) -> list[str]:
    out = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True).stdout
    return re.findall(r"JobState=(\w+)", out)


def wait(jid: str, logs: Path, name: str) -> None:
    while True:
        got = states(jid)
        if got and all(s in DONE for s in got):
            if any(s != "COMPLETED" for s in got):
                tails = "\n".join(p.read_text()[-1500:] for p in sorted(logs.glob(f"{name}-*.out")))
                raise RuntimeError(f"stage {name}: job {jid} ended {got}; logs {logs}/{name}-*.out:\n{tails}")
            return
        time.sleep(1)


def stage(name: str, rows: list, run) -> None:
    start = time.perf_counter()
    extra = run() or {}
    rows.append({"stage": name, "wall_s": time.perf_counter() - start, **extra})
    print(f"{name}: {rows[-1]['wall_s']:.1f} s {extra or ''}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000, help="training images (default: 1000)")
    p.add_argument("--tasks", type=int, default=4, help="tasks per job array (default: 4)")
    p.add_argument("--size", type=int, default=256, help="prepare --size (default: 256)")
    p.add_argument("--steps", type=int, default=20, help="DDP training steps (default: 20)")
    p.add_argument("--work", default="runs/scale-flow", help="work folder (default: runs/scale-flow)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if not shutil.which("sbatch"):
        sys.exit("no SLURM client tools: bash scripts/slurm_local.sh install && bash scripts/slurm_local.sh start DIR")
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True)
    data, test, prep, runs, pred = work / "data", work / "test", work / "prepared", work / "runs", work / "pred"
    array = [f"--array=0-{args.tasks - 1}", "--cpus-per-task=1", "--mem=2G"]
    hpa = [PYTHON, "-m", "hpa_scc"]
    rows: list[dict] = []

    def run_local(*cmd):
        subprocess.run([*hpa, *cmd, "-q"], cwd=REPO, check=True, capture_output=True)

    def array_then_merge(name: str, array_args: list[str], merge_args: list[str]):
        def go():
            jid = sbatch(array + array_args, logs, name)
            wait(jid, logs, name)
            jid = sbatch(["--cpus-per-task=2", "--mem=4G"] + merge_args, logs, f"{name}-merge")
            wait(jid, logs, f"{name}-merge")
        return go

    def wrap(*cmd: str) -> list[str]:
        return ["--wrap", " ".join([*hpa, *cmd, "-q"])]

    def synth():
        run_local("synth", str(data), "--images", str(args.images), "--size", "512", "--seed", "0", "--workers", "2")
        run_local("synth", str(test), "--images", str(max(args.images // 8, 8)), "--size", "512", "--seed", "1000",
                  "--workers", "2")

    stage("synth", rows, synth)
    prep_args = [str(data), str(prep), "--size", str(args.size), "--folds", "5"]
    stage("prepare", rows, array_then_merge("prepare", ["prepare.sbatch", *prep_args],
                                            ["prepare.sbatch", *prep_args, "--merge"]))
    stage("cell-store", rows, array_then_merge("cellstore", wrap("cell-store", str(prep), "--kind", "features"),
                                               wrap("cell-store", str(prep), "--kind", "features", "--merge")))

    def train(name: str, sbatch_args: list[str], config: str, *overrides: str):
        def go():
            jid = sbatch(sbatch_args + ["run-model.sbatch", config, f"data.prepared_dir={prep}",
                                        f"train.run_dir={runs / name}", "train.tensorboard=false", *overrides],
                         logs, name)
            wait(jid, logs, name)
        return go

    stage("train-feat", rows, train("feat", ["--cpus-per-task=2", "--mem=8G"], "configs/cell_features.yaml"))
    stage("train-ddp", rows, train("ddp", ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--mem=6G"],
                                   "configs/densenet121.yaml", "train.max_epochs=1",
                                   f"train.max_iters_per_epoch={args.steps}", "train.images_per_gpu=2",
                                   "data.workers=1", "data.max_val_images=8"))
    refine = ["refine", str(runs / "feat"), str(prep), "--name", "r1", "--held-out-folds", "0", "--threshold", "0",
              "--relative", "0.25"]
    stage("refine", rows, array_then_merge("refine", wrap(*refine), wrap(*refine, "--merge")))
    predict = ["predict", str(runs / "feat"), str(test), "--out", str(pred), "--workers", "1"]
    stage("predict", rows, array_then_merge("predict", wrap(*predict), wrap("predict", "-", str(test), "--out",
                                                                                  str(pred), "--merge")))

    def evaluate():
        out = subprocess.run([*hpa, "evaluate", "--solution", str(test / "solution.csv"), "--submission",
                              str(pred / "submission.csv"), "-q"], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout
        return {"mAP": float(out.strip().splitlines()[-1].split()[-1])}

    stage("evaluate", rows, evaluate)
    import numpy as np

    cells = len(np.load(prep / "crops" / "features.cells.npy"))
    figures = {"images": args.images, "test_images": max(args.images // 8, 8), "tasks": args.tasks,
               "size": args.size, "ddp_steps": args.steps, "nodes": 2, "cpus": os.cpu_count(), "stages": rows,
               "total_s": sum(r["wall_s"] for r in rows), "cells": cells}
    print("\n| stage | wall s |\n| --- | --- |")
    for r in rows:
        print(f"| {r['stage']} | {r['wall_s']:.1f} |")
    print(f"| total | {figures['total_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
