"""The detectron2 engine: its config from ours, the datasets it reads, a real run through
detectron_code/main.py (resumed, then scored by predict/evaluate), the sbatch's --engine, and
parity of the same zoo-format weights in detectron2 and in our torchvision model."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed; install with: bash scripts/setup.sh --detectron2")

from hpa_scc.config import ConfigError, load_config  # noqa: E402
from hpa_scc.data.prepared import PreparedSet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "detectron_code" / "main.py"


@pytest.fixture(scope="module")
def tiny(shared_data) -> Path:
    """root/set: 4 synthetic images at 256 px (with solution.csv); root/prepared at 128 px, 2 folds
    (the tiny run's data)."""
    return shared_data.prepared(images=4, size=256, seed=31, prepare_size=128, folds=2)


def d2_overrides(tiny: Path, run: Path, *extra: str) -> list[str]:
    return ["model.engine=detectron2", "model.head=softmax", f"data.prepared_dir={tiny / 'prepared'}",
            f"train.run_dir={run}", "data.workers=0", "train.device=cpu", "train.tensorboard=false", *extra]


def test_config_follows_the_project_config(tiny, tmp_path):
    from hpa_scc.engine.d2train import prepare_d2_run
    from hpa_scc.models.d2model import build_d2_model

    cfg = load_config(REPO / "configs" / "resnet101_fpn.yaml", d2_overrides(
        tiny, tmp_path / "run", "train.images_per_gpu=1", "train.max_epochs=3", "optim.lr=0.005",
        "optim.schedule=step", "optim.step_milestones=[2]", "train.save_every_epochs=2", "optim.clip_grad_norm=5.0"))
    d2 = prepare_d2_run(cfg, num_gpus=1, write=False)
    n_train = len(PreparedSet(tiny / "prepared").read_folds("per_label", [1])["images"])  # val_fold 0 validates
    assert cfg.data.image_size is None and d2.INPUT.MAX_SIZE_TRAIN == 128 and n_train == 2
    assert d2.MODEL.ROI_HEADS.NUM_CLASSES == 19
    assert d2.MODEL.PIXEL_MEAN == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255, 0.485 * 255])
    assert len(d2.MODEL.PIXEL_STD) == 4
    assert tuple(d2.INPUT.MIN_SIZE_TRAIN) == (128,) and d2.INPUT.MAX_SIZE_TRAIN == 128 and d2.INPUT.MIN_SIZE_TEST == 128
    assert d2.SOLVER.IMS_PER_BATCH == 1 and d2.SOLVER.BASE_LR == 0.005
    assert d2.SOLVER.MAX_ITER == 3 * n_train  # 3 epochs of 2 one-image steps
    assert tuple(d2.SOLVER.STEPS) == (2 * n_train,) and d2.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR"
    assert d2.SOLVER.CHECKPOINT_PERIOD == 2 * n_train
    assert d2.HPA.CLIP_GRAD_NORM == 5.0 and not d2.SOLVER.CLIP_GRADIENTS.ENABLED  # one global norm, by our trainer
    assert d2.MODEL.DEVICE == "cpu" and d2.OUTPUT_DIR == str(tmp_path / "run")
    assert d2.MODEL.WEIGHTS == "" and d2.MODEL.BACKBONE.FREEZE_AT == 0 and d2.MODEL.RESNETS.NORM == "BN"
    assert d2.MODEL.RESNETS.DEPTH == 101 and d2.DATASETS.TRAIN == ("hpa_scc_train",)
    assert list(d2.HPA.TRAIN_FOLDS) == [1] and list(d2.HPA.VAL_FOLDS) == [0]
    assert not (tmp_path / "run").exists()  # write=False touches nothing
    model = build_d2_model(d2)
    assert model.backbone.bottom_up.stem.conv1.weight.shape[1] == 4  # a 4-channel stem
    assert model.roi_heads.box_predictor.cls_score.out_features == 20  # 19 + background

    x101 = prepare_d2_run(load_config(REPO / "configs" / "resnext101_32x8d_fpn.yaml",
                                      d2_overrides(tiny, tmp_path / "x", "model.in_channels=3")), write=False)
    assert x101.MODEL.RESNETS.NUM_GROUPS == 32 and len(x101.MODEL.PIXEL_MEAN) == 3 and x101.SOLVER.IMS_PER_BATCH == 2
    with pytest.raises(ConfigError, match="model.head=softmax"):
        load_config(None, ["model.engine=detectron2", "model.backbone=resnet101_fpn"])
    with pytest.raises(ConfigError, match="resnet101_fpn"):
        load_config(None, ["model.engine=detectron2", "model.head=softmax"])  # densenet121


