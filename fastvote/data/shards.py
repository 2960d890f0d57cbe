"""Embedding shards: label-free FM over a pool too large for one file or one
machine (DataComp's "image-based" filter is this recipe: cluster the pool's
embeddings, keep the samples of the clusters nearest to the target).

A source is a folder (or glob, or list) of ``.npy`` / ``.npz`` shards of
[rows, D] float16 or float32 embeddings. A ``.npz`` shard holds the embedding
array and, optionally, an identifier array (DataComp's ``uid``). Reads are a
chunk of rows at a time: ``.npy`` through ``pread`` (fastvote.data.npy: a
memory map would count every page touched in the resident set); a ``.npz``
member cannot be memory-mapped or read in part (it is a zip member), so an
npz shard is read whole, one shard at a time: size npz shards to fit memory.

Under torchrun each rank takes a contiguous run of shards (balanced by rows),
clusters with the others (fastvote.cluster: per-cluster sums all-reduced, the
clusters of one process), and writes its own shards' outputs; nothing of size
N is held anywhere. Outputs (each file written atomically; manifest.json says
"complete": false until the last file is in place):

    OUT/centroids.npy           [K, D] float32
    OUT/votes.npy, scores.npy   [K] the target's votes and FM tie-break scores
    OUT/sizes.npy               [K] int64 rows in each cluster
    OUT/kept_clusters.npy       cluster ids kept (best first)
    OUT/assignments/NAME.npy    [rows] int32, each row's cluster, per shard
    OUT/distances/NAME.npy      [rows] float32 squared distance to it, per shard
    OUT/kept/NAME.npy           int64 rows of shard NAME kept (ascending)
    OUT/kept/NAME.ids.npy       their identifiers (shards with identifiers)
    OUT/manifest.json           fastvote's mark, shards, rows, settings, totals, seconds a part, resumes
    OUT/resume/                 until complete: the k-means state after seeding and after the last pass

A killed or interrupted run (Ctrl-C stops after the current k-means pass or
shard) is resumed by the same call: k-means from its last saved pass, the
shards whose assignments are in place skipped; the outputs are the bytes of
an uninterrupted run.

    result = cluster_prune("pool/", "imagenet_train.npy", "out/", clusters=100_000,
                           keep_clusters="voted")       # DataComp's image-based filter
"""
from __future__ import annotations

import glob as globbing
import numbers
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from .. import chunks, cluster, distributed
from .. import progress as bars
from ..atomic import atomic_path, check_output_folder, claim, owner, write_json
from ..select import keep_count, rank_classes
from ..voting import FMVoter
from .npy import NpyRows, NpyWriter

__all__ = ["Shard", "ShardSource", "ClusterPrune", "cluster_prune", "ID_KEYS"]

SUFFIXES = (".npy", ".npz")
ID_KEYS = ("uid", "uids", "id", "ids", "key", "keys", "identifier", "identifiers")  # npz members auto-detected
DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
CHUNK_ROWS = 65536
RESUME = "resume"  # OUT/resume/: a run's k-means state until the output is complete
Sources = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


@dataclass(frozen=True)
class Shard:
    """One shard file: where its rows start in the whole source, and the
    size and mtime it had when opened (a pass checks them again)."""
    path: Path
    start: int
    rows: int
    dim: int
    dtype: np.dtype
    size: int
    mtime_ns: int
    embeddings_key: Optional[str] = None  # npz member of the embeddings
    ids_key: Optional[str] = None  # npz member of the identifiers

    @property
    def name(self) -> str:
        return self.path.stem


