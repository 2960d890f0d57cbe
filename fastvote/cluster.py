"""Streaming K-means for label-free FM: the source's surrogate features are
clustered and the clusters play the role of source classes. In memory: one
batch, the seeding sample, the K x D statistics and three numbers per fitting
row (never more than ``max_rows_per_cluster * K`` rows, whatever N).

The recipe, each step chosen to scale in K and N:
- seeding: k-means++ in rounds (:func:`_seed`): a round draws candidates by
  D^2 sampling from the seeding sample, keeps about as many as there are
  centers already by greedy k-means++ restricted to the candidates (3 (2 +
  ln K) trials a pick: with fewer, two seeds often landed in one of K
  separated blobs and none in another, which Lloyd's passes never undo;
  issue 21), and updates the sample's distances with one GEMM. Work is one sample x K GEMM in all (the
  greedy one-center-a-step k-means++ read the whole sample K times: 140 min
  projected at K = 20,000), and quality stays k-means++'s (faiss's random
  init leaves blobs without a center on well-separated data).
- refining: the seeds then take 3 Lloyd passes over the seeding sample
  alone (:func:`_refine`, 1/16 of a pass's work each; skipped when the
  sample is over a quarter of the fitting rows). A seed is a data row, a
  cluster's radius from its mean, so the first pass over the fitting rows
  would move every centroid that far, loosen every bound past use and make
  the second pass compute everything again; from the sample's means the
  centroids move about a quarter of that, and most rows skip from pass 2.
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
  passes most rows skip. The few centroids that move far in a pass (which
  would loosen every row's lower bound) are computed for every row instead
  (:class:`_Bounds`). The per-cluster sums carry over between passes: only
  the rows that changed cluster update them.
- distances: the fused op (ops.nearest_centroids), or on AVX2-only CPUs a
  GEMM in 4096 x 1024 tiles whose k smallest are taken while in cache.
- empty clusters restart at random rows of the seeding sample.

Full-batch passes, not mini-batch updates, so that a pass is a sum over rows:
under torch.distributed each rank streams its own rows and the per-cluster
sums and counts are all-reduced (sums are float64), and every decision
(sample, seeding, restarts, skips) depends on global row positions only: the
clusters of one process whatever the number of ranks.

    centroids, assignments = kmeans(lambda: feature_batches(), 1000, num_rows=n)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from fastvote import chunks, distributed, ops
from fastvote import progress as bars

Batches = Callable[[], Iterable[Tensor]]  # each call starts a fresh pass over [B, D] batches
MAX_ROWS_PER_CLUSTER = 256  # fitting rows a cluster (faiss's default cap)
SEED_ROWS_PER_CLUSTER = 16  # seeding sample rows a cluster
# Two-level fits seed from fewer: 4 a cluster, at least 16,000 rows. At K = 10,000 (200,000 x 512) the seeding
# took half the time from 16 a cluster for the same inertia (1.0564e8 vs 1.0572e8); at K = 1,000, 4 a cluster
# (4,000 rows) raised it 2.3% and 8 a cluster 0.5% (issue 23).
TWO_LEVEL_SEED_ROWS_PER_CLUSTER, _TWO_LEVEL_MIN_SEED_ROWS = 4, 16000
SAMPLE_PASSES = 3  # Lloyd passes over the seeding sample before the passes over the fitting rows
_BLOCK = 1 << 24  # elements of one seeding distance block
_TILE_ROWS, _TILE_COLUMNS = 4096, 1024  # a 16 MB rows x centroids distance tile (GEMM efficient, min read from cache)
_SLACK = 1e-5  # relative float32 error allowed for in the bounds
_OVERSAMPLE = 8  # candidates a round draws per center it adds
_MIN_POOL = 256  # at least this many (small rounds: the potential estimate needs them, and they cost ~0)
_POOL = 2048  # at most this many candidates a round (their distance matrix: 16 MB)
_RESULT_STATE = ("passes", "counts", "pass_seconds", "computed", "movers", "restarts")  # what a resume restores
_TRIALS = 3  # greedy trials a pick: 3 (2 + ln K), scikit-learn's 2 + ln K times 3 (issue 21)
TWO_LEVEL_MIN_CLUSTERS = 1000  # hierarchical=None: two levels from this K (issue 23) ...
_TWO_LEVEL_MIN_WORK = 10 ** 10  # ... and this many multiply-adds a flat pass (e.g. 200,000 rows x 512 x 100)
# Coarse centroids a fit seeds: this many times sqrt(K) (before the splits). More make tighter groups (fewer
# centroids a group, lower inertia) and cost more to find (issue 23, 200,000 x 512, 10 iterations). sqrt(K) -> 2
# sqrt(K): K = 10,000 on 1,000 anisotropic blobs 0.7% lower inertia, on 10,000 round blobs 3.3%, 0.3% higher on
# 100 large blobs, the time within +-10%. 2 -> 3 sqrt(K), once the coarse search ran on bf16 units
# (_nearest_coarse): 0.25% lower at K = 10,000 on 1,000 anisotropic blobs, 1.4% at K = 1,000, 0.9% on 3,000
# blobs, 0.3% on 10,000 round blobs (17% slower there), 0.13% higher on 100 blobs; the time otherwise within
# the run-to-run spread (benchmarks/RESULTS.md).
_COARSE_PER_ROOT_K = 3
_GROUP_PASSES = 5  # Lloyd passes of the groups' centroids over the seeding sample
_SPLIT_ROUNDS = 6  # rounds of splitting the costliest groups (_seed_groups)
# The groups a row searches (of its nearest coarse centroids): 2 when seeding (1 put a seed on each side of a
# blob on a group border), 1 in the passes (2 cost 1.3-1.6x the time for 1-2% lower inertia; issue 23).
_SEED_REACH, _PASS_REACH = 2, 1


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
    computed: List[float] = field(default_factory=list)  # per pass: distance work done, in full passes' worth
    movers: List[int] = field(default_factory=list)  # per pass: centroids every row computed (_Bounds.moved)
    restarts: int = 0  # empty clusters restarted
    resumed_after: Optional[int] = None  # the saved pass a rerun resumed after (0: the seeding)
    groups: int = 0  # two-level passes: the groups (0: flat passes over all K)


def kmeans(batches: Batches, num_clusters: int, *, num_rows: Optional[int] = None, sharded: bool = False,
           metric: str = "l2", iterations: int = 20, tol: float = 1e-4, sample_size: Optional[int] = None,
           max_rows_per_cluster: Optional[int] = MAX_ROWS_PER_CLUSTER, seed: int = 0,
           device: Optional[torch.device] = None, progress: bool = True,
           hierarchical: Optional[bool] = None) -> Tuple[Tensor, np.ndarray]:
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
            empty clusters (default max(16 K, 2000); two-level fits
            min(that, max(4 K, 16000))).
        max_rows_per_cluster: the passes run over a uniform sample of at most
            this many rows a cluster (None: over every row).
        hierarchical: two-level passes, each row's nearest centroid sought
            among its group's (:func:`fit`); None: from TWO_LEVEL_MIN_CLUSTERS.
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
                 max_rows_per_cluster=max_rows_per_cluster, seed=seed, device=device, progress=progress,
                 hierarchical=hierarchical)
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
        device: Optional[torch.device] = None, progress: bool = True, checkpoint: Optional[Path] = None,
        hierarchical: Optional[bool] = None) -> Fit:
    """The centroids of :func:`kmeans` (arguments as there), from a stream of
    this rank's rows: `rows`, a contiguous range of the `num_rows` global row
    positions (any split over ranks gives the same centroids).

    checkpoint: a folder (the caller's, keyed by the stream's content) where
        the seeding result and the state after each pass (and every
        chunk (fastvote.chunks.Pace) within a pass) are saved; a rerun with
        the same arguments resumes from the last save with the same bits as an
        uninterrupted fit. The state is K x D (centroids, float64
        sums) plus this rank's fitting rows' bounds (at most
        max_rows_per_cluster a cluster: they make the resumed passes skip the
        same rows, so the same near-tie choices), and the seeding sample once.
    hierarchical: two levels (see :class:`_Groups`): each pass finds a row's
        nearest centroid among its group's, not among all K (a few sqrt(K)
        distances a row instead of K). None: from TWO_LEVEL_MIN_CLUSTERS
        clusters, when a flat pass would be long (:func:`_two_level`)."""
    _check_args(num_clusters, metric, iterations, num_rows, max_rows_per_cluster, sample_size)
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = dict(rows=[rows.start, rows.stop], num_rows=num_rows, num_clusters=num_clusters, metric=metric,
               iterations=iterations, tol=tol, sample_size=sample_size, max_rows_per_cluster=max_rows_per_cluster,
               seed=seed, ranks=distributed.world_size(), hierarchical=hierarchical)
    tag = f".rank{distributed.rank()}of{distributed.world_size()}" if sharded else ""
    seeded_path = None if checkpoint is None else Path(checkpoint) / f"kmeans-seeded{tag}.pkl"
    pass_path = None if checkpoint is None else Path(checkpoint) / f"kmeans-pass{tag}.pkl"
    rng = np.random.default_rng(seed)
    seeded = None if seeded_path is None else chunks.load_state(seeded_path, key)
    resumed_after = None if seeded is None else 0
    if seeded is None:
        started = time.perf_counter()
        cap = None if max_rows_per_cluster is None else max_rows_per_cluster * num_clusters
        fit_rows = num_rows if cap is None else min(cap, num_rows)
        flat_size = min(num_rows, sample_size or max(SEED_ROWS_PER_CLUSTER * num_clusters, 2000))
        size = flat_size if sample_size or hierarchical is False else \
            min(flat_size, max(TWO_LEVEL_SEED_ROWS_PER_CLUSTER * num_clusters, _TWO_LEVEL_MIN_SEED_ROWS))
        sample = _gather(batches, rows, np.sort(rng.choice(num_rows, size=size, replace=False)), sharded, metric)
        two_level = _two_level(hierarchical, num_clusters, len(sample), fit_rows * sample.shape[1])
        if not two_level and size < flat_size:  # (flat after all: its seeding wants the larger sample)
            sample = _gather(batches, rows, np.sort(rng.choice(num_rows, size=flat_size, replace=False)), sharded,
                             metric)
        sample = sample.to(device)
        groups = None
        if two_level:
            centroids, groups = _seed_groups(sample, num_clusters, rng, metric, progress)
        else:
            centroids = _seed(sample, num_clusters, rng, progress)
            if 4 * len(sample) <= fit_rows:  # (a sample near the fitting rows' size: its passes would cost as much)
                centroids = _refine(sample, centroids, metric)
        # Scale of the tolerance: the mean per-dimension variance of the data (the sample's).
        # (from the rows' distances to the mean: 5x faster than var(0), a column-wise reduction)
        spread = _sq_norms_from(sample, sample.mean(0)).double().sum() / max(len(sample) - 1, 1) / max(sample.shape[1], 1)
        tol = tol * float(spread) if len(sample) > 1 else 0.0
        picks = None if cap is None or cap >= num_rows else np.sort(rng.choice(num_rows, size=cap, replace=False))
        seeded = dict(sample=sample.cpu(), centroids=centroids.cpu(), fit_rows=fit_rows, tol=tol, picks=picks,
                      groups=groups, rng=rng.bit_generator.state, seconds=time.perf_counter() - started)
        if seeded_path is not None:
            chunks.save_state(seeded_path, key, seeded)
    sample, centroids, tol, picks = seeded["sample"].to(device), seeded["centroids"].to(device), seeded["tol"], \
        seeded["picks"]
    rng.bit_generator.state = seeded["rng"]
    lo, hi = (0, len(rows)) if picks is None else np.searchsorted(picks, [rows.start, rows.stop])
    # what each fitting row keeps between passes, and how a pass finds its nearest centroid
    rows_state = _Bounds(int(hi - lo), device) if seeded["groups"] is None else \
        _Groups(int(hi - lo), device, seeded["groups"])
    geometry = _Geometry(centroids)
    result = Fit(centroids, torch.zeros(num_clusters, dtype=torch.float64), seeded["fit_rows"], len(sample), 0,
                 seeded["seconds"], resumed_after=resumed_after,
                 groups=0 if seeded["groups"] is None else len(seeded["groups"]["coarse"]))
    # This rank's per-cluster sums and counts, kept across passes: after the first pass only the rows that
    # changed cluster update them (a few percent of the rows once converging; float64, so exactly enough).
    sums = torch.zeros(num_clusters, centroids.shape[1], dtype=torch.float64)
    counts = torch.zeros(num_clusters, dtype=torch.float64)
    first, converged, skip, computed = 0, False, 0, torch.zeros(1, dtype=torch.float64)
    saved = None if pass_path is None else chunks.load_state(pass_path, key)
    if saved is not None:  # resume where the last save was, every piece of state as it was
        first, converged, rng.bit_generator.state = saved["next"], saved["converged"], saved["rng"]
        skip, computed = saved["skip"], saved["computed"]
        centroids = saved["centroids"].to(device)
        geometry = _Geometry(centroids)
        if saved["half_gap"] is not None:
            geometry._half_gap = saved["half_gap"].to(device)
        for name in rows_state.STATE:
            setattr(rows_state, name, saved[name].to(device))
        sums, counts = saved["sums"], saved["counts"]
        for name in _RESULT_STATE:
            setattr(result, name, saved["result"][name])
        result.resumed_after = first
        if progress and distributed.is_main():
            within = f" and {skip} batches of pass {first + 1}" if skip else ""
            print(f"[fastvote] resuming k-means: the seeding, {first} of {iterations} passes{within} are saved"
                  f"{' (converged)' if converged else ''}", flush=True)

    def save(next_pass: int, batches_done: int) -> None:
        """The loop's whole state: after a pass (batches_done 0), or within
        pass next_pass after that many of its batches."""
        chunks.save_state(pass_path, key, dict(
            next=next_pass, skip=batches_done, converged=converged, rng=rng.bit_generator.state,
            centroids=centroids.cpu(), sums=sums, counts=counts, computed=computed,
            half_gap=geometry.half_gap().cpu() if isinstance(rows_state, _Bounds) else None,
            result={name: getattr(result, name) for name in _RESULT_STATE},
            **{name: getattr(rows_state, name).cpu() for name in rows_state.STATE}))
        chunks.check()  # a Ctrl-C stops here, the state saved

    for it in range(first, 0 if converged else iterations):
        started, pace = time.perf_counter(), chunks.Pace()
        if not skip:
            computed = torch.zeros(1, dtype=torch.float64)
            result.movers.append(len(rows_state.movers))
        done = fitted = 0
        for x, at in _fitting_rows(batches, rows, picks, metric, device, progress,
                                   f"k-means pass {it + 1}/{iterations}"):
            done, fitted = done + 1, fitted + len(x)
            if done <= skip:  # done before the save this run resumed from (read again, not computed)
                continue
            # (in the first pass the rows were in no cluster: -1)
            before = rows_state.assigned[at].clone() if it else torch.full((len(x),), -1, device=x.device)
            assigned, n = rows_state.update(x, at, geometry)
            _move_rows(sums, counts, x, before, assigned)
            computed += n
            # a long pass saves its state within, too: a kill loses at most a chunk of it (chunks.Pace)
            if pass_path is not None and pace.due():
                with pace.committing():
                    save(it, done)
        _check_replay(fitted, len(rows_state.assigned))
        skip = 0
        total, members, work = sums, counts, float(computed)
        if sharded:  # one all-reduce for the sums, the counts and the work done
            packed = torch.cat([sums, counts[:, None], computed[:, None].expand(num_clusters, 1)], 1)
            packed = distributed.all_reduce_(packed)
            total, members, work = packed[:, :-2], packed[:, -2], float(packed[0, -1])
        updated, drift = _means_and_drift(total, members, centroids, metric)
        restarts = rows_state.restart_empty(updated, members, sample, rng)
        if restarts:  # (the empty clusters' centroids moved to sample rows)
            empty = (members == 0).to(device)
            drift[empty] = _drift(updated[empty], centroids[empty])
        result.restarts += restarts
        # Few rows a cluster: the exact centroid gaps (K x K) would cost more than 2% of a pass; bound them
        chained = isinstance(rows_state, _Bounds) and 50 * num_clusters > result.fit_rows
        geometry = _Geometry(updated, geometry, drift) if chained else _Geometry(updated)
        rows_state.moved(drift, geometry, sharded)
        centroids = updated
        result.passes, result.counts = it + 1, members
        result.pass_seconds.append(time.perf_counter() - started)
        result.computed.append(work / max(result.fit_rows, 1))
        converged = float(drift.max()) ** 2 <= tol and bool((members > 0).all())
        if pass_path is not None:
            save(it + 1, 0)
        if converged:
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

    A round with C centers adds b = min(C, 1024, K - C) by greedy k-means++
    over candidates drawn by D^2 sampling (:func:`_pick_in_round`); one
    [S, b] GEMM a round updates the distances."""
    x = sample - sample.mean(0)  # distances are translation-invariant; centring cuts GEMM cancellation
    sq = _sq_norms(x)
    centers = [int(rng.integers(0, len(x)))]
    d2 = _sq_norms_from(x, x[centers[0]])
    # Trials a pick scale with K, as scikit-learn's greedy k-means++ takes them (2 + ln K), and 3 times as
    # many: a trial is judged by the potential estimated from the round's candidates, not summed over the
    # sample. With 2 + ln(b) (2 in a round of 1-6 picks, 3-4 at K = 20) the rounds put two seeds in one of 20
    # separated blobs, and none in another, for about half the seeds, sklearn for a third (issue 21).
    trials = _TRIALS * (2 + int(np.log(num_clusters)))
    with tqdm(total=num_clusters, desc="k-means seeding", leave=False, disable=bars.disable(progress)) as bar:
        bar.update(1)
        while len(centers) < num_clusters:
            b = min(len(centers), 1024, num_clusters - len(centers))
            weights = d2.double().cpu().numpy()
            total = weights.sum()
            if total <= 0:  # every sample row already is a center: draw uniformly
                picked = rng.choice(len(x), size=b, replace=b > len(x))
            else:
                picked = _pick_in_round(x, weights, b, trials, rng)
            new = torch.from_numpy(np.asarray(picked, dtype=np.int64)).to(x.device)
            centers.extend(np.asarray(picked).tolist())
            for lo in range(0, len(x), max(1, _BLOCK // b)):
                block = torch.addmm(sq[lo:lo + _BLOCK // b, None] + sq[new][None], x[lo:lo + _BLOCK // b],
                                    x[new].T, alpha=-2).clamp_(min=0)
                d2[lo:lo + len(block)] = torch.minimum(d2[lo:lo + len(block)], block.min(1).values)
            d2[new] = 0
            bar.update(b)
    return sample[torch.as_tensor(centers[:num_clusters], device=sample.device)].clone()


def _seed_in_groups(sample: Tensor, num_clusters: int, reach: Tensor, rng: np.random.Generator,
                    progress: bool) -> Tuple[Tensor, Tensor]:
    """:func:`_seed`'s k-means++ in rounds where a row's distance is to the
    nearest center of the groups it searches (reach [S, R]: its R nearest
    coarse centroids, the first its own group; G groups, G <= K), as the
    passes will search them. Each group starts with one random row of its
    own; every round then draws candidates by D^2 sampling over the whole
    sample, so each group gets the centers its rows' spread asks for
    (splitting K in proportion to the groups' rows put two seeds in one of
    several separated blobs and none in another), and a blob on a group
    border gets one seed, not one a side. A round's distance update is one
    compiled call (:func:`_nearest_in_groups`): the rows searching a group
    by its new centers, R S K / G distances in all. Returns the [K, D] seeds
    sorted by group and each one's group [K] (stable: within a group, in the
    order picked)."""
    # The rows in order of their own group (one copy, the centred one _seed makes too): a group's own rows
    # are a slice (its first center is drawn from it), read in order by the distance updates.
    perm = torch.argsort(reach[:, 0], stable=True)
    x = sample.index_select(0, perm.to(sample.device))
    x -= sample.mean(0)
    reach_np = reach[perm].numpy()
    own = reach_np[:, 0]
    groups = int(own.max()) + 1
    edges = np.searchsorted(own, np.arange(groups + 1))  # group g's own rows: [edges[g], edges[g + 1])
    # Every (row, group it searches) entry, the entries of one group side by side: a round's distance update
    # is one compiled call over the entries of the groups that got centers (at K = 10,000 a GEMM a group and
    # a gather of the rows searching it second, ~4,200 calls, took 0.75 s; the 12 calls take 0.25-0.3 s).
    entry_group = reach_np.reshape(-1)
    by_entry = np.argsort(entry_group, kind="stable")
    entry_row = torch.from_numpy(by_entry // reach_np.shape[1])
    entry_group = entry_group[by_entry]
    entry_edges = np.searchsorted(entry_group, np.arange(groups + 1))
    d2 = torch.full((len(x),), float("inf"), device=x.device)
    centers: List[int] = []

    def add(new: np.ndarray) -> None:
        centers.extend(new.tolist())
        by_group = new[np.argsort(own[new], kind="stable")]
        got = np.bincount(own[by_group], minlength=groups)
        hit = got[entry_group] > 0
        rows = entry_row[torch.from_numpy(hit)].to(x.device)
        sizes = np.diff(entry_edges)[got > 0]  # each hit group's entries, in group order
        row_starts = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)]))
        starts = np.concatenate([[0], np.cumsum(got[got > 0])]).tolist()
        added = _Geometry(x[torch.from_numpy(by_group).to(x.device)])
        nearest, _ = _nearest_in_groups(x, rows, row_starts, added, starts, k=1)
        d2.scatter_reduce_(0, rows, nearest[:, 0], "amin")
        d2[torch.from_numpy(new).to(x.device)] = 0

    add(np.array([rng.integers(edges[g], edges[g + 1]) for g in range(groups)], dtype=np.int64))
    trials = _TRIALS * (2 + int(np.log(num_clusters)))
    with tqdm(total=num_clusters, desc="k-means seeding", leave=False, disable=bars.disable(progress)) as bar:
        bar.update(len(centers))
        while len(centers) < num_clusters:
            b = min(len(centers), 1024, num_clusters - len(centers))
            weights = d2.double().cpu().numpy()
            if weights.sum() <= 0:  # every sample row already is a center: draw uniformly from the rest
                rest = np.setdiff1d(np.arange(len(x)), centers)
                picked = rng.choice(rest, size=min(b, len(rest)), replace=False)
            else:
                picked = np.asarray(_pick_in_round(x, weights, b, trials, rng, reach_np), dtype=np.int64)
            add(picked)
            bar.update(len(picked))
    chosen = torch.as_tensor(centers[:num_clusters])
    by_group = torch.sort(torch.from_numpy(own)[chosen], stable=True)
    return sample.index_select(0, perm[chosen[by_group.indices]].to(sample.device)), by_group.values


