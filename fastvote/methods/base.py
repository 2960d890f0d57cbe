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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple)

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm


class View(Protocol):
    """A stream of surrogate outputs over one dataset, in dataset order.

    ``batches(want, shard=False)`` starts a fresh pass and yields dicts holding
    the keys in `want` ("logits" [B, K], "features" [B, D], "labels" [B]); every
    pass gives the same rows in the same order. With ``shard=True`` it gives
    only this rank's rows (``fastvote.distributed.shard``) under torchrun, so
    sums over passes are all-reduced (votes, centroid sums, K-means statistics). Source views also carry ``labels`` (int64
    numpy [N]), ``num_classes`` and ``class_names``.

    Source views also serve the sample-wise baselines (each raises a clear
    error where the source cannot provide it, e.g. images for a source given
    as precomputed outputs):

    - ``num_rows``: N, the rows of every pass.
    - ``array(output)``: the whole column [N, ...] as a numpy array in stream
      order (computed once, then kept on disk under the prune workdir).
    - ``samples(batch_size=None)``: one pass of the source images through the
      surrogate's eval preprocessing: ``(images float [B, 3, H, W] on
      device, labels int64 [B], rows int64 [B])``, rows = stream rows.
    - ``train_run(seed, epochs, on_batch=None)``: a fresh model of the
      surrogate's architecture (head over the source classes, initialised
      from `seed`) trained from scratch on the source for `epochs` epochs of
      the source recipe (``recipe``); ``on_batch(rows, logits, labels)`` sees
      every training minibatch's forward pass (train mode, before the step).
      Returns the model in eval mode on ``device``.
    - ``recipe``: a JSON-able dict describing ``train_run`` (arch, epochs,
      batch size, learning rate, ...), part of every training score's cache key.
    - ``fingerprint``: {"source": ..., "surrogate": ...} for cache keys.
    - ``cache_dir``: where scores are cached (None: not cached).
    - ``device``: where models run.
    """

    def batches(self, want: Sequence[str], shard: bool = False) -> Iterator[Dict[str, Tensor]]: ...


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
                          leave=False, disable=not progress):
            voter.update(batch[output])
        voter.all_reduce()
        voters.append(voter)
    return voters


# --------------------------------------------------------------------------
# Sample-wise helpers
# --------------------------------------------------------------------------

def sample_keep_count(num_samples: int, ratio: Optional[float] = None, keep: Optional[int] = None) -> int:
    """How many SAMPLES a sample-wise method keeps, from exactly one of
    `ratio` (fraction of source samples removed, 0 <= ratio < 1) and `keep`
    (1 <= keep <= num_samples). round(N (1 - ratio)), at least one."""
    if (ratio is None) == (keep is None):
        raise ValueError(f"give exactly one of ratio= (fraction of source samples removed) and keep= "
                         f"(samples kept); got ratio={ratio}, keep={keep}")
    if keep is not None:
        if int(keep) != keep or not 1 <= int(keep) <= num_samples:
            raise ValueError(f"keep={keep} is out of range; expected an integer 1 <= keep <= {num_samples} "
                             "(the number of source samples kept by a sample-wise method)")
        return int(keep)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio} is out of range; expected 0 <= ratio < 1 (the fraction of "
                         "source samples removed by a sample-wise method)")
    return max(1, int(round(num_samples * (1.0 - ratio))))


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


def mean_over_runs(source: View, per_batch, *, name: str, seed: int, runs: int, epoch: int,
                   progress: bool) -> Tensor:
    """The mean over `runs` training runs (run r from run_seed(seed, r),
    trained `epoch` epochs) of per_batch(model, images, labels) -> [B], over
    every source sample (eval preprocessing). Returns float64 [N]."""
    total = torch.zeros(source.num_rows, dtype=torch.float64)
    for r in range(runs):
        model = source.train_run(run_seed(seed, r), epoch)
        for images, labels, rows in tqdm(source.samples(), desc=f"{name} run {r + 1}/{runs}", leave=False,
                                         disable=not progress):
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

def cached_scores(view: View, name: str, args: dict,
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, scores.numpy())
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(what, indent=1, default=str))
    return scores, path
