"""Moderate coreset (Xia et al., ICLR 2023; SPEC.md Baselines), sample-wise.

Definition, as implemented:
- Per source class c, the coordinate-wise median m_c of the surrogate's pooled
  features of its members (numpy's median: the mean of the two middle values
  for an even count), in float64.
- Score of a sample x of class c: d(x) = ||f(x) - m_c||_2.
- Budget per class ("the same fraction of each class"): the `keep` samples are
  shared out in proportion to the class sizes by the largest-remainder rule:
  m_c = floor(keep n_c / N), and the keep - sum(m_c) samples left go one each
  to the classes with the largest remainders (keep n_c mod N), ties to the
  lower class id. So sum(m_c) = keep exactly and 0 <= m_c <= n_c.
- Band: within class c, sort by d ascending (ties by a seeded random key,
  base.tie_keys), drop the floor((n_c - m_c) / 2) nearest and the
  ceil((n_c - m_c) / 2) farthest, keep the m_c in between. The band is centred
  on the median rank; with an odd number to drop, the extra one is a far one.
- A class with fewer samples than its share cannot happen (m_c <= n_c); a
  class with m_c = 0 (tiny classes at high ratios) loses all its samples, and
  one with m_c = n_c keeps all. Empty classes are skipped.

Xia et al.'s release keeps the band over the whole set (distances to each
sample's own class median, one global sort); SPEC asks for it per class, which
also keeps the class balance. ratio = the fraction of source SAMPLES removed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fastvote.methods.base import Selection, TrainableSource, View, cached_scores, rank, sample_selection

CLASS_WISE = False
NEEDS = {"source": ("features", "labels"), "target": ()}
OPTIONS = ()


def median_distances(features, labels, num_classes: int) -> np.ndarray:
    """d(x) = L2 distance from each row's features [N, D] to the coordinate-wise
    median of its class's features. Returns float64 [N]."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.empty(len(labels), dtype=np.float64)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            continue
        x = np.asarray(features[members], dtype=np.float64)
        out[members] = np.linalg.norm(x - np.median(x, axis=0), axis=1)
    return out


def class_budgets(counts, keep: int) -> np.ndarray:
    """Largest-remainder shares of `keep` over classes of sizes `counts` [K]:
    int64 [K], summing to `keep`, each at most its class size."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not 0 <= keep <= total:
        raise ValueError(f"keep={keep} is out of range; expected 0 <= keep <= {total} (the source samples)")
    budgets = keep * counts // total
    remainders = keep * counts % total
    left = keep - int(budgets.sum())
    # largest remainder first, ties -> lower class id (lexsort: last key first)
    order = np.lexsort((np.arange(len(counts)), -remainders))
    budgets[order[:left]] += 1
    return budgets


def middle_band(scores, labels, budgets, seed: int) -> np.ndarray:
    """Per class, the budgets[c] rows in the middle of the ascending score
    order (see the module docstring). Returns sorted int64 rows."""
    labels = np.asarray(labels, dtype=np.int64)
    order = rank(scores, seed, descending=False)   # ascending, ties by the seeded key
    ordered_labels = labels[order]
    kept = []
    for c, m in enumerate(np.asarray(budgets)):
        members = order[ordered_labels == c]      # class c's rows, ascending
        drop = len(members) - int(m)
        low = drop // 2
        kept.append(members[low:low + int(m)])
    return np.sort(np.concatenate(kept)) if kept else np.empty(0, dtype=np.int64)


def select(source: TrainableSource, targets: Sequence[View], *, keep: int, seed: int = 0, device=None,
           progress: bool = True) -> Selection:
    """Keeps `keep` source SAMPLES (prune's ratio: the fraction of samples
    removed): the middle band of each class's distances to its feature median."""
    labels = np.asarray(source.labels, dtype=np.int64)
    num_classes = int(source.num_classes or labels.max() + 1)

    def compute() -> torch.Tensor:
        return torch.from_numpy(median_distances(source.array("features"), labels, num_classes))

    scores, path = cached_scores(source, "moderate", {}, compute)
    counts = np.bincount(labels, minlength=num_classes)
    budgets = class_budgets(counts, keep)
    rows = middle_band(scores.numpy(), labels, budgets, seed)
    return sample_selection(rows, scores, {"score": "L2 distance to the class's coordinate-wise feature median",
                                           "band": "middle, per class", "seed": seed,
                                           "scores_file": str(path) if path else None})
