"""Detectron2 model-zoo checkpoints into the torchvision models: complete key map, exact backbone features.

Fixtures: ../shared/detectron2-parity (every key and shape of mask_rcnn_R_101_FPN_3x and
mask_rcnn_X_101_32x8d_FPN_3x, and small stem+res2+res3 checkpoints with detectron2's outputs).
"""

from __future__ import annotations

import gc
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hpa_scc.config import ModelConfig
from hpa_scc.models.d2import import D2_PIXEL_STATS, d2_to_torchvision, load_detectron2_checkpoint
from hpa_scc.models.detector import FACT_KEYS, build_model

CONFIGS = {"resnet101_fpn": ("COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml", "R_101"),
           "resnext101_32x8d_fpn": ("COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml", "X_101_32x8d")}


def parity_dir() -> Path:
    base = Path(os.environ["HPA_SHARED_DIR"]) if "HPA_SHARED_DIR" in os.environ else \
        Path(__file__).resolve().parents[1].parent / "shared"
    path = base / "detectron2-parity"
    if not (path / "fixture.json").is_file():
        pytest.skip(f"detectron2 parity data not found at {path} (set HPA_SHARED_DIR to the folder holding detectron2-parity/)")
    return path


def test_predictors_are_rearranged_for_torchvision():
    """Background last -> first in cls_score; zero background slots in bbox_pred and the mask predictor; stem BGR -> RGB."""
    d2 = {"roi_heads.box_predictor.cls_score.weight": np.arange(4 * 2, dtype=np.float32).reshape(4, 2),
          "roi_heads.box_predictor.cls_score.bias": np.arange(4, dtype=np.float32),
          "roi_heads.box_predictor.bbox_pred.bias": np.arange(3 * 4, dtype=np.float32) + 1,
          "roi_heads.mask_head.predictor.weight": np.ones((3, 5, 1, 1), np.float32),
          "backbone.bottom_up.stem.conv1.weight": np.arange(3, dtype=np.float32).reshape(1, 3, 1, 1),
          "pixel_mean": np.zeros((3, 1, 1), np.float32)}
    tv = d2_to_torchvision(d2, num_classes_out=3, keep_predictors=True)
    assert tv["roi_heads.box_predictor.cls_score.bias"].tolist() == [3, 0, 1, 2]
    assert tv["roi_heads.box_predictor.cls_score.weight"][0].tolist() == [6, 7]
    assert tv["roi_heads.box_predictor.bbox_pred.bias"].tolist() == [0] * 4 + list(range(1, 13))
    mask = tv["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert mask.shape == (4, 5, 1, 1) and mask[0].abs().sum() == 0 and (mask[1:] == 1).all()
    assert tv["backbone.body.conv1.weight"].flatten().tolist() == [2, 1, 0]
    assert "pixel_mean" not in tv

    for kwargs in ({"num_classes_out": 19, "keep_predictors": True}, {"num_classes_out": 3, "keep_predictors": False}):
        assert list(d2_to_torchvision(d2, **kwargs)) == ["backbone.body.conv1.weight"]
    with pytest.raises(KeyError, match="no torchvision counterpart"):
        d2_to_torchvision({"roi_heads.keypoint_head.conv1.weight": np.zeros(1, np.float32)}, None, True)


def test_reads_model_zoo_pickles(tmp_path):
    arrays = {"backbone.fpn_lateral2.bias": np.arange(3, dtype=np.float32)}
    for protocol, data in ((2, {"model": arrays, "__author__": "Detectron2 Model Zoo"}), (4, arrays)):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        state = load_detectron2_checkpoint(path)
        assert list(state) == list(arrays) and np.array_equal(state["backbone.fpn_lateral2.bias"], arrays["backbone.fpn_lateral2.bias"])


@pytest.mark.parametrize("backbone", sorted(CONFIGS))
def test_key_map_covers_the_whole_model_zoo_checkpoint(backbone):
    """Every key of the full detectron2 model maps to a key of ours with the same shape, and vice versa."""
    zoo = json.loads((parity_dir() / "model_zoo_state_dict_keys.json").read_text())[CONFIGS[backbone][0]]
    d2 = {name: np.zeros(shape, np.float32) for name, shape in zoo["keys"].items()}  # zeros: pages never touched
    tv = d2_to_torchvision(d2, num_classes_out=zoo["num_classes"], keep_predictors=True)
    assert len(tv) == len(d2)  # one to one: no detectron2 key unused (unknown ones raise)
    model = build_model(ModelConfig(backbone=backbone, head="softmax", in_channels=3, keep_predictors=True),
                        num_classes=zoo["num_classes"])
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()
           if k not in FACT_KEYS and not k.endswith("num_batches_tracked")}
    del model
    assert sorted(own) == sorted(tv)
    wrong = {k: (tuple(v.shape), own[k]) for k, v in tv.items() if tuple(v.shape) != own[k]}
    assert not wrong
    assert zoo["norm"] == "FrozenBN" and zoo["input_format"] == "BGR"
    del d2, tv
    gc.collect()


