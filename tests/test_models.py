"""build_model: every backbone and head trains and predicts on CPU; weights are found, adapted and loaded.

Random init only: nothing is downloaded. The two 101-layer FPN models run once each (slow).
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from hpa_scc.config import BACKBONE_NAMES, ModelConfig
from hpa_scc.models.detector import BACKBONES, IMAGENET_FILES, build_model, place_stride, score_boxes

SIZE = 128
LOSSES = {"softmax": {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}}
LOSSES["multilabel"] = LOSSES["softmax"] | {"loss_multilabel"}


def make_batch(head: str, in_channels: int, n_images: int = 2, seed: int = 0):
    """Random images in [0, 1] and three rectangular cells per image, in the head's target format."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n_images):
        images.append(torch.rand(in_channels, SIZE, SIZE, generator=g))
        masks = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
        boxes = []
        for i, (x, y) in enumerate([(10, 10), (60, 20), (30, 70)]):
            masks[i, y:y + 30, x:x + 25] = 1
            boxes.append([x, y, x + 25, y + 30])
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "masks": masks}
        if head == "multilabel":
            target["labels"] = torch.ones(3, dtype=torch.int64)
            target["label_vectors"] = torch.tensor([[1.0] + [0.0] * 18, [0.0] * 18 + [1.0], [0.5] * 19])
        else:
            target["labels"] = torch.tensor([1, 5, 19])
        targets.append(target)
    return images, targets


def check_train_and_eval(model: torch.nn.Module, head: str, in_channels: int) -> None:
    torch.manual_seed(0)
    images, targets = make_batch(head, in_channels)
    model.train()
    losses = model(images, targets)
    assert set(losses) == LOSSES[head]
    assert all(math.isfinite(v.item()) for v in losses.values()), losses
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    watched = {name: p.detach().clone() for name, p in model.named_parameters()
               if name in ("backbone.body.layer4.0.conv1.weight", "backbone.body.denseblock4.denselayer1.conv1.weight",
                           "roi_heads.box_head.fc6.weight", "roi_heads.label_predictor.weight")}
    sum(losses.values()).backward()
    optimizer.step()
    params = dict(model.named_parameters())
    for name, before in watched.items():
        assert not torch.equal(params[name].detach(), before), f"{name} did not change"

    model.eval()
    with torch.no_grad():
        outputs = model(images[:1])
    (out,) = outputs
    keys = {"boxes", "labels", "scores", "masks"} | ({"label_scores"} if head == "multilabel" else set())
    assert set(out) == keys
    n = len(out["boxes"])
    assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,) and out["labels"].dtype == torch.int64
    assert out["masks"].shape == (n, 1, SIZE, SIZE)
    if head == "multilabel":
        assert out["label_scores"].shape == (n, 19)
        assert ((out["label_scores"] >= 0) & (out["label_scores"] <= 1)).all()
        assert (out["labels"] == 1).all()
    else:
        assert ((out["labels"] >= 1) & (out["labels"] <= 19)).all()


@pytest.mark.parametrize("in_channels", [3, 4])
@pytest.mark.parametrize("head", ["softmax", "multilabel"])
@pytest.mark.parametrize("backbone", ["densenet121", "densenet121_fpn"])
def test_densenet_train_and_eval(backbone, head, in_channels):
    model = build_model(ModelConfig(backbone=backbone, head=head, in_channels=in_channels), image_size=SIZE)
    assert model.backbone.body.conv0.in_channels == in_channels
    assert len(model.transform.image_mean) == in_channels
    if backbone == "densenet121_fpn":  # four body levels + P6, one anchor size each, as the ResNet FPNs
        assert len(model.rpn.anchor_generator.sizes) == 5
        features = model.backbone(torch.rand(1, in_channels, SIZE, SIZE))
        assert {k: tuple(v.shape[1:]) for k, v in features.items()} == {
            "0": (256, 32, 32), "1": (256, 16, 16), "2": (256, 8, 8), "3": (256, 4, 4), "pool": (256, 2, 2)}
    check_train_and_eval(model, head, in_channels)


