"""``fastvote.prune``: the drop-in call. Given a source (pretraining) set and
one or more target (downstream) training sets, keep the source classes the
targets vote for, and return their sample indices.

    result = fastvote.prune("haystack", "digits", method="lm", keep=10, arch="tiny")
    result.save("runs/lm")                      # indices.npy, classes.json, manifest.json
    loader = result.loader(batch_size=256)      # FFCV, only the kept samples

Inputs (``source``, each ``target``): a ``.beton`` path, a registry name
(``"haystack"``, ``"digits"``, ``"digits:train"``; see fastvote.data.names()),
a map-style Dataset of (image, label), or precomputed surrogate outputs as a
dict ``{"logits": [N, K], "features": [N, D], "labels": [N]}`` (labels for the
source only). Datasets are written once to ``.beton`` files in the cache so
every read goes through FFCV.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

import fastvote
from fastvote import data as fvdata
from fastvote import distributed
from fastvote.data.npy import NpyRows, NpyWriter
from fastvote import methods
from fastvote.select import keep_count

TensorDict = Dict[str, Tensor]
Column = Union[Tensor, NpyRows]  # in memory, or a .npy file read a chunk at a time
DataInput = Union[str, os.PathLike, TensorDict, object]

OUTPUT_FILES = ("indices.npy", "classes.json", "manifest.json")
OUTPUT_NAMES = ("logits", "features", "labels")  # precomputed surrogate outputs
PRECOMPUTED_BATCH = 16384  # rows a read of precomputed outputs (32 MB of 512-d float32)
DEFAULT_ARCH = "resnet18"


# --------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------

@dataclass
class PruneResult:
    """What a prune keeps and why.

    kept_classes: int64 ids of the kept source classes (clusters for label-free
        FM), in rank order (most voted first, or least with reverse=True).
    indices: sorted int64 positions of the kept samples in the source.
    votes: [K] votes per class; scores: [K] the tie-breaking score.
    class_names: names of all K classes (or "cluster j").
    ratio: the fraction of classes actually removed.
    manifest: method, arguments, data and surrogate fingerprints, versions, timings.
    """

    method: str
    kept_classes: Tensor
    indices: Tensor
    votes: Optional[Tensor]
    scores: Tensor
    class_names: List[str]
    ratio: float
    manifest: dict = field(default_factory=dict)

    @property
    def kept_names(self) -> List[str]:
        return [self.class_names[int(c)] for c in self.kept_classes]

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Writes indices.npy, classes.json and manifest.json into `directory`.

        The three files are written into a temporary folder beside it and moved
        in by renames, so a reader never sees a half-written result. Under
        torchrun only rank 0 writes (every rank holds the same result).
        """
        directory = Path(directory)
        if not distributed.is_main():
            return directory
        directory.parent.mkdir(parents=True, exist_ok=True)
        # Staged beside the target: a failure leaves no partial result folder.
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            np.save(staging / "indices.npy", self.indices.numpy().astype(np.int64))
            rank = {int(c): r for r, c in enumerate(self.kept_classes)}
            classes = {
                "kept": [int(c) for c in self.kept_classes],
                "classes": [
                    {"id": j, "name": name,
                     "votes": None if self.votes is None else self.votes[j].item(),
                     "score": float(self.scores[j]), "kept": j in rank, "rank": rank.get(j)}
                    for j, name in enumerate(self.class_names)],
            }
            (staging / "classes.json").write_text(json.dumps(classes, indent=1))
            manifest = dict(self.manifest, method=self.method, ratio=self.ratio,
                            num_kept_classes=len(self.kept_classes), num_kept_samples=len(self.indices))
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
            if not directory.exists():
                os.rename(staging, directory)
            else:  # an existing folder: replace our files one rename at a time
                for name in OUTPUT_FILES:
                    os.replace(staging / name, directory / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: Union[str, os.PathLike]) -> "PruneResult":
        directory = Path(directory)
        absent = [n for n in OUTPUT_FILES if not (directory / n).is_file()]
        if absent:
            raise FileNotFoundError(f"{directory} is not a saved prune result: {absent} missing")
        classes = json.loads((directory / "classes.json").read_text())
        manifest = json.loads((directory / "manifest.json").read_text())
        rows = classes["classes"]
        votes = None if rows and rows[0]["votes"] is None else torch.tensor(
            [r["votes"] for r in rows], dtype=torch.int64 if all(isinstance(r["votes"], int) for r in rows)
            else torch.float64)
        return cls(method=manifest["method"], kept_classes=torch.tensor(classes["kept"], dtype=torch.int64),
                   indices=torch.from_numpy(np.load(directory / "indices.npy")),
                   votes=votes, scores=torch.tensor([r["score"] for r in rows], dtype=torch.float64),
                   class_names=[r["name"] for r in rows], ratio=manifest["ratio"], manifest=manifest)

    def loader(self, batch_size: int = 256, *, train: bool = True, source: Optional[str] = None, **kw):
        """An FFCV loader over the kept samples of the source beton (train
        pipeline by default, eval with train=False). `kw` go to
        fastvote.data.train_loader / eval_loader (resolution, mean, std, ...);
        resolution, mean and std default to the surrogate's preprocessing."""
        beton = source or self.manifest.get("source", {}).get("beton")
        if not beton:
            raise ValueError("this result's source was not a .beton; pass source='path/to/source.beton'")
        prep = self.manifest.get("preprocessing", {})
        for key in ("resolution", "mean", "std"):
            if key not in kw and key in prep:
                kw[key] = prep[key]
        make = fvdata.train_loader if train else fvdata.eval_loader
        return make(beton, batch_size, indices=self.indices.numpy(), **kw)


