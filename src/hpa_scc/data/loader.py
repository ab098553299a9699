"""Whole-image datasets for pipelines of one's own: the cache, and the original-style PNGs.

Training in this project reads cells, not images (``data/instances.py`` over a prepared set);
these two serve a user who wants image-level samples (an image classifier over the cache made by
``python -m hpa_scc cache``), and ``bench/loader.py``, which measures one against the other.
``CachedImages``: each sample is one memory-mapped ``.npy`` read, no decoding and no resizing.
``PngImages``: the original implementation's way (decode four full-size PNGs with OpenCV and
resize, per sample), the baseline of that benchmark.

Both return ``(image, target)`` with ``image`` a uint8 tensor [C, S, S] and ``target`` a dict
with ``image_id`` and ``labels`` (float multi-hot [19]); normalisation happens on the device.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hpa_scc.data.cache import cache_fanout, cache_path, read_cache_index
from hpa_scc.constants import labels_to_multihot
from hpa_scc.data.images import ImageRecord, read_image


def multihot(labels: tuple[int, ...] | None) -> torch.Tensor:
    """Labels -> float [19]; all zeros when the image has no labels (test data)."""
    return torch.tensor(labels_to_multihot(labels or ()), dtype=torch.float32)


class CachedImages(Dataset):
    """Images from a cache folder: sample i -> (uint8 [C, S, S], {"image_id", "labels"})."""

    def __init__(self, cache_dir: str | os.PathLike, image_ids: list[str] | None = None):
        self.cache_dir = Path(cache_dir)
        entries = {e.image_id: e for e in read_cache_index(self.cache_dir)}
        if image_ids is not None:
            missing = [i for i in image_ids if i not in entries]
            if missing:
                raise KeyError(f"{len(missing)} image(s) not in cache {self.cache_dir}, e.g. {missing[:3]}; "
                               "re-run 'python -m hpa_scc cache' over the data folder")
            entries = {i: entries[i] for i in image_ids}
        self.entries = list(entries.values())
        self.fanout = cache_fanout(self.cache_dir)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        entry = self.entries[index]
        path = cache_path(self.cache_dir, entry.image_id, self.fanout)
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot read cached image {path} ({entry.image_id}): {exc}; "
                          "delete it and re-run 'python -m hpa_scc cache' to rebuild it") from None
        image = torch.from_numpy(np.array(array))  # one copy out of the page cache
        return image, {"image_id": entry.image_id, "labels": multihot(entry.labels)}


class PngImages(Dataset):
    """Original-style loader: per sample, decode the four full-size channel files and resize."""

    def __init__(self, records: list[ImageRecord], size: int, channels: str = "rgby"):
        self.records, self.size, self.channels = records, size, channels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        rec = self.records[index]
        image = read_image(rec.folder, rec.image_id, size=self.size, channels=self.channels)
        return torch.from_numpy(image), {"image_id": rec.image_id, "labels": multihot(rec.labels)}


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack same-size images into [B, C, S, S]; keep targets as a list of dicts."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)
