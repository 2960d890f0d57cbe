"""What every pruning method shares: the views of the data it reads and the
Selection it returns. Methods see surrogate outputs as streams of batches,
never a dataset; training-based baselines ask the source view for training
runs (the view owns the loaders, the models and the training loop, which live
in the layers below prune.py) and keep only the score definitions here.

Sample-wise methods (``CLASS_WISE = False``) get ``keep`` = the number of
source SAMPLES to keep (prune's ``ratio`` is then the fraction of samples
removed) and return the kept stream rows with one score a sample.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple)

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from fastvote import progress as bars
from fastvote.atomic import atomic_path, write_json

from fastvote.methods.spec import Option


class View(Protocol):
    """A stream of surrogate outputs over one dataset, in dataset order (what
    every method reads of its targets, and the voting methods of the source)."""

    #: N, the rows of every pass.
    num_rows: int
    #: the source's int64 [N] labels in stream order (None for targets and unlabelled sources).
    labels: Optional[np.ndarray]
    #: K, the number of source classes, and their names (None when unnamed).
    num_classes: Optional[int]
    class_names: Optional[List[str]]
    #: where the surrogate and the ops run.
    device: torch.device

    def batches(self, want: Sequence[str], shard: bool = False) -> Iterator[Dict[str, Tensor]]:
        """A fresh pass yielding dicts of the keys in `want` ("logits" [B, K],
        "features" [B, D], "labels" [B]); every pass gives the same rows in the
        same order. shard=True: only this rank's rows under torchrun
        (fastvote.distributed.shard), so sums over passes are all-reduced."""
        ...


class TrainableSource(View, Protocol):
    """A source view that also serves the sample-wise baselines; each member
    raises a clear error where the source cannot provide it (images of a
    source given as precomputed outputs)."""

    #: {"source": ..., "surrogate": ...} fingerprints, for cache keys.
    fingerprint: Dict[str, Optional[str]]
    #: where scores are cached (None: not cached).
    cache_dir: Optional[Path]

    @property
    def recipe(self) -> dict:
        """A JSON-able description of train_run (arch, epochs, batch size,
        learning rate, ...), part of every training score's cache key."""
        ...

    def array(self, output: str) -> np.ndarray:
        """The whole column [N, ...] in stream order (computed once, then kept
        on disk under the prune workdir)."""
        ...

    def samples(self, batch_size: Optional[int] = None) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
        """One pass of the source images through the surrogate's eval
        preprocessing: (images float [B, 3, H, W] on device, labels int64 [B],
        stream rows int64 [B])."""
        ...

    def train_run(self, seed: int, epochs: int, on_batch: Optional[Callable] = None) -> torch.nn.Module:
        """A fresh model of the surrogate's architecture (head over the source
        classes, initialised from `seed`) trained from scratch for `epochs`
        epochs of the recipe; on_batch(rows, logits, labels) sees every
        training minibatch's forward pass (train mode, before the step).
        Returns the model in eval mode on ``device``."""
        ...