# --------------------------------------------------------------------------
# Resolving inputs
# --------------------------------------------------------------------------

@dataclass
class _Data:
    """One resolved dataset input: a beton on disk, or precomputed outputs."""

    description: str
    fingerprint: str
    beton: Optional[Path] = None
    outputs: Optional[Dict[str, Column]] = None  # precomputed surrogate outputs
    labels: Optional[np.ndarray] = None        # file (stream) order
    identifiers: Optional[np.ndarray] = None   # source position of each stream row
    class_names: Optional[List[str]] = None
    image_size: Optional[int] = None

    @property
    def num_rows(self) -> int:
        return len(self.identifiers)

    @property
    def num_classes(self) -> Optional[int]:
        if self.class_names is not None:
            return len(self.class_names)
        return None if self.labels is None or len(self.labels) == 0 else int(self.labels.max()) + 1


def _fingerprint_file(path: Path) -> str:
    """sha256 of the size and 16 evenly spaced 64 KiB chunks (plus both ends):
    cheap on a 100 GB beton, and changes with any rewrite in practice."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    chunk = 1 << 16
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size - chunk), *[size * i // 16 for i in range(16)]}):
            f.seek(offset)
            h.update(f.read(chunk))
    return "sampled-sha256:" + h.hexdigest()[:32]


def _fingerprint_tensors(tensors: TensorDict) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:32]


def _fingerprint_outputs(outputs: Dict[str, Column]) -> str:
    """Tensors are hashed whole; files by their sampled fingerprint."""
    files = {k: v for k, v in outputs.items() if isinstance(v, NpyRows)}
    if not files:
        return _fingerprint_tensors(outputs)
    h = hashlib.sha256(_fingerprint_tensors({k: v for k, v in outputs.items() if k not in files}).encode())
    for key in sorted(files):
        h.update(key.encode() + _fingerprint_file(files[key].path).encode())
    return "sampled-sha256:" + h.hexdigest()[:32]


def _column(value, name: str) -> Column:
    """A precomputed output: a tensor or array (held in memory), or a path to a
    .npy file (read a chunk at a time, for outputs larger than memory)."""
    if isinstance(value, (str, os.PathLike)):
        if not str(value).endswith(".npy"):
            raise ValueError(f"{name}={str(value)!r}: expected a path to a .npy file")
        return NpyRows(value)
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, RuntimeError, ValueError):
        raise TypeError(f"{name} has type {type(value).__name__}; expected a tensor, an array or a path to "
                        "a .npy file") from None
    if tensor.dim() == 0:
        raise ValueError(f"{name} is a scalar; expected one row per sample")
    return tensor


def _fingerprint_dataset(dataset) -> str:
    """A dataset has no file to hash: its length, classes and 16 spread samples."""
    h = hashlib.sha256(f"{type(dataset).__name__}:{len(dataset)}:{getattr(dataset, 'classes', None)}".encode())
    for i in np.linspace(0, len(dataset) - 1, num=min(16, len(dataset))).astype(int):
        image, label = dataset[int(i)][:2]
        h.update(np.asarray(image).tobytes() + str(int(label)).encode())
    return "sampled-sha256:" + h.hexdigest()[:32]


def _beton_data(path: Path, description: str) -> _Data:
    if not path.is_file():
        raise FileNotFoundError(f"{description}: {path} does not exist")
    columns = fvdata.read_columns(path)
    try:
        names = fvdata.read_classes(path)
    except FileNotFoundError:
        names = None
    return _Data(description=description, fingerprint=_fingerprint_file(path), beton=path,
                 labels=columns["labels"], identifiers=columns["identifiers"], class_names=names,
                 image_size=int(max(columns["heights"].max(), columns["widths"].max())) if len(columns["heights"]) else None)


def workdir_path(workdir) -> Path:
    return Path(workdir) if workdir is not None else fvdata.cache_dir() / "prune"


def resolve_data(x: DataInput, role: str, workdir: Path, progress: bool) -> _Data:
    """Turns any accepted input into a _Data (writing a beton if needed)."""
    if isinstance(x, (str, os.PathLike)) and Path(x).is_dir():
        x = {name: Path(x) / f"{name}.npy" for name in OUTPUT_NAMES if (Path(x) / f"{name}.npy").is_file()}
        if not x:
            raise ValueError(f"{role}: the folder holds none of {[n + '.npy' for n in OUTPUT_NAMES]}; expected "
                             "precomputed surrogate outputs there")
    if isinstance(x, dict):
        unknown = set(x) - set(OUTPUT_NAMES)
        if unknown or not ({"logits", "features"} & set(x)):
            raise ValueError(f"{role}: precomputed outputs need 'logits' and/or 'features' (and 'labels' for "
                             f"the source); got keys {sorted(x)}")
        outputs = {k: _column(v, f"{role}[{k!r}]") for k, v in x.items()}
        n = {len(v) for v in outputs.values()}
        if len(n) != 1:
            raise ValueError(f"{role}: the outputs have different row counts "
                             f"{ {k: len(v) for k, v in outputs.items()} }")
        labels = outputs.pop("labels", None)
        if isinstance(labels, NpyRows):
            labels = torch.from_numpy(labels.load())
        if labels is not None:
            labels = labels.long()
            outputs["labels"] = labels
        return _Data(description=f"{role}: precomputed {sorted(outputs)}", fingerprint=_fingerprint_outputs(outputs),
                     outputs=outputs, labels=None if labels is None else labels.numpy(),
                     identifiers=np.arange(n.pop()))
    if isinstance(x, (str, os.PathLike)):
        text = str(x)
        if text.endswith(".beton") or Path(text).is_file():
            return _beton_data(Path(text), f"{role}: {text}")
        name, _, split = text.partition(":")
        if name not in fvdata.names():
            raise ValueError(f"{role}={text!r} is neither an existing .beton file nor a registry dataset; "
                             f"expected a path or one of {fvdata.names()} (optionally 'name:split')")
        split = split or "train"
        lacking = fvdata.missing(name)
        if lacking:
            raise RuntimeError(f"{role}={text!r}: dataset {name!r} is not installed here; {lacking}")
        path = workdir / "betons" / f"{name}-{split}.beton"
        if not path.is_file():
            fvdata.write_offline(name, split, path, progress=progress)
        return _beton_data(path, f"{role}: registry {name}:{split}")
    if hasattr(x, "__getitem__") and hasattr(x, "__len__"):
        fp = _fingerprint_dataset(x)
        path = workdir / "betons" / f"dataset-{fp.split(':')[1][:16]}.beton"
        if not path.is_file():
            fvdata.write_beton(x, path, progress=progress)
        data = _beton_data(path, f"{role}: {type(x).__name__} of {len(x)} samples")
        data.fingerprint = fp
        return data
    raise TypeError(f"{role} has type {type(x).__name__}; expected a .beton path, a registry name, a "
                    "map-style Dataset, a dict of precomputed outputs or a folder of them")


# --------------------------------------------------------------------------
# Views: surrogate outputs as streams of batches (what the methods read)
# --------------------------------------------------------------------------

class _KeepThreads:
    """An FFCV loader that leaves torch's thread count as the caller set it
    (ffcv sets it to its worker count at the start of every pass)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        threads = torch.get_num_threads()
        batches = iter(self.loader)
        torch.set_num_threads(threads)
        return batches