@pytest.mark.slow
@pytest.mark.parametrize("in_channels", [3, 4])
@pytest.mark.parametrize("head", ["softmax", "multilabel"])
@pytest.mark.parametrize("backbone", ["resnet101_fpn", "resnext101_32x8d_fpn"])
def test_fpn_train_and_eval(backbone, head, in_channels):
    model = build_model(ModelConfig(backbone=backbone, head=head, in_channels=in_channels), image_size=SIZE)
    assert model.backbone.body.conv1.in_channels == in_channels
    assert len(model.rpn.anchor_generator.sizes) == 5
    if backbone == "resnext101_32x8d_fpn":
        assert model.backbone.body.layer1[0].conv2.groups == 32
    check_train_and_eval(model, head, in_channels)
    del model
    gc.collect()


def test_unknown_backbone_lists_choices():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'.*densenet121.*resnet101_fpn.*resnext101_32x8d_fpn"):
        build_model(ModelConfig(backbone="vgg"))
    assert sorted(BACKBONES) == ["densenet121", "densenet121_fpn", "resnet101_fpn", "resnext101_32x8d_fpn"]
    assert sorted(BACKBONES) == sorted(BACKBONE_NAMES)  # what the config accepts, models builds


def test_imagenet_weights_missing_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"hub/checkpoints/resnet101-63fe2227\.pth.*never downloads"):
        build_model(ModelConfig(backbone="resnet101_fpn", weights="imagenet"))


@pytest.mark.parametrize("backbone", ["densenet121", "densenet121_fpn"])
def test_imagenet_rgb_weights_make_a_4_channel_stem(backbone, tmp_path, monkeypatch):
    """Yellow filter = red filter; all four scaled by 3/4; BN frozen; early stages frozen (both DenseNet bodies)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    rgb = torchvision.models.densenet121(weights=None).state_dict()
    torch.save(rgb, folder / IMAGENET_FILES[backbone][0])
    model = build_model(ModelConfig(backbone=backbone, in_channels=4, weights="imagenet",
                                    trainable_backbone_layers=2), image_size=SIZE)
    stem = model.backbone.body.conv0.weight.detach()
    red = rgb["features.conv0.weight"][:, 0]
    torch.testing.assert_close(stem[:, 3], red * 0.75, rtol=0, atol=0)
    torch.testing.assert_close(stem[:, :3], rgb["features.conv0.weight"] * 0.75, rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.body.denseblock2.denselayer1.conv1.weight.detach(),
                               rgb["features.denseblock2.denselayer1.conv1.weight"], rtol=0, atol=0)
    assert isinstance(model.backbone.body.norm5, FrozenBatchNorm2d)
    mean = model.transform.image_mean
    assert mean == pytest.approx([0.485, 0.456, 0.406, 0.485])
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"denseblock3", "transition3", "denseblock4"}
    del model
    by_path = build_model(ModelConfig(backbone=backbone, in_channels=4,
                                      weights=str(folder / IMAGENET_FILES[backbone][0])), image_size=SIZE)
    torch.testing.assert_close(by_path.backbone.body.conv0.weight.detach(), stem, rtol=0, atol=0)


def test_project_checkpoint_round_trip(tmp_path):
    cfg = ModelConfig(backbone="densenet121", head="multilabel", in_channels=3, pixel_mean=[0.1, 0.2, 0.3])
    torch.manual_seed(1)
    model = build_model(cfg, image_size=SIZE).eval()
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    images, _ = make_batch("multilabel", 3, n_images=1)
    with torch.no_grad():
        expected = model(images)[0]
    del model
    torch.manual_seed(2)  # another random init: only the checkpoint can make the outputs equal
    fresh = build_model(ModelConfig(backbone="densenet121", head="multilabel", in_channels=3, weights=str(path)),
                        image_size=SIZE).eval()
    assert fresh.transform.image_mean == pytest.approx([0.1, 0.2, 0.3])  # input statistics travel with the weights
    with torch.no_grad():
        got = fresh(images)[0]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


def test_checkpoint_with_wrong_shapes_is_refused(tmp_path):
    model = build_model(ModelConfig(backbone="densenet121", in_channels=3), image_size=SIZE)
    path = tmp_path / "rgb.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="shapes differ"):
        build_model(ModelConfig(backbone="densenet121", in_channels=4, weights=str(path)), image_size=SIZE)


def test_other_head_checkpoint_drops_predictors(tmp_path, caplog):
    """A softmax checkpoint into a multilabel model: everything but the predictors loads, and the log says so."""
    model = build_model(ModelConfig(backbone="densenet121", in_channels=3, head="softmax"), image_size=SIZE)
    path = tmp_path / "softmax.pt"
    torch.save({"model": model.state_dict()}, path)
    with caplog.at_level("INFO", logger="hpa_scc.models.detector"):
        other = build_model(ModelConfig(backbone="densenet121", in_channels=3, head="multilabel", weights=str(path)),
                            image_size=SIZE)
    torch.testing.assert_close(other.roi_heads.box_head.fc6.weight, model.roi_heads.box_head.fc6.weight)
    assert "dropped 6 predictor tensors (shapes differ" in caplog.text
    assert "left at init" in caplog.text and "roi_heads.label_predictor" in caplog.text


def test_stride_placement_travels_with_the_checkpoint(tmp_path):
    """A model made from detectron2's R101 strides in the 1x1 conv; its checkpoint must rebuild it so."""
    cfg = ModelConfig(backbone="resnet101_fpn", in_channels=3)
    model = build_model(cfg, image_size=SIZE)
    assert model.backbone.body.layer2[0].conv2.stride == (2, 2)  # torchvision's placement by default
    place_stride(model.backbone.body, True)
    state = model.state_dict()
    del model
    path = tmp_path / "r101.pt"
    torch.save({"model": state}, path)
    fresh = build_model(ModelConfig(backbone="resnet101_fpn", in_channels=3, weights=str(path)), image_size=SIZE)
    for layer in ("layer2", "layer3", "layer4"):
        block = getattr(fresh.backbone.body, layer)[0]
        assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    del fresh
    resumed = build_model(cfg, image_size=SIZE)  # the trainer's resume: load_state_dict on a fresh model
    resumed.load_state_dict(state)
    assert resumed.backbone.body.layer3[0].conv1.stride == (2, 2)
    del resumed, state
    gc.collect()


