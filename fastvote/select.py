"""From votes to a kept subset: rank source classes by votes with the tie
rules of docs/SELECTION.md, keep N of them (or a ratio), and map kept classes to sample indices.

Names used everywhere: ``ratio`` is the fraction of source classes REMOVED;
``keep`` the number kept; ``indices`` sorted int64 positions in the source.
"""
from __future__ import annotations

import numbers
from typing import Optional

import numpy as np
import torch
from torch import Tensor


def keep_count(total: Optional[int], ratio: Optional[float] = None, keep: Optional[int] = None,
               unit: str = "classes") -> int:
    """How many of `total` classes (or samples: `unit`) to keep, from exactly
    one of `ratio` (the fraction removed, 0 <= ratio < 1; rounds to nearest,
    keeps at least one) and `keep` (an integer 1 <= keep <= total). total=None
    (not known yet) checks everything but keep's upper bound."""
    if (ratio is None) == (keep is None):
        raise ValueError(f"give exactly one of ratio= (fraction of source {unit} removed) and keep= "
                         f"(source {unit} kept); got ratio={ratio!r}, keep={keep!r}")
    if keep is not None:
        high = keep if total is None else total
        if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or not 1 <= keep <= high:
            bound = "" if total is None else f" <= {total}"
            raise ValueError(f"keep={keep!r} is invalid; expected an integer 1 <= keep{bound} (the number of source "
                             f"{unit} kept)")
        return int(keep)
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio!r} is invalid; expected a number 0 <= ratio < 1 (the fraction of "
                         f"source {unit} removed)")
    return max(1, int(round((1 if total is None else total) * (1.0 - float(ratio)))))


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


def present_classes(labels, num_classes: int) -> np.ndarray:
    """[num_classes] bool: the classes with at least one sample in `labels`
    (a class of the label space may have none: a partial or filtered copy)."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes] > 0


def select_classes(votes: Tensor, scores: Tensor, keep: int, higher_score_first: bool,
                   reverse: bool = False, present: Optional[np.ndarray] = None) -> Tensor:
    """The `keep` best-ranked class ids (in rank order), or with reverse=True
    the `keep` worst-ranked (the paper's reverse-order ablation). present:
    [K] bool, the classes with source samples; the others are ranked but
    never kept (they would keep nothing), so the next-ranked take their places."""
    order = rank_classes(votes, scores, higher_score_first)
    if present is not None:
        order = order[torch.from_numpy(np.asarray(present, dtype=bool))[order]]
    return order[-keep:].flip(0) if reverse else order[:keep]


def class_indices(labels, kept_classes) -> Tensor:
    """Sorted int64 positions of every sample whose label is a kept class.

    labels: [N] integer labels of the source (array-like); kept_classes: ids.
    """
    labels = torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: labels may be a read-only memmap
    kept = torch.as_tensor(np.asarray(kept_classes)).long()
    return torch.isin(labels, kept).nonzero().flatten()