class ShardSource:
    """The shards of `source` (a folder: its .npy/.npz files, sorted by name;
    a glob pattern; one file; or a list of files), checked on opening: every
    shard 2-D float16/float32 of one width and one dtype, none empty."""

    def __init__(self, source: Sources, *, embeddings_key: Optional[str] = None, ids_key: Optional[str] = None,
                 chunk_rows: int = CHUNK_ROWS, what: str = "source"):
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral) or chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows!r} is invalid; expected an integer >= 1")
        self.what, self.chunk_rows = what, int(chunk_rows)
        self.shards: List[Shard] = []
        start = 0
        for path in _discover(source, what):
            shard = _open(path, start, embeddings_key, ids_key, what)
            if self.shards and (shard.dim, shard.dtype) != (self.dim, self.dtype):
                first = self.shards[0]
                raise ValueError(f"{what} shard {path} holds {shard.dtype} rows of width {shard.dim}, but shard "
                                 f"{first.path} holds {first.dtype} rows of width {first.dim}; expected every "
                                 "shard to have the same width and dtype")
            self.shards.append(shard)
            start += shard.rows
        names = {}
        for s in self.shards:
            if s.name in names:
                raise ValueError(f"{what} shards {names[s.name]} and {s.path} share the name {s.name!r}; outputs "
                                 "are named by shard: expected distinct file names")
            names[s.name] = s.path
        self.num_rows = start
        # The shards read whole and found finite: later passes skip the check (every read first proves the
        # file unchanged; the NaN/Inf test was ~9 s of each ~15 s k-means pass over 10M float16 rows).
        self._finite: set = set()

    @property
    def dim(self) -> int:
        return self.shards[0].dim

    @property
    def dtype(self) -> np.dtype:
        return self.shards[0].dtype

    def mine(self) -> List[Shard]:
        """This rank's shards: a contiguous run, those starting in its share of the rows."""
        share = distributed.shard(self.num_rows)
        return [s for s in self.shards if share.start <= s.start < share.stop]

    @staticmethod
    def rows_of(shards: Sequence[Shard]) -> range:
        """The global row positions of a contiguous run of shards."""
        return range(shards[0].start, shards[-1].start + shards[-1].rows) if shards else range(0, 0)

    def chunks(self, shard: Shard) -> Iterator[np.ndarray]:
        """The rows of `shard`, `chunk_rows` at a time ([B, D] float16/float32),
        after checking that the file is the one opened; NaN/Inf is an error
        naming the shard and row (tested until the shard has been read whole)."""
        _check_unchanged(shard, self.what)
        check = shard.path not in self._finite
        if shard.embeddings_key is None:
            blocks = NpyRows(shard.path).chunks(range(shard.rows), self.chunk_rows)
        else:
            with np.load(shard.path) as npz:  # a zip member is read whole (no mmap, no partial reads)
                whole = npz[shard.embeddings_key]
            blocks = (whole[lo:lo + self.chunk_rows] for lo in range(0, shard.rows, self.chunk_rows))
        row = 0
        for block in blocks:
            if check:
                bad = ~np.isfinite(block).all(1)
                if bad.any():
                    raise ValueError(f"{self.what} shard {shard.path} row {row + int(bad.argmax())} contains NaN or "
                                     "Inf; expected finite embeddings (drop or fix that row)")
            row += len(block)
            yield block
        if row != shard.rows:
            raise ValueError(f"{self.what} shard {shard.path} gave {row} rows; expected {shard.rows}")
        self._finite.add(shard.path)

    def batches(self, shards: Sequence[Shard]) -> cluster.Batches:
        """The rows of `shards` in order as tensors of the shards' dtype, a fresh
        pass a call (for fastvote.cluster, which converts only the rows it uses)."""
        return lambda: (torch.from_numpy(block) for shard in shards for block in self.chunks(shard))

    def ids(self, shard: Shard) -> Optional[np.ndarray]:
        """The shard's identifier array (None when it has none)."""
        if shard.ids_key is None:
            return None
        _check_unchanged(shard, self.what)
        with np.load(shard.path, allow_pickle=False) as npz:
            return npz[shard.ids_key]