def test_anchor_sizes_and_pixel_stats():
    model = build_model(ModelConfig(backbone="densenet121", in_channels=4), image_size=512)
    assert model.rpn.anchor_generator.sizes == ((32, 64, 96, 128, 192),)  # cells are 60-100 px at 512
    assert model.transform.min_size == (512,) and model.transform.max_size == 512
    assert model.transform.image_std == pytest.approx([0.229, 0.224, 0.225, 0.229])
    model = build_model(ModelConfig(backbone="densenet121", in_channels=3, anchor_sizes=[16, 48],
                                    pixel_mean=[0.0, 0.0, 0.0], pixel_std=[1.0, 1.0, 1.0]), image_size=SIZE)
    assert model.rpn.anchor_generator.sizes == ((16, 48),)
    assert model.transform.image_mean == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="takes 3"):
        model.eval()(make_batch("softmax", 4, n_images=1)[0])


def test_input_transform_skips_the_identity_resize_and_matches_torchvision():
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from hpa_scc.models.detector import InputTransform

    t = InputTransform(64, [0.1] * 4, [0.2] * 4)
    image = torch.rand(4, 64, 48)
    masks = (torch.rand(3, 64, 48) > 0.5).to(torch.uint8)
    target = {"masks": masks, "boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]] * 3)}
    ours = t.resize(image, dict(target))
    theirs = GeneralizedRCNNTransform.resize(t, image, dict(target))
    assert ours[0] is image  # no copy, no interpolation
    assert torch.allclose(ours[0], theirs[0], atol=1e-6) and torch.equal(ours[1]["masks"], theirs[1]["masks"])
    assert torch.allclose(ours[1]["boxes"], theirs[1]["boxes"])
    bigger = t.resize(torch.rand(4, 128, 128))[0]  # other sizes still go through torchvision
    assert bigger.shape == (4, 64, 64)


def test_head_sizes_come_from_the_config():
    cfg = ModelConfig(rpn_post_nms_top_n_train=256, rpn_post_nms_top_n_test=200, box_batch_size_per_image=128,
                      box_score_thresh=0.001, box_detections_per_img=200)
    model = build_model(cfg, image_size=128)
    assert model.rpn._post_nms_top_n == {"training": 256, "testing": 200}
    assert model.rpn._pre_nms_top_n == {"training": 1000, "testing": 1000}
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 128
    assert (model.roi_heads.score_thresh, model.roi_heads.detections_per_img) == (0.001, 200)
    default = build_model(ModelConfig(), image_size=128)
    assert default.rpn._post_nms_top_n == {"training": 2000, "testing": 1000}
    assert default.roi_heads.fg_bg_sampler.batch_size_per_image == 512


@pytest.mark.parametrize("backbone", ["densenet121", "densenet121_fpn"])
def test_score_boxes_gives_every_given_box_its_19_scores(backbone):
    """The multilabel head scores boxes from outside: one row per box, in [0, 1], independent of the other boxes."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, in_channels=4), image_size=SIZE).eval()
    images, targets = make_batch("multilabel", 4, n_images=2)
    boxes = [targets[0]["boxes"], targets[1]["boxes"][:2]]
    with torch.no_grad():
        together = score_boxes(model, images, boxes)
        alone = [score_boxes(model, [image], [b[None]])[0] for image, bs in zip(images, boxes) for b in bs]
        empty = score_boxes(model, images[:1], [torch.zeros(0, 4)])
    assert [tuple(s.shape) for s in together] == [(3, 19), (2, 19)]
    assert all(((s >= 0) & (s <= 1)).all() for s in together)
    torch.testing.assert_close(torch.cat(alone), torch.cat(together), rtol=0, atol=1e-5)
    assert tuple(empty[0].shape) == (0, 19)
    softmax = build_model(ModelConfig(backbone="densenet121", head="softmax", in_channels=4), image_size=SIZE).eval()
    with pytest.raises(ValueError, match="multilabel head"):
        score_boxes(softmax, images, boxes)


def test_mask_pooled_labels_read_the_cell_not_its_box():
    """model.label_pooling=mask: a cell's label scores depend on the pixels under its mask only, so
    changing what else its box holds (a neighbour's pixels) leaves them unchanged; the box pooling
    sees the change. It trains (the label classifier learns through the masked features) and
    scores its own detections."""
    from hpa_scc.config import ConfigError, load_config

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="densenet121", in_channels=4, label_pooling="mask"), image_size=SIZE)
    check_train_and_eval(model, "multilabel", 4)
    model.eval()
    box_model = build_model(ModelConfig(backbone="densenet121", in_channels=4), image_size=SIZE).eval()
    box_model.load_state_dict(model.state_dict())  # the same weights, pooled by the box
    image = torch.rand(4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    box = torch.tensor([[16.0, 16.0, 80.0, 80.0]])
    cell = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    cell[0, 40:56, 40:56] = True  # a small cell in the middle of a big box
    other = image.clone()
    other[:, 16:32, 16:80] = 1.0  # the box's edge (outside the cell) changed

    def scores(m, im):
        with torch.no_grad():
            return score_boxes(m, [im], [box], [cell])[0]

    # the backbone's receptive field reaches past the mask: the masked features move a little,
    # far less than the box-pooled ones
    masked_change = (scores(model, image) - scores(model, other)).abs().max()
    box_change = (scores(box_model, image) - scores(box_model, other)).abs().max()
    assert box_change > 0 and masked_change < 0.5 * box_change, (masked_change, box_change)
    with pytest.raises(ValueError, match="give score_boxes one mask per box"):
        score_boxes(model, [image], [box])
    with pytest.raises(ConfigError, match="model.label_pooling=mask is a choice of the Mask R-CNN multilabel head"):
        load_config(None, ["model.head=softmax", "model.label_pooling=mask"])
    with pytest.raises(ConfigError, match="model.label_pooling = 'cell'"):
        load_config(None, ["model.label_pooling=cell"])


def segmenter_scoring_case(**model_options):
    """A DenseNet121 multilabel detector (eval, as predict loads it), a random uint8 image and a
    label image of two cells: what engine.inference.box_scores gets on the predict path."""
    import numpy as np

    from hpa_scc.engine.inference import LoadedModel

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="densenet121", in_channels=4, **model_options), image_size=SIZE).eval()
    loaded = LoadedModel(model, SIZE, 4, "multilabel", torch.device("cpu"))
    image = (np.random.default_rng(0).random((4, SIZE, SIZE)) * 255).astype(np.uint8)
    cells = np.zeros((SIZE, SIZE), np.uint16)
    cells[10:40, 10:35], cells[50:90, 60:100] = 1, 2
    return model, loaded, image, cells


def test_box_scores_hand_a_mask_pooled_detector_each_segmenter_cells_mask():
    """The predict/refine path (engine.inference.box_scores): a mask-pooled detector gets each
    segmenter cell's own mask, so its scores equal score_boxes given those masks (flip TTA too)."""
    import numpy as np

    from hpa_scc.engine.inference import box_scores, cell_boxes

    model, loaded, image, cells = segmenter_scoring_case(label_pooling="mask")
    got = box_scores(loaded, [image], [cells], [2])[0]
    masks = [torch.from_numpy(np.stack([cells == 1, cells == 2]))]
    with torch.no_grad():
        expected = score_boxes(model, [torch.from_numpy(image).float() / 255], [torch.from_numpy(cell_boxes(cells, 2))],
                               masks)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    flipped = box_scores(loaded, [image], [cells], [2], tta=True)[0]
    assert flipped.shape == (2, 19) and not np.allclose(flipped, got)


def feature_batch(n_images: int = 2):
    """make_batch's images and cells with each cell's hand-made features in the targets."""
    import numpy as np

    from hpa_scc.data.features import mask_features

    images, targets = make_batch("multilabel", 4, n_images)
    for image, target in zip(images, targets):
        pixels = (image * 255).round().to(torch.uint8).numpy()
        target["cell_features"] = torch.from_numpy(mask_features(pixels, target["masks"].numpy()))
        assert np.abs(target["cell_features"].numpy()).sum(1).min() > 0
    return images, targets


def test_feature_head_trains_on_the_cells_features_and_scores_its_detections_under_their_masks():
    """model.cell_features=true: the label head reads each cell's hand-made features beside its RoI
    features. Training needs them in the targets and fits their scaler and weights; the model's own
    detections are scored under their masks, as score_boxes scores the same boxes and masks; the
    features move the scores where the RoI features do not."""
    from hpa_scc.config import ConfigError, load_config
    from hpa_scc.models.detector import CellFeatureMaskRCNN

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="densenet121", in_channels=4, cell_features=True), image_size=SIZE)
    assert isinstance(model, CellFeatureMaskRCNN) and model.roi_heads.cell_features == 78
    images, targets = feature_batch()
    model.train()
    before = {k: v.detach().clone() for k, v in model.roi_heads.state_dict().items() if k.startswith("feature_")}
    losses = model(images, targets)
    assert set(losses) == LOSSES["multilabel"] and all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    after = model.roi_heads.state_dict()
    for key in ("feature_predictor.weight", "feature_norm.running_mean", "feature_norm.running_var"):
        assert not torch.equal(after[key], before[key]), f"{key} did not change"
    with pytest.raises(ValueError, match="model.cell_features=true"):
        model(images, [{k: v for k, v in t.items() if k != "cell_features"} for t in targets])

    model.eval()
    model.roi_heads.score_thresh = 0.0  # an untrained detector: keep what it finds
    with torch.no_grad():
        detections = model(images)
    assert sum(len(d["boxes"]) for d in detections) > 0
    for image, d in zip(images, detections):
        assert d["label_scores"].shape == (len(d["boxes"]), 19)
        if len(d["boxes"]):
            with torch.no_grad():
                again = score_boxes(model, [image], [d["boxes"]], [d["masks"][:, 0] > 0.5])[0]
            torch.testing.assert_close(d["label_scores"], again, rtol=0, atol=1e-5)

    # the same boxes with other features: only the feature term moves the scores
    boxes = [targets[0]["boxes"]]
    feats = targets[0]["cell_features"]
    with torch.no_grad():
        base = score_boxes(model, images[:1], boxes, cell_features=[feats])[0]
        moved = score_boxes(model, images[:1], boxes, cell_features=[feats.flip(0)])[0]
    assert base.shape == moved.shape == (3, 19) and not torch.allclose(base, moved)
    with pytest.raises(ValueError, match="give score_boxes the cells' features, or one mask per box"):
        score_boxes(model, images[:1], boxes)
    with pytest.raises(ConfigError, match="model.cell_features=true is a choice of the torchvision Mask R-CNN"):
        load_config(None, ["model.cell_features=true", "model.in_channels=3"])
    with pytest.raises(ConfigError, match="model.cell_features=true"):
        load_config(None, ["model.cell_features=true", "model.head=softmax"])


