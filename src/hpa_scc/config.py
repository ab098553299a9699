"""Every training default, declared once, typed; YAML files hold only their differences.

    cfg = load_config("configs/densenet121.yaml", ["optim.lr=0.005", "train.max_epochs=3"])

A config is a tree of dataclasses. ``load_config`` starts from the defaults below, merges the
YAML file (which may name a ``base:`` YAML it extends), then ``key=value`` overrides (values
parsed as YAML: ``3``, ``0.1``, ``true``, ``[1, 2]``, ``null``). An unknown key or a value of
the wrong type is an error naming the key and the file; a YAML syntax error names the file (or
the override), line and column. A float key takes ``1e-3`` (a string to YAML 1.1) as the number
and refuses nan and inf. ``save_config`` writes the resolved config into the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hpa_scc.constants import FAMILIES, FEATURE_CLASSIFIERS, LABEL_LOSSES, LABEL_POOLING, MIL_POOLING
from hpa_scc.utils.device import DEVICES, is_device_name

# The repository's configs/ folder (the package is installed editable, in the container too).
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class ModelConfig:
    # maskrcnn: a detector (backbones below); cell: a classifier of masked single-cell crops
    # (backbone resnet18 | resnet34 | resnet50 | resnet101 | resnext101_32x8d | densenet121 |
    # efficientnet_b0, hpa_scc.models.cells);
    # features: per-cell intensity/texture features + logistic regressions (the non-deep baseline).
    family: str = "maskrcnn"
    # Which library trains and runs the detector: torchvision (this package's loop) or detectron2
    # (its DefaultTrainer on the same prepared set; resnet101_fpn / resnext101_32x8d_fpn with the
    # softmax head only, as the original implementation: hpa_scc.engine.d2train).
    engine: str = "torchvision"
    backbone: str = "densenet121"  # one of BACKBONE_NAMES
    in_channels: int = 4  # 4 = RGBY; 3 = RGB, as the original implementation
    # multilabel: one instance per cell, 19 sigmoid scores (BCE), so a cell learns all its labels.
    # softmax: 19 classes + background on the per_label layout, the original implementation's head,
    # kept for fidelity only: a cell's copies share one mask and all train as its first label (models/detector.py).
    head: str = "multilabel"
    # multilabel head: what a cell's labels are read from. box: the RoI features of its whole box
    # (neighbours' pixels included where cells crowd); mask: those features weighted by the cell's
    # own mask (matched cell in training, predicted mask or the segmenter's cell at inference).
    label_pooling: str = "box"
    # multilabel head: the label logits also read each cell's hand-made features (hpa_scc.data.features;
    # in training the matched cell's row of the prepared set's feature store, PREPARED/crops/features.npy;
    # at inference measured under the detection or the segmenter's cell) beside its RoI features: the
    # signal the features family classifies on, in the detector's own head (docs/RESULTS.md, issue 29).
    # Needs in_channels=4.
    cell_features: bool = False
    # with cell_features: a features-family run's checkpoint (its best.pt) whose scaler and logistic
    # regression start the head's cell-features layer (the scaler then stays fixed) and the RoI label
    # layer starts at zero: the untrained head scores cells as that model does. null: random init.
    cell_features_init: str | None = None
    # multilabel head's BCE over a cell's 19 classes: mean (each class's logit gets 1/19 of the
    # gradient a softmax head's would) or sum (the full gradient; mean over cells either way).
    label_loss: str = "mean"
    # Initial weights, from local files only: null (random init), "imagenet" (torch hub cache),
    # or a path: a torchvision state dict, a project checkpoint, or a detectron2 model-zoo .pkl.
    weights: str | None = None
    keep_predictors: bool = False  # keep the class/box/mask predictors of detection weights
    trainable_backbone_layers: int = 3  # with pretrained weights; all layers train from random init
    # Anchor side per feature level in px at the training size; null = derived from data.image_size
    # (cells are ~0.12-0.2 of the image width: 60-100 px at 512).
    anchor_sizes: list[int] | None = None
    # Per-channel normalisation of inputs in [0, 1]; null = ImageNet-like defaults for 3 or 4 channels.
    pixel_mean: list[float] | None = None
    pixel_std: list[float] | None = None
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05
    # Head sizes (torchvision's defaults, made for ~100 objects per COCO image). An HPA image has
    # ~20 cells, so smaller heads lose little and train much faster on a CPU (bench/weak_supervision.py).
    rpn_post_nms_top_n_train: int = 2000  # proposals per image kept for the RoI heads, training
    rpn_post_nms_top_n_test: int = 1000  # same, inference
    box_batch_size_per_image: int = 512  # RoIs sampled per image for the box/class loss
    # Family features: the per-cell classifier. logistic: one L2 logistic regression per class
    # (the simplest baseline); boosting: gradient-boosted trees per class (scikit-learn's
    # HistGradientBoosting): nonlinear in the features, and the stronger model at every seed pair
    # of bench/weak_supervision.py, on weak labels and on the truth (docs/RESULTS.md).
    feature_classifier: str = "logistic"
    feature_c: float = 1.0  # logistic (and MIL): inverse L2 strength, as scikit-learn's C
    boost_iters: int = 200  # boosting: trees per class
    boost_lr: float = 0.05  # boosting: learning rate (shrinkage of each tree)
    boost_leaves: int = 15  # boosting: leaves per tree
    # Multiple-instance learning (family features with logistic, or cell: then train.images_per_gpu
    # counts images, each with all its cells): none trains each cell on its labels;
    # lse | attention | max | mean | noisy_or pool the cells' logits into their image's and take the
    # loss against the image's labels (hpa_scc.weak.mil): what an image label really says.
    mil: str = "none"
    mil_sharpness: float = 2.0  # lse: r (-> 0: the mean logit, -> inf: the max)
    mil_epochs: int = 300  # full-batch Adam steps of the MIL fit


@dataclass
class DataConfig:
    prepared_dir: str = "runs/demo/prepared"  # the output of 'prepare' (dataset.py)
    # Which coco/<layout>/ to read; null = the one model.head trains on (HEAD_LAYOUT), resolved by
    # load_config. An explicit value must be that one too: a key kept to name the files, not a choice.
    layout: str | None = None
    # Cell labels to train on: image (each cell inherits its image's labels: weak supervision),
    # truth (a synthetic set's true cell labels: the oracle), or NAME for coco_NAME/ (apps/refine.py).
    labels: str = "image"
    val_fold: int = 0  # this fold validates, the others train; -1: every fold trains, no validation
    # Training size in px. null: the prepared set's size (prepare --size), which owns the fact;
    # train writes the resolved value into the run's config.yaml. A value must equal it.
    image_size: int | None = None
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    rot90: bool = True  # random multiples of 90 degrees: fluorescence fields have no up
    workers: int = 6  # loader processes per GPU: ~35 img/s each with masks and augmentation (bench/loader.py)
    crop_size: int = 64  # cell-level models: side of the square cell crops, px (cut once per prepared set)
    max_train_images: int | None = None  # cap, for smoke tests (cells for the cell-level families; images with model.mil)
    max_val_images: int | None = None


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.01  # per batch of images_per_gpu * world size * accumulate_steps
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step
    step_milestones: list[int] = field(default_factory=lambda: [8, 11])  # epochs, for schedule: step
    step_gamma: float = 0.1
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    clip_grad_norm: float | None = 10.0


@dataclass
class TrainConfig:
    run_dir: str = "runs/train"  # everything a run writes goes here
    max_epochs: int = 12
    images_per_gpu: int = 4  # samples per GPU and step: images for maskrcnn, cell crops for the cell family
    accumulate_steps: int = 1
    # The GPU fast path (docs/PERFORMANCE.md); each is a no-op on CPU. Turning all four off gives
    # plain fp32, the baseline bench/gpu.sh compares against.
    amp: bool = True  # bf16 autocast where supported (CUDA with bf16)
    channels_last: bool = True  # NHWC weights and activations: what tensor-core convolutions want
    tf32: bool = True  # TF32 tensor cores for the fp32 matmuls/convolutions left outside autocast
    compile: bool = False  # torch.compile the backbone (+FPN): ~1 min of compiling per process first
    seed: int = 0
    val_every_epochs: int = 1
    save_every_epochs: int = 1
    resume: bool = True  # resume from run_dir/last.pt when present
    max_iters_per_epoch: int | None = None  # cap, for smoke tests
    device: str = "auto"  # auto | cpu | cuda | cuda:N (hpa_scc.utils.device)
    log_every_iters: int = 20  # on CUDA also how often losses are read back (a host sync) and checked
    tensorboard: bool = True
    # How long a collective may wait, in minutes, before the process group gives up. Validation
    # runs on rank 0 while the others wait at a barrier, so this must cover one validation pass
    # (a full Kaggle fold at 512 px: minutes on one GPU; cap it with data.max_val_images).
    dist_timeout_min: int = 60


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """An unknown key or a value of the wrong type; the message names the key and its source."""


def _parse_yaml(text: str, source: str, column_offset: int = 0):
    """``yaml.safe_load(text)``, its errors (syntax, python/... tags) raised as one-line ConfigErrors
    naming ``source``, the line and the column; ``column_offset`` places a value inside an override."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1 + column_offset}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        what = f"{context}: {problem}" if context else problem
        fix = ("a config holds plain values (numbers, strings, lists, mappings); tags like !!python/... are "
               "refused" if "constructor" in problem else "fix the YAML syntax (quote a string holding [ ] { } : #)")
        raise ConfigError(f"{source}{where}: {what}; {fix}") from None