class _SourceRows:
    """What both views share for the sample-wise baselines: stream rows,
    fingerprints and the score cache folder (see fastvote.methods.View)."""

    data: _Data
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


class _TensorView(_SourceRows):
    def __init__(self, data: _Data, batch_size: int, num_classes: Optional[int], class_names, *,
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


class _ModelView(_SourceRows):
    """Runs the surrogate over a beton (eval pipeline, file order). With a
    cache folder the first complete pass is kept on disk as .npy files, so
    later passes (K-means) read features in chunks instead of recomputing.

    For the sample-wise baselines it also gives whole columns (``array``,
    cached under workdir/features), the source images (``samples``) and
    training runs from scratch (``train_run``, models cached under
    workdir/runs; the recipe is `train_config`, default TrainConfig())."""

    def __init__(self, data: _Data, model, prep: dict, *, batch_size: int, device, progress: bool,
                 num_classes: Optional[int], class_names, cache: Optional[Path] = None,
                 workdir: Optional[Path] = None, surrogate_fingerprint: Optional[str] = None, train_config=None):
        self.data, self.model, self.prep = data, model, prep
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

    def _compute(self, want: Sequence[str], rows: range, shard: bool) -> Iterator[TensorDict]:
        """Runs the surrogate over `rows`; with a cache folder a complete pass is kept."""
        from fastvote.features import iterate_outputs

        if len(rows) == 0:
            return
        positions = None if len(rows) == self.data.num_rows else self.data.identifiers[rows.start:rows.stop]
        loader = _KeepThreads(fvdata.eval_loader(self.data.beton, self.batch_size, resolution=self.prep["resolution"],
                                                 mean=self.prep["mean"], std=self.prep["std"], indices=positions))
        outputs = [w for w in want if w != "labels"]
        files = self._cache_files(want, shard) if self.cache is not None else {}
        writers: Dict[str, NpyWriter] = {}
        try:
            for batch in iterate_outputs(self.model, loader, device=self.device, want=tuple(outputs),
                                         progress=self.progress, desc=self.data.description):
                out = {w: batch[w] for w in want}
                for w, t in out.items():
                    if files and w not in writers:
                        writers[w] = NpyWriter(files[w], (len(rows), *t.shape[1:]), t.cpu().numpy().dtype)
                    if w in writers:
                        writers[w].write(t.cpu().numpy())
                yield out
            for writer in writers.values():  # a complete pass: publish the cache
                writer.close()
        finally:  # an abandoned or failed pass leaves no cache file
            for writer in writers.values():
                writer.abort()

    # ---- for the sample-wise baselines (fastvote.methods.View) -------------
    def array(self, output: str) -> np.ndarray:
        """The whole `output` column [N, ...] in stream order: one pass, kept
        on disk (memory-mapped) when there is a workdir."""
        if self.cache is None and self.workdir is not None and self.surrogate_fingerprint:
            self.cache = self.workdir / "features" / (
                f"{self.data.fingerprint.split(':')[1]}-{self.surrogate_fingerprint.split(':')[1]}")
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
                std=self.prep["std"], with_identifier=True, device=self.device)
        for images, labels, identifiers in _KeepThreads(loaders[batch_size]):
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