def test_feature_head_starts_as_the_features_model_it_is_given(tmp_path):
    """model.cell_features_init: the head's cell-features layer starts as a fitted features model
    (its scaler, fixed in training, and its logistic regression) and the RoI label layer at zero, so
    the untrained detector scores a cell as that model does; training moves the weights, not the
    scaler; a checkpoint says so to the inference model built without the file; other files are
    refused by name."""
    from hpa_scc.config import ConfigError, load_config
    from hpa_scc.data.features import FEATURE_NAMES
    from hpa_scc.models.cells import FeatureClassifier
    from hpa_scc.utils.checkpoint import save_checkpoint

    torch.manual_seed(1)
    images, targets = feature_batch()
    feats = targets[0]["cell_features"]
    teacher = FeatureClassifier(len(FEATURE_NAMES))
    with torch.no_grad():
        teacher.mean.copy_(feats.mean(0))
        spread = feats.std(0)  # scikit-learn's StandardScaler: scale 1 where a feature is constant
        teacher.scale.copy_(torch.where(spread > 1e-6, spread, torch.ones_like(spread)))
        teacher.linear.weight.normal_(0, 0.3)
        teacher.linear.bias.normal_(0, 1)
    path = tmp_path / "best.pt"
    assert (teacher.scale < 1e-5 ** 0.5).sum() > 0  # scales below BatchNorm's sqrt(eps): the weights take them
    save_checkpoint(path, {"model": teacher.state_dict(), "family": "features"})
    cfg = ModelConfig(backbone="densenet121", in_channels=4, cell_features=True, cell_features_init=str(path))
    model = build_model(cfg, image_size=SIZE)
    heads = model.roi_heads
    assert bool(heads.fixed_feature_scale) and heads.label_predictor.weight.abs().sum() == 0
    boxes = [targets[0]["boxes"]]
    model.eval()
    with torch.no_grad():
        got = score_boxes(model, images[:1], boxes, cell_features=[feats])[0]
        want = torch.sigmoid(teacher.logits(feats))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert want.std() > 0.1  # not a constant the zero layer would also give

    model.train()
    scale = {k: v.clone() for k, v in heads.state_dict().items() if k.startswith("feature_norm.running")}
    weight = heads.feature_predictor.weight.detach().clone()
    sum(model(images, targets).values()).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for key, value in scale.items():
        torch.testing.assert_close(heads.state_dict()[key], value, rtol=0, atol=0, msg=f"{key} moved")
    assert not torch.equal(heads.feature_predictor.weight, weight)
    assert heads.label_predictor.weight.abs().sum() > 0  # the RoI features learn beside it

    # inference builds the model without the file (engine.inference); the checkpoint carries the scaler's mode
    plain = build_model(ModelConfig(backbone="densenet121", in_channels=4, cell_features=True), image_size=SIZE)
    assert not bool(plain.roi_heads.fixed_feature_scale)
    plain.load_state_dict(model.state_dict())
    assert bool(plain.roi_heads.fixed_feature_scale)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("fixed_feature_scale")}
    plain.load_state_dict(old)  # a checkpoint from before the flag: batch statistics, as it trained
    assert not bool(plain.roi_heads.fixed_feature_scale)

    boosted = tmp_path / "boosted.pt"
    save_checkpoint(boosted, {"model": {"feature": torch.zeros(3)}, "family": "features"})
    with pytest.raises(ValueError, match=f"{boosted}: the head needs a logistic regression of shape"):
        build_model(ModelConfig(backbone="densenet121", in_channels=4, cell_features=True,
                                cell_features_init=str(boosted)), image_size=SIZE)
    cell = tmp_path / "cell.pt"
    save_checkpoint(cell, {"model": {}, "family": "cell"})
    with pytest.raises(ValueError, match=f"{cell} holds a cell model, not a features-family one"):
        build_model(ModelConfig(backbone="densenet121", in_channels=4, cell_features=True,
                                cell_features_init=str(cell)), image_size=SIZE)
    with pytest.raises(FileNotFoundError, match=f"model.cell_features_init: {tmp_path / 'gone.pt'} not found"):
        build_model(ModelConfig(backbone="densenet121", in_channels=4, cell_features=True,
                                cell_features_init=str(tmp_path / "gone.pt")), image_size=SIZE)
    with pytest.raises(ConfigError, match="set model.cell_features=true"):
        load_config(None, [f"model.cell_features_init={path}"])