def _check_type(value, annotation, key: str, source: str):
    """Return ``value`` converted to ``annotation`` (int -> float allowed) or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} in {source}: expected a list, got {value!r}")
        return [_check_type(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if annotation is float:
        return _check_float(value, key, source)
    if annotation in (int, str, bool):
        if type(value) is not annotation:
            raise ConfigError(f"{key} in {source}: expected {annotation.__name__}, got {value!r} "
                              f"({type(value).__name__})")
        return value
    raise ConfigError(f"{key} in {source}: unsupported type {annotation}")


def _check_float(value, key: str, source: str) -> float:
    """A finite float from a float, an int, or a string that reads as one: YAML 1.1 (PyYAML) reads
    ``1e-3`` (no dot) as a string, and nobody writing it means one. nan and inf are refused: no
    setting means them, and they pass a ``> 0`` check only to wreck a run later."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = value
    elif isinstance(value, int) and not isinstance(value, bool):
        number = float(value)
    if type(number) is not float:
        raise ConfigError(f"{key} in {source}: expected float, got {value!r} ({type(value).__name__})")
    if not math.isfinite(number):
        raise ConfigError(f"{key} in {source}: expected a finite number, got {value!r}; nan and inf are not "
                          "settings, give a number")
    return number


def _merge(node, updates: dict, prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(node))
    names = {f.name for f in dataclasses.fields(node)}
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key {dotted!r} in {source}; known keys here: {sorted(names)}")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} in {source}: expected a mapping of {sorted(f.name for f in dataclasses.fields(current))}")
            _merge(current, value, f"{dotted}.", source)
        else:
            setattr(node, key, _check_type(value, hints[key], dotted, source))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The YAML file and the chain of ``base:`` files it extends, base first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' files form a cycle")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    data = _parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    chain = []
    base = data.pop("base", None)
    if base is not None:
        chain = _read_yaml((path.parent / base), seen + (path,))
    return chain + [(data, str(path))]