@dataclass
class ClusterPrune:
    """What :func:`cluster_prune` did: the centroids, the votes, the clusters
    kept, the kept-sample count, the k-means fit (timings), and the folder."""
    centroids: torch.Tensor
    votes: torch.Tensor
    scores: torch.Tensor
    sizes: torch.Tensor
    kept_clusters: torch.Tensor
    kept_rows: int
    num_rows: int
    fit: cluster.Fit
    out: Path
    manifest: dict


def cluster_prune(source: Sources, target: Sources, out: Union[str, os.PathLike], *, clusters: int,
                  keep: Optional[int] = None, ratio: Optional[float] = None,
                  keep_clusters: Union[int, str, None] = None, k: int = 1, metric: str = "l2",
                  weight: str = "count", temperature: float = 1.0, iterations: int = 20,
                  max_rows_per_cluster: Optional[int] = cluster.MAX_ROWS_PER_CLUSTER, seed: int = 0,
                  embeddings_key: Optional[str] = None, ids_key: Optional[str] = None,
                  chunk_rows: int = CHUNK_ROWS, device=None, progress: bool = True,
                  overwrite: bool = False, hierarchical: Optional[bool] = None) -> ClusterPrune:
    """Label-free FM over embedding shards: K-means on the source's
    embeddings, the target's embeddings vote for their k nearest clusters
    (fastvote.voting.FMVoter: weights, metric, tie-break scores as FM's), and
    the kept clusters' members are written per shard.

    Keep exactly one of:
        keep_clusters: an integer, the best-voted clusters kept whole; or
            "voted", every cluster with a vote (DataComp's image-based filter:
            with k=1, the samples whose cluster is nearest to a target sample).
        keep: a sample budget, the number of source rows kept; or
        ratio: the fraction of source rows removed (0 <= ratio < 1).
    With a sample budget clusters are taken whole in vote order (ties by the
    FM score) while they fit; the first that does not fit gives its rows
    nearest to its centroid (ties by position), so exactly `keep` rows are
    kept.

    Args:
        source, target: the embedding shards (a folder, a glob, a file or a
            list of files; see the module docstring), of one width D.
        out: a new or empty folder or an earlier cluster-prune output (its
            files above are replaced); a folder holding anything else is
            refused before any compute, unless overwrite=True (then the files
            above are written into it and its other files are kept).
        clusters: K, the number of k-means clusters.
        k, metric, weight, temperature: the target's vote, as FM's
            (docs/SELECTION.md): each target row votes for its k nearest
            clusters, "l2" or "cosine", weighted "count", "rank" or "soft"
            (softmax at `temperature`).
        iterations, max_rows_per_cluster, seed: k-means' (fastvote.cluster.kmeans):
            at most this many Lloyd passes, over a seeded sample of at most this
            many rows a cluster (None: every row).
        hierarchical: k-means' two-level passes (fastvote.cluster.fit): True,
            False (flat: every row against all K), None (from K = 1,000 when
            a flat pass would be long). The assignment of every row to the
            final centroids is over all K either way.
        embeddings_key, ids_key: the .npz members holding the embeddings and
            the identifiers (default: the only 2-D float member; uid/id/key).
        chunk_rows: rows read at once (memory, not the result).
        device: where the distances run (default: cuda if available).
        progress: progress bars (on a terminal, rank 0 only).
    """
    src, tgt = open_pair(source, target, embeddings_key, ids_key, chunk_rows)
    budget = _check_keep(keep, ratio, keep_clusters, src.num_rows)
    if isinstance(clusters, bool) or not isinstance(clusters, numbers.Integral) or clusters < 1:
        raise ValueError(f"clusters={clusters!r} is invalid; expected an integer >= 1 (K)")
    if clusters > src.num_rows:
        raise ValueError(f"clusters={clusters} exceeds the {src.num_rows} rows of the source's "
                         f"{len(src.shards)} shards ({src.shards[0].path.parent}); expected K <= rows")
    if isinstance(keep_clusters, numbers.Integral) and keep_clusters > clusters:
        raise ValueError(f"keep_clusters={keep_clusters} exceeds clusters={clusters}")
    out = check_output_folder(out, "cluster-prune", overwrite=overwrite)
    device = distributed.resolve_device(device)
    sharded = distributed.active()
    # What the k-means state and the per-shard assignments depend on: a killed run's are resumed only if
    # all of it is the same (device type too: CPU and GPU round differently)
    key = dict(source=[[str(s.path), s.rows, s.start, s.size, s.mtime_ns]
                       for s in src.shards], clusters=clusters, metric=metric, iterations=iterations,
               max_rows_per_cluster=max_rows_per_cluster, seed=seed, chunk_rows=chunk_rows,
               ranks=distributed.world_size(), device=device.type, hierarchical=hierarchical)
    work = out / RESUME
    if distributed.is_main():
        claim(out, "cluster-prune", overwrite=overwrite)  # an unfinished mark, replaced by the final manifest
        if chunks.load_state(work / "key.pkl", key) is None:  # another run's outputs go first: none survives
            for folder in ("assignments", "distances", "kept", RESUME):
                shutil.rmtree(out / folder, ignore_errors=True)
            chunks.save_state(work / "key.pkl", key, {})
    distributed.barrier()

    seconds = {}
    with chunks.interruptible():
        mine = src.mine()
        fit = cluster.fit(src.batches(mine), clusters, rows=src.rows_of(mine), num_rows=src.num_rows,
                          sharded=sharded, metric=metric, iterations=iterations,
                          max_rows_per_cluster=max_rows_per_cluster, seed=seed, device=device, progress=progress,
                          checkpoint=work, hierarchical=hierarchical)
        centroids = fit.centroids
        started = time.perf_counter()
        sizes, reused = _assign_shards(src, mine, out, centroids, metric, device, progress)
        seconds["assign"] = time.perf_counter() - started
    if sharded:
        distributed.all_reduce_(sizes)
        reused = int(distributed.all_reduce_(torch.tensor([reused])))

    started = time.perf_counter()
    voter = FMVoter(centroids.to(device), k, metric, weight, temperature)
    for block in tqdm((b for s in tgt.mine() for b in tgt.chunks(s)), desc="target votes", leave=False,
                      disable=bars.disable(progress)):
        voter.update(torch.from_numpy(block.astype(np.float32, copy=False)).to(device))
    voter.all_reduce()
    votes, scores = voter.votes, voter.scores()
    order = rank_classes(votes, scores, voter.higher_score_first)
    kept, partial = _kept_clusters(order, votes, sizes, keep_clusters, budget)
    cutoff = _partial_cutoff(src, mine, out, partial, sizes, order, kept, budget)
    kept_rows = 0
    for shard in mine:
        rows = _kept_rows(out, shard, kept, partial, cutoff)
        write_kept(out, src, shard, rows)
        kept_rows += len(rows)
    kept_rows = int(distributed.all_reduce_(torch.tensor([kept_rows]))) if sharded else kept_rows
    seconds["vote_and_keep"] = time.perf_counter() - started
    kept_ids = torch.cat([kept, torch.tensor([partial[0]])]) if partial else kept
    manifest = {
        **owner("cluster-prune"), "complete": True,
        "source": [{"path": str(s.path), "rows": s.rows, "start": s.start} for s in src.shards],
        "target": [str(s.path) for s in tgt.shards], "rows": src.num_rows, "dim": src.dim, "dtype": str(src.dtype),
        "clusters": clusters, "metric": metric, "k": k, "weight": weight, "iterations": iterations,
        "passes": fit.passes, "fit_rows": fit.fit_rows, "max_rows_per_cluster": max_rows_per_cluster, "seed": seed,
        "kmeans_groups": fit.groups,
        "keep": {"keep_clusters": keep_clusters, "keep": keep, "ratio": ratio, "budget": budget},
        "num_kept_clusters": len(kept_ids), "partial_cluster": None if not partial else int(partial[0]),
        "kept_rows": kept_rows, "ranks": distributed.world_size(),
        "seeding_seconds": fit.seeding_seconds, "pass_seconds": fit.pass_seconds,
        "assign_seconds": seconds["assign"], "vote_and_keep_seconds": seconds["vote_and_keep"],
        # what a rerun after a kill or Ctrl-C found saved (the seconds above are those of the run that did each part)
        "resumed": None if fit.resumed_after is None and not reused else
        {"after_kmeans_pass": fit.resumed_after, "shards_assigned_before": reused},
    }
    if distributed.is_main():
        for name, array in (("centroids", centroids.numpy()), ("votes", votes.numpy()), ("scores", scores.numpy()),
                            ("sizes", sizes.numpy()), ("kept_clusters", kept_ids.numpy())):
            with atomic_path(out / f"{name}.npy") as tmp:
                np.save(tmp, array)
    distributed.barrier()  # every rank's shard files are in place before the manifest says so
    if distributed.is_main():
        write_json(out / "manifest.json", manifest)
        shutil.rmtree(work, ignore_errors=True)  # a complete output: nothing left to resume
    return ClusterPrune(centroids, votes, scores, sizes, kept_ids, kept_rows, src.num_rows, fit, out, manifest)


