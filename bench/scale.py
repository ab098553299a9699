"""Scale rehearsal: the data path at 1k, 10k, 100k images, per stage: wall time, peak memory,
loader workers' unique memory, disk bytes and files per image, and the growth laws.

    .venv/bin/python bench/scale.py                                  # N = 1,000 and 10,000 (~10 min, 2 cores)
    .venv/bin/python bench/scale.py --sizes 1000,10000,100000 --work /scratch/scale   # + 100k (~1 h)
    .venv/bin/python bench/scale.py --json docs/scale.json           # the figures as JSON too

How the sets are made (said in the output too): ``--base`` distinct synthetic images at
``--source-size`` px are made and prepared once, for real (builtin segmenter, ``--size`` px,
5 folds). A set of N images replicates them under new IDs: hard links to the channel PNGs, the
cached ``.npy`` and the segmentation PNGs, each per-image record copied with its new ID (what a
prepare shard writes), then the real ``prepare --merge`` writes folds.csv, the COCO files and
their annotation stores. Pixels repeat every ``--base`` images; cell counts, RLE sizes, files
and records are what prepare makes for such images.

Each stage runs in a fresh process (its peak RSS is its own, imports included):
  merge      ``prepare --merge``: folds, COCO files and stores from N records
  open       the training set of the default config (``CellInstances``, folds 1-4, multilabel):
             from the memory-mapped stores, and from the COCO JSON as the code before the stores
             read it (Python dicts per cell), side by side
  loader     one pass over that set, 2 workers, batch 8: each worker's unique memory (USS) at its
             first and last batch, stores against dicts
  first_step ``train`` (DenseNet121 Mask R-CNN, random init, 1 core, no loader workers): seconds
             from the call to the end of the first optimiser step
  features   the per-cell features table (``features`` family) of the first ``--cell-images`` images
  predict    ``predict --baseline image-labels --segmenter precomputed``: cells read and encoded,
             records written and merged into submission.csv
  evaluate   the competition metric on that submission (scored against itself: mAP must be 1)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FOLDS = 5


def vm(field: str) -> float:
    """A /proc/self/status field (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def uss_mb() -> tuple[float, float]:
    """This process's unique memory in MB: (USS: private pages, clean and dirty; dirty alone).

    Clean private pages include the file pages a worker has memory-mapped and read (the stores,
    the image cache) that no other process maps: page cache, shared with the next reader and
    dropped under pressure. Dirty private pages are its own copies: heap, and the pages of
    fork-shared Python objects that reference counting wrote to."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            key, value = line.split()[:2]
            fields[key] = int(value) / 1024
    return fields["Private_Clean:"] + fields["Private_Dirty:"], fields["Private_Dirty:"]


# --- making the sets ------------------------------------------------------------------------------
def make_base(work: Path, n_base: int, source_size: int, size: int) -> tuple[Path, Path]:
    """``n_base`` synthetic images, prepared for real once (reused by later runs of the bench)."""
    from hpa_scc.apps.prepare import prepare_dataset
    from hpa_scc.data.synth import write_synth_set

    data, prepared = work / "base" / "data", work / "base" / "prepared"
    if not (prepared / "folds.csv").is_file():
        shutil.rmtree(work / "base", ignore_errors=True)
        write_synth_set(data, n_base, size=source_size, seed=0, workers=2, progress=False)
        prepare_dataset(data, prepared, size=size, n_folds=FOLDS, workers=2, progress=False)
    return data, prepared


def fabricate(base_data: Path, base_prepared: Path, out: Path, n: int) -> tuple[Path, Path]:
    """A data folder and a prepared folder of ``n`` images replicating the base ones under new IDs
    (hard links for pixels and masks, records copied with the new ID), merged by the real
    ``prepare --merge``'s per-image inputs. Returns (data, prepared), not yet merged."""
    from hpa_scc.constants import CHANNELS, format_labels
    from hpa_scc.data.cache import cache_path
    from hpa_scc.data.images import find_images, seg_paths
    from hpa_scc.data.prepared import PreparedSet, record_path

    source = PreparedSet(base_prepared)
    base = [r for r in find_images(base_data) if source.record_path(r.image_id).is_file()]
    records = {r.image_id: json.loads(source.record_path(r.image_id).read_text()) for r in base}
    data, prepared = out / "data", out / "prepared"
    shutil.rmtree(out, ignore_errors=True)
    (data / "train").mkdir(parents=True)
    (prepared / "cache").mkdir(parents=True)
    fanout = source.fanout

    def link(src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
    shutil.copy(base_prepared / "prepare.json", prepared / "prepare.json")
    for extra in base_prepared.joinpath("cache").glob("*.json"):
        shutil.copy(extra, prepared / "cache" / extra.name)
    rows = ["ID,Label"]
    for j in range(n):
        src = base[j % len(base)]
        new = f"s{j:07d}"
        rows.append(f"{new},{format_labels(src.labels)}")
        for ch in CHANNELS:
            os.link(src.folder / f"{src.image_id}_{ch}.png", data / "train" / f"{new}_{ch}.png")
        link(source.image_path(src.image_id), cache_path(prepared / "cache", new, fanout))
        for a, b in zip(seg_paths(base_prepared / "segmentation", src.image_id, fanout),
                        seg_paths(prepared / "segmentation", new, fanout), strict=True):
            link(a, b)
        rec = {**records[src.image_id], "image_id": new}
        rec.pop("true_labels", None), rec.pop("true_cell", None)  # the copies are not a synthetic set
        path = record_path(prepared, new, fanout)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, separators=(",", ":")))
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    return data, prepared


