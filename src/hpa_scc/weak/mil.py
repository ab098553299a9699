"""Multiple-instance learning (MIL): image labels as statements about bags of cells.

An image label says exactly this: *at least one cell of the image shows the class; a class not in
the labels is shown by none*. Giving every cell its image's labels (``targets.inherit_labels``)
says more than that and is wrong for the cells that do not show it. MIL trains on what the label
says: the cells' logits for a class are pooled into one image logit and the loss is taken against
the image's label, so a cell is never told it shows a class that only its neighbours show.

    image_logits = pool_logits(cell_logits, bag, n_bags, "lse", sharpness=2.0)   # [n_bags, 19]
    loss = mil_loss(cell_logits, bag, image_labels, "lse", sharpness=2.0)

Shapes: ``cell_logits`` float [N, C] (one row per cell, any order), ``bag`` int64 [N] (which image
each cell belongs to, 0..n_bags-1), ``image_labels`` float [n_bags, C] in {0, 1}. Every function
is pure and differentiable; nothing here knows about models, files or features.

Pooling rules (``POOLING``):
- ``max``: the image is its best cell. Exact for "at least one", but only one cell per image and
  class gets a gradient, so training is slow and noisy.
- ``lse``: log-mean-exp with sharpness r: ``m + log(mean(exp(r (l - m)))) / r``; r -> 0 is the
  mean of the logits (every cell its image's label again), r -> inf the max. Between them, a
  smooth max that spreads the gradient over the cells that already score high.
- ``mean``: the mean logit (the inherited-labels assumption, as a MIL loss: a reference point).
- ``noisy_or``: P(image) = 1 - prod(1 - sigmoid(l_i)): the image shows the class unless every
  cell independently does not. Grows with the number of cells: a big image needs lower cell scores.
- ``attention``: Ilse et al. 2018: learned per-cell weights ``softmax_bag(a_i)`` (the model's
  attention logits, ``attention=`` [N, C]) and the image logit ``sum_i w_i l_i``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hpa_scc.constants import MIL_POOLING as POOLING


def _per_bag(values: torch.Tensor, bag: torch.Tensor, n_bags: int, reduce: str) -> torch.Tensor:
    """[n_bags, C]: ``values`` [N, C] reduced over the rows of each bag ("amax" or "sum")."""
    index = bag[:, None].expand_as(values)
    out = values.new_zeros((n_bags, values.shape[1]))
    return out.scatter_reduce(0, index, values, reduce, include_self=False)


def bag_softmax(scores: torch.Tensor, bag: torch.Tensor, n_bags: int) -> torch.Tensor:
    """[N, C]: ``scores`` [N, C] turned into weights that sum to 1 over the cells of each bag."""
    top = _per_bag(scores.detach(), bag, n_bags, "amax")
    e = torch.exp(scores - top[bag])
    return e / _per_bag(e, bag, n_bags, "sum")[bag]


def pool_logits(cell_logits: torch.Tensor, bag: torch.Tensor, n_bags: int, rule: str = "lse",
                sharpness: float = 2.0, attention: torch.Tensor | None = None) -> torch.Tensor:
    """float [n_bags, C]: each image's logit per class from its cells' logits (rules: module text)."""
    if rule not in POOLING:
        raise ValueError(f"unknown MIL pooling {rule!r}; choose one of {', '.join(POOLING)}")
    if cell_logits.ndim != 2 or bag.shape != cell_logits.shape[:1]:
        raise ValueError(f"cell_logits must be [N, C] and bag [N], got {tuple(cell_logits.shape)} and {tuple(bag.shape)}")
    counts = torch.bincount(bag, minlength=n_bags).to(cell_logits.dtype)[:, None]
    if bool((counts == 0).any()):
        raise ValueError(f"{int((counts == 0).sum())} of {n_bags} bags have no cell: an image without cells has "
                         "no MIL score; leave it out of the batch")
    if rule == "max":
        return _per_bag(cell_logits, bag, n_bags, "amax")
    if rule == "mean":
        return _per_bag(cell_logits, bag, n_bags, "sum") / counts
    if rule == "lse":
        if not sharpness > 0:
            raise ValueError(f"the lse sharpness must be > 0, got {sharpness}")
        top = _per_bag(cell_logits.detach(), bag, n_bags, "amax")
        e = torch.exp(sharpness * (cell_logits - top[bag]))
        return top + torch.log(_per_bag(e, bag, n_bags, "sum") / counts) / sharpness
    if rule == "noisy_or":
        # log P(no cell shows c) = sum_i log(1 - sigmoid(l_i)) = -sum_i softplus(l_i) =: -s, s >= 0;
        # logit(1 - exp(-s)) = log(expm1(s)), computed without overflow for large s
        s = _per_bag(F.softplus(cell_logits), bag, n_bags, "sum")
        return torch.where(s > 20, s, torch.log(torch.expm1(s.clamp(min=1e-7))))
    if attention is None or attention.shape != cell_logits.shape:
        raise ValueError("attention pooling needs the model's attention logits, shaped like cell_logits")
    return _per_bag(bag_softmax(attention, bag, n_bags) * cell_logits, bag, n_bags, "sum")


def mil_loss(cell_logits: torch.Tensor, bag: torch.Tensor, image_labels: torch.Tensor, rule: str = "lse",
             sharpness: float = 2.0, attention: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of the pooled image logits against the image labels (mean over
    images and classes): the MIL loss."""
    pooled = pool_logits(cell_logits, bag, image_labels.shape[0], rule, sharpness, attention)
    return F.binary_cross_entropy_with_logits(pooled, image_labels.to(pooled.dtype))