def parse_override(text: str) -> dict:
    """``"optim.lr=0.1"`` -> ``{"optim": {"lr": 0.1}}``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. optim.lr=0.01)")
    key, raw = text.split("=", 1)
    value = _parse_yaml(raw, f"override {text!r}", column_offset=len(key) + 1) if raw.strip() else None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML chain <- key=value overrides, checked; see the module docstring."""
    cfg = Config()
    if path is not None:
        for data, source in _read_yaml(Path(path)):
            _merge(cfg, data, "", source)
    for text in overrides or []:
        _merge(cfg, parse_override(text), "", f"override {text!r}")
    validate(cfg)
    return cfg



# The COCO layout each classification head trains on (prepare writes coco/<layout>/, both by default).
HEAD_LAYOUT = {"softmax": "per_label", "multilabel": "multilabel"}
# The detection backbones (models.BACKBONES builds them; a test keeps the two lists equal).
BACKBONE_NAMES = ("densenet121", "densenet121_fpn", "resnet101_fpn", "resnext101_32x8d_fpn")
ENGINES = ("torchvision", "detectron2")
# detectron2 builds these from its model zoo (hpa_scc.models.d2model.ZOO_CONFIGS).
D2_BACKBONES = ("resnet101_fpn", "resnext101_32x8d_fpn")