def test_folds_are_registered_and_mapped_from_the_npy_cache(tiny):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from hpa_scc.engine.d2train import NpyMapper, register_folds

    prepared = PreparedSet(tiny / "prepared")
    coco = prepared.read_folds("per_label", [0, 1])
    register_folds("hpa_test_all", prepared, "per_label", [0, 1])
    records = DatasetCatalog.get("hpa_test_all")
    assert len(records) == len(coco["images"]) == 4
    assert sum(len(r["annotations"]) for r in records) == len(coco["annotations"])
    first = coco["annotations"][0]
    rec = next(r for r in records if r["image_id"] == first["image_id"])
    assert rec["height"] == rec["width"] == 128 and Path(rec["file_name"]).suffix == ".npy"
    assert rec["annotations"][0]["category_id"] == first["category_id"] - 1
    assert rec["annotations"][0]["bbox"] == pytest.approx(first["bbox"])
    assert MetadataCatalog.get("hpa_test_all").thing_classes[0] == "Nucleoplasm"

    plain = NpyMapper(str(prepared.root), 4, is_train=False)(rec)
    assert plain["image"].shape == (4, 128, 128) and plain["image"].dtype == torch.uint8
    assert torch.equal(plain["image"], torch.from_numpy(np.array(prepared.read_image(rec["image_name"]))))
    assert len(plain["instances"]) == len(rec["annotations"])
    assert plain["instances"].gt_masks.tensor.shape[1:] == (128, 128)
    assert plain["instances"].gt_classes.tolist() == [a["category_id"] for a in rec["annotations"]]
    # every flip + the transpose: the image and its masks move together (mask pixels stay on the same values)
    moved = NpyMapper(str(prepared.root), 3, is_train=True, hflip_prob=1.0, vflip_prob=1.0, rot90=True)(rec)
    assert moved["image"].shape == (3, 128, 128)
    areas = lambda out: sorted(out["instances"].gt_masks.tensor.sum((1, 2)).tolist())  # noqa: E731
    assert areas(moved) == areas(plain)
    mask0 = moved["instances"].gt_masks.tensor[0]
    assert mask0.sum() > 0 and moved["instances"].gt_boxes.tensor[0].tolist() != plain["instances"].gt_boxes.tensor[0].tolist()


