"""The command line: ``python -m hpa_scc <command>`` (also installed as ``hpa-scc``).

Every command is a thin wrapper over a package function, so the CLI, the sbatch files, the
tests and the notebooks run the same code.

Why one module of ~700 lines: it is argument parsing only, one ``_add_X`` / ``_run_X`` pair per
command (17 of them) with the help texts users read; each ``_run_X`` calls one package function.
Split by command, a reader would lose the one place that shows every command's options.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hpa_scc import __version__

EXAMPLES = """\
examples:
  python -m hpa_scc demo                                   # synthetic data end to end, CPU, minutes
  python -m hpa_scc synth data/synth --images 50 --size 512 --seed 0
  python -m hpa_scc cache data/kaggle data/cache512 --size 512 --workers 8
  python -m hpa_scc split data/kaggle/train.csv --folds 5 --seed 0 --out data/folds.csv
  python -m hpa_scc segment data/kaggle data/seg --segmenter builtin --workers 8
  python -m hpa_scc prepare data/kaggle data/prepared512 --size 512 --segmenter builtin --folds 5
  python -m hpa_scc cell-store data/prepared512 --kind features --shard 0/4   # one part of a job array
  python -m hpa_scc train configs/cell_features.yaml data.prepared_dir=data/prepared512 train.run_dir=runs/feat
  python -m hpa_scc refine runs/feat data/prepared512 --name refined_r1 --held-out-folds 0 --threshold 0 --relative 0.25
  python -m hpa_scc train configs/cell_resnet18.yaml data.prepared_dir=data/prepared512 data.labels=refined_r1
  python -m hpa_scc predict runs/cell data/kaggle/test --out runs/cell/test-pred --ensemble runs/feat
  python -m hpa_scc download-public kaggle_2021.tsv data/public --exclude-train --cell-lines kaggle --workers 8
  python -m hpa_scc merge-tables data/kaggle/train.csv data/public/train.csv --out data/merged.csv

Kaggle data: DATA_DIR holds train.csv (ID,Label) and train/<ID>_{red,green,blue,yellow}.png.
Run 'python -m hpa_scc COMMAND --help' for a command's options.
"""


def _add_synth(sub) -> None:
    p = sub.add_parser(
        "synth", help="generate synthetic HPA images with per-cell truth",
        description="Write a synthetic HPA set in the Kaggle layout (train.csv, train/<ID>_<channel>.png) "
                    "plus the truth: masks/<ID>.png (cells), nuclei/<ID>.png, cells.csv (ID,cell,Label) "
                    "and solution.csv (Kaggle submission format). Deterministic per seed; resumable.")
    p.add_argument("out_dir", type=Path, help="output folder (created)")
    p.add_argument("--images", type=int, default=50, help="number of images (default: 50)")
    p.add_argument("--size", type=int, default=512, help="image width and height in px (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed; image i of a seed never changes (default: 0)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default: 1)")
    p.set_defaults(func=_run_synth)


def _run_synth(args) -> int:
    from hpa_scc.data.synth import format_summary, write_synth_set

    summary = write_synth_set(args.out_dir, args.images, size=args.size, seed=args.seed,
                              workers=args.workers, progress=not args.quiet)
    print(format_summary(summary))
    return 0


def _add_cache(sub) -> None:
    p = sub.add_parser(
        "cache", help="resize a data set once into fast memory-mappable .npy files",
        description="Read every image of DATA_DIR (Kaggle layout or a folder of <ID>_<channel>.<ext> files; "
                    "png, tif, tif.gz, jpg; 8- or 16-bit), resize it and store it as uint8 "
                    "OUT_DIR/images/<xx>/<ID>.npy (<xx>: 256 sub-folders by a hash of the ID) [C,size,size]. Resumable: finished images are skipped. "
                    "Unreadable inputs are skipped and listed in OUT_DIR/failures.csv.")
    p.add_argument("data_dir", type=Path, help="folder with the images (and train.csv, if labelled)")
    p.add_argument("out_dir", type=Path, help="cache folder (created)")
    p.add_argument("--size", type=int, default=512, help="cached width and height in px (default: 512)")
    p.add_argument("--channels", choices=["rgby", "rgb"], default="rgby", help="channels to keep (default: rgby)")
    _add_labels(p)
    _add_workers(p, most=8)
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any input failed")
    _add_shard_args(p)
    p.set_defaults(func=_run_cache)


def _fraction(text: str) -> float:
    """An argparse type: a finite number in [0, 1] (thresholds, weights): 'nan' or 5 is an error
    that names the value, not a run that makes every cell Negative."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # also false for nan
        raise argparse.ArgumentTypeError(f"{text} is not a number in [0, 1]")
    return value