def _assign_shards(src: ShardSource, mine: Sequence[Shard], out: Path, centroids, metric: str, device,
                   progress: bool):
    """Writes each shard's assignments and distances (one atomic file each),
    keeping those a killed run of the same inputs committed; returns this
    rank's cluster sizes and how many shards were already done."""
    sizes = torch.zeros(len(centroids), dtype=torch.int64)
    done = [s for s in mine if all((out / f / f"{s.name}.npy").is_file() for f in ("assignments", "distances"))]
    if done and progress:
        rows = sum(s.rows for s in done)
        print(f"[fastvote] resuming: {len(done)} of {len(mine)} shards are assigned ({rows:,} of "
              f"{sum(s.rows for s in mine):,} rows)", flush=True)
    for shard in tqdm(mine, desc="assigning shards", leave=False, disable=bars.disable(progress)):
        if shard in done:
            assigned = NpyRows(out / "assignments" / f"{shard.name}.npy").load().astype(np.int64)
            sizes += torch.bincount(torch.from_numpy(assigned), minlength=len(centroids))
            continue
        with NpyWriter(out / "assignments" / f"{shard.name}.npy", (shard.rows,), np.int32) as a, \
                NpyWriter(out / "distances" / f"{shard.name}.npy", (shard.rows,), np.float32) as d:
            for assigned, d2 in cluster.assign(src.batches([shard]), centroids, metric, device=device,
                                               progress=False):
                a.write(assigned.numpy().astype(np.int32))
                d.write(d2.numpy())
                sizes += torch.bincount(assigned, minlength=len(centroids))
        chunks.check()  # a Ctrl-C stops between shards, this one committed
    return sizes, len(done)


