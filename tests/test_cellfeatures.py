"""Hand-made per-cell features: shapes, row order, absent ids, compartments, brightness
invariance, and that a linear classifier on them learns the synthetic cells' labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from hpa_scc.data.features import FEATURE_NAMES, GREEN_ABSOLUTE, cell_features
from hpa_scc.constants import NUM_CLASSES, parse_labels
from hpa_scc.data.images import read_image
from hpa_scc.data.images import read_labels
from hpa_scc.data.synth_draw import generate_image
from hpa_scc.data.synth_layout import image_id_of

F = len(FEATURE_NAMES)
COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.fixture(scope="module")
def two_cells():
    """64 px image, two round cells with a round nucleus each: cell 1 has green only in its
    nucleus, cell 2 only outside its nucleus (cytoplasm and rim)."""
    shape = (64, 64)
    cells = np.zeros(shape, np.uint16)
    image = np.zeros((4, *shape), np.uint8)
    for k, cx in ((1, 16), (2, 48)):
        cell, nucleus = disc(shape, 28, cx, 13), disc(shape, 28, cx, 6)
        cells[cell] = k
        image[0][cell] = 60
        image[3][cell] = 80
        image[2][cell] = 8
        image[2][nucleus] = 160
        green_in, green_out = (100, 3) if k == 1 else (3, 100)
        image[1][cell] = green_out
        image[1][nucleus] = green_in
    return image, cells


@pytest.fixture(scope="module")
def synth_image():
    return generate_image(0, size=128, seed=4)


def test_names_and_shape(synth_image):
    assert 60 <= F <= 100
    assert len(set(FEATURE_NAMES)) == F
    assert set(GREEN_ABSOLUTE) <= set(FEATURE_NAMES)
    ids = np.unique(synth_image.cells)[1:]
    x = cell_features(synth_image.image, synth_image.cells, ids)
    assert x.shape == (len(ids), F) and x.dtype == np.float32
    assert np.isfinite(x).all()
    assert (x[:, COL["area"]] == np.bincount(synth_image.cells.ravel())[ids]).all()
    assert ((x[:, COL["nucleus_frac"]] > 0) & (x[:, COL["nucleus_frac"]] < 1)).all()
    # each cell's green mean, in 8-bit units, is the mean over its pixels
    for row, k in enumerate(ids):
        assert x[row, COL["g_mean"]] == pytest.approx(synth_image.image[1][synth_image.cells == k].mean(), rel=1e-5)


def test_rows_follow_the_requested_order(synth_image):
    ids = list(np.unique(synth_image.cells)[1:])
    forward = cell_features(synth_image.image, synth_image.cells, ids)
    backward = cell_features(synth_image.image, synth_image.cells, ids[::-1])
    np.testing.assert_array_equal(backward, forward[::-1])
    again = cell_features(synth_image.image, synth_image.cells, [ids[2], ids[0], ids[2]])
    np.testing.assert_array_equal(again, forward[[2, 0, 2]])


def test_absent_ids_give_zeros_and_empty_gives_no_rows(two_cells):
    image, cells = two_cells
    holes = np.where(cells == 2, 3, cells).astype(np.int32)  # ids 1 and 3: 2 is a gap
    x = cell_features(image, holes, [3, 2, 0, 99, 1, -1])
    assert x.shape == (6, F)
    assert not x[[1, 2, 3, 5]].any()
    assert x[0].any() and x[4].any()
    assert cell_features(image, cells, []).shape == (0, F)
    assert cell_features(image, cells, np.array([], int)).shape == (0, F)
    empty = np.zeros_like(cells)
    assert not cell_features(image, empty, [1, 2]).any()


def test_nucleus_versus_cytoplasm(two_cells):
    image, cells = two_cells
    x = cell_features(image, cells, [1, 2])
    ratio = x[:, COL["g_nuc_cyto_ratio"]]
    assert ratio[0] > 1 and ratio[1] < 1
    assert ratio[0] > 5 and ratio[1] < 0.2
    assert x[0, COL["g_nuc"]] == pytest.approx(100) and x[0, COL["g_cyto"]] == pytest.approx(3)
    assert x[1, COL["g_rim"]] == pytest.approx(100)
    assert x[0, COL["g_nuc_share"]] > 0.8 and x[1, COL["g_nuc_share"]] < 0.05
    # the nucleus found from the blue is the drawn disc
    nucleus_area = disc(cells.shape, 28, 16, 6).sum()
    assert x[0, COL["nucleus_frac"]] == pytest.approx(nucleus_area / (cells == 1).sum())
    # radial profile: bright centre for cell 1, bright periphery for cell 2
    assert x[0, COL["g_ring0"]] > 1 > x[0, COL["g_ring3"]]
    assert x[1, COL["g_ring0"]] < 1 < x[1, COL["g_ring3"]]
    # normalised by the image's mean green within cells, the two cells share their brightness
    assert x[:, COL["gn_mean"]].mean() == pytest.approx(1, abs=0.05)


def test_image_brightness_is_normalised_away(synth_image):
    image = synth_image.image.copy()
    image[1] //= 2  # room to double without clipping
    brighter = image.copy()
    brighter[1] = image[1] * 2
    ids = np.unique(synth_image.cells)[1:]
    x = cell_features(image, synth_image.cells, ids)
    y = cell_features(brighter, synth_image.cells, ids)
    free = [i for i, name in enumerate(FEATURE_NAMES) if name not in GREEN_ABSOLUTE]
    raw = [COL[name] for name in GREEN_ABSOLUTE]
    assert [FEATURE_NAMES[i] for i in free if FEATURE_NAMES[i].startswith("gn_")]  # covers gn_*
    np.testing.assert_allclose(y[:, free], x[:, free], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(y[:, raw], 2 * x[:, raw], rtol=1e-5)


def test_edge_cases_do_not_crash():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (4, 40, 40), dtype=np.uint8)
    cells = np.zeros((40, 40), np.int64)
    cells[0, 0] = 1  # one pixel in the corner
    cells[10, 10:12] = 2  # two pixels
    cells[20:40, 25:40] = 3  # cut by the image border
    cells[5:9, 30:34] = 4
    image[2][5:9, 30:34] = 7  # flat blue: no nucleus found
    x = cell_features(image, cells.astype(np.uint16), [1, 2, 3, 4])
    assert np.isfinite(x).all() and (x[:, COL["area"]] == [1, 2, 300, 16]).all()
    assert x[3, COL["nucleus_frac"]] == 0
    black = np.zeros_like(image)
    assert np.isfinite(cell_features(black, cells, [1, 2, 3, 4])).all()
    with pytest.raises(ValueError):
        cell_features(image[:3], cells, [1])
    with pytest.raises(TypeError):
        cell_features(image.astype(np.float32), cells, [1])
    with pytest.raises(ValueError):
        cell_features(image, cells[:20], [1])


def _load_set(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features of every cell (true masks) and its multi-hot true labels [n, 19]."""
    truth: dict[str, dict[int, list[int]]] = {}
    with open(out / "cells.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            truth.setdefault(row["ID"], {})[int(row["cell"])] = parse_labels(row["Label"])
    xs, ys = [], []
    for image_id, labels in truth.items():
        image = read_image(out / "train", image_id)
        cells = read_labels(out / "masks" / f"{image_id}.png")
        ids = sorted(labels)
        xs.append(cell_features(image, cells, ids))
        for k in ids:
            y = np.zeros(NUM_CLASSES)
            y[labels[k]] = 1
            ys.append(y)
    return np.concatenate(xs), np.array(ys)


def test_logistic_regression_learns_synthetic_cells(shared_data):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = shared_data.synth(images=12, size=256, seed=1)
    test = shared_data.synth(images=6, size=256, seed=2)
    assert (test / "masks" / f"{image_id_of(0, 2)}.png").is_file()
    x_train, y_train = _load_set(train)
    x_test, y_test = _load_set(test)
    assert np.isfinite(x_train).all() and np.isfinite(x_test).all()
    classes = [c for c in range(NUM_CLASSES)
               if 0 < y_train[:, c].sum() < len(y_train) and 0 < y_test[:, c].sum() < len(y_test)]
    assert len(classes) >= 4
    model = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=2000)))
    model.fit(x_train, y_train[:, classes])
    scores = model.predict_proba(x_test)
    aucs = [roc_auc_score(y_test[:, c], scores[:, j]) for j, c in enumerate(classes)]
    # Measured 0.956 over 7 classes (seeds 1/2); other seed pairs gave 0.87-0.96. Chance is 0.5.
    print(f"macro ROC-AUC {np.mean(aucs):.3f} over classes {classes}")
    assert np.mean(aucs) > 0.8, dict(zip(classes, np.round(aucs, 3)))
