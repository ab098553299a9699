"""Cell-level models: classifiers of single cells, trained on the cells' (weak) labels.

    python -m hpa_scc train configs/cell_resnet18.yaml data.prepared_dir=runs/demo/prepared
    python -m hpa_scc train configs/cell_features.yaml data.prepared_dir=runs/demo/prepared   # no deep learning
    python -m hpa_scc predict RUN_DIR DATA_DIR --out OUT                                      # the same predict

What the strongest Kaggle HPA 2021 teams did: cut every cell out of the image (the segmenter's
mask, other cells zeroed), resize it to a fixed crop and train an image classifier on it with the
image's labels as the cell's labels (multi-label BCE). A cell-level model sees one cell at full
detail, where a detector's stride-32 features mix it with its neighbours, so it learns which of
its image's labels a cell shows from many images' worth of weak labels.

Two families (``model.family``):
* ``cell``: a torchvision classifier (``model.backbone`` in CELL_BACKBONES: resnet18/34/50/101,
  resnext101_32x8d, densenet121, efficientnet_b0) on masked 4-channel crops of ``data.crop_size`` px;
  a densenet121, resnet101 or resnext101_32x8d one can start the detector of that trunk;
* ``features``: the non-deep baseline: per-cell intensity/texture features
  (``hpa_scc.data.features``) and one logistic regression per class, fitted in seconds, saved as a
  torch module so checkpoints, ``predict`` and ``refine`` treat it like the others.

This module holds the models only: the crops, features and their store are ``data.cells`` and
``data.features``'; fitting the features model and validating either family are
``engine.families``'; scoring a new image's cells is ``engine.inference``'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from hpa_scc.constants import NUM_CLASSES

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Models

def _resnet(arch: str):
    def build(in_channels: int, num_classes: int) -> nn.Module:
        net = getattr(torchvision.models, arch)(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        net.fc = nn.Linear(net.fc.in_features, num_classes)
        return net
    return build


def _densenet121(in_channels: int, num_classes: int) -> nn.Module:
    net = torchvision.models.densenet121(weights=None)
    net.features.conv0 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    net.classifier = nn.Linear(net.classifier.in_features, num_classes)
    return net


def _efficientnet_b0(in_channels: int, num_classes: int) -> nn.Module:
    net = torchvision.models.efficientnet_b0(weights=None)
    old = net.features[0][0]
    net.features[0][0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes)
    return net


# resnet101 / resnext101_32x8d: the trunks of the resnet101_fpn / resnext101_32x8d_fpn detectors,
# which a cell model of the same name initialises (``models.detector``)
CELL_BACKBONES = {"resnet18": _resnet("resnet18"), "resnet34": _resnet("resnet34"), "resnet50": _resnet("resnet50"),
                  "resnet101": _resnet("resnet101"), "resnext101_32x8d": _resnet("resnext101_32x8d"),
                  "densenet121": _densenet121, "efficientnet_b0": _efficientnet_b0}
# torchvision's ImageNet file and the names of its stem and classifier in that file
CELL_IMAGENET = {"resnet18": ("ResNet18_Weights", "conv1.weight", "fc."),
                 "resnet34": ("ResNet34_Weights", "conv1.weight", "fc."),
                 "resnet50": ("ResNet50_Weights", "conv1.weight", "fc."),
                 "resnet101": ("ResNet101_Weights", "conv1.weight", "fc."),
                 "resnext101_32x8d": ("ResNeXt101_32X8D_Weights", "conv1.weight", "fc."),
                 "densenet121": ("DenseNet121_Weights", "features.conv0.weight", "classifier."),
                 "efficientnet_b0": ("EfficientNet_B0_Weights", "features.0.0.weight", "classifier.")}


class _MultiLabelModel(nn.Module):
    """The detectors' calling convention for a model with ``logits(x) -> [B, 19]``: with targets
    the multi-label BCE against their ``label_vector``s ({"loss_bce"}), else sigmoid scores.
    With ``mil`` set (a ``weak.mil`` pooling rule) the targets are images (bags: ``"cells"`` rows
    of the batch each, in order, ``data.cells.CellBagDataset``) and the loss is MIL's ({"loss_mil"})."""

    mil: str = "none"
    mil_sharpness: float = 2.0

    def forward(self, inputs, targets: list[dict] | None = None):
        logits = self.logits(inputs)
        if targets is None:
            return logits.sigmoid()
        target = torch.stack([t["label_vector"] for t in targets]).to(logits.dtype)
        if self.mil != "none":
            from hpa_scc.weak.mil import mil_loss

            sizes = torch.tensor([int(t["cells"]) for t in targets], device=logits.device)
            bag = torch.repeat_interleave(torch.arange(len(targets), device=logits.device), sizes)
            return {"loss_mil": mil_loss(logits.float(), bag, target.float(), self.mil, self.mil_sharpness)}
        return {"loss_bce": F.binary_cross_entropy_with_logits(logits, target)}