# --------------------------------------------------------------------------
# The surrogate
# --------------------------------------------------------------------------

def _surrogate(surrogate, source: _Data, *, arch: str, train_config, image_size: Optional[int],
               mean, std, device, workdir: Path, seed: int, progress: bool):
    """Returns (model, preprocessing dict, manifest entry)."""
    from fastvote import models

    if isinstance(surrogate, torch.nn.Module):
        model = models.as_classifier(surrogate)
        prep = {}
        entry = {"kind": "module", "class": type(surrogate).__name__,
                 "fingerprint": _fingerprint_tensors(dict(model.state_dict()))}
    elif isinstance(surrogate, (str, os.PathLike)):
        path = Path(surrogate)
        model, extra = models.load_model(path, with_extra=True)
        prep = {k: extra[k] for k in ("resolution", "mean", "std") if k in extra}
        entry = {"kind": "checkpoint", "path": str(path), "fingerprint": _fingerprint_file(path)}
    elif surrogate is None:
        if source.beton is None or source.labels is None:
            raise ValueError("surrogate=None trains one on the source, which needs a labelled source "
                             "dataset (not precomputed outputs); pass surrogate=<checkpoint or nn.Module>")
        model, prep, entry = _train_surrogate(source, arch=arch, train_config=train_config,
                                              image_size=image_size, mean=mean, std=std, device=device,
                                              workdir=workdir, seed=seed, progress=progress)
    else:
        raise TypeError(f"surrogate has type {type(surrogate).__name__}; expected None (train one), "
                        "a checkpoint path or an nn.Module")
    # Explicit arguments win, then the checkpoint's, then the source's own.
    prep["resolution"] = image_size or prep.get("resolution") or source.image_size
    if source.beton is None and (prep["resolution"] is None or (mean is None and "mean" not in prep)):
        raise ValueError("the source is precomputed, so the surrogate's preprocessing cannot be read off it: "
                         "pass image_size=, mean= and std= (or a checkpoint that records them)")
    if mean is not None or "mean" not in prep:
        stats = (mean, std) if mean is not None else fvdata.channel_stats(source.beton)
        prep["mean"], prep["std"] = list(stats[0]), list(stats[1] if std is None else std)
    return model.to(device).eval(), prep, entry


