"""NormSim over embedding shards: every source row scored against a target's
embeddings, and an exact sample budget of the best kept, streamed a chunk of
rows at a time (fastvote.methods.normsim's rule, at web scale; the shards are
read as cluster-prune reads them: fastvote.data.shards).

One pass scores each shard with fastvote.ops.sample_scores (no N x M matrix)
and writes its scores; the budget's cut-off is then found exactly from those
files with two 65,536-bin histograms of the scores' float32 bit patterns (all-
reduced under torchrun), so nothing of size N is held anywhere. Rows whose
score equals the cut-off are kept in position order (lower global row first),
so exactly `keep` rows are kept. Outputs (each file written atomically;
manifest.json says "complete": false until the last file is in place):

    OUT/max/NAME.npy         [rows] float32 NormSim_inf: the best cosine similarity to a target row
    OUT/nearest/NAME.npy     [rows] int32 that target row
    OUT/rms/NAME.npy         [rows] float32 NormSim_2: the RMS cosine similarity to the target rows
    OUT/kept/NAME.npy        int64 rows of shard NAME kept (ascending)
    OUT/kept/NAME.ids.npy    their identifiers (shards with identifiers)
    OUT/manifest.json        fastvote's mark, shards, rows, p, the budget, the cut-off, timings

    result = normsim_prune("pool/", "imagenet_val.npy", "out/", ratio=0.7, p="inf")
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from .. import distributed, ops
from .. import progress as bars
from ..atomic import check_output_folder, claim, owner, write_json
from ..select import keep_count
from .npy import NpyRows, NpyWriter
from .shards import CHUNK_ROWS, Shard, ShardSource, Sources, open_pair, write_kept

__all__ = ["NormSimPrune", "normsim_prune"]

KIND = "normsim-prune"
SCORE_FOLDERS = {"inf": "max", "2": "rms"}  # the folder of each p's scores


@dataclass
class NormSimPrune:
    """What :func:`normsim_prune` did: rows kept of the source's, the score at
    the cut-off, the folder, the manifest and the seconds each pass took."""
    kept_rows: int
    num_rows: int
    cutoff: float
    out: Path
    manifest: dict


def normsim_prune(source: Sources, target: Sources, out: Union[str, os.PathLike], *, keep: Optional[int] = None,
                  ratio: Optional[float] = None, p: Union[str, int] = "inf", embeddings_key: Optional[str] = None,
                  ids_key: Optional[str] = None, chunk_rows: int = CHUNK_ROWS, device=None, progress: bool = True,
                  overwrite: bool = False) -> NormSimPrune:
    """Keeps the `keep` source rows most similar to the target by NormSim_p
    (docs/SELECTION.md, "Per-sample target scores"), over embedding shards.

    Args:
        source: the pool's embedding shards (a folder, a glob, a file or a list
            of .npy/.npz files; fastvote.data.shards), [rows, D] float16/float32.
        target: the target's embeddings, of the same width, held in memory
            (M x D float32) while the source streams past.
        out: a new or empty folder or an earlier normsim-prune output (its files
            above are replaced); anything else is refused before any compute,
            unless overwrite=True (then its other files are kept).
        keep: the number of source rows kept; or
        ratio: the fraction of source rows removed (0 <= ratio < 1).
        p: "inf" (the best similarity to a target row) or "2" (the RMS
            similarity); both are written, `p` decides what is kept.
        embeddings_key, ids_key: the .npz members (as cluster_prune's).
        chunk_rows: rows scored at once (memory, not the result).
        device: where the scores run (default: cuda if available).
        progress: a progress bar over the source rows (on a terminal, rank 0 only).
    """
    p = str(p)
    if p not in SCORE_FOLDERS:
        raise ValueError(f"p={p!r} is invalid; expected 'inf' (NormSim_inf) or '2' (NormSim_2)")
    src, tgt = open_pair(source, target, embeddings_key, ids_key, chunk_rows)
    budget = keep_count(src.num_rows, ratio, keep, unit="samples")
    out = check_output_folder(out, KIND, overwrite=overwrite)
    device = distributed.resolve_device(device)
    if distributed.is_main():  # an earlier run's outputs go first: no stale shard file survives
        claim(out, KIND, overwrite=overwrite)
        for folder in ("max", "nearest", "rms", "kept"):
            shutil.rmtree(out / folder, ignore_errors=True)
    distributed.barrier()

    started = time.perf_counter()
    targets = torch.cat([torch.from_numpy(b.astype(np.float32, copy=False))
                         for s in tgt.shards for b in tgt.chunks(s)]).to(device)
    mine = src.mine()
    _score(src, mine, targets, out, device, progress)
    scoring = time.perf_counter() - started

    started = time.perf_counter()
    folder = out / SCORE_FOLDERS[p]
    cut, take = _cutoff([folder / f"{s.name}.npy" for s in mine], budget)
    kept_rows = 0
    ties_before = _ties_before([folder / f"{s.name}.npy" for s in mine], cut)
    for shard in mine:
        key = _order_keys(NpyRows(folder / f"{shard.name}.npy").load())
        ties = np.flatnonzero(key == cut)
        rows = np.flatnonzero(key > cut)
        taken = ties[:max(0, min(len(ties), take - ties_before))]
        ties_before += len(ties)
        rows = np.sort(np.concatenate([rows, taken])).astype(np.int64)
        write_kept(out, src, shard, rows)
        kept_rows += len(rows)
    if distributed.active():
        kept_rows = int(distributed.all_reduce_(torch.tensor([kept_rows])))
    selecting = time.perf_counter() - started
    cutoff = float(_score_of(cut))
    manifest = {
        **owner(KIND), "complete": True,
        "source": [{"path": str(s.path), "rows": s.rows, "start": s.start} for s in src.shards],
        "target": [str(s.path) for s in tgt.shards], "target_rows": int(targets.shape[0]),
        "rows": src.num_rows, "dim": src.dim, "dtype": str(src.dtype), "p": p,
        "score": "NormSim_inf: the best cosine similarity to a target row" if p == "inf"
                 else "NormSim_2: the RMS cosine similarity to the target rows",
        "keep": {"keep": keep, "ratio": ratio, "budget": budget}, "kept_rows": kept_rows, "cutoff": cutoff,
        "ties_at_cutoff_kept": int(take), "ranks": distributed.world_size(), "device": str(device),
        "seconds": {"scoring": scoring, "selecting": selecting},
    }
    distributed.barrier()  # every rank's shard files are in place before the manifest says so
    if distributed.is_main():
        write_json(out / "manifest.json", manifest)
    return NormSimPrune(kept_rows, src.num_rows, cutoff, out, manifest)


def _score(src: ShardSource, shards: Sequence[Shard], targets: torch.Tensor, out: Path, device,
           progress: bool) -> None:
    """Writes max/, nearest/ and rms/ for `shards`, a chunk of rows at a time."""
    bar = tqdm(total=sum(s.rows for s in shards), desc="NormSim scores", unit="rows", unit_scale=True,
               disable=bars.disable(progress))
    for shard in shards:
        with NpyWriter(out / "max" / f"{shard.name}.npy", (shard.rows,), np.float32) as best, \
                NpyWriter(out / "nearest" / f"{shard.name}.npy", (shard.rows,), np.int32) as nearest, \
                NpyWriter(out / "rms" / f"{shard.name}.npy", (shard.rows,), np.float32) as rms:
            for block in src.chunks(shard):
                values, indices, root_mean = ops.sample_scores(torch.from_numpy(block).to(device), targets, 1)
                best.write(values[:, 0].cpu().numpy())
                nearest.write(indices[:, 0].cpu().numpy().astype(np.int32))
                rms.write(root_mean.cpu().numpy().astype(np.float32))
                bar.update(len(block))
    bar.close()


# ---------------------------------------------------------------- the exact cut-off

def _order_keys(scores: np.ndarray) -> np.ndarray:
    """float32 scores -> uint32 keys in the same order (the sign bit flipped for
    positives, every bit for negatives): integer bins, exact comparisons."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def _score_of(key: int) -> np.float32:
    bits = np.uint32(key)
    bits = bits & np.uint32(0x7FFFFFFF) if bits & np.uint32(0x80000000) else ~bits
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def _histogram(paths: Sequence[Path], select) -> torch.Tensor:
    """65,536 bins of select(keys) (None: a key is not counted) over every rank's files."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    for path in paths:
        picked = select(_order_keys(NpyRows(path).load()))
        counts += np.bincount(picked, minlength=1 << 16)
    return distributed.all_reduce_(torch.from_numpy(counts))


def _top_bin(counts: torch.Tensor, need: int) -> Tuple[int, int]:
    """The bin holding the need-th largest key, and how many keys lie above it."""
    above = torch.cumsum(counts.flip(0), 0)
    index = int(torch.searchsorted(above, torch.tensor([need]))[0])
    return (1 << 16) - 1 - index, int(above[index] - counts.flip(0)[index])


def _cutoff(paths: Sequence[Path], budget: int) -> Tuple[int, int]:
    """(the key of the budget-th best score, how many rows with exactly that key
    are kept): the high 16 bits first, then the low 16 bits inside that bin."""
    high, above = _top_bin(_histogram(paths, lambda key: key >> 16), budget)
    low, above_low = _top_bin(_histogram(paths, lambda key: key[(key >> 16) == high] & 0xFFFF), budget - above)
    return (high << 16) | low, budget - above - above_low


def _ties_before(paths: Sequence[Path], cut: int) -> int:
    """Rows with key == cut in the lower ranks' shards (theirs come first)."""
    if not distributed.active():
        return 0
    mine = sum(int((_order_keys(NpyRows(path).load()) == cut).sum()) for path in paths)
    counts = torch.zeros(distributed.world_size(), dtype=torch.int64)
    counts[distributed.rank()] = mine
    return int(distributed.all_reduce_(counts)[:distributed.rank()].sum())
