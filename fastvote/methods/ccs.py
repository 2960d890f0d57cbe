"""Coverage-centric coreset selection, CCS (Zheng et al., ICLR 2023; SPEC.md
Baselines), sample-wise, over a difficulty score (higher = harder).

Definition, as implemented (the paper's Algorithm 1):
1. Drop the floor(beta N) hardest samples (highest score; ties by a seeded
   random key). beta is capped at 1 - keep/N so the budget can always be
   filled (the authors use beta = 0 at low pruning ratios); the manifest
   records the beta used.
2. Split the score range [lo, hi] of the samples left into `strata` (k = 50)
   equal-width strata: a sample goes to stratum
   min(floor((s - lo) k / (hi - lo)), k - 1), so the top stratum includes hi;
   equal scores everywhere put every sample in stratum 0.
3. Budget m = keep. Visit the strata from the smallest to the largest (equal
   sizes: lower stratum first); each takes b = min(its size, floor(m / number
   of strata not yet visited)) samples, drawn uniformly without replacement
   (numpy Generator(seed)), and m -= b: what a small stratum cannot use passes
   to the larger ones. Exactly `keep` samples result.

The score (option `score`): "el2n" by default (continuous, so the 50 strata
are populated; the authors' release uses AUM, a training-dynamics score not
implemented here), or "forgetting" or "grand"; `runs` and `epoch` go to that
score (its own defaults when unset), and the cached scores are shared with the
el2n / forgetting / grand methods. Default beta = 0.1 (the authors tune beta
per ratio: 0 at low ratios, up to 0.3 at 90% pruning). ratio = the fraction
of source SAMPLES removed.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np

from fastvote.methods import el2n, forgetting, grand
from fastvote.methods.base import EPOCH, RUNS, Selection, TrainableSource, View, check_int, rank, sample_selection
from fastvote.methods.spec import Option

CLASS_WISE = False
NEEDS = {"source": ("images", "labels"), "target": ()}
SCORES = {"el2n": el2n, "forgetting": forgetting, "grand": grand}
DEFAULT_SCORE = "el2n"
DEFAULT_BETA = 0.1
DEFAULT_STRATA = 50
OPTIONS = (
    Option("score", str, DEFAULT_SCORE, "the difficulty score to stratify", choices=tuple(sorted(SCORES))),
    Option("beta", float, DEFAULT_BETA, "fraction of the hardest samples dropped first", low=0.0, high=1.0),
    Option("strata", int, DEFAULT_STRATA, "equal-width score strata", low=1),
    dataclasses.replace(RUNS, default=None, doc="training runs of the score (default: the score's own)"),
    EPOCH,
)


def strata_of(scores: np.ndarray, strata: int) -> np.ndarray:
    """The equal-width stratum of every score: int64 [N] in [0, strata)."""
    s = np.asarray(scores, dtype=np.float64)
    lo, hi = float(s.min()), float(s.max())
    if hi == lo:
        return np.zeros(len(s), dtype=np.int64)
    return np.minimum(np.floor((s - lo) * strata / (hi - lo)), strata - 1).astype(np.int64)


def allocate(sizes, budget: int) -> np.ndarray:
    """Per-stratum budgets: smallest stratum first, each min(size, floor(m /
    strata left)), the rest passed on. int64 [len(sizes)]."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if not 0 <= budget <= int(sizes.sum()):
        raise ValueError(f"budget={budget} is out of range; expected 0 <= budget <= {int(sizes.sum())}")
    out = np.zeros(len(sizes), dtype=np.int64)
    left = budget
    for i, stratum in enumerate(np.argsort(sizes, kind="stable")):
        out[stratum] = min(int(sizes[stratum]), left // (len(sizes) - i))
        left -= int(out[stratum])
    assert left == 0, "CCS allocation left budget unspent"  # the last stratum takes min(size, left)
    return out


def ccs_sample(scores, keep: int, *, beta: float = DEFAULT_BETA, strata: int = DEFAULT_STRATA,
               seed: int = 0) -> Tuple[np.ndarray, dict]:
    """Algorithm 1 of Zheng et al. on scores [N] (higher = harder): sorted
    int64 rows of the `keep` kept samples, and the facts (beta used, strata
    sizes and budgets)."""
    s = np.asarray(scores, dtype=np.float64)
    n = len(s)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta={beta!r} is out of range; expected 0 <= beta < 1 (the fraction of hardest "
                         "samples dropped before stratified sampling)")
    strata = check_int("strata", strata, 1, "equal-width score strata")
    if not 1 <= keep <= n:
        raise ValueError(f"keep={keep} is out of range; expected 1 <= keep <= {n}")
    hard = min(int(np.floor(beta * n)), n - keep)
    rest = np.sort(rank(s, seed, descending=True)[hard:])       # without the `hard` hardest
    which = strata_of(s[rest], strata)
    sizes = np.bincount(which, minlength=strata)
    budgets = allocate(sizes, keep)
    rng = np.random.default_rng(seed)
    kept = [rng.choice(rest[which == j], size=int(b), replace=False) for j, b in enumerate(budgets) if b]
    rows = np.sort(np.concatenate(kept))
    return rows, {"beta": beta, "beta_used": hard / n, "hard_dropped": hard, "strata": strata,
                  "strata_sizes": sizes.tolist(), "strata_budgets": budgets.tolist()}


def check(method: str, options, given) -> None:
    if options["score"] not in SCORES:
        raise ValueError(f"method={method!r}: score={options['score']!r} is unknown; expected one of {sorted(SCORES)}")
    if "epoch" in given and options["score"] == "forgetting":
        raise ValueError(f"method={method!r}: epoch={options['epoch']} does not apply to score='forgetting' (it "
                         "counts over the whole recipe); drop epoch or use score='el2n' or 'grand'")


def select(source: TrainableSource, targets: Sequence[View], *, keep: int, seed: int = 0, score: str = DEFAULT_SCORE,
           beta: float = DEFAULT_BETA, strata: int = DEFAULT_STRATA, runs: Optional[int] = None,
           epoch: Optional[int] = None, device=None, progress: bool = True) -> Selection:
    """Keeps `keep` source SAMPLES (prune's ratio: the fraction of samples
    removed) by CCS over the `score` difficulty."""
    check(f"ccs:score={score}", {"score": score, "epoch": epoch}, ("epoch",) if epoch is not None else ())
    kw = {} if runs is None else {"runs": runs}
    if epoch is not None:
        kw["epoch"] = epoch
    values, info = SCORES[score].scores(source, seed=seed, progress=progress, **kw)
    rows, facts = ccs_sample(values.numpy(), keep, beta=beta, strata=strata, seed=seed)
    return sample_selection(rows, values, {**info, **facts, "keep": "coverage-centric stratified"})