def _train_surrogate(source: _Data, *, arch, train_config, image_size, mean, std, device, workdir,
                     seed, progress):
    from fastvote import models, train

    config = train_config or train.TrainConfig(seed=seed)
    resolution = image_size or source.image_size
    if mean is None:
        mean, std = fvdata.channel_stats(source.beton)
    prep = {"resolution": resolution, "mean": list(mean), "std": list(std)}
    key = hashlib.sha256(json.dumps([source.fingerprint, arch, prep, repr(config)]).encode()).hexdigest()[:16]
    path = workdir / "surrogates" / f"{arch}-{key}.pt"
    started = time.perf_counter()
    cached = distributed.broadcast_object(path.is_file())  # rank 0's cache decides for every rank
    if cached:
        model = models.load_model(path) if distributed.is_main() else models.build_model(
            arch, source.num_classes, image_size=resolution)
        models.load_state_dict_flexible(model, distributed.broadcast_object(
            models.unwrap_model(model).state_dict() if distributed.is_main() else None))
    else:
        model = models.build_model(arch, source.num_classes, image_size=resolution)
        # under torchrun: DDP, each rank reading its shard of every epoch
        loader = fvdata.train_loader(source.beton, config.batch_size, resolution=resolution, mean=mean,
                                     std=std, seed=seed, flip=False, distributed=distributed.active(),
                                     **fvdata.default_crop(resolution))
        train.train_classifier(model, loader, config, device=device, progress=progress,
                               checkpoint_dir=workdir / "surrogates" / f"{arch}-{key}-ckpt")
        if distributed.is_main():
            models.save_checkpoint(path, model, **prep)
    entry = distributed.broadcast_object(
        {"kind": "trained", "arch": arch, "path": str(path), "fingerprint": _fingerprint_file(path),
         "config": repr(config), "reused_from_cache": cached,
         "seconds": time.perf_counter() - started} if distributed.is_main() else None)
    return model, prep, entry


# --------------------------------------------------------------------------
# prune()
# --------------------------------------------------------------------------