def disk(prepared: Path) -> dict:
    """Bytes and files per part of a prepared set, every hard link counted (what a real set holds)."""
    parts: dict[str, list[int]] = {}
    for path in prepared.rglob("*"):
        if path.is_file():
            rel = path.relative_to(prepared)
            key = ("stores" if path.suffix == ".store" else "coco json" if path.suffix == ".json" and
                   rel.parts[0].startswith("coco") else rel.parts[0] if len(rel.parts) > 1 else "top")
            bucket = parts.setdefault(key, [0, 0])
            bucket[0] += path.stat().st_size
            bucket[1] += 1
    return {k: {"bytes": b, "files": f} for k, (b, f) in sorted(parts.items())}


# --- the stages (each runs in its own process) --------------------------------------------------
class DictInstances:
    """The training set as the code before the annotation stores held it: the COCO JSON of the
    folds in Python dicts, one per cell, grouped per image (for the side-by-side figures)."""

    def __init__(self, prepared, folds):
        from hpa_scc.data.prepared import PreparedSet

        self.prepared = PreparedSet(prepared)
        coco = self.prepared.read_folds("multilabel", folds)
        by_image: dict[int, list[dict]] = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        self.images = [img for img in coco["images"] if by_image.get(img["id"])]
        self.annotations = by_image

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        import torch
        from pycocotools import mask as coco_mask

        from hpa_scc.data.instances import masks_to_boxes

        info = self.images[index]
        pixels = torch.from_numpy(np.array(self.prepared.read_image(info["image_name"])))
        anns = self.annotations[info["id"]]
        masks = torch.from_numpy(coco_mask.decode([a["segmentation"] for a in anns])).permute(2, 0, 1).contiguous()
        vectors = torch.tensor([a["label_vector"] for a in anns], dtype=torch.float32)
        return pixels, {"image_id": info["id"], "masks": masks, "boxes": masks_to_boxes(masks),
                        "label_vectors": vectors}


def train_set(prepared: Path, kind: str):
    from hpa_scc.data.instances import CellInstances

    folds = list(range(1, FOLDS))  # data.val_fold=0, the default: folds 1-4 train
    return DictInstances(prepared, folds) if kind == "dicts" else CellInstances(prepared, folds, uint8=True)


def _collate_uss(batch):
    """Runs in the worker: the batch as train collates it, and the worker's id and USS now."""
    import torch.utils.data

    from hpa_scc.data.instances import collate

    info = torch.utils.data.get_worker_info()
    return collate(batch), (info.id if info else -1, uss_mb())


