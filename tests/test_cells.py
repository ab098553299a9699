"""Cell-level models (hpa_scc.models.cells; crops and their store: hpa_scc.data.cells): both families through train/predict/refine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hpa_scc.data.cells import build_store, cell_crops, cell_images
from hpa_scc.engine.families import fit_feature_classifier, macro_ap
from hpa_scc.models.cells import CellClassifier, FeatureClassifier
from hpa_scc.data.prepared import PreparedSet
from hpa_scc.config import ConfigError, load_config
from hpa_scc.constants import NUM_CLASSES


def test_crops_are_masked_centred_and_in_the_asked_order():
    image = np.full((4, 40, 60), 200, np.uint8)
    cells = np.zeros((40, 60), np.int32)
    cells[5:15, 5:25] = 2  # 10 x 20
    cells[20:38, 40:58] = 1  # 18 x 18, one px from the right border
    crops = cell_crops(image, cells, [2, 1, 7], crop_size=16, context=0.0)
    assert crops.shape == (3, 4, 16, 16) and crops.dtype == np.uint8
    # cell 2: a 20-px square around a 10 x 20 box -> the middle half of the rows is cell, the rest zero
    assert crops[0, :, 8, :].min() == 200 and crops[0, :, 0, :].max() == 0
    assert crops[1].min() == 200  # cell 1 fills its square
    assert crops[2].max() == 0  # an absent id gives an all-zero crop
    other = image.copy()
    other[:, cells != 2] = 0
    assert np.array_equal(cell_crops(other, cells, [2], 16, 0.0), crops[:1])  # nothing outside the cell leaks in
    assert cell_crops(image, cells, [], 16).shape == (0, 4, 16, 16)


def test_cell_classifier_trains_and_scores():
    model = CellClassifier("resnet18", in_channels=4)
    crops = torch.randint(0, 255, (3, 4, 32, 32), dtype=torch.uint8)
    targets = [{"label_vector": torch.eye(NUM_CLASSES)[i]} for i in range(3)]
    losses = model(crops.float() / 255, targets)
    assert set(losses) == {"loss_bce"} and losses["loss_bce"].item() > 0
    losses["loss_bce"].backward()
    assert model.net.conv1.weight.shape[1] == 4 and model.net.conv1.weight.grad[:, 3].abs().sum() > 0  # yellow learns
    model.eval()
    scores = model(crops)  # uint8 is scaled inside
    assert scores.shape == (3, NUM_CLASSES) and 0 <= scores.min() and scores.max() <= 1
    with pytest.raises(ValueError, match="unknown cell backbone 'vgg'.*resnet18"):
        CellClassifier("vgg")


def test_feature_classifier_fits_a_separable_class():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    labels = np.zeros((200, NUM_CLASSES), np.float32)
    labels[:, 3] = x[:, 0] * 100 + 7 > 7  # class 3 <=> feature 0 positive; raw scale far from 1
    labels[:, 18] = 1  # a class every cell has: constant, no regression
    model = fit_feature_classifier(FeatureClassifier(5), x * 100 + 7, labels)
    with torch.no_grad():
        p = model(torch.from_numpy(x * 100 + 7)).numpy()
    assert macro_ap(p[:, [3]], labels[:, [3]]) > 0.98
    assert p[:, 18].min() > 0.99 and p[:, 0].max() < 0.01


def test_config_checks_the_family_and_its_backbone():
    cfg = load_config(None, ["model.family=cell", "model.backbone=resnet34"])
    assert cfg.model.family == "cell"
    with pytest.raises(ConfigError, match="model.family = 'svm'"):
        load_config(None, ["model.family=svm"])
    with pytest.raises(ConfigError, match="not a cell-model backbone.*resnet18"):
        load_config(None, ["model.family=cell", "model.backbone=resnet101_fpn"])


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory) -> Path:
    """6 synthetic images at 256 px prepared at 128 px in 2 folds (both layouts, truth included).
    The module's own copy: its tests build crop stores in it, rewrite fold files and refine."""
    shared = shared_data.prepared(images=6, size=256, seed=11, prepare_size=128, folds=2)
    return shared_data.copy(shared, tmp_path_factory.mktemp("cells"))