# Numeric keys and what they may be (None, where a key allows it, is not checked): checked when a
# config is loaded, so a bad value stops a run before its folder is made. Every float is also
# finite (_check_float), so these need not think of nan, whose comparisons are all False.
RANGES = (
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_iters", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_factor", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("optim.step_gamma", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("optim.clip_grad_norm", lambda v: v > 0, "> 0 (null: no clipping)"),
    ("data.hflip_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.vflip_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.workers", lambda v: v >= 0, ">= 0"),
    ("data.image_size", lambda v: v >= 1, ">= 1"),
    ("data.crop_size", lambda v: v >= 1, ">= 1"),
    ("data.val_fold", lambda v: v >= -1, ">= 0 (-1: every fold trains)"),
    ("data.max_train_images", lambda v: v >= 1, ">= 1 (null: no cap)"),
    ("data.max_val_images", lambda v: v >= 1, ">= 1 (null: no cap)"),
    ("model.box_score_thresh", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("model.feature_c", lambda v: v > 0, "> 0"),
    ("model.boost_iters", lambda v: v >= 1, ">= 1"),
    ("model.boost_lr", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("model.boost_leaves", lambda v: v >= 2, ">= 2"),
    ("model.mil_sharpness", lambda v: v > 0, "> 0"),
    ("model.mil_epochs", lambda v: v >= 1, ">= 1"),
    ("model.trainable_backbone_layers", lambda v: v >= 0, ">= 0"),
    ("model.box_detections_per_img", lambda v: v >= 1, ">= 1"),
    ("model.rpn_post_nms_top_n_train", lambda v: v >= 1, ">= 1"),
    ("model.rpn_post_nms_top_n_test", lambda v: v >= 1, ">= 1"),
    ("model.box_batch_size_per_image", lambda v: v >= 1, ">= 1"),
    ("model.anchor_sizes", lambda v: all(x >= 1 for x in v), "sizes >= 1 px (null: from data.image_size)"),
    ("model.pixel_std", lambda v: all(x > 0 for x in v), "values > 0 (inputs are divided by them)"),
    ("optim.step_milestones", lambda v: all(x >= 1 for x in v), "epochs >= 1"),
    ("train.max_epochs", lambda v: v >= 1, ">= 1"),
    ("train.images_per_gpu", lambda v: v >= 1, ">= 1"),
    ("train.accumulate_steps", lambda v: v >= 1, ">= 1"),
    ("train.log_every_iters", lambda v: v >= 1, ">= 1"),
    ("train.val_every_epochs", lambda v: v >= 1, ">= 1"),
    ("train.save_every_epochs", lambda v: v >= 1, ">= 1"),
    ("train.dist_timeout_min", lambda v: v >= 1, ">= 1"),
    ("train.max_iters_per_epoch", lambda v: v >= 1, ">= 1 (null: no cap)"),
)


def validate(cfg: Config) -> None:
    """Checks across keys, with the fix in the message; fills ``data.layout`` when null (the head's layout)."""
    choices = {"model.backbone": (cfg.model.backbone, BACKBONE_NAMES),
               "model.head": (cfg.model.head, tuple(HEAD_LAYOUT)),
               "model.in_channels": (cfg.model.in_channels, (3, 4)),
               "model.engine": (cfg.model.engine, ENGINES),
               "data.layout": (cfg.data.layout, (None, *HEAD_LAYOUT.values())),
               "optim.name": (cfg.optim.name, ("sgd", "adamw")),
               "optim.schedule": (cfg.optim.schedule, ("cosine", "step")),
               "model.feature_classifier": (cfg.model.feature_classifier, FEATURE_CLASSIFIERS),
               "model.mil": (cfg.model.mil, ("none", *MIL_POOLING)),
               "model.label_pooling": (cfg.model.label_pooling, LABEL_POOLING),
               "model.label_loss": (cfg.model.label_loss, LABEL_LOSSES)}
    if not is_device_name(cfg.train.device):
        raise ConfigError(f"train.device = {cfg.train.device!r}; choose one of {', '.join(DEVICES)}")
    if cfg.model.family not in FAMILIES:
        raise ConfigError(f"model.family = {cfg.model.family!r}; choose one of {list(FAMILIES)}")
    if cfg.model.family != "maskrcnn":
        # the detector's head/layout keys do not apply; only the backbone is checked, for its family
        choices = {k: v for k, v in choices.items() if k not in ("model.backbone", "model.head", "data.layout")}
        backbones = FAMILIES[cfg.model.family].backbones
        if backbones and cfg.model.backbone not in backbones:
            raise ConfigError(f"model.backbone = {cfg.model.backbone!r} is not a cell-model backbone; choose one of "
                              f"{list(backbones)}")
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r}; choose one of {list(allowed)}")
    if cfg.model.engine == "detectron2":
        if cfg.model.family != "maskrcnn" or cfg.model.backbone not in D2_BACKBONES:
            raise ConfigError(f"model.engine=detectron2 trains the Mask R-CNN backbones {list(D2_BACKBONES)}, "
                              f"not {cfg.model.family} {cfg.model.backbone!r}")
        if cfg.model.head != "softmax":
            raise ConfigError("model.engine=detectron2 trains detectron2's own softmax head on the per_label layout: "
                              "set model.head=softmax (detectron_code/main.py --engine detectron2 does)")
    if cfg.model.label_loss != "mean" and (cfg.model.family != "maskrcnn" or cfg.model.head != "multilabel"):
        raise ConfigError(f"model.label_loss={cfg.model.label_loss} is a choice of the Mask R-CNN multilabel head; "
                          "set model.label_loss=mean for other heads and families")
    if cfg.model.label_pooling != "box" and (cfg.model.family != "maskrcnn" or cfg.model.head != "multilabel"):
        raise ConfigError(f"model.label_pooling={cfg.model.label_pooling} is a choice of the Mask R-CNN multilabel head; "
                          "set model.label_pooling=box for other heads and families")
    if cfg.model.cell_features and (cfg.model.family != "maskrcnn" or cfg.model.head != "multilabel"
                                    or cfg.model.engine != "torchvision" or cfg.model.in_channels != 4):
        raise ConfigError("model.cell_features=true is a choice of the torchvision Mask R-CNN multilabel head on "
                          "4-channel images (the features read R, G, B and Y); set model.cell_features=false, or "
                          "model.family=maskrcnn model.head=multilabel model.in_channels=4")
    if cfg.model.cell_features_init and not cfg.model.cell_features:
        raise ConfigError(f"model.cell_features_init={cfg.model.cell_features_init} starts the head's cell-features "
                          "layer: set model.cell_features=true, or model.cell_features_init=null")
    if cfg.model.mil != "none":
        mil_ok = ((cfg.model.family == "features" and cfg.model.feature_classifier == "logistic")
                  or (cfg.model.family == "cell" and cfg.model.mil != "attention"))
        if not mil_ok:
            raise ConfigError(f"model.mil={cfg.model.mil} trains the features family's logistic model or (any rule "
                              f"but attention) the cell family, not family {cfg.model.family!r} with "
                              f"feature_classifier {cfg.model.feature_classifier!r} (trees take no MIL loss; the "
                              "detector and the crop CNN have no attention head); set model.mil=none, or another "
                              "family or rule")
    expected_layout = HEAD_LAYOUT.get(cfg.model.head)  # checked above for the detector only
    if cfg.data.layout is None:
        cfg.data.layout = expected_layout or HEAD_LAYOUT[ModelConfig.head]
    if cfg.model.family == "maskrcnn" and cfg.data.layout != expected_layout:
        raise ConfigError(f"model.head {cfg.model.head!r} trains on the {expected_layout!r} layout, but "
                          f"data.layout is {cfg.data.layout!r}; set data.layout={expected_layout} or leave it out "
                          f"(null follows the head)")
    for key in ("pixel_mean", "pixel_std"):
        value = getattr(cfg.model, key)
        if value is not None and len(value) != cfg.model.in_channels:
            raise ConfigError(f"model.{key} has {len(value)} values for model.in_channels={cfg.model.in_channels}")
    for key, ok, allowed in RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and not ok(value):
            raise ConfigError(f"{key} must be {allowed}, got {value}")


def with_values(cfg: Config, **values) -> Config:
    """A copy of ``cfg`` with ``section__key=value`` set (``with_values(cfg, data__image_size=512)``):
    a loaded config is never changed in place, so whoever holds one sees what they loaded, and a
    step that resolves a value (the training size from the prepared set) passes the copy on."""
    sections: dict[str, dict] = {}
    for name, value in values.items():
        section, _, key = name.partition("__")
        if not hasattr(getattr(cfg, section, None), key):
            raise ConfigError(f"unknown key {section}.{key}")
        sections.setdefault(section, {})[key] = value
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)
                                       for section, changes in sections.items()})


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically): what this run actually used."""
    from hpa_scc.utils.fileio import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# What may differ when a run folder is resumed: how long it runs, how it logs and saves, how fast
# it loads, where it computes. Everything else (model, data, folds, optimiser, batch) would make
# the resumed run another experiment than the one its last.pt belongs to.
RESUMABLE_CHANGES = ("train.max_epochs", "train.log_every_iters", "train.tensorboard", "train.val_every_epochs",
                     "train.save_every_epochs", "train.device", "train.dist_timeout_min", "train.compile",
                     "train.max_iters_per_epoch", "train.run_dir", "train.resume", "data.workers",
                     "data.max_val_images", "model.weights", "model.cell_features_init")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(saved: dict, cfg: Config) -> tuple[dict, dict]:
    """(allowed, refused) differences {key: (saved, now)} between a run folder's config.yaml and
    ``cfg``, split by ``RESUMABLE_CHANGES``. model.weights is allowed: a resumed run loads last.pt. A key
    the saved config lacks (a run started before the key existed) is no difference at its default."""
    old, new = _flat(saved), _flat(to_dict(cfg))
    for tree in (old, new):  # one folder, however it is written
        if tree.get("data.prepared_dir"):
            tree["data.prepared_dir"] = os.path.realpath(tree["data.prepared_dir"])
    # a key a later version added, at its default, is what a run started before it did
    defaults = _flat(to_dict(Config()))
    for k in set(new) - set(old):
        if k in defaults and new[k] == defaults[k]:
            old[k] = new[k]
    diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    allowed = {k: v for k, v in diff.items() if k in RESUMABLE_CHANGES}
    return allowed, {k: v for k, v in diff.items() if k not in RESUMABLE_CHANGES}
