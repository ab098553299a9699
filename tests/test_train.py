"""The training system end to end at 128 px on CPU: run folder, resume, signals, DDP, NaN stop."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpa_scc.config import load_config
from hpa_scc.engine.loop import NonFiniteLossError
from hpa_scc.cli import EXIT_REQUEUE
from hpa_scc.engine.train import FINISHED, PREEMPTED, train

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def prepared(shared_data) -> Path:
    return shared_data.prepared(images=8, size=256, seed=21, prepare_size=128, folds=2) / "prepared"


def overrides(prepared: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.prepared_dir={prepared}", "data.image_size=128", "data.workers=0", "data.max_val_images=2",
            f"train.run_dir={run_dir}", "train.max_epochs=2", "train.images_per_gpu=2", "train.max_iters_per_epoch=2",
            "train.log_every_iters=1", "train.tensorboard=false", "optim.warmup_iters=1", "optim.lr=0.002", *extra]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hpa_scc", "train", *args], capture_output=True, text=True, env=env, **kw)


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())
    assert worst <= atol, f"weights differ by {worst}"


@pytest.mark.slow
def test_run_folder_and_resume_after_kill_match_an_uninterrupted_run(prepared, tmp_path):
    # uninterrupted: 2 epochs x 2 steps
    straight = tmp_path / "straight"
    result = train(load_config(None, overrides(prepared, straight)))
    assert (result.status, result.epoch, result.global_step, result.checkpoint) == (FINISHED, 2, 4, straight / "last.pt")
    names = sorted(p.name for p in straight.iterdir())
    for name in ("best.pt", "config.yaml", "epoch_0001.pt", "epoch_0002.pt", "last.pt", "metrics.jsonl", "train.log"):
        assert name in names
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4]
    val = [r for r in lines if r["kind"] == "val"]
    assert len(val) == 2 and all(0 <= r["segm_AP"] <= 1 for r in val)
    final = torch.load(straight / "last.pt", weights_only=False)
    assert (final["epoch"], final["step_in_epoch"], final["global_step"]) == (2, 0, 4)

    # the same run, killed outright once epoch 1's checkpoint is on disk, then resumed
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "hpa_scc", "train", str(HERE.parent / "configs" / "densenet121.yaml"),
                             *overrides(prepared, killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "epoch_0001.pt").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(killed / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 2
    train(load_config(None, overrides(prepared, killed)))
    resumed = torch.load(killed / "last.pt", weights_only=False)
    assert resumed["global_step"] == 4
    assert resumed["scheduler"]["last_epoch"] == final["scheduler"]["last_epoch"] == 4
    assert resumed["optimizer"]["state"].keys() == final["optimizer"]["state"].keys()
    assert_same_weights(resumed["model"], final["model"])


@pytest.mark.slow
def test_sigusr1_saves_mid_epoch_and_exits_for_requeue(prepared, tmp_path):
    run = tmp_path / "sig"
    args = [str(HERE.parent / "configs" / "densenet121.yaml"), *overrides(prepared, run, "train.max_iters_per_epoch=3", "train.images_per_gpu=1")]
    proc = subprocess.Popen([sys.executable, "-m", "hpa_scc", "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count('"train"') >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, err
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["epoch"] == 0 and 1 <= state["step_in_epoch"] < 3
    assert state["global_step"] == state["step_in_epoch"]
    done = cli(*args, "-q")
    assert done.returncode == 0, done.stderr
    final = torch.load(run / "last.pt", weights_only=False)
    # the requeued job did exactly the remaining steps: 2 epochs x 3 in all
    assert final["global_step"] == 6 and final["epoch"] == 2
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if '"train"' in l]
    assert sorted(set(steps)) == list(range(1, 7))


@pytest.mark.slow
def test_ddp_two_ranks_end_with_the_same_weights(prepared, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                           str(HERE / "ddp_worker.py"), *overrides(prepared, run, "train.max_epochs=1")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(run / "rank0.pt", weights_only=False)
    b = torch.load(run / "rank1.pt", weights_only=False)
    # Every weight is identical. BatchNorm running statistics (random init trains BatchNorm) are
    # each rank's own after its last forward; DDP broadcasts rank 0's, the ones checkpoints keep.
    running = {k for k in a if "running_" in k}
    assert_same_weights({k: v for k, v in a.items() if k not in running},
                        {k: v for k, v in b.items() if k not in running}, atol=0)
    start = torch.load(run / "last.pt", weights_only=False)
    assert start["global_step"] == 1  # ~4 training images over 2 ranks x 2 images: one step
    # every rank's generators, in rank order (ranks are seeded seed + rank: they differ)
    assert len(start["rng"]) == 2 and not torch.equal(start["rng"][0]["torch"], start["rng"][1]["torch"])
    digests = re.findall(r"rank (\d)/2 done at global step 1: weights ([0-9a-f]{16})$", proc.stderr, re.M)
    assert sorted(r for r, _ in digests) == ["0", "1"] and len({d for _, d in digests}) == 1, proc.stderr[-2000:]
    log = (run / "train.log").read_text()
    assert "2 ranks x 2 images x 1 accumulation = 4 per step" in log


def test_non_finite_loss_stops_with_the_loss_dict(prepared, tmp_path, monkeypatch):
    import hpa_scc.models.detector

    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, images, targets=None):
            return {"loss_classifier": self.w * float("nan"), "loss_mask": self.w * 0.5}

    monkeypatch.setattr(hpa_scc.models.detector, "build_model", lambda *a, **k: Exploding())
    with pytest.raises(NonFiniteLossError, match=r"loss_classifier.*nan.*loss_mask.*0.5"):
        train(load_config(None, overrides(prepared, tmp_path / "nan")))
    assert not (tmp_path / "nan" / "last.pt").exists()  # a NaN model is never saved


@pytest.mark.slow
def test_train_cli_errors_are_clear(prepared, tmp_path):
    proc = cli(str(HERE.parent / "configs" / "smoke.yaml"), "optim.lr=fast")
    assert proc.returncode == 1 and "optim.lr in override 'optim.lr=fast': expected float" in proc.stderr
    proc = cli(str(HERE.parent / "configs" / "smoke.yaml"), f"data.prepared_dir={tmp_path}")
    assert proc.returncode == 1 and "prepare.json not found" in proc.stderr
    proc = cli(str(HERE.parent / "configs" / "smoke.yaml"), f"data.prepared_dir={prepared}", "data.image_size=256")
    assert proc.returncode == 1 and "prepared at 128 px but data.image_size is 256; leave data.image_size out" in proc.stderr


def test_a_signal_in_process_returns_preempted_after_saving_and_keeps_the_caller_alive(prepared, tmp_path):
    """A notebook calling train() gets a PREEMPTED result (last.pt saved), not an exception or a SystemExit."""
    import threading

    run = tmp_path / "inproc"
    metrics = run / "metrics.jsonl"

    def send_when_training():
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.is_file() and '"train"' in metrics.read_text()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    before = signal.getsignal(signal.SIGUSR1)
    sender = threading.Thread(target=send_when_training, daemon=True)
    sender.start()
    result = train(load_config(None, overrides(prepared, run, "train.max_iters_per_epoch=3", "train.images_per_gpu=1")))
    sender.join(timeout=10)
    assert result.status == PREEMPTED and result.signal == signal.SIGUSR1 and result.checkpoint == run / "last.pt"
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["epoch"] == result.epoch == 0 and state["step_in_epoch"] == result.step_in_epoch >= 1
    assert signal.getsignal(signal.SIGUSR1) is before  # the caller's handler is back


@pytest.mark.slow
def test_resume_refuses_other_settings_and_allows_more_epochs(prepared, tmp_path, caplog):
    run = tmp_path / "run"
    assert train(load_config(None, overrides(prepared, run, "train.max_epochs=1")), progress=False).status == FINISHED
    saved = (run / "config.yaml").read_text()
    for change, key in (("optim.lr=0.02", "optim.lr: 0.002 -> 0.02"), ("data.val_fold=1", "data.val_fold: 0 -> 1"),
                        ("model.backbone=resnet101_fpn", "model.backbone: 'densenet121' -> 'resnet101_fpn'")):
        with pytest.raises(ValueError, match=rf"started with other settings \({key}\).*another train.run_dir"):
            train(load_config(None, overrides(prepared, run, "train.max_epochs=1", change)), progress=False)
        assert (run / "config.yaml").read_text() == saved  # nothing touched
    with caplog.at_level(logging.INFO, logger="hpa_scc"):
        result = train(load_config(None, overrides(prepared, run, "train.max_epochs=2")), progress=False)
    assert result.status == FINISHED and result.epoch == 2
    assert "resuming with changed settings: train.max_epochs 1 -> 2" in (run / "train.log").read_text()
