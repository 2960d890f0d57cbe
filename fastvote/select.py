"""From votes to a kept subset: rank source classes by votes with SPEC.md's tie
rules, keep N of them (or a ratio), and map kept classes to sample indices.

Names used everywhere: ``ratio`` is the fraction of source classes REMOVED;
``keep`` the number kept; ``indices`` sorted int64 positions in the source.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor


def keep_count(num_classes: int, ratio: Optional[float] = None, keep: Optional[int] = None) -> int:
    """How many classes to keep, from exactly one of `ratio` (fraction removed,
    0 <= ratio < 1) and `keep` (1 <= keep <= num_classes). Rounds to nearest,
    and always keeps at least one class."""
    if (ratio is None) == (keep is None):
        raise ValueError(f"give exactly one of ratio= (fraction of classes removed) and keep= "
                         f"(classes kept); got ratio={ratio}, keep={keep}")
    if keep is not None:
        if not 1 <= int(keep) <= num_classes or int(keep) != keep:
            raise ValueError(f"keep={keep} is out of range; expected an integer 1 <= keep <= {num_classes}")
        return int(keep)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio} is out of range; expected 0 <= ratio < 1 (the fraction of "
                         "source classes removed)")
    return max(1, int(round(num_classes * (1.0 - ratio))))


def rank_classes(votes: Tensor, scores: Tensor, higher_score_first: bool) -> Tensor:
    """All class ids, best first: more votes first; equal votes -> the better
    secondary score; still equal -> lower class index. Returns int64 [K]."""
    if votes.shape != scores.shape or votes.dim() != 1:
        raise ValueError(f"votes {list(votes.shape)} and scores {list(scores.shape)} must be 1-D of equal length")
    v = votes.double().cpu().numpy()
    s = scores.double().cpu().numpy()
    index = np.arange(len(v))
    # np.lexsort sorts by the LAST key first, ascending.
    order = np.lexsort((index, -s if higher_score_first else s, -v))
    return torch.from_numpy(order.astype(np.int64))


def select_classes(votes: Tensor, scores: Tensor, keep: int, higher_score_first: bool,
                   reverse: bool = False) -> Tensor:
    """The `keep` best-ranked class ids (in rank order), or with reverse=True
    the `keep` worst-ranked (the paper's reverse-order ablation)."""
    order = rank_classes(votes, scores, higher_score_first)
    return order[-keep:].flip(0) if reverse else order[:keep]


def class_indices(labels, kept_classes) -> Tensor:
    """Sorted int64 positions of every sample whose label is a kept class.

    labels: [N] integer labels of the source (array-like); kept_classes: ids.
    """
    labels = torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: labels may be a read-only memmap
    kept = torch.as_tensor(np.asarray(kept_classes)).long()
    return torch.isin(labels, kept).nonzero().flatten()
