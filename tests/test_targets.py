import numpy as np
import pytest

from hpa_scc.constants import NEGATIVE, NUM_CLASSES
from hpa_scc.targets import (Instance, category_id, cell_instances, describe_cells, inherit_labels, keep_cells,
                             label_of, label_vector, transfer_labels)


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
    assert multi[1].label_vector == tuple(label_vector([0, 5]))
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
