import numpy as np
import pytest

from hpa_scc.constants import NEGATIVE, NUM_CLASSES, labels_to_multihot
from hpa_scc.weak.targets import (Instance, category_id, cell_instances, choose_threshold, describe_cells,
                             fuse_image_scores, image_scores, inherit_labels, keep_cells, label_of, label_quality,
                             refine_labels, transfer_labels, within_image_auc)


def test_category_ids_keep_zero_for_background():
    # The original DenseNet path used the class index as category id: Nucleoplasm (0) was background.
    assert category_id(0) == 1 and category_id(18) == 19
    assert [label_of(category_id(c)) for c in range(NUM_CLASSES)] == list(range(NUM_CLASSES))
    with pytest.raises(ValueError, match="background"):
        label_of(0)
    with pytest.raises(ValueError, match="unknown label 19"):
        category_id(19)


def test_every_cell_inherits_the_image_labels():
    assert inherit_labels([3, 1], [8, 5, 0]) == {3: [0, 5, 8], 1: [0, 5, 8]}
    with pytest.raises(ValueError, match="at least one label"):
        inherit_labels([1], [])


def test_layouts():
    labels = {2: [5, 0], 1: [NEGATIVE]}
    per_label = cell_instances(labels, "per_label")
    assert per_label == [Instance(1, 19), Instance(2, 1), Instance(2, 6)]
    multi = cell_instances(labels, "multilabel")
    assert [(i.cell_id, i.category_id) for i in multi] == [(1, 19), (2, 1)]
    assert multi[1].label_vector == tuple(labels_to_multihot([0, 5]))
    assert sum(multi[1].label_vector) == 2 and multi[1].label_vector[0] == 1 and multi[1].label_vector[5] == 1
    with pytest.raises(ValueError, match="unknown layout"):
        cell_instances(labels, "softmax")
    with pytest.raises(ValueError, match="Negative"):
        cell_instances({1: []}, "per_label")


def test_describe_and_filter_cells():
    cells = np.zeros((10, 12), np.uint16)
    cells[0:3, 0:3] = 1  # 9 px, on the border
    cells[4:8, 4:9] = 2  # 20 px, inside
    cells[5:7, 10:12] = 4  # 4 px, on the right border; id 3 absent
    infos = describe_cells(cells)
    assert [(c.cell_id, c.area_px, c.bbox, c.touches_border) for c in infos] == [
        (1, 9, (0, 0, 3, 3), True), (2, 20, (4, 4, 9, 8), False), (4, 4, (10, 5, 12, 7), True)]
    assert [c.cell_id for c in keep_cells(infos, min_cell_area_px=5)] == [1, 2]
    assert [c.cell_id for c in keep_cells(infos, drop_border_cells=True)] == [2]
    assert keep_cells(infos) == infos


def test_transfer_labels_takes_the_most_overlapping_true_cell():
    true = np.zeros((6, 6), np.uint16)
    true[:, :3], true[:, 3:] = 1, 2
    pred = np.zeros((6, 6), np.uint16)
    pred[:, 1:5] = 1  # half on each: ties go to the lower id
    pred[:2, 5] = 2  # inside true cell 2
    pred[0, 0] = 0
    out = transfer_labels(pred, true, {1: [0], 2: [5, 13]})
    assert out == {1: ([0], 1), 2: ([5, 13], 2)}
    empty = np.zeros_like(true)
    assert transfer_labels(pred, empty, {}) == {1: ([NEGATIVE], 0), 2: ([NEGATIVE], 0)}


def conf_rows(*rows: dict[int, float]) -> np.ndarray:
    out = np.zeros((len(rows), NUM_CLASSES), np.float32)
    for i, row in enumerate(rows):
        for c, v in row.items():
            out[i, c] = v
    return out


