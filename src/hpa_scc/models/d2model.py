"""detectron2's Mask R-CNN for this project's config, and that model behind the torchvision interface.

    d2cfg = build_d2_config(cfg, num_gpus=1)          # a model-zoo config with the project's overrides
    model = D2Detector(build_d2_model(d2cfg), image_size=cfg.data.image_size).eval()
    outputs = model([image])                          # float [C, H, W] in [0, 1], as the torchvision model

detectron2 is imported lazily (inside functions) so the rest of the package runs without it;
install it with ``bash scripts/setup.sh --detectron2``.

Inputs. detectron2 normalises ``(x - PIXEL_MEAN) / PIXEL_STD`` on 0..255 values in the order
the images are fed. This project feeds the prepared cache's channels as they are, RGB(Y), so
``INPUT.FORMAT`` is ``RGB`` and PIXEL_MEAN/STD have 3 or 4 values (a 4-channel config builds a
4-channel stem: detectron2 takes the stem's input channels from ``len(PIXEL_MEAN)``). The values
are the torchvision engine's statistics times 255 (``model.pixel_mean``/``pixel_std`` when set;
detectron2's own for a model-zoo .pkl, reordered BGR -> RGB, yellow = red), so both engines see
the same normalised inputs. A model-zoo .pkl is converted once into the run folder
(``convert_zoo_weights``): stem BGR -> RGB and the 4th channel made from red (``adapt_stem``),
which detectron2's checkpointer could not do (it skips a stem of another shape).

Why the predictor is an adapter (``D2Detector``) and not a conversion into the torchvision model
(``models.d2import``): a detectron2 run is then scored by exactly the network it trained, with
detectron2's ROIAlignV2 (aligned=True, adaptive sampling), its anchors and box decoding. The
converted torchvision model has the same weights but pools RoIs with MultiScaleRoIAlign
(aligned=False, sampling_ratio=2) and rounds its base anchors, so its detections differ slightly;
that is fine for fine-tuning, not for scoring a run. How much, measured by
tests/test_detectron2.py (R101-FPN, random zoo-format weights, one 128 px image): backbone + FPN
outputs agree to 1e-6 of their scale (float rounding only); the top 20 detections have the same
top class, scores within 0.01, and each overlaps one of the other model's detections of its class
with box IoU >= 0.5 (~0.7 on average): RoIs pooled half a pixel apart with other sampling points
shift the scores a little, and nearly tied random-weight scores then reorder overlapping boxes.
``D2Detector`` takes and returns what ``hpa_scc.engine.inference.detect_batch`` gives and reads
from the torchvision model: a list of float [C, H, W] images in [0, 1] in, one dict per image out
with ``boxes`` float [N, 4] xyxy, ``labels`` int64 [N] in 1..19, ``scores`` [N] and ``masks``
float [N, 1, H, W] probabilities (pasted at the input size, quantised to 1/255).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hpa_scc.config import Config
from hpa_scc.utils.device import device_type
from hpa_scc.utils.fileio import atomic_path
from hpa_scc.constants import NUM_CLASSES

log = logging.getLogger(__name__)

# project backbone -> detectron2 model-zoo config (the original implementation's two runs)
ZOO_CONFIGS = {"resnet101_fpn": "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml",
               "resnext101_32x8d_fpn": "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml"}
D2_CONFIG = "d2_config.yaml"  # detectron2's resolved config, beside the project's config.yaml
CONVERTED_WEIGHTS = "init_weights_rgb.pkl"  # a zoo .pkl with its stem made RGB(Y), in the run folder
INSTALL_HINT = "install it with: bash scripts/setup.sh --detectron2"


def require_detectron2():
    """The detectron2 module, or an ImportError that says how to install it."""
    try:
        import detectron2
    except ImportError as exc:
        raise ImportError(f"the detectron2 engine needs detectron2 ({exc}); {INSTALL_HINT}") from None
    return detectron2


def pixel_stats_0_255(cfg: Config) -> tuple[list[float], list[float]]:
    """PIXEL_MEAN / PIXEL_STD on 0..255 in the fed channel order: the torchvision engine's statistics x 255."""
    from hpa_scc.models.d2import import D2_PIXEL_STATS
    from hpa_scc.models.detector import default_pixel_stats

    mean, std = default_pixel_stats(cfg.model.in_channels)
    mean, std = [m * 255 for m in mean], [s * 255 for s in std]
    if cfg.model.weights and str(cfg.model.weights).endswith(".pkl"):
        stats = D2_PIXEL_STATS[cfg.model.backbone]  # what the zoo weights were trained with
        mean, std = list(stats["mean_bgr"][::-1]), list(stats["std_bgr"][::-1])
        if cfg.model.in_channels == 4:
            mean, std = mean + mean[:1], std + std[:1]
    if cfg.model.pixel_mean is not None:
        mean = [m * 255 for m in cfg.model.pixel_mean]
    if cfg.model.pixel_std is not None:
        std = [s * 255 for s in cfg.model.pixel_std]
    return mean, std


