"""The builtin segmenter's output contract and quality, and the quality measures themselves."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage

from hpa_scc.data.images import read_image
from hpa_scc.segment import build_segmenter
from hpa_scc.segment.builtin import BuiltinParams, BuiltinSegmenter
from hpa_scc.segment.quality import iou_matrix, mask_ap, match_at, recall_at
from hpa_scc.data.synth_draw import generate_image

REAL_ID = "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0"


@pytest.fixture(scope="module")
def segmenter() -> BuiltinSegmenter:
    return BuiltinSegmenter()


@pytest.fixture(scope="module")
def synth256():
    return generate_image(0, size=256, seed=0)


def assert_contract(image: np.ndarray, nuclei: np.ndarray, cells: np.ndarray) -> int:
    """The segmenter contract of hpa_scc.segment; returns the number of cells."""
    assert nuclei.dtype == np.uint16 and cells.dtype == np.uint16
    assert nuclei.shape == cells.shape == image.shape[1:]
    n = int(cells.max())
    assert np.array_equal(np.unique(cells), np.arange(n + 1)), "cell ids are not 0..N"
    assert np.array_equal(np.unique(nuclei), np.arange(n + 1)), "nucleus ids are not the cell ids"
    inside = nuclei > 0
    assert np.array_equal(cells[inside], nuclei[inside]), "a nucleus lies outside its cell"
    for k, box in enumerate(ndimage.find_objects(cells), start=1):
        _, pieces = ndimage.label(cells[box] == k)  # 4-connected
        assert pieces == 1, f"cell {k} is in {pieces} pieces"
    return n


# --- builtin segmenter --------------------------------------------------------------------------
def test_contract_on_synthetic(segmenter, synth256):
    nuclei, cells = segmenter(synth256.image, synth256.image_id)
    n = assert_contract(synth256.image, nuclei, cells)
    assert abs(n - synth256.cells.max()) <= 3


def test_synthetic_ap_above_floor(segmenter):
    # Measured 0.90 on these six (0.93 on the 50-image 512 px benchmark set).
    images = [generate_image(i, size=256, seed=0) for i in range(6)]
    preds = [segmenter(s.image)[1] for s in images]
    assert mask_ap(preds, [s.cells for s in images], iou=0.6) >= 0.8


@pytest.mark.parametrize("value", [0, 1])
def test_blank_image_gives_zeros(segmenter, value):
    image = np.full((4, 64, 80), value, np.uint8)
    nuclei, cells = segmenter(image)
    assert nuclei.shape == cells.shape == (64, 80)
    assert not nuclei.any() and not cells.any()


def test_noise_gives_no_cells(segmenter):
    image = np.random.default_rng(0).integers(0, 4, (4, 128, 128), dtype=np.uint8)
    nuclei, cells = segmenter(image)
    assert not nuclei.any() and not cells.any()


def test_dark_image_still_segmented(segmenter, synth256):
    dark = (synth256.image // 16).astype(np.uint8)  # nuclei at ~5-15 grey levels
    nuclei, cells = segmenter(dark)
    assert assert_contract(dark, nuclei, cells) >= synth256.cells.max() // 2


@pytest.mark.parametrize("shape", [(16, 16), (1, 1), (1, 40)])
def test_tiny_images(segmenter, synth256, shape):
    image = np.stack([cv2.resize(p, shape[::-1], interpolation=cv2.INTER_AREA) for p in synth256.image])
    assert_contract(image, *segmenter(image))


def test_non_square_and_downscaled(segmenter):
    synth = generate_image(1, size=1024, seed=0)
    image = np.ascontiguousarray(synth.image[:, :, :700])  # 1024 x 700: shrunk to 512 x 350
    nuclei, cells = segmenter(image)
    assert assert_contract(image, nuclei, cells) > 0
    assert recall_at(cells, synth.cells[:, :700], iou=0.6) >= 0.7


def test_wrong_input_rejected(segmenter):
    with pytest.raises(ValueError, match="uint8 \\[4, H, W\\]"):
        segmenter(np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        segmenter(np.zeros((4, 32, 32), np.float32))


def test_params():
    with pytest.raises(TypeError, match="nucleus_sigma"):
        BuiltinSegmenter(nucleus_sigma=2.0)
    with pytest.raises(TypeError, match="work_size_px"):
        BuiltinSegmenter(work_size_px=512.0)
    with pytest.raises(TypeError, match="cell_sigma_px"):
        BuiltinSegmenter(cell_sigma_px="2")
    assert BuiltinSegmenter(cytoplasm_weights_rgby=[1, 0, 0, 2]).params.cytoplasm_weights_rgby == (1.0, 0.0, 0.0, 2.0)
    assert BuiltinSegmenter().params == BuiltinParams()
    assert isinstance(build_segmenter("builtin", cell_threshold_scale=0.9), BuiltinSegmenter)


def test_real_image_agrees_with_hpa_cell_segmentation(segmenter, hpa_sample):
    # Measured 1.0 (8 of 8 cells) with the defaults.
    image = read_image(hpa_sample / "train", REAL_ID)
    reference = cv2.imread(str(hpa_sample / "masks" / f"{REAL_ID}_cellmask.png"), cv2.IMREAD_UNCHANGED)
    nuclei, cells = segmenter(image, REAL_ID)
    assert_contract(image, nuclei, cells)
    assert recall_at(cells, reference, iou=0.6) >= 0.7


# --- quality measures on hand-made label images ----------------------------------------------
def squares(shape, boxes) -> np.ndarray:
    """Label image with object k + 1 filling boxes[k] = (y0, y1, x0, x1)."""
    labels = np.zeros(shape, np.uint16)
    for k, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        labels[y0:y1, x0:x1] = k
    return labels


A, B, C = (2, 6, 2, 6), (2, 6, 10, 14), (12, 16, 2, 6)  # three 4x4 squares
FP = (12, 16, 12, 16)
TRUE = squares((20, 20), [A, B, C])


def test_iou_matrix_by_hand():
    # pred 1: left half of A (8 / 16); pred 2: B exactly; pred 3: C shifted one column (12 / 20).
    pred = squares((20, 20), [(2, 6, 2, 4), B, (12, 16, 3, 7)])
    iou = iou_matrix(pred, TRUE)
    assert iou.shape == (3, 3)
    np.testing.assert_allclose(iou, [[0.5, 0, 0], [0, 1, 0], [0, 0, 0.6]])
    assert iou_matrix(np.zeros((20, 20), np.uint16), TRUE).shape == (0, 3)


def test_match_and_recall_by_hand():
    pred = squares((20, 20), [(2, 6, 2, 4), B])  # half of A, all of B
    pred_ids, true_ids = match_at(pred, TRUE, iou=0.6)
    assert pred_ids.tolist() == [2] and true_ids.tolist() == [2]
    assert recall_at(pred, TRUE, iou=0.6) == pytest.approx(1 / 3)
    assert recall_at(pred, TRUE, iou=0.5) == pytest.approx(2 / 3)  # IoU 0.5 counts at >= 0.5
    assert np.isnan(recall_at(pred, np.zeros_like(TRUE)))


def test_mask_ap_by_hand():
    pred = squares((20, 20), [A, FP, B])  # 2 of 3 found, 1 false positive
    # Equal scores: one operating point, precision 2/3 and recall 2/3.
    assert mask_ap([pred], [TRUE], iou=0.6) == pytest.approx(4 / 9)
    # True positives ranked first: precision 1 up to recall 2/3.
    assert mask_ap([pred], [TRUE], scores=[np.array([0.9, 0.1, 0.8])]) == pytest.approx(2 / 3)
    # False positive first: precision 0, 1/2, 2/3 -> made non-increasing: 2/3 throughout.
    assert mask_ap([pred], [TRUE], scores=[np.array([0.5, 0.9, 0.4])]) == pytest.approx(4 / 9)
    # Over two images: all found in the second, so 5 of 6 true found with 1 false positive.
    assert mask_ap([pred, TRUE], [TRUE, TRUE]) == pytest.approx((5 / 6) * (5 / 6))
    assert mask_ap([TRUE], [TRUE]) == 1.0
    assert mask_ap([np.zeros_like(TRUE)], [TRUE]) == 0.0


def test_mask_ap_takes_each_true_object_once():
    true = squares((20, 20), [A])
    halves = squares((20, 20), [(2, 6, 2, 4), (2, 6, 4, 6)])  # A cut in two: IoU 0.5 each
    # At IoU 0.5 the first half takes A; the second finds it taken: 1 TP + 1 FP, recall 1.
    assert mask_ap([halves], [true], iou=0.5) == pytest.approx(0.5)
    assert mask_ap([halves], [true], iou=0.6) == 0.0
    assert np.isnan(mask_ap([halves], [np.zeros_like(true)]))
