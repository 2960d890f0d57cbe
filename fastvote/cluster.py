"""Streaming K-means for label-free FM: the source's surrogate features are
clustered and the clusters play the role of source classes. In memory: one
batch, the seeding sample, the K x D statistics and three numbers per fitting
row (never more than ``max_rows_per_cluster * K`` rows, whatever N).

The recipe, each step chosen to scale in K and N:
- seeding: k-means++ in rounds (:func:`_seed`): a round draws candidates by
  D^2 sampling from the seeding sample, keeps about as many as there are
  centers already by k-means++ restricted to the candidates, and updates the
  sample's distances with one GEMM. Work is one sample x K GEMM in all (the
  greedy one-center-a-step k-means++ read the whole sample K times: 140 min
  projected at K = 20,000), and quality stays k-means++'s (faiss's random
  init leaves blobs without a center on well-separated data).
- fitting rows: Lloyd passes run over a uniform sample of at most
  ``max_rows_per_cluster`` (256, faiss's default) rows a cluster; one more
  pass assigns every row. Centroids from 256 rows have a standard error of
  1/16 of the cluster's spread, so passes over more rows buy little and cost
  N / (256 K) times more. ``max_rows_per_cluster=None``: full passes.
- passes: Lloyd's algorithm with Hamerly's bounds (Hamerly, SDM 2010): each
  fitting row keeps an upper bound on the distance to its centroid and a
  lower bound on the distance to any other; a row whose bounds prove that its
  centroid cannot change skips the distance computation. Same result as plain
  Lloyd (up to float32 rounding on exact near-ties), and after the first few
  passes most rows skip.
- empty clusters restart at random rows of the seeding sample.

Full-batch passes, not mini-batch updates, so that a pass is a sum over rows:
under torch.distributed each rank streams its own rows and the per-cluster
sums and counts are all-reduced (sums are float64), and every decision
(sample, seeding, restarts, skips) depends on global row positions only: the
clusters of one process whatever the number of ranks.

    centroids, assignments = kmeans(lambda: feature_batches(), 1000, num_rows=n)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from fastvote import distributed, ops
from fastvote import progress as bars

Batches = Callable[[], Iterable[Tensor]]  # each call starts a fresh pass over [B, D] batches
MAX_ROWS_PER_CLUSTER = 256  # fitting rows a cluster (faiss's default cap)
SEED_ROWS_PER_CLUSTER = 16  # seeding sample rows a cluster
_BLOCK = 1 << 24  # elements of one rows x K distance block
_SLACK = 1e-5  # relative float32 error allowed for in the bounds
_OVERSAMPLE = 8  # candidates a round draws per center it adds
_POOL = 2048  # at most this many candidates a round (their distance matrix: 16 MB)


@dataclass
class Fit:
    """What :func:`fit` found: centroids [K, D] float32 (CPU), and how."""
    centroids: Tensor
    counts: Tensor  # [K] float64: fitting rows in each cluster after the last pass
    fit_rows: int  # rows the passes ran over (all rows, or the capped sample)
    seed_rows: int  # rows of the seeding sample
    passes: int  # Lloyd passes run (<= iterations; fewer when converged)
    seeding_seconds: float = 0.0
    pass_seconds: List[float] = field(default_factory=list)
    computed: List[float] = field(default_factory=list)  # per pass: fraction of rows whose distances were computed
    restarts: int = 0  # empty clusters restarted


def kmeans(batches: Batches, num_clusters: int, *, num_rows: Optional[int] = None, sharded: bool = False,
           metric: str = "l2", iterations: int = 20, tol: float = 1e-4, sample_size: Optional[int] = None,
           max_rows_per_cluster: Optional[int] = MAX_ROWS_PER_CLUSTER, seed: int = 0,
           device: Optional[torch.device] = None, progress: bool = True) -> Tuple[Tensor, np.ndarray]:
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
        sample_size: rows drawn uniformly (seeded) for seeding and for restarting
            empty clusters (default max(16 K, 2000)).
        max_rows_per_cluster: the passes run over a uniform sample of at most
            this many rows a cluster (None: over every row).
    Returns:
        centroids [K, D] float32 (on CPU), and assignments: int64 numpy [N], every
        row's nearest final centroid, for all N rows on every rank (for a stream
        too large for that, use :func:`fit` and :func:`assign`, as
        fastvote.data.shards does).
    """
    if sharded and (num_rows is None or num_rows < distributed.world_size()):
        raise ValueError(f"kmeans(sharded=True) needs num_rows= (the rows of the whole stream) of at least "
                         f"one a rank; got num_rows={num_rows} for {distributed.world_size()} ranks")
    num_rows = num_rows if num_rows is not None else sum(len(b) for b in batches())
    rows = distributed.shard(num_rows) if sharded else range(num_rows)
    result = fit(batches, num_clusters, rows=rows, num_rows=num_rows, sharded=sharded, metric=metric,
                 iterations=iterations, tol=tol, sample_size=sample_size,
                 max_rows_per_cluster=max_rows_per_cluster, seed=seed, device=device, progress=progress)
    assignments = np.zeros(num_rows, dtype=np.int64)
    start = rows.start
    for assign_, _ in assign(batches, result.centroids, metric, device=device, progress=progress):
        assignments[start:start + len(assign_)] = assign_.numpy()
        start += len(assign_)
    _check_replay(start - rows.start, len(rows))
    if sharded:  # each rank filled its shard; the sum is every row's cluster on every rank
        assignments = distributed.all_reduce_(torch.from_numpy(assignments)).numpy()
    return result.centroids, assignments


