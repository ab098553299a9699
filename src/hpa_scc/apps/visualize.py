"""Display helpers and evaluation figures: composites, cells with labels, curves, per-class AP.

    python -m hpa_scc visualize PRED_DIR DATA_DIR --out OUT_DIR [--run RUN_DIR] [--solution CSV]

    from hpa_scc.apps.visualize import to_rgb, overlay_outlines
    rgb = overlay_outlines(to_rgb(image, percentile=99.5), cell_labels)

Figures (each returns a matplotlib Figure and, given ``path``, writes it as PNG):
``show_cells`` (an image's cells with their top classes, beside the truth or pseudo-labels),
``show_prediction`` (the same from a prediction folder), ``plot_training_curves`` (a run's
metrics.jsonl), ``plot_per_class_ap`` and ``plot_pr_curves`` (the metric's ``EvalResult``).
``prediction_overlays`` and ``visualize_main`` write them into a folder; the evaluation
notebooks call these and nothing else.

Why ~490 lines: every figure of the project (overlays, PR curves, per-class AP, training curves,
the notebook's tables) is drawn here, from the owners' readers (predictions, synthetic truth,
run folder); it reads and writes no format of its own.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from hpa_scc.constants import CLASS_NAMES, SHORT_CLASS_NAMES

log = logging.getLogger("hpa_scc.apps.visualize")


def to_rgb(image: np.ndarray, *, gain: float | Sequence[float] = 1.0, percentile: float | None = None) -> np.ndarray:
    """uint8 [4, H, W] (R, G, B, Y) or [3, H, W] (R, G, B) -> uint8 [H, W, 3] display composite.

    As HPA shows them: red as red, green as green, blue as blue, yellow added to red and green.
    ``gain`` multiplies each channel (a number or one per channel); with ``percentile`` each
    channel is first stretched so that its given percentile (of non-zero pixels) maps to 255,
    which makes dim images visible.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] not in (3, 4):
        raise ValueError(f"to_rgb needs [3 or 4, H, W] channels first, got shape {image.shape}")
    planes = image.astype(np.float32)
    gains = np.broadcast_to(np.asarray(gain, dtype=np.float32), (image.shape[0],)).copy()
    if percentile is not None:
        for ch, plane in enumerate(planes):
            nonzero = plane[plane > 0]
            top = np.percentile(nonzero, percentile) if nonzero.size else 0.0
            gains[ch] *= 255.0 / top if top > 0 else 1.0
    planes *= gains[:, None, None]
    red, green, blue = planes[0], planes[1], planes[2]
    if image.shape[0] == 4:
        red, green = red + planes[3], green + planes[3]
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)


def overlay_outlines(rgb: np.ndarray, labels: np.ndarray, color: Sequence[int] = (255, 255, 255),
                     thickness: int = 1) -> np.ndarray:
    """Copy of uint8 [H, W, 3] ``rgb`` with the outlines of label image [H, W] (0 = background) drawn.

    A pixel is on an outline if it belongs to an object and a 4-neighbour has another label,
    so touching objects show the boundary they share.
    """
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {rgb.shape[:2]} differ in size")
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge &= labels > 0
    if thickness > 1:
        edge = cv2.dilate(edge.view(np.uint8), np.ones((thickness, thickness), np.uint8)) > 0
    out = rgb.copy()
    out[edge] = color
    return out


# ---------------------------------------------------------------------------------------------
# Figures for evaluation: cells with their labels, training curves, per-class AP, PR curves.
# Every function builds a matplotlib Figure on the Agg canvas without pyplot (no global state, no
# open-figure leak in loops), returns it, and writes it as PNG (atomically) when given a path.
# In a notebook a returned Figure displays itself after ``%matplotlib inline``.
# ---------------------------------------------------------------------------------------------

