"""LM (label mapping, SPEC.md): each target sample votes for the source class
its surrogate logits rank highest (top-k with k > 1); the most-voted source
classes are kept with all their samples. Needs no pass over the source."""
from __future__ import annotations

from typing import Sequence

from fastvote.methods.base import VOTE_OPTIONS, Selection, View, vote
from fastvote.select import class_indices, present_classes, select_classes
from fastvote.voting import LMVoter, combine

CLASS_WISE = True
NEEDS = {"source": (), "target": ("logits",)}
OPTIONS = VOTE_OPTIONS


def select(source: View, targets: Sequence[View], *, keep: int, k: int = 1, weight: str = "count",
           reverse: bool = False, normalize_targets: bool = False, seed: int = 0, device=None,
           progress: bool = True) -> Selection:
    """Keeps `keep` source classes by LM votes (see fastvote.prune for the arguments)."""
    voters = vote(targets, lambda: LMVoter(source.num_classes, k, weight), "logits", progress, "LM")
    votes, scores = combine(voters, normalize=normalize_targets)
    kept = select_classes(votes, scores, keep, higher_score_first=LMVoter.higher_score_first, reverse=reverse,
                          present=present_classes(source.labels, source.num_classes))
    return Selection(indices=class_indices(source.labels, kept), kept_classes=kept, votes=votes,
                     scores=scores, groups=source.labels)
