"""Weak supervision, measured cell by cell: per-cell labels learned from image labels alone.

    .venv/bin/python bench/weak_supervision.py --out runs/weak                      # CPU protocol, default methods
    .venv/bin/python bench/weak_supervision.py --out runs/weak-s7 --train-seed 7 --test-seed 7007
    .venv/bin/python bench/weak_supervision.py --out runs/weak --methods features features-refined cell
    python bench/weak_supervision.py --profile gpu --out runs/weak-gpu              # 600/150 images at 512 px
    .venv/bin/python bench/weak_supervision.py --out runs/weak29 --train-seed 100 --test-seed 5100 --seeds 5 \
        --methods features features-oracle features-mil features-mil-refined boosted-mil-refined features-mil-ensemble
                         # 5 seed pairs (100/5100 .. 104/5104): OUT/pair-*/, OUT/summary.md (mean +- sd, min)

The protocol (docs/RESULTS.md):
1. a synthetic train set and a separate synthetic test set (other seed), both with single-cell
   variability: the cells of one image show different subsets of the image's labels;
2. the train set prepared once with the builtin segmenter (cells, cache, COCO in 3 folds, both
   layouts, plus the oracle's true cell labels); the test set is segmented by the same
   segmenter when predicted;
3. each method trains with the train command's code (configs/ + overrides) and predicts the test
   set with ``predict`` (segmenter cells, all 19 scores per cell); the competition metric scores
   it, and since the test cells' true labels are known, the within-image AUC says how well the
   cells of one image are ranked (0.5 = chance, what image labels alone give).

Methods (``--methods``; ``-oracle`` trains on the true cell labels, ``-refined`` on the labels the
features model refined, ``features_r1``):
- baselines: ``image-labels`` (every cell its image's labels), ``random``, ``truth`` (must be 1.0);
- ``features``, ``features-oracle``, ``features-refined``: per-cell features + logistic
  regressions (model.family=features). ``features-refined``: a features model fitted on folds
  1-2 scores every training cell; a cell keeps an image label when it scores at least
  ``--relative`` (0.25) x the image's best cell for it (``refine --threshold 0 --relative``); then
  refitted on all folds;
- ``cell``, ``cell-oracle``, ``cell-refined``: ResNet-18 on masked 64 px cell crops
  (configs/cell_resnet18.yaml); folds 1-2 train, fold 0 validates (its weak labels) and picks the
  epoch (best.pt);
- ``ensemble``: cell-refined and features-refined averaged per cell (``predict --ensemble``);
  ``ensemble-oracle`` the same two trained on the true labels;
- multiple-instance learning (``weak.mil``): ``features-mil`` (the logistic features model fitted
  by the MIL loss, log-sum-exp pooling; its image-label twin: ``features``),
  ``features-mil-attention`` (attention pooling), ``cell-mil`` (the crop ResNet-18 on whole images,
  MIL loss; twin: ``cell``); ``mil_r1``: the labels a ``features-mil`` model fitted on folds 1-2
  refines (relative rule), trained on by ``features-mil-refined``, ``boosted-mil-refined`` and
  ``cell-mil-refined``;
- gradient-boosted trees on the same features (``configs/cell_features_boosted.yaml``):
  ``boosted``, ``boosted-oracle``, ``boosted-refined`` (features_r1), ``boosted-mil-refined``;
- ``features-mil-soft``, ``boosted-mil-soft``: the logistic and boosted features models fitted to
  ``mil_soft``'s soft targets (each cell a positive row weighted by its target and a negative one
  by the rest: distillation into the features models);
- ``features-mil-ensemble``: features-mil-refined and boosted-mil-refined averaged per cell (the
  method before ``mil-teacher-student``; both chosen on seed pairs the report does not use);
  ``features-ensemble-oracle``: the same two on the true labels; ``mil-teacher-student``:
  features-mil (the MIL model, the teacher that refines mil_r1) and boosted-mil-refined (its
  student) averaged per cell; its oracle is features-ensemble-oracle, its image-label twin
  ``teacher-student`` (features and boosted-refined: the logistic model on image labels and the
  boosted trees on the labels it refined); ``mil-teacher-students`` adds features-mil-refined;
- ``maskrcnn:BACKBONE``, ``maskrcnn-oracle:BACKBONE``, ``maskrcnn-refined:BACKBONE``: Mask R-CNN,
  multilabel head, segmenter cells scored through the RoI heads (``--cell-scoring boxes``).
  ``maskrcnn-refined`` trains on features_r1 and starts from a cell-level CNN of its own trunk
  (DenseNet121, ResNet101 or ResNeXt101_32x8d: ``models.detector.CELL_TRUNKS``) trained on 48 px
  crops of the same labels (``model.weights`` = its checkpoint): what the detector gets from the
  cell model; ``maskrcnn-mil-refined`` the same on mil_r1 (its init: the cell CNN on mil_r1);
  ``maskrcnn-distilled`` (distillation): the
  same init, trained to match the MIL features model's cell scores as soft targets
  (``mil_soft``: ``refine --soft relative`` with the model that refines mil_r1; the ablation of
  soft against hard targets is ``maskrcnn-mil-refined``); any detector kind with ``-mask``
  (``maskrcnn-mil-refined-mask``, ``maskrcnn-oracle-mask``): the same with
  ``model.label_pooling=mask`` (the label head reads the cell's mask-weighted RoI features, not
  its whole box); with ``-feat`` (``maskrcnn-mil-refined-feat``): ``model.cell_features=true``
  (the label head also reads each cell's hand-made features); ``--set det_cell_init=0`` trains
  the refined / distilled kinds' trunk from random init instead of the cell model
  (the row records its run folder, whose name says which); ``--set det_label_loss=sum`` sums the
  label head's BCE over a cell's classes (``model.label_loss=sum``, folder suffix ``-sumloss``);
  ``--set det_head_init=1`` starts a ``-feat`` detector's cell-features layer as the logistic
  features model on the row's hard labels (``model.cell_features_init``: ``features-mil-refined``'s
  run for ``maskrcnn-mil-refined-feat``; folder suffix ``-featinit``);
- any method with ``+fusion`` also predicts with ``--image-fusion 0.3``; a detector or crop-CNN
  row with ``+boosted`` (e.g. ``maskrcnn-mil-refined:densenet121_fpn+boosted``) predicts as an
  ensemble with the boosted student ``boosted-mil-refined`` (an oracle row: with ``boosted-oracle``),
  whatever labels the row itself trained on; each cell the mean of the two models' scores
  (``predict --ensemble``).

Writes OUT/results.json (one record per row: method, variant (a detector's budget keys that changed
it, e.g. ``scratch-sumloss``: the row is named ``method [variant]`` in the tables and summaries, so
variants never replace or average with each other), mAP, within_image_auc, seconds = training,
predict_seconds), OUT/results.md (with each weak row over its own oracle and over the pair's best
oracle row) and OUT/per_class_ap.png. Every step resumes. ``--seeds K`` runs K pairs (train seed
+ i, test seed + i) into OUT/pair-<train>-<test>/ and writes OUT/summary.json and OUT/summary.md:
per row the mean +- sd (n-1), min and max over the pairs, and the smallest ratio of a weak row to
the best oracle row of its pair; ``--summary-only`` summarises the saved pairs again (rows added
by later invocations included).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from hpa_scc.config import BACKBONE_NAMES, load_config
from hpa_scc.constants import NUM_CLASSES, SHORT_CLASS_NAMES
from hpa_scc.utils.fileio import write_text_atomic
from hpa_scc.utils.provenance import file_digest
from hpa_scc.evaluation.metric import evaluate_files
from hpa_scc.apps.predict import predict_folder
from hpa_scc.apps.prepare import prepare_dataset
from hpa_scc.data.synth import read_true_cell_labels
from hpa_scc.apps.refine import RELATIVE_RULE, refine_prepared
from hpa_scc.data.images import read_labels, seg_paths
from hpa_scc.data.synth import write_synth_set
from hpa_scc.models.detector import CELL_TRUNKS
from hpa_scc.weak.targets import transfer_labels, within_image_auc
from hpa_scc.engine.train import train

REPO = Path(__file__).resolve().parents[1]
PROFILES = {
    # 2 CPU cores: every method of DEFAULT_METHODS in about an hour
    "cpu": {"train_images": 48, "test_images": 24, "size": 256, "workers": 2,
            "cell_epochs": 30, "cell_batch": 64, "crop_size": 64,
            "det_epochs": 40, "det_batch": 2, "det_lr": 0.01, "det_warmup": 50, "det_cell_init": 1, "det_label_loss": "mean",
            "det_head_init": 0},
    # one GPU: 512 px, the real task's cache size
    "gpu": {"train_images": 600, "test_images": 150, "size": 512, "workers": 8,
            "cell_epochs": 30, "cell_batch": 256, "crop_size": 96,
            "det_epochs": 24, "det_batch": 8, "det_lr": 0.02, "det_warmup": 100, "det_cell_init": 1, "det_label_loss": "mean",
            "det_head_init": 0},
}
# Detector config differences per profile: heads sized for ~20 cells per image (2.4x faster per
# CPU step than COCO's defaults at 256 px).
DET_CONFIG = {
    "cpu": ["model.rpn_post_nms_top_n_train=256", "model.rpn_post_nms_top_n_test=200",
            "model.box_batch_size_per_image=128"],
    "gpu": ["model.rpn_post_nms_top_n_train=512", "model.rpn_post_nms_top_n_test=300",
            "model.box_batch_size_per_image=256"],
}
DEFAULT_METHODS = ["image-labels", "random", "features", "features-oracle", "features-refined", "cell", "cell-oracle",
                   "cell-refined", "ensemble", "ensemble-oracle", "maskrcnn-refined:densenet121_fpn", "truth"]
BASELINES = ("image-labels", "random", "truth")
REFINED = "features_r1"  # labels refined by the logistic features model (image labels, folds 1-2)
MIL_REFINED = "mil_r1"  # labels refined by the MIL features model (log-sum-exp, folds 1-2)
MIL_SOFT = "mil_soft"  # that model's cell scores as soft targets (refine --soft relative): distillation
# The features-based rows: method -> (config, overrides, training labels); None = a refined set
FEATURE_ROWS = {
    "features": ("cell_features.yaml", [], "image"),
    "features-oracle": ("cell_features.yaml", [], "truth"),
    "features-refined": ("cell_features.yaml", [], REFINED),
    "features-mil": ("cell_features_mil.yaml", [], "image"),
    "features-mil-attention": ("cell_features_mil.yaml", ["model.mil=attention"], "image"),
    "features-mil-refined": ("cell_features.yaml", [], MIL_REFINED),
    "boosted": ("cell_features_boosted.yaml", [], "image"),
    "boosted-oracle": ("cell_features_boosted.yaml", [], "truth"),
    "boosted-refined": ("cell_features_boosted.yaml", [], REFINED),
    "boosted-mil-refined": ("cell_features_boosted.yaml", [], MIL_REFINED),
    # distilled: fitted to the MIL model's soft targets (weighted rows) instead of its hard labels
    "features-mil-soft": ("cell_features.yaml", [], MIL_SOFT),
    "boosted-mil-soft": ("cell_features_boosted.yaml", [], MIL_SOFT),
}
# Per-cell means of two features rows' scores (predict --ensemble)
FEATURE_ENSEMBLES = {"features-mil-ensemble": ("features-mil-refined", "boosted-mil-refined"),
                     # the MIL model itself (the teacher) and the boosted trees on the labels it refined
                     "mil-teacher-student": ("features-mil", "boosted-mil-refined"),
                     "mil-teacher-students": ("features-mil", "features-mil-refined", "boosted-mil-refined"),
                     # its image-label twin: the logistic model on image labels and the boosted trees on
                     # the labels it refined (features_r1)
                     "teacher-student": ("features", "boosted-refined"),
                     "features-ensemble-oracle": ("features-oracle", "boosted-oracle")}
CELL_METHODS = (*FEATURE_ROWS, *FEATURE_ENSEMBLES, "cell", "cell-oracle", "cell-refined", "cell-mil", "cell-mil-refined",
                "ensemble", "ensemble-oracle")
# Each row's twin trained on the true cell labels (the "/ its oracle" column)
ORACLE_OF = {"features": "features-oracle", "boosted": "boosted-oracle", "cell": "cell-oracle",
             "ensemble": "ensemble-oracle", "features-mil-ensemble": "features-ensemble-oracle",
             "mil-teacher-student": "features-ensemble-oracle", "mil-teacher-students": "features-ensemble-oracle",
             "teacher-student": "features-ensemble-oracle",
             "maskrcnn": "maskrcnn-oracle"}
# each also with "-mask": model.label_pooling=mask (e.g. maskrcnn-mil-refined-mask:densenet121_fpn), and with
# "-feat": model.cell_features=true (the label head also reads each cell's hand-made features), or both
DETECTOR_KINDS = ("maskrcnn", "maskrcnn-oracle", "maskrcnn-refined", "maskrcnn-mil-refined", "maskrcnn-distilled")
DETECTOR_OPTIONS = {"-mask": "model.label_pooling=mask", "-feat": "model.cell_features=true"}


def detector_kind(kind: str) -> tuple[str, list[str]]:
    """(the detector kind, its option suffixes in a fixed order) of e.g. ``maskrcnn-oracle-feat``."""
    options: list[str] = []
    while kind.endswith(tuple(DETECTOR_OPTIONS)):
        suffix = next(o for o in DETECTOR_OPTIONS if kind.endswith(o))
        if suffix in options:  # each option once: maskrcnn-mask-mask stays unknown
            break
        options.append(suffix)
        kind = kind.removesuffix(suffix)
    return kind, sorted(options)


def split_method(method: str) -> tuple[str, bool, bool]:
    """(the row's own model, +fusion, +boosted) of a method name: suffixes in either order."""
    fusion = boosted = False
    while method.endswith(("+fusion", "+boosted")):
        fusion |= method.endswith("+fusion")
        boosted |= method.endswith("+boosted")
        method = method.rsplit("+", 1)[0]
    return method, fusion, boosted


def method_error(method: str) -> str | None:
    """Why ``method`` is not a row this protocol can measure (None when it is), checked before
    anything is trained so that a typo in the last method does not surface an hour in."""
    base, _, boosted = split_method(method)
    if boosted and not base.startswith(("cell", "maskrcnn")):
        return f"method {method!r}: +boosted ensembles a crop-CNN or detector row with the boosted features model"
    if base in BASELINES or base in CELL_METHODS:
        return None
    kind, colon, backbone = base.partition(":")
    if detector_kind(kind)[0] in DETECTOR_KINDS:
        if not colon or not backbone:
            return f"method {method!r}: name the backbone, e.g. {kind}:densenet121_fpn"
        if backbone not in BACKBONE_NAMES:
            return f"method {method!r}: unknown backbone {backbone!r}; choose from {', '.join(BACKBONE_NAMES)}"
        return None
    return (f"unknown method {method!r}; choose from {', '.join(BASELINES + CELL_METHODS)} or "
            f"{'|'.join(DETECTOR_KINDS)}[-mask][-feat]:BACKBONE, any of them with +fusion (CNN rows: +boosted)")
FUSION = 0.3


class Protocol:
    def __init__(self, out: Path, p: dict, profile: str, relative: float, seed: int):
        self.out, self.p, self.profile, self.relative, self.seed = out, p, profile, relative, seed
        self.train_set, self.test_set, self.prepared = out / "train-set", out / "test-set", out / "prepared"
        self.seconds: dict[str, float] = {}

    def prepare(self, train_seed: int, test_seed: int) -> None:
        p = self.p
        write_synth_set(self.train_set, p["train_images"], size=p["size"], seed=train_seed, workers=p["workers"],
                        progress=False)
        write_synth_set(self.test_set, p["test_images"], size=p["size"], seed=test_seed, workers=p["workers"],
                        progress=False)
        prepare_dataset(self.train_set, self.prepared, size=p["size"], segmenter="builtin", n_folds=3, seed=self.seed,
                        workers=p["workers"], progress=False)

    def _train(self, key: str, config: str, overrides: list[str], inputs: tuple[Path, ...] = ()) -> Path:
        """``inputs``: files the run starts from (a checkpoint it initialises from): their contents,
        not only their paths, must match for a finished run to be reused."""
        run_dir = self.out / "runs" / key.replace(":", "-")
        cfg = load_config(REPO / "configs" / config, [
            f"data.prepared_dir={self.prepared}", f"train.run_dir={run_dir}",
            f"data.workers={self.p['workers']}", "train.tensorboard=false", "train.save_every_epochs=1000",
            f"train.seed={self.seed}", *overrides])
        stamp = run_dir / "bench_seconds.txt"  # the training's own time, kept for resumed invocations
        # what the run was trained with: a finished run is reused only for the same config file and overrides
        settings = {"config": (REPO / "configs" / config).read_text(), "overrides": overrides}
        if inputs:
            settings["inputs"] = {str(path): file_digest(path) for path in inputs}
        record = run_dir / "bench_settings.json"
        if stamp.is_file() and record.is_file() and json.loads(record.read_text()) != settings:
            raise SystemExit(f"{run_dir} was trained with other settings ({record}: configs/{config}, the "
                             "overrides or the files it starts from changed); use a new --out")
        if not stamp.is_file():
            start = time.perf_counter()
            print(f"  train {key}", flush=True)
            train(cfg, progress=False)
            write_text_atomic(record, json.dumps(settings, indent=2))
            write_text_atomic(stamp, f"{time.perf_counter() - start:.1f}\n")
        self.seconds[key] = float(stamp.read_text())
        return run_dir

    def features(self, labels: str, val_fold: int = -1, key: str | None = None, config: str = "cell_features.yaml",
                 overrides: tuple[str, ...] = ()) -> Path:
        return self._train(key or f"{Path(config).stem}-{labels}" + "".join(f"-{o.split('=')[-1]}" for o in overrides),
                           config, [f"data.labels={labels}", f"data.val_fold={val_fold}", *overrides])

    def refined_labels(self, name: str = REFINED) -> str:
        """A refinement round: a features model fitted on the image labels of folds 1-2 (logistic
        for features_r1, MIL for mil_r1) scores every training cell; a cell keeps an image label
        where it scores at least ``relative`` x the image's best cell for it."""
        report = self.prepared / f"coco_{name}" / "refine.json"
        if not report.is_file():
            config = {REFINED: "cell_features.yaml", MIL_REFINED: "cell_features_mil.yaml",
                      MIL_SOFT: "cell_features_mil.yaml"}[name]
            run = self.features("image", val_fold=0, key=f"{Path(config).stem}-image-fold0", config=config)
            start = time.perf_counter()
            result = refine_prepared(run, self.prepared, name=name, held_out_folds=[0], threshold=0.0,
                                     relative=self.relative, min_f1=0.0, progress=False,
                                     soft="relative" if name == MIL_SOFT else None)
            self.seconds[f"refine-{name}"] = time.perf_counter() - start
            print(f"  {result.summary()}", flush=True)
        saved = json.loads(report.read_text())
        if saved["relative"] != self.relative:
            raise SystemExit(f"{report} was made with --relative {saved['relative']}; use a new --out")
        return name

    def feature_row(self, method: str) -> Path:
        config, overrides, labels = FEATURE_ROWS[method]
        if labels in (REFINED, MIL_REFINED, MIL_SOFT):
            labels = self.refined_labels(labels)
        return self.features(labels, config=config, overrides=tuple(overrides))

    def cell(self, labels: str, backbone: str = "resnet18", crop_size: int | None = None, mil: bool = False) -> Path:
        """A cell-level CNN; fold 0 validates (weak labels) and picks best.pt: early stopping, which
        a few hundred cells need (every fold and the last epoch: 0.77 vs 0.82 on the seed-0 set).
        ``mil``: trained on whole images by the MIL loss (configs/cell_resnet18_mil.yaml, its
        images per step: about the cells per step of the other rows)."""
        crop = crop_size or self.p["crop_size"]
        key = f"cell-{backbone}-{crop}px-{labels}-val0" + ("-mil" if mil else "")
        val_fold = 0
        batch = [] if mil else [f"train.images_per_gpu={self.p['cell_batch']}"]
        return self._train(key, "cell_resnet18_mil.yaml" if mil else "cell_resnet18.yaml", [
            f"model.backbone={backbone}", f"data.labels={labels}", f"data.crop_size={crop}", f"data.val_fold={val_fold}",
            f"train.max_epochs={self.p['cell_epochs']}", *batch])

    def maskrcnn(self, backbone: str, labels: str, weights: Path | None = None, options: tuple[str, ...] = (),
                 head_init: Path | None = None) -> Path:
        """A detector; ``options``: suffixes of DETECTOR_OPTIONS (-mask, -feat); ``weights``: the cell
        model whose trunk it starts from; ``head_init``: a features model's checkpoint that starts the
        ``-feat`` head's cell-features layer. A finished run is reused only while both files are unchanged."""
        names = {"-mask": "-maskpool", "-feat": "-cellfeat"}
        key = f"maskrcnn-{backbone}-{labels}" + ("-cellinit" if weights else "") + "".join(names[o] for o in options)
        p = self.p
        if p["det_label_loss"] != "mean":
            key += f"-{p['det_label_loss']}loss"
        if head_init:
            key += "-featinit"
        return self._train(key, f"{backbone}.yaml", [
            f"data.labels={labels}", "data.val_fold=0", f"train.max_epochs={p['det_epochs']}",
            f"train.images_per_gpu={p['det_batch']}", f"optim.lr={p['det_lr']}", f"optim.warmup_iters={p['det_warmup']}",
            f"train.val_every_epochs={p['det_epochs']}", "model.head=multilabel",
            f"model.weights={weights if weights else 'null'}", *DET_CONFIG[self.profile],
            *([f"model.label_loss={p['det_label_loss']}"] if p["det_label_loss"] != "mean" else []),
            *([f"model.cell_features_init={head_init}"] if head_init else []),
            *[DETECTOR_OPTIONS[o] for o in options]], inputs=tuple(f for f in (weights, head_init) if f))

    def run(self, method: str) -> dict:
        """Train what ``method`` needs (resumable) and predict + score the test set."""
        base, fusion, boosted = split_method(method)
        options: dict = {"image_fusion": FUSION if fusion else 0.0}
        trained = []
        head_init = None
        if base in BASELINES:
            options.update(run_dir=None, baseline=base)
        elif base in FEATURE_ROWS:
            options["run_dir"] = self.feature_row(base)
        elif base in FEATURE_ENSEMBLES:
            first, *others = FEATURE_ENSEMBLES[base]
            options.update(run_dir=self.feature_row(first), ensemble=[self.feature_row(o) for o in others])
            trained += [Path(o).name for o in options["ensemble"]]
        elif base in ("cell", "cell-oracle", "cell-refined"):
            labels = {"cell": "image", "cell-oracle": "truth", "cell-refined": None}[base]
            options["run_dir"] = self.cell(labels or self.refined_labels())
        elif base == "cell-mil":
            options["run_dir"] = self.cell("image", mil=True)
        elif base == "cell-mil-refined":  # the crop CNN on the labels the MIL features model refined
            options["run_dir"] = self.cell(self.refined_labels(MIL_REFINED))
        elif base in ("ensemble", "ensemble-oracle"):
            labels = self.refined_labels() if base == "ensemble" else "truth"
            options.update(run_dir=self.cell(labels), ensemble=[self.features(labels)])
        elif base.startswith("maskrcnn"):
            kind, _, backbone = base.partition(":")
            kind, det_options = detector_kind(kind)
            if kind in ("maskrcnn-refined", "maskrcnn-mil-refined", "maskrcnn-distilled"):
                # the trunk starts from the cell CNN of its architecture on the row's hard labels (unless
                # --set det_cell_init=0); the head trains on them, or (distilled) on the MIL model's soft targets
                refined = self.refined_labels(REFINED if kind == "maskrcnn-refined" else MIL_REFINED)
                targets = self.refined_labels(MIL_SOFT) if kind == "maskrcnn-distilled" else refined
                weights = None
                trunk = next((b for b, (detectors, _) in CELL_TRUNKS.items() if backbone in detectors), None)
                if trunk and self.p["det_cell_init"]:  # the cell CNN of the detector's own trunk
                    weights = self.cell(refined, trunk, crop_size=48) / "best.pt"
                    trained.append(f"cell-{trunk}-48px-{refined}-val0")
                if self.p["det_head_init"] and "-feat" in det_options:  # the logistic model on the same hard labels
                    head_init = self.features(refined) / "best.pt"
                    trained.append(f"cell_features-{refined}")
                options["run_dir"] = self.maskrcnn(backbone, targets, weights, tuple(det_options), head_init)
            else:
                labels = {"maskrcnn": "image", "maskrcnn-oracle": "truth"}[kind]
                options["run_dir"] = self.maskrcnn(backbone, labels, options=tuple(det_options))
        else:
            raise SystemExit(method_error(method))
        if boosted:  # the row's model and the boosted student (an oracle row: the boosted oracle), averaged per cell
            partner = self.feature_row("boosted-oracle" if "oracle" in base else "boosted-mil-refined")
            options["ensemble"] = [*options.get("ensemble", []), partner]
            trained.append(partner.name)
        seconds = sum(v for k, v in self.seconds.items() if options.get("run_dir") and (
            k.replace(":", "-") == Path(options["run_dir"]).name or k in trained))
        # budget keys that change the detector: their own predictions, and their own row (row_key)
        variant = "-".join(([] if self.p["det_cell_init"] else ["scratch"])
                           + ([] if self.p["det_label_loss"] == "mean" else [f"{self.p['det_label_loss']}loss"])
                           + (["featinit"] if head_init else [])) if base.startswith("maskrcnn") else ""
        out = self.out / "predict" / (method.replace(":", "-").replace("+", "-") + (f"-{variant}" if variant else ""))
        start = time.perf_counter()
        submission = predict_folder(data_dir=self.test_set, out_dir=out, progress=False, workers=self.p["workers"],
                                    **options)
        predict_seconds = time.perf_counter() - start
        result = evaluate_files(self.test_set / "solution.csv", submission, out / "metrics.json")
        auc = None if base in ("truth", "image-labels") else test_auc(self.test_set, out)
        epochs = (self.p["det_epochs"] if base.startswith("maskrcnn") else
                  self.p["cell_epochs"] if base.startswith(("cell", "ensemble")) else None)
        row = {"method": method, "variant": variant or None, "mAP": result.mAP, "within_image_auc": auc,
               "seconds": round(seconds, 1), "epochs": epochs, "run": Path(options["run_dir"]).name if options.get("run_dir") else None,
               "predict_seconds": round(predict_seconds, 1),
               "per_class": {c: (None if math.isnan(result.per_class_ap[c]) else result.per_class_ap[c])
                             for c in range(NUM_CLASSES)}}
        print(f"  {method:<40} mAP {result.mAP:.4f}" + (f"  within-image AUC {auc:.3f}" if auc is not None else ""),
              flush=True)
        return row


def test_auc(test_set: Path, pred_dir: Path) -> float | None:
    """Within-image AUC of a prediction's cell scores against the test cells' true labels
    (each segmenter cell takes the labels of the true cell it overlaps most)."""
    true_labels = read_true_cell_labels(test_set)
    table: dict[str, dict[int, np.ndarray]] = {}
    with open(pred_dir / "cells.csv") as fh:
        next(fh)
        for line in fh:
            parts = line.rstrip("\n").split(",")
            table.setdefault(parts[0], {})[int(parts[1])] = np.array(parts[7:7 + NUM_CLASSES], np.float32)
    image_labels, confs, truths = [], [], []
    for image_id, cells in table.items():
        seg = read_labels(seg_paths(pred_dir / "segmentation", image_id, fanout=True)[1])
        truth = read_labels(test_set / "masks" / f"{image_id}.png")
        moved = transfer_labels(seg, truth, true_labels[image_id])
        ids = sorted(cells)
        image_labels.append(sorted({c for labels in true_labels[image_id].values() for c in labels}))
        confs.append(np.stack([cells[k] for k in ids]))
        truths.append([moved.get(k, ([18], 0))[0] for k in ids])
    auc, _ = within_image_auc(image_labels, confs, truths)
    return None if np.isnan(auc) else round(float(auc), 4)


def oracle_of(method: str) -> str | None:
    """The row that trains ``method``'s model on the true cell labels (None: a baseline or an oracle)."""
    base, _, boosted = split_method(method)
    if boosted:
        return None if oracle_of(base) is None else f"{oracle_of(base)}+boosted"
    if "oracle" in base or base in BASELINES:
        return None
    kind, colon, backbone = base.partition(":")
    if colon:
        return f"maskrcnn-oracle{''.join(detector_kind(kind)[1])}:{backbone}"
    for name in sorted(ORACLE_OF, key=len, reverse=True):
        if base == name or base.startswith(name + "-"):
            return ORACLE_OF[name]
    return None


def row_key(row: dict) -> str:
    """A row's name in results.json, the tables and the summary: its method, plus the budget keys
    that changed its model (a detector's ``variant``, e.g. ``scratch-sumloss``), so rows of other
    variants stand side by side instead of replacing each other or being averaged together."""
    return row["method"] + (f" [{row['variant']}]" if row.get("variant") else "")


def is_weak(method: str) -> bool:
    """A row trained on image labels alone (no truth): the rows the targets are about."""
    return split_method(method)[0] not in BASELINES and "oracle" not in method


def read_results(path: Path) -> dict:
    """A pair's results.json; its rows' per-class APs keyed by class index again (JSON keeps only
    string keys: read as written, an earlier run's rows showed no per-class AP beside a new one's)."""
    results = json.loads(path.read_text())
    for r in results["rows"]:
        r["per_class"] = {int(c): ap for c, ap in r["per_class"].items()}
    return results


def format_markdown(rows: list[dict], params: dict, refinement: dict | None = None) -> str:
    by_method = {row_key(r): r["mAP"] for r in rows}
    best_oracle = max((r["mAP"] for r in rows if "oracle" in r["method"]), default=None)
    lines = [f"Protocol parameters: {json.dumps(params)}", "",
             "| method | mAP@0.6 | / its oracle | / best oracle | within-image AUC | training s | predict s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ref = by_method.get(row_key({"method": oracle_of(r["method"]) or "", "variant": r.get("variant")}))
        ratio = f"{r['mAP'] / ref:.3f}" if ref else ""
        best = f"{r['mAP'] / best_oracle:.3f}" if best_oracle and is_weak(r["method"]) else ""
        auc = "" if r["within_image_auc"] is None else f"{r['within_image_auc']:.3f}"
        lines.append(f"| {row_key(r)} | {r['mAP']:.4f} | {ratio} | {best} | {auc} | {r['seconds']:.0f} | "
                     f"{r['predict_seconds']:.0f} |")
    if refinement and refinement.get("truth_after"):
        b, a = refinement["truth_before"], refinement["truth_after"]
        lines += ["", f"Training labels against the cells' true labels (train set, {refinement['cells']} cells; micro "
                      "over cell x class):", "", "| labels | precision | recall | F1 | cells exactly right |",
                  "| --- | --- | --- | --- | --- |",
                  f"| image labels on every cell (weak) | {b['precision']:.3f} | {b['recall']:.3f} | {b['f1']:.3f} | "
                  f"{b['exact']:.3f} |",
                  f"| {REFINED} (relative {refinement['relative']:g}; the features model ranks the cells of an image "
                  f"at AUC {refinement['truth_auc']:.3f}) | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} | "
                  f"{a['exact']:.3f} |"]
    present = [c for c in range(NUM_CLASSES) if any(r["per_class"].get(c) is not None for r in rows)]
    lines += ["", "Per-class AP (classes present in the test set):", "",
              "| method | " + " | ".join(SHORT_CLASS_NAMES[c] for c in present) + " |",
              "| --- |" + " --- |" * len(present)]
    for r in rows:
        cells = ["-" if r["per_class"].get(c) is None else f"{r['per_class'][c]:.2f}" for c in present]
        lines.append(f"| {row_key(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(pairs: list[dict]) -> dict:
    """Every row over the seed pairs that measured it: mean, sd (n-1), min and max of mAP and
    AUC, mean training seconds, and for the weak rows each pair's mAP over that pair's best
    oracle row (its minimum is what "holds at any seed" asks of)."""
    methods = list(dict.fromkeys(row_key(r) for pair in pairs for r in pair["rows"]))
    out = []
    for method in methods:
        values, aucs, seconds, ratios = [], [], [], []
        for pair in pairs:
            rows = {row_key(r): r for r in pair["rows"]}
            if method not in rows:
                continue
            values.append(rows[method]["mAP"])
            if rows[method]["within_image_auc"] is not None:
                aucs.append(rows[method]["within_image_auc"])
            seconds.append(rows[method]["seconds"])
            oracles = [r["mAP"] for r in pair["rows"] if "oracle" in r["method"]]
            if oracles and is_weak(rows[method]["method"]):
                ratios.append(rows[method]["mAP"] / max(oracles))
        v = np.array(values)
        out.append({"method": method, "pairs": len(v), "mean": float(v.mean()),
                    "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()), "max": float(v.max()),
                    "values": [round(float(x), 4) for x in v],
                    "auc_mean": float(np.mean(aucs)) if aucs else None, "seconds_mean": float(np.mean(seconds)),
                    "min_over_best_oracle": float(min(ratios)) if ratios else None})
    return {"pairs": [{"train_seed": p["params"]["train_seed"], "test_seed": p["params"]["test_seed"]} for p in pairs],
            "rows": out}


def format_summary(summary: dict) -> str:
    seeds = ", ".join(f"{p['train_seed']}/{p['test_seed']}" for p in summary["pairs"])
    lines = [f"Seed pairs (train/test): {seeds}", "",
             "| method | pairs | mAP mean +- sd | min | max | min / best oracle of its pair | AUC mean | training s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["rows"]:
        ratio = "" if r["min_over_best_oracle"] is None else f"{r['min_over_best_oracle']:.3f}"
        auc = "" if r["auc_mean"] is None else f"{r['auc_mean']:.3f}"
        spread = f"{r['mean']:.4f} +- {r['sd']:.4f}" if r["pairs"] > 1 else f"{r['mean']:.4f} (one pair, no sd)"
        lines.append(f"| {r['method']} | {r['pairs']} | {spread} | {r['min']:.4f} | "
                     f"{r['max']:.4f} | {ratio} | {auc} | {r['seconds_mean']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """One seed pair (OUT), or with ``--seeds K`` K pairs (train_seed + i, test_seed + i) in
    OUT/pair-<train>-<test>/ and their summary in OUT/summary.json and OUT/summary.md."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds == 1:
        return run_pair(parser, args)
    pairs = []
    for i in range(args.seeds):
        pair = argparse.Namespace(**{**vars(args), "train_seed": args.train_seed + i, "test_seed": args.test_seed + i,
                                     "out": args.out / f"pair-{args.train_seed + i}-{args.test_seed + i}"})
        if args.summary_only:  # every row each pair's results.json holds, from any earlier invocation
            saved = pair.out / "results.json"
            if not saved.is_file():
                parser.error(f"--summary-only: {saved} is missing; run that pair first (without --summary-only)")
            pairs.append(read_results(saved))
            continue
        print(f"=== seed pair {i + 1}/{args.seeds}: {pair.train_seed} / {pair.test_seed}", flush=True)
        pairs.append(run_pair(parser, pair))
    summary = summarise(pairs)
    write_text_atomic(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    table = format_summary(summary)
    write_text_atomic(args.out / "summary.md", table)
    print("\n" + table + f"\n-> {args.out / 'summary.json'}, {args.out / 'summary.md'}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/weak"))
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, metavar="METHOD",
                        help="rows to measure, in order (default: %(default)s)")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--test-seed", type=int, default=1000)
    parser.add_argument("--train-images", type=int, default=None, help="default: the profile's")
    parser.add_argument("--test-images", type=int, default=None, help="default: the profile's")
    parser.add_argument("--size", type=int, default=None, help="image size, px (default: the profile's)")
    parser.add_argument("--relative", type=float, default=RELATIVE_RULE, metavar="R",
                        help="refinement rule: a cell keeps an image label at >= R x the image's best cell "
                             "(default: %(default)s)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile value, e.g. --set det_epochs=10 --set cell_epochs=20")
    parser.add_argument("--seeds", type=int, default=1, metavar="K",
                        help="run K seed pairs (train seed + i, test seed + i) and summarise them: mean +- sd, min")
    parser.add_argument("--summary-only", action="store_true",
                        help="with --seeds: summarise the pairs' saved results (every row any run of them measured) "
                             "without running anything")
    return parser


def run_pair(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The protocol at one seed pair (args.train_seed / args.test_seed) in args.out."""
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    errors = [e for e in map(method_error, args.methods) if e]
    if errors:
        parser.error("; ".join(errors))
    p = dict(PROFILES[args.profile])
    for key, value in (("train_images", args.train_images), ("test_images", args.test_images), ("size", args.size)):
        if value is not None:
            p[key] = value
    for item in args.sets:
        key, _, value = item.partition("=")
        if key not in p:
            parser.error(f"unknown profile key {key!r}; choose from {sorted(p)}")
        p[key] = type(p[key])(value)
    params = {"profile": args.profile, **p, "train_seed": args.train_seed, "test_seed": args.test_seed,
              "relative": args.relative}
    out = args.out
    saved_params = out / "params.json"
    # budgets may differ between invocations (each row records its own); the data may not
    budget = ("cell_epochs", "det_epochs", "workers", "det_cell_init", "det_label_loss", "det_head_init")
    same_data = {k: v for k, v in params.items() if k not in budget}
    if saved_params.is_file() and {k: v for k, v in json.loads(saved_params.read_text()).items()
                                   if k not in budget} != same_data:
        parser.error(f"{out} holds a protocol run with other parameters ({saved_params}); use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved_params, json.dumps(params, indent=2))
    print(f"weak-supervision protocol: {params} -> {out}", flush=True)
    proto = Protocol(out, p, args.profile, args.relative, args.train_seed)
    proto.prepare(args.train_seed, args.test_seed)
    previous = {}
    if (out / "results.json").is_file():
        previous = {row_key(r): r for r in read_results(out / "results.json")["rows"]}
    rows = []
    for method in args.methods:
        row = proto.run(method)
        rows.append(row)
        previous[row_key(row)] = row
        results = {"params": params, "rows": list(previous.values()), "date": time.strftime("%Y-%m-%d %H:%M")}
        write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    all_rows = list(previous.values())
    report = out / "prepared" / f"coco_{REFINED}" / "refine.json"
    table = format_markdown(all_rows, params, json.loads(report.read_text()) if report.is_file() else None)
    write_text_atomic(out / "results.md", table)
    from hpa_scc.apps.visualize import plot_per_class_ap

    plot_per_class_ap({row_key(r): r["per_class"] for r in all_rows if r["method"] != "truth"},
                      title="per-class AP on the synthetic test set", path=out / "per_class_ap.png")
    print("\n" + table + f"\n-> {out / 'results.json'}, {out / 'results.md'}, {out / 'per_class_ap.png'}")
    return {"params": params, "rows": all_rows}


if __name__ == "__main__":
    main()