def _positive(text: str) -> float:
    """An argparse type: a finite number > 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number above 0")
    return value


def _add_labels(p) -> None:
    p.add_argument("--labels", type=Path, default=None, help="ID,Label table (default: DATA_DIR/train.csv if present)")


def _add_workers(p, most: int, what: str = "parallel processes") -> None:
    p.add_argument("--workers", type=int, default=min(most, os.cpu_count() or 1),
                   help=f"{what} (default: min({most}, cores))")


def _add_shard_args(p) -> None:
    g = p.add_argument_group("cluster scale (SLURM job arrays)").add_mutually_exclusive_group()
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="process only shard I of N (images split by a hash of their id); default: from "
                        "SLURM_ARRAY_TASK_ID/COUNT inside a job array (sbatch --array=0-99 prepare.sbatch), "
                        "else all images; 'all' processes every image even inside an array")
    g.add_argument("--merge", action="store_true", help="gather the shards' outputs into one result (run once, after all shards)")


def _shard(args) -> tuple[int, int] | None:
    """--shard I/N, or 'all', or (absent) the job array's task from SLURM's variables."""
    from hpa_scc.data.shard import default_shard, parse_shard

    if args.shard == "all":
        return None
    shard = parse_shard(args.shard) if args.shard else default_shard()
    if shard is not None:
        logging.getLogger("hpa_scc").info("processing shard %d/%d", *shard)
    return shard


def _run_cache(args) -> int:
    from hpa_scc.data.cache import build_cache, merge_cache

    if args.merge:
        report = merge_cache(args.data_dir, args.out_dir, labels_csv=args.labels)
    else:
        report = build_cache(args.data_dir, args.out_dir, size=args.size, channels=args.channels,
                             workers=args.workers, labels_csv=args.labels, progress=not args.quiet,
                             shard=_shard(args))
    print(report.summary())
    return _exit_status(report.failures, report.written + report.skipped_existing, args.strict)


def _exit_status(failures: list, done: int, strict: bool = False) -> int:
    """1 when every input failed (nothing to go on with: a wrong folder, a dead server) or, with
    --strict, when any did; else 0 (the failures are listed, and a rerun retries them)."""
    if failures and not done:
        print(f"error: every image failed ({len(failures)}), nothing was produced; the first: "
              f"{failures[0][0]}: {failures[0][1]}", file=sys.stderr)
        return 1
    return 1 if (strict and failures) else 0


def _add_split(sub) -> None:
    p = sub.add_parser(
        "split", help="multi-label stratified cross-validation folds",
        description="Assign every image of an ID,Label table to a fold with iterative stratification, "
                    "so each class is spread evenly over the folds. Writes ID,Label,fold and prints the "
                    "class x fold balance. Deterministic for a given table, --folds and --seed.")
    p.add_argument("labels_csv", type=Path, help="ID,Label table, e.g. the Kaggle train.csv")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="output CSV (default: ./<LABELS stem>_folds<K>_seed<S>.csv)")
    p.set_defaults(func=_run_split)


def _run_split(args) -> int:
    from hpa_scc.data.folds import default_out, fold_class_counts, format_balance, split_table

    from hpa_scc.utils.fileio import refuse_overwrite

    out = args.out or default_out(args.labels_csv, args.folds, args.seed)
    refuse_overwrite({"--out": out}, {"LABELS_CSV": args.labels_csv})  # the table would become a folds table
    ids, labels, folds = split_table(args.labels_csv, out, args.folds, args.seed)
    print(format_balance(fold_class_counts(labels, folds)))
    print(f"{len(ids)} images in {args.folds} folds -> {out}")
    return 0


def _add_segmenter_args(p) -> None:
    g = p.add_argument_group("segmenter")
    g.add_argument("--segmenter", choices=["builtin", "hpacellseg", "precomputed"], default="builtin",
                   help="builtin: no weights, runs anywhere; hpacellseg: HPA-Cell-Segmentation with local "
                        "weights; precomputed: label images from --masks (default: builtin)")
    g.add_argument("--masks", type=Path, default=None, help="precomputed: folder with <ID>_cells.png/.npz (and nuclei)")
    g.add_argument("--nuclei-model", type=Path, default=None, help="hpacellseg: dpn_unet_nuclei_v1.pth")
    g.add_argument("--cell-model", type=Path, default=None, help="hpacellseg: dpn_unet_cell_3ch_v1.pth")


def _segmenter_options(args) -> dict:
    if args.segmenter == "precomputed":
        return {"folder": args.masks}
    if args.segmenter == "hpacellseg":
        return {"nuclei_model": args.nuclei_model, "cell_model": args.cell_model}
    return {}


def _add_segment(sub) -> None:
    p = sub.add_parser(
        "segment", help="segment every cell and nucleus of a data set",
        description="Segment every image of DATA_DIR (Kaggle layout or <ID>_<channel>.<ext> files) and write "
                    "OUT_DIR/<ID>_cells.png and OUT_DIR/<ID>_nuclei.png: uint16 label images at full size, "
                    "0 background, nucleus k inside cell k (a cell may have none). Resumable; failures in OUT_DIR/failures.csv.")
    p.add_argument("data_dir", type=Path, help="folder with the images")
    p.add_argument("out_dir", type=Path, help="folder for the label images (created)")
    _add_segmenter_args(p)
    _add_labels(p)
    _add_workers(p, most=4)
    _add_shard_args(p)
    p.set_defaults(func=_run_segment)


def _run_segment(args) -> int:
    from hpa_scc.apps.prepare import merge_failures, segment_folder

    if args.merge:
        report = merge_failures(args.out_dir, args.data_dir, labels_csv=args.labels)
    else:
        report = segment_folder(args.data_dir, args.out_dir, segmenter=args.segmenter,
                                segmenter_options=_segmenter_options(args), workers=args.workers,
                                labels_csv=args.labels, progress=not args.quiet, shard=_shard(args))
    print(report.summary())
    return _exit_status(report.failures, report.written + report.skipped_existing)


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="segment + cache + pseudo-labelled COCO instances per fold (dataset.py)",
        description="Build the training set: segment every image (full-size label images cached under "
                    "OUT_DIR/segmentation), cache the images resized (OUT_DIR/cache), give every cell its image's "
                    "labels and write COCO instance JSON per fold (OUT_DIR/coco/<layout>/fold<K>.json, RLE masks at "
                    "--size). For a synthetic set, OUT_DIR/coco_truth/ holds the same cells with their true labels. "
                    "Resumable; skipped images in OUT_DIR/failures.csv.")
    p.add_argument("data_dir", type=Path, help="labelled data: DATA_DIR/train.csv + train/<ID>_<channel>.png")
    p.add_argument("out_dir", type=Path, help="output folder (created)")
    p.add_argument("--size", type=int, default=512, help="training size in px (default: 512)")
    _add_segmenter_args(p)
    p.add_argument("--folds", type=int, default=5, help="stratified folds; 1 = one file all.json (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="fold seed (default: 0)")
    p.add_argument("--layout", choices=["both", "multilabel", "per_label"], default="both",
                   help="COCO layouts to write: multilabel: one instance per cell with a 19-long label_vector "
                        "(model.head=multilabel); per_label: one instance per cell and label (model.head=softmax); "
                        "both: each, so any head trains on the set (default: both)")
    p.add_argument("--min-cell-area", type=int, default=0, dest="min_cell_area_px",
                   help="drop cells smaller than this, in px at full size (default: 0)")
    p.add_argument("--drop-border-cells", action="store_true", help="drop cells cut by the image border")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 if any image failed (the others are still prepared)")
    _add_labels(p)
    _add_workers(p, most=4)
    _add_shard_args(p)
    p.set_defaults(func=_run_prepare)


def _run_prepare(args) -> int:
    from hpa_scc.apps.prepare import prepare_dataset

    report = prepare_dataset(args.data_dir, args.out_dir, size=args.size, segmenter=args.segmenter,
                             segmenter_options=_segmenter_options(args), n_folds=args.folds, seed=args.seed,
                             layout=args.layout, min_cell_area_px=args.min_cell_area_px,
                             drop_border_cells=args.drop_border_cells, workers=args.workers,
                             labels_csv=args.labels, progress=not args.quiet,
                             shard=None if args.merge else _shard(args), merge_only=args.merge)
    print(report.summary())
    return 1 if (args.strict and report.failures) else 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model on a prepared set: Mask R-CNN (DenseNet121, ResNet101-FPN, ResNeXt101-FPN), "
                      "a cell-crop classifier or the per-cell features baseline",
        description="Train on the output of 'prepare'. model.family picks the kind: maskrcnn (default), cell (a "
                    "classifier of masked cell crops) or features (per-cell features + logistic regressions). CONFIG is a YAML file holding only differences from the "
                    "defaults (hpa_scc/config.py); key=value overrides come after it, e.g. optim.lr=0.005 "
                    "train.run_dir=runs/x. Resumes from RUN_DIR/last.pt when present. Under torchrun or srun, "
                    "one process per GPU. SIGUSR1/SIGTERM save last.pt and exit 75 (requeue).",
        epilog="examples:\n  python -m hpa_scc train configs/smoke.yaml\n"
               "  python -m hpa_scc train configs/densenet121.yaml data.prepared_dir=data/prepared512\n"
               "  torchrun --nproc-per-node 4 -m hpa_scc train configs/resnet101_fpn.yaml\n"
               "  python -m hpa_scc train configs/cell_resnet18.yaml data.prepared_dir=data/prepared512   # cell crops\n"
               "  python -m hpa_scc train configs/cell_features.yaml data.prepared_dir=data/prepared512   # features + "
               "logistic regression, seconds",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="YAML config (differences from the defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. optim.lr=0.005")
    p.set_defaults(func=_run_train)


EXIT_REQUEUE = 75  # EX_TEMPFAIL: training stopped by a signal after saving last.pt; requeue to continue


def _run_train(args) -> int:
    from hpa_scc.config import load_config
    from hpa_scc.engine.train import PREEMPTED, train

    cfg = load_config(args.config, args.overrides)
    if cfg.model.engine == "detectron2":  # detectron2's trainer on the same config (engine/d2train.py)
        from hpa_scc.engine.d2train import train_d2

        return EXIT_REQUEUE if train_d2(cfg) == PREEMPTED else 0
    result = train(cfg, progress=not args.quiet)
    # last.pt is saved (logged); the batch scripts requeue on this status
    return EXIT_REQUEUE if result.status == PREEMPTED else 0


def _add_cell_store(sub) -> None:
    p = sub.add_parser(
        "cell-store", help="the per-cell features or crops of a prepared set, as a job array",
        description="Compute the per-cell table the cell-level families train on: features\n"
                    "(PREPARED/crops/features.npy, family 'features' and a Mask R-CNN with model.cell_features=true)\n"
                    "or masked crops (PREPARED/crops/<C>px.npy,\n"
                    "family 'cell'), one row per cell. 'train' builds it itself when it is missing; on a big\n"
                    "set, build it first as a SLURM job array (--shard, one part per task, a finished part is\n"
                    "reused), then --merge (or let 'train' merge the complete parts), e.g.\n"
                    "  sbatch --array=0-15 --wrap 'python -m hpa_scc cell-store PREPARED --kind features'\n"
                    "  python -m hpa_scc cell-store PREPARED --kind features --merge",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prepared", type=Path, help="prepared folder (python -m hpa_scc prepare)")
    p.add_argument("--kind", choices=["features", "crops"], default="features",
                   help="features (family 'features') or crops (family 'cell') (default: features)")
    p.add_argument("--crop-size", type=int, default=64, help="crops: side in px, data.crop_size (default: 64)")
    _add_shard_args(p)
    p.set_defaults(func=_run_cell_store)


def _run_cell_store(args) -> int:
    from hpa_scc.data.cells import build_store

    shard = None if args.merge else _shard(args)
    store = build_store(args.prepared, args.kind, args.crop_size, progress=not args.quiet, shard=shard,
                        merge_only=args.merge)
    where = "this shard's part" if shard else "the store"
    print(f"{where}: {len(store)} cells of {args.prepared}, {args.kind}")
    return 0


def _add_refine(sub) -> None:
    p = sub.add_parser(
        "refine", help="label refinement: relabel a prepared set's cells with a trained model (weak supervision)",
        description="Every cell inherits its image's labels, though many cells show only some of them. A model "
                    "trained on those weak labels (RUN_DIR) scores every cell of PREPARED; each cell keeps only the "
                    "image labels it scores at least a threshold for (a cell left with none becomes Negative). The "
                    "threshold is the one that best recovers the image labels of the held-out folds (image labels "
                    "only, nothing real data lacks). Writes PREPARED/coco_NAME/ (same cells and masks, new labels) "
                    "and PREPARED/coco_NAME/refine.json; train the next round with data.labels=NAME. On a synthetic "
                    "set the labels are also compared with the cells' true labels.",
        epilog="examples:\n  python -m hpa_scc refine runs/weak data/prepared512 --name refined_r1 --held-out-folds 0\n"
               "  python -m hpa_scc train configs/densenet121.yaml data.labels=refined_r1 train.run_dir=runs/r1\n"
               "  python -m hpa_scc refine runs/r1 data/prepared512 --name refined_r2 --held-out-folds 0 "
               "--relative 0.5\n"
               "  # distillation: the best cell model's scores as soft targets for Mask R-CNN's multilabel head\n"
               "  python -m hpa_scc refine runs/teacher data/prepared512 --name soft_r1 --held-out-folds 0 --soft relative\n"
               "  python -m hpa_scc train configs/densenet121.yaml data.labels=soft_r1 model.head=multilabel",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="training run folder (config.yaml and best.pt/last.pt)")
    p.add_argument("prepared_dir", type=Path, help="the prepared set it trained on ('prepare' output)")
    p.add_argument("--name", required=True, help="name of the refined labels, e.g. refined_r1 (-> coco_NAME/)")
    p.add_argument("--held-out-folds", type=int, nargs="+", required=True, metavar="K",
                   help="folds the model did not train on (its data.val_fold); the threshold is chosen on them")
    p.add_argument("--relative", type=_fraction, default=0.0, metavar="R",
                   help="a cell must also reach R x the best cell's score for the label in its image "
                        "(0..1; default 0: the threshold alone)")
    p.add_argument("--threshold", type=_fraction, default=None, metavar="T",
                   help="fixed absolute threshold instead of the held-out choice; '--threshold 0 --relative 0.25' is "
                        "the relative rule alone, the one to use with a cell-level model (docs/RESULTS.md)")
    p.add_argument("--min-f1", type=_fraction, default=None, metavar="F",
                   help="below this held-out image-label F1 the model is not trusted and the cells keep their "
                        "image labels (default: hpa_scc.apps.refine.MIN_HELD_OUT_F1, 0.5)")
    p.add_argument("--layout", choices=["per_label", "multilabel"], default=None,
                   help="COCO layout to refine (default: every layout the prepared set has)")
    p.add_argument("--checkpoint", default="best.pt", help="checkpoint in RUN_DIR (default: best.pt, else last.pt)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="up to N rounds: round k retrains RUN_DIR's config on round k-1's labels (in "
                        "PREPARED/coco_NAME<k-1>/model) and refines again, into coco_NAME1 .. coco_NAMEN; they stop "
                        "when the held-out image-label F1 no longer improves and the best round is named "
                        "(default 1: one refinement, into coco_NAME)")
    p.add_argument("--soft", choices=["relative", "raw"], default=None,
                   help="write the model's cell scores as soft targets instead of labels (distillation: a student's "
                        "multilabel head learns to match them; multilabel layout only): an image label's target is the "
                        "cell's score over the image's best cell's (relative) or the score itself (raw), a class the "
                        "image lacks is 0, Negative is 1 minus the highest (hpa_scc.weak.targets.soft_targets)")
    _add_shard_args(p)
    p.set_defaults(func=_run_refine)


def _run_refine(args) -> int:
    from hpa_scc.apps.refine import refine_prepared

    options = {} if args.min_f1 is None else {"min_f1": args.min_f1}  # the default lives in hpa_scc.apps.refine
    shard = None if args.merge else _shard(args)
    if args.rounds != 1:
        from hpa_scc.apps.refine import refine_rounds

        if shard is not None or args.merge:
            raise SystemExit("refine: --rounds trains between rounds; run sharded scoring one round at a time "
                             "(--rounds 1 with --shard, then train on the labels)")
        if args.soft:
            raise SystemExit("refine: --soft writes a student's targets, the last step; give it without --rounds "
                             "(with the best round's model)")
        best, reports = refine_rounds(args.run_dir, args.prepared_dir, name=args.name, rounds=args.rounds,
                                      held_out_folds=args.held_out_folds, relative=args.relative, layout=args.layout,
                                      checkpoint=args.checkpoint, threshold=args.threshold, device=args.device,
                                      progress=not args.quiet, **options)
        for k, report in enumerate(reports, 1):
            print(f"round {k}: {report.summary()}")
        print(f"best round: {best} (train with data.labels={best})")
        return 0
    report = refine_prepared(args.run_dir, args.prepared_dir, name=args.name, held_out_folds=args.held_out_folds,
                             relative=args.relative, layout=args.layout, checkpoint=args.checkpoint,
                             threshold=args.threshold, device=args.device, progress=not args.quiet,
                             shard=shard, merge_only=args.merge, soft=args.soft, **options)
    if report is None:
        print(f"shard {shard[0]}/{shard[1]} scored; once every shard is done: the same command with --merge")
    else:
        print(report.summary())
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="per-cell labels for a folder of images -> Kaggle submission.csv",
        description="Label every cell of every image in DATA_DIR with a trained run (RUN_DIR: its config.yaml "
                    "and best.pt/last.pt, or a detectron2-engine run's model_*.pth) and write OUT/submission.csv (Kaggle format, masks at the original size), "
                    "OUT/cells.csv (one confidence column per class) and OUT/predict.log. Resumable. "
                    "RUN_DIR may be '-' with --baseline.")
    p.add_argument("run_dir", help="training run folder, or '-' for a baseline")
    p.add_argument("data_dir", type=Path, help="images: Kaggle layout or <ID>_<channel>.<ext> files, any size")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--cells", choices=["segmenter", "model"], default="segmenter",
                   help="segmenter: segmenter cells scored by the model (default); model: Mask R-CNN's own masks")
    _add_segmenter_args(p)
    p.add_argument("--checkpoint", default="best.pt",
                   help="checkpoint file in RUN_DIR (default: best.pt, else last.pt; for a detectron2-engine run "
                        "the newest model_*.pth, or name one, e.g. model_0004999.pth)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: detectors add the horizontal flip, "
                                                      "cell-level models average 4 flips/rotations of each crop")
    p.add_argument("--cell-scoring", choices=["auto", "boxes", "detections"], default="auto",
                   help="how a detector scores the segmenter's cells: boxes (each cell's box through the RoI heads: "
                        "all 19 scores, no detection cap; the default for the multilabel head) or detections (best "
                        "score x mask IoU of overlapping detections; the softmax head's only way)")
    p.add_argument("--ensemble", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                   help="more runs (any family, same image size) scoring the same segmenter cells; each cell's "
                        "confidences are the mean over all models, e.g. a cell-level model with a detector")
    p.add_argument("--baseline", choices=["image-labels", "random", "truth"], default=None,
                   help="image-labels: every cell gets its image's labels at confidence 1; random: random confidences "
                        "(chance level); truth: a synthetic set's true cells and labels (must score 1.0)")
    p.add_argument("--image-fusion", type=_fraction, default=0.0, metavar="W",
                   help="blend each cell's confidences with its image's score (the best cell per class): "
                        "conf^(1-W) x image^W (default: 0, off)")
    _add_labels(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    g = p.add_argument_group("speed")
    _add_workers(g, most=8, what="processes that read, segment and encode images while the model runs")
    g.add_argument("--batch-size", type=int, default=8, help="images per model forward pass (default: 8)")
    p.add_argument("--allow-missing", action="store_true",
                   help="write the submission even if some images could not be predicted (they are left out and "
                        "listed in OUT/failures.csv); without it that is an error and no submission is written")
    _add_shard_args(p)
    p.set_defaults(func=_run_predict)


def _run_predict(args) -> int:
    from hpa_scc.apps.predict import predict_folder

    run_dir = None if args.run_dir == "-" else Path(args.run_dir)
    if run_dir is None and args.baseline is None and not args.merge:
        raise ValueError("RUN_DIR '-' needs --baseline image-labels, random or truth")
    path = predict_folder(run_dir, args.data_dir, args.out, cells=args.cells, segmenter=args.segmenter,
                          segmenter_options=_segmenter_options(args), checkpoint=args.checkpoint, tta=args.tta,
                          baseline=args.baseline, labels_csv=args.labels, device=args.device, workers=args.workers,
                          batch_size=args.batch_size, image_fusion=args.image_fusion, ensemble=args.ensemble,
                          cell_scoring=args.cell_scoring, allow_missing=args.allow_missing,
                          progress=not args.quiet, shard=None if args.merge else _shard(args), merge_only=args.merge)
    print(f"wrote {path}")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="the competition metric: mAP at mask IoU 0.6 over the 19 classes",
        description="Score a submission against the truth, both in the Kaggle submission format (the truth's "
                    "confidences are ignored), with the Open Images rules the 2021 competition used: per class, only "
                    "images whose truth holds the class; detections by descending confidence, each matched to the "
                    "untaken truth mask of highest IoU (>= 0.6); all-point AP; mean over classes with truth. Prints "
                    "per-class AP and a final line 'mAP <value>'.")
    p.add_argument("--solution", type=Path, required=True, help="truth CSV (e.g. a synthetic set's solution.csv)")
    p.add_argument("--submission", type=Path, required=True, help="submission CSV (e.g. predict's submission.csv)")
    p.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="write a PR-curve plot (PNG) here")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from hpa_scc.evaluation.metric import evaluate_files, format_result
    from hpa_scc.utils.fileio import refuse_overwrite

    refuse_overwrite({"--out": args.out, "--plot": args.plot}, {"--solution": args.solution,
                                                                "--submission": args.submission})
    result = evaluate_files(args.solution, args.submission, args.out)
    if args.plot:
        from hpa_scc.apps.visualize import plot_pr_curves

        plot_pr_curves(result, args.plot)
    print(format_result(result))
    return 0


def _add_visualize(sub) -> None:
    p = sub.add_parser(
        "visualize", help="overlays, per-class AP, PR curves and training curves as PNG",
        description="Draw a prediction folder (the output of 'predict'): per image, the RGB composite with cell "
                    "outlines and each cell's top labels, beside the truth on a synthetic set; with --solution, "
                    "per-class AP bars and PR curves; with --run, the training curves from metrics.jsonl.")
    p.add_argument("pred_dir", type=Path, help="output folder of 'predict'")
    p.add_argument("data_dir", type=Path, help="the images that were predicted")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    p.add_argument("--run", type=Path, default=None, help="training run folder: adds training_curves.png")
    p.add_argument("--solution", type=Path, default=None,
                   help="truth CSV to score against (default: DATA_DIR/solution.csv when it exists)")
    p.add_argument("--images", type=int, default=4, help="number of overlays (default: 4)")
    p.add_argument("--top-k", type=int, default=2, help="labels captioned per cell (default: 2)")
    p.set_defaults(func=_run_visualize)


def _run_visualize(args) -> int:
    from hpa_scc.apps.visualize import visualize_main
    from hpa_scc.data.synth import SynthSet

    solution = args.solution
    if solution is None and SynthSet(args.data_dir).solution_csv.is_file():
        solution = SynthSet(args.data_dir).solution_csv
    written = visualize_main(args.pred_dir, args.data_dir, args.out, run_dir=args.run, solution=solution,
                             n=args.images, top_k=args.top_k)
    for key, value in written.items():
        for path in value if isinstance(value, list) else [value]:
            print(f"{key:<16} {path}")
    return 0


def _add_download_public(sub) -> None:
    import textwrap

    text = ("Download the fields of view listed in TABLE (the competition's kaggle_2021.tsv, comma- or "
            "tab-separated) into OUT_DIR/train/<ID>_{red,green,blue,yellow}.png and write OUT_DIR/train.csv, "
            "so OUT_DIR is a DATA_DIR for cache and prepare.\n\n"
            "TABLE columns: Image = URL prefix (files are <prefix>_<color>.tif.gz), Label = HPA location "
            "names joined by ',', Cellline, in_trainset (True: already in Kaggle's train set), Label_idx "
            "(optional class indices joined by '|', used only for rows whose names give no class). "
            "ID = the last two parts of the URL path joined by '_', e.g. 10580_1758_B1_1.\n\n"
            "Mapping to the 19 classes: the class names themselves (Vesicles -> 17), plus Focal adhesion "
            "sites -> Actin filaments, Centriolar satellite -> Centrosome, Cell Junctions -> Plasma "
            "membrane, Peroxisomes/Endosomes/Lysosomes/Lipid droplets/Cytoplasmic bodies -> Vesicles, No "
            "staining -> Negative; other names are counted, reported and ignored; rows left without a "
            "class are skipped.\n\n"
            "Each request has a timeout, is retried with exponential backoff (not after HTTP 400/401/403/"
            "404/410) and must match its Content-Length, end a valid gzip stream (CRC-32) and decode as "
            "TIFF. PNGs are written atomically: run the same command again to resume; finished images "
            "make no request. OUT_DIR/train.csv (ID,Label,source,Cellline,Image) lists the complete "
            "images of the selection; OUT_DIR/failures.csv (ID,url,reason) the ones that failed this run.")
    p = sub.add_parser(
        "download-public", help="download public HPA images (kaggle_2021.tsv) as PNG in the Kaggle layout",
        description="\n\n".join(textwrap.fill(part, 100) for part in text.split("\n\n")),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", type=Path, help="kaggle_2021.tsv (columns Image, Label, Cellline, in_trainset, Label_idx)")
    p.add_argument("out_dir", type=Path, help="output folder (created): train/, train.csv, failures.csv")
    g = p.add_argument_group("selection")
    g.add_argument("--labels", nargs="+", default=None, metavar="CLASS",
                   help="keep images with at least one of these classes: indices or names, e.g. 11 15 or "
                        "'Mitotic spindle'")
    g.add_argument("--cell-lines", nargs="+", default=None, metavar="NAME",
                   help="keep these cell lines, e.g. 'U-2 OS' A549; 'kaggle' = the 17 lines of the competition")
    g.add_argument("--exclude-train", action="store_true",
                   help="drop rows with in_trainset True (already in the Kaggle training set under another ID)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N selected images (a trial run)")
    g.add_argument("--dry-run", action="store_true", help="read, map and filter the table and print the counts; "
                                                          "download nothing")
    g = p.add_argument_group("output")
    g.add_argument("--size", type=int, default=None, metavar="PX", help="resize each channel to PX x PX (default: keep the size)")
    g.add_argument("--bits", choices=["native", "8"], default="native",
                   help="native: the file's bit depth, 16-bit kept (default); 8: scaled to 8-bit by the 16-bit range")
    g = p.add_argument_group("network")
    g.add_argument("--workers", type=int, default=8, metavar="N", help="parallel downloads (threads; default: 8)")
    g.add_argument("--timeout", type=_positive, default=60.0, metavar="S", help="seconds without data before a request is "
                                                               "abandoned (default: 60)")
    g.add_argument("--retries", type=int, default=3, metavar="N", help="further attempts after a failed request (default: 3)")
    g.add_argument("--backoff", type=float, default=1.0, metavar="S", help="seconds before the first retry, doubled for each "
                                                              "next one (default: 1)")
    g.add_argument("--base-url", default=None, metavar="URL",
                   help="replace the scheme and host of every Image prefix (a mirror), e.g. http://mirror/hpa")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any image failed")
    p.set_defaults(func=_run_download_public)


def _run_download_public(args) -> int:
    from hpa_scc.data.public import DownloadOptions, download_public

    options = DownloadOptions(bits=args.bits, size=args.size, timeout_s=args.timeout, retries=args.retries,
                              backoff_s=args.backoff, base_url=args.base_url)
    report = download_public(args.table, args.out_dir, labels=args.labels, cell_lines=args.cell_lines,
                             exclude_train=args.exclude_train, limit=args.limit, options=options,
                             workers=args.workers, progress=not args.quiet, dry_run=args.dry_run)
    print(report.table.summary() if args.dry_run else report.summary())
    return 1 if (args.strict and report.failures) or report.all_failed else 0


def _add_merge_tables(sub) -> None:
    p = sub.add_parser(
        "merge-tables", help="merge the Kaggle and public label tables into one, with a source column",
        description="Write OUT = ID,Label,source,Cellline: the rows of KAGGLE_CSV (source 'kaggle') then those of "
                    "PUBLIC_CSV (source 'hpa_public', or the table's own source column), e.g. download-public's "
                    "train.csv. Labels are checked and normalised ('13|13' -> '13'). An ID in both tables is an "
                    "error listing them, unless --keep-first. 'python -m hpa_scc split OUT' makes its folds.")
    p.add_argument("kaggle_csv", type=Path, help="ID,Label table, e.g. data/kaggle/train.csv")
    p.add_argument("public_csv", type=Path, help="ID,Label table, e.g. data/public/train.csv")
    p.add_argument("--out", type=Path, required=True, help="merged CSV")
    p.add_argument("--keep-first", action="store_true", help="an ID in both tables keeps the first table's row "
                                                             "(reported) instead of failing")
    p.set_defaults(func=_run_merge_tables)


def _run_merge_tables(args) -> int:
    from hpa_scc.data.public_table import merge_tables

    print(merge_tables(args.kaggle_csv, args.public_csv, args.out, keep_first=args.keep_first).summary())
    return 0


def _add_demo(sub) -> None:
    from hpa_scc.apps.demo import DemoOptions

    p = sub.add_parser(
        "demo", help="the main job on built-in synthetic data (no downloads, no GPU)",
        description="Generate a synthetic HPA set, build the pseudo-labelled training set from it (builtin "
                    "segmentation, cache, COCO per fold), score the segmentation against the synthetic truth, train "
                    "Mask R-CNN and the per-cell features model on image labels, and score both on a held-out "
                    "synthetic set, printing each step's summary. Everything goes under OUT (default: runs/demo); re-running resumes.")
    d = DemoOptions()
    p.add_argument("--out", type=Path, default=d.out, help=f"output folder (default: {d.out})")
    p.add_argument("--images", type=int, default=d.images, help=f"synthetic images (default: {d.images})")
    p.add_argument("--size", type=int, default=d.size, help=f"synthetic image size in px (default: {d.size})")
    p.add_argument("--train-size", type=int, default=d.train_size,
                   help=f"size of the prepared set, which training follows, in px (default: {d.train_size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    p.add_argument("--workers", type=int, default=d.workers, help=f"parallel processes (default: {d.workers})")
    p.add_argument("--train-config", type=Path, default=d.train_config,
                   help="training config of step 4 (default: configs/cpu_demo.yaml)")
    p.add_argument("--no-train", action="store_true", help="stop after the training set is built")
    p.add_argument("train_overrides", nargs="*", metavar="key=value", help="overrides for the training config")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from hpa_scc.apps.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(out=args.out, images=args.images, size=args.size, train_size=args.train_size,
                                seed=args.seed, workers=args.workers, train_config=args.train_config,
                                train_overrides=args.train_overrides, no_train=args.no_train,
                                progress=not args.quiet))


# Commands whose --out is a file (a CSV or JSON), not a folder.
FILE_OUTPUTS = {"split", "evaluate", "merge-tables"}


def _output_folder_that_is_a_file(args) -> str | None:
    """An output folder given as the path of an existing file: say which argument, before any work."""
    for dest, name in (("out_dir", "OUT_DIR"), ("out", "--out")):
        path = getattr(args, dest, None)
        if path is not None and args.command not in FILE_OUTPUTS and Path(path).is_file():
            return (f"{name} {path} is a file, but {args.command} writes a folder there; give a folder that does "
                    f"not exist yet (or an earlier output folder of the same command to resume it)")
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpa_scc",
        description="Per-cell protein localisation in Human Protein Atlas images (Kaggle HPA Single Cell "
                    "Classification): synthetic data, public HPA downloads, image cache, folds, cell "
                    "segmentation, Mask R-CNN (DenseNet121, ResNet101-FPN, ResNeXt101-FPN) and cell-level models trained "
                    "on image labels, per-cell "
                    "prediction, the competition metric and Kaggle submissions.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hpa_scc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for add in (_add_demo, _add_synth, _add_cache, _add_split, _add_segment, _add_prepare, _add_cell_store, _add_train, _add_refine,
                _add_predict, _add_evaluate, _add_visualize, _add_download_public, _add_merge_tables):
        add(sub)
    for command in sub.choices.values():
        command.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = _output_folder_that_is_a_file(args)
    if folder:
        print(f"error: {folder}", file=sys.stderr)
        return 1
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError, ImportError, RuntimeError) as exc:
        # Expected user errors (bad path, bad label, corrupt file): one clear line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FloatingPointError as exc:  # a non-finite training loss: the message holds the loss dict
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted; finished work is kept, run the same command again to resume", file=sys.stderr)
        return 130
