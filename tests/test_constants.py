import pytest

from hpa_scc.constants import (CHANNELS, CLASS_NAMES, KAGGLE_CLASS_COUNTS, NEGATIVE, NUM_CLASSES, LabelError,
                               format_labels, labels_to_multihot, parse_labels)


def test_class_table_matches_the_competition():
    assert NUM_CLASSES == 19 == len(KAGGLE_CLASS_COUNTS)
    assert CLASS_NAMES[0] == "Nucleoplasm"
    assert CLASS_NAMES[11] == "Mitotic spindle"
    assert CLASS_NAMES[NEGATIVE] == "Negative" and NEGATIVE == 18
    assert CHANNELS == ("red", "green", "blue", "yellow")


def test_class_counts_are_those_of_the_real_table(hpa_sample):
    from collections import Counter

    from hpa_scc.data.images import read_label_table

    table = read_label_table(hpa_sample / "kaggle_train_labels.csv")
    counts = Counter(label for labels in table.values() for label in labels)
    assert len(table) == 21806
    assert tuple(counts[c] for c in range(NUM_CLASSES)) == KAGGLE_CLASS_COUNTS


def test_parse_and_format_round_trip():
    assert parse_labels("8|5|0") == [8, 5, 0]
    assert parse_labels(" 18 ") == [18]
    assert parse_labels("3|3") == [3]
    assert format_labels([8, 5, 0]) == "8|5|0"
    assert format_labels(parse_labels("11|16")) == "11|16"
    assert labels_to_multihot([0, 18]) == [1] + [0] * 17 + [1]


@pytest.mark.parametrize("text, fragment", [("8|19", "unknown label 19"), ("-1", "unknown label -1"),
                                            ("8|x", "'x'"), ("", "empty label string"),
                                            ("18|3", "combine Negative (18) with other classes"),
                                            ("3|18", "keep 18 alone or drop it")])
def test_bad_labels_name_the_row(text, fragment):
    with pytest.raises(LabelError) as err:
        parse_labels(text, where="train.csv line 7 (ID abc)")
    assert fragment in str(err.value)
    assert "train.csv line 7 (ID abc)" in str(err.value)


def test_format_rejects_unknown_and_empty():
    with pytest.raises(LabelError, match="unknown label 42"):
        format_labels([0, 42])
    with pytest.raises(LabelError, match="Negative"):
        format_labels([])