def open_pair(source: Sources, target: Sources, embeddings_key: Optional[str], ids_key: Optional[str],
              chunk_rows: int) -> tuple:
    """The source's and the target's shards, checked to share one embedding width."""
    src = ShardSource(source, embeddings_key=embeddings_key, ids_key=ids_key, chunk_rows=chunk_rows)
    tgt = ShardSource(target, embeddings_key=embeddings_key, chunk_rows=chunk_rows, what="target")
    if tgt.dim != src.dim:
        raise ValueError(f"the target's embeddings have width {tgt.dim} but the source's {src.dim} "
                         f"(target shard {tgt.shards[0].path}, source shard {src.shards[0].path}); expected the "
                         "same embedding model for both")
    return src, tgt


def write_kept(out: Path, src: "ShardSource", shard: "Shard", rows: np.ndarray) -> None:
    """OUT/kept/NAME.npy (the shard's kept rows, ascending) and, for a shard
    with identifiers, OUT/kept/NAME.ids.npy (theirs); each file atomic."""
    with atomic_path(out / "kept" / f"{shard.name}.npy") as tmp:
        np.save(tmp, rows)
    ids = src.ids(shard)
    if ids is not None:
        with atomic_path(out / "kept" / f"{shard.name}.ids.npy") as tmp:
            np.save(tmp, ids[rows])