# Full class name -> its display abbreviation (constants.SHORT_CLASS_NAMES), so labels drawn
# over cells stay short.
SHORT_NAMES: dict[str, str] = dict(zip(CLASS_NAMES, SHORT_CLASS_NAMES, strict=True))
OVERLAY_SUFFIX = "_overlay.png"  # prediction_overlays writes <ID>_overlay.png


def short_name(c: int) -> str:
    """Class index -> its short display name."""
    return SHORT_CLASS_NAMES[c]


def _new_figure(width_in: float, height_in: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    return fig


def save_figure(fig, path: str | os.PathLike, *, dpi: int | None = None) -> Path:
    """Write ``fig`` as PNG through a temporary file and a rename; returns the path."""
    from hpa_scc.utils.fileio import atomic_path

    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi or fig.dpi)
    return Path(path)


def _finish(fig, path, dpi=None):
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


# --- cells and their labels -------------------------------------------------------------------

def _label_points(labels: np.ndarray) -> dict[int, tuple[float, float]]:
    """{cell id: (x, y)} of the pixel deepest inside each cell (inside even a crescent-shaped cell)."""
    from scipy import ndimage

    points = {}
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = np.pad((labels[box] == k).astype(np.uint8), 1)  # padded: the bbox edge is not a border
        depth = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        points[k] = (box[1].start + x - 1, box[0].start + y - 1)
    return points


def _conf_of(conf, k: int) -> np.ndarray | None:
    if isinstance(conf, Mapping):
        row = conf.get(k)
        return None if row is None else np.asarray(row, dtype=np.float32)
    return np.asarray(conf[k - 1], dtype=np.float32) if 0 < k <= len(conf) else None


def _cell_texts(ids, conf=None, labels=None, top_k: int = 2, min_conf: float = 0.0) -> dict[int, str]:
    """Per cell: its ``top_k`` classes by confidence as 'Name 0.87' lines, or its given labels."""
    texts = {}
    for k in ids:
        if conf is not None:
            row = _conf_of(conf, k)
            if row is None:
                continue
            order = [c for c in np.argsort(-row, kind="stable")[:top_k] if row[c] > min_conf]
            texts[k] = "\n".join(f"{short_name(int(c))} {row[c]:.2f}" for c in order)
        elif labels is not None and k in labels:
            texts[k] = "\n".join(short_name(int(c)) for c in labels[k])
    return {k: t for k, t in texts.items() if t}


def _display_size(shape: tuple[int, int], display_px: int | None) -> tuple[int, int]:
    height, width = shape
    scale = 1.0 if not display_px or max(height, width) <= display_px else display_px / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _panel(ax, rgb: np.ndarray, labels: np.ndarray, texts: dict[int, str], title: str, color, fontsize: float):
    ax.imshow(overlay_outlines(rgb, labels, color=color), interpolation="nearest")
    points = _label_points(labels)
    for k, text in texts.items():
        if k in points:
            ax.text(*points[k], text, color="white", fontsize=fontsize, ha="center", va="center",
                    linespacing=1.0, bbox=dict(facecolor="black", alpha=0.55, pad=0.8, linewidth=0))
    ax.text(0.01, 0.99, title, transform=ax.transAxes, color="white", fontsize=fontsize + 2, ha="left", va="top",
            bbox=dict(facecolor="black", alpha=0.7, pad=2, linewidth=0))
    ax.set_axis_off()


