"""Training samples from prepare's COCO files, and the pieces of the loop that need no model."""

import json

import numpy as np
import pytest
import torch

from hpa_scc.config import load_config
from hpa_scc.data.instances import CellInstances, masks_to_boxes, random_flips, shadowed_instances
from hpa_scc.data.prepared import PreparedSet
from hpa_scc.engine.train import EpochSampler, lr_lambda


@pytest.fixture(scope="module")
def prepared(shared_data):
    """One prepared set in the default layouts: both."""
    return shared_data.prepared(images=6, size=256, seed=11, prepare_size=64, folds=2) / "prepared"


def test_per_label_samples(prepared):
    ds = CellInstances(prepared, [0, 1], "per_label")
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (4, 64, 64) and 0 <= image.min() and image.max() <= 1
    n = len(target["labels"])
    assert target["masks"].shape == (n, 64, 64) and target["masks"].dtype == torch.uint8
    assert target["boxes"].shape == (n, 4) and target["labels"].dtype == torch.int64
    assert target["labels"].min() >= 1 and target["labels"].max() <= 19  # 0 stays background
    info = ds.image(0)
    assert sorted(set((target["labels"] - 1).tolist())) == info["labels"]
    rgb, _ = CellInstances(prepared, [0, 1], "per_label", in_channels=3)[0]
    assert rgb.shape == (3, 64, 64) and torch.equal(rgb, image[:3])


def test_uint8_samples_hold_the_same_pixels_and_augmentation(prepared):
    kw = {"augment": True, "seed": 3}
    f32, t32 = CellInstances(prepared, [0, 1], "per_label", **kw)[1]
    u8, t8 = CellInstances(prepared, [0, 1], "per_label", uint8=True, **kw)[1]
    assert u8.dtype == torch.uint8 and u8.shape == f32.shape
    assert torch.allclose(u8.float() / 255.0, f32) and torch.equal(t8["masks"], t32["masks"])


def test_multilabel_samples(prepared):
    image, target = CellInstances(prepared, [0])[0]  # the default layout: the default head's
    n = len(target["labels"])
    assert torch.equal(target["labels"], torch.ones(n, dtype=torch.int64))
    assert target["label_vectors"].shape == (n, 19) and target["label_vectors"].sum(1).min() >= 1


def test_per_label_layout_repeats_the_mask_of_every_label_after_a_cells_first(prepared):
    """What the softmax head cannot learn from (see models.py): per_label copies a cell's mask once per label."""
    per_label = PreparedSet(prepared).read_folds("per_label", [0, 1])
    multilabel = PreparedSet(prepared).read_folds("multilabel", [0, 1])
    n_labels = {img["id"]: len(img["labels"]) for img in multilabel["images"]}
    labels_after_first = sum(n_labels[a["image_id"]] - 1 for a in multilabel["annotations"])
    assert labels_after_first > 0  # the synthetic set has images with several labels
    assert shadowed_instances(per_label) == (labels_after_first, len(multilabel["annotations"]) + labels_after_first)
    assert shadowed_instances(multilabel) == (0, len(multilabel["annotations"]))


def test_boxes_follow_the_masks_through_flips():
    masks = torch.zeros((2, 10, 12), dtype=torch.uint8)
    masks[0, 1:4, 2:7] = 1
    masks[1, 6:10, 0:3] = 1
    assert masks_to_boxes(masks).tolist() == [[2, 1, 7, 4], [0, 6, 3, 10]]
    image = torch.arange(3 * 10 * 12, dtype=torch.float32).reshape(3, 10, 12)
    rng = np.random.default_rng(0)
    for _ in range(10):
        im2, t2 = random_flips(image, {"masks": masks}, rng, hflip_prob=0.5, vflip_prob=0.5, rot90=True)
        assert torch.equal(t2["boxes"], masks_to_boxes(t2["masks"]))
        assert t2["masks"].sum() == masks.sum() and im2.sum() == image.sum()
        assert im2.shape[1:] == t2["masks"].shape[1:]


