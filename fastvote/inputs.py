"""Resolving and validating what a user passes as a source or target, before
anything expensive runs.

Accepted inputs: a ``.beton`` path, a registry name (``"haystack"``,
``"digits:train"``; fastvote.data.names()), a map-style Dataset of (image,
label), or precomputed surrogate outputs: a dict ``{"logits": [N, K],
"features": [N, D], "labels": [N]}`` (labels for the source only) or a folder
of ``logits.npy`` / ``features.npy`` / ``labels.npy``. Precomputed outputs may
say which surrogate made them (``"surrogate": "<fingerprint>"`` in the dict,
``surrogate.json`` in the folder), so they can be mixed with inputs the
surrogate runs over.

Everything here is cheap except writing a beton for a registry dataset or a
Dataset (once; cached in the workdir).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from torch import Tensor

from fastvote import data as fvdata
from fastvote.data.npy import NpyRows

Column = Union[Tensor, NpyRows]  # in memory, or a .npy file read a chunk at a time
OUTPUT_NAMES = ("logits", "features", "labels")  # precomputed surrogate outputs
MAX_CLASSES = 1 << 24  # ids above this are a mistake (a vote histogram of 16M classes is 128 MB)


@dataclass
class Input:
    """One resolved dataset input: a beton on disk, or precomputed outputs."""

    description: str
    fingerprint: str
    beton: Optional[Path] = None
    outputs: Optional[Dict[str, Column]] = None  # precomputed surrogate outputs
    labels: Optional[np.ndarray] = None        # int64 [N], file (stream) order
    identifiers: Optional[np.ndarray] = None   # source position of each stream row
    class_names: Optional[List[str]] = None
    image_size: Optional[int] = None
    surrogate: Optional[str] = None            # fingerprint of the surrogate that made `outputs`

    @property
    def num_rows(self) -> int:
        return len(self.identifiers)

    @property
    def num_classes(self) -> Optional[int]:
        if self.class_names is not None:
            return len(self.class_names)
        return None if self.labels is None or len(self.labels) == 0 else int(self.labels.max()) + 1

    def width(self, output: str) -> Optional[int]:
        """The second dimension of a precomputed output (None if absent)."""
        if self.outputs is None or output not in self.outputs:
            return None
        column = self.outputs[output]
        return int(column.shape[1]) if len(column.shape) > 1 else None


# --------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------

def fingerprint_file(path: Path) -> str:
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


def fingerprint_tensors(tensors: Dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: BN counters
    return "sha256:" + h.hexdigest()[:32]


def _fingerprint_outputs(outputs: Dict[str, Column]) -> str:
    """Tensors are hashed whole; files by their sampled fingerprint."""
    files = {k: v for k, v in outputs.items() if isinstance(v, NpyRows)}
    if not files:
        return fingerprint_tensors(outputs)
    h = hashlib.sha256(fingerprint_tensors({k: v for k, v in outputs.items() if k not in files}).encode())
    for key in sorted(files):
        h.update(key.encode() + fingerprint_file(files[key].path).encode())
    return "sampled-sha256:" + h.hexdigest()[:32]


def _fingerprint_dataset(dataset, image_key: str, label_key: str) -> str:
    """A dataset has no file to hash: its length, classes and 16 spread
    samples (as fastvote.data.sample_of reads them: any item shape it takes)."""
    classes = fvdata.dataset_classes(dataset, label_key)
    h = hashlib.sha256(f"{type(dataset).__name__}:{len(dataset)}:{classes}".encode())
    for i in np.linspace(0, len(dataset) - 1, num=min(16, len(dataset))).astype(int):
        image, label = fvdata.sample_of(dataset[int(i)], image_key=image_key, label_key=label_key)
        h.update(image.tobytes() + str(label).encode())
    return "sampled-sha256:" + h.hexdigest()[:32]


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

def check_labels(labels, role: str, num_classes: Optional[int] = None) -> np.ndarray:
    """`labels` as int64 [N], or ValueError: 1-D, integer dtype, ids in
    [0, num_classes) (or below MAX_CLASSES when the classes are not named).
    Column vectors, floats and negative ids are refused, not coerced: each
    was a silent wrong answer once (doubled indices, truncation, dropped rows)."""
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{role} labels have shape {list(array.shape)}; expected 1-D [N] class ids"
                         + (" (pass labels.reshape(-1))" if array.ndim == 2 and 1 in array.shape else ""))
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{role} labels have dtype {array.dtype}; expected integer class ids (int64)")
    if len(array):
        low, high = int(array.min()), int(array.max())
        limit = num_classes if num_classes is not None else MAX_CLASSES
        if low < 0 or high >= limit:
            bad = low if low < 0 else high
            raise ValueError(f"{role} labels hold the class id {bad}; expected ids 0 <= id < {limit}"
                             + (" (the number of class names)" if num_classes is not None else
                                " (relabel with np.unique(labels, return_inverse=True))"))
    return array.astype(np.int64, copy=False)


def _column(value, name: str) -> Column:
    """A precomputed output: a tensor or array (held in memory), or a path to a
    .npy file (read a chunk at a time, for outputs larger than memory)."""
    if isinstance(value, (str, os.PathLike)):
        if not str(value).endswith(".npy"):
            raise ValueError(f"{name}={str(value)!r}: expected a path to a .npy file")
        return NpyRows(value)
    if isinstance(value, np.ndarray) and not value.flags.writeable:  # a read-only memmap: torch wants a copy
        value = np.array(value)
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, RuntimeError, ValueError):
        raise TypeError(f"{name} has type {type(value).__name__}; expected a tensor, an array or a path to "
                        "a .npy file") from None
    if tensor.dim() == 0:
        raise ValueError(f"{name} is a scalar; expected one row per sample")
    return tensor


def _check_columns(outputs: Dict[str, Column], role: str) -> None:
    for name in ("logits", "features"):
        column = outputs.get(name)
        if column is None:
            continue
        shape = tuple(column.shape)
        if len(shape) != 2 or shape[1] < 1:
            width = "K" if name == "logits" else "D"
            raise ValueError(f"{role}[{name!r}] has shape {list(shape)}; expected [N, {width}]")
        dtype = column.dtype if isinstance(column, Tensor) else torch.from_numpy(np.empty(0, column.dtype)).dtype
        if not dtype.is_floating_point:
            raise ValueError(f"{role}[{name!r}] has dtype {dtype}; expected floating point")


# --------------------------------------------------------------------------
# Resolving
# --------------------------------------------------------------------------

def _beton_input(path: Path, description: str) -> Input:
    if not path.is_file():
        raise FileNotFoundError(f"{description}: {path} does not exist")
    columns = fvdata.read_columns(path)
    try:
        names = fvdata.read_classes(path)
    except FileNotFoundError:
        names = None
    labels = check_labels(columns["labels"], description, len(names) if names is not None else None)
    return Input(description=description, fingerprint=fingerprint_file(path), beton=path.resolve(),
                 labels=labels, identifiers=columns["identifiers"], class_names=names,
                 image_size=int(max(columns["heights"].max(), columns["widths"].max()))
                 if len(columns["heights"]) else None)


def class_names_of(names, role: str) -> Optional[List[str]]:
    """A list of names, or "imagenet": the 1000 ImageNet-1K names torchvision ships (in class-id order)."""
    if names is None:
        return None
    if isinstance(names, str):
        if names.lower() != "imagenet":
            raise ValueError(f"{role}: class_names={names!r}; expected a list of names or 'imagenet'")
        from torchvision.models._meta import _IMAGENET_CATEGORIES

        return list(_IMAGENET_CATEGORIES)
    names = [str(n) for n in names]
    if not names:
        raise ValueError(f"{role}: class_names is empty; expected one name a class")
    return names


def _outputs_input(x: dict, role: str) -> Input:
    """Precomputed outputs, or a source given by its labels alone (LM needs no
    source images: the surrogate runs over the targets only)."""
    unknown = set(x) - set(OUTPUT_NAMES) - {"surrogate", "class_names"}
    if unknown or not ({"logits", "features", "labels"} & set(x)):
        raise ValueError(f"{role}: precomputed outputs need 'logits' and/or 'features' (and 'labels' for the "
                         "source; or 'labels' alone for a labels-only source; optionally 'class_names' and "
                         f"'surrogate'); got keys {sorted(x)}")
    surrogate = x.get("surrogate")
    names = class_names_of(x.get("class_names"), role)
    outputs = {k: _column(v, f"{role}[{k!r}]") for k, v in x.items() if k in OUTPUT_NAMES}
    n = {len(v) for v in outputs.values()}
    if len(n) != 1:
        raise ValueError(f"{role}: the outputs have different row counts {({k: len(v) for k, v in outputs.items()})}")
    _check_columns(outputs, role)
    labels = outputs.pop("labels", None)
    if labels is not None:
        labels = check_labels(labels.load() if isinstance(labels, NpyRows) else labels, role,
                              len(names) if names is not None else None)
        outputs["labels"] = torch.from_numpy(labels)
    what = "labels only" if set(outputs) == {"labels"} else f"precomputed {sorted(outputs)}"
    return Input(description=f"{role}: {what}", fingerprint=_fingerprint_outputs(outputs),
                 outputs=outputs, labels=labels, identifiers=np.arange(n.pop()), class_names=names,
                 surrogate=None if surrogate is None else str(surrogate))


def _folder_outputs(folder: Path, role: str) -> dict:
    x = {name: folder / f"{name}.npy" for name in OUTPUT_NAMES if (folder / f"{name}.npy").is_file()}
    if not x:
        raise ValueError(f"{role}: the folder {folder} holds none of {[n + '.npy' for n in OUTPUT_NAMES]} and no "
                         "class folders; expected precomputed surrogate outputs, or an image folder tree "
                         "(ROOT/<class>/<image>)")
    if (folder / "surrogate.json").is_file():
        x["surrogate"] = json.loads((folder / "surrogate.json").read_text()).get("fingerprint")
    if (folder / "classes.json").is_file():  # a list of names, or {"classes": [...]} as fastvote writes it
        names = json.loads((folder / "classes.json").read_text())
        x["class_names"] = names.get("classes") if isinstance(names, dict) else names
    return x


def _is_image_folder(folder: Path) -> bool:
    """An ImageFolder tree (ROOT/<class>/<image>): class folders and none of
    the precomputed outputs' files."""
    if any((folder / f"{name}.npy").is_file() for name in OUTPUT_NAMES):
        return False
    return any(entry.is_dir() and not entry.name.startswith(".") for entry in folder.iterdir())


