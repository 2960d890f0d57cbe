"""Streaming mini-batch K-means (Sculley, WWW 2010) for label-free FM: the
source's surrogate features are clustered and the clusters play the role of
source classes. Nothing but one batch and the K x D centroids is in memory;
the assignment step is fastvote's fused nearest_centroids op.

    centroids, assignments = kmeans(lambda: feature_batches(), num_clusters=1000)
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from fastvote import ops

Batches = Callable[[], Iterable[Tensor]]  # each call starts a fresh pass over [B, D] batches


def _reservoir(batches: Iterable[Tensor], size: int, rng: np.random.Generator) -> Tuple[Tensor, int]:
    """A uniform sample of `size` rows from one pass (Algorithm R), and the row count."""
    sample: Optional[Tensor] = None
    seen = 0
    for batch in batches:
        batch = batch.float().cpu()
        if sample is None:
            sample = torch.empty(size, batch.shape[1])
        for row in range(batch.shape[0]):
            if seen < size:
                sample[seen] = batch[row]
            else:
                j = int(rng.integers(0, seen + 1))
                if j < size:
                    sample[j] = batch[row]
            seen += 1
    if sample is None:
        raise ValueError("kmeans: the feature stream is empty")
    return sample[:min(seen, size)], seen


def _kmeans_plus_plus(sample: Tensor, num_clusters: int, metric: str, rng: np.random.Generator) -> Tensor:
    """Greedy k-means++ seeding on the sample (as scikit-learn): each step draws
    2 + log K candidates by D^2 sampling and keeps the one that lowers the
    total squared distance most, which avoids most bad local optima."""
    x = (torch.nn.functional.normalize(sample, dim=1) if metric == "cosine" else sample).double()
    trials = 2 + int(np.log(num_clusters))
    first = int(rng.integers(0, len(x)))
    centers = [first]
    d2 = (x - x[first]).pow(2).sum(1)
    for _ in range(1, num_clusters):
        total = float(d2.sum())
        if total <= 0:  # every point already is a center: pick uniformly
            picks = rng.integers(0, len(x), size=1)
        else:
            picks = rng.choice(len(x), size=trials, p=(d2 / total).numpy())
        candidates = torch.minimum(d2[None], torch.cdist(x[picks], x).pow(2))
        best = int(candidates.sum(1).argmin())
        centers.append(int(picks[best]))
        d2 = candidates[best]
    return x[centers].float()


def kmeans(batches: Batches, num_clusters: int, *, metric: str = "l2", epochs: int = 3,
           sample_size: Optional[int] = None, seed: int = 0, device: Optional[torch.device] = None,
           progress: bool = True) -> Tuple[Tensor, np.ndarray]:
    """Clusters a stream of feature batches.

    Args:
        batches: called once per pass; returns an iterable of [B, D] float tensors
            (the same rows in the same order each time).
        num_clusters: K >= 1, at most the number of rows.
        metric: "l2" or "cosine" (spherical: rows and centroids unit-normalised).
        epochs: mini-batch passes after seeding (each row updates its centroid
            with a per-centroid step 1/count).
        sample_size: rows kept for k-means++ seeding (default max(20 K, 2000)).
    Returns:
        centroids [K, D] float32 (on CPU), and assignments: int64 numpy [N], each
        row's nearest centroid after the last pass (in stream order).
    """
    if metric not in ops.METRICS:
        raise ValueError(f"metric='{metric}' is unknown; expected one of {ops.METRICS}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters={num_clusters} is invalid; expected >= 1")
    if epochs < 0:
        raise ValueError(f"epochs={epochs} is invalid; expected >= 0")
    rng = np.random.default_rng(seed)
    sample, rows = _reservoir(batches(), sample_size or max(20 * num_clusters, 2000), rng)
    if rows < num_clusters:
        raise ValueError(f"num_clusters={num_clusters} exceeds the {rows} rows to cluster")
    centroids = _kmeans_plus_plus(sample, num_clusters, metric, rng)
    device = torch.device(device) if device is not None else torch.device("cpu")
    centroids = centroids.to(device)
    counts = torch.zeros(num_clusters, dtype=torch.float64, device=device)

    def rows_of(batch: Tensor) -> Tensor:
        batch = batch.to(device).float()
        return torch.nn.functional.normalize(batch, dim=1) if metric == "cosine" else batch

    for epoch in range(epochs):
        for batch in _bar(batches(), progress, f"k-means pass {epoch + 1}/{epochs}"):
            x = rows_of(batch)
            _, assign = ops.nearest_centroids(x, centroids, 1, metric)
            sums, n = ops.class_centroids(x, assign[:, 0], num_clusters)
            touched = n > 0
            counts += n.to(counts.dtype)
            # Per-centroid step 1/count: each centroid is the running mean of
            # every row ever assigned to it (Sculley's update, batched).
            step = (n.double() / counts.clamp(min=1))[:, None]
            mean = sums / n.clamp(min=1)[:, None].double()
            updated = centroids.double() + step * (mean - centroids.double())
            centroids = torch.where(touched[:, None], updated, centroids.double()).float()
            if metric == "cosine":
                centroids = torch.nn.functional.normalize(centroids, dim=1)
        _reseed_empty(centroids, counts, sample, metric, rng)

    assignments = np.empty(rows, dtype=np.int64)
    start = 0
    for batch in _bar(batches(), progress, "k-means assignment"):
        _, assign = ops.nearest_centroids(rows_of(batch), centroids, 1, metric)
        assignments[start:start + len(assign)] = assign[:, 0].cpu().numpy()
        start += len(assign)
    if start != rows:
        raise RuntimeError(f"kmeans: the feature stream gave {start} rows on the last pass but {rows} "
                           "on the first; batches() must replay the same rows")
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
    return iter(tqdm(it, desc=desc, leave=False, disable=not progress))