# ---------------------------------------------------------------- keep rules

def _check_keep(keep, ratio, keep_clusters, rows: int) -> Optional[int]:
    """The sample budget (None when keeping by clusters); exactly one rule."""
    given = [name for name, v in (("keep", keep), ("ratio", ratio), ("keep_clusters", keep_clusters))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of keep= (source rows kept), ratio= (fraction of source rows removed) "
                         f"and keep_clusters= (an integer, or 'voted'); got {', '.join(given) or 'none'}")
    if keep_clusters is not None:
        if keep_clusters != "voted" and (isinstance(keep_clusters, bool) or
                                         not isinstance(keep_clusters, numbers.Integral) or keep_clusters < 1):
            raise ValueError(f"keep_clusters={keep_clusters!r} is invalid; expected an integer >= 1 or 'voted'")
        return None
    return keep_count(rows, ratio, keep, unit="samples")


def _kept_clusters(order: torch.Tensor, votes: torch.Tensor, sizes: torch.Tensor, keep_clusters,
                   budget: Optional[int]):
    """(clusters kept whole, in rank order; (partial cluster, rows it gives) or None)."""
    if keep_clusters == "voted":
        return order[votes[order] > 0], None
    if keep_clusters is not None:
        return order[:int(keep_clusters)], None
    total = torch.cumsum(sizes[order], 0)
    whole = int((total <= budget).sum())
    taken = int(total[whole - 1]) if whole else 0
    return order[:whole], ((int(order[whole]), budget - taken) if taken < budget else None)


def _partial_cutoff(src: ShardSource, mine: Sequence[Shard], out: Path, partial, sizes, order, kept,
                    budget) -> Optional[tuple]:
    """(squared distance, global row) of the last row the partial cluster
    gives: its `need` rows nearest to its centroid, over every rank's shards."""
    if partial is None:
        return None
    cluster_id, need = partial
    found = []  # (distance, global row) of the partial cluster's members here: at most its size
    for shard in mine:
        assigned = NpyRows(out / "assignments" / f"{shard.name}.npy").load()
        members = np.flatnonzero(assigned == cluster_id)
        d2 = NpyRows(out / "distances" / f"{shard.name}.npy").load()[members]
        found.extend(zip(d2.tolist(), (members + shard.start).tolist()))
    if distributed.active():
        found = [x for r in range(distributed.world_size()) for x in distributed.broadcast_object(found, src=r)]
    found.sort()
    return found[need - 1]


def _kept_rows(out: Path, shard: Shard, kept: torch.Tensor, partial, cutoff) -> np.ndarray:
    """int64 rows of `shard` kept (ascending)."""
    assigned = NpyRows(out / "assignments" / f"{shard.name}.npy").load()
    keep = np.isin(assigned, kept.numpy())
    if partial is not None:
        d2 = NpyRows(out / "distances" / f"{shard.name}.npy").load()
        rows = np.arange(shard.rows) + shard.start
        keep |= (assigned == partial[0]) & ((d2 < cutoff[0]) | ((d2 == cutoff[0]) & (rows <= cutoff[1])))
    return np.flatnonzero(keep).astype(np.int64)


# ---------------------------------------------------------------- opening shards