def test_epoch_sampler_resumes_and_splits_ranks():
    s = EpochSampler(10, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, skip=4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_epoch(3)
    assert list(s) != full and sorted(s) == list(range(10))
    ranks = [EpochSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    shares = []
    for r in ranks:
        r.set_epoch(2)
        shares.append(list(r))
    assert all(len(x) == 4 for x in shares) and set(sum(shares, [])) == set(range(10))


def test_lr_schedule_warms_up_then_decays():
    cfg = load_config(None, ["optim.warmup_iters=10", "optim.warmup_factor=0.1", "train.max_epochs=4"])
    f = lr_lambda(cfg, iters_per_epoch=25)
    assert f(0) == pytest.approx(0.1) and f(5) < f(10)
    assert f(50) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-9)
    cfg = load_config(None, ["optim.schedule=step", "optim.step_milestones=[2, 3]", "optim.warmup_iters=0"])
    g = lr_lambda(cfg, iters_per_epoch=10)
    assert [g(0), g(19), g(20), g(30)] == pytest.approx([1, 1, 0.1, 0.01])


# --- the annotation store -------------------------------------------------------------------------
def test_the_annotation_store_round_trips_every_coco_file_prepare_writes(prepared):
    from hpa_scc.data.annotations import AnnotationStore, open_store, store_path

    ps = PreparedSet(prepared)
    checked = 0
    for labels in ("image", "truth"):
        for layout in ps.layouts(labels):
            for fold, path in ps.fold_files(layout, labels):
                coco = json.loads(path.read_text())
                store = open_store(path)
                assert store is not None and isinstance(store.arrays["rle_counts"], np.memmap)
                assert store.to_coco() == coco  # exact: every key, number and RLE string
                assert len(store) == len(coco["images"]) and store.n_annotations == len(coco["annotations"])
                assert AnnotationStore.from_coco(coco).to_coco() == coco
                assert store_path(path).stat().st_size < path.stat().st_size  # no larger than the JSON
                checked += 1
    assert checked == 8  # {image, truth} x {multilabel, per_label} x 2 folds


def test_samples_from_the_store_equal_samples_from_the_coco_json(prepared):
    from pycocotools import mask as coco_mask

    ds = CellInstances(prepared, [0, 1], "multilabel")
    coco = PreparedSet(prepared).read_folds("multilabel", [0, 1])
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert len(ds) == len([i for i in coco["images"] if by_image.get(i["id"])])
    for index in range(len(ds)):
        _, target = ds[index]
        anns = by_image[target["image_id"]]
        masks = coco_mask.decode([a["segmentation"] for a in anns]).transpose(2, 0, 1)
        assert np.array_equal(target["masks"].numpy(), masks)
        assert target["label_vectors"].tolist() == [a["label_vector"] for a in anns]
    per_label = CellInstances(prepared, [0, 1], "per_label")
    assert per_label.shadowed() == shadowed_instances(per_label.coco)
    assert per_label.shadowed()[0] > 0


def test_a_store_made_from_another_version_of_its_json_is_not_used(prepared, tmp_path, caplog):
    import shutil

    from hpa_scc.data.annotations import open_store

    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    path = PreparedSet(copy).coco_path("multilabel", 0)
    coco = json.loads(path.read_text())
    coco["annotations"][0]["label_vector"] = [1.0] * 19  # an edit the store does not know
    path.write_text(json.dumps(coco, separators=(",", ":")))
    assert open_store(path) is None and "made from another version" in caplog.text
    ds = CellInstances(copy, [0], "multilabel")  # read from the JSON: the edit is seen
    first = coco["annotations"][0]["image_id"]
    index = next(i for i in range(len(ds)) if ds.image(i)["id"] == first)
    assert ds[index][1]["label_vectors"][0].tolist() == [1.0] * 19


def test_an_old_prepared_set_without_stores_is_read_with_a_warning_naming_the_fix(prepared, tmp_path, caplog):
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    for store in copy.glob("coco*/*/*.store"):
        store.unlink()
    ds = CellInstances(copy, [0, 1], "multilabel")
    new = CellInstances(prepared, [0, 1], "multilabel")
    assert len(ds) == len(new) and all(torch.equal(ds[i][1]["masks"], new[i][1]["masks"]) for i in range(len(ds)))
    assert "no annotation store" in caplog.text and f"re-run the same prepare command on {copy}" in caplog.text
    bad = copy / "coco" / "multilabel" / "fold0.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"fold0.json is not valid JSON .*re-run the same prepare command"):
        CellInstances(copy, [0], "multilabel")


def test_a_damaged_store_is_refused_by_name(prepared, tmp_path):
    from hpa_scc.data.annotations import AnnotationStore, store_path

    path = store_path(PreparedSet(prepared).coco_path("multilabel", 0))
    cut = tmp_path / "cut.store"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut.store is truncated"):
        AnnotationStore.open(cut)
    cut.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(ValueError, match=r"cut.store is not an annotation store"):
        AnnotationStore.open(cut)


def test_cell_feature_samples_measure_each_annotated_cell(prepared, shared_data, tmp_path):
    """CellInstances(cell_features=True): each cell's hand-made features, row k for mask k, read from
    the prepared set's feature store (built on first use, the features family's table): what
    cell_features measures on the same cells of the same cached image (flips leave them as they are)."""
    from hpa_scc.data.features import FEATURE_NAMES, cell_features

    prepared = shared_data.copy(prepared, tmp_path / "prepared")  # the store is written into it
    plain = CellInstances(prepared, [0])[0][1]
    assert "cell_features" not in plain
    image, target = CellInstances(prepared, [0], cell_features=True, uint8=True)[0]
    masks = target["masks"].numpy()
    assert target["cell_features"].shape == (len(masks), len(FEATURE_NAMES))
    label_image = np.zeros(masks.shape[1:], np.int32)
    for k, m in enumerate(masks, start=1):
        label_image[m > 0] = k
    expected = cell_features(image.numpy(), label_image, range(1, len(masks) + 1))
    np.testing.assert_allclose(target["cell_features"].numpy(), expected, rtol=1e-6)
    assert np.abs(expected).sum(1).min() > 0  # every cell measured
    assert (prepared / "crops" / "features.npy").is_file()
    _, flipped = CellInstances(prepared, [0], cell_features=True, augment=True, seed=5)[0]
    np.testing.assert_allclose(flipped["cell_features"].numpy(), expected, rtol=1e-6)
    # a cell the store lacks is refused by name, not given zeros
    dataset = CellInstances(prepared, [0], cell_features=True)
    dataset.features.cells["cell_id"][:] += 1000
    del dataset.features._sorted_keys
    with pytest.raises(KeyError, match="cells are not in the feature store .*features.npy; delete it to rebuild it"):
        dataset[0]