def stage(name: str, args: argparse.Namespace) -> dict:
    prepared, data = Path(args.prepared), Path(args.data)
    if name.startswith(("open", "loader", "first_step")):
        import torch  # noqa: F401  (imports first: rss_added_mb is what the stage itself holds)

        import hpa_scc.data.instances  # noqa: F401
    before = vm("VmRSS")
    start = time.perf_counter()
    out: dict = {}
    if name == "merge":
        from hpa_scc.apps.prepare import merge_prepared

        report = merge_prepared(data, prepared)
        out["images"] = report.skipped_existing
    elif name.startswith("open"):
        ds = train_set(prepared, name.split(":")[1])
        out["images"] = len(ds)
        out["rss_added_mb"] = vm("VmRSS") - before
    elif name.startswith("loader"):
        import torch
        from torch.utils.data import DataLoader

        ds = train_set(prepared, name.split(":")[1])
        opened = time.perf_counter()
        loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, collate_fn=_collate_uss,
                            generator=torch.Generator().manual_seed(0))
        first: dict[int, tuple] = {}
        mid: dict[int, tuple] = {}
        last: dict[int, tuple] = {}
        seen = 0
        for batch, ((images, _), (worker, usage)) in enumerate(loader):
            first.setdefault(worker, usage)
            if batch < len(loader) // 2:
                mid[worker] = usage
            last[worker] = usage
            seen += len(images)
        # growth over the whole pass, and over its second half: a worker's allocator settles on
        # its high-water mark in the first thousands of batches; what still grows after that is
        # what grows with the set
        out.update(images=seen, open_s=opened - start, pass_s=time.perf_counter() - opened,
                   worker_uss_first_mb=max(u[0] for u in first.values()),
                   worker_uss_last_mb=max(u[0] for u in last.values()),
                   worker_uss_growth_mb=max(last[w][0] - first[w][0] for w in last),
                   worker_dirty_growth_mb=max(last[w][1] - first[w][1] for w in last),
                   worker_dirty_second_half_mb=max(last[w][1] - mid[w][1] for w in last),
                   worker_dirty_last_mb=max(u[1] for u in last.values()),
                   main_rss_mb=vm("VmRSS"))
    elif name == "first_step":
        import torch

        from hpa_scc.config import load_config
        from hpa_scc.engine.train import train

        torch.set_num_threads(1)
        run = Path(args.work) / "first_step_run"
        shutil.rmtree(run, ignore_errors=True)
        cfg = load_config(None, [f"data.prepared_dir={prepared}", "data.workers=0", f"train.run_dir={run}",
                                 "train.max_epochs=1", "train.max_iters_per_epoch=1", "train.images_per_gpu=2",
                                 "train.tensorboard=false", "data.val_fold=-1", "train.resume=false"])
        train(cfg, progress=False)
        shutil.rmtree(run, ignore_errors=True)
    elif name == "features":
        from hpa_scc.data.cells import build_store

        store = build_store(prepared, "features", progress=False)
        out["cells"] = len(store)
    elif name == "predict":
        from hpa_scc.apps.predict import predict_folder

        pred = Path(args.work) / "predict"
        shutil.rmtree(pred, ignore_errors=True)
        sub = predict_folder(None, data, pred, baseline="image-labels", segmenter="precomputed",
                             segmenter_options={"folder": str(prepared / "segmentation")}, workers=2, progress=False)
        out["submission_mb"] = sub.stat().st_size / 2**20
    elif name == "evaluate":
        from hpa_scc.evaluation.metric import evaluate_files

        sub = Path(args.work) / "predict" / "submission.csv"
        out["mAP"] = evaluate_files(sub, sub).mAP
    else:
        raise ValueError(f"unknown stage {name!r}")
    out.update(wall_s=time.perf_counter() - start, peak_rss_mb=vm("VmHWM"), base_rss_mb=before)
    return out


def run_stage(name: str, data: Path, prepared: Path, work: Path, extra_env: dict | None = None) -> dict:
    """One stage in a fresh interpreter; its JSON line back."""
    cmd = [sys.executable, __file__, "--stage", name, "--data", str(data), "--prepared", str(prepared),
           "--work", str(work)]
    env = {**os.environ, **(extra_env or {})}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"stage {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start  # with the interpreter's start and imports
    return result


