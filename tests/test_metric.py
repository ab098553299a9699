"""The competition metric on hand-made cases whose answers are worked out in the comments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hpa_scc.constants import NUM_CLASSES
from hpa_scc.evaluation.metric import average_precision, evaluate, evaluate_files, format_result
from hpa_scc.evaluation.submission import SubmissionRow, encode_mask, write_submission
from hpa_scc.apps.visualize import plot_pr_curves

H = W = 10


def box(y0: int, y1: int, x0: int, x1: int) -> str:
    """Encoded 10x10 mask with rows y0:y1, cols x0:x1 set."""
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return encode_mask(m)


def first_pixels(k: int) -> str:
    """Encoded 10x10 mask with its first k pixels (row-major) set."""
    m = np.zeros(H * W, bool)
    m[:k] = True
    return encode_mask(m.reshape(H, W))


A = box(0, 4, 0, 4)  # 16 px, top-left
B = box(6, 10, 6, 10)  # 16 px, bottom-right, disjoint from A
C = box(0, 4, 6, 10)  # 16 px, top-right, disjoint from A and B
EMPTY = encode_mask(np.zeros((H, W), bool))


def row(image_id: str, *triples, size=(W, H)) -> SubmissionRow:
    return SubmissionRow(image_id, size[0], size[1], [(label, conf, mask) for label, conf, mask in triples])


def test_perfect_prediction_scores_one(tmp_path):
    truth = [row("a", (0, 1, A), (5, 1, A), (0, 1, B)), row("b", (18, 1, C))]
    pred = [row("a", (0, 0.9, A), (5, 0.3, A), (0, 0.8, B)), row("b", (18, 0.7, C))]
    result = evaluate(truth, pred)
    assert result.mAP == 1.0
    assert {c: result.per_class_ap[c] for c in (0, 5, 18)} == {0: 1.0, 5: 1.0, 18: 1.0}
    assert math.isnan(result.per_class_ap[1])  # no truth: reported NaN, left out of the mean
    assert (result.n_truth[0], result.n_detections[0]) == (2, 2)
    assert format_result(result).splitlines()[-1] == "mAP 1.000000"


def test_no_predictions_score_zero():
    truth = [row("a", (0, 1, A), (3, 1, B))]
    result = evaluate(truth, [row("a")])
    assert result.mAP == 0.0 and result.per_class_ap[0] == 0.0 and result.per_class_ap[3] == 0.0
    # The image missing from the submission entirely: its truth counts as missed.
    result = evaluate(truth, [])
    assert result.mAP == 0.0 and result.n_missing_images == 1 and result.missing_image_ids == ["a"]


def test_one_of_two_cells_found_scores_half():
    # Truth: A and B of class 0. One detection, of A: ranks [TP]; precision 1 at recall 1/2,
    # nothing beyond; AP = (1/2 - 0) * 1 = 0.5.
    result = evaluate([row("a", (0, 1, A), (0, 1, B))], [row("a", (0, 0.9, A))])
    assert result.per_class_ap[0] == pytest.approx(0.5)
    assert result.mAP == pytest.approx(0.5)


def test_class_absent_from_an_image_truth_is_ignored():
    # Class 5 is in image b's truth only. Image a's detections of 5 (even of a true cell) are
    # neither TP nor FP, so class 5 scores 1.0 from image b alone. Class 7 is in no truth at
    # all: its detections are ignored and it stays out of the mean.
    truth = [row("a", (0, 1, A)), row("b", (5, 1, B))]
    pred = [row("a", (0, 0.9, A), (5, 0.99, A), (5, 0.98, C), (7, 0.5, A)), row("b", (5, 0.1, B))]
    result = evaluate(truth, pred)
    assert result.per_class_ap[5] == 1.0 and result.n_detections[5] == 1
    assert result.n_ignored_detections == 3
    assert math.isnan(result.per_class_ap[7]) and result.mAP == 1.0


def test_duplicate_detection_is_a_false_positive():
    # Truth: A, B of class 0. Detections ranked: A 0.9 (TP), A again 0.8 (A taken -> FP), B 0.7 (TP).
    #   rank   TP FP precision recall
    #   1      1  0  1          1/2
    #   2      1  1  1/2        1/2
    #   3      2  1  2/3        1
    # Envelope from the right: 1, 2/3, 2/3. Recall steps: 0 -> 1/2 at precision 1, 1/2 -> 1 at 2/3.
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    result = evaluate([row("a", (0, 1, A), (0, 1, B))], [row("a", (0, 0.9, A), (0, 0.8, A), (0, 0.7, B))])
    assert result.per_class_ap[0] == pytest.approx(5 / 6)
    assert result.n_true_positives[0] == 2
    recall, precision = result.pr_curves[0]
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3])


def test_a_taken_best_match_does_not_fall_back_to_the_second_best():
    # Truth (class 0): A = rows 0:4, cols 0:4 (16 px) and A2 = rows 0:4, cols 1:6 (20 px), overlapping.
    # E = rows 0:4, cols 0:5 (20 px): IoU(E, A) = 16/20 = 0.8, IoU(E, A2) = 16/24 = 0.667.
    # Detection A at 0.9 takes A. Detection E at 0.8: its best truth A is taken -> FP, although its
    # second best A2 clears 0.6. Ranks TP, FP with A2 missed: AP = 1/2 * 1 = 0.5 (a fall-back would give 1).
    a2 = box(0, 4, 1, 6)
    e = box(0, 4, 0, 5)
    result = evaluate([row("a", (0, 1, A), (0, 1, a2))], [row("a", (0, 0.9, A), (0, 0.8, e))])
    assert result.per_class_ap[0] == pytest.approx(0.5)


def test_confidence_ties_keep_file_order():
    # Truth A, B of class 0; three detections all at 0.5: X (C, a miss), A, B.
    # In row order X, A, B: FP, TP, TP -> precision 0, 1/2, 2/3 at recall 0, 1/2, 1;
    # envelope 2/3 everywhere, AP = 1/2 * 2/3 + 1/2 * 2/3 = 2/3.
    truth = [row("a", (0, 1, A), (0, 1, B))]
    result = evaluate(truth, [row("a", (0, 0.5, C), (0, 0.5, A), (0, 0.5, B))])
    assert result.per_class_ap[0] == pytest.approx(2 / 3)
    # Same detections listed A, B, X: TP, TP, FP -> AP 1.
    result = evaluate(truth, [row("a", (0, 0.5, A), (0, 0.5, B), (0, 0.5, C))])
    assert result.per_class_ap[0] == pytest.approx(1.0)


def test_ties_across_images_follow_the_solution_order():
    # Truth: A in both images (n_truth = 2). Image "first" (first in the solution) has a miss at
    # 0.5, image "second" a hit at 0.5. Ranked in solution order whatever the submission's order:
    # FP (recall 0), TP (recall 1/2, precision 1/2) -> AP = 1/2 * 1/2 = 1/4.
    truth = [row("first", (0, 1, A)), row("second", (0, 1, A))]
    pred = [row("second", (0, 0.5, A)), row("first", (0, 0.5, B))]
    assert evaluate(truth, pred).per_class_ap[0] == pytest.approx(0.25)
    # Swap the solution order: TP then FP -> precision 1 at recall 1/2: AP = 1/2.
    assert evaluate(truth[::-1], pred).per_class_ap[0] == pytest.approx(0.5)


def test_empty_masks_are_ignored_on_both_sides():
    # Truth: A (class 0) and an empty mask (class 0 and class 4). The empty truth is not a
    # cell: n_truth[0] = 1 and class 4 has no truth (NaN, out of the mean). The empty
    # detection at 0.99 is not a FP, so class 0 scores 1.
    truth = [row("a", (0, 1, A), (0, 1, EMPTY), (4, 1, EMPTY))]
    pred = [row("a", (0, 0.99, EMPTY), (0, 0.5, A), (4, 0.9, EMPTY))]
    result = evaluate(truth, pred)
    assert result.n_truth[0] == 1 and result.n_truth[4] == 0 and math.isnan(result.per_class_ap[4])
    assert result.per_class_ap[0] == 1.0 and result.mAP == 1.0
    assert (result.n_empty_truth, result.n_empty_detections) == (2, 2)


@pytest.mark.parametrize("k, expected_ap", [(59, 0.0), (60, 1.0), (61, 1.0)])
def test_iou_threshold_boundary(k, expected_ap):
    # Truth: the full 10x10 image (100 px). Detection: its first k pixels, IoU = k/100.
    # 0.59 < 0.6 -> FP (AP 0); 0.60 and 0.61 -> TP (IoU >= 0.6 counts) -> AP 1.
    full = box(0, 10, 0, 10)
    result = evaluate([row("a", (2, 1, full))], [row("a", (2, 0.9, first_pixels(k)))])
    assert result.per_class_ap[2] == expected_ap


def test_average_precision_by_hand():
    # Ranks TP, FP, TP, FP with 4 truth masks: precision 1, 1/2, 2/3, 1/2; recall 1/4, 1/4, 1/2, 1/2.
    # Envelope 1, 2/3, 2/3, 1/2. Steps: 0 -> 1/4 at 1, 1/4 -> 1/2 at 2/3. AP = 1/4 + 1/6 = 5/12.
    ap, recall, precision = average_precision(np.array([True, False, True, False]), 4)
    assert ap == pytest.approx(5 / 12)
    np.testing.assert_allclose(recall, [0.25, 0.25, 0.5, 0.5])
    assert average_precision(np.zeros(0, bool), 3)[0] == 0.0


def test_extra_submission_images_are_ignored_and_counted():
    result = evaluate([row("a", (0, 1, A))], [row("a", (0, 0.9, A)), row("zzz", (0, 0.9, B))])
    assert result.mAP == 1.0 and result.n_extra_images == 1 and result.extra_image_ids == ["zzz"]


def test_size_mismatch_names_the_image():
    with pytest.raises(ValueError, match="image b"):
        evaluate([row("a", (0, 1, A)), row("b", (0, 1, A))], [row("a"), row("b", size=(10, 12))])


def test_duplicate_ids_are_an_error():
    with pytest.raises(ValueError, match="image ID a appears more than once"):
        evaluate([row("a", (0, 1, A)), row("a", (0, 1, B))], [])


def test_truth_as_prediction_on_a_synthetic_set_scores_one(shared_data, tmp_path):
    solution = shared_data.synth(images=4, size=128, seed=0) / "solution.csv"
    result = evaluate_files(solution, solution, out_json=tmp_path / "eval.json")
    plot_pr_curves(result, tmp_path / "pr.png")
    assert result.mAP == 1.0 and result.n_images == 4
    assert format_result(result).splitlines()[-1] == "mAP 1.000000"
    saved = json.loads((tmp_path / "eval.json").read_text())  # strict JSON: NaN written as null
    assert saved["mAP"] == 1.0 and len(saved["classes"]) == NUM_CLASSES
    assert all((c["ap"] is None) == (c["n_truth"] == 0) for c in saved["classes"])
    assert (tmp_path / "pr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_files_written_for_a_partial_score(tmp_path):
    write_submission(tmp_path / "sol.csv", [row("a", (0, 1, A), (0, 1, B))])
    write_submission(tmp_path / "sub.csv", [row("a", (0, 0.9, A), (0, 0.8, A), (0, 0.7, B))])
    result = evaluate_files(tmp_path / "sol.csv", tmp_path / "sub.csv", tmp_path / "out" / "m.json")
    plot_pr_curves(result, tmp_path / "out" / "pr.png")
    assert format_result(result).splitlines()[-1] == f"mAP {5 / 6:.6f}"
    assert json.loads((tmp_path / "out" / "m.json").read_text())["classes"][0]["ap"] == pytest.approx(5 / 6)
    assert (tmp_path / "out" / "pr.png").stat().st_size > 0


# A direct, slow reference: decoded pixel masks, one global greedy pass per class.
def _reference_map(truth_rows, pred_rows, thr=0.6):
    from hpa_scc.evaluation.submission import decode_mask

    order = {r.image_id: i for i, r in enumerate(truth_rows)}
    preds = {r.image_id: r for r in pred_rows}
    aps = {}
    for c in range(NUM_CLASSES):
        gts, dets = {}, []
        for r in truth_rows:
            masks = []
            for label, _, text in r.predictions:
                m = decode_mask(text, r.height, r.width)
                if label == c and m.any() and not any((m == g).all() for g in masks):
                    masks.append(m)
            if masks:
                gts[r.image_id] = masks
        n = sum(len(v) for v in gts.values())
        if n == 0:
            continue
        for image_id, p in preds.items():
            if image_id not in gts:
                continue
            for j, (label, conf, text) in enumerate(p.predictions):
                m = decode_mask(text, p.height, p.width)
                if label == c and m.any():
                    dets.append((-conf, order[image_id], j, image_id, m))
        dets.sort(key=lambda d: d[:3])
        taken, tps = set(), []
        for _, _, _, image_id, m in dets:
            ious = [(m & g).sum() / (m | g).sum() for g in gts[image_id]]
            k = int(np.argmax(ious))
            ok = ious[k] >= thr and (image_id, k) not in taken
            if ok:
                taken.add((image_id, k))
            tps.append(ok)
        tp = fp = 0
        points = []
        for ok in tps:
            tp, fp = tp + ok, fp + (not ok)
            points.append((tp / n, tp / (tp + fp)))
        ap, prev_r = 0.0, 0.0
        for i, (r, _) in enumerate(points):
            if r > prev_r:
                ap += (r - prev_r) * max(p for _, p in points[i:])
                prev_r = r
        aps[c] = ap
    return float(np.mean(list(aps.values())))


def test_matches_a_pixel_reference_on_random_images():
    rng = np.random.default_rng(1)
    truth, pred = [], []
    for i in range(6):
        h, w = 24, 20
        cells = [np.zeros((h, w), bool) for _ in range(5)]
        for m in cells:
            y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
            m[y:y + rng.integers(3, 7), x:x + rng.integers(3, 7)] = True
        t = SubmissionRow(f"img{i}", w, h)
        p = SubmissionRow(f"img{i}", w, h)
        for m in cells:
            text = encode_mask(m)
            for label in rng.choice(4, size=rng.integers(1, 3), replace=False):
                t.predictions.append((int(label), 1.0, text))
            shifted = np.roll(m, (rng.integers(-1, 2), rng.integers(-1, 2)), axis=(0, 1))
            shifted_text = encode_mask(shifted)
            for label in range(4):
                conf = float(rng.choice([0.25, 0.5, 0.75]))  # coarse values force ties
                p.predictions.append((label, conf, shifted_text if rng.random() < 0.7 else text))
        truth.append(t)
        pred.append(p)
    result = evaluate(truth, pred)
    assert 0.0 < result.mAP < 1.0
    assert result.mAP == pytest.approx(_reference_map(truth, pred), abs=1e-12)


def test_pr_plot_with_a_class_never_detected(tmp_path):
    """A class with truth but no detection has AP 0 and no curve; the plot is still written."""
    from hpa_scc.evaluation.metric import evaluate
    from hpa_scc.apps.visualize import plot_pr_curves
    from hpa_scc.evaluation.submission import SubmissionRow, encode_mask

    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True
    text = encode_mask(mask)
    truth = [SubmissionRow("a", 10, 10, [(0, 1.0, text), (5, 1.0, text)])]
    pred = [SubmissionRow("a", 10, 10, [(0, 0.9, text)])]
    result = evaluate(truth, pred)
    assert result.per_class_ap[0] == 1.0 and result.per_class_ap[5] == 0.0 and result.mAP == 0.5
    plot_pr_curves(result, tmp_path / "pr.png")
    assert (tmp_path / "pr.png").stat().st_size > 1000


@pytest.mark.parametrize("mask_size,declared", [((128, 128), (2048, 2048)), ((20, 20), (10, 10))])
def test_a_mask_encoded_at_another_size_is_an_error_naming_the_image(tmp_path, mask_size, declared):
    """A 128 px mask declared 2048 px hung pycocotools (it reads past the runs); a larger one was scored."""
    m = np.zeros(mask_size, bool)
    m[:5, :5] = True
    text = encode_mask(m)
    truth = [SubmissionRow("img7", declared[1], declared[0], [(0, 1.0, text)])]
    pred = [SubmissionRow("img7", declared[1], declared[0], [(0, 0.9, text)])]
    write_submission(tmp_path / "solution.csv", truth)
    write_submission(tmp_path / "submission.csv", pred)
    area = mask_size[0] * mask_size[1]
    with pytest.raises(ValueError, match=rf"img7.*covers {area} pixels but the row declares "
                                         rf"{declared[0]}x{declared[1]}.*original size"):
        evaluate_files(tmp_path / "solution.csv", tmp_path / "submission.csv")


def test_garbage_rle_counts_are_an_error():
    import base64
    import zlib

    text = base64.b64encode(zlib.compress(b"\x01\x02 not rle")).decode()
    with pytest.raises(ValueError, match="image a.*not valid COCO RLE.*outside COCO's alphabet"):
        evaluate([row("a", (0, 1, A))], [row("a", (0, 0.9, text))])


def test_rle_runs_read_as_pycocotools_does():
    from pycocotools import mask as coco_mask

    from hpa_scc.evaluation.submission import rle_runs

    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, 200, 2)
        m = rng.random((h, w)) < rng.random()
        runs = rle_runs(coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))["counts"])
        assert sum(runs) == h * w and sum(runs[1::2]) == m.sum()


def test_the_vectorised_check_agrees_with_the_reader_one_mask_at_a_time():
    """check_rles reads all masks of a row at once; it must accept exactly what rle_runs accepts."""
    from pycocotools import mask as coco_mask

    from hpa_scc.evaluation.submission import _run_totals, check_rles, rle_runs

    rng = np.random.default_rng(1)
    rles = []
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        m = rng.random((h, w)) < rng.random()
        rles.append(coco_mask.encode(np.asfortranarray(m.astype(np.uint8))))
    totals, smallest = _run_totals([r["counts"] for r in rles])
    assert totals.tolist() == [sum(rle_runs(r["counts"])) for r in rles]
    assert smallest.tolist() == [min(rle_runs(r["counts"])) for r in rles]
    texts = [f"m{i}" for i in range(len(rles))]
    check_rles(rles, texts, "image x")  # all whole: no error
    short = dict(rles[17], size=[rles[17]["size"][0] + 1, rles[17]["size"][1]])
    with pytest.raises(ValueError, match=r"image x: mask 'm17'... covers"):
        check_rles(rles[:17] + [short] + rles[18:], texts, "image x")
