"""Public HPA label tables: the competition's ``kaggle_2021.tsv`` read and filtered, HPA location
names mapped to the 19 classes, and label tables merged (``merge-tables``); downloading the
images of a table is ``data.public``'s.

The table (the competition's ``kaggle_2021.tsv``; despite its name it is comma-separated, and a
tab-separated copy reads too) has one row per field of view:

    Image        URL prefix, e.g. https://images.proteinatlas.org/10580/1758_B1_1; the channel
                 files are <prefix>_{red,green,blue,yellow}.tif.gz
    Label        HPA location names joined by ',' (quoted), e.g. "Nucleoplasm,Cytosol"
    Cellline     e.g. U-2 OS (needed by --cell-lines)
    in_trainset  True for the images that are already in the Kaggle training set (needed by --exclude-train)
    Label_idx    optional: class indices joined by '|' (the organisers' own mapping of Label)

Labels: each name maps to one of the 19 classes (``HPA_LOCATION_TO_CLASS``; the class names
themselves, plus Focal adhesion sites -> Actin filaments, Centriolar satellite -> Centrosome,
Cell Junctions -> Plasma membrane, Peroxisomes/Endosomes/Lysosomes/Lipid droplets/Cytoplasmic
bodies -> Vesicles, No staining -> Negative; case is ignored). Names outside the competition
(e.g. Midbody) are counted and reported, and dropped. ``Label_idx`` is used for a row only when
its names give no class; a row with neither is skipped (counted). Decided so because the names
are what HPA publishes, and Label_idx is only a derived column that some copies lack.

Image ids: the last two components of the URL path joined by '_' (``10580_1758_B1_1``: antibody
folder and plate_well_field), which is unique across HPA; the first row wins when an id repeats.
"""

from __future__ import annotations

import csv
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpa_scc.constants import (
    CLASS_NAMES,
    NEGATIVE,
    LabelError,
    check_label,
    format_labels,
    parse_labels,
)
from hpa_scc.utils.fileio import atomic_path
from hpa_scc.data.images import check_image_id, read_label_table, table_rows

log = logging.getLogger(__name__)

SOURCE = "hpa_public"  # the `source` value of downloaded images in train.csv and merged tables
KAGGLE_SOURCE = "kaggle"

# HPA subcellular location name -> class index. The 19 class names map to themselves, except
# "Vesicles and punctate cytosolic patterns", which HPA calls "Vesicles".
HPA_LOCATION_TO_CLASS: dict[str, int] = {
    **{name: i for i, name in enumerate(CLASS_NAMES)},
    "Focal adhesion sites": 9,  # Actin filaments
    "Centriolar satellite": 12,  # Centrosome
    "Cell Junctions": 13,  # Plasma membrane
    "Vesicles": 17,
    "Peroxisomes": 17,
    "Endosomes": 17,
    "Lysosomes": 17,
    "Lipid droplets": 17,
    "Cytoplasmic bodies": 17,
    "No staining": 18,  # Negative
}
_BY_FOLDED_NAME = {name.casefold(): idx for name, idx in HPA_LOCATION_TO_CLASS.items()}

# The 17 cell lines of the Kaggle 2021 images (what the top teams kept); --cell-lines kaggle.
KAGGLE_CELL_LINES: tuple[str, ...] = (
    "A-431", "A549", "EFO-21", "HAP1", "HEK 293", "HUVEC TERT2", "HaCaT", "HeLa", "PC-3", "RH-30",
    "RPTEC TERT1", "SH-SY5Y", "SK-MEL-30", "SiHa", "U-2 OS", "U-251 MG", "hTCEpi",
)
TABLE_COLUMNS = ("Image", "Label", "Cellline", "in_trainset", "Label_idx")
_TRUE, _FALSE = {"true", "1", "yes", "t", "y"}, {"false", "0", "no", "f", "n", ""}


# ---------------------------------------------------------------- labels and the table

