"""Random pruning (SPEC.md's Random baseline), the bar every method must clear.
The target is not looked at.

Two forms, two registry names:
- ``random`` (this module, class-wise): `keep` source classes drawn uniformly
  with the seed, all their samples kept; ratio = fraction of classes removed.
- ``random-sample`` (:data:`sample_wise`): `keep` source samples drawn
  uniformly with the seed, whatever their class; ratio = fraction of SAMPLES
  removed.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch

from fastvote.methods.base import Selection, View, sample_selection
from fastvote.select import class_indices, present_classes

CLASS_WISE = True
NEEDS = {"source": (), "target": ()}
OPTIONS = ()


def select(source: View, targets: Sequence[View], *, keep: int, seed: int = 0, device=None,
           progress: bool = True) -> Selection:
    """Keeps `keep` classes chosen uniformly at random (numpy Generator(seed))
    among the classes with source samples."""
    rng = np.random.default_rng(seed)
    present = np.flatnonzero(present_classes(source.labels, source.num_classes))
    kept = torch.from_numpy(rng.choice(present, size=keep, replace=False).astype(np.int64))
    return Selection(indices=class_indices(source.labels, kept), kept_classes=kept, votes=None,
                     scores=torch.zeros(source.num_classes, dtype=torch.float64), groups=source.labels,
                     info={"seed": seed})


def select_samples(source: View, targets: Sequence[View], *, keep: int, seed: int = 0, device=None,
                   progress: bool = True) -> Selection:
    """Keeps `keep` SAMPLES (prune's ratio: the fraction of source samples
    removed) drawn uniformly without replacement by numpy Generator(seed).
    Scores: all zero (no sample is preferred)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(source.num_rows, size=keep, replace=False)
    return sample_selection(rows, torch.zeros(source.num_rows, dtype=torch.float64),
                            {"seed": seed, "granularity": "sample"})


# The registry's "random-sample": the same interface as a method module.
sample_wise = SimpleNamespace(
    __name__="fastvote.methods.random.sample_wise", __doc__=select_samples.__doc__,
    CLASS_WISE=False, NEEDS={"source": (), "target": ()}, OPTIONS=(), select=select_samples)
