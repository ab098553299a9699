"""Mask R-CNN models: torchvision's MaskRCNN with a DenseNet121 (one map or FPN) or a ResNet/ResNeXt-101 FPN backbone.

    model = build_model(cfg.model, image_size=cfg.data.image_size)
    scores = score_boxes(model.eval(), images, boxes)   # multilabel head: 19 scores for each given box

Inputs are lists of float [C, H, W] images in [0, 1] (C = ``in_channels``: 3 = RGB, 4 = RGBY);
the model's transform normalises them per channel and does not resize (min = max = image size).

Backbones (``cfg.backbone``): ``densenet121``: the DenseNet121 features' last map (stride 32)
reduced to 256 channels, as the original implementation; ``densenet121_fpn``: dense blocks 1-3
and norm5 (strides 4-32) under an FPN; ``resnet101_fpn``, ``resnext101_32x8d_fpn``: detectron2's.

Heads (``cfg.head``):

* ``multilabel`` (the default): one instance per cell. Detection is class-agnostic (background /
  cell) and a linear layer on the box-head features gives 19 sigmoid scores per cell
  (``MultiLabelRoIHeads``). Targets: ``boxes`` float [N, 4] xyxy, ``labels`` int64 [N] all 1,
  ``masks`` uint8 [N, H, W], ``label_vectors`` float [N, 19]. Outputs: ``boxes``, ``labels``,
  ``scores``, ``masks`` float [N, 1, H, W], ``label_scores`` float [N, 19] in [0, 1].
* ``softmax``: torchvision's predictors for 19 classes + background, kept for fidelity with the
  original implementation only. Targets as above with ``labels`` in 1..19 and no label vectors;
  outputs without ``label_scores``. Its per_label layout repeats a cell once per label with the
  same box and mask, and torchvision's Matcher gives each proposal the first of ground truths
  tied at the best IoU: every proposal on a cell trains as its lowest label, and the cell's other
  labels are never a target (``instances.shadowed_instances`` counts them). Use ``multilabel``.

Weights (``cfg.weights``), from local files only; nothing is ever downloaded:

* ``None``: random init, everything trains;
* ``"imagenet"``: torchvision's ImageNet backbone file from the torch hub cache
  (``torch.hub.get_dir()/checkpoints/``), e.g. ``resnet101-63fe2227.pth``;
* ``*.pkl``: a detectron2 model-zoo checkpoint (``hpa_scc.models.d2import``); R101 brings its stride
  placement (``stride_in_1x1``) and its input statistics with it;
* another path: a project checkpoint (``{"model": state_dict, ...}``, as the trainer writes), a
  plain state dict of this model, or a torchvision ImageNet classifier file (as ``"imagenet"``);
* a cell-level model's checkpoint (``model.family=cell``, ``model.backbone=densenet121``): its
  DenseNet121, trained on masked cell crops, becomes the body of a ``densenet121`` /
  ``densenet121_fpn`` detector (BatchNorm and every stage keep training): the detector starts
  from features that already tell cells' patterns apart instead of random ones.

Pretrained RGB weights in a 4-channel model: the yellow filter of the first conv is the red
filter, and all four filters are scaled by 3/4 (as timm's ``adapt_input_conv``), so an input
whose channels are alike gives the pretrained activations (HPA Kaggle recipe: Y from R).

The stride placement and the input statistics are buffers (``backbone.body.stride_in_1x1``,
``transform.pixel_mean``/``pixel_std``): they travel in the state dict, so a checkpoint of a
model made from detectron2's R101 predicts right even where the .pkl is absent.

Why one module of ~600 lines: the four backbones, the two heads and their weight loading are one
model family whose parts only make sense together (a head is built for a backbone's channels, the
weights for both); the detectron2-engine model is models/d2model.py.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.roi_heads import (RoIHeads, fastrcnn_loss, maskrcnn_inference, maskrcnn_loss,
                                                    project_masks_on_boxes)
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from hpa_scc.config import ModelConfig
from hpa_scc.constants import LABEL_LOSSES, LABEL_POOLING, NUM_CLASSES

log = logging.getLogger(__name__)

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# FPN: one anchor size per level (strides 4..64), detectron2's sizes at 1024 px scaled to the image.
FPN_ANCHOR_SIZES_AT_1024 = (32, 64, 128, 256, 512)
# Single stride-32 map: several sizes as fractions of the image width; cells are ~0.12-0.2 of it.
SINGLE_MAP_ANCHOR_FRACTIONS = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8)
# The class-specific layers: not loaded where their shapes differ from the model's (another class
# count or head), nor from foreign detection weights (.pkl, plain state dicts) unless keep_predictors.
PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.",
                      "roi_heads.label_predictor.")
# Buffers that say how the weights want their input; saved with the model, absent from foreign weights.
STRIDE_KEY = "backbone.body.stride_in_1x1"
FACT_KEYS = ("transform.pixel_mean", "transform.pixel_std", STRIDE_KEY)


# ----------------------------------------------------------------------------------------------
# Backbones. Each builder: (in_channels, frozen_bn, stride_in_1x1) -> backbone with .out_channels.
# Pretrained backbones get FrozenBatchNorm2d (torchvision's and detectron2's choice for detection:
# a few images per GPU give poor batch statistics). From random init the BatchNorms train, as in
# torchvision: a 101-layer body with identity norms blows up (losses ~1e4 at init).

def _frozen_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d (statistics and affine kept as buffers)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _frozen_bn(child)
    return module


def _new_stem_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    return new


def _densenet_features(in_channels: int, frozen_bn: bool) -> nn.Sequential:
    """torchvision's DenseNet121 ``features`` (conv0 ... norm5), its stem for ``in_channels``."""
    features = torchvision.models.densenet121(weights=None).features
    if frozen_bn:
        _frozen_bn(features)
    features.conv0 = _new_stem_conv(features.conv0, in_channels)
    return features