def _pick_in_round(x: Tensor, weights: np.ndarray, b: int, trials: int, rng: np.random.Generator,
                   reach: Optional[np.ndarray] = None) -> List[int]:
    """b rows of x [S, D] by greedy k-means++ over candidates: 8 b draws (at
    least _MIN_POOL, at most _POOL) by D^2 sampling (`weights` [S] float64,
    the squared distances to the centers so far), then b picks, each drawing
    `trials` candidates with probability proportional to the candidate's
    distance to the nearest center now over the distance it was drawn with
    (the k-means++ distribution, resampled: a candidate beside a center
    picked in this round gets ~0) and keeping the one that lowers the
    candidates' importance-weighted potential (sum of now / drawn, an
    estimate of the sample's total squared distance) most, as
    scikit-learn's greedy k-means++ does over the whole sample. The picks
    run on one candidate-distance matrix (one GEMM a round; with `reach`,
    only the covering pairs' distances), in one compiled call
    (:func:`_greedy_picks` without the extension). The round
    draws its b x `trials` uniforms up front, and all of them even when
    every candidate is covered before the b-th pick (fewer picks; the next
    round draws fresh candidates): the generator's state after a round
    depends on b and trials only. reach [S, R]: a center covers only the
    rows that search its group, reach[:, 0] (weights are the distances to
    those groups' centers)."""
    draws = rng.choice(len(x), size=min(max(_OVERSAMPLE * b, _MIN_POOL), _POOL), p=weights / weights.sum())
    candidates, count = np.unique(draws, return_counts=True)  # a row drawn twice counts twice
    c = x[torch.from_numpy(candidates).to(x.device)]
    c_sq = _sq_norms(c)
    # The candidates' distances in float32 (float64 doubles the matrix the picks read), in units of the largest
    # drawn distance (no underflow whatever the features' scale).
    scale = float(weights[candidates].max())
    now = (weights[candidates] / scale).astype(np.float32)
    # importance weights: a candidate stands for count / (draws x its probability) of the sample
    weight = (count / (weights[candidates] / scale)).astype(np.float32)
    uniforms = rng.random((b, trials))
    if reach is not None and ops.HAS_EXTENSION:
        # t covers i only if i searches t's group: ~2% of the pairs at K = 10,000, computed in the compiled
        # call alone (the M x M GEMM, mask and scan took 45-60 ms a round)
        from fastvote import _C

        picked = _C.greedy_picks_in_groups(c.cpu().contiguous(), c_sq.cpu(), torch.from_numpy(reach[candidates]),
                                           scale, *map(torch.from_numpy, (now, weight, uniforms))).numpy()
        return candidates[picked].tolist()
    between = torch.addmm(c_sq[:, None] + c_sq[None], c, c.T, alpha=-2).clamp_(min=0).div_(scale)
    if reach is not None:  # row t, column i: t covers i only if i searches t's group (no longer symmetric)
        searched = torch.from_numpy(reach[candidates]).to(x.device)
        covers = searched[None, :, 0] == searched[:, None, 0]
        for r in range(1, searched.shape[1]):
            covers |= searched[None, :, r] == searched[:, None, 0]
        between.masked_fill_(~covers, float("inf"))
    between = between.cpu().numpy()
    if ops.HAS_EXTENSION:
        from fastvote import _C

        picked = _C.greedy_picks(*map(torch.from_numpy, (between, now, weight, uniforms))).numpy()
    else:
        picked = _greedy_picks(between, now, weight, uniforms)
    return candidates[picked].tolist()