def fit(batches: Batches, num_clusters: int, *, rows: range, num_rows: int, sharded: bool = False,
        metric: str = "l2", iterations: int = 20, tol: float = 1e-4, sample_size: Optional[int] = None,
        max_rows_per_cluster: Optional[int] = MAX_ROWS_PER_CLUSTER, seed: int = 0,
        device: Optional[torch.device] = None, progress: bool = True) -> Fit:
    """The centroids of :func:`kmeans` (arguments as there), from a stream of
    this rank's rows: `rows`, a contiguous range of the `num_rows` global row
    positions (any split over ranks gives the same centroids)."""
    _check_args(num_clusters, metric, iterations, num_rows, max_rows_per_cluster, sample_size)
    device = torch.device(device) if device is not None else torch.device("cpu")
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    size = min(num_rows, sample_size or max(SEED_ROWS_PER_CLUSTER * num_clusters, 2000))
    sample = _gather(batches, rows, np.sort(rng.choice(num_rows, size=size, replace=False)), sharded, metric)
    sample = sample.to(device)
    centroids = _seed(sample, num_clusters, rng, progress)
    seeding = time.perf_counter() - started
    # Scale of the tolerance: the mean per-dimension variance of the data (the sample's).
    tol = tol * float(sample.double().var(0).mean()) if len(sample) > 1 else 0.0
    cap = None if max_rows_per_cluster is None else max_rows_per_cluster * num_clusters
    picks = None if cap is None or cap >= num_rows else np.sort(rng.choice(num_rows, size=cap, replace=False))
    lo, hi = (0, len(rows)) if picks is None else np.searchsorted(picks, [rows.start, rows.stop])
    bounds = _Bounds(int(hi - lo), device)
    result = Fit(centroids, torch.zeros(num_clusters, dtype=torch.float64), num_rows if picks is None else len(picks),
                 len(sample), 0, seeding)
    for it in range(iterations):
        started = time.perf_counter()
        sums = torch.zeros(num_clusters, centroids.shape[1], dtype=torch.float64)
        counts = torch.zeros(num_clusters, dtype=torch.float64)
        computed = torch.zeros(1, dtype=torch.float64)
        geometry = _Geometry(centroids)
        done = 0
        for x, at in _fitting_rows(batches, rows, picks, metric, device, progress,
                                   f"k-means pass {it + 1}/{iterations}"):
            assigned, n = bounds.update(x, at, geometry)
            s, c = ops.class_centroids(x, assigned, num_clusters)
            sums += s.cpu()
            counts += c.cpu().double()
            computed += n
            done += len(x)
        _check_replay(done, len(bounds.assigned))
        packed = torch.cat([sums, counts[:, None], computed[:, None].expand(num_clusters, 1)], 1)
        packed = distributed.all_reduce_(packed) if sharded else packed
        sums, counts = packed[:, :-2], packed[:, -2]
        updated = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], centroids.cpu().double())
        if metric == "cosine":
            updated = torch.nn.functional.normalize(updated, dim=1)
        updated = updated.float().to(device)
        result.restarts += _restart_empty(updated, counts, sample, rng)
        drift = (updated.double() - centroids.double()).pow(2).sum(1)
        bounds.moved(drift.sqrt().float())
        centroids = updated
        result.passes, result.counts = it + 1, counts
        result.pass_seconds.append(time.perf_counter() - started)
        result.computed.append(float(packed[0, -1]) / max(result.fit_rows, 1))
        if float(drift.max()) <= tol and bool((counts > 0).all()):
            break
    result.centroids = centroids.cpu()
    return result