def _fingerprint_image_folder(root: Path) -> str:
    """Every folder's and file's relative path, and each file's size and
    modification time (a stat each, no image read): an added, removed or
    rewritten image, or a new (even empty) class folder, changes it."""
    h = hashlib.sha256(b"image-folder")
    for folder, subfolders, files in os.walk(root, followlinks=True):  # as torchvision's ImageFolder walks
        subfolders.sort()
        h.update(f"{os.path.relpath(folder, root)}/\n".encode())
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            h.update(f"{os.path.relpath(os.path.join(folder, name), root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                     .encode())
    return "stat-sha256:" + h.hexdigest()[:32]


def _image_folder_input(root: Path, role: str, workdir: Path, progress: bool) -> Input:
    """An image folder is written once to a beton in the workdir, as
    `fastvote data write --image-folder` writes it (JPEG quality 90, long
    side <= 512 px), and read from there by every later run."""
    fp = _fingerprint_image_folder(root)
    path = workdir / "betons" / f"folder-{fp.split(':')[1][:16]}.beton"
    if not path.is_file():
        if progress:
            print(f"[fastvote] {role}: writing the image folder {root} to {path} once (later runs read it)",
                  flush=True)
        fvdata.write_image_folder(root, path, jpeg=True, max_resolution=fvdata.IMAGE_FOLDER_MAX_SIDE,
                                  progress=progress)
    data = _beton_input(path, f"{role}: image folder {root}")
    data.fingerprint = fp
    return data


def workdir_path(workdir) -> Path:
    return Path(workdir) if workdir is not None else fvdata.cache_dir() / "prune"


def resolve(x, role: str, workdir: Path, progress: bool, *, image_key: str = "image",
            label_key: str = "label") -> Input:
    """Turns any accepted input into an Input (writing a beton if needed).
    image_key, label_key: the columns of dict items (Hugging Face datasets)."""
    if isinstance(x, (str, os.PathLike)) and Path(x).is_dir():
        if _is_image_folder(Path(x)):
            return _image_folder_input(Path(x), role, workdir, progress)
        x = _folder_outputs(Path(x), role)
    if isinstance(x, dict):
        return _outputs_input(x, role)
    if isinstance(x, (str, os.PathLike)):
        text = str(x)
        if text.endswith(".beton") or Path(text).is_file():
            return _beton_input(Path(text), f"{role}: {text}")
        name, _, split = text.partition(":")
        if name not in fvdata.names():
            raise ValueError(f"{role}={text!r} is neither an existing .beton file nor a registry dataset; "
                             f"expected a path or one of {fvdata.names()} (optionally 'name:split')")
        split = split or "train"
        lacking = fvdata.missing(name)
        if lacking:
            raise FileNotFoundError(f"{role}={text!r}: dataset {name!r} is not installed here; {lacking}")
        path = workdir / "betons" / f"{name}-{split}.beton"
        if not path.is_file():
            fvdata.write_offline(name, split, path, progress=progress)
        return _beton_input(path, f"{role}: registry {name}:{split}")
    if hasattr(x, "__getitem__") and hasattr(x, "__len__"):
        if len(x) == 0:
            raise ValueError(f"{role} is an empty {type(x).__name__}; expected at least one sample")
        fp = _fingerprint_dataset(x, image_key, label_key)
        path = workdir / "betons" / f"dataset-{fp.split(':')[1][:16]}.beton"
        if not path.is_file():
            fvdata.write_beton(x, path, image_key=image_key, label_key=label_key, progress=progress)
        data = _beton_input(path, f"{role}: {type(x).__name__} of {len(x)} samples")
        data.fingerprint = fp
        return data
    raise TypeError(f"{role} has type {type(x).__name__}; expected a .beton path, a registry name, a map-style "
                    "Dataset (torchvision, Hugging Face, a list of (image, label)), a dict of precomputed outputs "
                    "or a folder of them")
