"""Streaming voters: accumulate votes and the dense tie-breaking scores batch by
batch, so no target's logits or features are ever held all at once, and
combine them across processes with torch.distributed.

    voter = LMVoter(num_classes=1000, k=1)
    for logits in batches:
        voter.update(logits)
    voter.all_reduce()          # no-op unless torch.distributed is initialised
    votes, scores = voter.votes, voter.scores()
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastvote import distributed, ops


class _Voter:
    """Shared state: votes [K] (int64 for "count", else float64), the running
    sum of per-row scores [K] float64, and the number of rows seen."""

    #: True when a larger secondary score ranks a class first.
    higher_score_first: bool = True

    def __init__(self, num_classes: int, k: int = 1, weight: str = "count"):
        if weight not in ops.WEIGHTS:
            raise ValueError(f"weight='{weight}' is unknown; expected one of {ops.WEIGHTS}")
        if not 1 <= k <= num_classes:
            raise ValueError(f"k={k} is out of range; expected 1 <= k <= {num_classes} (the number of classes)")
        self.num_classes = num_classes
        self.k = k
        self.weight = weight
        self.votes = torch.zeros(num_classes, dtype=torch.int64 if weight == "count" else torch.float64)
        self._score_sum = torch.zeros(num_classes, dtype=torch.float64)
        self.rows = 0

    def _add(self, votes: Tensor, mean_scores: Tensor, rows: int) -> None:
        self.votes += votes.cpu()
        self._score_sum += mean_scores.cpu() * rows  # the ops return means; sums combine
        self.rows += rows

    def scores(self) -> Tensor:
        """The mean secondary score per class over every row seen (zeros if none)."""
        return self._score_sum / max(self.rows, 1)

    def all_reduce(self) -> None:
        """Sums votes, scores and row counts over the torch.distributed ranks
        (a no-op in one process)."""
        if not distributed.active():
            return
        packed = distributed.all_reduce_(torch.cat([
            self.votes.double(), self._score_sum, torch.tensor([float(self.rows)], dtype=torch.float64)]))
        k = self.num_classes
        # Counts stay exact through float64 up to 2^53 votes.
        self.votes = packed[:k].to(self.votes.dtype)
        self._score_sum = packed[k:2 * k]
        self.rows = int(packed[2 * k])


class LMVoter(_Voter):
    """Label mapping: each target row votes for its k largest source logits;
    ties between classes are broken by the mean softmax probability."""

    higher_score_first = True

    def update(self, logits: Tensor) -> None:
        """logits: [B, K] surrogate outputs for a batch of target samples."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits has shape {list(logits.shape)}; expected [batch, {self.num_classes}]")
        self._add(ops.lm_vote(logits, self.k, self.weight), ops.lm_scores(logits), logits.shape[0])


class FMVoter(_Voter):
    """Feature mapping: each target row votes for its k nearest centroids; ties
    between classes are broken by the mean distance (l2, smaller first) or the
    mean cosine similarity (larger first)."""

    def __init__(self, centroids: Tensor, k: int = 1, metric: str = "l2", weight: str = "count",
                 temperature: float = 1.0):
        if metric not in ops.METRICS:
            raise ValueError(f"metric='{metric}' is unknown; expected one of {ops.METRICS}")
        super().__init__(centroids.shape[0], k, weight)
        self.centroids = centroids
        self.metric = metric
        self.temperature = temperature
        self.higher_score_first = metric == "cosine"

    def update(self, features: Tensor) -> None:
        """features: [B, D] surrogate features for a batch of target samples."""
        c = self.centroids.to(features.device)
        self._add(ops.fm_vote(features, c, self.k, self.metric, self.weight, self.temperature),
                  ops.fm_scores(features, c, self.metric), features.shape[0])


def combine(voters, normalize: bool = False):
    """Votes and scores of several targets voting together (multi-task).

    With normalize=True each target's votes are divided by its total, so each
    task weighs the same whatever its size. Returns (votes, scores) where
    votes is float64 when normalised or when any voter uses float weights.
    """
    voters = list(voters)
    if not voters:
        raise ValueError("combine() needs at least one voter")
    if len({v.num_classes for v in voters}) != 1:
        raise ValueError("every target must vote over the same source classes")
    votes = None
    scores = torch.zeros(voters[0].num_classes, dtype=torch.float64)
    for v in voters:
        part = v.votes.double() / max(float(v.votes.sum()), 1e-300) if normalize else v.votes
        votes = part if votes is None else (votes + part if votes.dtype == part.dtype
                                            else votes.double() + part.double())
        scores += v.scores() / len(voters)
    return votes, scores
