"""The per-image steps' process pool (``hpa_scc.utils.pool.run_pool``): its cost per job, against
the shutdown it replaced (``with Pool(...)``, which ends in ``Pool.terminate`` and can hang when a
worker is killed holding the result queue's lock; CPython issues 96995, 78178).

    .venv/bin/python bench/pool.py [--jobs 5000] [--workers 2] [--repeats 3]

Both run the same no-op job over the same items, side by side, pool start included, so the figure
is the pool's own overhead per job (the stop-event check and close + join): compare it with the
tens to hundreds of milliseconds an image's job takes in cache, segment, prepare or predict.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import time

from hpa_scc.utils import pool


def job(x: int) -> int:
    return x


def terminated_pool(items: list[int], workers: int):
    """The code before the change: the context manager's exit terminates the workers."""
    with mp.get_context("spawn").Pool(workers, initializer=pool._start_worker, initargs=(None, ())) as p:
        yield from p.imap_unordered(functools.partial(pool._run_job, job), items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    items = list(range(args.jobs))
    runs = {"run_pool (stop event, close + join)": lambda: list(pool.run_pool(job, items, workers=args.workers,
                                                                               progress=False)),
            "with Pool (terminate, before)": lambda: list(terminated_pool(items, args.workers))}
    best = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            assert sorted(run()) == items
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    for name, seconds in best.items():
        print(f"{name:<38} {args.jobs} jobs, {args.workers} workers: {seconds:.2f} s, "
              f"{seconds / args.jobs * 1e6:.0f} us per job (best of {args.repeats})")
    new, old = best.values()
    print(f"ratio run_pool / before: {new / old:.2f}")


if __name__ == "__main__":
    main()
