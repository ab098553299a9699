"""Label refinement: a trained model narrows each training cell's inherited labels down.

    from hpa_scc.apps.refine import refine_prepared
    report = refine_prepared("runs/weak/train", "runs/weak/prepared", name="refined_r1", held_out_folds=[0])
    # then train with data.labels=refined_r1

Weak supervision gives every cell its image's labels, though in an image labelled
``Nucleoplasm|Mitochondria`` many cells show only one of the two. After a first training the
model's cell scores tell them apart: each training cell keeps only the image labels it scores
at least a threshold for (a cell left with none becomes Negative) and the next round trains on
those labels. The threshold is chosen on held-out images with their image labels only
(``targets.choose_threshold``), so the step needs nothing real data lacks. Optionally a cell must
also reach ``relative`` x the best cell's score for the label in its image (``targets.refine_labels``).
A model that recovers the held-out images' labels poorly (F1 below ``min_f1``) is not trusted:
the cells keep their image labels, since narrowing them with uninformed scores destroys them.

Writes ``PREPARED/coco_<name>/<layout>/fold<K>.json`` (same images, cells and masks as coco/,
new labels) and ``PREPARED/coco_<name>/refine.json`` (threshold, held-out F1, label counts). On
a synthetic set (``coco_truth/`` present) refine.json also says how the labels compare with the
cells' true labels before and after, and for a grid of rules (``sweep``): the measure of whether
a round helped that real data cannot give.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hpa_scc.data.annotations import cells_fingerprint, write_coco
from hpa_scc.data.shard import Shard, check_shard, complete_shard_counts, shard_of, shard_suffix
from hpa_scc.utils.fileio import atomic_path, differences, write_text_atomic
from hpa_scc.data.prepared import PreparedSet, cell_annotation, cells_of, label_image
from hpa_scc.weak.targets import (SOFT_SCALES, cell_instances, choose_threshold, label_quality, refine_labels,
                                  soft_instances, soft_targets, within_image_auc)

log = logging.getLogger("hpa_scc.apps.refine")


@dataclass
class RefineReport:
    name: str
    threshold: float
    held_out_f1: float
    cells: int
    labels_before: int
    labels_after: int
    negative_cells: int
    relative: float = 0.0
    kept_image_labels: bool = False  # the model was not trusted (held-out F1 < min_f1): labels unchanged
    truth_auc: float | None = None  # within_image_auc of the model's cell scores (synthetic sets only)
    truth_before: dict | None = None  # label_quality of the source labels (synthetic sets only)
    truth_after: dict | None = None  # ... of the refined labels (soft targets: those >= SOFT_CUT)
    soft: str | None = None  # soft targets written (weak.targets.soft_targets' scale), not labels

    def summary(self) -> str:
        rule = f"threshold {self.threshold:.2f}" + (f", relative {self.relative:.2f}" if self.relative else "")
        text = (f"{self.name}: {rule} (held-out image-label F1 {self.held_out_f1:.3f}); "
                f"{self.cells} cells, labels {self.labels_before} -> {self.labels_after}, "
                f"{self.negative_cells} cells left Negative")
        if self.kept_image_labels:
            text += " (held-out F1 too low: image labels kept)"
        elif self.soft:
            text += f" (soft targets, {self.soft} scale: labels counted at >= {SOFT_CUT})"
        if self.truth_auc is not None:
            text += f"; the model ranks the cells of an image at AUC {self.truth_auc:.3f} (truth)"
        if self.truth_before and self.truth_after:
            b, a = self.truth_before, self.truth_after
            text += (f"; against the true cell labels: precision {b['precision']:.3f} -> {a['precision']:.3f}, "
                     f"recall {b['recall']:.3f} -> {a['recall']:.3f}, F1 {b['f1']:.3f} -> {a['f1']:.3f}")
        return text


# Below this held-out image-label F1 a model's cell scores are not trusted to narrow labels down.
# On the CPU protocol (docs/RESULTS.md) a weak model at F1 0.17 ranked the cells of an image at
# chance (AUC 0.52) and its refined labels were far worse than the image labels (F1 0.70 -> 0.28).
MIN_HELD_OUT_F1 = 0.5

# The rules refine.json reports on a synthetic set: absolute thresholds x shares of the image's best cell.
# The relative rule for refining with a cell-level model: a cell keeps an image label when it
# scores at least this share of the image's best cell for it. On the CPU protocol's train set
# (seed 0, docs/RESULTS.md) it raised the labels' F1 against the truth from 0.70 to ~0.85 with the
# features model; it was fixed there and then checked, unchanged, at other seeds.
RELATIVE_RULE = 0.25
# Soft targets are counted and compared with the truth as the labels they hold at >= this value.
SOFT_CUT = 0.5
SWEEP_THRESHOLDS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
SWEEP_RELATIVE = (0.0, 0.25, 0.5, 0.75, 0.9)


def score_image_cells(loaded, prepared: PreparedSet, image: dict, cells: dict[int, dict], tta: bool = False) -> np.ndarray:
    """float [K, 19]: the model's confidence per cell (cells in id order) for one prepared image."""
    from hpa_scc.engine.inference import segmenter_cell_scores

    prepared.check_size(loaded.image_size, f"the training size of the model of {loaded.run_dir}",
                        "refine with a model trained on this prepared set")
    pixels = prepared.read_image(image["image_name"])
    ids = sorted(cells)
    cell_image = label_image([cells[i] for i in ids], pixels.shape[1:])
    if ids != list(range(1, len(ids) + 1)):  # scoring takes cells 1..K: renumber, keep the order
        cell_image = np.searchsorted(np.array([0] + ids), cell_image).astype(np.int32)
    return segmenter_cell_scores(loaded, [np.array(pixels)[: loaded.in_channels]], [cell_image], [len(ids)], tta)[0]