class CellClassifier(_MultiLabelModel):
    """A classifier of cell crops with the detectors' calling convention.

    ``forward(images, targets=None)``: images uint8/float [B, C, c, c] (or a list of [C, c, c]),
    float in [0, 1] after ``engine.to_device``; normalised here by per-channel buffers. Training
    (targets given): {"loss_bce": multi-label BCE against the targets' ``label_vector``s}.
    Inference: sigmoid scores float [B, 19].
    """

    def __init__(self, backbone: str, in_channels: int = 4, num_classes: int = NUM_CLASSES,
                 mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        if backbone not in CELL_BACKBONES:
            raise ValueError(f"unknown cell backbone {backbone!r}; choose one of {sorted(CELL_BACKBONES)}")
        from hpa_scc.models.detector import default_pixel_stats

        d_mean, d_std = default_pixel_stats(in_channels)
        self.net = CELL_BACKBONES[backbone](in_channels, num_classes)
        self.register_buffer("pixel_mean", torch.tensor(mean or d_mean, dtype=torch.float32))
        self.register_buffer("pixel_std", torch.tensor(std or d_std, dtype=torch.float32))

    def logits(self, images) -> torch.Tensor:
        x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        if not x.is_floating_point():
            x = x.float().div_(255.0)
        x = (x - self.pixel_mean[:, None, None]) / self.pixel_std[:, None, None]
        return self.net(x)


class FeatureClassifier(_MultiLabelModel):
    """The features baseline as a module: standardise, then one logistic regression per class.

    ``forward(features float [B, F], targets=None)`` -> probabilities [B, 19] (or the BCE loss
    dict with targets). Fitted by ``engine.families`` (scikit-learn, or a MIL loss over the
    cells of each image: ``fit_feature_mil``), never by the training loop.
    ``attention=True`` adds the per-class attention logits of MIL's attention pooling
    (``weak.mil``, Ilse et al. 2018), used while fitting only: a cell's score is its own logit.
    """

    def __init__(self, n_features: int, num_classes: int = NUM_CLASSES, attention: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))
        self.linear = nn.Linear(n_features, num_classes)
        self.attention = nn.Linear(n_features, num_classes) if attention else None

    def standardise(self, features) -> torch.Tensor:
        x = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
        return (x.float() - self.mean) / self.scale

    def logits(self, features) -> torch.Tensor:
        return self.linear(self.standardise(features))


