"""A run folder under bad input (issue 27): checkpoints that run code, a fresh start over an
earlier run, data changed under a resume, two starts in one folder, checkpoints of another model
or cut short, metrics after a kill, a device that does not exist."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpa_scc.config import load_config
from hpa_scc.data.annotations import write_coco
from hpa_scc.engine.train import FINISHED, PREEMPTED, StopSignals, end_run, pick_device, start_run, train
from hpa_scc.utils.checkpoint import (LOCK_FILE, LOCK_STALE_S, RunFolderLocked, load_checkpoint, rng_state,
                                      set_rng_state)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory) -> Path:
    """The module's own copy (the cell models write their crop stores into it), the set beside it."""
    shared = shared_data.prepared(images=8, size=256, seed=21, prepare_size=128, folds=2)
    return shared_data.copy(shared, tmp_path_factory.mktemp("safety")) / "prepared"


def cell_config(prepared: Path, run: Path, *extra: str):
    """A resnet18 cell model on 32 px crops, one step per epoch: about a second per epoch on CPU."""
    return load_config(REPO / "configs" / "cell_resnet18.yaml", [
        f"data.prepared_dir={prepared}", "data.workers=0", f"train.run_dir={run}", "data.crop_size=32",
        "train.images_per_gpu=8", "train.tensorboard=false", "optim.warmup_iters=1", "train.max_iters_per_epoch=1",
        "train.max_epochs=1", "train.log_every_iters=1", "model.weights=null", *extra])


def features_config(prepared: Path, run: Path, *extra: str):
    return load_config(REPO / "configs" / "cell_features.yaml",
                       [f"data.prepared_dir={prepared}", f"train.run_dir={run}", *extra])


def relabel(prepared: Path, fold: int) -> None:
    """Change one cell's label in every layout's COCO file of ``fold`` (as a refinement round or a
    new train.csv would), through the package's writer."""
    for layout in ("multilabel", "per_label"):
        path = prepared / "coco" / layout / f"fold{fold}.json"
        coco = json.loads(path.read_text())
        ann = coco["annotations"][0]
        if "label_vector" in ann:
            ann["label_vector"] = [1 - v for v in ann["label_vector"]]
        else:
            ann["category_id"] = ann["category_id"] % 19 + 1
        write_coco(path, coco)


# ----------------------------------------------------------------------------------------------
# 1. checkpoints are plain data

class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling calls open(marker, "w"): a file appears
        return open, (str(self.marker), "w")


def test_a_checkpoint_that_runs_code_is_refused_and_nothing_runs(prepared, tmp_path):
    from hpa_scc.engine.inference import load_run

    run = tmp_path / "run"
    assert train(features_config(prepared, run, "data.val_fold=-1"), progress=False).status == FINISHED
    marker = tmp_path / "pwned"
    for name in ("best.pt", "last.pt"):
        state = torch.load(run / name, weights_only=True)
        state["extra"] = RunsCode(marker)
        torch.save(state, run / name)
    with pytest.raises(ValueError, match=r"best\.pt is not a plain-data checkpoint \(it holds io\.open\).*"
                                         r"load only files you trust"):
        load_run(run, device="cpu")  # predict's and refine's path
    with pytest.raises(ValueError, match=r"last\.pt is not a plain-data checkpoint"):
        train(features_config(prepared, run, "data.val_fold=-1"), progress=False)  # the resume path
    with pytest.raises(ValueError, match="not a plain-data checkpoint"):
        load_checkpoint(run / "best.pt")
    assert not marker.exists()
    assert torch.load(run / "best.pt", weights_only=False)["model"] and marker.exists()  # what it would have done