def _greedy_picks(between: np.ndarray, now: np.ndarray, weight: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """_C.greedy_picks in numpy: the positions of a round's picks among M
    candidates (between [M, M], row t what candidate t covers; now, weight
    [M]; uniforms [b, trials] in [0, 1)), fewer than b when every candidate
    is covered first. The same picks as the compiled call but for a score
    tie within float64 rounding (its sums run in another order)."""
    # The potential's cumulative sum and the trials' scores in float64, as the compiled call: a draw is
    # searched to the last candidate, and trials of near-equal scores are compared.
    weight = weight.astype(np.float64)
    # Buffers reused by every pick (a fresh [trials, M] array each pick is a page-faulting allocation: 5x the pick).
    rows = np.empty((uniforms.shape[1], len(now)), np.float32)
    covered = np.empty(rows.shape, np.float64)
    picked = []
    for u in uniforms:
        cumulative = np.cumsum(now * weight)
        if cumulative[-1] <= 1e-12:  # every candidate is covered: the next round draws fresh ones
            break
        tries = np.searchsorted(cumulative, u * cumulative[-1], side="right")
        tries = np.minimum(tries, len(now) - 1)  # (a draw rounded up to the total)
        np.take(between, tries, axis=0, out=rows)  # row t: what trial t covers
        np.minimum(rows, now, out=covered)
        j = int(tries[int((covered @ weight).argmin())])
        picked.append(j)
        now = np.minimum(now, between[j])
        now[j] = 0
    return np.asarray(picked, dtype=np.int64)


def _refine(sample: Tensor, centroids: Tensor, metric: str, passes: int = SAMPLE_PASSES,
            nearest: Optional[Callable[[Tensor, Tensor, int], Tuple[Tensor, Tensor]]] = None) -> Tensor:
    """Plain Lloyd passes over the seeding sample (in memory, the same on
    every rank); a centroid no sample row chose stays where it is. nearest:
    how a row finds its centroid ((distances, indices) [S, 1]; default the exact search)."""
    for _ in range(passes):
        idx = (_Geometry(centroids).nearest(sample, 1) if nearest is None else nearest(sample, centroids, 1))[1]
        centroids = _means(sample, idx[:, 0], centroids, metric)
    return centroids


def _means(rows: Tensor, chosen: Tensor, centroids: Tensor, metric: str) -> Tensor:
    """A Lloyd update: each centroid the mean of the rows that chose it
    (unit-normalised for cosine); a centroid none chose stays."""
    sums, counts = ops.class_centroids(rows, chosen, len(centroids))
    means = (sums / counts.clamp(min=1).to(sums)[:, None]).to(centroids)
    if metric == "cosine":
        means = torch.nn.functional.normalize(means, dim=1)
    return torch.where((counts > 0).to(centroids.device)[:, None], means, centroids)


def _refine_in_groups(fits: List[Tuple[Tensor, Tensor]], metric: str, passes: int) -> List[Tensor]:
    """:func:`_refine` of several (rows, centroids) pairs at once, each pair's
    rows choosing among its own centroids: a compiled call a pass for all
    pairs (at K = 10,000 the 78 split groups' passes took 0.44-0.57 s a fit
    at a time, 0.27 s at once)."""
    if not fits:
        return []
    rows, centroids = torch.cat([r for r, _ in fits]), torch.cat([c for _, c in fits])
    row_starts = torch.as_tensor(np.cumsum([0] + [len(r) for r, _ in fits]))
    starts = np.cumsum([0] + [len(c) for _, c in fits]).tolist()
    order = torch.arange(len(rows), device=rows.device)
    for _ in range(passes):
        _, idx = _nearest_in_groups(rows, order, row_starts, _Geometry(centroids), starts, k=1)
        centroids = _means(rows, idx[:, 0], centroids, metric)
    return list(centroids.split([len(c) for _, c in fits]))


def _seed_groups(sample: Tensor, num_clusters: int, rng: np.random.Generator, metric: str,
                 progress: bool) -> Tuple[Tensor, dict]:
    """The seeds of two-level passes (:class:`_Groups`), from the seeding
    sample alone: about 3 sqrt(K) coarse centroids (k-means++ in rounds and
    _GROUP_PASSES Lloyd passes over at most MAX_ROWS_PER_CLUSTER sample rows
    a centroid; a group that would cost the passes over twice its share is
    split (:func:`_split`) and refined the same way), then the K seeds by k-means++
    within the groups (:func:`_seed_in_groups`; refining them on the sample
    made the fit worse: the passes over all rows do it). Returns the [K, D]
    seeds, ordered by group, and the groups (coarse [G, D], starts [G + 1],
    sample_group [S])."""
    wanted = min(math.ceil(_COARSE_PER_ROOT_K * math.sqrt(num_clusters)), num_clusters)  # (a group: >= 1 seed)
    drawn = _capped(sample, wanted, rng)
    coarse = _refine(drawn, _seed(drawn, wanted, rng, progress=False), metric, _GROUP_PASSES, _nearest_coarse)
    # A row costs the passes its group's centroids, and a group's seeds follow its share of the sample's
    # potential (k-means++; correlation 0.995 at K = 10,000), so a group costs its share of the rows times its
    # share of the potential: balanced, 1 / wanted^2 each. Groups over twice that are split into m parts (a
    # part costing ~1 / m^2 of the group), up to _SPLIT_ROUNDS rounds, at most 4 wanted groups in all (one
    # split by rows alone left 4.7x the balanced cost at K = 10,000; issue 23).
    # Each sample row's nearest two coarse centroids, found again after every split round (letting only a
    # split group's rows choose among its parts left worse groups: inertia 1.4537e8 vs 1.4400e8 at
    # K = 1,000, 1.0523e8 vs 1.0479e8 at K = 10,000)
    nearest = _NearestCoarse(sample, coarse)
    for round_ in range(_SPLIT_ROUNDS + 1):
        d2, reach = nearest.top(min(_SEED_REACH, len(coarse)))
        reach = reach.cpu()
        group = reach[:, 0]
        rows = torch.bincount(group, minlength=len(coarse)).double()
        potential = torch.zeros(len(coarse), dtype=torch.float64).index_add_(0, group, d2[:, 0].double().cpu())
        cost = rows / rows.sum() * potential / potential.sum().clamp(min=1e-300) * wanted ** 2
        parts = torch.minimum(cost.sqrt().ceil(), rows).long()
        split = (cost > 2) & (parts > 1)
        if round_ == _SPLIT_ROUNDS or not bool(split.any()) or \
                len(coarse) + int((parts[split] - 1).sum()) > min(4 * wanted, num_clusters):
            break
        refined = _refine_in_groups(_split(sample, group, parts, split, rng), metric, _GROUP_PASSES)
        coarse = nearest.split(split, refined)
    kept = np.flatnonzero(rows.numpy())  # (a coarse centroid no sample row has nearest makes no group)
    if len(kept) < len(coarse):
        coarse = coarse[torch.from_numpy(kept).to(coarse.device)]
        reach = _nearest_coarse(sample, coarse, min(_SEED_REACH, len(coarse)))[1].cpu()
    group = reach[:, 0]
    seeds, seed_group = _seed_in_groups(sample, num_clusters, reach, rng, progress)
    starts = torch.searchsorted(seed_group, torch.arange(len(kept) + 1))
    return seeds, dict(coarse=coarse.cpu(), starts=starts, sample_group=group)


class _NearestCoarse:
    """Each sample row's M nearest coarse centroids, kept across the split
    rounds: a round replaces the split groups' centroids by their parts, and
    a row's new list is its old one without the split centroids merged with
    its M nearest parts, exact wherever it is below `bound` (no centroid left
    out of the list is nearer); only the rows left with fewer than two such
    entries are searched again among all coarse centroids. At K = 10,000 the
    six rounds' searches of the whole sample (40,000 rows x 100-311 centroids)
    took ~0.44 s; now ~0.25 s."""
    M = 8

    def __init__(self, sample: Tensor, coarse: Tensor):
        self.sample, self.coarse = sample, coarse
        self.d2, self.idx = _Geometry(coarse).nearest(sample, min(self.M, len(coarse)))
        self.bound = self._last(self.d2, len(coarse))

    def top(self, k: int) -> Tuple[Tensor, Tensor]:
        """The k nearest: squared distances and indices [S, k]."""
        return self.d2[:, :k], self.idx[:, :k]

    def split(self, split: Tensor, parts: List[Tensor]) -> Tensor:
        """Replaces each centroid g with split[g] by its parts (in order), and
        returns the new coarse centroids."""
        device = self.coarse.device
        sizes = torch.ones(len(split), dtype=torch.int64)
        sizes[split] = torch.tensor([len(p) for p in parts], dtype=torch.int64)
        starts = torch.cumsum(sizes, 0) - sizes  # old centroid g's first index in the new list
        new_index = torch.where(split, -1, starts).to(device)
        parts_at = torch.cat([torch.arange(int(starts[g]), int(starts[g] + sizes[g])) for g in
                              split.nonzero()[:, 0].tolist()]).to(device)
        # each old centroid in its slots, then the split ones' slots overwritten by their parts
        coarse = self.coarse.index_select(0, torch.repeat_interleave(torch.arange(len(split)), sizes).to(device))
        coarse[parts_at] = torch.cat(parts)
        # the old lists without the split centroids (their slots: inf, sorted last)
        idx = new_index[self.idx]
        d2 = self.d2.masked_fill(idx < 0, float("inf"))
        # merged with the M nearest parts, ordered by distance, then index
        part_d2, part_idx = _Geometry(coarse[parts_at]).nearest(self.sample, min(self.M, len(parts_at)))
        d2, idx = torch.cat([d2, part_d2], 1), torch.cat([idx.clamp(min=0), parts_at[part_idx]], 1)
        # (one sort of (distance, index) keys: a non-negative float32's bits order as the float does; abs
        # clears the sign of a -0.0)
        key = torch.sort((d2.abs().view(torch.int32).long() << 32) | idx, dim=1).values
        d2, idx = (key >> 32).int().view(torch.float32), key & 0xFFFFFFFF
        self.d2, self.idx = d2[:, :self.M], idx[:, :self.M]
        # nothing unlisted is nearer than the parts' last listed, or than what the list now drops
        self.bound = torch.minimum(self.bound, self._last(part_d2, len(parts_at)))
        if d2.shape[1] > self.M:
            self.bound = torch.minimum(self.bound, d2[:, self.M])
        wanted = min(2, len(coarse))
        redo = ((self.d2 < self.bound[:, None]).sum(1) < wanted).nonzero()[:, 0]
        if len(redo):
            d2, idx = _Geometry(coarse).nearest(self.sample[redo], min(self.M, len(coarse)))
            self.bound[redo] = self._last(d2, len(coarse))
            pad = self.d2.shape[1] - d2.shape[1]  # (a list can be wider: slots of removed centroids, inf)
            self.d2[redo] = torch.cat([d2, d2.new_full((len(redo), pad), float("inf"))], 1)
            self.idx[redo] = torch.cat([idx, idx.new_zeros((len(redo), pad))], 1)
        self.coarse = coarse
        return coarse

    def _last(self, d2: Tensor, count: int) -> Tensor:
        """What bounds the distance to every centroid a list of `count`
        searched left out: the list's last (inf when it holds them all)."""
        return d2[:, -1].clone() if count > d2.shape[1] else torch.full_like(d2[:, 0], float("inf"))


def _split(sample: Tensor, group: Tensor, parts: Tensor, split: Tensor, rng: np.random.Generator
           ) -> List[Tuple[Tensor, Tensor]]:
    """The groups `split` [G] (bool) cut into about parts[g] each: (rows,
    seeds) per split group, in group order, the rows at most
    MAX_ROWS_PER_CLUSTER a part. The seeds of all of them come from one
    k-means++ within the groups (:func:`_seed_in_groups`, each group's rows
    searching it alone), which gives each group as many of the sum of the
    parts as its potential asks for: at K = 10,000 a greedy k-means++ of
    each group's own parts, 70-80 calls, took 0.45-0.55 s; one call takes
    ~0.1 s, for the same inertia (within the spread over seeds at K = 1,000
    and 10,000) and the separated blobs found as often."""
    ids = split.nonzero()[:, 0].tolist()
    by_group = torch.argsort(group, stable=True)  # (group g's sample rows, in order: a slice of it)
    edges = [0] + torch.cumsum(torch.bincount(group, minlength=len(split)), 0).tolist()
    picks = [_capped(by_group[edges[g]:edges[g + 1]], int(parts[g]), rng) for g in ids]
    rows = sample.index_select(0, torch.cat(picks).to(sample.device))
    own = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(p) for p in picks]))
    seeds, seed_group = _seed_in_groups(rows, int(parts[split].sum()), own[:, None], rng, False)
    return list(zip(rows.split([len(p) for p in picks]),
                    seeds.split(torch.bincount(seed_group, minlength=len(ids)).tolist())))