class TreeEnsembleClassifier(_MultiLabelModel):
    """Gradient-boosted trees per class (scikit-learn's HistGradientBoostingClassifier, fitted by
    ``engine.families.fit_feature_boosting``) held as tensors, so a checkpoint stays a plain
    state dict (``torch.load(weights_only=True)``, no pickled estimator) and predicts on any device.

    Every tree of every class is one row of the node tables (``feature``, ``threshold``,
    ``left``, ``right``, ``leaf``, ``value``, ``missing_left``: [T, M], padded with leaves of value
    0); ``tree_class`` [T] says whose logit a tree adds to, ``baseline`` [19] where it starts. A
    cell walks all trees at once, ``depth`` steps: x <= threshold goes left, NaN where
    ``missing_left`` says. The tables are sized by the fit: loading a state dict takes its shapes.
    """

    TABLES = {"feature": torch.int64, "threshold": torch.float64, "left": torch.int64, "right": torch.int64,
              "leaf": torch.bool, "value": torch.float64, "missing_left": torch.bool}
    STATE_SIZED = (*TABLES, "tree_class")  # utils.checkpoint: shapes come from the state loaded

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        for name, dtype in self.TABLES.items():
            self.register_buffer(name, torch.zeros((0, 1), dtype=dtype))
        self.register_buffer("tree_class", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("baseline", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("depth", torch.zeros((), dtype=torch.int64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the tables' sizes are the fit's: take them from the state being loaded
        for name in self.STATE_SIZED:
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.baseline.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _flat_tables(self) -> tuple[torch.Tensor, ...]:
        """Flat node tables (node k of tree t at t * width + k) in which a leaf's children are
        itself: a cell that reached its leaf stays there, so every step is the same gathers.
        Built once per state (cached on the tables' storage and version: a load, a move to
        another device or an in-place change rebuilds them); building them cost more than the
        walk itself for one image's cells."""
        key = tuple((table.data_ptr(), table._version, table.device) for table in
                    (self.feature, self.threshold, self.left, self.right, self.leaf, self.value))
        if getattr(self, "_flat_key", None) != key:
            n_trees, width = self.feature.shape
            base = torch.arange(n_trees, device=self.feature.device)[:, None] * width
            own = torch.arange(width, device=self.feature.device).expand(n_trees, width)
            self._flat = (base[:, 0], (torch.where(self.leaf, own, self.left) + base).flatten(),
                          (torch.where(self.leaf, own, self.right) + base).flatten(), self.feature.flatten(),
                          self.threshold.flatten(), self.missing_left.flatten(), self.value.flatten())
            self._flat_key = key
        return self._flat

    def logits(self, features, chunk: int = 512) -> torch.Tensor:
        x = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
        x = x.to(torch.float64)  # sklearn's thresholds are float64: compared as it compares them
        out = self.baseline.expand(len(x), -1).clone()
        n_trees = self.feature.shape[0]
        if not n_trees or not len(x):
            return out.float()
        roots, left, right, feature, threshold, missing_left, value = self._flat_tables()
        has_nan = bool(torch.isnan(x).any())
        # [cells, trees] node indices a chunk at a time: bounded memory at any N; 512 cells (x 3,800
        # trees: 15 MB a table) ran 1.9x faster than 2,048 on this 2-core machine (side by side, 2026-12-05)
        for start in range(0, len(x), chunk):
            rows = x[start:start + chunk]
            node = roots.expand(len(rows), n_trees)
            for _ in range(int(self.depth)):
                # torch.take: a flat gather, ~1.7x faster than indexing with a 2-D index tensor
                v = rows.gather(1, torch.take(feature, node))
                go_left = v <= torch.take(threshold, node)
                if has_nan:  # NaN compares False: it goes where the fit sent missing values
                    go_left |= torch.isnan(v) & torch.take(missing_left, node)
                node = torch.where(go_left, torch.take(left, node), torch.take(right, node))
            out[start:start + chunk].index_add_(1, self.tree_class, torch.take(value, node))
        return out.float()


def load_cell_imagenet(model: CellClassifier, backbone: str, in_channels: int, path: str | None = None) -> None:
    """torchvision's ImageNet weights for a cell backbone, from ``path`` or the torch hub cache (never
    downloaded); a 4-channel stem takes yellow from red (``models.adapt_stem``); classifier dropped."""
    from hpa_scc.models.detector import adapt_stem

    enum, stem, head = CELL_IMAGENET[backbone]
    if path is None:
        weights = getattr(torchvision.models, enum).IMAGENET1K_V1
        file = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
        if not file.is_file():
            raise FileNotFoundError(f"model.weights=imagenet needs {file}; this code never downloads. Copy torchvision's "
                                    f"{enum}.IMAGENET1K_V1 file there (set TORCH_HOME to move the folder), or set "
                                    "model.weights to its path, or null for random init")
        path = str(file)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    if backbone == "densenet121":
        from hpa_scc.models.detector import densenet_imagenet_keys

        state = {"features." + k[len("backbone.body."):]: v for k, v in densenet_imagenet_keys(state).items()}
    state[stem] = adapt_stem(state[stem], in_channels)
    missing, unexpected = model.net.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith(head)]:
        raise ValueError(f"{path}: not {backbone} ImageNet weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    log.info("ImageNet weights for the cell backbone from %s", path)


def build_family_model(cfg) -> nn.Module:
    """The model of a Config of any family: Mask R-CNN (hpa_scc.models.detector) or a cell-level model."""
    if cfg.model.family == "maskrcnn":
        from hpa_scc.models.detector import build_model

        if cfg.data.image_size is None:
            raise ValueError("data.image_size is unset: train takes it from the prepared set's settings record; "
                             "set it to build a Mask R-CNN outside training")
        return build_model(cfg.model, image_size=cfg.data.image_size)
    return build_cell_model(cfg.model)


def build_cell_model(cfg, n_features: int | None = None) -> nn.Module:
    """The model of ``cfg`` (a ModelConfig) for the ``cell`` or ``features`` family."""
    if cfg.family == "features":
        from hpa_scc.data.features import FEATURE_NAMES

        if cfg.feature_classifier == "boosting":
            return TreeEnsembleClassifier()
        return FeatureClassifier(n_features or len(FEATURE_NAMES), attention=cfg.mil == "attention")
    model = CellClassifier(cfg.backbone, cfg.in_channels, mean=cfg.pixel_mean, std=cfg.pixel_std)
    model.mil, model.mil_sharpness = cfg.mil, cfg.mil_sharpness  # the training loss only (no weights)
    if cfg.weights == "imagenet" or (cfg.weights and Path(cfg.weights).suffix == ".pth"):
        load_cell_imagenet(model, cfg.backbone, cfg.in_channels, None if cfg.weights == "imagenet" else cfg.weights)
    elif cfg.weights:
        from hpa_scc.utils.checkpoint import load_checkpoint, load_model_state

        load_model_state(model, load_checkpoint(cfg.weights), cfg.weights, cfg.family, cfg.backbone,
                         f"model.weights must be a checkpoint of a cell run with model.backbone={cfg.backbone}")
        log.info("cell model weights from %s", cfg.weights)
    return model