def _discover(source: Sources, what: str) -> List[Path]:
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if any(c in text for c in "*?["):
            paths = [Path(p) for p in sorted(globbing.glob(text))]
            where = f"{what}={text!r} (a glob)"
        elif Path(text).is_dir():
            paths = sorted(Path(text).iterdir())
            where = f"{what}={text!r} (a folder)"
        elif Path(text).exists():
            paths, where = [Path(text)], f"{what}={text!r}"
        else:
            raise FileNotFoundError(f"{what}={text!r} does not exist; expected a folder, a glob or a file of "
                                    ".npy/.npz embedding shards")
    else:
        paths, where = [Path(p) for p in source], f"{what} (a list of {len(source)} files)"
    paths = [p for p in paths if p.suffix in SUFFIXES and not p.name.startswith(".")]
    if not paths:
        raise FileNotFoundError(f"{where} holds no .npy or .npz shards")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{what} shard {p} does not exist")
    return paths


def _open(path: Path, start: int, embeddings_key: Optional[str], ids_key: Optional[str], what: str) -> Shard:
    stat = path.stat()
    if path.suffix == ".npy":
        rows = NpyRows(path)
        shape, dtype, emb, ids = rows.shape, rows.dtype, None, None
    else:
        members = _npz_members(path, what)
        emb = embeddings_key or _pick_embeddings(path, members, what)
        if emb not in members:
            raise ValueError(f"{what} shard {path} has no member {emb!r}; it holds {sorted(members)}")
        shape, dtype = members[emb]
        ids = ids_key or next((key for key in ID_KEYS if key in members and len(members[key][0]) == 1), None)
        if ids is not None:
            if ids not in members:
                raise ValueError(f"{what} shard {path} has no member ids_key={ids!r}; it holds {sorted(members)}")
            if members[ids][0] != shape[:1]:
                raise ValueError(f"{what} shard {path}: identifiers {ids!r} have shape {list(members[ids][0])} but "
                                 f"the embeddings {shape[0]} rows; expected one identifier a row")
    if len(shape) != 2:
        raise ValueError(f"{what} shard {path} holds an array of shape {list(shape)}; expected [rows, D] embeddings")
    if np.dtype(dtype) not in DTYPES:
        raise ValueError(f"{what} shard {path} holds {dtype} embeddings; expected float16 or float32")
    if shape[0] == 0:
        raise ValueError(f"{what} shard {path} is empty (0 rows); expected at least one row (remove the file)")
    if shape[1] == 0:
        raise ValueError(f"{what} shard {path} has width 0; expected D >= 1")
    return Shard(path, start, int(shape[0]), int(shape[1]), np.dtype(dtype), stat.st_size, stat.st_mtime_ns, emb, ids)


def _npz_members(path: Path, what: str) -> dict:
    """{member: (shape, dtype)} of an .npz, from the member headers only."""
    members = {}
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if not name.endswith(".npy"):
                    continue
                with z.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0(f))
                members[name[:-4]] = (tuple(shape), dtype)
    except (zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"{what} shard {path} is not a readable .npz ({e})") from None
    return members


def _pick_embeddings(path: Path, members: dict, what: str) -> str:
    floats = [name for name, (shape, dtype) in members.items() if len(shape) == 2 and dtype.kind == "f"]
    if len(floats) != 1:
        raise ValueError(f"{what} shard {path} holds {len(floats)} 2-D float members {sorted(floats)}; pass "
                         "embeddings_key= (--embeddings-key) to say which holds the embeddings (DataComp: "
                         "'l14_img' or 'b32_img')")
    return floats[0]


def _check_unchanged(shard: Shard, what: str) -> None:
    stat = shard.path.stat()
    if (stat.st_size, stat.st_mtime_ns) != (shard.size, shard.mtime_ns):
        raise ValueError(f"{what} shard {shard.path} changed since it was opened (size {shard.size} -> "
                           f"{stat.st_size} bytes, mtime {shard.mtime_ns} -> {stat.st_mtime_ns} ns); the passes "
                           "must all read the same rows: rerun once the shards are final")
