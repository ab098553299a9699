"""visualize: composites and outlines, the cell figure, the overlays of a prediction folder, the plots."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from hpa_scc.constants import CLASS_NAMES, NUM_CLASSES
from hpa_scc.evaluation.metric import evaluate_files
from hpa_scc.apps.predict import predict_folder
from hpa_scc.apps.visualize import (SHORT_NAMES, load_prediction, plot_per_class_ap, plot_pr_curves,
                               plot_training_curves, prediction_overlays, show_cells, short_name, visualize_main)


@pytest.fixture(scope="module")
def predicted(shared_data, tmp_path_factory):
    """A synthetic set of 3 images at 128 px and its truth baseline (the true cells and labels) as predictions."""
    root = tmp_path_factory.mktemp("visualize")
    shared_data.copy(shared_data.synth(images=3, size=128, seed=5), root / "set")
    predict_folder(None, root / "set", root / "pred", baseline="truth", progress=False)
    return root


def two_cells() -> np.ndarray:
    cells = np.zeros((40, 40), np.uint16)
    cells[5:35, 5:20] = 1
    cells[5:35, 20:35] = 2  # touches cell 1 along x = 19 | 20
    return cells


def test_every_class_has_a_short_name():
    assert set(SHORT_NAMES) == set(CLASS_NAMES)
    assert all(len(short_name(c)) <= 14 for c in range(NUM_CLASSES))


def test_show_cells_draws_outlines_where_cells_border_and_captions_top_classes():
    image = np.zeros((4, 40, 40), np.uint8)
    cells = two_cells()
    conf = np.zeros((2, NUM_CLASSES), np.float32)
    conf[0, [0, 16, 5]] = 0.9, 0.4, 0.1  # top 2: Nucleoplasm, Cytosol
    conf[1, 18] = 0.7
    fig = show_cells(image, cells, conf, truth_cells=cells, truth_labels={1: [0], 2: [18, 14]}, top_k=2)
    pred_ax, truth_ax = fig.axes
    shown = pred_ax.images[0].get_array()
    assert shown.shape == (40, 40, 3)
    white = (shown == 255).all(axis=-1)
    assert white[20, 19] and white[20, 20]  # the shared boundary, on both sides
    assert white[5, 10] and white[34, 10] and white[20, 5]  # the outer boundary of cell 1
    assert not white[20, 10] and not white[0, 0] and not white[20, 4]  # interior and background untouched
    assert white.sum() == ((cells > 0) & (cv2.erode((cells == 1).astype(np.uint8), np.ones((3, 3))) == 0)
                           & (cv2.erode((cells == 2).astype(np.uint8), np.ones((3, 3))) == 0)).sum()
    texts = {t.get_text() for t in pred_ax.texts}
    assert "Nucleopl. 0.90\nCytosol 0.40" in texts and "Negative 0.70" in texts
    assert {"Nucleopl.", "Negative\nMitochond."} <= {t.get_text() for t in truth_ax.texts}
    # conf as a mapping, no truth: one panel; a zero-confidence cell gets no caption
    fig = show_cells(image, cells, {1: conf[0], 2: np.zeros(NUM_CLASSES)}, top_k=1)
    assert len(fig.axes) == 1 and "Nucleopl. 0.90" in {t.get_text() for t in fig.axes[0].texts}
    assert not any(t.get_text().startswith("Negative") for t in fig.axes[0].texts)


def test_show_cells_shrinks_large_images_and_checks_sizes(tmp_path):
    cells = np.kron(two_cells(), np.ones((25, 25), np.uint16))  # 1000 px
    fig = show_cells(np.full((3, 1000, 1000), 60, np.uint8), cells, display_px=500, path=tmp_path / "big.png")
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (500, 500, 3) and (shown == 255).all(axis=-1).any()
    assert cv2.imread(str(tmp_path / "big.png")).shape == (600, 600, 3)  # 6 in x 100 dpi, no margins
    with pytest.raises(ValueError, match="differ in size"):
        show_cells(np.zeros((4, 40, 40), np.uint8), np.zeros((30, 40), np.uint16))


def test_prediction_overlays_write_prediction_beside_truth(predicted, tmp_path):
    paths = prediction_overlays(predicted / "pred", predicted / "set", tmp_path, n=2)
    ids = sorted(p.stem for p in (predicted / "set" / "masks").iterdir())
    assert [p.name for p in paths] == [f"{i}_overlay.png" for i in ids[:2]]
    for path in paths:  # a square image in two 6-inch panels at 100 dpi
        assert cv2.imread(str(path)).shape == (600, 1200, 3)
    cells, conf = load_prediction(predicted / "pred", ids[0])
    truth = cv2.imread(str(predicted / "set" / "masks" / f"{ids[0]}.png"), cv2.IMREAD_UNCHANGED)
    assert cells.shape == (128, 128) and np.array_equal(cells, truth)  # the truth baseline re-encodes the truth
    assert set(conf) == set(np.unique(truth)) - {0} and all(v.shape == (NUM_CLASSES,) for v in conf.values())
    with pytest.raises(FileNotFoundError, match="no prediction records"):
        prediction_overlays(tmp_path / "nothing", predicted / "set", tmp_path)


def test_per_class_ap_has_one_bar_per_class_and_series():
    aps = {c: (math.nan if c % 3 else c / NUM_CLASSES) for c in range(NUM_CLASSES)}
    fig = plot_per_class_ap(aps, title="one")
    ax = fig.axes[0]
    assert len(ax.patches) == NUM_CLASSES
    widths = [0.0 if math.isnan(v) else v for v in aps.values()]
    assert [p.get_width() for p in ax.patches] == pytest.approx(widths)
    assert sum(t.get_text().startswith("absent") for t in ax.texts) == sum(math.isnan(v) for v in aps.values())
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["0 Nucleoplasm", "1 Nuclear membrane"]
    fig = plot_per_class_ap({"model": aps, "baseline": {c: 0.5 for c in range(NUM_CLASSES)}})
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * NUM_CLASSES
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["model (mAP 0.474)", "baseline (mAP 0.500)"]


def test_training_curves_from_metrics_jsonl(tmp_path):
    rows = [{"kind": "train", "step": s, "loss": 2.0 / s, "loss_mask": 1.0 / s} for s in range(1, 6)]
    rows += [{"kind": "epoch", "step": 5, "epoch": 1, "mean_loss": 0.9, "mean_loss_mask": 0.4},
             {"kind": "val", "step": 5, "epoch": 1, "segm_AP": 0.25, "segm_AP50": 0.5, "detections": 7}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tra'  # a live run's half-written line
    (tmp_path / "metrics.jsonl").write_text(text)
    fig = plot_training_curves(tmp_path, tmp_path / "curves.png")
    loss_ax, val_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.lines}
    assert list(lines["loss"].get_xdata()) == [1, 2, 3, 4, 5] and "loss_mask" in lines
    assert len(loss_ax.lines) == 4  # two losses, each with its logged steps and its epoch means
    val = {line.get_label(): line.get_ydata().tolist() for line in val_ax.lines}
    assert val == {"segm_AP": [0.25], "segm_AP50": [0.5]}
    assert (tmp_path / "curves.png").is_file()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_training_curves(tmp_path / "missing")


def test_pr_curves_one_panel_per_class_with_truth(predicted):
    result = evaluate_files(predicted / "set" / "solution.csv", predicted / "pred" / "submission.csv")
    fig = plot_pr_curves(result, cols=3)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == len(result.classes_scored()) > 0
    assert all("AP 1.000" in ax.get_title() for ax in titled)  # the truth itself


def test_visualize_main_writes_everything(predicted, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    out = visualize_main(predicted / "pred", predicted / "set", tmp_path / "figs", run_dir=run,
                         solution=predicted / "set" / "solution.csv", n=1, compare={"again": predicted / "pred"})
    assert set(out) == {"overlays", "training_curves", "eval_json", "per_class_ap", "pr_curves"}
    assert len(out["overlays"]) == 1
    for key in ("training_curves", "per_class_ap", "pr_curves"):
        assert cv2.imread(str(out[key])) is not None
    assert json.loads(out["eval_json"].read_text())["mAP"] == pytest.approx(1.0)
    only = visualize_main(predicted / "pred", predicted / "set", tmp_path / "few", n=5)
    assert set(only) == {"overlays"} and len(only["overlays"]) == 3