def assign(batches: Batches, centroids: Tensor, metric: str = "l2", *, device: Optional[torch.device] = None,
           progress: bool = True, desc: str = "k-means assignment") -> Iterator[Tuple[Tensor, Tensor]]:
    """Every row's nearest centroid, batch by batch (streamed: nothing of
    size N): yields (clusters int64 [B], squared distances float32 [B]) on CPU,
    one pair per batch of `batches()` (cosine: distances between the
    unit-normalised row and centroid, 2 - 2 cos)."""
    if metric not in ops.METRICS:
        raise ValueError(f"metric='{metric}' is unknown; expected one of {ops.METRICS}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    geometry = _Geometry(centroids.to(device).float())
    for batch in _bar(batches(), progress, desc):
        x = _rows(batch, metric, device)
        d2, idx = geometry.nearest(x, 1)
        yield idx[:, 0].cpu(), _exact_d2(x, geometry.centroids, idx[:, 0]).cpu()


# ---------------------------------------------------------------- seeding

def _seed(sample: Tensor, num_clusters: int, rng: np.random.Generator, progress: bool) -> Tensor:
    """k-means++ in rounds on the seeding sample [S, D] float32 (rows already
    unit-normalised for cosine): [K, D] float32 on the sample's device.

    A round with C centers draws 8 b candidates (at most 2048) by D^2 sampling (b = min(C,
    1024, K - C) new centers), then picks b of them one at a time, each with
    probability proportional to its distance to the nearest center so far
    divided by the distance it was drawn with (resampling the candidates
    towards the k-means++ distribution: a candidate beside a center picked in
    this round gets ~0). One [S, b] GEMM a round updates the distances."""
    x = sample - sample.mean(0)  # distances are translation-invariant; centring cuts GEMM cancellation
    sq = x.pow(2).sum(1)
    centers = [int(rng.integers(0, len(x)))]
    d2 = (x - x[centers[0]]).pow(2).sum(1)
    with tqdm(total=num_clusters, desc="k-means seeding", leave=False, disable=bars.disable(progress)) as bar:
        bar.update(1)
        while len(centers) < num_clusters:
            b = min(len(centers), 1024, num_clusters - len(centers))
            weights = d2.double().cpu().numpy()
            total = weights.sum()
            if total <= 0:  # every sample row already is a center: draw uniformly
                picked = rng.choice(len(x), size=b, replace=b > len(x))
            else:
                picked = _pick_in_round(x, weights, b, rng)
            new = torch.from_numpy(np.asarray(picked, dtype=np.int64)).to(x.device)
            centers.extend(np.asarray(picked).tolist())
            for lo in range(0, len(x), max(1, _BLOCK // b)):
                block = torch.addmm(sq[lo:lo + _BLOCK // b, None] + sq[new][None], x[lo:lo + _BLOCK // b],
                                    x[new].T, alpha=-2).clamp_(min=0)
                d2[lo:lo + len(block)] = torch.minimum(d2[lo:lo + len(block)], block.min(1).values)
            d2[new] = 0
            bar.update(b)
    return sample[torch.as_tensor(centers[:num_clusters], device=sample.device)].clone()


def _pick_in_round(x: Tensor, weights: np.ndarray, b: int, rng: np.random.Generator) -> List[int]:
    """b rows: up to 8 b candidates (at most _POOL) by D^2 sampling, then b of
    them by greedy k-means++ over the candidates (see :func:`_seed`): each
    pick draws 2 + log(b) trials by the resampling weights and keeps the one
    that lowers the candidates' importance-weighted potential (sum of now /
    drawn, an estimate of the sample's total squared distance) most, as
    scikit-learn's greedy k-means++ does over the whole sample. The picks run
    in numpy on one candidate-distance matrix (one GEMM a round): a pick is a
    few small array operations, not thread-pool calls."""
    candidates = rng.choice(len(x), size=min(_OVERSAMPLE * b, _POOL), p=weights / weights.sum())
    c = x[torch.from_numpy(candidates).to(x.device)]
    c_sq = c.pow(2).sum(1)
    between = torch.addmm(c_sq[:, None] + c_sq[None], c, c.T, alpha=-2).clamp_(min=0).cpu().numpy()
    drawn = weights[candidates]
    now = drawn.copy()
    trials = 2 + int(np.log(b + 1))
    picked = []
    for _ in range(b):
        ratio = now / drawn
        total = ratio.sum()
        if total <= 1e-12:  # every candidate is covered: the next round draws fresh ones
            break
        tries = rng.choice(len(ratio), size=trials, p=ratio / total)
        d = np.minimum(now[None], between[tries])  # rows, not columns: the matrix is symmetric
        best = int((d / drawn[None]).sum(1).argmin())
        j = int(tries[best])
        picked.append(int(candidates[j]))
        now = d[best]
        now[candidates == candidates[j]] = 0
    return picked


# ---------------------------------------------------------------- passes

class _Geometry:
    """The centroids of one pass and what the bounds need of them: squared
    norms, and half the distance from each centroid to its nearest other."""

    def __init__(self, centroids: Tensor):
        self.centroids = centroids
        self.sq = centroids.pow(2).sum(1)
        self._half_gap: Optional[Tensor] = None

    def nearest(self, x: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """Squared distances [B, k] (ascending) and indices [B, k] of the k nearest centroids."""
        if not _gemm_is_faster(x.device):
            return ops.nearest_centroids(x, self.centroids, k, "l2")
        x_sq = x.pow(2).sum(1, keepdim=True)
        values, indices = [], []
        step = max(1, _BLOCK // len(self.centroids))
        for lo in range(0, len(x), step):
            d2 = torch.addmm(self.sq[None], x[lo:lo + step], self.centroids.T, alpha=-2).add_(x_sq[lo:lo + step])
            v, i = (d2.min(1, keepdim=True) if k == 1 else d2.topk(k, 1, largest=False))
            values.append(v.clamp_(min=0))
            indices.append(i)
        return torch.cat(values), torch.cat(indices)

    def half_gap(self) -> Tensor:
        """[K] float32: half the distance from each centroid to its nearest other (inf for K = 1)."""
        if self._half_gap is None:
            k = len(self.centroids)
            if k == 1:
                self._half_gap = torch.full((1,), float("inf"), device=self.centroids.device)
            else:
                d2, idx = self.nearest(self.centroids, 2)
                slack = _SLACK * (self.sq + self.sq.max())
                self._half_gap = 0.5 * (d2[:, 1] - slack).clamp(min=0).sqrt()
        return self._half_gap


class _Bounds:
    """Hamerly's bounds for this rank's fitting rows: their centroid, an upper
    bound on the distance to it and a lower bound on the distance to any other
    (float32, on the device)."""

    def __init__(self, rows: int, device: torch.device):
        self.assigned = torch.zeros(rows, dtype=torch.int64, device=device)
        self.upper = torch.full((rows,), float("inf"), device=device)
        self.lower = torch.zeros(rows, device=device)

    def update(self, x: Tensor, at: slice, geometry: _Geometry) -> Tuple[Tensor, int]:
        """The nearest centroid of the rows x (fitting rows `at`), computing
        distances only for the rows whose bounds do not prove it; returns
        (assigned [B] int64, how many rows were computed)."""
        assigned, upper, lower = self.assigned[at], self.upper[at], self.lower[at]
        bound = torch.maximum(geometry.half_gap()[assigned], lower)
        need = (upper > bound).nonzero()[:, 0]
        if 0 < len(need) < len(x) // 2:  # few rows: tighten their upper bound with the exact distance first
            upper[need] = _exact_d2(x[need], geometry.centroids, assigned[need]).sqrt() * (1 + _SLACK)
            need = need[upper[need] > bound[need]]
        if len(need):
            k = min(2, len(geometry.centroids))
            rows = x if len(need) == len(x) else x[need]  # (no copy when every row is computed)
            d2, idx = geometry.nearest(rows, k)
            slack = _SLACK * (rows.pow(2).sum(1) + geometry.sq.max())
            assigned[need] = idx[:, 0]
            upper[need] = (d2[:, 0] + slack).sqrt()
            lower[need] = (d2[:, 1] - slack).clamp(min=0).sqrt() if k == 2 else float("inf")
        return assigned, len(need)

    def moved(self, drift: Tensor) -> None:
        """Centroid j moved by drift[j] (a distance): the bounds loosen by it."""
        if len(drift) == 1:
            self.upper += drift[0]
            return
        top = drift.topk(2)
        self.upper += drift[self.assigned]
        self.lower -= torch.where(self.assigned == top.indices[0], top.values[1], top.values[0])


def _fitting_rows(batches: Batches, rows: range, picks: Optional[np.ndarray], metric: str, device: torch.device,
                  progress: bool, desc: str) -> Iterator[Tuple[Tensor, slice]]:
    """(x, position in this rank's fitting rows) for each batch: every row, or
    only the rows at the sorted global positions `picks`."""
    start, first = rows.start, 0 if picks is None else int(np.searchsorted(picks, rows.start))
    for batch in _bar(batches(), progress, desc):
        if picks is None:
            yield _rows(batch, metric, device), slice(start - rows.start, start - rows.start + len(batch))
        else:
            lo, hi = np.searchsorted(picks, [start, start + len(batch)])
            if hi > lo:
                local = torch.from_numpy(picks[lo:hi] - start)
                yield _rows(batch[local], metric, device), slice(int(lo) - first, int(hi) - first)
        start += len(batch)
    _check_replay(start - rows.start, len(rows))


def _restart_empty(centroids: Tensor, counts: Tensor, sample: Tensor, rng: np.random.Generator) -> int:
    """Centroids that no row chose restart at random sample rows (seeded: the
    same on every rank), so every cluster stays usable (in place)."""
    empty = (counts == 0).nonzero().flatten()
    if len(empty):
        picks = torch.as_tensor(rng.choice(len(sample), size=len(empty), replace=len(empty) > len(sample)))
        centroids[empty.to(centroids.device)] = sample[picks.to(sample.device)]
    return len(empty)


# ---------------------------------------------------------------- helpers

def _check_args(num_clusters: int, metric: str, iterations: int, num_rows: int,
                max_rows_per_cluster: Optional[int], sample_size: Optional[int]) -> None:
    if metric not in ops.METRICS:
        raise ValueError(f"metric='{metric}' is unknown; expected one of {ops.METRICS}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters={num_clusters} is invalid; expected >= 1")
    if iterations < 0:
        raise ValueError(f"iterations={iterations} is invalid; expected >= 0")
    if max_rows_per_cluster is not None and max_rows_per_cluster < 1:
        raise ValueError(f"max_rows_per_cluster={max_rows_per_cluster} is invalid; expected >= 1 or None (every row)")
    if sample_size is not None and sample_size < 1:
        raise ValueError(f"sample_size={sample_size} is invalid; expected >= 1 or None (16 rows a cluster)")
    if num_rows == 0:
        raise ValueError("kmeans: the feature stream is empty")
    if num_rows < num_clusters:
        raise ValueError(f"num_clusters={num_clusters} exceeds the {num_rows} rows to cluster")


def _gather(batches: Batches, rows: range, picks: np.ndarray, sharded: bool, metric: str) -> Tensor:
    """The rows at sorted global positions `picks` [S, D] float32 (CPU,
    unit-normalised for cosine), gathered in one pass over this rank's `rows`;
    when sharded, summed over the ranks (each row comes from exactly one rank,
    the others add zeros)."""
    parts, start, width = [], rows.start, 0
    for batch in batches():
        width = batch.shape[1]
        lo, hi = np.searchsorted(picks, [start, start + len(batch)])
        parts.append(_rows(batch[torch.from_numpy(picks[lo:hi] - start)], metric, torch.device("cpu")))
        start += len(batch)
    _check_replay(start - rows.start, len(rows))
    if sharded:  # a rank without rows learns the width from the others
        seen = distributed.all_reduce_(torch.tensor([float(width), float(width > 0)]))
        width = int(seen[0]) // max(int(seen[1]), 1)
    sample = torch.zeros(len(picks), width, dtype=torch.float32)
    if parts:
        here = torch.cat(parts)
        lo = int(np.searchsorted(picks, rows.start))
        sample[lo:lo + len(here)] = here
    return distributed.all_reduce_(sample) if sharded else sample


def _rows(batch: Tensor, metric: str, device: torch.device) -> Tensor:
    x = batch.to(device).float()
    return torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x


def _exact_d2(x: Tensor, centroids: Tensor, assigned: Tensor) -> Tensor:
    """Squared distances of rows to their given centroids, from the differences (no cancellation)."""
    return (x - centroids[assigned]).pow(2).sum(1)


def _gemm_is_faster(device: torch.device) -> bool:
    """The nearest-centroid step: fastvote's fused op, except on CPUs where its
    kernel is the AVX2 one (e.g. Zen 3), where torch's GEMM (MKL) plus a min is
    1.6x faster (benchmarks/RESULTS.md, issue 15); the fused AVX-512 kernel is
    2x the GEMM (issue 2)."""
    return device.type == "cpu" and ops.cpu_kernel() != "avx512"


def _check_replay(got: int, expected: int) -> None:
    if got != expected:
        raise RuntimeError(f"kmeans: the feature stream gave {got} rows on this pass but {expected} on the first; "
                           "batches() must replay the same rows")


def _bar(it: Iterable, progress: bool, desc: str) -> Iterator:
    return iter(tqdm(it, desc=desc, leave=False, disable=bars.disable(progress), unit="batch"))
