import numpy as np
import pytest

from hpa_scc.evaluation.submission import (SubmissionError, cells_to_row, decode_mask, encode_label_image, encode_mask,
                                read_submission, write_submission)

SAMPLE = "eNqLi8xJM7BOTjS08DT2NfI38DfyM/Q3NMAJgJJ+RkBs7JecF5tnAADw+Q9I"


def test_real_sample_row_round_trips():
    mask = decode_mask(SAMPLE, height=1600, width=1118)
    assert mask.shape == (1600, 1118) and mask.dtype == bool
    assert int(mask.sum()) == 663
    assert encode_mask(mask) == SAMPLE


def test_random_masks_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(7, 13), (64, 64), (100, 37)]:
        mask = rng.random(shape) < 0.3
        np.testing.assert_array_equal(decode_mask(encode_mask(mask), *shape), mask)


def test_write_and_read_rows(tmp_path):
    cells = np.zeros((20, 30), np.uint16)
    cells[2:8, 3:9] = 1
    cells[10:15, 20:28] = 2
    row = cells_to_row("img", cells, {1: [0, 5], 2: [18]}, {1: [0.9, 0.25], 2: [1.0]})
    write_submission(tmp_path / "sub.csv", [row])
    (back,) = read_submission(tmp_path / "sub.csv")
    assert (back.image_id, back.width, back.height) == ("img", 30, 20)
    assert [(label, conf) for label, conf, _ in back.predictions] == [(0, 0.9), (5, 0.25), (18, 1.0)]
    assert back.predictions[0][2] == back.predictions[1][2]  # one mask, repeated per label
    np.testing.assert_array_equal(decode_mask(back.predictions[2][2], 20, 30), cells == 2)


@pytest.mark.parametrize("string, fragment", [("0 1", "2 tokens"), ("25 1 " + SAMPLE, "unknown label 25"),
                                              ("0 high " + SAMPLE, "triple 0")])
def test_malformed_rows_name_the_line(tmp_path, string, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(f"ID,ImageWidth,ImageHeight,PredictionString\nok,10,10,\nbad,10,10,{string}\n")
    with pytest.raises(SubmissionError) as err:
        read_submission(path)
    assert "line 3 (ID bad)" in str(err.value) and fragment in str(err.value)


def test_bad_base64_is_an_error():
    with pytest.raises(ValueError, match="not base64"):
        decode_mask("@@@notbase64", 10, 10)


def test_encode_label_image_matches_encode_mask_cell_by_cell():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(150):
        h, w = rng.integers(2, 30, 2)
        cells = (rng.integers(0, 5, (h, w)) * (rng.random((h, w)) < 0.7)).astype(np.uint16)
        cells[0, 0], cells[-1, -1] = 1, 2  # cells in the first and last column
        encoded = encode_label_image(cells)
        assert [e.cell for e in encoded] == sorted(set(np.unique(cells).tolist()) - {0})
        for e in encoded:
            mask = cells == e.cell
            ys, xs = np.nonzero(mask)
            assert e.mask == encode_mask(mask) and e.area == mask.sum()
            assert e.bbox == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert np.array_equal(decode_mask(e.mask, h, w), mask)
            checked += 1
    assert checked > 400


def test_encode_label_image_skips_missing_ids_and_rejects_stacks():
    cells = np.zeros((6, 5), np.uint16)
    cells[1:3, 1:4] = 3
    assert [(e.cell, e.area) for e in encode_label_image(cells)] == [(3, 6)]
    assert encode_label_image(np.zeros((4, 4), np.uint16)) == []
    with pytest.raises(ValueError, match="2-D label image"):
        encode_label_image(np.zeros((2, 4, 4), np.uint16))