class DenseNetBackbone(nn.Module):
    """DenseNet121 features (1024 channels, stride 32) -> ReLU -> 1x1 conv to 256 -> ReLU: one map.

    ``stride_in_1x1`` is accepted for a common builder signature and means nothing here.
    """

    def __init__(self, in_channels: int, frozen_bn: bool = True, stride_in_1x1: bool = False):
        super().__init__()
        self.body = _densenet_features(in_channels, frozen_bn)
        self.reduce = nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(1024, 256, 1), nn.ReLU(inplace=True))
        self.out_channels = 256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.body(x))


def place_stride(body: nn.Module, stride_in_1x1: bool) -> None:
    """Put the stride of the first block of layers 2-4 in its 1x1 conv (MSRA/detectron2 R101) or its
    3x3 conv (torchvision). The weights are the same shapes either way; the features are not."""
    for layer in (body.layer2, body.layer3, body.layer4):
        block = layer[0]
        block.conv1.stride, block.conv2.stride = ((2, 2), (1, 1)) if stride_in_1x1 else ((1, 1), (2, 2))
    body.stride_in_1x1.fill_(stride_in_1x1)


def _stride_after_load(body: nn.Module, _incompatible) -> None:
    place_stride(body, bool(body.stride_in_1x1))  # the loaded buffer says where the stride belongs


def _resnet_fpn(arch: str, in_channels: int, frozen_bn: bool = True, stride_in_1x1: bool = False) -> BackboneWithFPN:
    """ResNet/ResNeXt body + FPN (levels 2-5 + max-pool P6, 256 channels): detectron2's layout."""
    resnet = getattr(torchvision.models, arch)(weights=None, norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
    resnet.conv1 = _new_stem_conv(resnet.conv1, in_channels)
    backbone = BackboneWithFPN(resnet, return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               in_channels_list=[256, 512, 1024, 2048], out_channels=256, extra_blocks=LastLevelMaxPool())
    body = backbone.body
    body.register_buffer("stride_in_1x1", torch.tensor(False))
    place_stride(body, stride_in_1x1)
    body.register_load_state_dict_post_hook(_stride_after_load)
    return backbone


def _densenet_fpn(in_channels: int, frozen_bn: bool = True, stride_in_1x1: bool = False) -> BackboneWithFPN:
    """DenseNet121 + FPN (256 channels, + max-pool P6), laid out as the ResNet FPNs: the outputs of
    dense blocks 1-3 (256/512/1024 channels, strides 4/8/16) and of norm5 (1024, stride 32).

    The single-map ``densenet121`` sees cells only at stride 32 (a 60 px cell is ~2 cells of its
    map at 512 px); the FPN gives the RPN and RoI heads the finer maps. The body keeps the
    ``features`` child names (conv0, denseblock1, ...), so the ImageNet keys map as for
    ``densenet121``. ``stride_in_1x1`` means nothing here (the common builder signature).
    """
    return BackboneWithFPN(_densenet_features(in_channels, frozen_bn),
                           return_layers={"denseblock1": "0", "denseblock2": "1", "denseblock3": "2", "norm5": "3"},
                           in_channels_list=[256, 512, 1024, 1024], out_channels=256, extra_blocks=LastLevelMaxPool())


def _imagenet_files(enum_name: str, versions: tuple[str, ...]) -> list[str]:
    """torchvision's ImageNet file names, read from its weight enums (which never download by themselves)."""
    weights = getattr(torchvision.models, enum_name)
    return [getattr(weights, v).url.rsplit("/", 1)[-1] for v in versions]


BACKBONES = {
    "densenet121": DenseNetBackbone,
    "densenet121_fpn": _densenet_fpn,
    "resnet101_fpn": partial(_resnet_fpn, "resnet101"),
    "resnext101_32x8d_fpn": partial(_resnet_fpn, "resnext101_32x8d"),
}
IMAGENET_FILES = {
    "densenet121": _imagenet_files("DenseNet121_Weights", ("IMAGENET1K_V1",)),
    "densenet121_fpn": _imagenet_files("DenseNet121_Weights", ("IMAGENET1K_V1",)),
    "resnet101_fpn": _imagenet_files("ResNet101_Weights", ("IMAGENET1K_V1", "IMAGENET1K_V2")),
    "resnext101_32x8d_fpn": _imagenet_files("ResNeXt101_32X8D_Weights", ("IMAGENET1K_V1", "IMAGENET1K_V2")),
}
STEM_KEYS = {"densenet121": "backbone.body.conv0.weight", "densenet121_fpn": "backbone.body.conv0.weight",
             "resnet101_fpn": "backbone.body.conv1.weight", "resnext101_32x8d_fpn": "backbone.body.conv1.weight"}
# Backbone stages from the input on; trainable_backbone_layers = k trains the last k (like torchvision).
STAGES = {
    "densenet121": [("conv0.", "norm0."), ("denseblock1.", "transition1."), ("denseblock2.", "transition2."),
                    ("denseblock3.", "transition3."), ("denseblock4.", "norm5.")],
    "resnet101_fpn": [("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",)],
}
STAGES["densenet121_fpn"] = STAGES["densenet121"]
STAGES["resnext101_32x8d_fpn"] = STAGES["resnet101_fpn"]
# The DenseNet bodies: torchvision's DenseNet ImageNet file, no detectron2 weights.
DENSENETS = ("densenet121", "densenet121_fpn")
# The one backbone with a single feature map; the others have FPN levels "0".."3" + "pool".
SINGLE_MAP = ("densenet121",)


# ----------------------------------------------------------------------------------------------
# Transform and heads

class InputTransform(GeneralizedRCNNTransform):
    """torchvision's transform with the per-channel mean/std as buffers, so they are saved with the model."""

    def __init__(self, image_size: int, mean: list[float], std: list[float]):
        super().__init__(min_size=image_size, max_size=image_size, image_mean=list(mean), image_std=list(std))
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32))
        self.register_load_state_dict_post_hook(InputTransform._sync_lists)

    @staticmethod
    def _sync_lists(module: InputTransform, _incompatible) -> None:
        module.image_mean, module.image_std = module.pixel_mean.tolist(), module.pixel_std.tolist()

    def resize(self, image: torch.Tensor, target: dict | None = None):
        # Images arrive at the model's size (the cache, or predict's resize): torchvision would
        # still interpolate each image and every mask (as float) at scale 1.0, an exact identity.
        if max(image.shape[-2:]) == self.max_size:
            return image, target
        return super().resize(image, target)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():
            raise TypeError(f"images must be float in [0, 1], got {image.dtype}")
        if image.shape[0] != self.pixel_mean.numel():
            raise ValueError(f"image has {image.shape[0]} channels; this model takes {self.pixel_mean.numel()}")
        mean = self.pixel_mean.to(image.dtype)[:, None, None]
        std = self.pixel_std.to(image.dtype)[:, None, None]
        return (image - mean) / std


