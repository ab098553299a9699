"""download-public and merge-tables against a real HTTP server on 127.0.0.1, started here.

The server serves generated ``.tif.gz`` channels and misbehaves on chosen paths: a 404, a
response shorter than its Content-Length, a gzip cut in half with a matching length, and a
response slower than the client's timeout on its first request only. It counts requests per
path, so retries and resumes are asserted by counting. No test opens a connection anywhere else:
an autouse guard fails any connection to another host.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from hpa_scc.cli import main
from hpa_scc.constants import CHANNELS, CLASS_NAMES
from hpa_scc.data.images import find_images, read_image, resize, to_uint8
from hpa_scc.data.cache import cache_path
from hpa_scc.data.public import DownloadOptions, channel_png, download_public
from hpa_scc.data.public_table import (HPA_LOCATION_TO_CLASS, KAGGLE_CELL_LINES, channel_url, filter_images,
                                      image_id_from_url, map_location_names, merge_tables, read_public_table)

FAST = DownloadOptions(timeout_s=0.5, retries=2, backoff_s=0.01)  # 3 attempts, millisecond backoff


# ---------------------------------------------------------------- the fake HPA image server

class FakeHPA:
    """What the server holds: files by URL path, misbehaviour by path, request counts by path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.kind: dict[str, str] = {}  # path -> "404" | "short" | "cut_gzip" | "slow_once"
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        self.slow_s = 1.5  # longer than FAST.timeout_s
        self.delay_s = 0.0  # added to every response (to kill a run half-way)
        self.url = ""

    def count(self, prefix: str) -> int:
        """Requests made so far for paths starting with ``prefix``."""
        with self.lock:
            return sum(n for path, n in self.requests.items() if path.startswith(prefix))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        hpa: FakeHPA = self.server.hpa
        with hpa.lock:
            hpa.requests[self.path] += 1
            nth = hpa.requests[self.path]
        kind, body = hpa.kind.get(self.path), hpa.files.get(self.path)
        try:
            if hpa.delay_s:
                time.sleep(hpa.delay_s)
            if body is None or kind == "404":
                self.send_error(404, "Not Found")
                return
            if kind == "slow_once" and nth == 1:
                time.sleep(hpa.slow_s)
            length = len(body)
            if kind == "cut_gzip":
                body = body[: len(body) // 2]
                length = len(body)  # the length matches: only the gzip check can tell
            elif kind == "short":
                body = body[: len(body) // 2]  # Content-Length promises twice as much
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): expected for the slow path

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hpa():
    state = FakeHPA()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.hpa = state
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def only_localhost(monkeypatch):
    """Fail any connection (urllib goes through socket.create_connection) to a host but 127.0.0.1."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # straight to 127.0.0.1, never through a proxy
    real = socket.create_connection
    refused: list = []

    def guarded(address, *args, **kwargs):
        if address[0] != "127.0.0.1":
            refused.append(address)
            raise ConnectionRefusedError(f"test guard: no connection to {address} allowed")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    yield
    assert not refused, f"a test tried to reach {refused}"


def tif_gz(plane: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, plane)
    return gzip.compress(buf.getvalue())


def planes_for(seed: int, size: int = 40) -> np.ndarray:
    """uint16 [4, size, size] over the whole 16-bit range (values > 255 catch a /255 bug)."""
    return np.random.default_rng(seed).integers(0, 65536, (4, size, size), dtype=np.uint16)


def add_image(hpa: FakeHPA, image_path: str, seed: int, kinds: dict[str, str] | None = None) -> np.ndarray:
    """Serve ``<image_path>_<color>.tif.gz`` for the four colours; returns the planes."""
    planes = planes_for(seed)
    for channel, plane in zip(CHANNELS, planes, strict=True):
        path = f"{image_path}_{channel}.tif.gz"
        hpa.files[path] = tif_gz(plane)
        if kinds and channel in kinds:
            hpa.kind[path] = kinds[channel]
    return planes


def write_table(path: Path, rows: list[tuple[str, str, str, str, str]], sep: str = ",") -> Path:
    """Rows of (Image, Label, Cellline, in_trainset, Label_idx), as kaggle_2021.tsv has them."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter=sep)
        writer.writerow(["Image", "Label", "Cellline", "in_trainset", "Label_idx"])
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def read_png(out: Path, image_id: str, channel: str) -> np.ndarray:
    return cv2.imread(str(channel_png(out, image_id, channel)), cv2.IMREAD_UNCHANGED)


@pytest.fixture
def mixed(hpa, tmp_path):
    """A table of 3 good images (one slow on its first request), 3 broken ones and 2 unusable rows."""
    images = {
        "good_a": ("/10580/1758_B1_1", {}, "Nucleoplasm,Cytosol", "U-2 OS"),
        "good_b": ("/10580/1758_B2_1", {}, "Focal adhesion sites", "A549"),
        "slow": ("/20001/77_C3_2", {"red": "slow_once"}, "Centriolar satellite,No staining", "HeLa"),
        "missing": ("/30002/88_D4_1", {"green": "404"}, "Mitochondria", "U-2 OS"),
        "short": ("/30003/89_E5_1", {"yellow": "short"}, "Lysosomes", "U-2 OS"),
        "cut": ("/30004/90_F6_1", {"blue": "cut_gzip"}, "Cell Junctions", "U-2 OS"),
    }
    planes, rows = {}, []
    for seed, (name, (path, kinds, label, line)) in enumerate(images.items()):
        planes[name] = add_image(hpa, path, seed, kinds)
        rows.append((hpa.url + path, label, line, "False", ""))
    rows.append((hpa.url + "/40000/91_G7_1", "Midbody,Cytokinetic bridge", "U-2 OS", "False", ""))  # no class
    rows.append((hpa.url + "/40000/92_H8_1", "Midbody", "U-2 OS", "False", "11"))  # Label_idx fallback, no files
    return write_table(tmp_path / "kaggle_2021.tsv", rows), images, planes


# ---------------------------------------------------------------- download, failures, resume

def test_download_mixed_table(hpa, mixed, tmp_path):
    table, images, planes = mixed
    out = tmp_path / "public"
    report = download_public(table, out, options=FAST, workers=3, progress=False)

    ids = {name: image_id_from_url(hpa.url + path) for name, (path, *_) in images.items()}
    assert ids["good_a"] == "10580_1758_B1_1"
    for name in ("good_a", "good_b", "slow"):  # every good file arrives intact, 16-bit kept
        for c, channel in enumerate(CHANNELS):
            png = read_png(out, ids[name], channel)
            assert png.dtype == np.uint16
            np.testing.assert_array_equal(png, planes[name][c])

    # Retries: the slow path timed out once, then succeeded; broken ones were tried 3 times; a 404 once.
    path = {name: p for name, (p, *_) in images.items()}
    assert hpa.requests[path["slow"] + "_red.tif.gz"] == 2
    assert hpa.requests[path["short"] + "_yellow.tif.gz"] == 3
    assert hpa.requests[path["cut"] + "_blue.tif.gz"] == 3
    assert hpa.requests[path["missing"] + "_green.tif.gz"] == 1
    assert hpa.count(path["missing"]) == 2  # red arrived, green 404: blue and yellow never asked

    failures = {r["ID"]: r for r in read_csv(out / "failures.csv")}
    assert set(failures) == {ids["missing"], ids["short"], ids["cut"], "40000_92_H8_1"}
    assert "HTTP 404" in failures[ids["missing"]]["reason"]
    assert failures[ids["missing"]]["url"] == hpa.url + path["missing"] + "_green.tif.gz"
    assert "truncated" in failures[ids["short"]]["reason"] and "3 attempts" in failures[ids["short"]]["reason"]
    assert "gzip" in failures[ids["cut"]]["reason"]
    assert {i: url for i, url, _ in report.failures}[ids["cut"]].endswith("_blue.tif.gz")

    rows = read_csv(out / "train.csv")
    assert [(r["ID"], r["Label"], r["source"], r["Cellline"]) for r in rows] == [
        (ids["good_a"], "0|16", "hpa_public", "U-2 OS"),
        (ids["good_b"], "9", "hpa_public", "A549"),
        (ids["slow"], "12", "hpa_public", "HeLa"),  # "Centriolar satellite,No staining": Negative left out
    ]
    assert report.table.no_class == 1 and report.table.from_label_idx == 1 and report.table.negative_dropped == 1
    assert report.table.unknown_names == Counter({"Midbody": 2, "Cytokinetic bridge": 1})
    assert (report.downloaded, report.skipped_existing, report.complete) == (3, 0, 3)
    assert "Midbody (2)" in report.summary() and "failures.csv" in report.summary()
    assert not [p for p in (out / "train").iterdir() if p.name.startswith(".")]  # no temporary files left

    # Second run: finished images make no request; the failed ones are retried.
    before = {name: hpa.count(p) for name, p in path.items()}
    again = download_public(table, out, options=FAST, workers=3, progress=False)
    for name in ("good_a", "good_b", "slow"):
        assert hpa.count(path[name]) == before[name]
    assert hpa.requests[path["missing"] + "_red.tif.gz"] == 1  # written the first time: not fetched again
    assert hpa.requests[path["missing"] + "_green.tif.gz"] == 2
    assert hpa.count(path["short"]) > before["short"]
    assert (again.downloaded, again.skipped_existing, len(again.failures)) == (0, 3, 4)

    # The folder is a DATA_DIR in the Kaggle layout.
    records = find_images(out)
    assert [(r.image_id, r.labels) for r in records] == [(ids["good_a"], (0, 16)), (ids["good_b"], (9,)),
                                                         (ids["slow"], (12,))]
    np.testing.assert_array_equal(read_image(records[0].folder, ids["good_a"]), to_uint8(planes["good_a"]))


def test_eight_bit_resized_and_settings_kept(hpa, tmp_path):
    planes = add_image(hpa, "/1/2_A1_1", 7)
    table = write_table(tmp_path / "t.csv", [(hpa.url + "/1/2_A1_1", "Golgi apparatus", "A549", "False", "")])
    out = tmp_path / "small"
    options = DownloadOptions(bits="8", size=24, timeout_s=2, retries=0, backoff_s=0)
    assert download_public(table, out, options=options, progress=False).downloaded == 1
    for c, channel in enumerate(CHANNELS):
        png = read_png(out, "1_2_A1_1", channel)
        assert png.dtype == np.uint8 and png.shape == (24, 24)
        np.testing.assert_array_equal(png, to_uint8(resize(planes[c], 24)))
    with pytest.raises(ValueError, match="download.json|were made|was made"):
        download_public(table, out, options=DownloadOptions(), progress=False)  # 16-bit into an 8-bit folder


def test_interrupted_run_resumes_without_refetching(hpa, tmp_path):
    rows, planes = [], {}
    for i in range(5):
        planes[i] = add_image(hpa, f"/7/{i}_A1_1", 20 + i)
        rows.append((f"{hpa.url}/7/{i}_A1_1", "Nucleoli", "HeLa", "False", ""))
    table, out = write_table(tmp_path / "t.csv", rows), tmp_path / "out"
    done: list[str] = []

    def stop_after_two(image_id, error):
        done.append(image_id)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_public(table, out, options=FAST, workers=1, progress=False, on_image=stop_after_two)
    assert [r["ID"] for r in read_csv(out / "train.csv")] == ["7_0_A1_1", "7_1_A1_1"]  # written on the way out
    assert hpa.count("/7/0_") == hpa.count("/7/1_") == 4
    assert hpa.count("/7/4_") == 0  # stopped: the queued images were cancelled (the 3rd may have begun)

    report = download_public(table, out, options=FAST, workers=2, progress=False)
    assert (report.skipped_existing, report.downloaded, report.failures) == (2, 3, [])
    assert hpa.count("/7/0_") == hpa.count("/7/1_") == 4  # finished images: no request
    assert max(hpa.requests.values()) <= 2 and sum(hpa.requests.values()) <= 21  # at most the one in flight again
    for i in range(5):
        np.testing.assert_array_equal(read_png(out, f"7_{i}_A1_1", "yellow"), planes[i][3])


def test_killed_process_resumes(hpa, tmp_path):
    """SIGKILL a real `download-public` half-way; the next run fetches only the channels not written."""
    rows = []
    for i in range(6):
        add_image(hpa, f"/8/{i}_B1_1", 40 + i)
        rows.append((f"{hpa.url}/8/{i}_B1_1", "Nucleoplasm", "HeLa", "False", ""))
    table, out = write_table(tmp_path / "t.csv", rows), tmp_path / "out"
    hpa.delay_s = 0.05
    proc = subprocess.Popen([sys.executable, "-m", "hpa_scc", "download-public", str(table), str(out), "-q",
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20

    def written() -> set[str]:  # finished PNGs, not the temporary files of a write in progress
        return {p.name for p in out.glob("train/*.png") if not p.name.startswith(".")}

    while len(written()) < 6 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = written()
    assert 6 <= len(written) < 24, proc.stderr.read()
    assert not (out / "train.csv").exists()  # killed: no table written, the files are the truth
    hpa.delay_s = 0.0
    before = Counter(hpa.requests)
    report = download_public(table, out, options=FAST, workers=2, progress=False)
    assert report.failures == [] and report.complete == 6
    for i in range(6):
        for channel in CHANNELS:
            path = f"/8/{i}_B1_1_{channel}.tif.gz"
            refetched = hpa.requests[path] - before[path]
            assert refetched == (0 if f"8_{i}_B1_1_{channel}.png" in written else 1), path


def test_base_url_replaces_the_host(hpa, tmp_path):
    planes = add_image(hpa, "/mirror/hpa/10580/1758_B1_1", 3)
    table = write_table(tmp_path / "t.csv", [("https://images.proteinatlas.org/10580/1758_B1_1", "Vesicles",
                                              "A549", "False", "")])
    options = DownloadOptions(timeout_s=2, retries=0, base_url=hpa.url + "/mirror/hpa/")
    report = download_public(table, tmp_path / "out", options=options, progress=False)
    assert report.failures == [] and report.downloaded == 1  # the guard refuses images.proteinatlas.org
    np.testing.assert_array_equal(read_png(tmp_path / "out", "10580_1758_B1_1", "blue"), planes[2])
    assert channel_url("https://images.proteinatlas.org/1/2_A1_1", "red", "http://m:8/x") == "http://m:8/x/1/2_A1_1_red.tif.gz"
    assert channel_url("https://images.proteinatlas.org/1/2_A1_1", "red") == \
        "https://images.proteinatlas.org/1/2_A1_1_red.tif.gz"


# ---------------------------------------------------------------- mapping, table, filters

def test_special_location_names_map_to_their_class():
    special = {"Focal adhesion sites": "Actin filaments", "Centriolar satellite": "Centrosome",
               "Cell Junctions": "Plasma membrane", "Peroxisomes": "Vesicles and punctate cytosolic patterns",
               "Endosomes": "Vesicles and punctate cytosolic patterns", "Lysosomes": "Vesicles and punctate "
               "cytosolic patterns", "Lipid droplets": "Vesicles and punctate cytosolic patterns",
               "Cytoplasmic bodies": "Vesicles and punctate cytosolic patterns", "No staining": "Negative",
               "Vesicles": "Vesicles and punctate cytosolic patterns"}
    for name, cls in special.items():
        assert map_location_names(name) == ([CLASS_NAMES.index(cls)], []), name
    for idx, name in enumerate(CLASS_NAMES):  # the rest by name
        assert HPA_LOCATION_TO_CLASS[name] == idx and map_location_names(name) == ([idx], [])
    assert map_location_names("nucleoplasm, CYTOSOL,Nucleoplasm") == ([0, 16], [])  # case, spaces, repeats
    assert map_location_names("Midbody,Lysosomes,Rods & Rings") == ([17], ["Midbody", "Rods & Rings"])
    assert map_location_names("") == ([], [])


def test_table_reading_counts_and_falls_back(tmp_path):
    rows = [("https://h/1/1_A1_1", "Nucleoli,Midbody", "U-2 OS", "True", "2"),
            ("https://h/1/2_A1_1", "Midbody", "A549", "False", ""),  # no class: skipped
            ("https://h/1/3_A1_1", "Kinetochore", "A549", "false", "11|15"),  # names unknown: Label_idx used
            ("https://h/1/1_A1_1", "Cytosol", "HeLa", "False", ""),  # repeated id: first row kept
            ("https://h/2/4_A1_1", "Nuclear speckles", "SiHa", "False", "4")]
    for sep in (",", "\t"):
        images, report = read_public_table(write_table(tmp_path / f"t{ord(sep)}.tsv", rows, sep))
        assert [(i.image_id, i.labels, i.cell_line, i.in_trainset) for i in images] == [
            ("1_1_A1_1", (2,), "U-2 OS", True), ("1_3_A1_1", (11, 15), "A549", False),
            ("2_4_A1_1", (4,), "SiHa", False)]
        assert (report.rows, report.no_class, report.from_label_idx, report.duplicates) == (5, 1, 1, 1)
        assert report.unknown_names == Counter({"Midbody": 2, "Kinetochore": 1})


def test_filters(tmp_path):
    rows = [("https://h/1/1_A1_1", "Mitotic spindle", "U-2 OS", "True", ""),
            ("https://h/1/2_A1_1", "Aggresome,Cytosol", "A549", "False", ""),
            ("https://h/1/3_A1_1", "Cytosol", "HEK 293", "False", ""),
            ("https://h/1/4_A1_1", "Nucleoplasm", "RT4", "False", ""),
            ("https://h/1/5_A1_1", "Mitotic spindle", "SiHa", "False", "")]
    images, report = read_public_table(write_table(tmp_path / "t.csv", rows))

    def ids(**kw):
        return [i.image_id.split("_")[1] for i in filter_images(images, report, **kw)]

    assert ids(labels=["11", "Aggresome"]) == ["1", "2", "5"]
    assert ids(labels=["mitotic spindle"], exclude_train=True) == ["5"]
    assert ids(cell_lines=["HEK 293", "a549"]) == ["2", "3"]
    assert ids(cell_lines=["U-2 OS,SiHa"]) == ["1", "5"]
    assert ids(cell_lines=["kaggle"]) == ["1", "2", "3", "5"] and "RT4" not in KAGGLE_CELL_LINES
    assert ids(exclude_train=True) == ["2", "3", "4", "5"]
    assert report.dropped_by == {"--exclude-train": 1} and report.selected == 4
    with pytest.raises(ValueError, match="unknown class 'Midbody'"):
        filter_images(images, report, labels=["Midbody"])
    with pytest.raises(ValueError, match="'Cellline'"):
        filter_images(images, report, cell_lines=["A549"], columns=["Image", "Label"])


def test_cli_filters_and_dry_run(hpa, tmp_path, capsys):
    rows = [(hpa.url + "/1/1_A1_1", "Mitotic spindle", "U-2 OS", "True", ""),
            (hpa.url + "/1/2_A1_1", "Aggresome", "RT4", "False", ""),
            (hpa.url + "/1/3_A1_1", "Mitotic spindle", "SiHa", "False", "")]
    for i in (1, 2, 3):
        add_image(hpa, f"/1/{i}_A1_1", i)
    table, out = write_table(tmp_path / "t.csv", rows), tmp_path / "out"
    args = ["download-public", str(table), str(out), "-q", "--cell-lines", "kaggle", "--exclude-train"]
    assert main([*args, "--dry-run"]) == 0
    assert "3 rows, 1 selected" in capsys.readouterr().out and sum(hpa.requests.values()) == 0
    assert not out.exists()
    assert main([*args, "--labels", "11", "15", "--workers", "2"]) == 0
    assert [r["ID"] for r in read_csv(out / "train.csv")] == ["1_3_A1_1"]
    assert hpa.count("/1/3_") == 4 and sum(hpa.requests.values()) == 4


# ---------------------------------------------------------------- CLI errors and exit codes

def test_cli_errors_name_the_file_and_the_column(tmp_path, capsys):
    missing = tmp_path / "nope.tsv"
    assert main(["download-public", str(missing), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: public table") and str(missing) in err
    bad = tmp_path / "bad.tsv"
    bad.write_text("URL,Label\nhttps://h/1/1_A1_1,Cytosol\n")
    assert main(["download-public", str(bad), str(tmp_path / "o")]) == 1
    assert "missing column 'Image'" in capsys.readouterr().err
    no_line = tmp_path / "noline.tsv"
    no_line.write_text("Image,Label\nhttps://h/1/1_A1_1,Cytosol\n")
    assert main(["download-public", str(no_line), str(tmp_path / "o"), "--exclude-train"]) == 1
    assert "'in_trainset'" in capsys.readouterr().err
    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    (kaggle / "train.csv").write_text("ID,Label\nk1,0\n")
    assert main(["download-public", str(no_line), str(kaggle)]) == 1  # never overwrites Kaggle's train.csv
    assert "was not written by download-public" in capsys.readouterr().err
    assert (kaggle / "train.csv").read_text() == "ID,Label\nk1,0\n"
    with pytest.raises(SystemExit) as exc:
        main(["download-public", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for words in ("Label_idx", "Focal adhesion", "failures.csv", "resume", "--base-url", "--exclude-train"):
        assert words in text


def test_cli_strict_exit_code(hpa, tmp_path, capsys):
    add_image(hpa, "/5/1_A1_1", 1)
    add_image(hpa, "/5/2_A1_1", 2, {"red": "404"})
    table = write_table(tmp_path / "t.csv", [(hpa.url + "/5/1_A1_1", "Cytosol", "HeLa", "False", ""),
                                             (hpa.url + "/5/2_A1_1", "Cytosol", "HeLa", "False", "")])
    args = ["download-public", str(table), str(tmp_path / "o"), "-q", "--retries", "0", "--timeout", "2"]
    assert main(args) == 0
    assert "1 images downloaded" in capsys.readouterr().out
    assert main([*args, "--strict"]) == 1
    assert "HTTP 404" in capsys.readouterr().out


# ---------------------------------------------------------------- merge-tables

def test_merge_tables_feeds_split(tmp_path, capsys):
    kaggle = tmp_path / "train.csv"
    kaggle.write_text("ID,Label\n" + "".join(f"k{i},{i % 18}|{(i * 5) % 18}\n" for i in range(30)) + "k30,13|13\n")
    public = tmp_path / "public.csv"
    public.write_text("ID,Label,source,Cellline,Image\n"
                      + "".join(f"1_{i}_A1_1,{(i * 3) % 19},hpa_public,HeLa,https://h/1/{i}_A1_1\n" for i in range(20)))
    merged = tmp_path / "merged.csv"
    assert main(["merge-tables", str(kaggle), str(public), "--out", str(merged)]) == 0
    assert "51 images (31 kaggle, 20 hpa_public)" in capsys.readouterr().out
    rows = read_csv(merged)
    assert list(rows[0]) == ["ID", "Label", "source", "Cellline"]
    assert rows[30] == {"ID": "k30", "Label": "13", "source": "kaggle", "Cellline": ""}
    assert rows[31] == {"ID": "1_0_A1_1", "Label": "0", "source": "hpa_public", "Cellline": "HeLa"}

    folds = tmp_path / "folds.csv"
    assert main(["split", str(merged), "--folds", "3", "--out", str(folds)]) == 0
    assert "51 images in 3 folds" in capsys.readouterr().out
    assert len(read_csv(folds)) == 51

    before = kaggle.read_text()
    with pytest.raises(ValueError, match="is one of the input tables; it would be overwritten"):
        merge_tables(kaggle, public, tmp_path / "." / "train.csv", keep_first=True)
    assert kaggle.read_text() == before

    public.write_text("ID,Label\nk3,5\nk4,6\nnew,7\n")  # two ids already in the Kaggle table
    assert main(["merge-tables", str(kaggle), str(public), "--out", str(merged)]) == 1
    err = capsys.readouterr().err
    assert "2 ids are in both" in err and "k3, k4" in err
    report = merge_tables(kaggle, public, merged, keep_first=True)
    assert report.dropped_duplicates == ["k3", "k4"] and report.counts == Counter({"kaggle": 31, "hpa_public": 1})
    assert "kept the first table's rows" in report.summary()
    assert main(["merge-tables", str(tmp_path / "none.csv"), str(public), "--out", str(merged)]) == 1
    assert "none.csv" in capsys.readouterr().err


def test_downloaded_folder_merges_and_caches(hpa, tmp_path, kaggle_dir):
    """download-public -> merge-tables with a Kaggle table -> split; and the folder caches as a DATA_DIR."""
    from hpa_scc.data.cache import build_cache

    for i in range(3):
        add_image(hpa, f"/9/{i}_A1_1", 60 + i)
    table = write_table(tmp_path / "t.csv", [(f"{hpa.url}/9/{i}_A1_1", "Cytosol,Nucleoli", "HeLa", "False", "")
                                             for i in range(3)])
    out = tmp_path / "public"
    download_public(table, out, options=FAST, progress=False)
    report = merge_tables(kaggle_dir / "train.csv", out / "train.csv", tmp_path / "merged.csv")
    assert report.counts == Counter({"kaggle": 3, "hpa_public": 3})
    cache = build_cache(out, tmp_path / "cache", size=16, progress=False)
    assert (cache.written, cache.failures) == (3, [])
    assert cache_path(tmp_path / "cache", "9_0_A1_1").is_file() and not (tmp_path / "cache" / "images" / "9_0_A1_1.npy").exists()


@pytest.mark.parametrize("size", [None, 32])
def test_a_rerun_checks_channel_sizes_as_a_first_run_does(hpa, tmp_path, size):
    """The first run writes red, then refuses a larger green; the rerun must not write that green
    beside the red and call the image complete (with --size the PNGs alone could not tell)."""
    path = "/50000/95_A1_1"
    add_image(hpa, path, seed=3)
    hpa.files[f"{path}_green.tif.gz"] = tif_gz(planes_for(4, size=48)[0])
    table = write_table(tmp_path / "t.tsv", [(hpa.url + path, "Nucleoplasm", "U-2 OS", "False", "")])
    options = DownloadOptions(**{**FAST.__dict__, "size": size})
    out = tmp_path / "public"
    for attempt in (1, 2):
        report = download_public(table, out, options=options, workers=1, progress=False)
        assert report.complete == 0 and len(report.failures) == 1, attempt
        assert "channel sizes differ: red 40x40, green 48x48" in report.failures[0][2], attempt
        assert not channel_png(out, "50000_95_A1_1", "green").exists()
        assert [r["ID"] for r in read_csv(out / "train.csv")] == []
