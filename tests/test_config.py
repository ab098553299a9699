from pathlib import Path

import pytest
import yaml

from hpa_scc.config import ConfigError, load_config, save_config

REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


def test_defaults_yaml_differences_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: {backbone: resnet101_fpn}\noptim: {lr: 0.02}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\noptim: {lr: 0.005}\ntrain: {max_epochs: 3}\n")
    cfg = load_config(child, ["train.images_per_gpu=8", "model.anchor_sizes=[16, 32]", "model.weights=null"])
    assert cfg.model.backbone == "resnet101_fpn"  # from base
    assert cfg.optim.lr == 0.005 and cfg.train.max_epochs == 3  # child wins over base
    assert cfg.train.images_per_gpu == 8 and cfg.model.anchor_sizes == [16, 32]
    assert cfg.optim.momentum == 0.9  # untouched default
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0  # int accepted for a float


def test_every_shipped_config_loads():
    names = sorted(p.name for p in REPO_CONFIGS.glob("*.yaml"))
    assert {"densenet121.yaml", "resnet101_fpn.yaml", "resnext101_32x8d_fpn.yaml", "smoke.yaml"} <= set(names)
    backbones = {load_config(REPO_CONFIGS / n).model.backbone for n in names}
    assert {"densenet121", "densenet121_fpn", "resnet101_fpn", "resnext101_32x8d_fpn"} <= backbones


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown key 'optim.lrr'"),
    ("train.max_epochs=two", "train.max_epochs in override 'train.max_epochs=two': expected int"),
    ("model.backbone=vgg16", "model.backbone = 'vgg16'; choose one of"),
    ("data.layout=per_label", "model.head 'multilabel' trains on the 'multilabel' layout.*set data.layout=multilabel"),
    ("data.layout=coco", "data.layout = 'coco'; choose one of"),
    ("model.pixel_mean=[0.5, 0.5, 0.5]", "3 values for model.in_channels=4"),
    ("train.amp=maybe", "expected bool"),
    ("optim", "is not key=value"),
    ("optim.lr=-0.01", "optim.lr must be > 0, got -0.01"),
    ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
    ("optim.momentum=-1", "optim.momentum must be in .0, 1., got -1.0"),
    ("data.hflip_prob=2", "data.hflip_prob must be in .0, 1., got 2.0"),
    ("optim.warmup_factor=0", "optim.warmup_factor must be in .0, 1., got 0.0"),
    ("train.dist_timeout_min=0", "train.dist_timeout_min must be >= 1, got 0"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.epochs' in .*bad.yaml"):
        load_config(path)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_is_saved_and_reloads(tmp_path):
    cfg = load_config(None, ["optim.name=adamw", "train.run_dir=x"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["optim"]["name"] == "adamw" and saved["model"]["backbone"] == "densenet121"
    assert load_config(tmp_path / "config.yaml") == cfg


def test_layout_follows_the_head():
    """The multilabel head is the default; data.layout left null becomes the layout the head trains on."""
    cfg = load_config(None)
    assert (cfg.model.head, cfg.data.layout) == ("multilabel", "multilabel")
    assert load_config(None, ["model.head=softmax"]).data.layout == "per_label"
    assert load_config(None, ["model.head=softmax", "data.layout=per_label"]).data.layout == "per_label"
    with pytest.raises(ConfigError, match="'softmax' trains on the 'per_label' layout"):
        load_config(None, ["model.head=softmax", "data.layout=multilabel"])


def test_a_bad_value_stops_train_before_the_run_folder_exists(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "hpa_scc", "train", "configs/smoke.yaml", f"train.run_dir={run}",
                           "optim.lr=-0.01"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1 and "optim.lr must be > 0, got -0.01" in proc.stderr
    assert not run.exists()


def test_one_registry_of_families_names_what_the_models_build():
    """Issue 28: constants.FAMILIES is the one list of families; the config validates against it
    and the models build exactly its cell backbones (no parallel name lists)."""
    from hpa_scc.constants import FAMILIES
    from hpa_scc.engine.families import VAL_METRIC
    from hpa_scc.models.cells import CELL_BACKBONES

    assert set(CELL_BACKBONES) == set(FAMILIES["cell"].backbones)
    assert VAL_METRIC == {name: f.val_metric for name, f in FAMILIES.items()}
    with pytest.raises(ConfigError, match=r"model.family = 'nope'; choose one of \['maskrcnn', 'cell', 'features'\]"):
        load_config(None, ["model.family=nope"])
    with pytest.raises(ConfigError, match="train.device = 'tpu'; choose one of auto, cpu, cuda, cuda:N"):
        load_config(None, ["train.device=tpu"])
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"


def test_resume_changes_treat_a_key_added_later_at_its_default_as_no_change():
    """A run folder started before a config key existed resumes when the key is at its default
    (that is what the older version did), and is refused when it is not."""
    from hpa_scc.config import resume_changes, to_dict

    cfg = load_config(None)
    saved = to_dict(cfg)
    del saved["model"]["label_pooling"]  # written by a version without the key
    assert resume_changes(saved, cfg) == ({}, {})
    changed = load_config(None, ["model.head=multilabel", "model.label_pooling=mask"])
    saved = to_dict(changed)
    del saved["model"]["label_pooling"]
    _, refused = resume_changes(saved, changed)
    assert refused == {"model.label_pooling": (None, "mask")}
    saved["optim"]["lr"] = 0.5  # a key the run does hold still counts
    _, refused = resume_changes(saved, changed)
    assert set(refused) == {"model.label_pooling", "optim.lr"}