def map_location_names(text: str) -> tuple[list[int], list[str]]:
    """``"Nucleoplasm,Cytosol,Midbody"`` -> ``([0, 16], ["Midbody"])``: classes (order kept,
    duplicates dropped) and the names that are not one of the 19 classes."""
    classes: list[int] = []
    unknown: list[str] = []
    for name in str(text).split(","):
        name = name.strip()
        if not name:
            continue
        idx = _BY_FOLDED_NAME.get(name.casefold())
        if idx is None:
            unknown.append(name)
        elif idx not in classes:
            classes.append(idx)
    return classes, unknown


def parse_class(token: str | int) -> int:
    """A class given by index (``"11"``) or by name (``"Mitotic spindle"``, ``"Vesicles"``) -> index."""
    text = str(token).strip()
    if text.isdigit():
        return check_label(int(text))
    idx = _BY_FOLDED_NAME.get(text.casefold())
    if idx is None:
        raise LabelError(f"unknown class {text!r}; give an index 0-18 or a name, e.g. 11 or 'Mitotic spindle'")
    return idx


def image_id_from_url(prefix: str) -> str:
    """``https://images.proteinatlas.org/10580/1758_B1_1`` -> ``10580_1758_B1_1`` (last two path parts)."""
    parts = [p for p in urllib.parse.urlsplit(prefix.strip()).path.split("/") if p]
    if not parts:
        raise ValueError(f"Image {prefix!r} has no path; expected a URL prefix like "
                         "https://images.proteinatlas.org/10580/1758_B1_1")
    image_id = "_".join(parts[-2:])
    check_image_id(image_id, f"Image {prefix!r}")  # it names the files written
    return image_id


def channel_url(prefix: str, channel: str, base_url: str | None = None) -> str:
    """The URL of one channel file, ``<prefix>_<channel>.tif.gz``; ``base_url`` replaces the
    prefix's scheme and host (a mirror): ``http://mirror/hpa`` + ``/10580/1758_B1_1``."""
    prefix = prefix.strip()
    if base_url:
        path = urllib.parse.urlsplit(prefix).path
        prefix = base_url.rstrip("/") + "/" + path.lstrip("/")
    return f"{prefix}_{channel}.tif.gz"


@dataclass(frozen=True)
class PublicImage:
    """One row of the public table: a field of view to download."""

    image_id: str
    url_prefix: str
    labels: tuple[int, ...]
    cell_line: str = ""
    in_trainset: bool = False


@dataclass
class TableReport:
    """What reading and filtering the table kept and dropped, and why."""

    path: Path
    rows: int = 0
    unknown_names: Counter = field(default_factory=Counter)  # name -> rows it occurs in
    from_label_idx: int = 0  # rows labelled from Label_idx (their names gave no class)
    no_class: int = 0  # rows dropped: no name of the 19 classes and no Label_idx
    duplicates: int = 0  # rows dropped: their image id was listed before
    negative_dropped: int = 0  # rows whose "No staining" came with other locations: Negative left out
    dropped_by: dict[str, int] = field(default_factory=dict)  # filter -> rows it dropped
    selected: int = 0

    def summary(self) -> str:
        lines = [f"table {self.path}: {self.rows} rows, {self.selected} selected"]
        if self.from_label_idx:
            lines.append(f"  {self.from_label_idx} rows labelled from Label_idx (no known name in Label)")
        if self.no_class:
            lines.append(f"  {self.no_class} rows skipped: no location among the 19 classes")
        if self.duplicates:
            lines.append(f"  {self.duplicates} rows skipped: image id listed twice (first row kept)")
        if self.negative_dropped:
            lines.append(f"  {self.negative_dropped} rows name 'No staining' with other locations: "
                         "labelled with the others (Negative excludes every other class)")
        for name, n in self.dropped_by.items():
            lines.append(f"  {n} rows dropped by {name}")
        if self.unknown_names:
            top = ", ".join(f"{name} ({n})" for name, n in self.unknown_names.most_common(8))
            more = len(self.unknown_names) - 8
            lines.append(f"  {sum(self.unknown_names.values())} location names outside the 19 classes, "
                         f"ignored: {top}" + (f" and {more} more" if more > 0 else ""))
        return "\n".join(lines)


