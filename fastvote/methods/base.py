"""What every pruning method shares: the views of the data it reads and the
Selection it returns. Methods see surrogate outputs as streams of batches,
never a model or a dataset (those live in the layers below prune.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Sequence

import numpy as np
from torch import Tensor
from tqdm import tqdm


class View(Protocol):
    """A stream of surrogate outputs over one dataset, in dataset order.

    ``batches(want)`` starts a fresh pass and yields dicts holding the keys in
    `want` ("logits" [B, K], "features" [B, D], "labels" [B]); every pass gives
    the same rows in the same order. Source views also carry ``labels`` (int64
    numpy [N]), ``num_classes`` and ``class_names``.
    """

    def batches(self, want: Sequence[str]) -> Iterator[Dict[str, Tensor]]: ...


@dataclass
class Selection:
    """What a method keeps.

    indices: sorted int64 [M] positions of the kept source samples.
    kept_classes: kept class (or cluster) ids in rank order; None for sample-wise methods.
    votes: [K] votes per class (class-wise voting methods), else None.
    scores: [K] the secondary per-class score, or [N] per-sample scores.
    groups: int64 [N] the class of every source sample as the method saw it
        (the labels, or K-means cluster ids for label-free FM).
    info: method-specific facts recorded in the manifest.
    """

    indices: Tensor
    kept_classes: Optional[Tensor]
    votes: Optional[Tensor]
    scores: Tensor
    groups: Optional[np.ndarray] = None
    info: Dict[str, object] = field(default_factory=dict)


def vote(targets: Sequence[View], make_voter: Callable[[], object], output: str, progress: bool,
         label: str) -> List[object]:
    """One voter per target, fed the target's `output` batch by batch, summed
    over torch.distributed ranks when running under torchrun."""
    voters = []
    for i, target in enumerate(targets):
        voter = make_voter()
        for batch in tqdm(target.batches((output,)), desc=f"{label} votes (target {i + 1}/{len(targets)})",
                          leave=False, disable=not progress):
            voter.update(batch[output])
        voter.all_reduce()
        voters.append(voter)
    return voters