@dataclass
class Selection:
    """What a method keeps.

    indices: sorted int64 [M] stream rows of the kept source samples (prune
        maps them to source positions).
    kept_classes: kept class (or cluster) ids in rank order; None for sample-wise methods.
    votes: [K] votes per class (class-wise voting methods), else None.
    scores: [K] the secondary per-class score, or [N] per-sample scores (float64).
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
    """One voter per target, fed the target's `output` batch by batch; under
    torchrun each rank votes with its shard of the target and the votes are summed."""
    voters = []
    for i, target in enumerate(targets):
        voter = make_voter()
        for batch in tqdm(target.batches((output,), shard=True), desc=f"{label} votes (target {i + 1}/{len(targets)})",
                          leave=False, disable=bars.disable(progress)):
            voter.update(batch[output])
        voter.all_reduce()
        voters.append(voter)
    return voters


# Options of the voting methods (lm; fm adds its own).
VOTE_OPTIONS = (
    Option("k", int, 1, "source classes each target sample votes for", low=1),
    Option("weight", str, "count", "a vote's weight: count (the paper), rank or soft",
           choices=("count", "rank", "soft")),
    Option("reverse", bool, False, "keep the LEAST voted classes (the paper's ablation)"),
    Option("normalize_targets", bool, False, "multi-task: every target's votes weigh the same"),
)


# --------------------------------------------------------------------------
# Sample-wise helpers
# --------------------------------------------------------------------------

def tie_keys(n: int, seed: int) -> np.ndarray:
    """A seeded random permutation used as the last sort key: equal scores are
    ordered the same way on every run with this seed, and not by file order
    (a class-sorted source would otherwise lose whole classes to ties)."""
    return np.random.default_rng([seed, 0x7135]).permutation(n)


def rank(scores, seed: int, descending: bool) -> np.ndarray:
    """Rows sorted by score (largest first when `descending`), ties by
    :func:`tie_keys`. NaN scores are an error. Returns int64 [N]."""
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} scores are NaN; the scoring run diverged "
                         "(lower the learning rate of the source recipe)")
    return np.lexsort((tie_keys(len(s), seed), -s if descending else s)).astype(np.int64)


def keep_top(scores, keep: int, seed: int, highest: bool = True) -> Tensor:
    """Sorted int64 rows of the `keep` highest (or lowest) scores, ties by :func:`tie_keys`."""
    order = rank(scores, seed, descending=highest)
    return torch.from_numpy(np.sort(order[:keep]))


def sample_selection(rows, scores: Tensor, info: Dict[str, object]) -> Selection:
    return Selection(indices=torch.as_tensor(np.sort(np.asarray(rows, dtype=np.int64))), kept_classes=None,
                     votes=None, scores=torch.as_tensor(scores).double(), info=info)


def run_seed(seed: int, run: int) -> int:
    """The seed of independent run `run` of a method called with `seed`."""
    return int(np.random.SeedSequence([seed, run]).generate_state(1)[0])


DEFAULT_RUNS = 10  # Paul et al. average GraNd and EL2N over 10 independent runs
RUNS = Option("runs", int, DEFAULT_RUNS, "independent training runs to average over", low=1)
EPOCH = Option("epoch", int, None, "epochs of training before scoring; 0 = at initialisation "
               "(default: 10% of the recipe's epochs)", low=0)


def mean_over_runs(source: TrainableSource, per_batch, *, name: str, seed: int, runs: int, epoch: int,
                   progress: bool) -> Tensor:
    """The mean over `runs` training runs (run r from run_seed(seed, r),
    trained `epoch` epochs) of per_batch(model, images, labels) -> [B], over
    every source sample (eval preprocessing). Returns float64 [N]."""
    total = torch.zeros(source.num_rows, dtype=torch.float64)
    for r in range(runs):
        model = source.train_run(run_seed(seed, r), epoch)
        for images, labels, rows in tqdm(source.samples(), desc=f"{name} run {r + 1}/{runs}", leave=False,
                                         disable=bars.disable(progress)):
            total.index_add_(0, rows.cpu().long(), per_batch(model, images, labels).detach().double().cpu())
    return total / runs


def default_epoch(recipe: dict) -> int:
    """Where "early in training" is by default: 10% of the recipe's epochs
    (Paul et al. score EL2N at epoch 20 of 200), at least 1."""
    return max(1, int(round(0.1 * recipe["epochs"])))


def check_int(name: str, value, low: int, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < low:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= {low} ({what})")
    return int(value)


# --------------------------------------------------------------------------
# The score cache
# --------------------------------------------------------------------------

def cached_scores(view: TrainableSource, name: str, args: dict,
                  compute: Callable[[], Tensor]) -> Tuple[Tensor, Optional[Path]]:
    """Per-sample scores [N] float64, computed once per (name, source
    fingerprint, surrogate fingerprint, args) and kept as
    ``<workdir>/scores/<name>-<hash>.npy`` (with a .json saying what it holds),
    so a sweep over ratios scores once. `args` holds everything else the
    scores depend on (seed, runs, epoch, the training recipe, ...).
    Returns (scores, path or None when the view has no cache)."""
    directory = getattr(view, "cache_dir", None)
    fingerprint = dict(getattr(view, "fingerprint", None) or {})
    if directory is None or not fingerprint.get("source"):
        return compute().double(), None
    what = {"method": name, **fingerprint, "args": args}
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = Path(directory) / f"{name}-{key}.npy"
    if path.is_file():
        scores = torch.from_numpy(np.load(path))
        if len(scores) == view.num_rows:
            return scores, path
    scores = compute().double()
    with atomic_path(path) as tmp:
        np.save(tmp, scores.numpy())
    write_json(path.with_suffix(".json"), what, default=str)
    return scores, path
