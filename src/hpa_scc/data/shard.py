"""Split the per-image data steps (segment, prepare, cache) over the tasks of a SLURM job array.

    sbatch --array=0-15 --wrap "python -m hpa_scc prepare DATA_DIR OUT_DIR --size 512 --shard slurm"
    python -m hpa_scc prepare DATA_DIR OUT_DIR --size 512 --merge      # once every task has finished

    python -m hpa_scc prepare DATA_DIR OUT_DIR --shard 3/16             # the same, one task by hand

Shard I of N holds the images whose ``zlib.crc32(image id) % N == I``. A hash of the id, not
"every N-th image of the list", so the split depends on nothing but the id and N: neither the
order of train.csv nor the other images (adding images to the set never moves one to another
shard, so a rerun of a shard finds its finished images). Shards are balanced on average, not
exactly; with thousands of images per shard the difference is a few percent.

All shards write into the same OUT_DIR at the same time. Every per-image file is named by its
image id, and each shard writes its own logs, named ``<stem>-shard<I>of<N>.csv``; the merge
step gathers them into the files an unsharded run writes.
"""

from __future__ import annotations

import csv
import os
import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
Shard = tuple[int, int]  # (index I, count N), 0 <= I < N
_SHARD_TEXT = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_LOG_NAME = re.compile(r"-shard(\d+)of(\d+)\.csv$")


def check_shard(shard: Shard | None) -> Shard | None:
    """``shard`` itself if it is None or a valid (I, N); a ValueError otherwise."""
    if shard is None:
        return None
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count} is out of range: a shard is I/N with 0 <= I < N "
                         f"(shards 0/{max(count, 1)} to {max(count, 1) - 1}/{max(count, 1)})")
    return int(index), int(count)


def parse_shard(text: str | None) -> Shard | None:
    """``--shard I/N`` -> (I, N); ``slurm`` -> the job array task (see default_shard); None/"" -> None."""
    if text is None or not text.strip():
        return None
    if text.strip().lower() == "slurm":
        shard = default_shard()
        if shard is None:
            raise ValueError("--shard slurm: SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT are not set; "
                             "submit with 'sbatch --array=0-N' or give --shard I/N")
        return shard
    match = _SHARD_TEXT.match(text)
    if not match:
        raise ValueError(f"--shard {text!r}: expected I/N (shard I of N, 0 <= I < N), e.g. 0/4, or 'slurm'")
    return check_shard((int(match[1]), int(match[2])))


def default_shard(environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard of this SLURM job array task, or None outside a job array.

    I = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP and
    N = SLURM_ARRAY_TASK_COUNT, so ``--array=1-8`` and ``--array=0-14:2`` both give shards 0..7 of 8.
    """
    env = os.environ if environ is None else environ
    if not env.get("SLURM_ARRAY_TASK_ID") or not env.get("SLURM_ARRAY_TASK_COUNT"):
        return None
    task_id, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
    first, step = int(env.get("SLURM_ARRAY_TASK_MIN") or 0), int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
    offset = task_id - first
    if step < 1 or offset % step or not 0 <= offset // step < count:
        raise ValueError(f"SLURM array task {task_id} (min {first}, step {step}, count {count}) is not one of "
                         f"{count} evenly spaced tasks; use --array=0-{count - 1}, or give --shard I/N")
    return offset // step, count


def shard_of(image_id: str, count: int) -> int:
    """The shard (0..count-1) that holds ``image_id``: crc32 of its UTF-8 bytes, modulo ``count``."""
    return zlib.crc32(image_id.encode("utf-8")) % count


def select_shard(items: Iterable[T], shard: Shard | None) -> list[T]:
    """The items of shard (I, N), in their given order; all items when ``shard`` is None.

    An item is an image id or anything with an ``image_id`` attribute (an ImageRecord).
    """
    items = list(items)
    if check_shard(shard) is None:
        return items
    index, count = shard
    return [it for it in items if shard_of(getattr(it, "image_id", it), count) == index]


def shard_suffix(shard: Shard | None) -> str:
    """``-shard<I>of<N>`` for a shard's own files, "" for an unsharded run."""
    return "" if shard is None else f"-shard{shard[0]}of{shard[1]}"


def complete_shard_counts(folder: str | os.PathLike, stem: str, suffix: str) -> list[int]:
    """The counts N for which ``folder`` holds every part ``<stem>-shard<I>of<N><suffix>`` (I = 0..N-1),
    ascending: the job arrays whose parts can be merged (a part's own check is its reader's)."""
    pattern = re.compile(re.escape(stem) + r"-shard(\d+)of(\d+)" + re.escape(suffix) + "$")
    found: dict[int, set[int]] = {}
    for path in Path(folder).glob(f"{stem}-shard*of*{suffix}"):
        match = pattern.match(path.name)
        if match:
            found.setdefault(int(match[2]), set()).add(int(match[1]))
    return sorted(count for count, got in found.items() if got == set(range(count)))


def read_shard_failures(folder: str | os.PathLike, stem: str = "failures") -> tuple[dict[str, str], set[Shard]]:
    """Every ``<stem>-shard<I>of<N>.csv`` (ID,error) in ``folder`` -> ({image id: error}, shards seen)."""
    errors: dict[str, str] = {}
    seen: set[Shard] = set()
    for path in sorted(Path(folder).glob(f"{stem}-shard*of*.csv")):
        match = _LOG_NAME.search(path.name)
        if not match:
            continue
        seen.add((int(match[1]), int(match[2])))
        with open(path, newline="") as fh:
            errors.update((row["ID"], row["error"]) for row in csv.DictReader(fh))
    return errors, seen


def gather_shards(folder: str | os.PathLike, image_ids: Iterable[str] | None, done: Callable[[str], bool]
                  ) -> tuple[list[str], list[tuple[str, str]], set[Shard]]:
    """The merge step's sorting of a sharded run's images: (done ids, failures (id, error) sorted,
    shards seen). An image is done when ``done(id)``, failed when a shard's failure log names it;
    one that is neither stops the merge with a ValueError naming it and the shards to run again.
    ``image_ids`` None: the images the failure logs name."""
    logged, seen = read_shard_failures(folder)
    finished, failures, missing = [], [], []
    for image_id in sorted(logged) if image_ids is None else image_ids:
        if done(image_id):
            finished.append(image_id)
        elif image_id in logged:
            failures.append((image_id, logged[image_id]))
        else:
            missing.append(image_id)
    if missing:
        raise ValueError(missing_message(str(folder), missing, seen))
    return finished, sorted(failures), seen


def missing_message(what: str, missing: list[str], seen: set[Shard]) -> str:
    """Why a merge cannot go on: the unfinished image ids, and which shards to run again."""
    text = (f"cannot merge {what}: {len(missing)} image(s) have neither a result nor a line in a shard's "
            f"failure log, so a shard did not finish: {', '.join(missing[:20])}"
            f"{' ...' if len(missing) > 20 else ''}")
    counts = {n for _, n in seen}
    if len(counts) == 1:
        (count,) = counts
        rerun = sorted({shard_of(i, count) for i in missing} | (set(range(count)) - {i for i, _ in seen}))
        text += (f". Run shard(s) {', '.join(f'{i}/{count}' for i in rerun)} again (the same command with "
                 "--shard I/N; finished images are skipped), then merge again")
    return text