def show_cells(image: np.ndarray, cells: np.ndarray, conf=None, truth_cells: np.ndarray | None = None,
               truth_labels: Mapping[int, Sequence[int]] | None = None, top_k: int = 2, *,
               title: str = "prediction", truth_title: str = "truth", min_conf: float = 0.0,
               percentile: float | None = 99.5, display_px: int | None = 768, panel_in: float = 6.0, dpi: int = 100,
               color: Sequence[int] = (255, 255, 255), path: str | os.PathLike | None = None):
    """One image's cells with their labels; beside it, the truth (or pseudo-labels) when given.

    ``image``: uint8 [4 or 3, H, W] channels (shown with ``to_rgb``) or an RGB [H, W, 3].
    ``cells``: int label image [H, W] (0 = background, cell k = k).
    ``conf``: float [K, 19] (row k-1 = cell k) or {cell id: 19 confidences}; each cell is
    captioned with its ``top_k`` classes above ``min_conf``, short names and confidences.
    ``truth_cells`` [H, W] + ``truth_labels`` {cell id: class indices}: a second panel with the
    true outlines and labels. ``truth_labels`` without ``truth_cells`` captions ``cells`` (e.g. the
    pseudo-labels of the segmented cells; set ``truth_title`` accordingly).

    Images larger than ``display_px`` are shrunk before outlines are drawn, so outlines stay one
    display pixel wide. The figure has no margins: each panel is ``panel_in`` inches wide at
    ``dpi``, e.g. a square image in two panels gives a 1200 x 600 px PNG at the defaults.
    """
    image = np.asarray(image)
    rgb = image if image.ndim == 3 and image.shape[-1] == 3 and image.shape[0] not in (3, 4) else \
        to_rgb(image, percentile=percentile)
    cells = np.asarray(cells)
    if cells.shape != rgb.shape[:2]:
        raise ValueError(f"cells {cells.shape} and image {rgb.shape[:2]} differ in size")
    if truth_cells is not None and np.shape(truth_cells) != cells.shape:
        raise ValueError(f"truth_cells {np.shape(truth_cells)} and cells {cells.shape} differ in size")
    height, width = _display_size(cells.shape, display_px)
    if (height, width) != cells.shape:
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)

    def shrink(labels):
        labels = np.asarray(labels).astype(np.int32)
        return labels if labels.shape == (height, width) else \
            cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)

    panels = [(shrink(cells), _cell_texts(np.unique(cells[cells > 0]).tolist(), conf=conf, top_k=top_k,
                                          min_conf=min_conf), title)]
    if truth_cells is not None or truth_labels is not None:
        right = cells if truth_cells is None else np.asarray(truth_cells)
        panels.append((shrink(right), _cell_texts(np.unique(right[right > 0]).tolist(), labels=truth_labels or {}),
                       truth_title))
    fig = _new_figure(panel_in * len(panels), panel_in * height / width, dpi)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1, wspace=0)
    fontsize = max(4.0, 1.2 * panel_in)
    for ax, (labels, texts, name) in zip(axes, panels, strict=True):
        _panel(ax, rgb, labels, texts, name, color, fontsize)
    return _finish(fig, path)


# --- a prediction folder (predict.predict_folder's output) ------------------------------------

def load_prediction(pred_dir: str | os.PathLike, image_id: str) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(cell label image uint16 [H, W] at full size, {cell id: float [19]}) from records/<xx>/<ID>.json
    (``PredictionFolder.label_image``).

    The record holds every cell's mask, whatever the cell mode or baseline that made it.
    """
    from hpa_scc.evaluation.predictions import PredictionFolder

    return PredictionFolder(pred_dir).label_image(image_id)


def read_truth_table(data_dir: str | os.PathLike) -> dict[str, dict[int, list[int]]] | None:
    """A synthetic set's true cell labels {ID: {cell: classes}}, or None for any other folder."""
    from hpa_scc.data.synth import SynthSet

    data = SynthSet(data_dir)
    return data.true_labels() if data.is_synthetic else None


def prediction_ids(pred_dir: str | os.PathLike, data_dir: str | os.PathLike) -> list[str]:
    """IDs of ``data_dir``'s images (its order) that have a prediction record in ``pred_dir``."""
    from hpa_scc.data.images import find_images
    from hpa_scc.evaluation.predictions import PredictionFolder

    folder = PredictionFolder(pred_dir)
    return [r.image_id for r in find_images(data_dir) if folder.has_record(r.image_id)]