@pytest.mark.parametrize("backbone", sorted(CONFIGS))
def test_backbone_matches_detectron2(backbone):
    """res2/res3 of the imported body on detectron2's input, fed the way our model sees it (RGB in [0, 1])."""
    folder = parity_dir()
    tag = CONFIGS[backbone][1]
    facts = json.loads((folder / "fixture.json").read_text())[tag]
    assert list(D2_PIXEL_STATS[backbone]["mean_bgr"]) == facts["pixel_mean_bgr"]
    assert list(D2_PIXEL_STATS[backbone]["std_bgr"]) == facts["pixel_std_bgr"]
    model = build_model(ModelConfig(backbone=backbone, in_channels=3, weights=str(folder / f"{tag}_stem_res2_res3.pkl")),
                        num_classes=80).eval()
    body = model.backbone.body
    assert bool(body.stride_in_1x1) == facts["stride_in_1x1"]
    assert body.layer3[0].conv1.stride == ((2, 2) if facts["stride_in_1x1"] else (1, 1))
    bgr_255 = torch.from_numpy(np.load(folder / f"{tag}_input_bgr.npy"))  # [1, 3, H, W]
    rgb_01 = bgr_255.flip(1) / 255
    with torch.no_grad():
        features = body(model.transform.normalize(rgb_01[0])[None])
    for key, name in (("0", "res2"), ("1", "res3")):
        reference = np.load(folder / f"{tag}_{name}.npy")
        assert features[key].shape == tuple(facts[f"{name}_shape"])
        error = np.abs(features[key].numpy() - reference).max() / np.abs(reference).max()
        print(f"{tag} {name}: max abs error / max abs reference = {error:.2e}")  # shown with pytest -s
        assert error <= 1e-5
    stem_rgb = body.conv1.weight.detach().clone()
    del model, body
    gc.collect()

    # RGBY from the same weights: yellow = red, all x 3/4; Y normalised like R.
    model = build_model(ModelConfig(backbone=backbone, in_channels=4, weights=str(folder / f"{tag}_stem_res2_res3.pkl")),
                        num_classes=80)
    stem = model.backbone.body.conv1.weight.detach()
    torch.testing.assert_close(stem[:, :3], stem_rgb * 0.75)
    torch.testing.assert_close(stem[:, 3], stem_rgb[:, 0] * 0.75)
    mean, std = model.transform.image_mean, model.transform.image_std
    assert mean[3] == mean[0] and std[3] == std[0]
    assert mean[0] == pytest.approx(facts["pixel_mean_bgr"][2] / 255)
    del model
    gc.collect()


def test_build_model_keeps_or_drops_coco_predictors(tmp_path, caplog):
    """80 COCO classes: kept (background moved first) when asked and the counts agree; dropped for 19 classes."""
    rng = np.random.default_rng(0)
    arrays = {"roi_heads.box_predictor.cls_score.weight": rng.standard_normal((81, 1024), dtype=np.float32),
              "roi_heads.box_predictor.cls_score.bias": rng.standard_normal(81, dtype=np.float32),
              "roi_heads.box_predictor.bbox_pred.weight": rng.standard_normal((320, 1024), dtype=np.float32),
              "roi_heads.box_predictor.bbox_pred.bias": rng.standard_normal(320, dtype=np.float32),
              "roi_heads.mask_head.predictor.weight": rng.standard_normal((80, 256, 1, 1), dtype=np.float32),
              "roi_heads.mask_head.predictor.bias": rng.standard_normal(80, dtype=np.float32)}
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "test"}, protocol=2))
    coco = build_model(ModelConfig(backbone="resnet101_fpn", head="softmax", in_channels=3, weights=str(path),
                                   keep_predictors=True), num_classes=80, image_size=128)
    bias = coco.roi_heads.box_predictor.cls_score.bias.detach().numpy()
    assert bias[0] == arrays["roi_heads.box_predictor.cls_score.bias"][80]  # background first
    np.testing.assert_array_equal(bias[1:], arrays["roi_heads.box_predictor.cls_score.bias"][:80])
    del coco
    gc.collect()
    with caplog.at_level("INFO", logger="hpa_scc.models.detector"):
        hpa = build_model(ModelConfig(backbone="resnet101_fpn", head="softmax", in_channels=3, weights=str(path),
                                      keep_predictors=True), image_size=128)
    assert hpa.roi_heads.box_predictor.cls_score.out_features == 20
    assert "dropped 6 predictor tensors (shapes differ" in caplog.text
    del hpa
    gc.collect()