def iters_per_epoch(n_train_images: int, cfg: Config, num_gpus: int) -> int:
    """Steps in one pass over the training images at detectron2's total batch (``max_iters_per_epoch`` caps it)."""
    batch = cfg.train.images_per_gpu * max(num_gpus, 1)
    n = max(math.ceil(n_train_images / batch), 1)
    return min(n, cfg.train.max_iters_per_epoch) if cfg.train.max_iters_per_epoch else n


def build_d2_config(cfg: Config, num_gpus: int = 1, n_train_images: int | None = None, weights: str = ""):
    """detectron2's CfgNode: the backbone's model-zoo config with the project's overrides.

    ``cfg.data.image_size`` must be resolved (the prepared set's size). ``n_train_images`` sets the
    iterations per epoch (None: one iteration per epoch, for building a model only). ``weights``:
    the file detectron2 loads first ("" = random init; see ``convert_zoo_weights``). Solver values
    keep the project's meaning: ``optim.lr`` is the rate of one step of images_per_gpu x GPUs
    images, which is detectron2's BASE_LR for ``IMS_PER_BATCH`` = that total.
    """
    require_detectron2()
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    from hpa_scc.models.detector import default_anchor_sizes

    model, optim, train = cfg.model, cfg.optim, cfg.train
    if model.backbone not in ZOO_CONFIGS:
        raise ValueError(f"the detectron2 engine builds {sorted(ZOO_CONFIGS)}, not {model.backbone!r}")
    if optim.name != "sgd":
        raise ValueError(f"the detectron2 engine trains with detectron2's SGD; optim.name={optim.name!r} is "
                         f"the torchvision engine's only")
    if cfg.data.image_size is None:
        raise ValueError("data.image_size must be resolved (the prepared set's size) before building detectron2's config")
    d2 = get_cfg()
    d2.merge_from_file(model_zoo.get_config_file(ZOO_CONFIGS[model.backbone]))
    size = int(cfg.data.image_size)

    d2.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    mean, std = pixel_stats_0_255(cfg)
    d2.MODEL.PIXEL_MEAN, d2.MODEL.PIXEL_STD = mean, std  # their length is the stem's input channels
    d2.INPUT.FORMAT = "RGB"  # the prepared cache's order (+ yellow); only detectron2's visualiser reads it
    d2.INPUT.MASK_FORMAT = "bitmask"  # the COCO files hold RLE masks
    # No resizing: images are the prepared size, as in the torchvision engine.
    d2.INPUT.MIN_SIZE_TRAIN, d2.INPUT.MAX_SIZE_TRAIN = (size,), size
    d2.INPUT.MIN_SIZE_TEST, d2.INPUT.MAX_SIZE_TEST = size, size
    sizes = list(model.anchor_sizes) if model.anchor_sizes else default_anchor_sizes(model.backbone, size)
    d2.MODEL.ANCHOR_GENERATOR.SIZES = [[s] for s in sizes]
    d2.MODEL.RPN.POST_NMS_TOPK_TRAIN = model.rpn_post_nms_top_n_train
    d2.MODEL.RPN.PRE_NMS_TOPK_TRAIN = max(model.rpn_post_nms_top_n_train, 1000)
    d2.MODEL.RPN.POST_NMS_TOPK_TEST = model.rpn_post_nms_top_n_test
    d2.MODEL.RPN.PRE_NMS_TOPK_TEST = max(model.rpn_post_nms_top_n_test, 1000)
    d2.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = model.box_batch_size_per_image
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = model.box_score_thresh
    d2.TEST.DETECTIONS_PER_IMAGE = model.box_detections_per_img
    d2.TEST.EVAL_PERIOD = 0  # scored afterwards by predict / evaluate, as the torchvision runs are

    pretrained = bool(weights)
    d2.MODEL.WEIGHTS = str(weights or "")
    if pretrained:  # torchvision's trainable_backbone_layers counts stem + res2..5 the same way
        d2.MODEL.BACKBONE.FREEZE_AT = 5 - model.trainable_backbone_layers
    else:
        # From random init every stage trains, with BatchNorm (FrozenBN of identity statistics
        # would leave a 101-layer net unnormalised), as the torchvision engine does.
        d2.MODEL.BACKBONE.FREEZE_AT = 0
        # SyncBN across GPUs (torch's SyncBatchNorm trains on CUDA only)
        multi_gpu = num_gpus > 1 and device_type(train.device) == "cuda"
        d2.MODEL.RESNETS.NORM = "SyncBN" if multi_gpu else "BN"

    ipe = iters_per_epoch(n_train_images or 1, cfg, num_gpus)
    d2.SOLVER.IMS_PER_BATCH = train.images_per_gpu * max(num_gpus, 1)
    d2.SOLVER.BASE_LR = optim.lr
    d2.SOLVER.MOMENTUM = optim.momentum
    d2.SOLVER.WEIGHT_DECAY = optim.weight_decay
    d2.SOLVER.WARMUP_ITERS = optim.warmup_iters
    d2.SOLVER.WARMUP_FACTOR = optim.warmup_factor
    d2.SOLVER.MAX_ITER = train.max_epochs * ipe
    if optim.schedule == "cosine":
        d2.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
    else:
        d2.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
        d2.SOLVER.STEPS = tuple(m * ipe for m in optim.step_milestones)
        d2.SOLVER.GAMMA = optim.step_gamma
    d2.SOLVER.CHECKPOINT_PERIOD = train.save_every_epochs * ipe
    # detectron2 0.6 clips each parameter's gradient on its own ("value"/"norm"), which barely
    # clips at optim.clip_grad_norm (it let a 32-step CPU run diverge); the torchvision engine
    # clips the norm of all gradients together. d2train's trainer does that (HPA.CLIP_GRAD_NORM).
    d2.SOLVER.CLIP_GRADIENTS.ENABLED = False
    device = device_type(train.device)
    d2.MODEL.DEVICE = device
    d2.SOLVER.AMP.ENABLED = bool(train.amp and device == "cuda")
    d2.DATALOADER.NUM_WORKERS = cfg.data.workers
    d2.SEED = train.seed
    d2.OUTPUT_DIR = str(train.run_dir)
    return d2


