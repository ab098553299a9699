"""Detectron2 model-zoo Mask R-CNN checkpoints (.pkl) into this project's torchvision models.

    state = d2_to_torchvision(load_detectron2_checkpoint("model_final_a3ec72.pkl"), 80, keep_predictors=True)

Used by ``hpa_scc.models.detector.build_model`` when ``model.weights`` ends in ``.pkl``. Made for
COCO-InstanceSegmentation ``mask_rcnn_R_101_FPN_3x`` and ``mask_rcnn_X_101_32x8d_FPN_3x``
(FrozenBN ResNet/ResNeXt + FPN, StandardRPNHead, 2-fc box head, 4-conv mask head); the
layers match torchvision's 1:1 once a few conventions are translated:

* names: ``bottom_up.res{2..5}.{i}.conv{k}.norm`` -> ``body.layer{1..4}.{i}.bn{k}``, etc. (``_rename``);
* input: detectron2 sees BGR 0..255 and normalises with ``(x - mean_bgr) / std_bgr``; our models
  see RGB in [0, 1]. The stem's input channels are reordered BGR -> RGB here, and the model's
  transform must use ``mean_rgb / 255`` and ``std_rgb / 255`` (``D2_PIXEL_STATS``): the same
  arithmetic, so the backbone features are identical;
* stride: detectron2's R101 (MSRA weights) strides in the 1x1 conv of each stage's first block,
  torchvision in the 3x3; ``D2_STRIDE_IN_1X1`` says which, ``build_model`` places the stride;
* classifiers: detectron2 puts background last in ``cls_score`` and has no background slot in
  the class-specific ``bbox_pred`` and mask ``predictor``; torchvision puts background first
  (row 0), so background moves to the front and zero rows fill the background slots;
* FrozenBN: detectron2's and torchvision's ``FrozenBatchNorm2d`` both use eps 1e-5 and the same
  formula (weight * rsqrt(var + eps), bias - mean * scale).

Known differences that do not change the weights: detectron2's ROIAlignV2 (``aligned=True``,
adaptive sampling) vs torchvision's MultiScaleRoIAlign (``aligned=False``, 2 samples) and
torchvision's rounded base anchors, so detections after the RPN differ slightly; fine-tuning
absorbs it. The backbone (what the parity test checks) is exact.
"""

from __future__ import annotations

import logging
import pickle
import re
from os import PathLike

import numpy as np
import torch

log = logging.getLogger(__name__)

# What each detectron2 config did with its input; pixel statistics in detectron2's BGR order, 0..255.
D2_PIXEL_STATS = {
    "resnet101_fpn": {"mean_bgr": (103.53, 116.28, 123.675), "std_bgr": (1.0, 1.0, 1.0)},  # caffe/MSRA style
    "resnext101_32x8d_fpn": {"mean_bgr": (103.53, 116.28, 123.675), "std_bgr": (57.375, 57.12, 58.395)},
}
D2_STRIDE_IN_1X1 = {"resnet101_fpn": True, "resnext101_32x8d_fpn": False}

# Keys a detectron2 checkpoint may hold that have no torchvision counterpart (input statistics
# live in the model's transform instead; see D2_PIXEL_STATS).
IGNORED_KEYS = ("pixel_mean", "pixel_std")
STEM_KEY = "backbone.body.conv1.weight"
PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")

# detectron2 name pattern -> torchvision name, tried in order.
_RULES = [
    (r"backbone\.bottom_up\.stem\.conv1\.weight", "backbone.body.conv1.weight"),
    (r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)", r"backbone.body.bn1.\1"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight", lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)", lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight", lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)", lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"),
    (r"backbone\.fpn_lateral(\d)\.(\w+)", lambda m: f"backbone.fpn.inner_blocks.{int(m[1]) - 2}.0.{m[2]}"),
    (r"backbone\.fpn_output(\d)\.(\w+)", lambda m: f"backbone.fpn.layer_blocks.{int(m[1]) - 2}.0.{m[2]}"),
    (r"proposal_generator\.rpn_head\.conv\.(\w+)", r"rpn.head.conv.0.0.\1"),
    (r"proposal_generator\.rpn_head\.objectness_logits\.(\w+)", r"rpn.head.cls_logits.\1"),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(\w+)", r"rpn.head.bbox_pred.\1"),
    (r"roi_heads\.box_head\.fc1\.(\w+)", r"roi_heads.box_head.fc6.\1"),
    (r"roi_heads\.box_head\.fc2\.(\w+)", r"roi_heads.box_head.fc7.\1"),
    (r"roi_heads\.box_predictor\.cls_score\.(\w+)", r"roi_heads.box_predictor.cls_score.\1"),
    (r"roi_heads\.box_predictor\.bbox_pred\.(\w+)", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"roi_heads\.mask_head\.mask_fcn(\d)\.(\w+)", lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}"),
    (r"roi_heads\.mask_head\.deconv\.(\w+)", r"roi_heads.mask_predictor.conv5_mask.\1"),
    (r"roi_heads\.mask_head\.predictor\.(\w+)", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
]