def _parse_bool(text: str, where: str) -> bool:
    value = str(text).strip().casefold()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{where}: in_trainset {text!r} is not True or False")


def _parse_label_idx(text: str, where: str) -> list[int]:
    """``"0|16"`` (also ``"0,16"``, ``"[0, 16]"``, ``"5.0"`` from a float column) -> ``[0, 16]``."""
    text = str(text).strip().strip("[]")
    if not text or text.casefold() == "nan":
        return []
    tokens = text.replace(",", "|").replace(" ", "|").split("|")
    cleaned = [t.removesuffix(".0") for t in tokens if t]
    return parse_labels("|".join(cleaned), where=f"{where} column Label_idx")


def read_public_table(path: str | os.PathLike) -> tuple[list[PublicImage], TableReport]:
    """Read ``kaggle_2021.tsv`` (comma- or tab-separated) -> its images with mapped labels.

    Raises FileNotFoundError naming the file, ValueError naming a missing column or a bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"public table {path} not found; it is the competition's kaggle_2021.tsv "
                                f"(columns {', '.join(TABLE_COLUMNS)})")
    report = TableReport(path)
    images: list[PublicImage] = []
    seen: set[str] = set()
    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = fh.readline()
        fh.seek(0)
        reader = csv.DictReader(fh, delimiter="\t" if "\t" in header else ",")
        columns = [c.strip() for c in reader.fieldnames or ()]
        reader.fieldnames = columns
        if "Image" not in columns:
            raise ValueError(f"{path}: missing column 'Image' (found: {', '.join(columns) or 'none'}); "
                             f"expected the columns of kaggle_2021.tsv: {', '.join(TABLE_COLUMNS)}")
        if "Label" not in columns and "Label_idx" not in columns:
            raise ValueError(f"{path}: missing column 'Label' (found: {', '.join(columns)}); "
                             "labels come from 'Label' (HPA location names) or 'Label_idx' (class indices)")
        for line_no, row in enumerate(reader, start=2):
            report.rows += 1
            where = f"{path} line {line_no}"
            prefix = (row.get("Image") or "").strip()
            if not prefix:
                raise ValueError(f"{where}: empty Image (URL prefix)")
            classes, unknown = map_location_names(row.get("Label") or "")
            report.unknown_names.update(unknown)
            if NEGATIVE in classes and len(classes) > 1:  # HPA's names allow it, the 19 classes do not
                classes = [c for c in classes if c != NEGATIVE]
                report.negative_dropped += 1
            if not classes and (row.get("Label_idx") or "").strip():
                classes = _parse_label_idx(row["Label_idx"], where)
                report.from_label_idx += bool(classes)
            if not classes:
                report.no_class += 1
                continue
            image_id = image_id_from_url(prefix)
            if image_id in seen:
                report.duplicates += 1
                continue
            seen.add(image_id)
            in_trainset = _parse_bool(row.get("in_trainset") or "", where) if "in_trainset" in columns else False
            images.append(PublicImage(image_id, prefix, tuple(classes), (row.get("Cellline") or "").strip(),
                                      in_trainset))
    report.selected = len(images)
    return images, report


def filter_images(images: Sequence[PublicImage], report: TableReport, *, labels: Iterable[int | str] | None = None,
                  cell_lines: Iterable[str] | None = None, exclude_train: bool = False,
                  columns: Iterable[str] | None = None) -> list[PublicImage]:
    """Keep the images with at least one of ``labels``, of one of ``cell_lines`` ('kaggle' = the 17
    competition lines), and (``exclude_train``) not already in the Kaggle training set.

    ``columns`` (the table's, when known) lets a filter whose column is missing fail naming it.
    """
    columns = set(columns) if columns is not None else None
    out = list(images)
    report.dropped_by = {}  # describes this selection

    def apply(name: str, keep: Callable[[PublicImage], bool], column: str | None) -> None:
        nonlocal out
        if column is not None and columns is not None and column not in columns:
            raise ValueError(f"{report.path}: {name} needs the column {column!r}, which the table lacks "
                             f"(found: {', '.join(sorted(columns))})")
        kept = [img for img in out if keep(img)]
        report.dropped_by[name] = len(out) - len(kept)
        out = kept

    if exclude_train:
        apply("--exclude-train", lambda img: not img.in_trainset, "in_trainset")
    if cell_lines:
        wanted = set()
        for item in cell_lines:
            for name in str(item).split(","):
                name = name.strip()
                wanted |= {c.casefold() for c in KAGGLE_CELL_LINES} if name.casefold() == "kaggle" else {name.casefold()}
        wanted.discard("")
        apply("--cell-lines", lambda img: img.cell_line.casefold() in wanted, "Cellline")
    if labels:
        classes = {parse_class(tok) for item in labels for tok in str(item).split(",") if tok.strip()}
        apply("--labels", lambda img: bool(classes & set(img.labels)), None)
    report.selected = len(out)
    return out


def table_columns(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = fh.readline()
    return [c.strip() for c in next(csv.reader([header], delimiter="\t" if "\t" in header else ","))]



# ---------------------------------------------------------------- merging label tables

@dataclass
class MergeReport:
    out: Path
    counts: Counter = field(default_factory=Counter)  # source -> rows written
    dropped_duplicates: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = ", ".join(f"{n} {source}" for source, n in self.counts.items())
        lines = [f"merged {sum(self.counts.values())} images ({parts}) -> {self.out}"]
        if self.dropped_duplicates:
            lines.append(f"{len(self.dropped_duplicates)} ids of the second table were already in the first; "
                         f"kept the first table's rows: {', '.join(self.dropped_duplicates[:5])}"
                         + (" ..." if len(self.dropped_duplicates) > 5 else ""))
        return "\n".join(lines)


def _read_source_table(path: Path, default_source: str) -> list[tuple[str, tuple[int, ...], str, str]]:
    """(ID, labels, source, Cellline) per row of an ID,Label table; ``source``/``Cellline`` columns if present."""
    table = read_label_table(path)  # checks the columns, the labels and repeated ids, naming file and line
    extra: dict[str, tuple[str, str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for row in table_rows(fh):
            extra[(row["ID"] or "").strip()] = ((row.get("source") or "").strip() or default_source,
                                               (row.get("Cellline") or "").strip())
    return [(image_id, labels, *extra[image_id]) for image_id, labels in table.items()]


def merge_tables(kaggle_csv: str | os.PathLike, public_csv: str | os.PathLike, out_csv: str | os.PathLike, *,
                 keep_first: bool = False) -> MergeReport:
    """Write one ID,Label,source,Cellline table: the Kaggle rows (source 'kaggle' unless the table
    has a ``source`` column), then the public ones (source from the table, else 'hpa_public').

    An id in both tables is an error listing them, unless ``keep_first`` keeps the first table's row.
    ``python -m hpa_scc split OUT`` reads the result.
    """
    for path in (kaggle_csv, public_csv):
        if not Path(path).is_file():
            raise FileNotFoundError(f"label table {path} not found")
        if Path(out_csv).resolve() == Path(path).resolve():
            raise ValueError(f"--out {out_csv} is one of the input tables; it would be overwritten: "
                             "write the merged table to a new file")
    first = _read_source_table(Path(kaggle_csv), KAGGLE_SOURCE)
    second = _read_source_table(Path(public_csv), SOURCE)
    ids = {row[0] for row in first}
    repeated = [row[0] for row in second if row[0] in ids]
    if repeated and not keep_first:
        raise ValueError(f"{len(repeated)} ids are in both {kaggle_csv} and {public_csv}, e.g. "
                         f"{', '.join(repeated[:5])}; one image would count twice. Remove them, or pass "
                         "--keep-first to keep the first table's rows")
    report = MergeReport(Path(out_csv), dropped_duplicates=repeated)
    with atomic_path(out_csv, ".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Label", "source", "Cellline"])
        for image_id, labels, source, cell_line in first + [r for r in second if r[0] not in ids]:
            writer.writerow([image_id, format_labels(labels), source, cell_line])
            report.counts[source] += 1
    return report
