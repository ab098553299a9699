"""Every benchmark that fits this machine, one table, one JSON.

    .venv/bin/python bench/run.py                        # CPU profile: minutes on a laptop or this 2-core box
    python bench/run.py --profile gpu --out results.json # GPU profile (what bench/gpu.sh runs on an H100)
    .venv/bin/python bench/run.py --only loader evaluate # a subset

Each benchmark runs as its own process (bench/<name>.py --json ...), so one that fails or runs
out of time is reported as such and the others still run; a Mask R-CNN process also gives its
memory back. The profile picks the sizes: ``cpu`` keeps every figure to a few minutes on two
cores (training at 512 px with one image per step), ``gpu`` measures what issue targets name
(512 px, batch 8, fast path vs plain fp32, the training loader with 8 workers, a 559-image test
set). Writes the table and every benchmark's own JSON into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (arguments per profile, timeout in s per profile)
PROFILES: dict[str, dict[str, tuple[list[str], int]]] = {
    "cpu": {
        "loader": (["--images", "16", "--seconds", "3", "--workers", "2"], 600),
        "segmentation": ([], 900),
        "train_step": (["--size", "512", "--batch", "1", "--steps", "2", "--warmup", "1", "--mode", "plain"], 1200),
        "predict": (["--images", "4", "--test-set", "8", "--workers", "2", "--batch-size", "2"], 900),
        "evaluate": ([], 900),
    },
    "gpu": {
        "train_step": (["--device", "cuda", "--size", "512", "--batch", "8", "--steps", "15", "--warmup", "5",
                        "--mode", "both"], 300),
        "loader": (["--images", "32", "--seconds", "5", "--workers", "8", "--batch", "8"], 150),
        "predict": (["--images", "16", "--test-set", "559", "--workers", "16", "--batch-size", "16"], 240),
        "evaluate": ([], 120),
        "segmentation": ([], 120),
    },
}


def run_one(name: str, args: list[str], timeout: int, out_dir: Path) -> dict:
    """Run bench/<name>.py with --json; its figures, or why there are none."""
    json_path = out_dir / f"{name}.json"
    json_path.unlink(missing_ok=True)
    log_path = out_dir / f"{name}.log"
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(json_path)]
    print(f"--- {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timeout after {timeout} s"
    seconds = time.perf_counter() - start
    tail = log_path.read_text(errors="replace").splitlines()[-12:]
    print("\n".join(line for line in tail if "it/s]" not in line and "s/it]" not in line), flush=True)
    figures = json.loads(json_path.read_text()) if json_path.is_file() else None
    if figures is None and status == "ok":
        status = "no figures written"
    return {"status": status, "seconds": round(seconds, 1), "figures": figures, "log": str(log_path)}


def summary_rows(results: dict) -> list[tuple[str, str, str]]:
    """(what, figure, target) rows from the benchmarks' JSON."""
    rows = []

    def get(name):
        r = results.get(name)
        return r["figures"] if r and r["figures"] else None

    if f := get("loader"):
        rows.append((f"loader, {f['source_size']} px PNG -> {f['size']} px, per-sample PNG decode (1 core)",
                     f"{f['png_images_per_s']:.2f} img/s", ""))
        rows.append((f"loader, {f['size']} px uint8 cache (1 core)", f"{f['cache_images_per_s']:.0f} img/s",
                     f"ratio {f['ratio']:.0f}x (>= 50x)"))
        if "train_loader_images_per_s" in f:
            rows.append((f"training loader, {f['train_loader_workers']} workers (masks, augmentation)",
                         f"{f['train_loader_images_per_s']:.0f} img/s", ">= 2x training img/s"))
    if f := get("segmentation"):
        rows.append(("builtin segmentation, 2048 px image (1 core)", f"{f['speed']['seconds_mean']:.3f} s",
                     f"<= {f['targets']['seconds_per_image']} s"))
    if f := get("train_step"):
        for r in f["rows"]:
            peak = f", peak {r['peak_gpu_gib']:.1f} GiB" if r.get("peak_gpu_gib") is not None else ""
            speedup = f", {r['train_speedup_vs_plain']:.2f}x plain" if "train_speedup_vs_plain" in r else ""
            rows.append((f"train {r['backbone']} {f['size']} px b{f['batch']} {r['mode']}",
                         f"{r['train_images_per_s']:.2f} img/s{speedup}{peak}", ""))
            rows.append((f"infer {r['backbone']} {f['size']} px b{f['batch']} {r['mode']}",
                         f"{r['infer_images_per_s']:.2f} img/s", ""))
    if f := get("predict"):
        rows.append((f"predict CPU part (read, segment, encode) per {f['size']} px image, 1 process",
                     f"{f['cpu_s_per_image']:.3f} s", ""))
        rows.append((f"predict model part ({f['backbone']} {f['model_size']} px)",
                     f"{f['model_images_per_s']:.2f} img/s", ""))
        rows.append((f"predict end to end, {f['test_set']} images, {f['workers']} workers",
                     f"{f['end_to_end_s']:.1f} s ({f['end_to_end_images_per_s']:.2f} img/s)",
                     "559 images <= 180 s on an H100 + 16 cores"))
        rows.append((f"  estimate for 559 images ({f['estimate_for']})", f"{f['estimate_559_s']:.0f} s", "<= 180 s"))
    if f := get("evaluate"):
        rows.append((f"metric, {f['images']} images x {f['detections']} detections (1 core)",
                     f"{f['seconds']:.2f} s", "< 10 s"))
    for name, r in results.items():
        if r["status"] != "ok":
            rows.append((f"{name}: {r['status']}", "-", f"see {r['log']}"))
    return rows


def format_table(rows: list[tuple[str, str, str]]) -> str:
    width = max((len(r[0]) for r in rows), default=10) + 2
    fig = max((len(r[1]) for r in rows), default=6) + 2
    lines = [f"{'benchmark':<{width}}{'figure':<{fig}}target", "-" * (width + fig + 20)]
    lines += [f"{a:<{width}}{b:<{fig}}{c}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="sizes to run (default: gpu when CUDA is visible, else cpu)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help=f"run only these benchmarks ({', '.join(PROFILES['cpu'])})")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for the JSON and logs")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                        help="extra arguments for one benchmark, e.g. --extra 'train_step=--compile'")
    args = parser.parse_args(argv)
    profile = args.profile
    if profile is None:
        try:
            import torch

            profile = "gpu" if torch.cuda.is_available() else "cpu"
        except ImportError:
            profile = "cpu"
    plan = PROFILES[profile]
    unknown = set(args.only or []) - set(plan)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {sorted(plan)}")
    extra: dict[str, list[str]] = {}
    for item in args.extra:
        name, _, rest = item.partition("=")
        extra.setdefault(name, []).extend(rest.split())
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, (bench_args, timeout) in plan.items():
        if args.only and name not in args.only:
            continue
        results[name] = run_one(name, [*bench_args, *extra.get(name, [])], timeout, args.out)
    rows = summary_rows(results)
    table = format_table(rows)
    header = (f"{platform.node()}: {platform.machine()}, {os.cpu_count()} cores, profile {profile}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"\n{header}\n{table}")
    report = {"machine": header, "profile": profile, "results": results, "table": rows}
    with tempfile.NamedTemporaryFile("w", dir=args.out, suffix=".tmp", delete=False) as tmp:
        json.dump(report, tmp, indent=2)
    os.replace(tmp.name, args.out / "results.json")
    (args.out / "table.txt").write_text(f"{header}\n{table}\n")
    print(f"\n-> {args.out / 'results.json'}, {args.out / 'table.txt'}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