def test_store_is_built_once_and_rebuilt_when_the_cells_change(prepared):
    p = prepared / "prepared"
    table = cell_images(p)
    n_cells = sum(len(np.unique(store.cell_ids(row))) for _, store, row in table)
    store = build_store(p, "crops", 24, progress=False)
    assert store.array.shape == (n_cells, 4, 24, 24) and len(store) == n_cells
    assert set(store.cells["fold"].tolist()) == {0, 1}
    path = p / "crops" / "24px.npy"
    stamp = path.stat().st_mtime_ns
    again = build_store(p, "crops", 24, progress=False)
    assert path.stat().st_mtime_ns == stamp and np.array_equal(np.asarray(again.array), np.asarray(store.array))
    # the same cells give the same crops as cutting them by hand from the cache
    _, first, row = table[0]
    from hpa_scc.data.cache import cache_path
    from hpa_scc.data.prepared import label_image

    name = first.image(row)["image_name"]
    pixels = np.load(cache_path(p / "cache", name))
    anns = first.to_coco([row])["annotations"]
    ids = sorted({a["cell_id"] for a in anns})
    label = label_image(anns, pixels.shape[1:])
    assert np.array_equal(first.label_image(row), label)
    expected = cell_crops(pixels, label, ids, 24)
    rows = [store.rows[(name, i)] for i in ids]
    assert np.array_equal(np.asarray(store.array[rows]), expected)
    # a changed segmentation (one cell dropped from every fold file) is noticed and rebuilt
    for layout in ("multilabel", "per_label"):
        for f in (p / "coco" / layout).glob("fold*.json"):
            coco = json.loads(f.read_text())
            drop = coco["annotations"][0]["cell_id"], coco["annotations"][0]["image_id"]
            coco["annotations"] = [a for a in coco["annotations"] if (a["cell_id"], a["image_id"]) != drop]
            f.with_suffix(".bak").write_text(f.read_text())
            f.write_text(json.dumps(coco))
    try:
        rebuilt = build_store(p, "crops", 24, progress=False)
        assert len(rebuilt) == n_cells - 2
    finally:
        for layout in ("multilabel", "per_label"):
            for f in (p / "coco" / layout).glob("fold*.bak"):
                os.replace(f, f.with_suffix(".json"))


def test_labels_of_every_folder(prepared):
    p = prepared / "prepared"
    weak, truth = PreparedSet(p).label_vectors("image"), PreparedSet(p).label_vectors("truth")
    assert weak.keys() == truth.keys()
    for key, vec in truth.items():  # a true label is always one of the image's labels (or Negative)
        assert set(np.flatnonzero(vec)) <= set(np.flatnonzero(weak[key])) | {18}
    with pytest.raises(FileNotFoundError, match="coco_nope"):
        PreparedSet(p).label_vectors("nope")


def test_cell_family_trains_resumes_predicts_and_refines(prepared, tmp_path):
    from hpa_scc.evaluation.metric import evaluate_files
    from hpa_scc.apps.predict import predict_folder
    from hpa_scc.apps.refine import refine_prepared
    from hpa_scc.engine.train import train

    p = prepared / "prepared"
    run = tmp_path / "cell"
    over = [f"data.prepared_dir={p}", "data.image_size=128", "data.workers=0", f"train.run_dir={run}",
            "data.crop_size=32", "train.images_per_gpu=16", "train.tensorboard=false", "optim.warmup_iters=2"]
    train(load_config(Path("configs/cell_resnet18.yaml"), over + ["train.max_epochs=1"]), progress=False)
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["epoch"] == 1
    train(load_config(Path("configs/cell_resnet18.yaml"), over + ["train.max_epochs=2"]), progress=False)  # resumes
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if x["kind"] == "val"]
    assert [v["epoch"] for v in val] == [1, 2] and all(0 <= v["cell_AP"] <= 1 and "cell_AP_truth" in v for v in val)
    assert "resumed from" in (run / "train.log").read_text()

    sub = predict_folder(run, prepared / "set", tmp_path / "pred", workers=1, progress=False)
    rows = (tmp_path / "pred" / "cells.csv").read_text().splitlines()
    assert len(rows[0].split(",")) == 7 + NUM_CLASSES and len(rows) > 6
    assert 0 <= evaluate_files(prepared / "set" / "solution.csv", sub).mAP <= 1

    report = refine_prepared(run, p, name="cell_r1", held_out_folds=[1], threshold=0.0, relative=0.5, min_f1=0.0,
                             progress=False)
    assert report.threshold == 0.0 and report.relative == 0.5
    saved = json.loads((p / "coco_cell_r1" / "refine.json").read_text())  # the synthetic truth scores both
    assert set(report.truth_after) == {"precision", "recall", "f1", "exact"} == set(report.truth_before)
    assert saved["truth_after"] == pytest.approx(report.truth_after) and 0 <= report.truth_after["f1"] <= 1
    for layout in ("multilabel", "per_label"):  # every layout of the source is written
        assert sorted(f.name for f in (p / "coco_cell_r1" / layout).glob("*.json")) == ["fold0.json", "fold1.json"]
    weak, refined = PreparedSet(p).label_vectors("image"), PreparedSet(p).label_vectors("cell_r1")
    for key, vec in refined.items():  # refinement only removes image labels (or leaves a cell Negative)
        assert set(np.flatnonzero(vec)) <= set(np.flatnonzero(weak[key])) | {18}