def _capped(rows: Tensor, count: int, rng: np.random.Generator) -> Tensor:
    """At most MAX_ROWS_PER_CLUSTER of `rows` (rows, or row positions) a
    centroid: a uniform sample, in order (more than a centroid needs, as in fit())."""
    if len(rows) <= MAX_ROWS_PER_CLUSTER * count:
        return rows
    return rows[torch.from_numpy(np.sort(rng.choice(len(rows), MAX_ROWS_PER_CLUSTER * count,
                                                    replace=False))).to(rows.device)]


def _two_level(hierarchical: Optional[bool], num_clusters: int, sample_rows: int, row_values: int) -> bool:
    """Whether fit() runs two-level passes: as asked, or (None) from
    TWO_LEVEL_MIN_CLUSTERS clusters where a flat pass is long (row_values:
    fitting rows x D; below _TWO_LEVEL_MIN_WORK multiply-adds a flat pass
    takes well under a second, less than the groups' seeding); never without
    4 sample rows a cluster to seed the groups from."""
    long_pass = num_clusters * row_values >= _TWO_LEVEL_MIN_WORK
    wanted = num_clusters >= TWO_LEVEL_MIN_CLUSTERS and long_pass if hierarchical is None else hierarchical
    return bool(wanted) and num_clusters > 1 and sample_rows >= 4 * num_clusters


