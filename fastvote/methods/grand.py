"""GraNd (Paul et al., NeurIPS 2021, "Deep Learning on a Data Diet"; SPEC.md
Baselines), sample-wise.

Definition, as implemented:
- `runs` independent training runs from scratch, as for EL2N (run r from
  base.run_seed(seed, r); `epoch` epochs of the source recipe, default 10% of
  its epochs, at least 1; epoch=0 scores at initialisation).
- Score of (x, y) in one run: the L2 norm of the gradient of the
  cross-entropy loss of that ONE sample with respect to ALL the model's
  parameters (every conv, BatchNorm affine and head weight), in float32.
  Per-sample gradients come from torch.func: vmap(grad(loss)) over
  functional_call, in chunks, never a Python loop over samples.
- BatchNorm: the per-sample pass runs the model in eval mode, so BN normalises
  with its running statistics (buffers, not differentiated) and a sample's
  gradient does not depend on the other samples of its batch (in train mode
  it would, and a batch of one has no statistics). This is what the authors'
  scoring does (their model is applied with train=False).
- The score is the mean of the norms over the runs; the `keep` HIGHEST are
  kept (ties by a seeded random key). ratio = fraction of SAMPLES removed.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fastvote.methods.base import (DEFAULT_RUNS, EPOCH, RUNS, Selection, TrainableSource, View, cached_scores,
                                   check_int, default_epoch, keep_top, mean_over_runs, sample_selection)

CLASS_WISE = False
NEEDS = {"source": ("images", "labels"), "target": ()}
OPTIONS = (RUNS, EPOCH)
GRAD_MEMORY = 1 << 30  # bytes of per-sample gradients materialised at once (sets the vmap chunk)


def grad_norms(model: nn.Module, images: Tensor, labels: Tensor, chunk_size: Optional[int] = None) -> Tensor:
    """||d loss(x_i, y_i) / d theta||_2 for every row, theta = all parameters.

    model: run in eval mode (restored afterwards); images float [B, 3, H, W];
    labels int64 [B]. chunk_size: samples whose gradients exist at once
    (default: as many as fit in GRAD_MEMORY). Returns float32 [B].
    """
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    if chunk_size is None:
        per_sample = 4 * sum(p.numel() for p in params.values())
        chunk_size = max(1, min(len(images), GRAD_MEMORY // max(per_sample, 1)))

    def loss(p, x, y):
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits.float(), y.unsqueeze(0))

    def norm(p, x, y):
        g = grad(loss)(p, x, y)
        return torch.sqrt(sum(v.pow(2).sum() for v in g.values()))

    was_training = model.training
    model.eval()
    try:
        return vmap(norm, in_dims=(None, 0, 0), chunk_size=chunk_size)(params, images.float(), labels.long())
    finally:
        model.train(was_training)


def scores(source: TrainableSource, *, seed: int = 0, runs: int = DEFAULT_RUNS, epoch: Optional[int] = None,
           progress: bool = True) -> Tuple[Tensor, dict]:
    """GraNd scores float64 [N] (cached) and what they are."""
    runs = check_int("runs", runs, 1, "independent training runs to average over")
    epoch = default_epoch(source.recipe) if epoch is None else check_int(
        "epoch", epoch, 0, "epochs of training before scoring; 0 = at initialisation")
    values, path = cached_scores(source, "grand", {"seed": seed, "runs": runs, "epoch": epoch,
                                                   "recipe": source.recipe},
                                 lambda: mean_over_runs(source, grad_norms, name="GraNd", seed=seed, runs=runs,
                                                  epoch=epoch, progress=progress))
    return values, {"score": "grand", "runs": runs, "epoch": epoch, "seed": seed, "recipe": source.recipe,
                    "batchnorm": "eval mode (running statistics) for the per-sample gradients",
                    "scores_file": str(path) if path else None}


def select(source: TrainableSource, targets: Sequence[View], *, keep: int, seed: int = 0, runs: int = DEFAULT_RUNS,
           epoch: Optional[int] = None, device=None, progress: bool = True) -> Selection:
    """Keeps the `keep` source SAMPLES (prune's ratio: the fraction of samples
    removed) with the largest expected per-sample gradient norm."""
    values, info = scores(source, seed=seed, runs=runs, epoch=epoch, progress=progress)
    return sample_selection(keep_top(values.numpy(), keep, seed, highest=True), values, {**info, "keep": "highest"})
