"""The synthetic HPA generator: determinism, per-cell truth, the written layout and resuming."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from hpa_scc.constants import CHANNELS, CLASS_NAMES, MITOTIC_SPINDLE, NEGATIVE, NUM_CLASSES, parse_labels
from hpa_scc.evaluation.submission import decode_mask, read_submission
from hpa_scc.data.synth import format_summary, write_synth_set
from hpa_scc.data.synth_draw import GREEN_PATTERNS, generate_image
from hpa_scc.data.synth_layout import assign_cell_labels, sample_image_labels
from hpa_scc.apps.visualize import overlay_outlines, to_rgb

SIZE = 128  # small enough for speed; the layout scales with the size, so the cells are the same


@pytest.fixture(scope="module")
def images():
    """A dozen small images, generated once for the truth checks."""
    return [generate_image(i, size=SIZE, seed=0) for i in range(12)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A 3-image set written once: (folder, summary)."""
    out = tmp_path_factory.mktemp("synth") / "set"
    return out, write_synth_set(out, 3, size=SIZE, seed=5, progress=False)


def read_png(path: Path) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert array is not None, f"unreadable {path}"
    return array


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.png")}


# --- determinism ---------------------------------------------------------------------------------
def test_same_seed_is_identical_and_other_seed_differs():
    a, b = generate_image(3, size=SIZE, seed=0), generate_image(3, size=SIZE, seed=0)
    assert a.image_id == "synth0-00003"
    for name in ("image", "cells", "nuclei"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert (a.cell_labels, a.image_labels, a.mitotic) == (b.cell_labels, b.image_labels, b.mitotic)
    c = generate_image(3, size=SIZE, seed=1)
    assert c.image_id == "synth1-00003"
    assert c.image.shape == a.image.shape and not np.array_equal(c.image, a.image)
    assert not np.array_equal(generate_image(4, size=SIZE, seed=0).image, a.image)  # images differ too


def test_image_does_not_depend_on_set_size_or_workers(tmp_path):
    write_synth_set(tmp_path / "two", 2, size=SIZE, seed=7, progress=False)
    write_synth_set(tmp_path / "four", 4, size=SIZE, seed=7, workers=2, progress=False)
    for rel in ("train/synth7-00001_green.png", "masks/synth7-00001.png", "nuclei/synth7-00000.png"):
        assert (tmp_path / "two" / rel).read_bytes() == (tmp_path / "four" / rel).read_bytes(), rel
    single = generate_image(1, size=SIZE, seed=7)
    assert np.array_equal(read_png(tmp_path / "four" / "masks" / "synth7-00001.png"), single.cells)


# --- the images and their truth -----------------------------------------------------------------
def test_shapes_ids_and_nuclei(images):
    for im in images:
        assert im.image.dtype == np.uint8 and im.image.shape == (4, SIZE, SIZE)
        assert im.cells.dtype == np.uint16 and im.nuclei.dtype == np.uint16
        assert im.cells.shape == im.nuclei.shape == (SIZE, SIZE)
        n = int(im.cells.max())
        assert n >= 1
        assert np.array_equal(np.unique(im.cells), np.arange(n + 1)), "cell ids must be 0..N, consecutive"
        assert np.array_equal(np.unique(im.nuclei), np.arange(n + 1)), "every cell has a visible nucleus"
        inside = im.nuclei > 0
        assert np.array_equal(im.cells[inside], im.nuclei[inside]), "nucleus k must lie inside cell k"
        for k in range(1, n + 1):
            _, parts = ndimage.label(im.cells == k)  # 4-connectivity
            assert parts == 1, f"{im.image_id} cell {k} is in {parts} pieces"
        assert sorted(im.cell_labels) == sorted(im.mitotic) == list(range(1, n + 1))


def test_cell_labels_are_consistent_with_the_image(images):
    for im in images:
        image_labels = set(im.image_labels)
        assert im.image_labels == sorted(image_labels)
        assert NEGATIVE not in image_labels or im.image_labels == [NEGATIVE]
        shown = set()
        for k, labels in im.cell_labels.items():
            assert labels == sorted(set(labels)) and labels, (im.image_id, k, labels)
            assert NEGATIVE not in labels or labels == [NEGATIVE], (im.image_id, k, labels)
            if MITOTIC_SPINDLE in labels:
                assert im.mitotic[k], f"{im.image_id} cell {k} shows Mitotic spindle but is not mitotic"
            if im.image_labels == [NEGATIVE]:
                assert labels == [NEGATIVE]
            shown |= set(labels) - {NEGATIVE}
        assert shown == image_labels - {NEGATIVE}, "the image labels are the union of the cells'"
        if image_labels != {NEGATIVE}:
            assert shown == image_labels, "every image label must be shown by at least one cell"


def test_mitotic_spindle_image_has_a_mitotic_cell():
    found = 0
    for index in range(400):
        im = generate_image(index, size=64, seed=0)
        if MITOTIC_SPINDLE in im.image_labels:
            found += 1
            assert any(im.mitotic.values())
            assert all(im.mitotic[k] for k, labels in im.cell_labels.items() if MITOTIC_SPINDLE in labels)
            if found == 3:
                break
    assert found >= 1, "no image with Mitotic spindle among 400 draws"


def test_images_are_dim_and_cells_touch_the_border():
    touching = 0
    for index in range(6):
        im = generate_image(index, size=256, seed=2)
        means = im.image.reshape(4, -1).mean(axis=1)
        assert np.all(means < 60), f"{im.image_id} channel means {means} are not dim like HPA"
        p99 = np.percentile(im.image.reshape(4, -1), 99, axis=1)
        assert np.all(p99[[0, 2, 3]] > 30), f"{im.image_id}: no bright red/blue/yellow structures ({p99})"
        assert np.median(im.image[:, im.cells == 0]) <= 2, "background must be near black"
        edge = np.concatenate([im.cells[0], im.cells[-1], im.cells[:, 0], im.cells[:, -1]])
        touching += len(set(edge.tolist()) - {0})
    assert touching >= 3


def test_mitotic_cells_are_rare_but_present(images):
    flags = [m for im in images for m in im.mitotic.values()]
    assert 0 < sum(flags) < 0.3 * len(flags)


# --- labels -------------------------------------------------------------------------------------
def test_sample_image_labels_has_the_kaggle_skew():
    rng = np.random.default_rng(0)
    draws = [sample_image_labels(rng) for _ in range(4000)]
    counts = Counter(label for labels in draws for label in labels)
    assert counts.most_common(1)[0][0] == 0, "Nucleoplasm is the most frequent class"
    assert counts[0] > 2 * counts[11] and counts[11] > 0, "rare classes appear, less often"
    assert all(1 <= len(labels) <= 4 for labels in draws)
    assert all(labels == sorted(set(labels)) for labels in draws)
    negative = [labels for labels in draws if NEGATIVE in labels]
    assert negative and all(labels == [NEGATIVE] for labels in negative), "Negative comes only alone"
    sizes = Counter(len(labels) for labels in draws)
    assert sizes[1] > sizes[3] > sizes[4]
    assert set(counts) == set(range(NUM_CLASSES))


def test_assign_cell_labels_rules():
    rng = np.random.default_rng(0)
    mitotic = [False, False, True, False, False]
    for _ in range(50):
        per_cell = assign_cell_labels(rng, [MITOTIC_SPINDLE, 16], mitotic)
        assert len(per_cell) == 5
        assert [i for i, labels in enumerate(per_cell) if MITOTIC_SPINDLE in labels] == [2]
        assert any(16 in labels for labels in per_cell)
        assert all(labels == [NEGATIVE] or NEGATIVE not in labels for labels in per_cell)
    assert assign_cell_labels(rng, [NEGATIVE], mitotic) == [[NEGATIVE]] * 5
    with pytest.raises(ValueError, match="mitotic"):
        assign_cell_labels(rng, [MITOTIC_SPINDLE], [False, False])
    with pytest.raises(ValueError, match="alone"):
        assign_cell_labels(rng, [0, NEGATIVE], [False])


def test_green_patterns_sit_in_their_compartments():
    """Nuclear classes light the nucleus, cytoplasmic ones the cytoplasm, Negative neither."""
    assert sorted(GREEN_PATTERNS) == list(range(NUM_CLASSES))
    ratios: dict[int, list[float]] = {}
    negative_means = []
    for index in range(100):
        im = generate_image(index, size=256, seed=3)
        green = im.image[1].astype(np.float64)
        for cell_id, labels in im.cell_labels.items():
            nucleus = im.nuclei == cell_id
            cytoplasm = (im.cells == cell_id) & ~nucleus
            if len(labels) != 1 or nucleus.sum() < 20 or cytoplasm.sum() < 20:
                continue
            ratios.setdefault(labels[0], []).append(green[nucleus].mean() / (green[cytoplasm].mean() + 1e-3))
            if labels == [NEGATIVE]:
                negative_means.append(green[im.cells == cell_id].mean())
    for c in (0, 2, 4, 5):  # nucleoplasm, nucleoli, speckles, nuclear bodies
        assert len(ratios[c]) >= 3 and np.median(ratios[c]) > 2, (c, np.median(ratios[c]))
    for c in (6, 8, 13, 14, 16, 17):  # ER, filaments, membrane, mitochondria, cytosol, vesicles
        assert len(ratios[c]) >= 3 and np.median(ratios[c]) < 0.5, (c, np.median(ratios[c]))
    assert np.median(negative_means) < 12, "Negative cells show no specific green signal"


# --- the written set ----------------------------------------------------------------------------
def test_written_layout(written):
    out, summary = written
    with open(out / "train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ids = [r["ID"] for r in rows]
    assert ids == [f"synth5-{i:05d}" for i in range(3)]
    with open(out / "cells.csv", newline="") as fh:
        cell_rows = list(csv.DictReader(fh))
    solution = {row.image_id: row for row in read_submission(out / "solution.csv")}
    assert sorted(solution) == ids
    for index, row in enumerate(rows):
        im = generate_image(index, size=SIZE, seed=5)
        assert parse_labels(row["Label"]) == im.image_labels
        for channel, plane in zip(CHANNELS, im.image):
            written_plane = read_png(out / "train" / f"{row['ID']}_{channel}.png")
            assert written_plane.dtype == np.uint8 and written_plane.shape == (SIZE, SIZE)
            assert np.array_equal(written_plane, plane)
        cells = read_png(out / "masks" / f"{row['ID']}.png")
        assert cells.dtype == np.uint16 and np.array_equal(cells, im.cells)
        assert np.array_equal(read_png(out / "nuclei" / f"{row['ID']}.png"), im.nuclei)
        mine = [r for r in cell_rows if r["ID"] == row["ID"]]
        assert len(mine) == int(im.cells.max())
        assert {int(r["cell"]): parse_labels(r["Label"]) for r in mine} == im.cell_labels
        # solution.csv: one triple per (cell, label), each mask decoding to exactly that cell.
        sub = solution[row["ID"]]
        assert (sub.width, sub.height) == (SIZE, SIZE)
        by_mask: dict[str, list[int]] = {}
        for label, conf, text in sub.predictions:
            assert conf == 1.0
            by_mask.setdefault(text, []).append(label)
        assert len(by_mask) == len(im.cell_labels)
        for text, labels in by_mask.items():
            mask = decode_mask(text, SIZE, SIZE)
            ids_under = np.unique(im.cells[mask])
            assert len(ids_under) == 1 and ids_under[0] > 0
            k = int(ids_under[0])
            assert np.array_equal(mask, im.cells == k)
            assert sorted(labels) == im.cell_labels[k]
    meta = json.loads((out / "meta" / "synth5-00000.json").read_text())
    assert meta["size"] == SIZE and meta["image_labels"] == parse_labels(rows[0]["Label"])
    assert summary["images"] == summary["generated"] == 3
    assert summary["cells"] == len(cell_rows)


def test_summary_text(written):
    _, summary = written
    text = format_summary(summary)
    assert "images: 3" in text and "mitotic" in text and "border" in text
    assert all(name in text for name in CLASS_NAMES)
    assert "solution.csv" in text


def test_resume_regenerates_only_what_is_missing(tmp_path):
    out = tmp_path / "set"
    write_synth_set(out, 3, size=SIZE, seed=3, progress=False)
    tables = {name: (out / name).read_bytes() for name in ("train.csv", "cells.csv", "solution.csv")}
    victim = "synth3-00001"
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob(f"{victim}*")}
    assert len(before) == 7  # 4 channels, mask, nuclei, meta
    for path in out.rglob(f"{victim}*"):
        path.unlink()
    stamps = mtimes(out)
    summary = write_synth_set(out, 3, size=SIZE, seed=3, progress=False)
    assert (summary["generated"], summary["skipped"], summary["images"]) == (1, 2, 3)
    after = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob(f"{victim}*")}
    assert after == before, "the regenerated image must be byte-identical"
    assert all(mtimes(out)[rel] == stamp for rel, stamp in stamps.items()), "finished images were rewritten"
    assert {name: (out / name).read_bytes() for name in tables} == tables
    # Asking for more extends the set; nothing already there is redone.
    assert write_synth_set(out, 4, size=SIZE, seed=3, progress=False)["generated"] == 1


