"""Random class-wise pruning (SPEC.md's Random baseline, class-wise form):
`keep` source classes drawn uniformly with the seed, all their samples kept.
The target is not looked at; it is the bar LM and FM must clear."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fastvote.methods.base import Selection, View
from fastvote.select import class_indices

CLASS_WISE = True
NEEDS = {"source": (), "target": ()}


def select(source: View, targets: Sequence[View], *, keep: int, seed: int = 0, **_unused) -> Selection:
    """Keeps `keep` classes chosen uniformly at random (numpy Generator(seed))."""
    rng = np.random.default_rng(seed)
    kept = torch.from_numpy(rng.choice(source.num_classes, size=keep, replace=False).astype(np.int64))
    return Selection(indices=class_indices(source.labels, kept), kept_classes=kept, votes=None,
                     scores=torch.zeros(source.num_classes, dtype=torch.float64), groups=source.labels,
                     info={"seed": seed})
