"""EL2N (Paul et al., NeurIPS 2021, "Deep Learning on a Data Diet"; SPEC.md
Baselines), sample-wise.

Definition, as implemented:
- `runs` independent training runs from scratch (run r initialised and
  shuffled from base.run_seed(seed, r)) of the surrogate's architecture on the
  source, each stopped after `epoch` epochs of the source recipe (the view's
  ``recipe``; default epoch: 10% of its epochs, at least 1 — Paul et al.
  score at epoch 20 of 200).
- Score of (x, y) in one run: ||softmax(f(x)) - onehot(y)||_2 with the model
  in eval mode (BatchNorm on its running statistics, as the authors score),
  on the eval preprocessing (no augmentation), computed in float32.
- The score is the mean over the runs; the `keep` HIGHEST are kept (ties by a
  seeded random key). ratio = the fraction of source SAMPLES removed.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvote.methods.base import (DEFAULT_RUNS, EPOCH, RUNS, Selection, TrainableSource, View, cached_scores,
                                   check_int, default_epoch, keep_top, mean_over_runs, sample_selection)

CLASS_WISE = False
NEEDS = {"source": ("images", "labels"), "target": ()}
OPTIONS = (RUNS, EPOCH)


def el2n(logits: Tensor, labels: Tensor) -> Tensor:
    """||softmax(logits) - onehot(labels)||_2 per row: logits [B, K], labels
    int64 [B] -> float32 [B]."""
    probs = F.softmax(logits.float(), dim=1)
    return (probs - F.one_hot(labels.long(), probs.shape[1]).float()).norm(dim=1)


def scores(source: TrainableSource, *, seed: int = 0, runs: int = DEFAULT_RUNS, epoch: Optional[int] = None,
           progress: bool = True) -> Tuple[Tensor, dict]:
    """EL2N scores float64 [N] (cached) and what they are."""
    runs = check_int("runs", runs, 1, "independent training runs to average over")
    epoch = default_epoch(source.recipe) if epoch is None else check_int(
        "epoch", epoch, 0, "epochs of training before scoring; 0 = at initialisation")

    def model_logits(model, images, labels):
        with torch.no_grad():
            return el2n(model(images), labels)

    values, path = cached_scores(source, "el2n", {"seed": seed, "runs": runs, "epoch": epoch,
                                                  "recipe": source.recipe},
                                 lambda: mean_over_runs(source, model_logits, name="EL2N", seed=seed, runs=runs,
                                                  epoch=epoch, progress=progress))
    return values, {"score": "el2n", "runs": runs, "epoch": epoch, "seed": seed, "recipe": source.recipe,
                    "scores_file": str(path) if path else None}


def select(source: TrainableSource, targets: Sequence[View], *, keep: int, seed: int = 0, runs: int = DEFAULT_RUNS,
           epoch: Optional[int] = None, device=None, progress: bool = True) -> Selection:
    """Keeps the `keep` source SAMPLES (prune's ratio: the fraction of samples
    removed) with the highest EL2N score."""
    values, info = scores(source, seed=seed, runs=runs, epoch=epoch, progress=progress)
    return sample_selection(keep_top(values.numpy(), keep, seed, highest=True), values, {**info, "keep": "highest"})
