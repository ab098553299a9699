"""The one process pool of the per-image steps and its failure log."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap

from hpa_scc.utils.pool import run_pool, write_failures

STATE: dict = {}


def _init(offset: int) -> None:
    STATE["offset"] = offset


def _job(x: int) -> tuple[int, int, int]:
    return x, x + STATE["offset"], os.getpid()


def test_run_pool_runs_the_initializer_in_this_process_or_in_every_worker():
    here = sorted(run_pool(_job, [3, 1, 2], workers=1, initializer=_init, initargs=(10,), progress=False))
    assert [(x, y) for x, y, _ in here] == [(1, 11), (2, 12), (3, 13)] and {p for *_, p in here} == {os.getpid()}
    spawned = sorted(run_pool(_job, list(range(6)), workers=2, initializer=_init, initargs=(100,), progress=False))
    assert [y for _, y, _ in spawned] == [100, 101, 102, 103, 104, 105]
    assert os.getpid() not in {p for *_, p in spawned}
    assert list(run_pool(_job, [], workers=4, progress=False)) == []


def test_write_failures_sorts_rows_under_the_header(tmp_path):
    write_failures(tmp_path / "failures.csv", {"b": "corrupt PNG", "a": "missing green"}.items())
    with open(tmp_path / "failures.csv", newline="") as fh:
        assert list(csv.reader(fh)) == [["ID", "error"], ["a", "missing green"], ["b", "corrupt PNG"]]
    write_failures(tmp_path / "dl.csv", [("x", "http://u", "404")], header=("ID", "url", "reason"))
    assert (tmp_path / "dl.csv").read_text().splitlines() == ["ID,url,reason", "x,http://u,404"]


def test_a_worker_that_cannot_start_stops_the_pool_with_its_error_instead_of_hanging(tmp_path):
    # multiprocessing.Pool alone respawns such a worker forever (predict with a segmenter that
    # cannot load hung); run in a subprocess so a regression fails on the timeout, not by hanging CI.
    script = tmp_path / "start_error.py"
    script.write_text(textwrap.dedent("""
        import faulthandler
        from hpa_scc.utils.pool import run_pool

        faulthandler.dump_traceback_later(90, exit=True)  # a hang: every thread's stack, before the timeout

        def init():
            raise FileNotFoundError("mask folder /nowhere does not exist")

        def job(x):
            return x

        if __name__ == "__main__":
            for workers in (1, 2):
                try:
                    list(run_pool(job, [1, 2, 3], workers=workers, initializer=init, progress=False))
                except FileNotFoundError as exc:
                    print(workers, exc)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["1 mask folder /nowhere does not exist", "2 mask folder /nowhere does not exist"]


def test_an_error_or_an_early_stop_ends_the_pool_without_running_the_queued_jobs(tmp_path):
    """A job's error stops the step with that error, and a caller that stops iterating ends the pool:
    either way the queued jobs are not run (each would leave a file) and the pool shuts down by
    close + join, never by killing workers mid-write (Pool.terminate's hang)."""
    script = tmp_path / "job_error.py"
    script.write_text(textwrap.dedent("""
        import faulthandler, multiprocessing.pool, sys, time
        from pathlib import Path
        from hpa_scc.utils.pool import run_pool

        faulthandler.dump_traceback_later(90, exit=True)
        OUT = Path(sys.argv[1])
        TERMINATED = []
        _terminate = multiprocessing.pool.Pool.terminate
        multiprocessing.pool.Pool.terminate = lambda self: TERMINATED.append(1) or _terminate(self)

        def job(x):
            if x == 0:
                raise ValueError("image 0 is corrupt")
            (OUT / f"ran-{x}").write_text("")
            time.sleep(0.2)
            return x

        if __name__ == "__main__":
            try:
                list(run_pool(job, list(range(60)), workers=2, progress=False))
            except ValueError as exc:
                print("error:", exc, len(list(OUT.glob("ran-*"))))
            for x in OUT.glob("ran-*"):
                x.unlink()
            for result in run_pool(job, list(range(1, 61)), workers=2, progress=False):
                break  # the caller has what it needs
            print("stopped:", len(list(OUT.glob("ran-*"))))
            print("terminate calls:", len(TERMINATED))
    """))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    error, stopped, terminated = proc.stdout.splitlines()
    assert terminated == "terminate calls: 0"
    assert error.startswith("error: image 0 is corrupt ")
    # the jobs in flight when the error came (one per worker, a few more on a loaded machine), not all 59
    assert int(error.split()[-1]) < 20, proc.stdout
    assert int(stopped.split()[-1]) < 20, proc.stdout