def load_detectron2_checkpoint(path: str | PathLike) -> dict[str, np.ndarray]:
    """The state dict of a detectron2 .pkl (``{"model": {name: array}, "__author__": ...}``) as numpy arrays.

    Model-zoo pickles were written by Python 2 or 3; ``latin1`` decodes both. A bare
    ``{name: array}`` pickle is accepted too.
    """
    try:
        with open(path, "rb") as fh:
            data = pickle.load(fh, encoding="latin1")
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; give the .pkl file itself") from None
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, AttributeError, ImportError, IndexError,
            KeyError, TypeError, ValueError) as exc:  # what pickle raises on a file that is not one
        raise ValueError(f"{path} is not a readable detectron2 .pkl ({type(exc).__name__}: {exc}); give a "
                         "model-zoo file such as model_final_f10217.pkl, downloaded again if it was cut short") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(data).__name__}")
    if "blobs" in data and "model" not in data:
        raise ValueError(f"{path}: a Caffe2/Detectron1 'blobs' pickle; only detectron2 ('model') checkpoints are supported")
    state = data.get("model", data)
    out = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            out[name] = value
    if not out:
        raise ValueError(f"{path}: no arrays found under 'model'")
    log.info("read %d arrays from %s (author: %s)", len(out), path, data.get("__author__", "unknown"))
    return out


def _rename(name: str) -> str | None:
    for pattern, repl in _RULES:
        m = re.fullmatch(pattern, name)
        if m:
            return repl(m) if callable(repl) else m.expand(repl)
    return None


def d2_num_classes(d2_state: dict) -> int | None:
    """Foreground classes of a detectron2 checkpoint (from ``cls_score``, which has one more row), or None."""
    w = d2_state.get("roi_heads.box_predictor.cls_score.weight")
    return None if w is None else int(w.shape[0]) - 1


def d2_to_torchvision(d2_state: dict, num_classes_out: int | None, keep_predictors: bool) -> dict[str, torch.Tensor]:
    """Rename and rearrange a detectron2 state dict for the torchvision Mask R-CNN of ``hpa_scc.models.detector``.

    ``num_classes_out``: foreground classes of the target model (background not counted);
    None accepts the checkpoint's. The class/box/mask predictors are kept only when
    ``keep_predictors`` and the class counts agree; otherwise they are dropped (and logged).
    The stem comes out in RGB input order (see the module docstring). Unknown keys raise.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    d2_classes = d2_num_classes(d2_state)
    keep = keep_predictors and (num_classes_out is None or num_classes_out == d2_classes)
    dropped = []
    for name, array in d2_state.items():
        if name in IGNORED_KEYS:
            continue
        new = _rename(name)
        if new is None:
            unknown.append(name)
            continue
        if new.startswith(PREDICTOR_PREFIXES):
            if not keep:
                dropped.append(name)
                continue
        tensor = torch.from_numpy(np.ascontiguousarray(array)).float()
        if new == STEM_KEY:
            tensor = tensor.flip(1)  # BGR -> RGB input channels
        elif new.startswith("roi_heads.box_predictor.cls_score."):
            tensor = torch.cat([tensor[-1:], tensor[:-1]])  # background last -> first
        elif new.startswith(("roi_heads.box_predictor.bbox_pred.", "roi_heads.mask_predictor.mask_fcn_logits.")):
            per_class = 4 if "bbox_pred" in new else 1
            tensor = torch.cat([tensor.new_zeros((per_class, *tensor.shape[1:])), tensor])  # background slot
        out[new] = tensor.contiguous()
    if unknown:
        raise KeyError(f"{len(unknown)} detectron2 keys have no torchvision counterpart, e.g. {unknown[:5]}; "
                       f"only FrozenBN ResNet/ResNeXt-FPN Mask R-CNN checkpoints are supported")
    if dropped:
        why = "keep_predictors is false" if not keep_predictors else \
            f"the checkpoint has {d2_classes} classes, the model {num_classes_out}"
        log.info("detectron2 import: dropped the %d predictor tensors (%s)", len(dropped), why)
    return out