def test_box_scores_hand_a_feature_head_each_segmenter_cells_features():
    """The predict/refine path: a feature-head detector's segmenter cells are measured with the
    features family's own cell_features on the label image; the same as score_boxes measuring
    them under each cell's mask."""
    import numpy as np

    from hpa_scc.data.features import cell_features
    from hpa_scc.engine.inference import box_scores, cell_boxes

    model, loaded, image, cells = segmenter_scoring_case(cell_features=True)
    got = box_scores(loaded, [image], [cells], [2])[0]
    tensor = torch.from_numpy(image).float() / 255
    boxes = [torch.from_numpy(cell_boxes(cells, 2))]
    with torch.no_grad():
        by_masks = score_boxes(model, [tensor], boxes, [torch.from_numpy(np.stack([cells == 1, cells == 2]))])[0]
        given = score_boxes(model, [tensor], boxes,
                            cell_features=[torch.from_numpy(cell_features(image, cells, [1, 2]))])[0]
    np.testing.assert_allclose(got, given.numpy(), atol=1e-6)
    np.testing.assert_allclose(got, by_masks.numpy(), atol=1e-6)
    assert box_scores(loaded, [image], [cells], [2], tta=True)[0].shape == (2, 19)


def test_summed_label_loss_is_the_mean_times_the_classes():
    """model.label_loss=sum: the multilabel BCE summed over a cell's 19 classes (mean over the
    positives), 19x the default mean over classes on the same weights and batch; the other losses
    are unchanged."""
    from hpa_scc.config import ConfigError, load_config

    losses = {}
    for rule in ("mean", "sum"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone="densenet121", in_channels=4, label_loss=rule), image_size=SIZE).train()
        images, targets = make_batch("multilabel", 4)
        torch.manual_seed(1)  # the same proposals sampled
        losses[rule] = {k: v.item() for k, v in model(images, targets).items()}
    assert losses["sum"]["loss_multilabel"] == pytest.approx(19 * losses["mean"]["loss_multilabel"], rel=1e-5)
    assert losses["sum"]["loss_mask"] == pytest.approx(losses["mean"]["loss_mask"], rel=1e-6)
    with pytest.raises(ConfigError, match="model.label_loss=sum is a choice of the Mask R-CNN multilabel head"):
        load_config(None, ["model.label_loss=sum", "model.family=features"])