def _images(prepared: PreparedSet, layout: str, source: str):
    """(fold, store, row) of every image of the source labels' COCO files, fold order."""
    for fold, store in prepared.fold_stores(source, layout):
        for row in range(len(store)):
            yield fold, store, row


def _score_images(loaded, prepared: PreparedSet, name: str, layout: str, source: str, shard: Shard | None,
                  progress: bool) -> dict[tuple[int, int], tuple[dict, list[int], np.ndarray]]:
    """{(fold, image id): (image dict, cell ids, float32 [K, 19] scores)} of the images of ``shard``
    (all: None). Images come from the annotation stores; one image's cells are dicts at a time."""
    todo = [(fold, store, row) for fold, store, row in _images(prepared, layout, source)
            if shard is None or shard_of(store.image(row)["image_name"], shard[1]) == shard[0]]
    scored = {}
    for fold, store, row in tqdm(todo, desc=f"score cells ({name})", unit="img", disable=not progress):
        one = store.to_coco([row])
        image = one["images"][0]
        cells = {}
        for ann in one["annotations"]:
            cells.setdefault(ann["cell_id"], ann)
        conf = score_image_cells(loaded, prepared, image, cells) if cells else np.zeros((0, 19), np.float32)
        scored[(fold, image["id"])] = (image, sorted(cells), conf)
    return scored


def _part_path(prepared: PreparedSet, name: str, shard: Shard) -> Path:
    return prepared.labels_dir(name) / f"scores{shard_suffix(shard)}.npz"


def _score_part(loaded, prepared: PreparedSet, name: str, layout: str, source: str, shard: Shard, settings: dict,
                progress: bool) -> None:
    """A job array task's part: its images' cell scores -> coco_<name>/scores-shard<I>of<N>.npz
    (reused when it exists for the same model and layout)."""
    path = _part_path(prepared, name, shard)
    if _read_part(path, settings) is not None:
        log.info("%s: shard %d/%d already scored (%s)", name, *shard, path)
        return
    scored = _score_images(loaded, prepared, name, layout, source, shard, progress)
    keys = list(scored)
    ids = [scored[k][1] for k in keys]
    arrays = {"folds": np.array([k[0] for k in keys], np.int64), "image_ids": np.array([k[1] for k in keys], np.int64),
              "first": np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64),
              "cell_ids": np.array([c for i in ids for c in i], np.int64),
              "conf": (np.concatenate([scored[k][2] for k in keys]) if keys else np.zeros((0, 19))).astype(np.float32),
              "images": np.array(json.dumps([scored[k][0] for k in keys])),
              "settings": np.array(json.dumps({**settings, "shard": list(shard)}))}
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, **arrays)
    log.info("%s: shard %d/%d scored %d images -> %s; once every shard is done, run the same refine command "
             "with --merge", name, *shard, len(keys), path)