def test_generator_states_are_plain_data_and_an_earlier_versions_numpy_state_still_loads(tmp_path):
    from hpa_scc.utils.checkpoint import save_checkpoint

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(tmp_path / "new.pt", {"rng": [rng_state()]})
    expected = random.random(), float(np.random.rand()), float(torch.rand(1))
    state = torch.load(tmp_path / "new.pt", weights_only=True)  # no allow-list needed
    set_rng_state(state["rng"][0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    # an earlier version kept numpy's state as an array and numpy figures: loaded through the
    # numpy rebuilders alone, and restored exactly
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"rng": [old], "best_metric": np.float64(0.25)}, tmp_path / "old.pt")
    expected = random.random(), float(np.random.rand()), float(torch.rand(1))
    state = load_checkpoint(tmp_path / "old.pt")
    set_rng_state(state["rng"][0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert state["best_metric"] == 0.25


# ----------------------------------------------------------------------------------------------
# 2. a fresh start over an earlier run; 5. checkpoints of another model, or cut short

def test_a_fresh_start_removes_the_earlier_runs_checkpoints(prepared, tmp_path, caplog):
    from hpa_scc.engine.inference import load_run

    first = tmp_path / "first"
    train(cell_config(prepared, first, "train.max_epochs=2", "train.save_every_epochs=1"), progress=False)
    assert {"best.pt", "last.pt", "epoch_0001.pt", "epoch_0002.pt"} <= {p.name for p in first.iterdir()}
    run = tmp_path / "so"
    shutil.copytree(first, run)
    (run / "preempted.json").write_text("{}\n")
    with caplog.at_level(logging.WARNING, logger="hpa_scc"):
        train(cell_config(prepared, run, "train.resume=false", "data.val_fold=-1"), progress=False)
    assert "removing the earlier run's last.pt, best.pt, epoch_0001.pt, epoch_0002.pt, metrics.jsonl, " \
           "preempted.json, data.json" in caplog.text
    assert sorted(p.name for p in run.glob("*.pt")) == ["last.pt"]  # no validation: no best.pt of its own
    assert load_run(run, device="cpu").checkpoint == str(run / "last.pt")  # predict loads this run's model


def test_a_checkpoint_of_another_family_or_cut_short_gets_one_line(prepared, tmp_path):
    from hpa_scc.engine.inference import load_run

    cell, feat = tmp_path / "cell", tmp_path / "feat"
    train(cell_config(prepared, cell), progress=False)
    train(features_config(prepared, feat, "data.val_fold=-1"), progress=False)
    shutil.copy(cell / "best.pt", feat / "best.pt")
    with pytest.raises(ValueError, match=rf"^{feat}/best\.pt holds a cell model \(family cell\), this run is features: "
                                         rf"{feat}/config\.yaml describes another model"):
        load_run(feat, device="cpu")
    state = torch.load(cell / "best.pt", weights_only=True)
    del state["family"]  # an earlier version's checkpoint: its config says the family
    torch.save(state, feat / "best.pt")
    with pytest.raises(ValueError, match=r"holds a cell model \(family cell\), this run is features"):
        load_run(feat, device="cpu")
    shutil.copy(cell / "best.pt", feat / "last.pt")  # the resume path says it too
    with pytest.raises(ValueError, match=r"last\.pt holds a cell model \(family cell\), this run is features: the "
                                         r"folder mixes two runs"):
        train(features_config(prepared, feat, "data.val_fold=-1"), progress=False)

    data = (cell / "last.pt").read_bytes()
    (cell / "last.pt").write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(OSError, match=rf"^{cell}/last\.pt is truncated or not a checkpoint \(.*\); delete it to "
                                      r"start over"):
        train(cell_config(prepared, cell, "train.max_epochs=2"), progress=False)
    with pytest.raises(OSError, match=r"best\.pt is truncated or not a checkpoint"):
        (cell / "best.pt").write_bytes(b"")
        load_run(cell, device="cpu")


# ----------------------------------------------------------------------------------------------
# 3. the data a run trained on

def test_the_features_family_fits_again_when_its_data_changed(prepared, tmp_path, caplog):
    own = tmp_path / "prepared"
    shutil.copytree(prepared, own)
    run = tmp_path / "feat"
    train(features_config(own, run), progress=False)
    record = json.loads((run / "data.json").read_text())
    assert record["labels"] == "image" and set(record["train"]) == {"fold1"} and set(record["val"]) == {"fold0"}
    assert torch.load(run / "last.pt", weights_only=True)["data"] == record
    with caplog.at_level(logging.INFO, logger="hpa_scc"):
        train(features_config(own, run), progress=False)
    assert "already fitted with this config and data" in caplog.text
    relabel(own, 1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hpa_scc"):
        train(features_config(own, run), progress=False)
    assert "was fitted on other data (the 'image' labels changed in fold1 (train)): fitting again" in caplog.text
    now = json.loads((run / "data.json").read_text())
    assert torch.load(run / "last.pt", weights_only=True)["data"] == now != record


def test_a_resume_on_changed_data_is_refused_naming_the_fold(prepared, tmp_path):
    own = tmp_path / "prepared"
    shutil.copytree(prepared, own)
    run = tmp_path / "cell"
    train(cell_config(own, run), progress=False)
    saved = (run / "config.yaml").read_text(), (run / "data.json").read_text()
    relabel(own, 0)  # the validation fold
    with pytest.raises(ValueError, match=rf"^{run} trained on other data: the prepared set's 'image' labels changed in "
                                         r"fold0 \(val\) since; resuming would mix two data sets: use a new "
                                         r"train\.run_dir, or train\.resume=false"):
        train(cell_config(own, run, "train.max_epochs=2"), progress=False)
    assert ((run / "config.yaml").read_text(), (run / "data.json").read_text()) == saved  # nothing touched
    assert not (run / LOCK_FILE).exists()
    # the fix the message names: start the folder over
    assert train(cell_config(own, run, "train.resume=false"), progress=False).status == FINISHED


# ----------------------------------------------------------------------------------------------
# 4. one run per folder

def write_lock(run: Path, **holder) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": 1, "since": "2026-01-01T00:00:00+0000", "slurm_job_id": None,
              "token": "x", **holder}
    (run / LOCK_FILE).write_text(json.dumps(record) + "\n")
    return run / LOCK_FILE


def test_a_lock_held_by_a_live_process_refuses_a_second_start(prepared, tmp_path, caplog):
    run = tmp_path / "cd"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = write_lock(run, pid=sleeper.pid)
        with pytest.raises(RunFolderLocked, match=rf"^{run} is in use by another training run \(host "
                                                  rf"{socket.gethostname()}, PID {sleeper.pid}, since 2026-01-01.*\); "
                                                  r"wait for it to end or use another train\.run_dir"):
            start_run(cell_config(prepared, run))
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        sleeper.kill()
        sleeper.wait()
    # its holder is gone now: taken over, with a warning, and let go at the end
    with caplog.at_level(logging.WARNING, logger="hpa_scc"):
        started = start_run(cell_config(prepared, run))
    assert f"PID {sleeper.pid} is not running on this host" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    end_run(started)
    assert not lock.exists()


def test_the_lock_goes_after_a_run_and_after_an_error(prepared, tmp_path, monkeypatch):
    import hpa_scc.engine.train as engine

    run = tmp_path / "run"
    train(features_config(prepared, run), progress=False)
    assert (run / "config.yaml").is_file() and not (run / LOCK_FILE).exists()

    def fails(*args, **kw):
        assert (run / LOCK_FILE).is_file()  # held while it trains
        raise RuntimeError("broken loader")

    monkeypatch.setattr(engine, "build_data", fails)
    with pytest.raises(RuntimeError, match="broken loader"):
        train(features_config(prepared, run), progress=False)
    assert not (run / LOCK_FILE).exists()


def test_another_hosts_lock_is_taken_over_only_when_its_holder_is_gone(prepared, tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no squeue: the lock's age decides
    lock = write_lock(run, host="node-a", pid=4242, slurm_job_id="777")
    with pytest.raises(RunFolderLocked, match=r"\(host node-a, PID 4242, since .*, SLURM job 777\)"):
        end_run(start_run(cell_config(prepared, run)))
    # a day without a refresh: gone
    old = time.time() - LOCK_STALE_S - 60
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="hpa_scc"):
        end_run(start_run(cell_config(prepared, run)))
    assert "not refreshed for 24 h" in caplog.text and not lock.exists()
    # this SLURM job's earlier run, requeued onto another node: taken over at once
    write_lock(run, host="node-a", pid=4242, slurm_job_id="778")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hpa_scc"):
        end_run(start_run(cell_config(prepared, run)))
    assert "an earlier run of this SLURM job (778), requeued" in caplog.text
    # another job that squeue no longer knows: taken over
    (tmp_path / "bin").mkdir()
    squeue = tmp_path / "bin" / "squeue"
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    squeue.chmod(0o755)
    write_lock(run, host="node-a", pid=4242, slurm_job_id="500")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hpa_scc"):
        end_run(start_run(cell_config(prepared, run)))
    assert "SLURM job 500 has ended" in caplog.text


# ----------------------------------------------------------------------------------------------
# 6. metrics after a kill, a stop on an epoch's last step, devices

def metric_lines(run: Path) -> list[tuple]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["kind"], r["step"], r.get("epoch")) for r in map(json.loads, lines)]


