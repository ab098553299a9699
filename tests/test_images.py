import gzip

import cv2
import numpy as np
import pytest
import tifffile

from conftest import write_channels
from hpa_scc.constants import CHANNELS
from hpa_scc.data.images import ImageReadError, find_images, read_channel, read_image, read_label_table, to_uint8

KAGGLE_ID = "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0"


def test_real_kaggle_image_shape_dtype_and_channel_order(hpa_sample):
    image = read_image(hpa_sample / "train", KAGGLE_ID)
    assert image.shape == (4, 2048, 2048) and image.dtype == np.uint8
    for index, channel in enumerate(CHANNELS):  # plane i is exactly the file of channel i
        raw = cv2.imread(str(hpa_sample / "train" / f"{KAGGLE_ID}_{channel}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(image[index], raw)
    # The README's measured means (R, G, B, Y) = 9, 4, 7, 7: channels are not swapped.
    np.testing.assert_allclose(image.reshape(4, -1).mean(axis=1), [9.4, 3.8, 6.6, 6.9], atol=0.1)


def test_real_public_hpa_image_is_1728(hpa_sample):
    image = read_image(hpa_sample / "train", "89_B5_1")
    assert image.shape == (4, 1728, 1728) and image.dtype == np.uint8
    rgb = read_image(hpa_sample / "train", "89_B5_1", channels="rgb", size=512)
    assert rgb.shape == (3, 512, 512)
    small = cv2.resize(image[1], (512, 512), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(rgb[1], small)


def test_real_label_table_and_folder_discovery(hpa_sample):
    records = find_images(hpa_sample / "train", hpa_sample / "labels.csv")
    assert [r.image_id for r in records][:1] == [KAGGLE_ID]
    assert records[0].labels == (8, 5, 0) and len(records) == 4
    scanned = find_images(hpa_sample / "train")  # no table: files are scanned, no labels
    assert sorted(r.image_id for r in scanned) == sorted(r.image_id for r in records)
    assert all(r.labels is None for r in scanned)


def test_kaggle_layout(kaggle_dir):
    records = find_images(kaggle_dir)
    assert [(r.image_id, r.labels) for r in records] == [("img0", (0, 5)), ("img1", (18,)), ("img2", (11, 16))]
    assert records[0].folder == kaggle_dir / "train"
    image = read_image(records[2].folder, "img2", size=(40, 60))
    assert image.shape == (4, 40, 60)


def test_16_bit_is_scaled_by_its_range_not_by_255(tmp_path):
    rng = np.random.default_rng(1)
    eight = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
    sixteen = eight.astype(np.uint16) * 257  # the same picture at 16 bit (255 -> 65535)
    write_channels(tmp_path / "a", "x", eight)
    write_channels(tmp_path / "b", "x", sixteen)
    assert cv2.imread(str(tmp_path / "b" / "x_red.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    np.testing.assert_array_equal(read_image(tmp_path / "b", "x"), read_image(tmp_path / "a", "x"))
    assert to_uint8(np.array([[0, 257, 32768, 65535]], np.uint16)).tolist() == [[0, 1, 128, 255]]


def test_tif_tif_gz_and_colour_jpg(tmp_path):
    plane = (np.arange(64 * 64).reshape(64, 64) % 4096 * 16).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a_red.tif", plane)
    tifffile.imwrite(tmp_path / "plain.tif", plane)
    (tmp_path / "a_green.tif.gz").write_bytes(gzip.compress((tmp_path / "plain.tif").read_bytes()))
    expected = to_uint8(plane)
    np.testing.assert_array_equal(read_channel(tmp_path / "a_red.tif"), expected)
    np.testing.assert_array_equal(read_channel(tmp_path / "a_green.tif.gz"), expected)
    # Public HPA JPEGs are coloured copies: the yellow one is red + green. Its signal is the max.
    gray = np.tile(np.linspace(0, 250, 64, dtype=np.uint8), (64, 1))
    bgr = np.stack([np.zeros_like(gray), gray, gray], axis=2)  # yellow = R + G
    cv2.imwrite(str(tmp_path / "a_yellow.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 100])
    got = read_channel(tmp_path / "a_yellow.jpg")
    assert got.shape == (64, 64) and np.abs(got.astype(int) - gray).max() <= 3


def test_missing_channel_names_the_file(kaggle_dir):
    (kaggle_dir / "train" / "img1_yellow.png").unlink()
    with pytest.raises(ImageReadError) as err:
        read_image(kaggle_dir / "train", "img1")
    assert "img1_yellow.png" in str(err.value) and "missing channel" in str(err.value)


def test_corrupt_png_names_the_file(kaggle_dir):
    path = kaggle_dir / "train" / "img0_green.png"
    path.write_bytes(path.read_bytes()[:100])  # truncated download
    with pytest.raises(ImageReadError) as err:
        read_image(kaggle_dir / "train", "img0")
    assert str(path) in str(err.value) and "corrupt" in str(err.value)


def test_wrong_bit_depth_and_mismatched_sizes(tmp_path):
    tifffile.imwrite(tmp_path / "a_red.tif", np.full((8, 8), 70000, np.int32))
    with pytest.raises(ImageReadError, match=r"a_red.tif: unsupported pixel type int32"):
        read_channel(tmp_path / "a_red.tif")
    planes = np.zeros((4, 32, 32), np.uint8)
    write_channels(tmp_path, "b", planes)
    cv2.imwrite(str(tmp_path / "b_blue.png"), np.zeros((16, 32), np.uint8))
    with pytest.raises(ImageReadError, match=r"b_blue.png is 32x16 but b_red.png is 32x32"):
        read_image(tmp_path, "b")


def test_bad_label_table_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("ID,Label\na,0|1\nb,0|25\n")
    with pytest.raises(ValueError, match=r"unknown label 25 in .*train.csv line 3 \(ID b\)"):
        read_label_table(path)
    path.write_text("Id,Target\na,0\n")
    with pytest.raises(ValueError, match="missing column"):
        read_label_table(path)


@pytest.mark.parametrize("header", ["\ufeffID,Label", "ID , Label", "\ufeff ID ,Label "])
def test_a_table_as_spreadsheets_write_it(tmp_path, header):
    """A UTF-8 byte-order mark and spaces around the header's names (Excel, LibreOffice)."""
    path = tmp_path / "train.csv"
    path.write_text(f"{header}\na,0|1\nb,18\n", encoding="utf-8")
    assert read_label_table(path) == {"a": (0, 1), "b": (18,)}


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no HPA images"):
        find_images(tmp_path)


def test_a_multi_page_tiff_is_not_read_as_one_channel(tmp_path):
    stack = np.random.default_rng(0).integers(0, 65535, (4, 32, 48), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a_red.tif", stack, photometric="minisblack")  # four pages, as a microscope exports a stack
    with pytest.raises(ImageReadError, match=r"a_red.tif holds 4 planes of 32x48 \(a multi-page TIFF"):
        read_channel(tmp_path / "a_red.tif")
    colour = np.zeros((32, 48, 3), np.uint8)
    colour[..., 1] = 200
    tifffile.imwrite(tmp_path / "b_green.tif", colour)  # a coloured copy of one channel is still read
    assert read_channel(tmp_path / "b_green.tif").shape == (32, 48)