def test_features_family_fits_in_one_go_and_ensembles_with_a_detector(prepared, tmp_path):
    from hpa_scc.apps.predict import predict_folder
    from hpa_scc.engine.train import train

    p = prepared / "prepared"
    run = tmp_path / "feat"
    # no data.image_size: the prepared set (128 px) owns the size, and the run's config records it
    cfg = load_config(Path("configs/cell_features.yaml"), [f"data.prepared_dir={p}", f"train.run_dir={run}",
                                                           "data.val_fold=-1"])
    assert cfg.data.image_size is None
    model = train(cfg, progress=False).model
    # resolved in the run's copy (saved in config.yaml); the caller's config is not changed
    assert cfg.data.image_size is None and load_config(run / "config.yaml").data.image_size == 128
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    with pytest.raises(ValueError, match="prepared at 128 px but data.image_size is 256; leave data.image_size out"):
        train(load_config(Path("configs/cell_features.yaml"), [f"data.prepared_dir={p}", "data.image_size=256",
                                                               f"train.run_dir={tmp_path / 'other'}"]), progress=False)
    assert not (tmp_path / "other" / "config.yaml").exists()  # refused before anything is written
    assert float(model.scale.min()) > 0 and model.linear.weight.abs().sum() > 0
    predict_folder(run, prepared / "set", tmp_path / "pred", workers=1, progress=False)
    conf = np.loadtxt(tmp_path / "pred" / "cells.csv", delimiter=",", skiprows=1, usecols=range(7, 7 + NUM_CLASSES))
    weak = PreparedSet(p).label_vectors("image")
    assert conf.shape[1] == NUM_CLASSES and 0 <= conf.min() and conf.max() <= 1
    # fitted on every cell: the classes no image has score low, those every cell has score high
    absent = [c for c in range(NUM_CLASSES) if all(v[c] == 0 for v in weak.values())]
    assert absent and conf[:, absent].max() < 0.5

    # a mean of two models' confidences: the features model with itself gives the same scores
    predict_folder(run, prepared / "set", tmp_path / "ens", workers=1, ensemble=[run], progress=False)
    conf2 = np.loadtxt(tmp_path / "ens" / "cells.csv", delimiter=",", skiprows=1, usecols=range(7, 7 + NUM_CLASSES))
    assert np.allclose(conf, conf2, atol=1e-5)
    # the same OUT with another setting is refused, never mixed with the earlier records
    with pytest.raises(ValueError, match="use another OUT_DIR"):
        predict_folder(run, prepared / "set", tmp_path / "pred", workers=1, image_fusion=0.5, progress=False)
    # training again with the same config reuses the fit (same checkpoint), so the same OUT resumes
    train(cfg, progress=False)
    predict_folder(run, prepared / "set", tmp_path / "pred", workers=1, progress=False)
    with pytest.raises(ValueError, match="--cells model needs a detector"):
        predict_folder(run, prepared / "set", tmp_path / "bad", cells="model", workers=1, progress=False)


