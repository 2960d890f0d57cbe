"""Class-then-sample selection: DP4TL's class votes choose where to look,
NormSim chooses what to keep there. Registered as ``lm+normsim`` and
``fm+normsim`` (the "+" reads as the field writes combined filters, e.g.
DataComp's "image-based ∩ CLIP score"), sample-wise.

Definition, as implemented (docs/SELECTION.md, "Class then sample"):
1. Stage 1, classes: LM or FM ranks the source classes (or FM's k-means
   clusters) with its own options and tie rules; classes are taken in rank
   order until they hold at least `pool` x keep samples (pool = 1: just enough
   classes for the budget; a large pool: every class, i.e. plain NormSim).
2. Stage 2, samples: the `keep` samples of those classes with the highest
   NormSim_p (fastvote.methods.normsim; ties by a seeded key), at most `cap`
   a class when capped (fastvote.select.capped_rows).
ratio = the fraction of source SAMPLES removed, as for every sample-wise method.
"""
from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import Dict

import numpy as np

from fastvote.methods import fm, lm, normsim
from fastvote.methods.base import sample_selection
from fastvote.methods.spec import Option
from fastvote.select import present_classes

POOL = Option("pool", float, 2.0, "stage 1 keeps the best-voted classes holding at least pool x keep samples",
              low=1.0)


def _stage_one(voter: ModuleType, source, targets, keep: int, pool: float, seed: int, device, progress,
               options: Dict[str, object]):
    """(candidate rows, the classes they come from in rank order, the groups, facts)."""
    if voter is fm and options.get("centroids") == "kmeans":
        num_groups = options.get("num_clusters") or source.num_classes
    else:
        num_groups = int(present_classes(source.labels, source.num_classes).sum())
    ranked = voter.select(source, targets, keep=num_groups, seed=seed, device=device, progress=progress, **options)
    groups = np.asarray(ranked.groups, dtype=np.int64)
    sizes = np.bincount(groups, minlength=int(ranked.kept_classes.max()) + 1)[ranked.kept_classes.numpy()]
    # Classes in rank order until their samples reach pool x keep (all of them if they never do).
    enough = np.flatnonzero(np.cumsum(sizes) >= pool * keep)
    taken = ranked.kept_classes[:int(enough[0]) + 1 if len(enough) else len(sizes)]
    candidates = np.flatnonzero(np.isin(groups, taken.numpy()))
    facts = {"stage1": voter.__name__.rsplit(".", 1)[-1], "pool": pool, "stage1_classes": taken.tolist(),
             "stage1_samples": int(len(candidates))}
    return candidates, groups, facts


def _make(voter: ModuleType) -> SimpleNamespace:
    name = voter.__name__.rsplit(".", 1)[-1]

    def select(source, targets, *, keep: int, p: str = "inf", cap=None, pool: float = 2.0, seed: int = 0,
               device=None, progress: bool = True, **voter_options):
        candidates, groups, facts = _stage_one(voter, source, targets, keep, pool, seed, device, progress,
                                               voter_options)
        values = normsim.scores(source, targets, p, device, progress)
        rows, capped = normsim.keep_best(values, keep, seed, cap, groups, candidates)
        selection = sample_selection(rows, values, {"score": normsim.SCORE_NAMES[p], "p": p, "seed": seed,
                                                    **facts, **capped})
        selection.groups = groups
        return selection

    select.__doc__ = (f"Keeps `keep` source SAMPLES: {name.upper()} votes pick the classes holding pool x keep "
                      "samples, NormSim_p picks the samples inside them (at most `cap` a class).")
    return SimpleNamespace(
        __name__=f"fastvote.methods.staged.{name}_normsim", __doc__=select.__doc__, CLASS_WISE=False,
        NEEDS={"source": tuple(dict.fromkeys(voter.NEEDS["source"] + ("features", "labels"))),
               "target": tuple(dict.fromkeys(voter.NEEDS["target"] + ("features",)))},
        OPTIONS=voter.OPTIONS + (normsim.P, normsim.CAP, POOL),
        check=getattr(voter, "check", None) or (lambda method, options, given: None),
        select=select)


lm_normsim = _make(lm)
fm_normsim = _make(fm)