# ---------------------------------------------------------------- passes

class _Geometry:
    """The centroids of one pass and what the bounds need of them: squared
    norms, and half the distance from each centroid to its nearest other
    (a lower bound on it when derived from the previous pass's, see
    :meth:`half_gap`)."""

    def __init__(self, centroids: Tensor, previous: Optional["_Geometry"] = None, drift: Optional[Tensor] = None):
        self.centroids = centroids
        self.sq = _sq_norms(centroids)
        self._half_gap: Optional[Tensor] = None
        self._previous, self._drift = previous, drift

    def nearest(self, x: Tensor, k: int, x_sq: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Squared distances [B, k] (ascending) and indices [B, k] of the k
        nearest centroids (x_sq: the rows' squared norms, if known)."""
        return _nearest(x, self.centroids, self.sq, k, x_sq)

    def half_gap(self) -> Tensor:
        """[K] float32: half the distance from each centroid to its nearest
        other (inf for K = 1), exact (a K x K product), or, given the previous
        pass's geometry and the drifts, a lower bound from them, which is all
        Hamerly's test needs: centroid i is at least gap_old(j) - drift(j) -
        drift(i) from j, except the K/16 biggest movers, whose distances are
        computed (K x K/16). fit() takes the bound when K x K is over 2% of a
        pass (few rows a cluster, e.g. 10 at K = 20,000)."""
        if self._half_gap is None:
            k = len(self.centroids)
            if k == 1:
                self._half_gap = torch.full((1,), float("inf"), device=self.centroids.device)
            elif self._previous is None:
                d2, idx = self.nearest(self.centroids, 2)
                slack = _SLACK * (self.sq + self.sq.max())
                self._half_gap = 0.5 * (d2[:, 1] - slack).clamp(min=0).sqrt()
            else:
                self._half_gap = 0.5 * self._bounded_gap(self._previous.half_gap() * 2, self._drift)
                self._previous = None  # (the chain of geometries is not kept)
        return self._half_gap

    def _bounded_gap(self, gap: Tensor, drift: Tensor) -> Tensor:
        k = len(drift)
        m = min(k // 16, k - 2)
        top = drift.topk(m + 2)
        movers = top.indices[:m]
        rest = _other_drift(top, m, torch.arange(k, device=drift.device))
        bound = ((gap - drift - rest) * (1 - _SLACK)).clamp(min=0)  # (float32 rounding of the subtraction)
        if m:
            c = self.centroids
            d2 = torch.addmm(self.sq[:, None] + self.sq[movers][None], c, c[movers].T, alpha=-2)
            d2[movers, torch.arange(m, device=c.device)] = float("inf")  # a mover is not its own neighbour
            slack = _SLACK * (self.sq + self.sq.max())
            bound = torch.minimum(bound, (d2.min(1).values - slack).clamp(min=0).sqrt())
        return bound


def _nearest(x: Tensor, centroids: Tensor, sq: Tensor, k: int, x_sq: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Squared distances [B, k] (ascending) and indices [B, k] of the k
    nearest of `centroids` (sq: their squared norms; x_sq: the rows', if known)."""
    if not _gemm_is_faster(x.device):
        return ops.nearest_centroids(x, centroids, k, "l2")
    x_sq = _sq_norms(x) if x_sq is None else x_sq
    values, indices = [], []
    for lo in range(0, len(x), _TILE_ROWS):
        rows, best, where = x[lo:lo + _TILE_ROWS], None, None
        for c0 in range(0, len(centroids), _TILE_COLUMNS):
            # |c|^2 - 2 x.c ranks a row's centroids as its distances do (|x|^2 is added to the k kept);
            # a 16 MB tile: its k smallest are read from cache, as faiss's exhaustive search does
            part = torch.addmm(sq[None, c0:c0 + _TILE_COLUMNS], rows,
                               centroids[c0:c0 + _TILE_COLUMNS].T, alpha=-2)
            v, i = _smallest(part, k)
            i += c0
            if best is not None:  # merge with the earlier tiles' k smallest (lower indices: first in a stable sort)
                v, at = torch.sort(torch.cat([best, v], 1), dim=1, stable=True)
                v, i = v[:, :k], torch.cat([where, i], 1).gather(1, at[:, :k])
            best, where = v, i
        values.append(best.add_(x_sq[lo:lo + _TILE_ROWS, None]).clamp_(min=0))
        indices.append(where)
    return torch.cat(values), torch.cat(indices)


def _smallest(part: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k smallest values of each row of `part` and their columns,
    ascending, a tie going to the lower column as in the fused kernel
    (topk orders ties as it likes, and may keep either of two values tied at
    the k-th place: a row where it had that choice is sorted whole)."""
    if k == 1:
        return part.min(1, keepdim=True)  # (the first of equal values)
    k = min(k, part.shape[1])
    v, i = part.topk(k, 1, largest=False)
    tied = ((part <= v[:, -1:]).sum(1) > k).nonzero()[:, 0]
    i, by_column = i.sort(1)
    v, by_value = v.gather(1, by_column).sort(dim=1, stable=True)
    i = i.gather(1, by_value)
    if len(tied):
        v[tied], i[tied] = (t[:, :k] for t in torch.sort(part[tied], dim=1, stable=True))
    return v, i


class _Bounds:
    """Hamerly's bounds for this rank's fitting rows: their centroid, an upper
    bound on the distance to it and a lower bound on the distance to any other
    (float32, on the device).

    Hamerly loosens every lower bound by the largest drift of any other
    centroid, so a few big movers (a restarted centroid, two centroids
    splitting a blob) make most rows recompute. Here the m biggest movers of
    a pass (m chosen by :meth:`moved`, often 0) are left out of that maximum,
    and every row's next update computes its distances to those m centroids
    exactly instead: m / K of a full pass, for bounds as tight as the rest's
    drift allows."""
    STATE = ("assigned", "upper", "lower", "movers")  # what a checkpoint keeps

    def __init__(self, rows: int, device: torch.device):
        self.assigned = torch.zeros(rows, dtype=torch.int64, device=device)
        self.upper = torch.full((rows,), float("inf"), device=device)
        self.lower = torch.zeros(rows, device=device)
        self.movers = torch.zeros(0, dtype=torch.int64, device=device)  # [m]: distances computed next update
        self.sq = torch.full((rows,), float("nan"), device=device)  # the rows' squared norms, once computed

    def update(self, x: Tensor, at: slice, geometry: _Geometry) -> Tuple[Tensor, float]:
        """The nearest centroid of the rows x (fitting rows `at`), computing
        distances only for the rows whose bounds do not prove it; returns
        (assigned [B] int64, the distance work done in rows of all K)."""
        assigned, upper, lower = self.assigned[at], self.upper[at], self.lower[at]  # views: updated in place
        x_sq = _row_sq_norms(self.sq, at, x)
        slack = _SLACK * (x_sq + geometry.sq.max())
        work = 0.0
        if len(self.movers):  # the movers' exact distances complete the lower bound (and tighten own upper)
            d2 = torch.addmm(geometry.sq[self.movers][None], x, geometry.centroids[self.movers].T, alpha=-2)
            d2.add_(x_sq[:, None]).clamp_(min=0)
            own = self.movers[None] == assigned[:, None]
            mine = own.any(1)
            upper[mine] = torch.minimum(upper[mine], (d2[own] + slack[mine]).sqrt())
            others = d2.masked_fill_(own, float("inf")).min(1).values
            torch.minimum(lower, (others - slack).clamp_(min=0).sqrt(), out=lower)
            work += len(x) * len(self.movers) / len(geometry.centroids)
        bound = torch.maximum(geometry.half_gap()[assigned], lower)
        need = (upper > bound).nonzero()[:, 0]
        if 0 < len(need) < len(x) // 2:  # few rows: tighten their upper bound with the exact distance first
            upper[need] = _exact_d2(x[need], geometry.centroids, assigned[need]).sqrt() * (1 + _SLACK)
            need = need[upper[need] > bound[need]]
        if len(need):
            k = min(2, len(geometry.centroids))
            every = len(need) == len(x)
            rows = x if every else x[need]  # (no copy when every row is computed)
            d2, idx = geometry.nearest(rows, k, x_sq if every else x_sq[need])
            s = slack if every else slack[need]
            assigned[need] = idx[:, 0]
            upper[need] = (d2[:, 0] + s).sqrt()
            lower[need] = (d2[:, 1] - s).clamp(min=0).sqrt() if k == 2 else float("inf")
            work += len(need)
        return assigned, work

    def moved(self, drift: Tensor, geometry: _Geometry, sharded: bool) -> None:
        """Centroid j moved by drift[j] (a distance) to the centroids of
        `geometry`: the bounds loosen by it. Picks the movers m for the next
        update from m in {0, K/256, K/64, K/16}: the m whose estimated work
        (rows the loosened bounds will fail, by Hamerly's test on the new
        centroids, plus m/K of every row) is least, summed over ranks when
        sharded so that every rank picks the same m."""
        k = len(drift)
        if k == 1:
            self.upper += drift[0]
            return
        top = drift.topk(min(k, k // 16 + 2))
        self.upper += drift[self.assigned]
        gap = geometry.half_gap()[self.assigned]
        choices = sorted({0} | {m for m in (k // 256, k // 64, k // 16) if 0 < m <= k - 2})
        rest = [_other_drift(top, m, self.assigned) for m in choices]
        fails = [float((self.upper > torch.maximum(gap, self.lower - r)).sum()) for r in rest]
        cost = torch.tensor([f + len(self.upper) * m / k for f, m in zip(fails, choices)], dtype=torch.float64)
        cost = distributed.all_reduce_(cost) if sharded else cost
        best = int(cost.argmin())
        self.lower -= rest[best]
        self.movers = top.indices[:choices[best]]


    def restart_empty(self, centroids: Tensor, counts: Tensor, sample: Tensor, rng: np.random.Generator) -> int:
        return _restart_empty(centroids, counts, sample, rng)


class _Groups:
    """Two-level passes (the hierarchical k-means of SuperKMeans and of
    faiss's IVF training, kept exact within a group): the centroids are
    split into G groups (3 sqrt(K) coarse centroids, then the splits: ~7 sqrt(K)
    at K = 10,000), seeded from the seeding sample by
    k-means++ within the groups (:func:`_seed_groups`). A row searches the
    groups of its _PASS_REACH nearest coarse centroids (found once, on bf16
    units near-nearest: :func:`_nearest_coarse`; the coarse centroids stay),
    K_g ~ K / G centroids a group instead of K.
    Hamerly's bounds (as :class:`_Bounds`, loosened by the largest drift in
    the row's groups) let rows skip once the centroids settle. A row on a
    group border can miss a nearer centroid of the next group; what that
    costs is the inertia measured in benchmarks/RESULTS.md (issue 23). The
    assignment of every row after the fit (:func:`assign`) is over all K,
    exact."""
    STATE = ("assigned", "group", "upper", "lower")
    movers = torch.zeros(0, dtype=torch.int64)  # (no movers: a group's largest drift loosens only its rows)

    def __init__(self, rows: int, device: torch.device, groups: dict):
        self.assigned = torch.zeros(rows, dtype=torch.int64, device=device)
        self.coarse = groups["coarse"].to(device)  # [G, D]
        self.starts = groups["starts"].tolist()  # group g owns centroids [starts[g], starts[g + 1])
        self.centroid_group = torch.repeat_interleave(torch.diff(groups["starts"])).to(device)  # [K]
        self.starts_tensor, self.group_ids = groups["starts"], torch.arange(len(self.starts))
        self.by_group: Dict[int, Tuple[Tensor, Tensor]] = {}  # first row of a batch: (its rows by group, offsets)
        self.sample_group = groups["sample_group"]  # [S]: the group of each seeding-sample row
        reach = min(_PASS_REACH, len(self.coarse))
        self.group = torch.full((rows, reach), -1, dtype=torch.int64, device=device)  # -1: not found yet
        self.upper = torch.full((rows,), float("inf"), device=device)
        self.lower = torch.zeros(rows, device=device)
        self.sq = torch.full((rows,), float("nan"), device=device)  # the rows' squared norms, once computed

    def update(self, x: Tensor, at: slice, geometry: "_Geometry") -> Tuple[Tensor, float]:
        """Each row's nearest centroid within its groups, computed for the
        rows whose bounds do not prove it; returns (assigned [B] int64, the
        distance work done in rows of all K)."""
        assigned, group, upper, lower = self.assigned[at], self.group[at], self.upper[at], self.lower[at]
        k, reach = len(geometry.centroids), self.group.shape[1]
        work = 0.0
        if bool((group < 0).any()):  # the first pass: each row's groups
            group.copy_(_nearest_coarse(x, self.coarse, reach)[1])
            work += len(x) * len(self.coarse) / k
        x_sq = _row_sq_norms(self.sq, at, x)
        slack = _SLACK * (x_sq + geometry.sq.max())
        if reach == 1 and _compiled_groups(x.device):  # one compiled call: the search and the bounds' update
            if at.start not in self.by_group:  # this batch's rows sorted by group (the groups stay: once)
                order = torch.argsort(group[:, 0], stable=True)
                self.by_group[at.start] = order, torch.searchsorted(group[order, 0], self.group_ids)
            from fastvote import _C

            return assigned, work + _C.update_in_groups(x, *self.by_group[at.start], geometry.centroids,
                                                        self.starts_tensor, assigned, upper, lower, slack) / k
        # (No tightening of the upper bounds by the exact distance first, as _Bounds does: at ~30 centroids a
        # group that gather cost ~1.8 us a row, the kernel on the row ~0.6 us.)
        need = (upper > lower).nonzero()[:, 0]
        if not len(need):
            return assigned, work
        # one entry per row and group it searches, the entries of one group side by side
        entry_group = group[need].reshape(-1)
        by_group = torch.argsort(entry_group, stable=True)
        row_starts = torch.searchsorted(entry_group[by_group], torch.arange(len(self.starts), device=x.device))
        d2_sorted, idx_sorted = _nearest_in_groups(x, need.repeat_interleave(reach)[by_group], row_starts, geometry,
                                                   self.starts)
        d2, idx = torch.empty_like(d2_sorted), torch.empty_like(idx_sorted)
        d2[by_group], idx[by_group] = d2_sorted, idx_sorted
        if reach > 1:  # each row's best two of its groups' (the groups' centroids are disjoint); ties -> lower index
            d2, idx = d2.reshape(len(need), 2 * reach), idx.reshape(len(need), 2 * reach)
            by_index = torch.argsort(torch.where(idx < 0, k, idx), 1)
            d2, idx = d2.gather(1, by_index), idx.gather(1, by_index)
            best = torch.sort(d2, dim=1, stable=True).indices[:, :2]
            d2, idx = d2.gather(1, best), idx.gather(1, best)
        s = slack[need]
        assigned[need] = idx[:, 0]
        upper[need] = (d2[:, 0] + s).sqrt()
        lower[need] = (d2[:, 1] - s).clamp(min=0).sqrt()  # (inf: one centroid in all the row's groups)
        sizes = torch.diff(torch.as_tensor(self.starts, device=x.device))
        return assigned, work + float((torch.diff(row_starts) * sizes).sum()) / k

    def moved(self, drift: Tensor, geometry: "_Geometry", sharded: bool) -> None:
        """Centroid j moved by drift[j]: a row's upper bound loosens by its own
        centroid's drift, its lower bound by the largest drift in its groups
        (its own centroid's included: a little looser than Hamerly's, still a
        bound, and one maximum a group)."""
        self.upper += drift[self.assigned]
        largest = drift.new_zeros(len(self.starts) - 1).scatter_reduce_(0, self.centroid_group, drift, "amax")
        self.lower = (self.lower - largest[self.group.clamp(min=0)].max(1).values).clamp_(min=0)

    def restart_empty(self, centroids: Tensor, counts: Tensor, sample: Tensor, rng: np.random.Generator) -> int:
        """An empty cluster restarts at a random sample row of its own group
        (elsewhere, none of the group's rows could ever reach it)."""
        if bool((counts > 0).all()):
            return 0
        restarts = 0
        for g in range(len(self.starts) - 1):
            lo, hi = self.starts[g], self.starts[g + 1]
            pool = (self.sample_group == g).nonzero()[:, 0]
            restarts += _restart_empty(centroids[lo:hi], counts[lo:hi], sample[pool.to(sample.device)], rng)
        return restarts


def _nearest_in_groups(x: Tensor, order: Tensor, row_starts: Tensor, geometry: "_Geometry",
                       starts: List[int], k: int = 2) -> Tuple[Tensor, Tensor]:
    """Squared distances [B, k] and indices [B, k] of the k nearest
    centroids within its group of each row x[order] (sorted by group: group
    g's rows are [row_starts[g], row_starts[g + 1]) of order, its centroids
    [starts[g], starts[g + 1])); inf / -1 where a group has fewer. One
    compiled call on CPU, gathering the rows as it packs them (the fused
    kernel's per-call set-up, a hundred times a batch, cost more than the
    distances); elsewhere :func:`_nearest_in_groups_loop`."""
    if not _compiled_groups(x.device):
        return _nearest_in_groups_loop(x, order, row_starts, geometry, starts, k)
    from fastvote import _C

    return _C.nearest_in_groups(x, order, row_starts, geometry.centroids, torch.as_tensor(starts), k)


def _nearest_in_groups_loop(x: Tensor, order: Tensor, row_starts: Tensor, geometry: "_Geometry",
                            starts: List[int], k: int = 2) -> Tuple[Tensor, Tensor]:
    """:func:`_nearest_in_groups` as a nearest-centroid call per group."""
    rows = x[order]
    d2 = torch.full((len(rows), k), float("inf"), device=rows.device)
    idx = torch.full((len(rows), k), -1, dtype=torch.int64, device=rows.device)
    edges = row_starts.tolist()
    for g in range(len(starts) - 1):
        a, b, lo, hi = edges[g], edges[g + 1], starts[g], starts[g + 1]
        if a < b:
            v, i = _nearest(rows[a:b], geometry.centroids[lo:hi], geometry.sq[lo:hi], min(k, hi - lo))
            d2[a:b, :v.shape[1]], idx[a:b, :i.shape[1]] = v, i + lo
    return d2, idx


def _other_drift(top, m: int, owner: Tensor) -> Tensor:
    """The largest drift among the centroids other than `owner` (per entry)
    and other than the m biggest movers, from drift.topk(m + 2) (`top`)."""
    return torch.where(owner == top.indices[m], top.values[m + 1], top.values[m])


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


def _move_rows(sums: Tensor, counts: Tensor, x: Tensor, before: Tensor, after: Tensor) -> None:
    """The rows of x whose cluster changed from `before` to `after` move
    their features and counts between the per-cluster sums (CPU float64, in
    place; before -1: a row in no cluster yet, only added): one compiled call
    on CPU (no float64 copy of the moved rows; the same bits), elsewhere the
    rows copied to the CPU and index_put_ calls (the first pass on a GPU: its
    class_centroids, summed there)."""
    if ops.HAS_EXTENSION and x.device.type == "cpu" and x.dtype == torch.float32:
        from fastvote import _C

        _C.move_rows(sums, counts, x, before, after)
        return
    if x.device.type != "cpu" and bool((before < 0).all()):
        s, c = ops.class_centroids(x, after, len(sums))
        sums += s.cpu()
        counts += c.cpu().double()
        return
    changed = (before != after).nonzero()[:, 0]
    if len(changed):
        rows = x[changed].double().cpu()
        old, new = before[changed].cpu(), after[changed].cpu()
        left = old >= 0
        # (index_put_'s accumulate adds row by row, as index_add_ does, in half its time on CPU)
        sums.index_put_((new,), rows, accumulate=True).index_put_((old[left],), rows[left].neg_(), accumulate=True)
        counts.index_add_(0, new, torch.ones(len(new), dtype=torch.float64))
        counts.index_add_(0, old[left], torch.ones(int(left.sum()), dtype=torch.float64), alpha=-1)


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
    sample, start, width = None, rows.start, 0
    for batch in batches():
        if sample is None:  # filled in place: one copy of the sample in memory (328 MB at K = 10,000, D = 512)
            width = batch.shape[1]
            # (sharded: zeros where the other ranks' rows go; else every row is written)
            sample = (torch.zeros if sharded else torch.empty)(len(picks), width, dtype=torch.float32)
        lo, hi = np.searchsorted(picks, [start, start + len(batch)])
        at = torch.from_numpy(picks[lo:hi] - start)
        if batch.dtype == torch.float32 and batch.device.type == "cpu" and metric == "l2":
            torch.index_select(batch, 0, at, out=sample[lo:hi])  # (no temporary copy of the rows)
        else:
            sample[lo:hi] = _rows(batch[at], metric, torch.device("cpu"))
        start += len(batch)
    _check_replay(start - rows.start, len(rows))
    if sharded:  # a rank without rows learns the width from the others
        seen = distributed.all_reduce_(torch.tensor([float(width), float(width > 0)]))
        width = int(seen[0]) // max(int(seen[1]), 1)
        sample = torch.zeros(len(picks), width, dtype=torch.float32) if sample is None else sample
        return distributed.all_reduce_(sample)
    return sample if sample is not None else torch.zeros(len(picks), 0)


def _rows(batch: Tensor, metric: str, device: torch.device) -> Tensor:
    """A batch as the fit reads it: float32 on `device`, unit rows for cosine
    (normalised row-major: torch's norm of a column-major batch differs in the
    last bit, and the centroids with it)."""
    x = batch.to(device).float()
    return torch.nn.functional.normalize(x.contiguous(), dim=1) if metric == "cosine" else x


def _means_and_drift(sums: Tensor, counts: Tensor, centroids: Tensor, metric: str) -> Tuple[Tensor, Tensor]:
    """The end of a pass: the new centroids (float32 [K, D] on the
    centroids' device: each cluster's mean of float64 `sums` over `counts`,
    unit-normalised for cosine; an empty cluster's stays where it was) and
    how far each moved (:func:`_drift`'s bound). One compiled pass over the
    K x D values (at K = 10,000, D = 512 the division, cast and drift in
    torch took ~20 ms a pass), else torch."""
    if ops.HAS_EXTENSION:
        from fastvote import _C

        updated, drift = _C.lloyd_means(sums, counts, centroids.cpu(), metric == "cosine")
        return updated.to(centroids.device), drift.to(centroids.device)
    updated = sums / counts.clamp(min=1)[:, None]
    if metric == "cosine":
        updated = torch.nn.functional.normalize(updated, dim=1)
    updated = updated.float().to(centroids.device)
    empty = (counts == 0).to(centroids.device)
    updated[empty] = centroids[empty]
    return updated, _drift(updated, centroids)


def _drift(updated: Tensor, centroids: Tensor) -> Tensor:
    """[K] float32: how far each centroid moved, never less than the exact
    distance (the bounds stay bounds). In float32, rounded up by (D + 3) units
    of its last place: the subtraction's rounding and any order of the D
    squares' sum are within gamma_(D+2) of the squared distance, the square root
    within one more unit (Higham, ch. 3); plus sqrt(D) 2^-74.5, what the squares
    lost below float32's least value can add. The float64 copies took 48 ms a
    pass at K = 10,000, D = 512 (issue 23)."""
    d = updated.shape[1]
    return torch.linalg.vector_norm(updated - centroids, dim=1).mul_(1 + (d + 3) * 2.0 ** -24) \
        .add_(math.sqrt(d) * 2.0 ** -74.5)


def _exact_d2(x: Tensor, centroids: Tensor, assigned: Tensor) -> Tensor:
    """Squared distances of rows to their given centroids, from the differences (no cancellation)."""
    return _sq_norms(x - centroids[assigned])


def _row_sq_norms(cache: Tensor, at: slice, x: Tensor) -> Tensor:
    """The squared norms of the fitting rows `at` (x), computed in their first
    pass and kept in `cache` [rows] (NaN: not yet; a resumed fit recomputes
    them): the rows are the same every pass."""
    x_sq = cache[at]
    if bool(x_sq.isnan().any()):
        x_sq.copy_(_sq_norms(x))
    return x_sq


def _sq_norms(x: Tensor) -> Tensor:
    """Squared row norms [B] (a norm reduction: x.pow(2).sum(1) writes a B x D temporary, 10x slower)."""
    return torch.linalg.vector_norm(x, dim=1).square_()


def _sq_norms_from(x: Tensor, point: Tensor, rows: int = 4096) -> Tensor:
    """Squared distances [B] of the rows x to `point` [D]: _sq_norms(x - point)'s
    bits, a block of rows at a time (a B x D difference, 82 MB at 40,000 x
    512, cost more in page faults than in arithmetic)."""
    out = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for lo in range(0, len(x), rows):
        torch.linalg.vector_norm(x[lo:lo + rows] - point, dim=1, out=out[lo:lo + rows])
    return out.square_()


def _nearest_coarse(x: Tensor, coarse: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """:func:`_nearest` for the coarse centroids (the groups of
    :class:`_Groups` and their seeding), near-nearest: on CPUs with bf16
    units (amxbf16, avx512bf16) from the certified path's bf16 pass alone,
    without its exact re-rank (a row's group only needs to be near its
    nearest: at K = 10,000, 0.14% of the rows chose another, 0.04% farther at
    most; 2.4x faster than the exact search, two thirds of the first pass);
    elsewhere the exact search."""
    if x.device.type == "cpu" and ops.cpu_kernel() in ("amxbf16", "avx512bf16"):
        from fastvote import _C

        return _C.nearest_centroids_bf16(x, coarse, k)
    return _nearest(x, coarse, _sq_norms(coarse), k)


def _gemm_is_faster(device: torch.device) -> bool:
    """The nearest-centroid step: fastvote's fused op, except on CPUs where its
    kernel is the AVX2 one (e.g. Zen 3), where torch's GEMM (MKL) plus a min is
    1.6x faster (benchmarks/RESULTS.md, issue 15); the fused AVX-512 kernel is
    2x the GEMM (issue 2), and its certified bf16 variant gives the same answers."""
    return device.type == "cpu" and ops.cpu_kernel() not in ("avx512", "avx512bf16", "amxbf16")


def _compiled_groups(device: torch.device) -> bool:
    """Whether the within-group searches run compiled (_C.nearest_in_groups,
    _C.update_in_groups): on CPU where the fused kernel is the faster (see
    :func:`_gemm_is_faster`); elsewhere a nearest-centroid call a group."""
    return device.type == "cpu" and ops.HAS_EXTENSION and not _gemm_is_faster(device)


def _check_replay(got: int, expected: int) -> None:
    if got != expected:
        raise RuntimeError(f"kmeans: the feature stream gave {got} rows on this pass but {expected} on the first; "
                           "batches() must replay the same rows")


def _bar(it: Iterable, progress: bool, desc: str) -> Iterator:
    return iter(tqdm(it, desc=desc, leave=False, disable=bars.disable(progress), unit="batch"))