def folder_bench(work: Path, n: int, reads: int = 20000) -> dict:
    """Files of ``n`` images in one flat folder against 256 sub-folders (crc32 of the ID): seconds
    to create them (4 KiB each), to open and read ``reads`` of them in random order (cold dentry
    cache not forced: what a warm training epoch sees), and to list the folder(s)."""
    import random
    import zlib

    out = {}
    payload = b"x" * 4096
    ids = [f"s{j:07d}" for j in range(n)]
    for layout in ("flat", "fanned"):
        root = work / f"folders-{layout}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        path = (lambda i: root / f"{i}.npy") if layout == "flat" else (
            lambda i: root / f"{zlib.crc32(i.encode()) % 256:02x}" / f"{i}.npy")
        if layout == "fanned":
            for k in range(256):
                (root / f"{k:02x}").mkdir()
        t = time.perf_counter()
        for i in ids:
            path(i).write_bytes(payload)
        created = time.perf_counter() - t
        sample = random.Random(0).sample(ids, min(reads, n))
        t = time.perf_counter()
        for i in sample:
            with open(path(i), "rb") as fh:
                fh.read()
        opened = time.perf_counter() - t
        t = time.perf_counter()
        listed = len(os.listdir(root)) if layout == "flat" else sum(len(os.listdir(d)) for d in root.iterdir())
        out[layout] = {"create_s": created, "open_read_us": 1e6 * opened / len(sample),
                       "list_s": time.perf_counter() - t, "files": listed}
        shutil.rmtree(root)
    return out