def build_d2_model(d2cfg) -> nn.Module:
    """detectron2's GeneralizedRCNN for ``d2cfg`` (random init; load weights separately)."""
    require_detectron2()
    from detectron2.modeling import build_model as d2_build_model

    return d2_build_model(d2cfg)


def convert_zoo_weights(path: str | os.PathLike, in_channels: int, out_path: str | os.PathLike) -> str:
    """A detectron2 .pkl with its stem reordered BGR -> RGB (+ yellow from red, x 3/4 for 4 channels).

    The result is written to ``out_path`` (detectron2's pickle format) and that path returned.
    """
    from hpa_scc.models.d2import import load_detectron2_checkpoint
    from hpa_scc.models.detector import adapt_stem

    state = load_detectron2_checkpoint(path)
    key = "backbone.bottom_up.stem.conv1.weight"
    if key in state:
        stem = torch.from_numpy(np.ascontiguousarray(state[key][:, ::-1]))  # BGR -> RGB
        state[key] = adapt_stem(stem, in_channels).numpy()
    state.pop("pixel_mean", None)  # the config's PIXEL_MEAN/STD hold the statistics
    state.pop("pixel_std", None)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as fh:
        pickle.dump({"model": state, "__author__": f"hpa_scc from {Path(path).name}", "matching_heuristics": True}, fh)
    return str(out_path)


# detectron2's class-specific layers: another class count (COCO's 80) is expected not to fit.
D2_PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_head.predictor.")


def read_d2_weights(path: str | os.PathLike) -> dict[str, np.ndarray | torch.Tensor]:
    """The state dict of a file detectron2 starts from: a zoo .pkl, or a detectron2 .pth
    (``{"model": state}``, as its trainer saves); a clear error for anything else."""
    from hpa_scc.models.d2import import load_detectron2_checkpoint

    path = Path(path)
    if path.suffix == ".pkl":
        return load_detectron2_checkpoint(path)
    try:
        # plain data only, as detectron2's Checkpointer reads them (torch >= 2.6): no code from a weights file
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds on a file that is not a checkpoint
        raise ValueError(f"model.weights {path} is not a readable detectron2 .pth ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}); give a detectron2 checkpoint or a model-zoo .pkl") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        raise ValueError(f"model.weights {path} is a torchvision-engine checkpoint (best.pt/last.pt); it cannot "
                         "start the detectron2 engine: give a detectron2 .pth or a model-zoo .pkl, or train with "
                         "the torchvision engine")
    state = data.get("model") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.weights {path} holds no detectron2 'model' state dict; give a detectron2 .pth "
                         "(model_final.pth of a run) or a model-zoo .pkl")
    return state