def prune(source: DataInput, target: Union[DataInput, Sequence[DataInput]], method: str = "lm",
          ratio: Optional[float] = None, *, keep: Optional[int] = None, surrogate=None, k: int = 1,
          metric: str = "l2", weight: str = "count", temperature: float = 1.0, reverse: bool = False,
          centroids: str = "class", num_clusters: Optional[int] = None, normalize_targets: bool = False,
          arch: str = DEFAULT_ARCH, train_config=None, image_size: Optional[int] = None,
          mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
          device: Union[str, torch.device, None] = None, batch_size: int = 256, seed: int = 0,
          workdir: Union[str, os.PathLike, None] = None, progress: bool = True) -> PruneResult:
    """Prunes the source for the target(s) by LM or FM voting (SPEC.md).

    Args:
        source, target: see the module docstring; `target` may be a list
            (multi-task: votes are summed; normalize_targets=True weighs each
            target equally).
        method: "lm" or "fm", or a baseline (fastvote.methods.METHODS:
            "random", "random-sample", "moderate", "grand", "el2n",
            "forgetting", "ccs", "ssp"), optionally with its own options as
            "name:key=value,..." (e.g. "ssp:keep_hard=false").
        ratio: the fraction of source classes REMOVED, 0 <= ratio < 1 — for the
            sample-wise baselines (all but lm, fm, random) the fraction of
            source SAMPLES removed; or
        keep: the number of classes (sample-wise: samples) kept (give exactly one).
        surrogate: None (train `arch` on the source with `train_config`), a
            checkpoint path (fastvote.models.save_checkpoint) or an nn.Module.
            GraNd, EL2N, forgetting and CCS train fresh models of its
            architecture with `train_config` (default TrainConfig()).
        k, weight, temperature: each target sample votes for its k best classes
            with weight "count" (the paper), "rank" or "soft".
        metric: FM distance, "l2" (the paper) or "cosine".
        reverse: keep the LEAST voted classes (the paper's ablation).
        centroids: FM class means ("class") or label-free K-means clusters of
            the source features ("kmeans", `num_clusters` defaulting to the
            number of source classes); then the kept samples are cluster members.
        image_size, mean, std: the surrogate's preprocessing (defaults: the
            checkpoint's, else the source's image size and channel statistics).
        device: where the surrogate and the ops run (default: cuda if available).
        workdir: cache of betons, surrogates and features (default $FASTVOTE_CACHE).
    Returns:
        PruneResult.
    """
    started = time.perf_counter()
    module = methods.get(method)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    distributed.init_from_env(device)  # under torchrun: join the group (NCCL on GPUs, gloo on CPUs)
    device = distributed.local_device(device)
    progress = progress and distributed.is_main()  # one set of progress bars
    workdir = workdir_path(workdir)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid; expected >= 1")
    targets_in = list(target) if isinstance(target, (list, tuple)) else [target]
    if not targets_in:
        raise ValueError("target is an empty list; expected at least one target dataset")

    with distributed.main_first():  # rank 0 writes the cached betons, the others then read them
        src = resolve_data(source, "source", workdir, progress)
        tgts = [resolve_data(t, f"target {i}" if len(targets_in) > 1 else "target", workdir, progress)
                for i, t in enumerate(targets_in)]
    for data in [src, *tgts]:
        if data.num_rows < distributed.world_size():  # every rank reads a non-empty shard
            raise ValueError(f"{data.description} has {data.num_rows} samples; expected at least one"
                             + (f" a process ({distributed.world_size()} under torchrun)" if distributed.active() else ""))
    label_free = method.partition(":")[0] == "fm" and centroids == "kmeans"
    if src.labels is None and not label_free:
        raise ValueError(f"method={method!r} needs source labels; give 'labels' with the precomputed source "
                         "outputs, or use method='fm', centroids='kmeans' (label-free)")

    needs_model = ((src.outputs is None and bool(module.NEEDS["source"]))
                   or (bool(module.NEEDS["target"]) and any(t.outputs is None for t in tgts)))
    model, prep, surrogate_entry = None, {}, None
    t0 = time.perf_counter()
    if needs_model:
        model, prep, surrogate_entry = _surrogate(
            surrogate, src, arch=arch, train_config=train_config, image_size=image_size, mean=mean,
            std=std, device=device, workdir=workdir, seed=seed, progress=progress)
    surrogate_seconds = time.perf_counter() - t0
    if model is not None and src.num_classes and model.num_classes != src.num_classes and "logits" in module.NEEDS["target"]:
        raise ValueError(f"the surrogate's head has {model.num_classes} outputs but the source has "
                         f"{src.num_classes} classes; LM needs a surrogate trained on this source's classes")

    num_classes = src.num_classes
    if label_free:
        num_clusters = num_clusters or num_classes
        if not num_clusters:
            raise ValueError("centroids='kmeans' on an unlabelled source needs num_clusters=")
        group_names = [f"cluster {j}" for j in range(num_clusters)]
    else:
        group_names = src.class_names or [str(j) for j in range(num_classes)]
    # Class-wise methods keep classes (ratio: fraction of classes removed);
    # sample-wise baselines keep samples (ratio: fraction of SAMPLES removed).
    if module.CLASS_WISE:
        n_keep, n_total = keep_count(len(group_names), ratio=ratio, keep=keep), len(group_names)
    else:
        n_keep, n_total = methods.base.sample_keep_count(src.num_rows, ratio=ratio, keep=keep), src.num_rows

    def view(data: _Data, cache: Optional[Path] = None):
        if data.outputs is not None:
            return _TensorView(data, PRECOMPUTED_BATCH, num_classes, src.class_names, device=device, workdir=workdir)
        return _ModelView(data, model, prep, batch_size=batch_size, device=device, progress=progress,
                          num_classes=num_classes, class_names=src.class_names, cache=cache, workdir=workdir,
                          surrogate_fingerprint=surrogate_entry["fingerprint"] if surrogate_entry else None,
                          train_config=train_config)

    feature_cache = None
    if label_free and src.outputs is None:  # K-means reads the source several times
        feature_cache = workdir / "features" / f"{src.fingerprint.split(':')[1]}-{surrogate_entry['fingerprint'].split(':')[1]}"
    t0 = time.perf_counter()
    selection = module.select(view(src, feature_cache), [view(t) for t in tgts], keep=n_keep, k=k,
                              metric=metric, weight=weight, temperature=temperature, centroids=centroids,
                              num_clusters=num_clusters, reverse=reverse, normalize_targets=normalize_targets,
                              seed=seed, device=device, progress=progress)
    prune_seconds = time.perf_counter() - t0
    # Stream rows -> source positions (a beton may hold its samples in any order).
    indices = torch.from_numpy(np.sort(src.identifiers[selection.indices.numpy()]))
    kept_classes, scores = selection.kept_classes, selection.scores
    if not module.CLASS_WISE:  # per class: the classes still present, the mean sample score
        kept_rows = selection.indices.numpy()
        labels = np.asarray(src.labels, dtype=np.int64)
        kept_per_class = np.bincount(labels[kept_rows], minlength=len(group_names))
        kept_classes = torch.from_numpy(np.flatnonzero(kept_per_class).astype(np.int64))
        sums = np.bincount(labels, weights=selection.scores.double().numpy(), minlength=len(group_names))
        scores = torch.from_numpy(sums / np.maximum(np.bincount(labels, minlength=len(group_names)), 1))
        selection.info = dict(selection.info, kept_per_class=kept_per_class.tolist(),
                              class_scores="mean per-sample score of each class (all its samples)")

    arguments = dict(ratio=ratio, keep=keep, k=k, metric=metric, weight=weight, temperature=temperature,
                     reverse=reverse, centroids=centroids, num_clusters=num_clusters,
                     normalize_targets=normalize_targets, arch=arch, batch_size=batch_size, seed=seed)
    manifest = {
        "arguments": arguments,
        "ratio_meaning": ("fraction of source classes removed" if module.CLASS_WISE
                          else "fraction of source samples removed"),
        "source": {"description": src.description, "fingerprint": src.fingerprint,
                   "beton": str(src.beton) if src.beton else None, "num_samples": src.num_rows,
                   "num_classes": len(group_names)},
        "targets": [{"description": t.description, "fingerprint": t.fingerprint,
                     "beton": str(t.beton) if t.beton else None, "num_samples": t.num_rows} for t in tgts],
        "surrogate": surrogate_entry,
        "preprocessing": prep,
        "selection": selection.info,
        "versions": {"fastvote": fastvote.__version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version(), "compiled_ops": fastvote.ops.HAS_EXTENSION},
        "device": str(device),
        "seconds": {"surrogate": surrogate_seconds, "prune": prune_seconds,
                    "total": time.perf_counter() - started},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return PruneResult(method=method, kept_classes=kept_classes, indices=indices,
                       votes=selection.votes, scores=scores, class_names=group_names,
                       ratio=1.0 - n_keep / n_total, manifest=manifest)