def show_prediction(pred_dir: str | os.PathLike, data_dir: str | os.PathLike, image_id: str, top_k: int = 2, *,
                    truth_table: dict | None = None, path: str | os.PathLike | None = None, **kwargs):
    """``show_cells`` for one predicted image: predicted cells and labels vs the synthetic truth.

    Outside a synthetic set (no masks/ and cells.csv) only the prediction is shown, its title
    naming the image-level labels when ``data_dir`` has them. ``truth_table`` (from
    ``read_truth_table``) saves re-reading cells.csv image after image.
    """
    from hpa_scc.data.images import find_images, read_image
    from hpa_scc.data.synth import SynthSet

    data_dir = Path(data_dir)
    record = {r.image_id: r for r in find_images(data_dir)}.get(image_id)
    if record is None:
        raise FileNotFoundError(f"image {image_id} is not in {data_dir}")
    image = read_image(record.folder, image_id)
    cells, conf = load_prediction(pred_dir, image_id)
    table = truth_table if truth_table is not None else read_truth_table(data_dir)
    title = f"{image_id}: prediction"
    if table is not None and image_id in table:
        truth_cells = SynthSet(data_dir).read_mask(image_id)
        return show_cells(image, cells, conf, truth_cells, table[image_id], top_k, title=title,
                          truth_title=f"{image_id}: truth", path=path, **kwargs)
    if record.labels:
        title += " (image labels: " + ", ".join(short_name(c) for c in record.labels) + ")"
    return show_cells(image, cells, conf, top_k=top_k, title=title, path=path, **kwargs)


def prediction_overlays(pred_dir: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        n: int = 4, *, top_k: int = 2, **kwargs) -> list[Path]:
    """For the first ``n`` predicted images of ``data_dir``: OUT_DIR/<ID>_overlay.png; their paths."""
    from hpa_scc.evaluation.predictions import PredictionFolder

    ids = prediction_ids(pred_dir, data_dir)
    if not ids:
        raise FileNotFoundError(f"no prediction records in {PredictionFolder(pred_dir).records_dir} for the images "
                                f"of {data_dir}")
    table = read_truth_table(data_dir)
    paths = []
    for image_id in ids[:n]:
        path = Path(out_dir) / f"{image_id}{OVERLAY_SUFFIX}"
        show_prediction(pred_dir, data_dir, image_id, top_k, truth_table=table, path=path, **kwargs)
        paths.append(path)
    return paths


# --- training curves ---------------------------------------------------------------------------


