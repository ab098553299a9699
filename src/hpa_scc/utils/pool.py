"""The one process pool of the per-image steps (cache, segment, prepare, predict, synth) and
their failure log.

Per-process state comes from the ``initializer`` a step passes (``single_threaded_opencv``, or
``segment.folder.init_worker`` for the steps that segment); this module only runs jobs and writes
``failures.csv``.
"""

from __future__ import annotations

import csv
import functools
import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from hpa_scc.utils.fileio import atomic_path


def single_threaded_opencv() -> None:
    """Pool initializer: one image per process, so OpenCV's own threads would only oversubscribe."""
    import cv2

    cv2.setNumThreads(1)


_START_ERROR: list[BaseException] = []  # this worker's initializer error, if any
_STOP: list = []  # this worker's copy of the pool's stop event


def _start_worker(initializer: Callable | None, initargs: tuple, stop=None) -> None:
    # multiprocessing.Pool replaces a worker whose initializer raises, forever: a segmenter that
    # cannot load would hang the step. The error is kept and raised by the first job instead.
    if stop is not None:
        _STOP.append(stop)
    try:
        if initializer is not None:
            initializer(*initargs)
    except Exception as exc:
        _START_ERROR.append(exc)


def _run_job(job: Callable, item):
    if _START_ERROR:
        raise _START_ERROR[0]  # reaches the parent through imap: the step stops with this error
    if _STOP and _STOP[0].is_set():
        return None  # the step stopped: the jobs still queued end at once (the parent reads none of them)
    return job(item)


def run_pool(job: Callable, items: Sequence, *, workers: int = 1, initializer: Callable | None = None,
             initargs: tuple = (), desc: str = "", unit: str = "img", progress: bool = True,
             chunksize: int = 1) -> Iterator:
    """Yield ``job(item)`` for every item, unordered, in a pool of ``workers`` processes, or in
    this process when ``workers <= 1`` or there is a single item (``initializer`` runs here then).

    Processes are spawned, not forked: a child forked after OpenCV or torch started their thread
    pools can deadlock. ``job`` and ``initializer`` must be module-level functions. An error in
    ``initializer`` (or one ``job`` does not catch) stops the iteration with that error, in a
    worker as in this process.
    """
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress or not items)
    try:
        if workers > 1 and len(items) > 1:
            yield from _pooled(job, items, min(workers, len(items)), initializer, initargs, chunksize, bar)
        else:
            if initializer is not None:
                initializer(*initargs)
            for item in items:
                result = job(item)
                bar.update(1)
                yield result
    finally:
        bar.close()


def _pooled(job: Callable, items: Sequence, workers: int, initializer: Callable | None, initargs: tuple,
            chunksize: int, bar: tqdm) -> Iterator:
    """``run_pool``'s pool. It ends by close + join, never by ``Pool.terminate``: terminate kills
    workers that may be writing a result, and one killed holding the result queue's lock hangs the
    pool's shutdown for good (CPython issues 96995, 78178; seen as a hung test in this project's
    suite when every job raised at once). On an error (or the caller stopping early) the stop event
    makes the queued jobs return at once, so the join waits for the jobs in flight only.
    Ctrl-C (KeyboardInterrupt) still terminates: the user asked to stop now."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    pool = ctx.Pool(workers, initializer=_start_worker, initargs=(initializer, initargs, stop))
    try:
        for result in pool.imap_unordered(functools.partial(_run_job, job), items, chunksize=chunksize):
            bar.update(1)
            yield result
    except KeyboardInterrupt:
        pool.terminate()
        raise
    except BaseException:  # a job's error, or GeneratorExit when the caller stops iterating
        stop.set()
        pool.close()
        pool.join()
        raise
    pool.close()
    pool.join()


def write_failures(path: Path, rows: Iterable[Sequence[str]], header: Sequence[str] = ("ID", "error")) -> None:
    """``path`` (atomically): the header and the rows sorted, one failed input per row."""
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(header))
        writer.writerows(sorted(tuple(r) for r in rows))