def _read_part(path: Path, settings: dict) -> dict | None:
    """A scores part's {(fold, image id): (image, ids, conf)}, or None when absent, damaged or
    made by another model or layout."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as part:
            saved = json.loads(str(part["settings"]))
            if {k: v for k, v in saved.items() if k != "shard"} != settings:
                log.info("%s was scored by another model or layout: not used", path)
                return None
            images, first = json.loads(str(part["images"])), part["first"]
            cell_ids, conf, folds, image_ids = part["cell_ids"], part["conf"], part["folds"], part["image_ids"]
    except (OSError, ValueError, KeyError) as exc:
        log.warning("%s is unreadable (%s): scoring that shard again", path, exc)
        return None
    return {(int(folds[k]), int(image_ids[k])): (images[k], cell_ids[first[k]:first[k + 1]].tolist(),
                                                 conf[first[k]:first[k + 1]])
            for k in range(len(images))}


def _gather_parts(prepared: PreparedSet, name: str, layout: str, source: str, settings: dict) -> dict | None:
    """The scores of every image from a complete set of shard parts (one N, every I), or None."""
    for count in complete_shard_counts(prepared.labels_dir(name), "scores", ".npz"):
        parts = [_read_part(_part_path(prepared, name, (i, count)), settings) for i in range(count)]
        if any(p is None for p in parts):
            continue
        merged = {k: v for p in parts for k, v in p.items()}
        order = [(fold, store.image(row)["id"]) for fold, store, row in _images(prepared, layout, source)]
        if set(order) != set(merged):
            log.warning("the %d scored shards of %s do not cover the prepared set's images: not used", count, name)
            continue
        log.info("%s: the cell scores of %d shards merged", name, count)
        return {key: merged[key] for key in order}
    return None


def check_label_set(prepared: PreparedSet, name: str, made_from: dict) -> None:
    """Refuse to replace ``coco_<name>`` when it was refined from anything else (another model or
    checkpoint, rule, or image labels): one name, one set of labels, whatever ran on it."""
    meta = prepared.refine_record_path(name)
    if not meta.is_file():
        return
    try:
        old = json.loads(meta.read_text()).get("made_from")
    except ValueError:
        old = None
    if old != made_from:
        diff = list(differences(old or {}, made_from)) if old else ["made by an earlier version, which did not record it"]
        raise ValueError(f"{prepared.labels_dir(name)} holds labels refined from other inputs ({'; '.join(diff[:3])}); "
                         "a run trained on them would continue on other labels: give another --name (e.g. "
                         f"{name}_2), or delete that folder to refine it again")


def refine_prepared(run_dir: str | os.PathLike, prepared_dir: str | os.PathLike, *, name: str,
                    held_out_folds: list[int], relative: float = 0.0, layout: str | None = None,
                    min_f1: float = MIN_HELD_OUT_F1, source: str = "image", checkpoint: str = "best.pt",
                    threshold: float | None = None, device: str = "auto", progress: bool = True,
                    shard: Shard | None = None, merge_only: bool = False, soft: str | None = None) -> RefineReport | None:
    """Relabel every cell of a prepared set with the model of ``run_dir`` (see module docstring).

    ``source``: the labels the refinement narrows down; always the image labels' COCO here
    (refining refined labels could only shrink them further). The threshold is chosen on the
    images of ``held_out_folds`` (the training run's validation fold: images it never trained on).
    ``relative``: a cell must also reach this share of its image's best cell score for a label.
    ``layout``: the COCO layout to refine; default: the one the run's head trains on.
    ``min_f1``: below this held-out image-label F1 the cells keep their image labels (see MIN_HELD_OUT_F1).
    ``threshold``: a fixed absolute threshold instead of the held-out choice (``choose_threshold``
    picks the threshold that best recovers image labels from each image's best cell, which is
    stricter than typical positive cells need); with ``relative`` it gives the relative rule
    alone, e.g. ``threshold=0, relative=0.25`` (RELATIVE_RULE, the cell-model default).
    ``layout``: None writes every layout the source labels have (the cells are the same).
    ``soft``: write the model's scores as soft targets instead of labels (distillation: a student
    trains its multilabel head to match them; ``weak.targets.soft_targets``, scale ``relative``
    or ``raw``), in the multilabel layout only; the threshold is still chosen and reported, and a
    model below ``min_f1`` still leaves the image labels.

    At scale, as a SLURM job array: ``shard=(I, N)`` scores the cells of shard I's images only
    into coco_<name>/scores-shard<I>of<N>.npz (a finished part is reused; returns None); then a
    call without ``shard`` (``merge_only`` insists) takes the complete set of parts instead of
    scoring, and chooses and writes the labels as one process would.
    """
    check_shard(shard)
    if merge_only and shard is not None:
        raise ValueError("--merge gathers every shard; give it without --shard")
    from hpa_scc.engine.inference import load_run, model_identity

    if name in ("image", "truth"):
        raise ValueError(f"refined labels need their own name, not {name!r} (e.g. refined_r1)")
    if not 0.0 <= relative <= 1.0:  # refine_labels checks it too, but only after every image is scored
        raise ValueError(f"relative must be in [0, 1] (a share of the image's best cell score), got {relative}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:  # nan too: it would make every cell Negative
        raise ValueError(f"threshold must be in [0, 1] (a cell score), got {threshold}")
    if soft is not None and soft not in SOFT_SCALES:
        raise ValueError(f"unknown soft target scale {soft!r}; choose one of {list(SOFT_SCALES)}")
    if soft is not None and layout not in (None, "multilabel"):
        raise ValueError(f"soft targets are label vectors: the multilabel layout holds them, not {layout!r}; "
                         "leave --layout out or give multilabel")
    prepared = PreparedSet(prepared_dir)
    absent = sorted(set(held_out_folds) - set(range(prepared.n_folds)))
    if absent:  # now, not after every cell is scored
        raise ValueError(f"--held-out-folds {' '.join(map(str, absent))}: {prepared.root} has {prepared.n_folds} "
                         f"fold(s) (0-{prepared.n_folds - 1}); give the run's data.val_fold")
    loaded = load_run(run_dir, checkpoint, device)
    # What the label set is made from. A set refined before from anything else is never replaced:
    # a run may have trained on it, and its resume would silently continue on other labels.
    made_from = {"model": model_identity(loaded), "source": source, "source_data": prepared.data_digest(source),
                 "threshold": threshold, "relative": relative, "min_f1": min_f1,
                 "held_out_folds": sorted(held_out_folds), "layout": layout}
    if soft is not None:  # only then: label sets refined before soft targets existed keep their record
        made_from["soft"] = soft
    check_label_set(prepared, name, made_from)
    layouts = [layout] if layout else list(prepared.layouts(source))
    if soft is not None:
        layouts = [kind for kind in layouts if kind == "multilabel"]
    if not layouts:
        raise FileNotFoundError(f"no COCO files in {prepared.labels_dir(source)}; build them with "
                                f"'python dataset.py DATA_DIR {prepared.root}'")
    layout = layouts[0]
    # the scores of a part are reused only for the same model and the same cells
    settings = {"model": model_identity(loaded), "layout": layout, "source": source,
                "cells": cells_fingerprint((store, row) for _, store, row in _images(prepared, layout, source))}
    if shard is not None:
        _score_part(loaded, prepared, name, layout, source, shard, settings, progress)
        return None
    scored = _gather_parts(prepared, name, layout, source, settings)
    if scored is None:
        if merge_only:
            raise FileNotFoundError(f"cannot merge the scores of {prepared.labels_dir(name)}: no complete set of "
                                    "shards scored by this model from these cells; run every shard (--shard I/N) first")
        scored = _score_images(loaded, prepared, name, layout, source, None, progress)
    image_fold = {image["id"]: fold for (fold, _), (image, _, _) in scored.items()}

    held = [(img["labels"], conf) for (fold, _), (img, ids, conf) in scored.items()
            if fold in held_out_folds and img.get("labels") and ids]
    if not held:
        raise ValueError(f"no held-out images with labels and cells in folds {held_out_folds} of {prepared}; "
                         "the threshold is chosen on them")
    chosen, f1 = choose_threshold([h[0] for h in held], [h[1] for h in held])
    threshold = chosen if threshold is None else threshold
    kept = f1 < min_f1
    if kept:
        log.warning("%s: the model of %s recovers the held-out images' labels with F1 %.3f only (< %.2f): its "
                    "cell scores are not trusted yet and the cells keep their image labels (train longer "
                    "before refining, or lower min_f1)", name, run_dir, f1, min_f1)
        threshold, relative = 0.0, 0.0

    # Cells, their image labels, scores and (synthetic sets) true labels, for the truth comparison.
    truth = prepared.true_cell_labels()
    evaluated = []
    if truth:
        missing = [(img["image_name"], c) for img, ids, _ in scored.values() for c in ids
                   if (img["image_name"], c) not in truth]
        if missing:
            log.warning("%s: %d cells (e.g. %s) are not in %s; no comparison with the true labels", name,
                        len(missing), missing[0], prepared.labels_dir("truth"))
        else:
            evaluated = [(img["labels"], conf, [truth[(img["image_name"], c)] for c in ids])
                         for img, ids, conf in scored.values() if ids]

    soft = None if kept else soft  # an untrusted model's scores are not targets either
    targets = {key: dict(zip(ids, soft_targets(image["labels"], conf, soft), strict=True))
               for key, (image, ids, conf) in scored.items() if ids} if soft else {}
    if soft:  # the labels the targets hold at >= SOFT_CUT, for the counts and the truth comparison
        new_labels = {key: {c: np.flatnonzero(v >= SOFT_CUT).tolist() or [18] for c, v in cells.items()}
                      for key, cells in targets.items()}
    else:
        new_labels = {key: dict(zip(ids, refine_labels(image["labels"], conf, threshold, relative), strict=True))
                      for key, (image, ids, conf) in scored.items() if ids}
    counts: Counter = Counter()
    for image, ids, _ in scored.values():
        if ids:
            new = new_labels[(image_fold[image["id"]], image["id"])]
            counts["cells"] += len(ids)
            counts["before"] += len(ids) * len(set(image["labels"]))
            counts["after"] += sum(len(labels) for labels in new.values())
            counts["negative"] += sum(labels == [18] and 18 not in image["labels"] for labels in new.values())
    # made_from first: a crash while the label files are written leaves them vouched for by the
    # inputs being written, so the same command finishes them and another is refused
    write_text_atomic(prepared.refine_record_path(name), json.dumps({"made_from": made_from, "complete": False},
                                                                    indent=2))
    for out_layout in layouts:
        out_base = prepared.labels_dir(name) / out_layout
        for fold, path in prepared.fold_files(out_layout, source):
            coco = json.loads(path.read_text())
            by_image = cells_of(coco)
            annotations = []
            for image in coco["images"]:
                new = new_labels.get((fold, image["id"]))
                if not new:
                    continue
                cells = by_image[image["id"]]
                instances = (soft_instances(targets[(fold, image["id"])]) if soft else cell_instances(new, out_layout))
                for inst in instances:
                    annotations.append(cell_annotation(len(annotations) + 1, image["id"], inst, cells[inst.cell_id],
                                                       ids_first=False))
            info = {**coco["info"], "labels": (f"soft targets from the cell scores of {run_dir} ({soft} scale)" if soft
                                               else f"image labels refined by {run_dir} (threshold {threshold:.2f}, "
                                                    f"relative {relative:.2f})")}
            write_coco(out_base / path.name, {**coco, "info": info, "annotations": annotations})
    report = RefineReport(name, threshold, f1, counts["cells"], counts["before"], counts["after"], counts["negative"],
                          relative, kept, soft=soft)
    sweep = []
    if evaluated:
        def quality(t: float, r: float) -> dict:
            pred = [cell for labels, conf, _ in evaluated for cell in refine_labels(labels, conf, t, r)]
            return label_quality(pred, [cell for _, _, true in evaluated for cell in true])

        auc, _ = within_image_auc(*zip(*evaluated, strict=True))
        report.truth_auc = None if np.isnan(auc) else auc
        report.truth_before = quality(0.0, 0.0)  # threshold 0 keeps every image label: the weak labels
        if soft:
            hard = [new_labels[(image_fold[img["id"]], img["id"])] for img, ids, _ in scored.values() if ids]
            report.truth_after = label_quality([cells[c] for cells in hard for c in sorted(cells)],
                                               [cell for _, _, true in evaluated for cell in true])
        else:
            report.truth_after = quality(threshold, relative)
        sweep = [{"threshold": t, "relative": r, **quality(t, r)} for t in SWEEP_THRESHOLDS for r in SWEEP_RELATIVE]
    write_text_atomic(prepared.refine_record_path(name),
                      json.dumps({**report.__dict__, "min_f1": min_f1, "run_dir": str(run_dir),
                                  "held_out_folds": held_out_folds, "layout": layout, "sweep": sweep,
                                  "made_from": made_from}, indent=2))
    log.info(report.summary())
    return report


def refine_rounds(run_dir: str | os.PathLike, prepared_dir: str | os.PathLike, *, name: str, rounds: int,
                  progress: bool = True, **options) -> tuple[str, list[RefineReport]]:
    """Refinement rounds: round 1 refines with the model of ``run_dir`` into ``coco_<name>1``;
    round k trains ``run_dir``'s config again on round k-1's labels (into
    ``PREPARED/coco_<name><k-1>/model``, inside what refine owns) and refines with it into
    ``coco_<name><k>``. The rounds stop at ``rounds`` or as soon as a round's held-out
    image-label F1 (``RefineReport.held_out_f1``: how well the model's best cell per held-out
    image recovers the image's labels, chosen without any cell's truth) is no better than the
    round before; the labels to train on are those of the best round. ``options`` are
    ``refine_prepared``'s (``held_out_folds`` defaults to the run's validation fold).

    Returns (the best round's label name, every round's report). Each round resumes: a finished
    round's labels are reused when made from the same model (``check_label_set``) and a
    finished fit is not refitted (train's resume).
    """
    from hpa_scc.config import load_config
    from hpa_scc.engine.train import train

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    prepared = PreparedSet(prepared_dir)
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: refinement rounds retrain the run's config; give a run folder "
                                "made by 'train'")
    val_fold = load_config(config).data.val_fold
    if "held_out_folds" not in options:
        if val_fold < 0:
            raise ValueError(f"{run_dir} trained on every fold (data.val_fold=-1): no held-out images to stop the "
                             "rounds on; train with data.val_fold=K or give held_out_folds")
        options["held_out_folds"] = [val_fold]
    reports: list[RefineReport] = []
    model_dir = Path(run_dir)
    for k in range(1, rounds + 1):
        if k > 1:
            model_dir = prepared.labels_dir(f"{name}{k - 1}") / "model"
            cfg = load_config(config, [f"data.labels={name}{k - 1}", f"train.run_dir={model_dir}",
                                       f"data.prepared_dir={prepared.root}"])
            train(cfg, progress=progress)
        report = refine_prepared(model_dir, prepared.root, name=f"{name}{k}", progress=progress, **options)
        reports.append(report)
        log.info("round %d: held-out image-label F1 %.4f", k, report.held_out_f1)
        if k > 1 and report.held_out_f1 <= reports[-2].held_out_f1:
            break
    best = max(range(len(reports)), key=lambda i: (reports[i].held_out_f1, -i))
    log.info("refinement rounds: %s%d has the best held-out image-label F1 (%.4f) of %d round(s): train with "
             "data.labels=%s%d", name, best + 1, reports[best].held_out_f1, len(reports), name, best + 1)
    return f"{name}{best + 1}", reports