def plot_training_curves(run_dir: str | os.PathLike, path: str | os.PathLike | None = None, *,
                         title: str | None = None):
    """Two panels from metrics.jsonl against the step: the losses and the validation AP.

    Losses: lines for the logged steps ("train" rows: loss and loss_*), dots for the epoch means
    ("epoch" rows: mean_loss_*), one colour per loss. Validation: every "val" key holding "AP"
    (segm_AP, segm_AP50).
    """
    import matplotlib

    from hpa_scc.engine.runfolder import read_metrics

    rows = read_metrics(run_dir)
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(row.get("kind", ""), []).append(row)
    fig = _new_figure(12, 4.5)
    ax_loss, ax_val = fig.subplots(1, 2)
    colours = matplotlib.colormaps["tab10"]
    loss_names = sorted({k for r in by_kind.get("train", []) for k in r if k.startswith("loss")} |
                        {k[len("mean_"):] for r in by_kind.get("epoch", []) for k in r if k.startswith("mean_loss")},
                        key=lambda k: (k != "loss", k))
    for i, name in enumerate(loss_names):
        colour = colours(i % 10)
        steps = [(r["step"], r[name]) for r in by_kind.get("train", []) if name in r]
        if steps:
            ax_loss.plot(*zip(*steps), color=colour, lw=1, label=name)
        means = [(r["step"], r["mean_" + name]) for r in by_kind.get("epoch", []) if "mean_" + name in r]
        if means:
            ax_loss.plot(*zip(*means), "o--", color=colour, ms=4, lw=0.8,
                         label=None if steps else f"{name} (epoch mean)")
    ax_loss.set(xlabel="step", ylabel="loss", title="training losses (lines: logged steps, dots: epoch means)")
    if loss_names:
        ax_loss.legend(fontsize=7)
    else:
        ax_loss.text(0.5, 0.5, "no losses logged yet", ha="center", va="center", transform=ax_loss.transAxes)
    val = by_kind.get("val", [])
    ap_names = sorted({k for r in val for k in r if "AP" in k})
    for i, name in enumerate(ap_names):
        points = [(r["step"], r[name]) for r in val if isinstance(r.get(name), (int, float))]
        if points:
            ax_val.plot(*zip(*points), "o-", color=colours(i % 10), ms=4, label=name)
    ax_val.set(xlabel="step", ylabel="AP", ylim=(-0.02, 1.02), title="validation (COCO mask AP of the cells)")
    if ap_names:
        ax_val.legend(fontsize=8)
    else:
        ax_val.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax_val.transAxes)
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    fig.suptitle(title or str(run_dir), fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


# --- the competition metric -------------------------------------------------------------------

def _mean_ap(per_class_ap: Mapping[int, float]) -> float:
    values = [v for v in per_class_ap.values() if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def plot_per_class_ap(per_class_ap: Mapping, title: str = "per-class AP", path: str | os.PathLike | None = None):
    """Horizontal bars of AP for the 19 classes (class 0 at the top), with their names.

    ``per_class_ap``: {class index: AP} (``EvalResult.per_class_ap``) for one series, or
    {series name: {class index: AP}} for several side by side (e.g. the model and the
    image-labels baseline). NaN (no truth of that class) draws an empty bar marked "absent";
    each series' legend gives its mAP over the classes present. One bar per class and series.
    """
    import matplotlib

    from hpa_scc.constants import CLASS_NAMES, NUM_CLASSES

    series = dict(per_class_ap) if per_class_ap and all(isinstance(v, Mapping) for v in per_class_ap.values()) \
        else {"AP": per_class_ap}
    colours = matplotlib.colormaps["tab10"]
    fig = _new_figure(9, 1.2 + 0.32 * NUM_CLASSES * max(1, len(series)) ** 0.5)
    ax = fig.subplots()
    height = 0.8 / len(series)
    y = np.arange(NUM_CLASSES)
    absent = np.ones(NUM_CLASSES, bool)
    for i, (name, aps) in enumerate(series.items()):
        values = np.array([np.nan if aps.get(c) is None else float(aps[c]) for c in range(NUM_CLASSES)])
        absent &= np.isnan(values)
        offset = (i - (len(series) - 1) / 2) * height
        ax.barh(y + offset, np.nan_to_num(values, nan=0.0), height=height, color=colours(i % 10),
                label=f"{name} (mAP {_mean_ap(aps):.3f})")
        for c in np.flatnonzero(~np.isnan(values)):
            ax.text(values[c] + 0.01, c + offset, f"{values[c]:.2f}", va="center", fontsize=6)
    for c in np.flatnonzero(absent):
        ax.text(0.01, c, "absent (no truth)", va="center", fontsize=7, color="grey", style="italic")
    ax.set_yticks(y, [f"{c} {CLASS_NAMES[c]}" for c in range(NUM_CLASSES)], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.08), xlabel="AP (mask IoU >= 0.6)", title=title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _finish(fig, path)


def plot_pr_curves(result, path: str | os.PathLike | None = None, *, cols: int = 5, title: str | None = None):
    """One small precision-recall panel per class with truth, from ``metric.EvalResult``.

    Thin line: the raw precision at each rank; step: its envelope, whose area is the AP.
    """
    classes = result.classes_scored()
    cols = max(1, min(cols, len(classes)))
    rows = max(1, math.ceil(len(classes) / cols))
    fig = _new_figure(2.6 * cols, 2.4 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, c in zip(axes, classes):
        recall, precision = result.pr_curves[c]
        if precision.size:
            envelope = np.maximum.accumulate(precision[::-1])[::-1]
            ax.plot(recall, precision, lw=0.6, color="tab:grey")
            ax.step(np.concatenate([[0.0], recall]), np.concatenate([envelope[:1], envelope]), where="pre",
                    lw=1.5, color="tab:blue")
        else:
            ax.text(0.5, 0.5, "no detections", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.set_title(f"{c} {short_name(c)}: AP {result.per_class_ap[c]:.3f}\n"
                     f"{result.n_truth[c]} true, {result.n_detections[c]} detections", fontsize=8)
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(classes):]:
        ax.set_axis_off()
    if not classes:
        axes[0].text(0.5, 0.5, "no class has a truth mask", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(title or f"precision-recall at mask IoU >= {result.iou_threshold:g}: mAP {result.mAP:.4f}",
                 fontsize=10)
    fig.supxlabel("recall", fontsize=9)
    fig.supylabel("precision", fontsize=9)
    fig.tight_layout()
    return _finish(fig, path)


# --- the command -------------------------------------------------------------------------------

def visualize_main(pred_dir: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   run_dir: str | os.PathLike | None = None, solution: str | os.PathLike | None = None, n: int = 4,
                   *, top_k: int = 2, compare: Mapping[str, str | os.PathLike] | None = None,
                   name: str = "model") -> dict[str, Path | list[Path]]:
    """Write the evaluation figures of a prediction folder into ``out_dir``; returns {what: path}.

        python -m hpa_scc visualize PRED_DIR DATA_DIR --out OUT_DIR [--run RUN_DIR] [--solution solution.csv]

    - ``overlays``: <ID>_overlay.png for the first ``n`` images (prediction vs the truth of a
      synthetic set, top ``top_k`` classes per cell);
    - ``training_curves``: training_curves.png, when ``run_dir`` is given;
    - with ``solution`` (a solution.csv, e.g. DATA_DIR/solution.csv of a synthetic set), PRED_DIR's
      submission.csv is scored: ``eval_json`` (eval.json), ``per_class_ap`` (per_class_ap.png) and
      ``pr_curves`` (pr_curves.png). ``compare`` {series name: submission.csv or a prediction
      folder} adds other submissions (e.g. a baseline) as bars beside ``name``'s.
    """
    if n < 0:
        raise ValueError(f"--images {n}: the number of overlays is 0 or more")
    from hpa_scc.evaluation.metric import evaluate_files

    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    from hpa_scc.utils.fileio import refuse_inside

    refuse_inside(out_dir, data_dir, "--out")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path | list[Path]] = {}
    written["overlays"] = prediction_overlays(pred_dir, data_dir, out_dir, n, top_k=top_k)
    if run_dir is not None:
        written["training_curves"] = save_figure(plot_training_curves(run_dir), out_dir / "training_curves.png")
    if solution is not None:
        from hpa_scc.evaluation.predictions import PredictionFolder

        result = evaluate_files(solution, PredictionFolder(pred_dir).submission, out_json=out_dir / "eval.json")
        log.info("%s: mAP %.4f over %d classes", pred_dir, result.mAP, len(result.classes_scored()))
        written["eval_json"] = out_dir / "eval.json"
        series = {name: result.per_class_ap}
        for other, where in (compare or {}).items():
            where = Path(where)
            submission = PredictionFolder(where).submission if where.is_dir() else where
            series[other] = evaluate_files(solution, submission).per_class_ap
        written["per_class_ap"] = save_figure(
            plot_per_class_ap(series, title=f"per-class AP: {pred_dir}"), out_dir / "per_class_ap.png")
        written["pr_curves"] = save_figure(plot_pr_curves(result), out_dir / "pr_curves.png")
    return written