def test_a_run_killed_after_logging_logs_each_step_and_epoch_once_when_resumed(prepared, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(cell_config(prepared, straight, "train.max_epochs=2"), progress=False)
    train(cell_config(prepared, killed), progress=False)  # epoch 1 saved in last.pt
    # then killed (Ctrl-C, SIGKILL) in epoch 2's validation: its step and epoch lines were logged,
    # last.pt was not saved; and a line was cut short
    logged = [line for line in (straight / "metrics.jsonl").read_text().splitlines() if '"step": 2' in line]
    with open(killed / "metrics.jsonl", "a") as fh:
        fh.write("\n".join(logged[:2]) + '\n{"kind": "val", "st')
    (killed / "preempted.json").write_text('{"signal": 10}\n')  # an earlier stop's record
    train(cell_config(prepared, killed, "train.max_epochs=2"), progress=False)
    assert metric_lines(killed) == metric_lines(straight) == [
        ("train", 1, 0), ("epoch", 1, 1), ("val", 1, 1), ("train", 2, 1), ("epoch", 2, 2), ("val", 2, 2)]
    assert not (killed / "preempted.json").exists()


def test_a_stop_on_an_epochs_last_step_resumes_without_an_extra_step(prepared, tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = train(cell_config(prepared, straight, "train.max_epochs=2"), progress=False)

    def signalled(self, info, device):  # a SIGUSR1 during the epoch's one step
        self.signal = 10
        return self.signal

    with monkeypatch.context() as m:
        m.setattr(StopSignals, "agree", signalled)
        result = train(cell_config(prepared, stopped, "train.max_epochs=2"), progress=False)
    assert (result.status, result.epoch, result.step_in_epoch) == (PREEMPTED, 0, 1)
    resumed = train(cell_config(prepared, stopped, "train.max_epochs=2"), progress=False)
    assert resumed.global_step == done.global_step == 2  # 2 epochs x 1 step: none more
    a, b = (torch.load(run / "last.pt", weights_only=True)["model"] for run in (straight, stopped))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_device_that_does_not_exist_gets_the_choices(prepared, tmp_path, capsys):
    from hpa_scc.cli import main
    from hpa_scc.engine.inference import load_run

    with pytest.raises(ValueError, match=r"^train\.device='tpu' is not a device here; choose one of auto, cpu, cuda, "
                                         r"cuda:N$"):
        pick_device("tpu")
    assert pick_device("cpu") == torch.device("cpu")
    run = tmp_path / "feat"
    train(features_config(prepared, run, "data.val_fold=-1"), progress=False)
    with pytest.raises(ValueError, match=r"^--device='tpu' is not a device here"):
        load_run(run, device="tpu")
    assert main(["predict", str(run), str(prepared.parent / "set"), "--out", str(tmp_path / "out"), "--device", "tpu",
                 "-q"]) == 1
    err = capsys.readouterr().err
    assert "error: --device='tpu' is not a device here; choose one of auto, cpu, cuda, cuda:N" in err


def test_the_detectron2_engine_records_its_data_and_its_lock(prepared, tmp_path):
    pytest.importorskip("detectron2", reason="detectron2 is not installed")
    from hpa_scc.engine.d2train import prepare_d2_run
    from hpa_scc.utils.checkpoint import RunLock

    own, run = tmp_path / "prepared", tmp_path / "d2"
    shutil.copytree(prepared, own)
    cfg = lambda *extra: load_config(REPO / "configs" / "resnet101_fpn.yaml", [  # noqa: E731
        "model.engine=detectron2", "model.head=softmax", f"data.prepared_dir={own}", f"train.run_dir={run}",
        "train.device=cpu", "model.weights=null", *extra])
    prepare_d2_run(cfg())
    assert set(json.loads((run / "data.json").read_text())["train"]) == {"fold1"}
    (run / "last_checkpoint").write_text("model_final.pth")  # as a trained run leaves it: resumable
    relabel(own, 1)
    with pytest.raises(ValueError, match=r"trained on other data: the prepared set's 'image' labels changed in "
                                         r"fold1 \(train\)"):
        prepare_d2_run(cfg())
    lock = RunLock(run)  # train_d2's, taken after the checks
    prepare_d2_run(cfg("train.resume=false"), lock=lock)
    assert (run / LOCK_FILE).is_file()
    with pytest.raises(RunFolderLocked, match="is in use by another training run"):
        prepare_d2_run(cfg("train.resume=false"), lock=RunLock(run))
    lock.release()
    assert not (run / LOCK_FILE).exists()