def test_refinement_keeps_only_image_labels_a_cell_scores_and_negative_otherwise():
    conf = conf_rows({0: 0.9, 5: 0.1}, {0: 0.2, 5: 0.7, 3: 0.99}, {0: 0.5, 5: 0.5}, {})
    assert refine_labels([5, 0], conf, 0.5) == [[0], [5], [0, 5], [NEGATIVE]]  # 3 is never added
    assert refine_labels([0, 5], conf, 0.0) == [[0, 5]] * 4  # threshold 0 keeps the weak labels
    assert refine_labels([NEGATIVE], conf, 0.5) == [[NEGATIVE]] * 4
    with pytest.raises(ValueError, match="at least one label"):
        refine_labels([], conf, 0.5)


def test_relative_refinement_compares_the_cells_of_one_image():
    # a young model: every score is low, so no absolute threshold above 0.05 keeps anything,
    # but within the image cell 0 clearly leads for 0 and cell 1 for 5.
    conf = conf_rows({0: 0.040, 5: 0.004}, {0: 0.010, 5: 0.030}, {0: 0.030, 5: 0.020}, {})
    assert refine_labels([0, 5], conf, 0.05) == [[NEGATIVE]] * 4
    assert refine_labels([0, 5], conf, 0.0, relative=0.5) == [[0], [5], [0, 5], [NEGATIVE]]
    assert refine_labels([0, 5], conf, 0.0, relative=0.9) == [[0], [5], [NEGATIVE], [NEGATIVE]]
    # both rules at once: the stricter wins per label; the image's best cell always passes the relative one
    assert refine_labels([0, 5], conf, 0.035, relative=0.5) == [[0], [NEGATIVE], [NEGATIVE], [NEGATIVE]]
    assert refine_labels([0, 5], conf, 0.0, relative=0.0) == [[0, 5]] * 4
    with pytest.raises(ValueError, match="relative must be in"):
        refine_labels([0], conf, 0.0, relative=1.5)


def test_label_quality_counts_cell_class_pairs():
    truth = [[0], [5], [0, 5], [NEGATIVE]]
    weak = [[0, 5]] * 4  # every cell inherits the image labels
    q = label_quality(weak, truth)
    # 8 predicted pairs, 5 true pairs, 4 right (0, 5, 0 and 5); no cell exactly right but the third
    assert q == pytest.approx({"precision": 4 / 8, "recall": 4 / 5, "f1": 8 / 13, "exact": 1 / 4})
    assert label_quality(truth, truth) == pytest.approx({"precision": 1, "recall": 1, "f1": 1, "exact": 1})
    with pytest.raises(ValueError, match="one label list per cell"):
        label_quality(weak, truth[:2])


def test_threshold_is_chosen_from_image_labels_only():
    # image A has {0}, image B has {5}; the model's best cells: A scores 0 at 0.8 and 5 at 0.3,
    # B scores 5 at 0.6 and 0 at 0.2. Any t in (0.3, 0.6] recovers exactly the image labels.
    a = conf_rows({0: 0.8, 5: 0.3}, {0: 0.1})
    b = conf_rows({5: 0.6, 0: 0.2})
    t, f1 = choose_threshold([[0], [5]], [a, b])
    assert t == pytest.approx(0.35) and f1 == pytest.approx(1.0)
    t, f1 = choose_threshold([[0], [5]], [a, b], candidates=[0.1, 0.9])
    assert (t, f1) == (0.1, pytest.approx(2 / 3))  # 0.1: 4 predicted, 2 right (F1 = 2*2 / (4+2)); 0.9: none
    with pytest.raises(ValueError, match="one confidence array per held-out image"):
        choose_threshold([[0]], [])


def test_image_fusion_blends_cells_with_the_best_cell():
    conf = conf_rows({0: 0.9, 5: 0.04}, {0: 0.1, 5: 0.16})
    assert np.array_equal(fuse_image_scores(conf, 0.0), conf)
    fused = fuse_image_scores(conf, 0.5)
    assert fused[1, 0] == pytest.approx((0.1 * 0.9) ** 0.5) and fused[0, 5] == pytest.approx((0.04 * 0.16) ** 0.5)
    assert np.allclose(fuse_image_scores(conf, 1.0), image_scores(conf)[None].repeat(2, 0))
    assert np.array_equal(image_scores(np.zeros((0, NUM_CLASSES))), np.zeros(NUM_CLASSES))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fuse_image_scores(conf, 1.5)


