"""Streaming K-means (Lloyd's algorithm, k-means++ seeding) for label-free FM:
the source's surrogate features are clustered and the clusters play the role
of source classes. Nothing but one batch, the seeding sample and the K x D
statistics is in memory; the assignment step is fastvote's fused
nearest_centroids op, the update step its class_centroids op.

Full-batch passes, not mini-batch updates, so that a pass is a sum over rows:
under torch.distributed each rank streams its shard and the per-cluster sums
and counts are all-reduced, which gives the clusters of one process (sums are
float64) whatever the number of ranks.

    centroids, assignments = kmeans(lambda: feature_batches(), 1000, num_rows=n)
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from fastvote import progress as bars

from fastvote import distributed, ops

Batches = Callable[[], Iterable[Tensor]]  # each call starts a fresh pass over [B, D] batches


def _count(batches: Batches) -> int:
    return sum(len(b) for b in batches())


def _sample(batches: Batches, rows: range, picks: np.ndarray, sharded: bool) -> Tensor:
    """The rows at sorted global positions `picks`, gathered in one pass over
    this rank's `rows`; when sharded, summed over the ranks (each row comes
    from exactly one rank, the others add zeros)."""
    sample: Optional[Tensor] = None
    start = rows.start
    for batch in batches():
        batch = batch.float().cpu()
        if sample is None:
            sample = torch.zeros(len(picks), batch.shape[1], dtype=torch.float64)
        lo, hi = np.searchsorted(picks, [start, start + len(batch)])
        sample[lo:hi] = batch[torch.from_numpy(picks[lo:hi] - start)].double()
        start += len(batch)
    if start != rows.stop or sample is None:
        raise RuntimeError(f"kmeans: the feature stream gave {start - rows.start} rows; expected {len(rows)} "
                           "(a non-empty shard)")
    return (distributed.all_reduce_(sample) if sharded else sample).float()


def _kmeans_plus_plus(sample: Tensor, num_clusters: int, metric: str, rng: np.random.Generator) -> Tensor:
    """Greedy k-means++ seeding on the sample (as scikit-learn): each step draws
    2 + log K candidates by D^2 sampling and keeps the one that lowers the
    total squared distance most, which avoids most bad local optima."""
    x = (torch.nn.functional.normalize(sample, dim=1) if metric == "cosine" else sample).double()
    trials = 2 + int(np.log(num_clusters))
    first = int(rng.integers(0, len(x)))
    centers = [first]
    d2 = (x - x[first]).pow(2).sum(1)
    norms = x.pow(2).sum(1)
    # ||a||^2 + ||b||^2 - 2 a.b: one float64 GEMM a step (cdist does a slow direct
    # loop for a handful of candidates; 10x slower at K = 1000)
    sq_dist = lambda rows: (norms[rows][:, None] + norms[None] - 2 * x[rows] @ x.T).clamp_(min=0)
    for _ in range(1, num_clusters):
        total = float(d2.sum())
        if total <= 0:  # every point already is a center: pick uniformly
            picks = rng.integers(0, len(x), size=1)
        else:
            picks = rng.choice(len(x), size=trials, p=(d2 / total).numpy())
        candidates = torch.minimum(d2[None], sq_dist(torch.from_numpy(np.asarray(picks))))
        best = int(candidates.sum(1).argmin())
        centers.append(int(picks[best]))
        d2 = candidates[best]
    return x[centers].float()


def kmeans(batches: Batches, num_clusters: int, *, num_rows: Optional[int] = None, sharded: bool = False,
           metric: str = "l2", iterations: int = 20, tol: float = 1e-4, sample_size: Optional[int] = None,
           seed: int = 0, device: Optional[torch.device] = None, progress: bool = True) -> Tuple[Tensor, np.ndarray]:
    """Clusters a stream of feature batches.

    Args:
        batches: called once per pass; returns an iterable of [B, D] float tensors
            (the same rows in the same order each time): all `num_rows` rows, or
            with ``sharded=True`` this rank's rows ``fastvote.distributed.shard(num_rows)``.
        num_clusters: K >= 1, at most the number of rows.
        num_rows: N, the rows of the whole stream (None: counted with one pass;
            required when sharded).
        sharded: the stream is this rank's shard; sums are all-reduced over ranks.
        metric: "l2" or "cosine" (spherical: rows and centroids unit-normalised).
        iterations: at most this many Lloyd passes after seeding; they stop early
            once no centroid moves more than `tol` (squared shift, relative to
            the mean feature variance, as scikit-learn's tolerance).
        sample_size: rows drawn uniformly (seeded) for k-means++ seeding and for
            restarting empty clusters (default max(20 K, 2000)).
    Returns:
        centroids [K, D] float32 (on CPU), and assignments: int64 numpy [N], every
        row's nearest final centroid, for all N rows on every rank.
    """
    if metric not in ops.METRICS:
        raise ValueError(f"metric='{metric}' is unknown; expected one of {ops.METRICS}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters={num_clusters} is invalid; expected >= 1")
    if iterations < 0:
        raise ValueError(f"iterations={iterations} is invalid; expected >= 0")
    if sharded and (num_rows is None or num_rows < distributed.world_size()):
        raise ValueError(f"kmeans(sharded=True) needs num_rows= (the rows of the whole stream) of at least "
                         f"one a rank; got num_rows={num_rows} for {distributed.world_size()} ranks")
    num_rows = num_rows if num_rows is not None else _count(batches)
    rows = distributed.shard(num_rows) if sharded else range(num_rows)
    if num_rows == 0:
        raise ValueError("kmeans: the feature stream is empty")
    if num_rows < num_clusters:
        raise ValueError(f"num_clusters={num_clusters} exceeds the {num_rows} rows to cluster")
    reduce = distributed.all_reduce_ if sharded else (lambda t: t)
    rng = np.random.default_rng(seed)
    size = min(num_rows, sample_size or max(20 * num_clusters, 2000))
    picks = np.sort(rng.choice(num_rows, size=size, replace=False))
    sample = _sample(batches, rows, picks, sharded)
    centroids = _kmeans_plus_plus(sample, num_clusters, metric, rng)
    # Scale of the tolerance: the mean per-dimension variance of the data (the sample's).
    tol = tol * float(sample.double().var(0).mean()) if len(sample) > 1 else 0.0
    device = torch.device(device) if device is not None else torch.device("cpu")
    centroids = centroids.to(device)

    def rows_of(batch: Tensor) -> Tensor:
        batch = batch.to(device).float()
        return torch.nn.functional.normalize(batch, dim=1) if metric == "cosine" else batch

    for it in range(iterations):
        sums = torch.zeros(num_clusters, centroids.shape[1], dtype=torch.float64)
        counts = torch.zeros(num_clusters, dtype=torch.float64)
        for batch in _bar(batches(), progress, f"k-means pass {it + 1}/{iterations}"):
            x = rows_of(batch)
            _, assign = ops.nearest_centroids(x, centroids, 1, metric)
            s, n = ops.class_centroids(x, assign[:, 0], num_clusters)
            sums += s.cpu()
            counts += n.cpu().double()
        packed = reduce(torch.cat([sums, counts[:, None]], 1))
        sums, counts = packed[:, :-1], packed[:, -1]
        updated = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], centroids.cpu().double())
        if metric == "cosine":
            updated = torch.nn.functional.normalize(updated, dim=1)
        updated = updated.float()
        _reseed_empty(updated, counts, sample, metric, rng)
        shift = float((updated.double() - centroids.cpu().double()).pow(2).sum(1).max())
        centroids = updated.to(device)
        if shift <= tol and bool((counts > 0).all()):
            break

    assignments = np.zeros(num_rows, dtype=np.int64)
    start = rows.start
    for batch in _bar(batches(), progress, "k-means assignment"):
        _, assign = ops.nearest_centroids(rows_of(batch), centroids, 1, metric)
        assignments[start:start + len(assign)] = assign[:, 0].cpu().numpy()
        start += len(assign)
    if start != rows.stop:
        raise RuntimeError(f"kmeans: the feature stream gave {start - rows.start} rows on the last pass but "
                           f"{len(rows)} on the first; batches() must replay the same rows")
    if sharded:  # each rank filled its shard; the sum is every row's cluster on every rank
        assignments = reduce(torch.from_numpy(assignments)).numpy()
    return centroids.cpu(), assignments


def _reseed_empty(centroids: Tensor, counts: Tensor, sample: Tensor, metric: str,
                  rng: np.random.Generator) -> None:
    """Centroids that no row chose restart at random sample rows, so every
    cluster stays usable (in place)."""
    empty = (counts == 0).nonzero().flatten()
    if len(empty) == 0:
        return
    picks = torch.as_tensor(rng.choice(len(sample), size=len(empty), replace=len(empty) > len(sample)))
    rows = sample[picks]
    if metric == "cosine":
        rows = torch.nn.functional.normalize(rows, dim=1)
    centroids[empty] = rows.to(centroids.device)


def _bar(it: Iterable, progress: bool, desc: str) -> Iterator:
    return iter(tqdm(it, desc=desc, leave=False, disable=bars.disable(progress)))