def run_main(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(MAIN), *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_main_trains_resumes_and_predict_evaluate_score_the_run(tiny, tmp_path):
    run = tmp_path / "run"
    common = ["--engine", "detectron2", "--backbone", "resnet101", *d2_overrides(tiny, run)[2:],
              "train.images_per_gpu=1", "train.max_iters_per_epoch=2", "optim.warmup_iters=1"]
    run_main(*common, "train.max_epochs=1", cwd=tmp_path)
    assert (run / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert {"config.yaml", "d2_config.yaml", "model_0000001.pth", "model_final.pth", "metrics.json"} <= \
        {p.name for p in run.iterdir()}
    saved = load_config(run / "config.yaml")
    assert (saved.model.engine, saved.model.head, saved.data.image_size) == ("detectron2", "softmax", 128)
    first = [json.loads(line)["iteration"] for line in (run / "metrics.json").read_text().splitlines()]
    assert first[-1] == 1  # 2 iterations: 0, 1

    second = run_main(*common, "train.max_epochs=2", cwd=tmp_path)  # one more epoch: resumes at iteration 2
    assert "Starting training from iteration 2" in second.stdout + second.stderr
    iterations = [json.loads(line)["iteration"] for line in (run / "metrics.json").read_text().splitlines()]
    assert iterations[len(first):] == [3] and (run / "model_0000003.pth").is_file()
    state = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)
    assert state["iteration"] == 3

    # the notebook's training curves read detectron2's metrics.json in the project's form
    from hpa_scc.apps import visualize
    from hpa_scc.engine.runfolder import read_metrics

    rows = read_metrics(run)
    assert [r["step"] for r in rows] == iterations and all(r["kind"] == "train" for r in rows)
    assert {"loss", "loss_cls", "loss_mask"} <= set(rows[-1])
    assert rows[-1]["loss"] == pytest.approx(json.loads((run / "metrics.json").read_text().splitlines()[-1])["total_loss"])
    visualize.plot_training_curves(run, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000

    for cells in ("segmenter", "model"):
        out = tmp_path / f"pred-{cells}"
        proc = subprocess.run([sys.executable, "-m", "hpa_scc", "predict", str(run), str(tiny / "set"), "--out", str(out),
                               "--cells", cells, "--device", "cpu", "-q"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = (out / "submission.csv").read_text().splitlines()
        assert rows[0] == "ID,ImageWidth,ImageHeight,PredictionString" and len(rows) == 5
        assert json.loads((out / "predict.json").read_text())["models"][0]["checkpoint"] == "model_final.pth"
        metrics = out / "metrics.json"
        proc = subprocess.run([sys.executable, "-m", "hpa_scc", "evaluate", "--solution", str(tiny / "set" / "solution.csv"),
                               "--submission", str(out / "submission.csv"), "--out", str(metrics), "-q"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        score = float(proc.stdout.strip().splitlines()[-1].split()[-1])
        assert 0.0 <= score <= 1.0 and json.loads(metrics.read_text())["mAP"] == pytest.approx(score, abs=1e-5)


def test_sbatch_passes_the_engine_through(tmp_path):
    """run-model.sbatch --engine detectron2 (or HPA_SCC_ENGINE) hands main.py's overrides to slurm_train.sh."""
    (tmp_path / "detectron_code").mkdir()
    (tmp_path / "scripts").mkdir()
    shutil.copy(MAIN, tmp_path / "detectron_code" / "main.py")
    (tmp_path / "scripts" / "slurm_train.sh").write_text('printf "%s\\n" "$@"\n')  # stand-in: shows its arguments
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"HPA_SCC_REPO": str(tmp_path)}
    sbatch = str(REPO / "detectron_code" / "run-model.sbatch")
    config = str(tmp_path / "configs" / "resnet101_fpn.yaml")
    out = subprocess.run(["bash", sbatch, "resnet101", "--engine", "detectron2", "optim.lr=0.1"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [config, "model.engine=detectron2", "model.head=softmax", "optim.lr=0.1"]
    out = subprocess.run(["bash", sbatch, "resnet101", "optim.lr=0.1"], env=env | {"HPA_SCC_ENGINE": "detectron2"},
                         capture_output=True, text=True)
    assert out.stdout.splitlines()[1:3] == ["model.engine=detectron2", "model.head=softmax"]
    out = subprocess.run(["bash", sbatch, "resnet101", "optim.lr=0.1"], env=env, capture_output=True, text=True)
    assert out.stdout.splitlines() == [config, "optim.lr=0.1"]  # torchvision: no engine overrides
    out = subprocess.run(["bash", sbatch, "resnet101", "--engine", "mmdet"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice: 'mmdet'" in out.stderr


def zoo_format_r101(path: Path, cfg) -> torch.nn.Module:
    """A detectron2 R101-FPN (FrozenBN, as the zoo's) with random weights, saved at ``path`` as a zoo .pkl (BGR stem).

    The FrozenBN statistics are random but tame (the last BN of each block x 0.2) so that 101
    layers of random convolutions keep activations of order 1, and the classifier is spread
    (std 0.05) so detections are ranked by more than noise.
    """
    from hpa_scc.models.d2model import build_d2_config, build_d2_model

    d2cfg = build_d2_config(cfg, weights=str(path))  # "pretrained": FrozenBN, zoo statistics
    d2cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_d2_model(d2cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("norm.running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
            elif name.endswith("norm.running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("norm.weight"):
                scale = 0.2 if "conv3" in name else (1 / 60 if "stem" in name else 1.0)  # caffe inputs are 0..255
                buf.copy_((torch.rand(buf.shape, generator=g) * 0.5 + 0.5) * scale)
            elif name.endswith("norm.bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05, generator=g)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    stem = "backbone.bottom_up.stem.conv1.weight"
    state[stem] = state[stem][:, ::-1].copy()  # the model is fed RGB; a zoo file's stem is BGR
    with open(path, "wb") as fh:
        pickle.dump({"model": state, "__author__": "test"}, fh)
    return model


def test_same_weights_give_the_same_features_and_close_detections(tmp_path):
    """detectron2's R101-FPN and our torchvision one from the same zoo-format weights (d2import):
    backbone + FPN equal to float precision; detections close, not equal (ROIAlign, anchors:
    see hpa_scc.models.d2model)."""
    from torchvision.ops import box_iou

    from hpa_scc.data.synth_draw import generate_image
    from hpa_scc.models.d2model import D2Detector
    from hpa_scc.models.detector import build_model

    weights = tmp_path / "r101.pkl"
    cfg = load_config(None, ["model.engine=detectron2", "model.head=softmax", "model.backbone=resnet101_fpn",
                             "model.in_channels=3", "data.image_size=128", f"model.weights={weights}",
                             "model.keep_predictors=true"])
    weights.touch()
    d2 = zoo_format_r101(weights, cfg)
    tv = build_model(cfg.model, image_size=128).eval()  # reads the .pkl through d2import
    image = torch.from_numpy(generate_image(0, size=128, seed=3).image[:3].astype(np.float32) / 255)
    with torch.no_grad():
        normalised = (image * 255 - d2.pixel_mean) / d2.pixel_std
        assert torch.allclose(tv.transform.normalize(image), normalised, atol=1e-4)  # the same input statistics
        ours, theirs = tv.backbone(normalised[None]), d2.backbone(normalised[None])
        for tv_name, d2_name in zip(["0", "1", "2", "3", "pool"], ["p2", "p3", "p4", "p5", "p6"]):
            scale = theirs[d2_name].abs().max()
            assert 0.5 < scale < 100  # tame activations: the comparison means something
            assert (ours[tv_name] - theirs[d2_name]).abs().max() <= 1e-5 * scale
        det_d2 = D2Detector(d2).eval()([image])[0]
        det_tv = tv([image])[0]
    assert len(det_d2["scores"]) == len(det_tv["scores"]) == 100  # both fill box_detections_per_img
    assert det_d2["masks"].shape == det_tv["masks"].shape == (100, 1, 128, 128)
    assert 0 <= det_d2["masks"].min() and det_d2["masks"].max() <= 1
    # Top detections: the same class, scores within 0.01, boxes overlapping (IoU >= 0.5; ~0.7 on
    # average): RoIs pooled half a pixel apart with other sampling, and nearly tied random-weight
    # scores, reorder boxes that overlap each other.
    top = 20
    assert det_d2["labels"][0] == det_tv["labels"][0]
    assert (det_d2["scores"][:top] - det_tv["scores"][:top]).abs().max() < 0.01
    iou = box_iou(det_d2["boxes"][:top], det_tv["boxes"])
    same_class = det_d2["labels"][:top, None] == det_tv["labels"][None, :]
    best = torch.where(same_class, iou, torch.zeros_like(iou)).amax(1)
    assert best.min() >= 0.5 and best.mean() >= 0.6, best


def test_several_processes_on_cpu_are_refused_before_anything_is_written(tiny, tmp_path):
    """detectron2 0.6 wraps the model in DDP with a GPU device id: CPU runs are one process."""
    from hpa_scc.engine.d2train import train_d2

    cfg = load_config(REPO / "configs" / "resnet101_fpn.yaml", d2_overrides(tiny, tmp_path / "run"))
    with pytest.raises(ValueError, match="several processes on GPUs only; on CPU run one process \\(got 2"):
        train_d2(cfg, num_gpus=2)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_usr1_saves_a_checkpoint_exits_75_and_the_rerun_resumes(tiny, tmp_path):
    """What scripts/slurm_train.sh relies on: SIGUSR1 -> a checkpoint after the current step,
    preempted.json, exit 75; the same command again starts from that checkpoint."""
    import signal
    import time

    run = tmp_path / "run"
    args = [sys.executable, str(MAIN), "--engine", "detectron2", "--backbone", "resnet101", *d2_overrides(tiny, run)[2:],
            "train.images_per_gpu=1", "train.max_epochs=50", "optim.warmup_iters=1"]  # 100 steps: far from done
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.time() + 300
        while not ((run / "log.txt").is_file() and "Starting training" in (run / "log.txt").read_text()):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=300) == 75
    finally:
        proc.kill() if proc.poll() is None else None
    saved = json.loads((run / "preempted.json").read_text())["iteration"]
    pointer = (run / "last_checkpoint").read_text().strip()
    assert pointer == f"model_{saved:07d}.pth" and (run / pointer).is_file() and saved < 99
    again = subprocess.run(args[:-2] + ["train.max_epochs=1", "optim.warmup_iters=1"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=600)  # fewer epochs: resumes past the end and stops at once
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Starting training from iteration {saved + 1}" in again.stdout + again.stderr
    assert not (run / "preempted.json").exists()  # a new start clears the old signal's record


@pytest.mark.slow
def test_the_evaluation_notebook_runs_on_a_detectron2_run(tiny, tmp_path, monkeypatch, kernel_env):
    """notebooks/Evaluate.ipynb takes a detectron2 run folder as any other: it predicts, scores
    and draws all its figures (the training curves from detectron2's metrics.json)."""
    from test_notebooks import NOTEBOOKS, assert_scored, execute, figures

    run = tmp_path / "run"
    run_main("--engine", "detectron2", "--backbone", "resnet101", *d2_overrides(tiny, run)[2:], "train.images_per_gpu=1",
             "train.max_iters_per_epoch=2", "optim.warmup_iters=1", "train.max_epochs=1", cwd=tmp_path)
    monkeypatch.setenv("HPA_RUN_DIR", str(run))
    monkeypatch.setenv("HPA_DATA_DIR", str(tiny / "set"))
    monkeypatch.setenv("HPA_N_IMAGES", "2")
    monkeypatch.setenv("HPA_PRED_DIR", str(tmp_path / "pred"))
    nb = execute(NOTEBOOKS[0], tmp_path)
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors
    assert figures(nb) == 5
    assert json.loads((tmp_path / "pred" / "predict.json").read_text())["models"][0]["checkpoint"] == "model_final.pth"
    assert_scored(nb, tiny / "set", tmp_path / "pred")


def fake_zoo_pkl(path: Path, seed: int, **shapes: tuple) -> dict[str, np.ndarray]:
    """A zoo-format .pkl (detectron2 names, BGR stem) holding a few tensors of the given shapes."""
    rng = np.random.default_rng(seed)
    state = {"backbone.bottom_up.stem.conv1.weight": rng.normal(size=(64, 3, 7, 7)).astype(np.float32)}
    state |= {k.replace("__", "."): rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    with open(path, "wb") as fh:
        pickle.dump({"model": state, "__author__": "test"}, fh)
    return state


def test_a_fresh_start_converts_the_weights_it_is_given_and_starts_the_folder_over(tiny, tmp_path):
    """A conversion left by an earlier start (another file, another channel count) is never reused,
    and a fresh start (train.resume=false) clears the earlier run's checkpoints and metrics."""
    from hpa_scc.engine.d2train import prepare_d2_run
    from hpa_scc.models.d2import import load_detectron2_checkpoint

    run = tmp_path / "run"
    a, b = tmp_path / "a.pkl", tmp_path / "b.pkl"
    fake_zoo_pkl(a, 0)
    stem_b = fake_zoo_pkl(b, 1)["backbone.bottom_up.stem.conv1.weight"]
    cfg = lambda *extra: load_config(REPO / "configs" / "resnet101_fpn.yaml", d2_overrides(tiny, run, *extra))  # noqa: E731
    prepare_d2_run(cfg(f"model.weights={a}"))
    converted = run / "init_weights_rgb.pkl"
    assert load_detectron2_checkpoint(converted)["backbone.bottom_up.stem.conv1.weight"].shape == (64, 4, 7, 7)
    prepare_d2_run(cfg(f"model.weights={b}", "model.in_channels=3"))  # no checkpoint yet: a fresh start again
    stem = load_detectron2_checkpoint(converted)["backbone.bottom_up.stem.conv1.weight"]
    assert stem.shape == (64, 3, 7, 7) and np.allclose(stem, stem_b[:, ::-1])  # b's, BGR -> RGB
    # an earlier run's files in the folder: kept by a resume, cleared by train.resume=false
    old = ["model_0000001.pth", "model_final.pth", "last_checkpoint", "metrics.json"]
    for name in old:
        (run / name).write_text("model_final.pth" if name == "last_checkpoint" else "x")
    prepare_d2_run(cfg(f"model.weights={b}", "model.in_channels=3"))
    assert all((run / name).exists() for name in old)
    prepare_d2_run(cfg(f"model.weights={b}", "model.in_channels=3", "train.resume=false"))
    assert not any((run / name).exists() for name in old) and converted.is_file()


def test_weights_that_do_not_fit_or_cannot_be_read_are_refused(tiny, tmp_path):
    from hpa_scc.engine.d2train import prepare_d2_run
    from hpa_scc.models.d2model import check_weights_fit

    cfg = lambda weights: load_config(REPO / "configs" / "resnet101_fpn.yaml", d2_overrides(  # noqa: E731
        tiny, tmp_path / "run", f"model.weights={weights}"))
    (tmp_path / "empty.pkl").write_bytes(b"")
    (tmp_path / "text.pkl").write_text("not a pickle\n")
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    torch.save({"model": {"backbone.body.conv1.weight": torch.zeros(1)}, "config": {"model": {}}}, tmp_path / "best.pt")
    (tmp_path / "wdir").mkdir()
    for name, message in [("empty.pkl", "empty.pkl is not a readable detectron2 .pkl (EOFError"),
                          ("text.pkl", "text.pkl is not a readable detectron2 .pkl"),
                          ("text.pth", "text.pth is not a readable detectron2 .pth"),
                          ("best.pt", "best.pt is a torchvision-engine checkpoint"),
                          ("wdir", "wdir is a folder; give the .pkl or .pth file itself")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            prepare_d2_run(cfg(tmp_path / name))

    # shapes outside the class predictors must fit; the predictors (COCO's 80 classes) may not
    model = torch.nn.ModuleDict({"backbone": torch.nn.Conv2d(4, 8, 3), "roi_heads": torch.nn.ModuleDict(
        {"box_predictor": torch.nn.Linear(8, 20)})})
    own = {k: v.numpy() for k, v in model.state_dict().items()}
    coco = {**own, "roi_heads.box_predictor.weight": np.zeros((81, 8), np.float32)}
    check_weights_fit(model, coco, "coco.pkl", "resnet101_fpn")
    with pytest.raises(ValueError, match=r"other\.pkl: 1 of 2 tensors do not fit the resnext101_32x8d_fpn model .*"
                                         r"backbone\.weight: \(8, 3, 3, 3\) vs \(8, 4, 3, 3\)"):
        check_weights_fit(model, {**coco, "backbone.weight": np.zeros((8, 3, 3, 3), np.float32)}, "other.pkl",
                          "resnext101_32x8d_fpn")


@pytest.mark.slow
def test_an_r101_file_does_not_start_the_x101_model(tiny, tmp_path):
    """detectron2 would only warn and train a mostly random network: main.py stops with the reason;
    the same file starts the R101 model."""
    weights = tmp_path / "r101.pkl"
    fake_zoo_pkl(weights, 0, backbone__bottom_up__res2__0__conv1__weight=(64, 64, 1, 1))  # R101's; X101's is 256 wide
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(MAIN), "--engine", "detectron2", "--backbone", "resnext101",
                           *d2_overrides(tiny, run)[2:], f"model.weights={weights}", "train.images_per_gpu=1",
                           "train.max_iters_per_epoch=1", "train.max_epochs=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "do not fit the resnext101_32x8d_fpn model" in proc.stderr and "res2.0.conv1.weight: (64, 64, 1, 1) vs (256, 64, 1, 1)" \
        in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not list(run.glob("model_*.pth"))
    fits = subprocess.run([sys.executable, str(MAIN), "--engine", "detectron2", "--backbone", "resnet101",
                           *d2_overrides(tiny, tmp_path / "r101")[2:], f"model.weights={weights}", "train.images_per_gpu=1",
                           "train.max_iters_per_epoch=1", "train.max_epochs=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert fits.returncode == 0, fits.stderr[-3000:]  # the same file fits R101: trained
    assert "2 tensors fit the resnet101_fpn model" in fits.stderr and (tmp_path / "r101" / "model_final.pth").is_file()


def test_the_two_engines_do_not_share_a_run_folder(tiny, tmp_path):
    from hpa_scc.engine.d2train import prepare_d2_run
    from hpa_scc.engine.train import check_resume

    tv, d2 = tmp_path / "tv", tmp_path / "d2"
    tv.mkdir()
    (tv / "last.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"tv holds a torchvision-engine run \(last\.pt\).*use another train\.run_dir"):
        prepare_d2_run(load_config(REPO / "configs" / "resnet101_fpn.yaml", d2_overrides(tiny, tv)))
    d2.mkdir()
    (d2 / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(ValueError, match=r"d2 holds a detectron2-engine run \(last_checkpoint\).*use another train\.run_dir"):
        check_resume(load_config(REPO / "configs" / "resnet101_fpn.yaml", [f"train.run_dir={d2}"]), d2)


def test_a_crafted_d2_config_runs_no_code_on_predict(tmp_path):
    """Issue 27 row 1: detectron2 reads a YAML it cannot safe-load with yaml.unsafe_load unless
    told not to; a run folder's d2_config.yaml with a python tag must not run it."""
    from hpa_scc.config import load_config
    from hpa_scc.models.d2model import D2_CONFIG, load_d2_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "last_checkpoint").write_text("model_0000001.pth")
    (run / "model_0000001.pth").write_bytes(b"")
    marker = tmp_path / "ran"
    (run / D2_CONFIG).write_text(f"MODEL: !!python/object/apply:os.system ['touch {marker}']\n")
    cfg = load_config(None, ["model.engine=detectron2", "model.backbone=resnet101_fpn", "model.head=softmax"])
    with pytest.raises(Exception):
        load_d2_run(run, cfg, "best.pt")
    assert not marker.exists()