def test_within_image_auc_measures_how_a_model_ranks_the_cells_of_an_image():
    truth = [[[0], [0, 5], [5], [NEGATIVE]]]
    good = conf_rows({0: 0.9, 5: 0.1}, {0: 0.8, 5: 0.7}, {0: 0.1, 5: 0.6}, {})
    assert within_image_auc([[0, 5]], [good], truth) == (1.0, 2)
    inverted = 1.0 - good
    assert within_image_auc([[0, 5]], [inverted], truth) == (0.0, 2)
    flat = np.full((4, NUM_CLASSES), 0.3)  # ties count half: chance
    assert within_image_auc([[0, 5]], [flat], truth) == (0.5, 2)
    # label 0 shown by every cell of the second image says nothing about ranking; it is left out
    auc, pairs = within_image_auc([[0, 5], [0]], [good, conf_rows({0: 0.2}, {0: 0.4})], truth + [[[0], [0]]])
    assert (auc, pairs) == (1.0, 2)
    assert np.isnan(within_image_auc([[NEGATIVE]], [flat], [[[NEGATIVE]] * 4])[0])
    with pytest.raises(ValueError, match="confidence rows"):
        within_image_auc([[0]], [flat], [[[0]]])


# --- distillation targets ---------------------------------------------------------------------------
def test_soft_targets_keep_the_teachers_ranking_within_what_the_image_labels_allow():
    from hpa_scc.weak.targets import soft_instances, soft_targets

    conf = np.zeros((3, NUM_CLASSES), np.float32)
    conf[:, 0] = [0.8, 0.4, 0.1]  # an image label: shares of the best cell
    conf[:, 5] = [0.2, 0.3, 0.9]  # scored high, but the image does not carry it
    conf[:, 7] = [0.0, 0.0, 0.0]  # an image label no cell scores: every cell may show it
    relative = soft_targets([0, 7], conf)
    assert relative[:, 0] == pytest.approx([1.0, 0.5, 0.125])
    assert (relative[:, 5] == 0).all() and (relative[:, 7] == 1).all()
    assert relative[:, NEGATIVE] == pytest.approx([0.0, 0.0, 0.0])  # class 7 fits every cell
    raw = soft_targets([0], conf, "raw")
    assert raw[:, 0] == pytest.approx([0.8, 0.4, 0.1]) and raw[:, NEGATIVE] == pytest.approx([0.2, 0.6, 0.9])
    assert np.count_nonzero(raw) == 6  # nothing outside the image's labels and Negative
    negative = soft_targets([NEGATIVE], conf)
    assert (negative[:, NEGATIVE] == 1).all() and negative.sum() == 3
    with pytest.raises(ValueError, match="unknown soft target scale 'max'"):
        soft_targets([0], conf, "max")
    with pytest.raises(ValueError, match="NaN or inf"):
        soft_targets([0], np.full((1, NUM_CLASSES), np.nan))
    # as instances: rounded vectors, the category the highest target's
    instances = soft_instances({4: raw[1], 2: raw[0]})
    assert [i.cell_id for i in instances] == [2, 4]
    assert instances[0].category_id == 1 and instances[1].category_id == NEGATIVE + 1
    assert instances[1].label_vector[0] == pytest.approx(0.4) and len(instances[1].label_vector) == NUM_CLASSES
    assert soft_instances({1: np.full(NUM_CLASSES, 1 / 3)})[0].label_vector[0] == 0.3333
    with pytest.raises(ValueError, match="cell 1: soft targets must lie in"):
        soft_instances({1: np.full(NUM_CLASSES, 1.5)})
