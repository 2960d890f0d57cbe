"""The views a method reads (fastvote.methods.base declares them): surrogate
outputs over one dataset as a stream of batches, from precomputed outputs
(:class:`TensorView`) or by running the surrogate over a beton
(:class:`ModelView`, which also serves the baselines' images and training
runs). Passes can be sharded over torchrun ranks.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from fastvote import data as fvdata
from fastvote import chunks, distributed
from fastvote.data.npy import NpyRows
from fastvote.inputs import Column, Input

TensorDict = Dict[str, Tensor]


class _SourceRows:
    """What both views share for the sample-wise baselines: stream rows,
    fingerprints and the score cache folder (see fastvote.methods.View)."""

    data: Input
    workdir: Optional[Path]
    surrogate_fingerprint: Optional[str]

    @property
    def num_rows(self) -> int:
        return self.data.num_rows

    @property
    def fingerprint(self) -> Dict[str, Optional[str]]:
        return {"source": self.data.fingerprint, "surrogate": self.surrogate_fingerprint}

    @property
    def cache_dir(self) -> Optional[Path]:
        return None if self.workdir is None else self.workdir / "scores"

    def _rows(self, identifiers: np.ndarray) -> np.ndarray:
        """Source identifiers -> stream rows (int64)."""
        ids = self.data.identifiers
        if getattr(self, "_sorter", None) is None:
            self._identity = np.array_equal(ids, np.arange(len(ids)))
            self._sorter = np.argsort(ids, kind="stable")
        identifiers = np.asarray(identifiers, dtype=np.int64)
        if self._identity:
            return identifiers
        return self._sorter[np.searchsorted(ids[self._sorter], identifiers)].astype(np.int64)


def _rows_of(column: Column, start: int, stop: int) -> Tensor:
    return torch.from_numpy(column.read(start, stop)) if isinstance(column, NpyRows) else column[start:stop]


class TensorView(_SourceRows):
    def __init__(self, data: Input, batch_size: int, num_classes: Optional[int], class_names, *,
                 device=None, workdir: Optional[Path] = None):
        self.data = data
        self.batch_size = batch_size
        self.labels = data.labels
        self.num_classes = num_classes
        self.class_names = class_names
        self.device = torch.device(device or "cpu")
        self.workdir = workdir
        self.surrogate_fingerprint = None  # precomputed outputs: the source fingerprint covers the surrogate

    def batches(self, want: Sequence[str], shard: bool = False) -> Iterator[TensorDict]:
        missing = [w for w in want if w not in self.data.outputs]
        if missing:
            raise ValueError(f"{self.data.description} lacks {missing}, which this method needs")
        rows = distributed.shard(self.data.num_rows) if shard else range(self.data.num_rows)
        for start in range(rows.start, rows.stop, self.batch_size):
            stop = min(start + self.batch_size, rows.stop)
            yield {w: _rows_of(self.data.outputs[w], start, stop) for w in want}

    def array(self, output: str) -> np.ndarray:
        if output not in self.data.outputs:
            raise ValueError(f"{self.data.description} lacks {output!r}, which this method needs")
        column = self.data.outputs[output]
        return np.load(column.path, mmap_mode="r") if isinstance(column, NpyRows) else column.numpy()

    def _no_images(self, *_args, **_kw):
        raise ValueError(f"{self.data.description}: this method trains models on the source images, but the "
                         "source was given as precomputed outputs; pass the source as a .beton, a registry "
                         "name or a Dataset")

    samples = train_run = _no_images
    recipe = property(_no_images)


class ModelView(_SourceRows):
    """Runs the surrogate over a beton (eval pipeline, file order; autocast as
    `amp` asks, fastvote.features.autocast_dtype). With a
    cache folder the first complete pass is kept on disk as .npy files, so
    later passes (K-means) read features in chunks instead of recomputing.

    For the sample-wise baselines it also gives whole columns (``array``,
    cached under workdir/features), the source images (``samples``) and
    training runs from scratch (``train_run``, models cached under
    workdir/runs; the recipe is `train_config`, default TrainConfig())."""

    def __init__(self, data: Input, model, prep: dict, *, batch_size: int, device, progress: bool,
                 num_classes: Optional[int], class_names, cache: Optional[Path] = None,
                 workdir: Optional[Path] = None, surrogate_fingerprint: Optional[str] = None, train_config=None,
                 amp: Optional[bool] = None):
        self.data, self.model, self.prep, self.amp = data, model, prep, amp
        self.batch_size, self.device, self.progress = batch_size, device, progress
        self.labels = data.labels
        self.num_classes = num_classes
        self.class_names = class_names
        self.cache = cache
        self.workdir = workdir
        self.surrogate_fingerprint = surrogate_fingerprint
        self.train_config = train_config

    def _cache_files(self, want, shard: bool) -> Dict[str, Path]:
        """The cache file of each output: the whole stream, or this rank's shard."""
        tag = f".rank{distributed.rank()}of{distributed.world_size()}" if shard and distributed.active() else ""
        return {w: self.cache / f"{w}{tag}.npy" for w in want}

    def _cached(self, want, shard: bool = False) -> bool:
        return self.cache is not None and all(p.is_file() for p in self._cache_files(want, shard).values())

    def batches(self, want: Sequence[str], shard: bool = False) -> Iterator[TensorDict]:
        """One pass over the stream rows (with shard=True: this rank's rows,
        fastvote.distributed.shard), from the cache when it has them."""
        rows = distributed.shard(self.data.num_rows) if shard else range(self.data.num_rows)
        if self._cached(want):  # the whole stream is cached: any shard reads its rows from it
            files, first = self._cache_files(want, False), rows.start
        elif shard and self._cached(want, shard=True):
            files, first = self._cache_files(want, True), 0
        else:
            files = None
        if files is not None:
            columns = {w: NpyRows(path) for w, path in files.items()}
            for start in range(rows.start, rows.stop, self.batch_size):
                stop = min(start + self.batch_size, rows.stop)
                yield {w: torch.from_numpy(c.read(start - first, stop - first)) for w, c in columns.items()}
            return
        yield from self._compute(want, rows, shard)

    def _loader(self, rows: range):
        positions = None if len(rows) == self.data.num_rows else self.data.identifiers[rows.start:rows.stop]
        # fastvote's loaders leave the caller's thread counts as they were (ffcv's own does not)
        return fvdata.eval_loader(self.data.beton, self.batch_size, resolution=self.prep["resolution"],
                                  mean=self.prep["mean"], std=self.prep["std"], indices=positions,
                                  crop_ratio=self.prep.get("crop_ratio", 1.0),
                                  interpolation=self.prep.get("interpolation"))

    def _run(self, want: Sequence[str], rows: range) -> Iterator[TensorDict]:
        from fastvote.features import iterate_outputs

        outputs = tuple(w for w in want if w != "labels")
        for batch in iterate_outputs(self.model, self._loader(rows), device=self.device, want=outputs,
                                     amp=self.amp, progress=self.progress, desc=self.data.description):
            yield {w: batch[w] for w in want}

    def _compute(self, want: Sequence[str], rows: range, shard: bool) -> Iterator[TensorDict]:
        """Runs the surrogate over `rows`. With a cache folder the pass commits
        chunks as it goes (fastvote.chunks): a rerun after a kill or Ctrl-C
        reads the committed batches back and computes the rest, in the same
        batches as an uninterrupted pass (so the same bytes); a complete pass
        is published as the cache's .npy files."""
        if len(rows) == 0:
            return
        # Under torchrun an unsharded pass runs on every rank: rank 0 alone commits and publishes it (a rank
        # removing the parts it published would pull them from under another's publish)
        if self.cache is None or (not shard and not distributed.is_main()):
            yield from self._run(want, rows)
            return
        parts = chunks.ChunkedColumns(self.cache, {"source": self.data.fingerprint, "rows": self.data.num_rows,
                                                    "surrogate": self.surrogate_fingerprint, "prep": self.prep},
                                      shared=shard and distributed.active())
        # batches start where an uninterrupted pass's do; a batch counts as cached only whole
        starts = list(range(rows.start, rows.stop, self.batch_size))
        ends = starts[1:] + [rows.stop]
        spans = parts.covered(want, rows)
        cached = [any(a <= s and e <= b for a, b in spans) for s, e in zip(starts, ends)]
        found = sum(e - s for s, e, c in zip(starts, ends, cached) if c)
        if found and self.progress:
            role = self.data.description.split(":")[0]
            print(f"[fastvote] resuming: {found / len(rows):.0%} of the {role} pass is cached "
                  f"({found:,} of {len(rows):,} rows)", flush=True)
        i = 0
        with chunks.interruptible():
            while i < len(starts):
                j = i
                while j < len(starts) and cached[j] == cached[i]:
                    j += 1
                run = range(starts[i], ends[j - 1])
                if cached[i]:
                    for s, e in zip(starts[i:j], ends[i:j]):
                        yield {w: torch.from_numpy(parts.read(w, s, e)) for w in want}
                else:
                    committer = chunks.Committer(parts, run.start)
                    for out in self._run(want, run):
                        committer.add({w: t.cpu().numpy() for w, t in out.items()})
                        yield out
                    committer.flush()
                i = j
        for w, path in self._cache_files(want, shard).items():  # a complete pass: publish the cache
            parts.publish(w, path, rows)
        parts.remove(rows)

    # ---- for the sample-wise baselines (fastvote.methods.View) -------------
    def array(self, output: str) -> np.ndarray:
        """The whole `output` column [N, ...] in stream order: one pass, kept
        on disk (memory-mapped) when the view has a cache folder."""
        if not self._cached((output,)):
            parts = [b[output].cpu().numpy() for b in self.batches((output,))]
            if not self._cached((output,)):
                return np.concatenate(parts)
        return np.load(self.cache / f"{output}.npy", mmap_mode="r")

    def samples(self, batch_size: Optional[int] = None) -> Iterator[tuple]:
        """(images float [B, 3, H, W] on device, labels int64 [B], rows int64 [B])
        through the surrogate's eval preprocessing, in file order."""
        batch_size = batch_size or self.batch_size
        loaders = self.__dict__.setdefault("_sample_loaders", {})
        if batch_size not in loaders:  # one loader a view: each new one costs a numba compile
            loaders[batch_size] = fvdata.eval_loader(
                self.data.beton, batch_size, resolution=self.prep["resolution"], mean=self.prep["mean"],
                std=self.prep["std"], crop_ratio=self.prep.get("crop_ratio", 1.0),
                interpolation=self.prep.get("interpolation"), with_identifier=True, device=self.device)
        for images, labels, identifiers in loaders[batch_size]:
            yield images, labels, torch.from_numpy(self._rows(identifiers.cpu().numpy()))

    def _config(self):
        from fastvote.train import TrainConfig

        return self.train_config or TrainConfig()

    @property
    def recipe(self) -> dict:
        from fastvote import scores

        return scores.recipe(self.model, self._config(), self.prep, self.num_classes)

    def train_run(self, seed: int, epochs: int, on_batch=None):
        """A fresh model of the surrogate's architecture trained `epochs`
        epochs from scratch (fastvote.scores.train_run). Without on_batch a
        finished run is reused from workdir/runs."""
        from fastvote import models, scores

        model = scores.fresh_model(self.model, self.num_classes, seed)
        path = None
        if self.workdir is not None:
            key = hashlib.sha256(json.dumps([self.fingerprint, self.recipe, seed, epochs]).encode()).hexdigest()[:20]
            path = self.workdir / "runs" / f"{key}.pt"
            if on_batch is None and path.is_file():
                models.load_state_dict_flexible(model, torch.load(path, map_location="cpu", weights_only=True))
                return model.to(self.device).eval()
        scores.train_run(model, self.data.beton, config=self._config(), epochs=epochs, prep=self.prep, seed=seed,
                         device=self.device, rows_of=self._rows, on_batch=on_batch, progress=self.progress,
                         desc=f"training run (seed {seed}, {epochs} epochs)")
        if path is not None:
            models.atomic_save(models.unwrap_model(model).state_dict(), path)
        return model


