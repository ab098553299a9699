"""Bad inputs found by the probe of issue 27: each is refused or warned about, naming what and the fix.

download-public (a rerun's size check, every image failed), config values (nan/inf, ranges, YAML
errors, ``1e-3``), dim 16-bit and NaN channels, synth's summary in a bigger folder, binary masks
given to the precomputed segmenter.
"""

from __future__ import annotations

import gzip
import io
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from hpa_scc.config import ConfigError, load_config
from hpa_scc.constants import CHANNELS
from hpa_scc.data import images
from hpa_scc.data.images import ImageReadError, read_channel
from hpa_scc.data.public import DownloadOptions, channel_png, download_public
from hpa_scc.data.synth import format_summary, write_synth_set
from hpa_scc.segment.precomputed import PrecomputedSegmenter

FAST = DownloadOptions(timeout_s=2, retries=0, backoff_s=0.0)


# ---------------------------------------------------------------- download-public

def tif_gz(plane: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, plane)
    return gzip.compress(buf.getvalue())


class Files(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    """A local HTTP server of ``server.files`` {path: bytes}; ``server.url`` is its address."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    httpd.daemon_threads = True
    httpd.files = {}
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def write_table(path: Path, prefixes: list[str]) -> Path:
    path.write_text("Image,Label,Cellline,in_trainset,Label_idx\n"
                    + "".join(f"{p},Nucleoplasm,U-2 OS,False,\n" for p in prefixes))
    return path


@pytest.mark.parametrize("size", [None, 16])
def test_a_rerun_checks_a_refetched_channel_against_the_finished_ones(server, tmp_path, size):
    """A finished image loses its green PNG; the server now has green at another size. The rerun must
    refuse it as a first run would (with --size the PNGs cannot tell: the others are fetched again)."""
    path, image_id = "/10580/1758_B1_1", "10580_1758_B1_1"
    rng = np.random.default_rng(0)
    for channel in CHANNELS:
        server.files[f"{path}_{channel}.tif.gz"] = tif_gz(rng.integers(0, 256, (24, 24), dtype=np.uint8))
    table = write_table(tmp_path / "t.csv", [server.url + path])
    out = tmp_path / "public"
    options = DownloadOptions(**{**FAST.__dict__, "size": size})
    assert download_public(table, out, options=options, workers=1, progress=False).complete == 1

    channel_png(out, image_id, "green").unlink()
    server.files[f"{path}_green.tif.gz"] = tif_gz(rng.integers(0, 256, (8, 10), dtype=np.uint8))  # 10x8
    report = download_public(table, out, options=options, workers=1, progress=False)
    assert report.complete == 0 and len(report.failures) == 1
    reason = report.failures[0][2]
    assert "channel sizes differ" in reason and "green 10x8" in reason and "red 24x24" in reason
    assert f"{image_id}_red.png" in reason  # names the files already there
    assert not channel_png(out, image_id, "green").exists()
    assert (out / "train.csv").read_text().splitlines() == ["ID,Label,source,Cellline,Image"]


def test_every_image_failed_is_reported(server, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on: the server is down
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"
    table = write_table(tmp_path / "t.csv", [f"{down}/1/1_A1_1", f"{down}/1/2_A1_1"])
    report = download_public(table, tmp_path / "o", options=FAST, workers=2, progress=False)
    assert (report.downloaded, len(report.failures), report.all_failed) == (0, 2, True)
    assert "every image of this run failed (2)" in report.summary()

    for channel in CHANNELS:  # one image of two downloads: not every image failed
        server.files[f"/1/1_A1_1_{channel}.tif.gz"] = tif_gz(np.zeros((16, 16), np.uint8))
    table = write_table(tmp_path / "t2.csv", [f"{server.url}/1/1_A1_1", f"{server.url}/1/2_A1_1"])
    report = download_public(table, tmp_path / "o2", options=FAST, workers=2, progress=False)
    assert (report.downloaded, len(report.failures), report.all_failed) == (1, 1, False)
    # nothing left to do is no failure
    server.files.pop("/1/1_A1_1_red.tif.gz")
    table = write_table(tmp_path / "t3.csv", [f"{server.url}/1/1_A1_1"])
    report = download_public(table, tmp_path / "o2", options=FAST, workers=1, progress=False)
    assert (report.skipped_existing, report.all_failed) == (1, False)


# ---------------------------------------------------------------- config values

@pytest.mark.parametrize("override, message", [
    ("optim.lr=.inf", "optim.lr in override 'optim.lr=.inf': expected a finite number, got inf"),
    ("optim.lr=.nan", "optim.lr in override 'optim.lr=.nan': expected a finite number, got nan"),
    ("optim.lr=inf", "expected a finite number, got 'inf'"),
    ("optim.momentum=nan", "optim.momentum .*expected a finite number"),
    ("optim.clip_grad_norm=-.inf", "optim.clip_grad_norm .*expected a finite number"),
    ("model.box_score_thresh=.inf", "model.box_score_thresh .*expected a finite number"),
    ("model.pixel_mean=[0.5, .nan, 0.5, 0.5]", r"model.pixel_mean\[1\] .*expected a finite number"),
    ("optim.lr=abc", "optim.lr .*expected float, got 'abc'"),
    ("model.box_score_thresh=1.5", r"model.box_score_thresh must be in \[0, 1\], got 1.5"),
    ("model.feature_c=0", "model.feature_c must be > 0"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay must be >= 0"),
    ("model.pixel_std=[0.2, 0.2, 0, 0.2]", "model.pixel_std must be values > 0"),
    ("model.box_detections_per_img=0", "model.box_detections_per_img must be >= 1"),
    ("data.max_train_images=-3", "data.max_train_images must be >= 1"),
])
def test_non_finite_and_out_of_range_numbers_are_refused(override, message):
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(None, [override])
    assert "\n" not in str(exc.value)


def test_float_written_without_a_dot_reads_as_a_float(tmp_path):
    """YAML 1.1 reads 1e-3 as the string '1e-3'; a float key takes it as the number it means."""
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1e-3, weight_decay: 5e-5}\nmodel: {pixel_std: [2e-1, 0.2, 0.2, 0.2]}\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.model.pixel_std[0]) == (0.001, 5e-5, 0.2)
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 0.001
    path.write_text("optim: {lr: 1e+400}\n")  # reads as a string, parses to inf
    with pytest.raises(ConfigError, match="optim.lr in .*c.yaml: expected a finite number"):
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: 0.1\n  momentum: [0.9\n", r"c.yaml line \d+ column \d+: .*fix the YAML syntax"),
    ("optim: {lr: 0.1\ntrain: {max_epochs: 2}\n", r"c.yaml line 2 column \d+: .*fix the YAML syntax"),
    ("optim:\n  lr: !!python/object/apply:os.system ['true']\n",
     r"c.yaml line 2 column 7: could not determine a constructor for the tag .*python/object/apply.*refused"),
])
def test_yaml_errors_in_a_file_are_one_line_naming_file_line_and_column(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(path)
    assert "\n" not in str(exc.value)


def test_yaml_error_in_an_override_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'optim.lr=\[' line 1 column 11: .*fix the YAML syntax") as exc:
        load_config(None, ["optim.lr=["])
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="override .*optim.lr=!!python/name:os.system.*refused"):
        load_config(None, ["optim.lr=!!python/name:os.system"])


# ---------------------------------------------------------------- channel pixel values

@pytest.fixture
def fresh_dim_warnings(monkeypatch):
    """Forget which files were warned about, in this process, so each test sees its own warnings."""
    monkeypatch.setattr(images, "_dim_warned", set())


def test_dim_16bit_channel_warns_once_naming_the_file(tmp_path, caplog, fresh_dim_warnings):
    dim = tmp_path / "x_green.png"
    cv2.imwrite(str(dim), np.random.default_rng(0).integers(0, 256, (16, 16)).astype(np.uint16))  # 8-bit values
    bright = tmp_path / "x_red.png"
    cv2.imwrite(str(bright), np.full((16, 16), 40000, np.uint16))
    eight = tmp_path / "x_blue.png"
    cv2.imwrite(str(eight), np.full((16, 16), 100, np.uint8))
    with caplog.at_level(logging.WARNING, logger="hpa_scc.data.images"):
        for _ in range(3):
            for path in (dim, bright, eight):
                read_channel(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(dim) in warnings[0] and "16-bit" in warnings[0] and "8-bit PNG" in warnings[0]
    assert read_channel(dim).max() <= 1  # still scaled by the 16-bit range: warned, not changed


def test_dim_16bit_warnings_stop_after_a_few_files(tmp_path, caplog, fresh_dim_warnings):
    with caplog.at_level(logging.WARNING, logger="hpa_scc.data.images"):
        for i in range(images.DIM_WARNINGS + 5):
            path = tmp_path / f"{i}_red.png"
            cv2.imwrite(str(path), np.full((8, 8), 200, np.uint16))
            read_channel(path)
    assert len(caplog.records) == images.DIM_WARNINGS
    assert "further dim files are not reported" in caplog.records[-1].getMessage()


def test_nan_float_tiff_says_non_finite_naming_the_file(tmp_path):
    path = tmp_path / "x_red.tif"
    tifffile.imwrite(path, np.full((8, 8), np.nan, np.float32))
    with pytest.raises(ImageReadError, match=r"x_red.tif: 64 of 64 pixels are NaN or infinite") as exc:
        read_channel(path)
    assert "nan..nan" not in str(exc.value)


# ---------------------------------------------------------------- synth into a bigger folder

def test_synth_summary_describes_this_call_and_the_folder(tmp_path):
    out = tmp_path / "set"
    write_synth_set(out, 3, size=64, seed=9, progress=False)
    summary = write_synth_set(out, 2, size=64, seed=9, progress=False)
    assert (summary["requested"], summary["generated"], summary["skipped"], summary["images"]) == (2, 0, 2, 3)
    text = format_summary(summary)
    assert "images: 2 asked for, 0 written now" in text and "2 already there" in text
    assert "the folder holds 3 images" in text
    assert "folder holds" not in format_summary(write_synth_set(out, 3, size=64, seed=9, progress=False))


# ---------------------------------------------------------------- binary masks as precomputed labels

def two_blobs(fg: int) -> np.ndarray:
    mask = np.zeros((32, 32), np.uint8)
    mask[2:12, 2:12] = fg
    mask[18:30, 16:30] = fg
    return mask


@pytest.mark.parametrize("fg", [255, 1])
def test_binary_cell_mask_becomes_one_cell_per_piece(tmp_path, caplog, fg):
    cv2.imwrite(str(tmp_path / "a_cells.png"), two_blobs(fg))
    nuclei_mask = np.zeros((32, 32), np.uint8)
    nuclei_mask[5:9, 5:9] = fg
    nuclei_mask[22:26, 20:26] = fg
    cv2.imwrite(str(tmp_path / "a_nuclei.png"), nuclei_mask)
    image = np.zeros((4, 32, 32), np.uint8)
    with caplog.at_level(logging.WARNING, logger="hpa_scc.segment.precomputed"):
        nuclei, cells = PrecomputedSegmenter(tmp_path)(image, "a")
    assert int(cells.max()) == 2 and len(np.unique(cells)) == 3
    assert cells[5, 5] != cells[20, 20]
    assert nuclei[6, 6] == cells[6, 6] and nuclei[23, 23] == cells[23, 23] and nuclei[0, 0] == 0
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "a_cells.png" in text and "connected pieces" in text and "a_nuclei.png" in text


def test_a_label_image_is_not_taken_for_a_binary_mask(tmp_path, caplog):
    labels = two_blobs(1)
    labels[18:30, 16:30] = 2
    cv2.imwrite(str(tmp_path / "b_cells.png"), labels)
    one = np.zeros((32, 32), np.uint8)
    one[2:12, 2:12] = 255  # one piece: a single cell labelled 255 stays as it is
    cv2.imwrite(str(tmp_path / "c_cells.png"), one)
    image = np.zeros((4, 32, 32), np.uint8)
    with caplog.at_level(logging.WARNING, logger="hpa_scc.segment.precomputed"):
        _, cells = PrecomputedSegmenter(tmp_path)(image, "b")
        _, single = PrecomputedSegmenter(tmp_path)(image, "c")
    assert np.array_equal(cells, labels) and np.array_equal(single, one)
    assert not caplog.records
