"""From votes to a kept subset: rank source classes by votes with the tie
rules of docs/SELECTION.md, keep N of them (or a ratio), and map kept classes to sample indices;
for sample-wise rankings, the per-group cap (:func:`capped_rows`).

Names used everywhere: ``ratio`` is the fraction of source classes REMOVED;
``keep`` the number kept; ``indices`` sorted int64 positions in the source.
"""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Tuple

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


def capped_rows(order, groups, keep: int, cap: int, seed: int) -> Tuple[np.ndarray, Dict[str, object]]:
    """The `keep` best rows of a sample-wise ranking with at most `cap` from any
    group (source class, or k-means cluster), MetaCLIP's balance (Xu et al.,
    ICLR 2024) over a target score. docs/SELECTION.md, "Caps".

    1. Each group offers its best min(n_g, cap) rows (its first in `order`).
    2. If they are at least `keep`, the `keep` best of them (in `order`) are
       kept: no group holds more than `cap`.
    3. Otherwise all of them are kept, and the rest of the budget (the tail) is
       drawn from the rows over their group's cap without replacement, each row
       weighted by MetaCLIP's keep probability min(1, cap / n_g) (Efraimidis-
       Spirakis keys from numpy Generator([seed, 0xCA9])): the larger a group,
       the less of its surplus each of its rows gets, so the tail spreads over
       the large groups. The cap is then exceeded; info says by how much.

    Args:
        order: int64 [R] the rows ranked (all N, or candidates), each once,
            best first (ties already broken). Group sizes n_g count these rows.
        groups: int64 [N] the group of every source row (>= 0).
        keep: rows kept, 1 <= keep <= R; cap: >= 1.
    Returns:
        sorted int64 rows, and facts for the manifest.
    """
    order = np.asarray(order, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    n = len(order)
    if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or not 1 <= keep <= n:
        raise ValueError(f"keep={keep!r} is invalid; expected an integer 1 <= keep <= {n} (the rows ranked)")
    if isinstance(cap, bool) or not isinstance(cap, numbers.Integral) or cap < 1:
        raise ValueError(f"cap={cap!r} is invalid; expected an integer >= 1 (kept samples per group)")
    ranked_groups = groups[order]
    sizes = np.bincount(ranked_groups)
    # Each position's rank inside its group: a stable sort by group keeps `order` within a group.
    by_group = np.argsort(ranked_groups, kind="stable")
    within = np.empty(n, dtype=np.int64)
    within[by_group] = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    under = order[within < cap]
    tail = max(0, keep - len(under))
    if tail == 0:
        kept = under[:keep]
    else:
        over = order[within >= cap]
        weight = cap / sizes[groups[over]]  # < 1: only groups larger than the cap have rows over it
        rng = np.random.default_rng([seed, 0xCA9])
        key = np.log(rng.random(len(over))) / weight  # the largest `tail` keys: a weighted draw
        kept = np.concatenate([under, over[np.argpartition(-key, tail - 1)[:tail]]])
    counts = np.bincount(groups[kept], minlength=len(sizes))
    return np.sort(kept), {"cap": int(cap), "under_cap": int(len(under)), "tail_drawn": int(tail),
                           "most_kept_in_a_group": int(counts.max()), "groups_kept": int((counts > 0).sum())}