def test_a_cell_densenet_initialises_the_densenet_detectors(tmp_path):
    from hpa_scc.config import ModelConfig
    from hpa_scc.models.detector import build_model

    cell = CellClassifier("densenet121")
    path = tmp_path / "cell.pt"
    torch.save({"model": cell.state_dict(), "config": {"model": {"family": "cell", "backbone": "densenet121"}}}, path)
    for backbone in ("densenet121", "densenet121_fpn"):
        model = build_model(ModelConfig(backbone=backbone, weights=str(path)), image_size=128)
        body = dict(model.backbone.body.named_parameters())
        assert torch.equal(body["denseblock2.denselayer3.conv1.weight"], cell.net.features.denseblock2.denselayer3.conv1.weight)
        assert torch.equal(body["conv0.weight"], cell.net.features.conv0.weight)  # 4-channel stem as trained
        assert all(p.requires_grad for p in body.values())  # every stage keeps training
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())  # BN not frozen
    small = CellClassifier("resnet18")
    torch.save({"model": small.state_dict(), "config": {"model": {"family": "cell", "backbone": "resnet18"}}}, path)
    with pytest.raises(ValueError, match="resnet18 backbone does not initialise the densenet121 detector.*"
                                         "resnet101_fpn: model.backbone=resnet101"):
        build_model(ModelConfig(backbone="densenet121", weights=str(path)), image_size=128)


def test_a_cell_resnet101_initialises_the_resnet101_detector_only(tmp_path):
    """The ResNet101-FPN detector's trunk from a cell ResNet101 (the architecture allows it; ResNeXt101
    maps the same way): every body tensor is the cell model's, BatchNorm keeps training, fc is dropped."""
    from hpa_scc.config import ModelConfig
    from hpa_scc.models.detector import build_model

    cell = CellClassifier("resnet101")
    with torch.no_grad():
        cell.net.layer4[2].bn3.running_mean.uniform_()  # a statistic the random init would not reproduce
    path = tmp_path / "cell.pt"
    torch.save({"model": cell.state_dict(), "config": {"model": {"family": "cell", "backbone": "resnet101"}}}, path)
    model = build_model(ModelConfig(backbone="resnet101_fpn", weights=str(path)), image_size=128)
    body = model.backbone.body.state_dict()
    cell_net = {k: v for k, v in cell.net.state_dict().items() if not k.startswith("fc.")}
    assert set(body) - set(cell_net) == {"stride_in_1x1"}  # the detector's own fact: torchvision's stride, as the cell's
    assert not body["stride_in_1x1"]
    assert all(torch.equal(body[k], v) for k, v in cell_net.items())
    assert body["conv1.weight"].shape[1] == 4  # the 4-channel stem as trained
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())  # BN not frozen
    assert all(p.requires_grad for p in model.backbone.body.parameters())
    with pytest.raises(ValueError, match="resnet101 backbone does not initialise the resnext101_32x8d_fpn detector"):
        build_model(ModelConfig(backbone="resnext101_32x8d_fpn", weights=str(path)), image_size=128)


def test_a_store_built_in_shards_merges_into_the_unsharded_store(prepared, tmp_path, capsys):
    """cell-store --shard I/N per job array task, then --merge (or train's build_store): the
    same rows, in the same order, with the same values as one process builds; a finished shard
    is reused, an incomplete set of shards is refused by --merge."""
    import shutil

    from hpa_scc.cli import main

    p = tmp_path / "prepared"
    shutil.copytree(prepared / "prepared", p, ignore=shutil.ignore_patterns("crops"))
    one = build_store(prepared / "prepared", "features", progress=False)
    assert main(["cell-store", str(p), "--kind", "features", "--shard", "0/3", "-q"]) == 0
    assert main(["cell-store", str(p), "--kind", "features", "--merge", "-q"]) != 0
    assert "no complete set of shards built with these settings" in capsys.readouterr().err
    part = p / "crops" / "features-shard0of3.npy"
    stamp = part.stat().st_mtime_ns
    for i in range(3):
        assert main(["cell-store", str(p), "--kind", "features", "--shard", f"{i}/3", "-q"]) == 0
    assert part.stat().st_mtime_ns == stamp  # shard 0 was finished: reused, not recomputed
    sizes = [len(np.load(p / "crops" / f"features-shard{i}of3.cells.npy")) for i in range(3)]
    assert sum(sizes) == len(one) and min(sizes) > 0
    assert main(["cell-store", str(p), "--kind", "features", "--merge", "-q"]) == 0
    merged = build_store(p, "features", progress=False)  # reads the merged store, computes nothing
    assert np.array_equal(np.asarray(merged.array), np.asarray(one.array))
    assert np.array_equal(merged.cells, one.cells) and merged.names == one.names
    labels = merged.labels(PreparedSet(p), "image")
    weak = PreparedSet(p).label_vectors("image")
    assert all(np.array_equal(labels[r], weak[merged.key(r)]) for r in range(len(merged)))
