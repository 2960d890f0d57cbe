"""Pruning methods, one module each with one interface: ``select(source,
targets, *, keep, seed, device, progress, **options) -> Selection`` plus
``CLASS_WISE``, ``NEEDS`` (which surrogate outputs it reads from the source
and the targets) and ``OPTIONS`` (its typed options, fastvote.methods.spec).
Adding a method touches its module and one line of METHODS.

Class-wise methods (lm, fm, random) keep whole classes: ``keep`` counts
classes and prune's ``ratio`` is the fraction of source classes removed.
Sample-wise methods (random-sample, moderate, grand, el2n, forgetting, ccs,
ssp; normsim, which scores each source sample against the target, and
lm+normsim / fm+normsim, class votes then NormSim inside the voted classes)
keep samples: ``keep`` counts samples and ``ratio`` is the fraction of source
SAMPLES removed.

Options ride on the method's name or come as arguments; :func:`parse` checks
both and returns the one spec every caller uses:
``parse("ssp:keep_hard=false")``, ``parse("fm", {"metric": "cosine"})``.
"""
from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import Dict, Union

from fastvote.methods import ccs, el2n, fm, forgetting, grand, lm, moderate, normsim, random, ssp, staged
from fastvote.methods.base import Selection, TrainableSource, View
from fastvote.methods.spec import MethodSpec, Option, parse

METHODS: Dict[str, Union[ModuleType, SimpleNamespace]] = {
    "lm": lm, "fm": fm, "random": random,
    "random-sample": random.sample_wise,
    "moderate": moderate, "grand": grand, "el2n": el2n, "forgetting": forgetting, "ccs": ccs, "ssp": ssp,
    "normsim": normsim, "lm+normsim": staged.lm_normsim, "fm+normsim": staged.fm_normsim,
}

__all__ = ["METHODS", "MethodSpec", "Option", "Selection", "TrainableSource", "View", "parse"]