def fit(ns, values) -> tuple[float, float]:
    """Least-squares a + b * n: (fixed part, per-unit slope)."""
    if len(ns) < 2:
        return float("nan"), float("nan")
    b, a = np.polyfit(np.asarray(ns, float), np.asarray(values, float), 1)
    return float(a), float(b)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000", help="N images per set, comma-separated (default: 1000,10000)")
    p.add_argument("--base", type=int, default=48, help="distinct synthetic images replicated (default: 48)")
    p.add_argument("--source-size", type=int, default=512, help="side of the synthetic images in px (default: 512)")
    p.add_argument("--size", type=int, default=256, help="prepare --size (default: 256)")
    p.add_argument("--cell-images", type=int, default=1000,
                   help="images of the features stage, per cell cost (default: 1000)")
    p.add_argument("--stages", default="merge,open,loader,first_step,features,predict,evaluate")
    p.add_argument("--kinds", default="store,dicts",
                   help="training sets for open/loader: the stores, and the dict-per-cell set of the code "
                        "before them (default: store,dicts)")
    p.add_argument("--work", default="runs/bench-scale", help="work folder (default: runs/bench-scale)")
    p.add_argument("--folders", type=int, default=100000,
                   help="files in the flat-against-fanned folder measurement; 0: skip (default: 100000)")
    p.add_argument("--json", help="write the figures here as JSON")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--prepared", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        print(json.dumps(stage(args.stage, args)))
        return {}

    work = Path(args.work)
    stages = args.stages.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    base_data, base_prepared = make_base(work, args.base, args.source_size, args.size)
    how = (f"{args.base} distinct synthetic images at {args.source_size} px, prepared at {args.size} px "
           f"(builtin segmenter, {FOLDS} folds), replicated under new IDs by hard links with their records; "
           f"COCO files and stores by the real prepare --merge")
    print(f"sets: {how} (base made in {time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for n in sizes:
        t = time.perf_counter()
        data, prepared = fabricate(base_data, base_prepared, work / f"n{n}", n)
        row: dict = {"images": n, "fabricate_s": time.perf_counter() - t}
        for name in stages:
            if name != "merge" and "disk" not in row:
                row["disk"] = disk(prepared)  # the prepared set as prepare leaves it (no crops, no runs)
            if name == "open" or name == "loader":
                for kind in args.kinds.split(","):
                    row[f"{name}:{kind}"] = run_stage(f"{name}:{kind}", data, prepared, work)
                    print(f"  N={n} {name}:{kind}: {row[f'{name}:{kind}']}", flush=True)
                continue
            if name == "features":
                if n != min(sizes):
                    continue
                cells_n = min(n, args.cell_images)
                cdata, cprep = data, prepared
                if cells_n < n:
                    cdata, cprep = fabricate(base_data, base_prepared, work / f"cells{cells_n}", cells_n)
                    run_stage("merge", cdata, cprep, work)
                result = run_stage(name, cdata, cprep, work)
                result["ms_per_cell"] = 1000 * result["wall_s"] / result["cells"]
            else:
                env = {"OMP_NUM_THREADS": "1"} if name == "first_step" else None
                result = run_stage(name, data, prepared, work, env)
            row[name] = result
            print(f"  N={n} {name}: {result}", flush=True)
        row.setdefault("disk", disk(prepared))
        row["cells"] = int(sum(json.loads(p.read_text()).get("annotations", []).__len__()
                               for p in (prepared / "coco" / "multilabel").glob("fold*.json")))
        rows.append(row)
        shutil.rmtree(work / "predict", ignore_errors=True)
    figures = {"how": how, "sizes": sizes, "rows": rows, "growth": growth(rows), "machine": os.cpu_count()}
    if args.folders:
        figures["folders"] = folder_bench(work, args.folders)
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def growth(rows: list[dict]) -> dict:
    """Per stage and figure: fixed part, slope per image and per cell, and the value at 21,806 and 100,000 images."""
    ns = [r["images"] for r in rows]
    cells_per_image = float(np.mean([r["cells"] / r["images"] for r in rows]))
    out = {"cells_per_image": cells_per_image}
    keys = sorted({(s, k) for r in rows for s, v in r.items() if isinstance(v, dict) and s != "disk"
                   for k in v if k.endswith(("_s", "_mb"))})
    for s, k in keys:
        pts = [(r["images"], r[s][k]) for r in rows if s in r and k in r[s]]
        if len(pts) < 2:
            continue
        a, b = fit(*zip(*pts))
        out[f"{s}.{k}"] = {"fixed": a, "per_image": b, "per_cell": b / cells_per_image,
                           "at_21806": a + b * 21806, "at_100000": a + b * 100000}
    for part in sorted({p for r in rows for p in r["disk"]}):
        pts = [(r["images"], r["disk"].get(part, {"bytes": 0})["bytes"]) for r in rows]
        files = [(r["images"], r["disk"].get(part, {"files": 0})["files"]) for r in rows]
        out[f"disk.{part}"] = {"bytes_per_image": fit(*zip(*pts))[1] if len(pts) > 1 else pts[0][1] / pts[0][0],
                               "files_per_image": fit(*zip(*files))[1] if len(files) > 1 else files[0][1] / files[0][0]}
    return out


def table(figures: dict) -> str:
    lines = [f"\nsets: {figures['how']}", "", "| stage | figure | " + " | ".join(f"N={n:,}" for n in figures["sizes"])
             + " | per image | at 21,806 | at 100,000 |", "| --- | --- |" + " --- |" * (len(figures["sizes"]) + 3)]
    g = figures["growth"]
    keys = sorted({(s, k) for r in figures["rows"] for s, v in r.items() if isinstance(v, dict) and s != "disk"
                   for k in v if k.endswith(("_s", "_mb"))}, key=lambda sk: (list(figures["rows"][0]).index(sk[0])
                                                                             if sk[0] in figures["rows"][0] else 99, sk[1]))
    for s, k in keys:
        vals = [f"{r[s][k]:.2f}" if s in r and k in r[s] else "-" for r in figures["rows"]]
        fitted = g.get(f"{s}.{k}")
        tail = (f"{fitted['per_image']:.4g} | {fitted['at_21806']:.1f} | {fitted['at_100000']:.1f}" if fitted
                else "- | - | -")
        lines.append(f"| {s} | {k} | " + " | ".join(vals) + f" | {tail} |")
    lines.append("")
    lines.append(f"cells per image: {g['cells_per_image']:.1f}")
    for key, v in g.items():
        if key.startswith("disk."):
            lines.append(f"{key[5:]}: {v['bytes_per_image'] / 1024:.1f} KiB and {v['files_per_image']:.2f} files per image")
    for layout, f in figures.get("folders", {}).items():
        lines.append(f"{f['files']:,} files, {layout}: create {f['create_s']:.1f} s, open+read {f['open_read_us']:.0f} us "
                     f"per file (random order), list {f['list_s']:.2f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