def check_weights_fit(model: nn.Module, state: dict, path: str | os.PathLike, backbone: str) -> None:
    """Refuse weights whose tensors do not fit ``model`` outside the class predictors.

    detectron2 only warns and leaves such tensors at random init, so an R101 file given to the
    X101 model (or a 3-channel stem to a 4-channel model) would train a mostly random network
    with exit code 0. Files with other names (Caffe2-style ImageNet backbones, matched by
    detectron2's heuristics) share no keys and are left to detectron2.
    """
    own = model.state_dict()
    shared = [k for k in state if k in own and not k.startswith(D2_PREDICTOR_PREFIXES)]
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shared
             if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"model.weights {path}: {len(wrong)} of {len(shared)} tensors do not fit the {backbone} "
                         f"model (weights of another backbone or channel count?), e.g. {wrong[:3]}; give the zoo "
                         "file of this backbone")
    log.info("model.weights %s: %d tensors fit the %s model (class predictors aside)", path, len(shared), backbone)


class D2Detector(nn.Module):
    """A detectron2 GeneralizedRCNN with the torchvision Mask R-CNN's eval interface (module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        from detectron2.layers.mask_ops import paste_masks_in_image

        if self.training:
            raise RuntimeError("D2Detector is for inference; train with hpa_scc.engine.d2train")
        inputs = [{"image": im.float() * 255.0, "height": im.shape[-2], "width": im.shape[-1]} for im in images]
        # raw outputs at the input size (no resizing happened), masks pasted here as probabilities:
        # detectron2's own post-processing would threshold them at 0.5
        results = self.model.inference(inputs, do_postprocess=False)
        outputs = []
        for im, inst in zip(images, results):
            height, width = im.shape[-2:]
            boxes = inst.pred_boxes.tensor.float()
            if len(inst):
                masks = paste_masks_in_image(inst.pred_masks[:, 0].float(), boxes, (height, width), threshold=-1)
                masks = masks.float().div_(255.0)[:, None]
            else:
                masks = boxes.new_zeros((0, 1, height, width))
            outputs.append({"boxes": boxes, "labels": inst.pred_classes.long() + 1, "scores": inst.scores.float(),
                            "masks": masks})
        return outputs


def load_d2_run(run_dir: str | os.PathLike, cfg: Config, checkpoint: str) -> tuple[nn.Module, Path]:
    """(the model of a detectron2 run folder in a ``D2Detector``, the checkpoint file it came from).

    ``checkpoint``: a file in the run folder (``model_final.pth``, ``model_0000099.pth``); ``best.pt``
    or ``last.pt`` (the torchvision engine's names, the CLI's default) mean the newest checkpoint,
    the one detectron2's ``last_checkpoint`` file names.
    """
    require_detectron2()
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg

    run_dir = Path(run_dir)
    path = run_dir / checkpoint
    if checkpoint in ("best.pt", "last.pt") and not path.is_file():
        pointer = run_dir / "last_checkpoint"
        if not pointer.is_file():
            raise FileNotFoundError(f"{run_dir} is a detectron2 run without checkpoints yet (no {pointer.name}): "
                                    f"train first (detectron_code/main.py --engine detectron2)")
        path = run_dir / pointer.read_text().strip()
    if not path.is_file():
        there = sorted(p.name for p in run_dir.glob("*.pth"))
        raise FileNotFoundError(f"no checkpoint {path}; {run_dir} holds {', '.join(there) or 'none'}")
    d2cfg = get_cfg()
    d2cfg.set_new_allowed(True)  # written by this detectron2, read back as is
    # safe YAML only: detectron2 would fall back to yaml.unsafe_load, which runs a crafted file's code
    d2cfg.merge_from_file(str(run_dir / D2_CONFIG), allow_unsafe=False)
    d2cfg.MODEL.WEIGHTS = ""
    d2cfg.MODEL.DEVICE = "cpu"  # load_run moves it
    if d2cfg.MODEL.RESNETS.NORM == "SyncBN":  # a multi-GPU run: the same parameters; one process needs no sync
        d2cfg.MODEL.RESNETS.NORM = "BN"
    model = build_d2_model(d2cfg)
    DetectionCheckpointer(model).load(str(path))
    return D2Detector(model), path


__all__ = ["ZOO_CONFIGS", "D2_CONFIG", "build_d2_config", "build_d2_model", "convert_zoo_weights", "D2Detector",
           "read_d2_weights", "check_weights_fit", "load_d2_run", "pixel_stats_0_255", "iters_per_epoch", "require_detectron2"]