class MultiLabelRoIHeads(RoIHeads):
    """Class-agnostic box/mask heads plus a multi-label classifier on the box-head features.

    Training: BCE (``loss_multilabel``) between the classifier's logits for the sampled positive
    proposals and the ``label_vectors`` of their matched cells: one instance per cell, so every
    label of a cell is a target of every proposal matched to it. Inference: the classifier runs on
    the box-head features of the final boxes (as the mask head runs on them) and each detection
    gets ``label_scores`` = sigmoid(logits), float [N, num_labels]. ``score_boxes``: the same
    scores for boxes given from outside (a segmenter's cells), with no detection step.

    ``label_pooling``: ``box`` classifies the box head's features of the whole box, which hold the
    neighbours' pixels too where cells crowd; ``mask`` weights the pooled RoI features by the
    cell's own mask (at the pool's 7x7) before the box head, as a crop model masks its crop: in
    training the matched cell's mask, at inference the predicted mask, for given boxes their
    cells' masks. The detection classifier keeps the whole box either way.

    ``label_loss``: ``mean`` averages the BCE over the positives and the classes; ``sum`` sums it
    over a cell's classes (mean over positives), so each class's logit gets the gradient a softmax
    head's would, not 1/19 of it: the label head learns at the box classifier's pace.

    ``cell_features`` (F > 0): the label logits also read each cell's F hand-made features
    (``hpa_scc.data.features``: where in the cell the green is, how grainy, how it colocalises),
    standardised by running statistics (BatchNorm without affine, as a StandardScaler) and added
    through their own linear layer. Training takes them from the targets (``cell_features`` float
    [N, F] per cell, ``CellInstances(cell_features=True)``); inference from ``CellFeatureMaskRCNN``
    (measured under the detections' masks) or ``score_boxes`` (under the given cells).
    ``init_feature_head`` (``model.cell_features_init``) starts that layer as a fitted features
    model, whose scaler then stays fixed in training (``fixed_feature_scale``).
    """

    def __init__(self, num_labels: int, representation_size: int, label_pooling: str = "box",
                 cell_features: int = 0, label_loss: str = "mean", **kwargs):
        super().__init__(**kwargs)
        if label_loss not in LABEL_LOSSES:
            raise ValueError(f"unknown label loss {label_loss!r}; choose one of {list(LABEL_LOSSES)}")
        self.label_loss = label_loss
        if label_pooling not in LABEL_POOLING:
            raise ValueError(f"unknown label pooling {label_pooling!r}; choose one of {list(LABEL_POOLING)}")
        self.label_pooling = label_pooling
        self.label_predictor = nn.Linear(representation_size, num_labels)
        self.cell_features = int(cell_features)
        if self.cell_features:
            self.feature_norm = nn.BatchNorm1d(self.cell_features, affine=False)
            self.feature_predictor = nn.Linear(self.cell_features, num_labels)
            # 1: the scaler is a fitted model's (init_feature_head) and stays fixed in training;
            # 0: batch statistics in training, running ones at inference. A buffer: the checkpoint says which.
            self.register_buffer("fixed_feature_scale", torch.zeros((), dtype=torch.bool))
            self._register_load_state_dict_pre_hook(_default_fixed_scale)

    def _label_logits(self, box_features: torch.Tensor, cell_features: torch.Tensor | None) -> torch.Tensor:
        """[N, num_labels] from the box head's features and (``cell_features`` > 0) the cells' own features."""
        logits = self.label_predictor(box_features)
        if not self.cell_features:
            return logits
        if cell_features is None or cell_features.shape != (len(box_features), self.cell_features):
            got = None if cell_features is None else tuple(cell_features.shape)
            raise ValueError(f"this head reads {self.cell_features} hand-made features per cell "
                             f"(model.cell_features=true): got {got} for {len(box_features)} boxes")
        x = torch.nan_to_num(cell_features.to(logits.dtype), nan=0.0, posinf=0.0, neginf=0.0)
        if (len(x) < 2 or self.fixed_feature_scale) and self.training:  # batch statistics need two rows
            x = F.batch_norm(x, self.feature_norm.running_mean, self.feature_norm.running_var, training=False,
                             eps=self.feature_norm.eps)
        elif len(x):
            x = self.feature_norm(x)
        return logits + self.feature_predictor(x)

    def _box_features(self, features, boxes, image_shapes):
        return self.box_head(self.box_roi_pool(features, boxes, image_shapes))

    def _label_features(self, features, boxes, image_shapes, masks: torch.Tensor | None):
        """The box head's features for the label classifier; ``masks`` float [N, M, M] in the
        boxes' frame, M the box pool's size (``label_pooling="mask"`` only)."""
        if self.label_pooling == "box":
            return self._box_features(features, boxes, image_shapes)
        pooled = self.box_roi_pool(features, boxes, image_shapes)
        return self.box_head(pooled * masks.to(pooled.dtype)[:, None])

    def _pool_size(self) -> int:
        size = self.box_roi_pool.output_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def score_boxes(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                    image_shapes: list[tuple[int, int]], masks: list[torch.Tensor] | None = None,
                    cell_features: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Sigmoid label scores of given boxes: float [K_i, 4] xyxy in the transformed images' px -> [K_i, num_labels].

        The RoI pool, box head and label predictor of inference, on these boxes instead of the
        detections: every box is scored (no score threshold, NMS or detection cap). ``masks``:
        each box's cell mask projected on it, float [K_i, M, M] (``box_masks``), needed by
        ``label_pooling="mask"``; ``cell_features``: each box's cell's hand-made features, float
        [K_i, F], needed by a head with ``cell_features`` > 0.
        """
        if self.label_pooling == "mask" and masks is None:
            raise ValueError("this head pools its label features by the cells' masks: give score_boxes the masks")
        flat = torch.cat(masks) if self.label_pooling == "mask" else None
        feats = torch.cat(cell_features) if self.cell_features and cell_features is not None else None
        label_logits = self._label_logits(self._label_features(features, boxes, image_shapes, flat), feats)
        return list(label_logits.sigmoid().split([len(b) for b in boxes]))

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None or any("label_vectors" not in t for t in targets):
                raise ValueError("the multilabel head trains on targets with 'label_vectors' (float [N, 19])")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
            box_features = self._box_features(features, proposals, image_shapes)
            class_logits, box_regression = self.box_predictor(box_features)
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)

            positives = [torch.where(lab > 0)[0] for lab in labels]
            if self.label_pooling == "mask":  # the positives again, their features weighted by their cells' masks
                pos_boxes = [p[pos] for p, pos in zip(proposals, positives)]
                pos_masks = torch.cat([project_masks_on_boxes(t["masks"], b, m[pos], self._pool_size())
                                       for t, b, m, pos in zip(targets, pos_boxes, matched_idxs, positives)])
                pos_box_features = self._label_features(features, pos_boxes, image_shapes, pos_masks)
            else:
                pos_box_features = torch.cat([f[pos] for f, pos in zip(box_features.split([len(p) for p in proposals]),
                                                                       positives)])
            pos_cell_features = None
            if self.cell_features:  # each positive reads the features of the cell it is matched to
                if any("cell_features" not in t for t in targets):
                    raise ValueError("this head reads each cell's hand-made features (model.cell_features=true): "
                                     "train on CellInstances(cell_features=True) targets")
                pos_cell_features = torch.cat([t["cell_features"][m[pos]]
                                               for t, m, pos in zip(targets, matched_idxs, positives)])
            pos_logits = self._label_logits(pos_box_features, pos_cell_features)
            pos_targets = torch.cat([t["label_vectors"][m[pos]] for t, m, pos in zip(targets, matched_idxs, positives)])
            if pos_logits.numel():
                loss_multilabel = F.binary_cross_entropy_with_logits(pos_logits, pos_targets.to(pos_logits.dtype))
                if self.label_loss == "sum":  # summed over a cell's classes: each class's logit learns at full rate
                    loss_multilabel = loss_multilabel * pos_logits.shape[1]
            else:
                loss_multilabel = pos_logits.sum() * 0.0

            mask_proposals = [p[pos] for p, pos in zip(proposals, positives)]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
            loss_mask = maskrcnn_loss(mask_logits, mask_proposals, [t["masks"] for t in targets],
                                      [t["labels"] for t in targets], [m[pos] for m, pos in zip(matched_idxs, positives)])
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
                        "loss_multilabel": loss_multilabel, "loss_mask": loss_mask}

        box_features = self._box_features(features, proposals, image_shapes)
        class_logits, box_regression = self.box_predictor(box_features)
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        masks = maskrcnn_inference(mask_logits, labels)
        pooled_masks = None
        if self.label_pooling == "mask":  # the predicted masks (probabilities, in the boxes' frame) at the pool's size
            flat = torch.cat(masks) if masks else mask_logits.new_zeros((0, 1, 1, 1))
            pooled_masks = F.adaptive_avg_pool2d(flat, self._pool_size())[:, 0]
        if self.cell_features:  # the cells' features need the detections' masks: CellFeatureMaskRCNN scores them
            pooled = pooled_masks.split([len(b) for b in boxes]) if pooled_masks is not None else [None] * len(boxes)
            return [{"boxes": b, "labels": lab, "scores": s, "masks": m, "label_masks": pm}
                    for b, lab, s, m, pm in zip(boxes, labels, scores, masks, pooled)], {}
        label_scores = self._label_logits(self._label_features(features, boxes, image_shapes, pooled_masks),
                                          None).sigmoid()
        result = [{"boxes": b, "labels": lab, "scores": s, "masks": m, "label_scores": ls}
                  for b, lab, s, m, ls in zip(boxes, labels, scores, masks, label_scores.split([len(b) for b in boxes]))]
        return result, {}


def _uint8_numpy(image: torch.Tensor) -> np.ndarray:
    """A model input (float [C, H, W] in [0, 1]) as the uint8 array the hand-made features take."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


class CellFeatureMaskRCNN(MaskRCNN):
    """Mask R-CNN whose multilabel head also reads each cell's hand-made features (``model.cell_features``).

    Training is MaskRCNN's: the targets carry each cell's features. Inference finds the cells first
    (RPN, box and mask heads), measures each detection's features on the input image under its
    mask (``data.features.mask_features``; where masks overlap the better detection keeps the
    pixel), then scores the final boxes with the label head on the same backbone maps: one
    backbone pass, and outputs as ``MaskRCNN`` with ``label_scores``.
    """

    def forward(self, images, targets=None):
        if self.training:
            return super().forward(images, targets)
        from hpa_scc.data.features import mask_features

        original_sizes = [tuple(image.shape[-2:]) for image in images]
        image_list, _ = self.transform(images)
        features = self.backbone(image_list.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = self.rpn(image_list, features)
        detections, _ = self.roi_heads(features, proposals, image_list.image_sizes)
        boxes = [d["boxes"] for d in detections]  # the transformed images' px, as the RoI heads take them
        label_masks = [d.pop("label_masks") for d in detections]
        detections = self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        cell_features = [torch.from_numpy(mask_features(_uint8_numpy(image), (d["masks"][:, 0] > 0.5).cpu().numpy()))
                         .to(image.device) for image, d in zip(images, detections)]
        masks = label_masks if self.roi_heads.label_pooling == "mask" else None
        scores = self.roi_heads.score_boxes(features, boxes, image_list.image_sizes, masks, cell_features)
        for d, s in zip(detections, scores):
            d["label_scores"] = s
        return detections


def box_masks(cells: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each cell's mask projected on its box, float [K, size, size]: ``cells`` bool/uint8
    [K, H, W], one mask per box, in the boxes' px (RoIAlign, as Mask R-CNN's mask targets)."""
    if not len(boxes):
        return boxes.new_zeros((0, size, size))
    return project_masks_on_boxes(cells.float(), boxes.float(), torch.arange(len(boxes), device=boxes.device), size)


def score_boxes(model: nn.Module, images: list[torch.Tensor], boxes: list[torch.Tensor],
                masks: list[torch.Tensor] | None = None,
                cell_features: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """19 sigmoid label scores for each given box of each image, from a multilabel-head model.

    ``images``: float [C, H, W] in [0, 1], as the model takes them; ``boxes``: float [K_i, 4] xyxy
    in those images' px (e.g. a segmenter's cells). Returns float [K_i, 19] per image, in the
    boxes' order. Runs the model's transform (boxes follow if it resizes), backbone and
    ``MultiLabelRoIHeads.score_boxes``; call it on a model in eval mode under ``torch.no_grad()``.
    A box's scores do not depend on the other boxes. The softmax head has no per-box label
    scores (its class scores belong to the boxes it regresses): ValueError. ``masks``: each box's
    cell, bool [K_i, H, W] in the images' px, needed by a head with ``label_pooling="mask"``
    (ignored by the box pooling). A head with ``cell_features`` (``model.cell_features=true``)
    reads each box's cell's hand-made features: ``cell_features`` float [K_i, F] per image, or,
    when not given, measured on the images under ``masks`` (``data.features.mask_features``).
    """
    if not isinstance(model.roi_heads, MultiLabelRoIHeads):
        raise ValueError("score_boxes needs a model with the multilabel head (model.head=multilabel); "
                         "the softmax head scores only its own detections")
    if len(images) != len(boxes):
        raise ValueError(f"score_boxes: {len(images)} images but {len(boxes)} box tensors")
    for b in boxes:
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"score_boxes: boxes must be float [K, 4] xyxy, got shape {tuple(b.shape)}")
    pooled_masks = None
    if model.roi_heads.label_pooling == "mask":
        if masks is None or len(masks) != len(boxes):
            raise ValueError("this detector pools its label features by the cells' masks (model.label_pooling=mask): "
                             "give score_boxes one mask per box")
        size = model.roi_heads._pool_size()
        pooled_masks = [box_masks(m.to(b.device), b, size) for m, b in zip(masks, boxes, strict=True)]
    if model.roi_heads.cell_features and cell_features is None:
        if masks is None or len(masks) != len(boxes):
            raise ValueError("this detector reads each cell's hand-made features (model.cell_features=true): "
                             "give score_boxes the cells' features, or one mask per box to measure them under")
        from hpa_scc.data.features import mask_features
        cell_features = [torch.from_numpy(mask_features(_uint8_numpy(image), m.cpu().numpy()))
                         for image, m in zip(images, masks, strict=True)]
    original_sizes = [tuple(image.shape[-2:]) for image in images]
    image_list, _ = model.transform(images)
    device = image_list.tensors.device
    boxes = [resize_boxes(b.to(device=device, dtype=torch.float32), size, new_size)
             for b, size, new_size in zip(boxes, original_sizes, image_list.image_sizes, strict=True)]
    features = model.backbone(image_list.tensors)
    if isinstance(features, torch.Tensor):  # the single-map backbone, as GeneralizedRCNN wraps it
        features = OrderedDict([("0", features)])
    return model.roi_heads.score_boxes(features, boxes, image_list.image_sizes,
                                       [m.to(device) for m in pooled_masks] if pooled_masks is not None else None,
                                       [f.to(device) for f in cell_features] if cell_features is not None else None)


def _default_fixed_scale(state_dict, prefix, *_args) -> None:
    """Checkpoints from before ``fixed_feature_scale`` trained with batch statistics: say so."""
    state_dict.setdefault(prefix + "fixed_feature_scale", torch.zeros((), dtype=torch.bool))


def init_feature_head(heads: MultiLabelRoIHeads, path: str | Path) -> None:
    """Start the head's cell-features layer as the features model at ``path`` (``model.cell_features_init``).

    ``path``: a features-family checkpoint holding one logistic regression per class on the same
    hand-made features (``configs/cell_features*.yaml``'s best.pt). Its scaler becomes the head's
    (kept fixed in training: a batch of two images' cells is not the population it was fitted
    on), its weights the feature layer's, and the RoI label layer starts at zero: the untrained
    head scores a cell as that model does, and training adds what the RoI features tell on top.
    Why: 680 SGD steps on 33 images teach a random-init head less than the features model fitted
    on every training image to convergence (docs/RESULTS.md, issue 29).
    """
    from hpa_scc.utils.checkpoint import checkpoint_model, load_checkpoint

    path = Path(path)
    fix = "give model.cell_features_init a features-family run's best.pt (configs/cell_features*.yaml), or null"
    if not heads.cell_features:
        raise ValueError(f"model.cell_features_init={path} initialises the head's cell-features layer: "
                         "set model.cell_features=true")
    if not path.is_file():
        raise FileNotFoundError(f"model.cell_features_init: {path} not found; {fix}")
    data = load_checkpoint(path)
    family = checkpoint_model(data)[0] if isinstance(data, dict) else None
    state = data.get("model") if isinstance(data, dict) else None
    if family != "features" or not isinstance(state, dict):
        raise ValueError(f"{path} holds a {family or 'non-project'} model, not a features-family one; {fix}")
    shape = (heads.feature_predictor.out_features, heads.cell_features)
    if "linear.weight" not in state or tuple(state["linear.weight"].shape) != shape:
        got = tuple(state["linear.weight"].shape) if "linear.weight" in state else "no logistic regression"
        raise ValueError(f"{path}: the head needs a logistic regression of shape {shape} (classes x features), "
                         f"got {got} (boosted trees have no linear layer); {fix}")
    with torch.no_grad():
        norm = heads.feature_norm
        scale = state["scale"].float()
        norm.running_mean.copy_(state["mean"])
        norm.running_var.copy_((scale ** 2 - norm.eps).clamp_min(0))
        # BatchNorm divides by sqrt(var + eps): where a feature's scale is below sqrt(eps) the
        # weight takes the difference, so the logits are the model's exactly
        heads.feature_predictor.weight.copy_(state["linear.weight"] * (norm.running_var + norm.eps).sqrt() / scale)
        heads.feature_predictor.bias.copy_(state["linear.bias"])
        heads.label_predictor.weight.zero_()
        heads.label_predictor.bias.zero_()
        heads.fixed_feature_scale.fill_(True)
    log.info("label head's cell-features layer from the features model %s", path)


def _multilabel_roi_heads(old: RoIHeads, num_labels: int, label_pooling: str = "box",
                          cell_features: int = 0, label_loss: str = "mean") -> MultiLabelRoIHeads:
    """The same pieces and settings as torchvision built, plus the multi-label classifier."""
    return MultiLabelRoIHeads(
        num_labels, old.box_predictor.cls_score.in_features, label_pooling, cell_features, label_loss,
        box_roi_pool=old.box_roi_pool, box_head=old.box_head, box_predictor=old.box_predictor,
        fg_iou_thresh=old.proposal_matcher.high_threshold, bg_iou_thresh=old.proposal_matcher.low_threshold,
        batch_size_per_image=old.fg_bg_sampler.batch_size_per_image, positive_fraction=old.fg_bg_sampler.positive_fraction,
        bbox_reg_weights=old.box_coder.weights, score_thresh=old.score_thresh, nms_thresh=old.nms_thresh,
        detections_per_img=old.detections_per_img,
        mask_roi_pool=old.mask_roi_pool, mask_head=old.mask_head, mask_predictor=old.mask_predictor)


# ----------------------------------------------------------------------------------------------
# build_model

def default_anchor_sizes(backbone: str, image_size: int) -> list[int]:
    """Anchor sides in px at the training size: FPN one per level, the single map several."""
    if backbone in SINGLE_MAP:
        return [max(4, round(image_size * f)) for f in SINGLE_MAP_ANCHOR_FRACTIONS]
    return [max(4, round(s * image_size / 1024)) for s in FPN_ANCHOR_SIZES_AT_1024]


def default_pixel_stats(in_channels: int) -> tuple[list[float], list[float]]:
    """ImageNet mean/std for RGB; yellow takes red's (it gets red's filter too)."""
    mean, std = list(IMAGENET_MEAN_RGB), list(IMAGENET_STD_RGB)
    if in_channels == 4:
        mean, std = mean + mean[:1], std + std[:1]
    return mean, std


def build_model(cfg: ModelConfig, num_classes: int = NUM_CLASSES, image_size: int = 512) -> nn.Module:
    """Mask R-CNN for ``cfg`` (backbone, head, in_channels, weights...): see the module docstring.

    ``num_classes``: foreground classes (19); ``image_size``: the training size in px (no resizing).
    """
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose one of {sorted(BACKBONES)}")
    if cfg.head not in ("softmax", "multilabel"):
        raise ValueError(f"unknown head {cfg.head!r}; choose one of ['multilabel', 'softmax']")
    if cfg.in_channels not in (3, 4):
        raise ValueError(f"in_channels must be 3 (RGB) or 4 (RGBY), got {cfg.in_channels}")
    fpn = cfg.backbone not in SINGLE_MAP
    weights = _read_weights(cfg)  # (kind, state dict) or None; read first: it may decide the architecture

    stride_in_1x1 = False
    if weights is not None and weights[0] == "detectron2":
        from hpa_scc.models.d2import import D2_STRIDE_IN_1X1
        stride_in_1x1 = D2_STRIDE_IN_1X1[cfg.backbone]
    elif weights is not None and STRIDE_KEY in weights[1]:
        stride_in_1x1 = bool(weights[1][STRIDE_KEY])
    # A cell model's backbone keeps training BatchNorm: its statistics come from masked crops, not
    # whole fields, and the whole body trains (same domain; no ImageNet features to protect).
    from_cells = weights is not None and weights[0] == "cell"
    backbone = BACKBONES[cfg.backbone](cfg.in_channels, frozen_bn=weights is not None and not from_cells,
                                       stride_in_1x1=stride_in_1x1)

    sizes = list(cfg.anchor_sizes) if cfg.anchor_sizes else default_anchor_sizes(cfg.backbone, image_size)
    if fpn:
        if len(sizes) != 5:
            raise ValueError(f"model.anchor_sizes: the FPN backbones take 5 sizes (one per level), got {sizes}")
        anchors = AnchorGenerator(tuple((s,) for s in sizes), (ASPECT_RATIOS,) * 5)
        box_pool = mask_pool = None  # torchvision's defaults: levels "0".."3"
    else:
        anchors = AnchorGenerator((tuple(sizes),), (ASPECT_RATIOS,))
        box_pool = MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2)
        mask_pool = MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=2)
    multilabel = cfg.head == "multilabel"
    # with the cells' hand-made features the head is scored after the masks are found (inference only differs)
    model_class = CellFeatureMaskRCNN if multilabel and cfg.cell_features else MaskRCNN
    model = model_class(backbone, num_classes=2 if multilabel else num_classes + 1,
                        rpn_anchor_generator=anchors, rpn_head=RPNHead(256, anchors.num_anchors_per_location()[0]),
                        box_roi_pool=box_pool, mask_roi_pool=mask_pool,
                        box_detections_per_img=cfg.box_detections_per_img, box_score_thresh=cfg.box_score_thresh,
                        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
                        rpn_pre_nms_top_n_train=max(cfg.rpn_post_nms_top_n_train, 1000),
                        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
                        rpn_pre_nms_top_n_test=max(cfg.rpn_post_nms_top_n_test, 1000),
                        box_batch_size_per_image=cfg.box_batch_size_per_image)
    if multilabel:
        n_features = 0
        if cfg.cell_features:
            from hpa_scc.data.features import FEATURE_NAMES

            n_features = len(FEATURE_NAMES)
        model.roi_heads = _multilabel_roi_heads(model.roi_heads, num_classes, cfg.label_pooling, n_features,
                                                cfg.label_loss)

    mean, std = default_pixel_stats(cfg.in_channels)
    if weights is not None and weights[0] == "detectron2":
        from hpa_scc.models.d2import import D2_PIXEL_STATS
        stats = D2_PIXEL_STATS[cfg.backbone]
        mean = [m / 255 for m in stats["mean_bgr"][::-1]]
        std = [s / 255 for s in stats["std_bgr"][::-1]]
        if cfg.in_channels == 4:
            mean, std = mean + mean[:1], std + std[:1]
    if cfg.pixel_mean is not None:
        mean = list(cfg.pixel_mean)
    if cfg.pixel_std is not None:
        std = list(cfg.pixel_std)
    if len(mean) != cfg.in_channels or len(std) != cfg.in_channels:
        raise ValueError(f"pixel_mean/pixel_std need {cfg.in_channels} values, got {mean} / {std}")
    model.transform = InputTransform(image_size, mean, std)

    if weights is not None:
        _load_weights(model, cfg, *weights)
    if cfg.cell_features_init:  # after the weights: this layer is the features model's whatever they held
        init_feature_head(model.roi_heads, cfg.cell_features_init)
    _set_trainable(model, cfg, pretrained=weights is not None and not from_cells)
    return model


# ----------------------------------------------------------------------------------------------
# Weights

def imagenet_path(backbone: str) -> Path:
    """Where the ImageNet backbone file is: the first of torchvision's file names present in the hub cache.

    Raises FileNotFoundError (naming the path and how to fill it) when none is; nothing is downloaded.
    """
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    names = IMAGENET_FILES[backbone]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"model.weights=imagenet needs {folder / names[0]}" + (f" (or {', '.join(names[1:])})" if names[1:] else "")
        + f"; this code never downloads. On a machine with internet run "
        f"\"python -c 'import torchvision; torchvision.models.{backbone.replace('_fpn', '')}(weights=\\\"IMAGENET1K_V1\\\")'\" "
        f"and copy the file from its torch hub cache into {folder} (set TORCH_HOME to move that folder), "
        f"or set model.weights to the file's path")


def _read_weights(cfg: ModelConfig) -> tuple[str, dict] | None:
    """("imagenet" | "detectron2" | "project" | "cell" | "state_dict", state dict in torchvision names) or None."""
    if cfg.weights is None:
        return None
    if cfg.weights == "imagenet":
        path = imagenet_path(cfg.backbone)
        state = torch.load(path, map_location="cpu", weights_only=True)
        log.info("ImageNet backbone weights: %s", path)
        return "imagenet", state
    path = Path(cfg.weights)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: {path} not found (expected null, 'imagenet', a detectron2 .pkl, "
                                f"a project checkpoint or a state dict)")
    if path.suffix == ".pkl":
        from hpa_scc.models.d2import import d2_to_torchvision, load_detectron2_checkpoint

        if cfg.backbone in DENSENETS:
            raise ValueError("detectron2 .pkl weights are for the resnet101_fpn / resnext101_32x8d_fpn backbones")
        state = d2_to_torchvision(load_detectron2_checkpoint(path), None, keep_predictors=True)
        return "detectron2", state  # predictors kept here; _load_weights decides with the model's shapes
    from hpa_scc.utils.checkpoint import checkpoint_model, load_checkpoint

    data = load_checkpoint(path)  # plain data only: a file holding other objects is refused, never run
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        family = checkpoint_model(data)[0] or "maskrcnn"
        if family not in ("maskrcnn", "cell"):  # else a list of every key of its logistic regressions
            raise ValueError(f"{path} holds a {family}-family model, which initialises no detector; give a Mask "
                             "R-CNN or cell-model checkpoint, ImageNet weights or a detectron2 .pkl")
        if family == "cell":
            return "cell", _cell_backbone_keys(data, cfg, path)
        return "project", data["model"]
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        if "fc.weight" in data or "classifier.weight" in data:  # a torchvision classifier: the ImageNet file itself
            return "imagenet", data
        return ("project" if "transform.pixel_mean" in data else "state_dict"), data
    raise ValueError(f"{path}: neither a project checkpoint (a dict with 'model') nor a state dict")


# a cell model's backbone -> (the detectors it initialises, its trunk's prefix in the cell checkpoint);
# the ResNet bodies keep torchvision's child names (conv1, bn1, layer1-4) under the FPN's layer getter
CELL_TRUNKS = {"densenet121": (DENSENETS, "net.features."),
               "resnet101": (("resnet101_fpn",), "net."),
               "resnext101_32x8d": (("resnext101_32x8d_fpn",), "net.")}


def _cell_backbone_keys(checkpoint: dict, cfg: ModelConfig, path: Path) -> dict:
    """A cell-level model's trunk (``hpa_scc.models.cells``, trained on cell crops) as this detector's
    backbone body: DenseNet121 ``net.features.*``, ResNet101 / ResNeXt101 ``net.*`` -> ``backbone.body.*``;
    its classifier is dropped."""
    backbone = checkpoint["config"]["model"]["backbone"]
    detectors, prefix = CELL_TRUNKS.get(backbone, ((), ""))
    if cfg.backbone not in detectors:
        fits = "; ".join(f"{'/'.join(d)}: model.backbone={b}" for b, (d, _) in CELL_TRUNKS.items())
        raise ValueError(f"{path}: a cell model with a {backbone} backbone does not initialise the {cfg.backbone} "
                         f"detector; the cell models that do ({fits})")
    return {"backbone.body." + k[len(prefix):]: v for k, v in checkpoint["model"].items()
            if k.startswith(prefix) and not k.startswith(("net.fc.", "net.classifier."))}


def adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first-conv weight [O, 3, k, k] (RGB) for ``in_channels`` inputs: 4 -> yellow = red, all x 3/4."""
    if weight.shape[1] == in_channels:
        return weight
    if weight.shape[1] == 3 and in_channels == 4:
        return torch.cat([weight, weight[:, :1]], dim=1) * (3 / 4)
    raise ValueError(f"cannot adapt a first conv with {weight.shape[1]} input channels to {in_channels}")


def densenet_imagenet_keys(state: dict) -> dict:
    """torchvision's DenseNet file -> our body's keys: old 'norm.1' names fixed (as torchvision does), classifier dropped.

    Both DenseNet bodies are the ``features`` Sequential under its own child names (the FPN's
    IntermediateLayerGetter keeps them), so ``features.X`` -> ``backbone.body.X`` for either.
    """
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    out = {}
    for key, value in state.items():
        key = pattern.sub(r"\1\2", key)
        if key.startswith("features."):
            out["backbone.body." + key[len("features."):]] = value
    return out


def _load_weights(model: nn.Module, cfg: ModelConfig, kind: str, state: dict) -> None:
    """Load ``state`` into ``model``; shapes must match, keys must exist; log what was loaded and what was not."""
    if kind == "imagenet":
        if cfg.backbone in DENSENETS:
            state = densenet_imagenet_keys(state)
        else:
            state = {"backbone.body." + k: v for k, v in state.items() if not k.startswith("fc.")}
    # BatchNorm (random init) and FrozenBatchNorm2d (pretrained) differ only by this counter.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    stem = STEM_KEYS[cfg.backbone]
    if stem in state and kind not in ("project", "cell"):
        state[stem] = adapt_stem(state[stem], cfg.in_channels)
        if cfg.in_channels == 4:
            log.info("4-channel stem from RGB weights: yellow filter = red filter, all filters x 3/4")

    # Predictors: dropped when their shapes do not fit the model (another class count or head), and
    # from foreign detection weights unless keep_predictors; a project checkpoint is this model: kept.
    own = model.state_dict()
    dropped = {}
    for key in [k for k in state if k.startswith(PREDICTOR_PREFIXES)]:
        if key not in own or own[key].shape != state[key].shape:
            dropped[key] = "shapes differ from the model's"
        elif kind != "project" and not cfg.keep_predictors:
            dropped[key] = "model.keep_predictors is false"
        if key in dropped:
            del state[key]
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ValueError(f"{cfg.weights}: {len(unexpected)} keys are not in the {cfg.backbone}/{cfg.head} model, "
                         f"e.g. {unexpected[:5]}")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{cfg.weights}: {len(wrong)} shapes differ from the model, e.g. {wrong[:5]}")
    missing = [k for k in own if k not in state and k not in FACT_KEYS and not k.endswith("num_batches_tracked")]
    # A state dict must fill the model (predictors aside), an ImageNet file the body; a detectron2
    # checkpoint may hold part of a model (a backbone alone): the rest is left at init and logged.
    if kind in ("project", "state_dict"):
        required = [k for k in missing if not k.startswith(PREDICTOR_PREFIXES)]
    else:
        required = [k for k in missing if k.startswith("backbone.body.")] if kind in ("imagenet", "cell") else []
    if required:
        raise ValueError(f"{cfg.weights}: {len(required)} model keys are missing, e.g. {required[:5]}")
    model.load_state_dict(state, strict=False)
    log.info("loaded %d tensors from %s (%s)", len(state), cfg.weights, kind)
    for reason in sorted(set(dropped.values())):
        keys = [k for k, r in dropped.items() if r == reason]
        log.info("dropped %d predictor tensors (%s): %s", len(keys), reason, _summary(keys))
    if missing:
        log.info("left at init: %d tensors: %s", len(missing), _summary(missing))


def _summary(keys: list[str], depth: int = 3) -> str:
    """Keys grouped by their first ``depth`` name parts: 'roi_heads.box_head.fc6 (2), ...'."""
    groups: OrderedDict[str, int] = OrderedDict()
    for key in keys:
        head = ".".join(key.split(".")[:depth])
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{k} ({n})" for k, n in groups.items())


def _set_trainable(model: nn.Module, cfg: ModelConfig, pretrained: bool) -> None:
    """From pretrained weights only the last ``trainable_backbone_layers`` stages of the body train."""
    stages = STAGES[cfg.backbone]
    k = len(stages) if not pretrained else cfg.trainable_backbone_layers
    if not 0 <= k <= len(stages):
        raise ValueError(f"model.trainable_backbone_layers must be 0-{len(stages)}, got {k}")
    trainable = tuple(p for stage in stages[len(stages) - k:] for p in stage)
    frozen = 0
    for name, param in model.backbone.body.named_parameters():
        param.requires_grad_(name.startswith(trainable))
        frozen += 0 if param.requires_grad else param.numel()
    if pretrained:
        log.info("backbone: last %d of %d stages train; %.1fM parameters frozen", k, len(stages), frozen / 1e6)


__all__ = ["BACKBONES", "CellFeatureMaskRCNN", "MultiLabelRoIHeads", "InputTransform", "build_model", "adapt_stem", "imagenet_path",
           "default_anchor_sizes", "default_pixel_stats", "place_stride", "score_boxes"]