def test_other_size_or_seed_into_the_same_folder_fails(written):
    out, _ = written
    with pytest.raises(ValueError, match="size"):
        write_synth_set(out, 3, size=SIZE * 2, seed=5, progress=False)
    with pytest.raises(ValueError, match="seed"):
        write_synth_set(out, 3, size=SIZE, seed=6, progress=False)


# --- display helpers ----------------------------------------------------------------------------
def test_to_rgb_and_outlines():
    image = np.zeros((4, 8, 8), np.uint8)
    image[3, 2, 2] = 100  # yellow shows in red and green
    image[2, 5, 5] = 50
    rgb = to_rgb(image)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[2, 2]) == (100, 100, 0) and tuple(rgb[5, 5]) == (0, 0, 50)
    assert to_rgb(image, percentile=99)[5, 5, 2] == 255  # stretched
    assert to_rgb(image[:3]).shape == (8, 8, 3)
    labels = np.zeros((8, 8), np.uint16)
    labels[2:6, 2:6] = 1
    out = overlay_outlines(rgb, labels, (255, 0, 0))
    assert tuple(out[2, 3]) == (255, 0, 0) and tuple(out[3, 3]) != (255, 0, 0)  # edge, not interior
    assert tuple(out[0, 0]) == tuple(rgb[0, 0])
