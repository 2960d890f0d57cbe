"""Write FFCV ``.beton`` files: fields ``image`` (RGB), ``label`` (int), ``identifier``
(int, the sample's position in the source dataset), and the class names in a sidecar
``<file>.classes.json`` (e.g. ``haystack.beton.classes.json``).

Any dataset item ``sample_of`` accepts can be written: (image, label) tuples, Hugging Face
dicts, PIL images of any mode, uint8 arrays and tensors, ToTensor's floats; all become RGB.
ImageNet's 1000 WordNet-id folders get readable class names (the ids are kept too).

Images are stored raw by default, so a round trip is bit exact; ``jpeg=True`` trades
that for size (mean error ~1/255). The same input gives the same bytes, whatever
``num_workers`` (so a file's fingerprint can key a cache). Both files appear whole or
not at all: they are written under temporary names in the target folder
(``fastvote.atomic``) and renamed when complete (the beton first, then its sidecar).
Readers raise a ValueError naming a file that is not a whole beton.

Betons are FFCV 1.0.2's format, written and read by ``format`` with numpy alone, so
writing and reading need no FFCV (``pip install ffcv==1.0.2``, which builds against the
apt packages pkg-config, libopencv-dev and libturbojpeg0-dev); FFCV's loaders read them.
Resizing and JPEG use cv2 where it is installed (FFCV's bytes), PIL otherwise.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import shutil
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .. import chunks
from .. import progress as bars
from ..atomic import atomic_path, remove_stale
from . import format as beton_format
from .registry import get

FFCV_INSTALL = ("pip install ffcv==1.0.2 (it builds from source and needs "
                "apt-get install -y pkg-config libopencv-dev libturbojpeg0-dev)")
JPEG_QUALITY = 90
IMAGE_FOLDER_MAX_SIDE = 512  # px: photos are stored as ffcv-imagenet's ResNet-50 betons, long side <= 512
CHUNK = 100              # samples handed to a reading process at a time
FIELDS = ("image", "label", "identifier")


def require_ffcv():
    """Import ffcv, or raise an ImportError that says how to install it."""
    try:
        import ffcv
    except ImportError as e:
        raise ImportError(f"this needs FFCV, which is not installed: {FFCV_INSTALL}") from e
    return ffcv


def default_workers() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def classes_path(path: str | os.PathLike) -> Path:
    """The sidecar JSON that holds the class names of the beton at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".classes.json")


def read_classes(path: str | os.PathLike) -> list[str] | None:
    """Class names of the beton at ``path`` (None if it was written without names);
    readable names for ImageNet's WordNet ids (see ``read_wnids``)."""
    with open(classes_path(path)) as f:
        return json.load(f)["classes"]


def read_wnids(path: str | os.PathLike) -> list[str] | None:
    """The WordNet ids of a beton whose classes are ImageNet's 1000, in label order, else None."""
    with open(classes_path(path)) as f:
        return json.load(f).get("wnids")


WNID = re.compile(r"n\d{8}")


def _imagenet_names() -> list[str] | None:
    """ImageNet's readable class names in sorted-wnid (label) order, from torchvision."""
    try:
        from torchvision.models._meta import _IMAGENET_CATEGORIES  # private: it may move
    except ImportError:
        return None
    return list(_IMAGENET_CATEGORIES) if len(_IMAGENET_CATEGORIES) == 1000 else None


def _sidecar(classes: Sequence[str] | None, num_samples: int) -> dict:
    """The sidecar's record. Exactly 1000 sorted WordNet ids are ImageNet's folders (its
    label order): store the names people read, and the ids, which name the synsets."""
    if classes is None:
        return {"classes": None, "num_samples": num_samples}
    classes = list(classes)
    if (len(classes) == 1000 and all(isinstance(c, str) and WNID.fullmatch(c) for c in classes)
            and classes == sorted(set(classes))):
        return {"classes": _imagenet_names() or classes, "wnids": classes,
                "num_samples": num_samples}
    return {"classes": classes, "num_samples": num_samples}


def dataset_classes(dataset, label_key: str = "label") -> list | None:
    """Class names a dataset carries: a Hugging Face ClassLabel's ``names``
    (``dataset.features[label_key]``), else ``dataset.classes`` (torchvision), else None."""
    features = getattr(dataset, "features", None)
    feature = features.get(label_key) if isinstance(features, Mapping) else None
    names = getattr(feature, "names", None)
    names = names if names is not None else getattr(dataset, "classes", None)
    return None if names is None else list(names)


ACCEPTED = ("accepted items: (image, label, ...) tuples or lists, or dicts {image_key: image, "
            "label_key: label} (Hugging Face); images: PIL (any mode), uint8 arrays or tensors "
            "(H, W), (H, W, 1|3|4) or (1|3, H, W), float arrays or tensors (1|3, H, W) in 0..1 "
            "(ToTensor's output); labels: non-negative integers (int, numpy or torch integer "
            "scalars)")


def _describe(x: Any) -> str:
    """A value's type for messages, with its dtype and shape where it has them."""
    kind = f"{type(x).__module__}.{type(x).__name__}".removeprefix("builtins.")
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        kind += f" {x.dtype} {tuple(x.shape)}"
    return kind


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I;16"):  # 16-bit grayscale (PNG, TIFF): convert("RGB") clips at 255
        return to_rgb(np.round(np.asarray(image) / 257).astype(np.uint8))
    if image.mode in ("I", "F"):  # 32-bit int / float: the scale is unknown, so 0..255 or an error
        array = np.asarray(image)
        if not (array.min() >= 0 and array.max() <= 255):
            raise ValueError(f"image: a PIL {image.mode!r} image with values {array.min()}.."
                             f"{array.max()}; expected 0..255, or convert it to 8 bits first")
        return to_rgb(np.round(array).astype(np.uint8))
    return np.asarray(image.convert("RGB"))  # L, P, RGBA (alpha dropped), CMYK, ...


def to_rgb(image: Any) -> np.ndarray:
    """One image as ``sample_of`` accepts it -> uint8 (H, W, 3) contiguous, or a
    TypeError naming its type and what is accepted."""
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    given = _describe(image)
    tensor = isinstance(image, torch.Tensor)
    if tensor:
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    elif not isinstance(image, np.ndarray):
        raise TypeError(f"image of type {given} is not accepted; {ACCEPTED}")
    shape = image.shape
    # (C, H, W) when the first axis can be channels and the last cannot; where both can
    # (a 3x3x3 image), torch's convention (torchvision) for tensors, numpy's (H, W, C) else.
    first = image.ndim == 3 and shape[0] in (1, 3) and (tensor or shape[2] not in (1, 3, 4))
    if np.issubdtype(image.dtype, np.floating) and first:  # ToTensor's output
        if not (image.min() >= 0 and image.max() <= 1):  # NaN fails this too
            raise ValueError(f"image: a float {given} with values {image.min():.4g}.."
                             f"{image.max():.4g}; expected 0..1 (ToTensor's scale), not clipped "
                             f"here: undo the normalisation first")
        image = np.round(image * 255).astype(np.uint8)
    elif image.dtype != np.uint8 or not (image.ndim == 2 or first or (
            image.ndim == 3 and shape[2] in (1, 3, 4))):
        raise TypeError(f"image of type {given} is not accepted; {ACCEPTED}")
    if first:
        image = image.transpose(1, 2, 0)
    if image.ndim == 2:
        image = image[:, :, None]
    image = image[:, :, :3]  # RGBA: alpha dropped, as PIL's convert("RGB") does
    return np.ascontiguousarray(np.broadcast_to(image, shape=image.shape[:2] + (3,)))


def _label(label: Any) -> int:
    value = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    integer = value.dtype != np.bool_ and np.issubdtype(value.dtype, np.integer)
    if not (integer and value.size == 1 and value.ndim <= 1 and value.item() >= 0):
        hint = " (Hugging Face marks unlabelled samples -1)" if integer and value.size == 1 else ""
        raise ValueError(f"label {label!r} ({_describe(label)}): expected a non-negative "
                         f"integer class id (int, numpy or torch integer scalar){hint}")
    return int(value.item())


def sample_of(item: Any, *, image_key: str = "image",
              label_key: str = "label") -> tuple[np.ndarray, int]:
    """Any accepted dataset item -> (uint8 (H, W, 3) RGB image, int label).

    Items: (image, label, ...) tuples or lists (torchvision, ``ArrayDataset``), or dicts
    ``{image_key: image, label_key: label}`` (Hugging Face). Images: PIL of any mode
    (16-bit grayscale scaled to 8 bits), uint8 arrays or tensors (H, W), (H, W, 1|3|4) or
    (1|3, H, W), float arrays or tensors (1|3, H, W) in 0..1 (after ToTensor). Grayscale
    is replicated to 3 channels, alpha dropped. A label is a non-negative integer.

    Raises a TypeError naming the item's (and image's) type and what is accepted; a
    ValueError for a float image outside 0..1 or a label that is no class id.
    """
    if isinstance(item, Mapping):
        if image_key not in item or label_key not in item:
            raise TypeError(f"dataset item of type {_describe(item)} has keys "
                            f"{sorted(map(str, item))}, lacking image_key={image_key!r} or "
                            f"label_key={label_key!r} (pass the right ones); {ACCEPTED}")
        image, label = item[image_key], item[label_key]
    elif isinstance(item, (tuple, list)) and len(item) >= 2:
        image, label = item[:2]
    else:
        raise TypeError(f"dataset item of type {_describe(item)} is not accepted; {ACCEPTED}")
    try:
        rgb = to_rgb(image)
    except TypeError as e:
        raise TypeError(f"dataset item of type {_describe(item)}: {e}") from None
    return rgb, _label(label)


class _Samples:
    """What the reading processes produce: ``samples[i]`` -> (mode, height, width, stored
    bytes, label, i), encoded as FFCV's ``image`` field stores it (``format.encode``:
    resize, JPEG), so that all the costly work happens there and the writer only places
    bytes."""

    def __init__(self, dataset, encoding: dict, image_key: str, label_key: str):
        self.dataset = dataset
        self.encoding = encoding
        self.keys = {"image_key": image_key, "label_key": label_key}

    def __getitem__(self, index: int) -> tuple[int, int, int, np.ndarray, int, int]:
        try:
            item = self.dataset[index]
        except ValueError:
            raise  # the dataset's own word on bad input (_ImageFolder's unreadable file)
        except Exception as e:
            raise RuntimeError(f"dataset[{index}] failed: {e!r}") from e
        try:
            image, label = sample_of(item, **self.keys)
        except (TypeError, ValueError) as e:
            raise type(e)(f"dataset[{index}]: {e}") from None
        try:
            mode, height, width, data = beton_format.encode(image, **self.encoding)
        except ValueError as e:
            raise ValueError(f"dataset[{index}]: {e}") from None
        except Exception as e:
            raise RuntimeError(f"dataset[{index}]: encoding its image failed: {e!r}") from e
        return mode, height, width, data, label, int(index)


_READING: _Samples | None = None  # a reading process's samples, inherited through fork


def _start_reading(samples: _Samples) -> None:
    global _READING
    _READING = samples


def _read_chunk(indices: list[int]) -> list:
    return [_READING[i] for i in indices]


def _read_ahead(samples: _Samples, order: np.ndarray, num_workers: int) -> Iterator:
    """``samples[i]`` for ``i`` in ``order``, in that order, read by ``num_workers``
    processes at most two chunks each ahead of the consumer (which may be the slower:
    unbounded read-ahead of a large dataset would fill the memory). A reading process
    that dies is a BrokenProcessPool (a RuntimeError), not a hang."""
    if num_workers == 1:
        yield from map(samples.__getitem__, order.tolist())
        return
    chunks = (order[start:start + CHUNK].tolist() for start in range(0, len(order), CHUNK))
    # fork: the dataset reaches the readers without being pickled
    with ProcessPoolExecutor(num_workers, mp_context=mp.get_context("fork"),
                             initializer=_start_reading, initargs=(samples,)) as pool:
        ahead = collections.deque(pool.submit(_read_chunk, c)
                                  for c in itertools.islice(chunks, 2 * num_workers))
        while ahead:
            chunk = ahead.popleft().result()
            ahead.extend(pool.submit(_read_chunk, c) for c in itertools.islice(chunks, 1))
            yield from chunk


def _fill(path: Path, samples: _Samples, order: np.ndarray, num_workers: int, desc: str,
          progress: bool, parts=None) -> None:
    """Write every sample of ``order`` into the beton at ``path``.

    With ``parts`` (a fastvote.chunks.ChunkedColumns) the encoded samples are
    also committed in chunks, and those a killed write committed are placed
    from there instead of being read and encoded again.

    ffcv's own writer lets each of its processes book the next free page whenever its
    own is full and collects their allocation tables in the order they finish, so the
    same input gave different bytes from run to run. Here ``num_workers`` processes
    read and encode the samples, and this one places them in file order, page after
    page, as ffcv does with one worker: the file is a function of the input.
    """
    writer = beton_format.Writer(path)
    try:
        done = 0
        if parts is not None:  # a killed write's committed samples, already encoded
            for start, done, meta in parts.blocks("meta", 0):
                data = np.load(parts.root / "data" / f"{start}-{done}.npy")
                ends = np.cumsum(meta[:, 5])
                for (mode, height, width, label, index, _), end, size in zip(meta.tolist(), ends, meta[:, 5]):
                    writer.add(mode, height, width, data[end - size:end], label, index)
            if done and progress:
                print(f"[fastvote] resuming: {done / len(order):.0%} of {desc} is written ({done:,} of "
                      f"{len(order):,} images)", flush=True)
        committer = None if parts is None else chunks.Committer(parts, done)
        with contextlib.closing(_read_ahead(samples, order[done:], num_workers)) as loaded, \
                chunks.interruptible() if parts is not None else contextlib.nullcontext():
            for mode, height, width, data, label, index in tqdm(
                    loaded, total=len(order), initial=done, unit="img", desc=f"writing {desc}",
                    disable=bars.disable(progress)):
                writer.add(mode, height, width, data, label, index)
                if committer is not None:
                    committer.add({"meta": np.array([[mode, height, width, label, index, data.nbytes]]),
                                   "data": np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)}, rows=1)
            if committer is not None:
                committer.flush()
        writer.finish()
    except (TypeError, ValueError, RuntimeError) as e:
        kind = type(e) if isinstance(e, (TypeError, ValueError)) else RuntimeError
        raise kind(f"writing {desc} failed, nothing was written: {e}") from e
    finally:
        writer.close()  # the spool file


def write_beton(dataset, path: str | os.PathLike, *, indices: Sequence[int] | None = None,
                classes: Sequence[str] | None = None, max_resolution: int | None = None,
                jpeg: bool = False, jpeg_quality: int = JPEG_QUALITY,
                num_workers: int | None = None, progress: bool = True,
                image_key: str = "image", label_key: str = "label", overwrite: bool = False) -> Path:
    """Write a map-style dataset to an FFCV beton: a Hugging Face ``datasets.Dataset``, a
    torchvision dataset, or anything with ``len()`` and ``dataset[i]`` -> an item
    ``sample_of`` accepts.

    Args:
        dataset: ``dataset[i]`` -> (image, label, ...) or {image_key: image, label_key: label}.
        path: the .beton to write; an existing beton there is replaced whole, any
            other existing file is refused (FileExistsError) unless ``overwrite=True``.
        indices: positions in ``dataset`` to write, in this order (default: all). Each
            sample's position is stored as its ``identifier``.
        classes: class names for the sidecar (default: ``dataset_classes(dataset,
            label_key)``: a Hugging Face ClassLabel's names, or ``dataset.classes``).
        max_resolution: shrink images whose long side is larger (cv2's INTER_AREA, or
            PIL's BOX without cv2).
        jpeg: store JPEG (quality ``jpeg_quality``) instead of raw pixels.
        num_workers: processes that read and encode the samples (default: all usable
            cores); the bytes written do not depend on it.
        progress: show a tqdm bar.
        image_key, label_key: the keys of dict items (Hugging Face's are "image", "label").
        overwrite: replace an existing file at ``path`` that is not a beton.

    Returns:
        ``path``. Its sidecar ``classes_path(path)`` holds {"classes": [...] or null,
        "num_samples": N}; for ImageNet's 1000 sorted WordNet ids, "classes" holds the
        readable names (torchvision's, where it has them) and "wnids" the ids.
    """
    return _write_beton(dataset, path, indices=indices, classes=classes, max_resolution=max_resolution, jpeg=jpeg,
                        jpeg_quality=jpeg_quality, num_workers=num_workers, progress=progress, image_key=image_key,
                        label_key=label_key, overwrite=overwrite)


def _write_beton(dataset, path: str | os.PathLike, *, indices=None, classes=None, max_resolution=None, jpeg=False,
                 jpeg_quality=JPEG_QUALITY, num_workers=None, progress=True, image_key="image", label_key="label",
                 overwrite=False, resume_key: dict | None = None) -> Path:
    """write_beton; with resume_key (what identifies the dataset's content) a
    killed write resumes from the samples it committed."""
    if isinstance(dataset, Mapping):  # e.g. a Hugging Face DatasetDict: one split is wanted
        raise TypeError(f"dataset: a {type(dataset).__name__} with keys "
                        f"{sorted(map(str, dataset))}; expected one map-style dataset, e.g. "
                        f"dataset[{next(iter(dataset), 'train')!r}]")
    path = Path(path)
    _check_destination(path, overwrite)
    if len(dataset) == 0:
        raise ValueError(f"dataset is empty: nothing to write to {path}")
    order = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    if order.ndim != 1 or len(order) == 0:
        raise ValueError(f"indices: expected a non-empty 1-D sequence of positions, got shape "
                         f"{order.shape}")
    if order.min() < 0 or order.max() >= len(dataset):
        raise ValueError(f"indices: expected positions 0 <= i < {len(dataset)} (the dataset's "
                         f"length), got min {order.min()} and max {order.max()}")
    if classes is None:
        classes = dataset_classes(dataset, label_key)
    num_workers = max(1, min(num_workers or default_workers(), -(-len(order) // CHUNK)))
    encoding = {"jpeg": bool(jpeg), "quality": int(jpeg_quality),
                "max_resolution": max_resolution}
    samples = _Samples(dataset, encoding, image_key, label_key)
    sidecar = _sidecar(classes, len(order))
    remove_stale(path.parent)  # the half-written betons of killed writers
    work = path.with_name(f".{path.name}.resume")  # a killed write's encoded samples, until the beton is in place
    parts = None if resume_key is None else chunks.ChunkedColumns(
        work, dict(resume_key, encoding=encoding, order=_digest(order)))
    # The inner manager renames first: the beton, then its sidecar.
    try:
        with atomic_path(classes_path(path)) as sidecar_tmp, atomic_path(path) as beton_tmp:
            _fill(beton_tmp, samples, order, num_workers, path.name, progress, parts)
            sidecar_tmp.write_text(json.dumps(sidecar, indent=1))
    except (TypeError, ValueError):  # bad input, not an interruption: nothing of the write is kept
        shutil.rmtree(work, ignore_errors=True)
        raise
    if parts is not None:
        parts.remove(range(len(order)))
        with contextlib.suppress(OSError):
            work.rmdir()
    return path


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()


def _check_destination(path: Path, overwrite: bool) -> None:
    """A beton replaces a beton, never a user's other file (a mistyped path)."""
    if path.is_dir():
        raise IsADirectoryError(f"path={str(path)!r} is a folder; expected a .beton file to write")
    if overwrite or not path.exists():
        return
    try:
        beton_format.Reader(path)
    except ValueError:
        raise FileExistsError(f"path={str(path)!r} exists and is not a beton ({path.stat().st_size} bytes); "
                              "fastvote replaces only a beton there. Choose another path, or pass overwrite=True "
                              "(--overwrite) to replace it") from None


class _ImageFolder:
    """torchvision's ImageFolder, where a file PIL cannot decode is a ValueError naming it."""

    def __init__(self, root: str | os.PathLike):
        from torchvision.datasets import ImageFolder

        # A class folder without images stays in the label space with no samples
        # (a partial download): the class ids keep matching a surrogate's head.
        self.folder = ImageFolder(str(root), allow_empty=True)
        self.classes = self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        file, label = self.folder.samples[index]
        try:
            return self.folder.loader(file), label
        except OSError as e:
            if e.errno is not None:
                raise  # an I/O error; PIL's "cannot identify" and "truncated" have no errno
            reason = "no format PIL knows" if isinstance(e, UnidentifiedImageError) else e
            raise ValueError(f"{file} is not a readable image ({reason}); expected a whole "
                             f"image file PIL can decode (JPEG, PNG, ...)") from None


def write_image_folder(root: str | os.PathLike, path: str | os.PathLike, **kw) -> Path:
    """Write an ImageFolder tree (``root/<class>/<image>``) to a beton; class names are
    the folder names, sorted (torchvision's rule; ImageNet's wnids get readable names).
    ``kw`` as for ``write_beton``."""
    _check_destination(Path(path), kw.get("overwrite", False))  # before scanning the folder
    folder = _ImageFolder(root)
    # the files' names, sizes and mtimes: a killed write of the same folder resumes, a changed one starts over
    listing = hashlib.sha256()
    for file, label in folder.folder.samples:
        stat = os.stat(file)
        listing.update(f"{os.path.relpath(file, root)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return _write_beton(folder, path, resume_key={"image_folder": listing.hexdigest()}, **kw)


def write_offline(name: str, split: str, path: str | os.PathLike, *,
                  indices: Sequence[int] | None = None, max_resolution: int | None = None,
                  jpeg: bool = False, num_workers: int | None = None, progress: bool = True,
                  **dataset_kw) -> Path:
    """Write registry dataset ``get(name, split, **dataset_kw)`` to a beton (see ``write_beton``)."""
    return write_beton(get(name, split, **dataset_kw), path, indices=indices,
                       max_resolution=max_resolution, jpeg=jpeg, num_workers=num_workers,
                       progress=progress)


def _open(path: str | os.PathLike) -> tuple[beton_format.Reader, dict]:
    """A beton's reader and its metadata columns by field name, checking the file and
    its fields (a ValueError naming a file that is not a whole beton of fastvote's)."""
    reader = beton_format.Reader(path)
    return reader, reader.columns


def iter_samples(path: str | os.PathLike) -> Iterator[tuple[np.ndarray, int, int]]:
    """Read a beton back in file order without a loader: (uint8 (H, W, 3), label, identifier)."""
    reader, column = _open(path)
    images = beton_format.Images(reader)
    for i, (label, identifier) in enumerate(zip(column["label"].tolist(),
                                                column["identifier"].tolist())):
        yield np.array(images[i]), int(label), int(identifier)


def read_columns(path: str | os.PathLike) -> dict:
    """The small columns of a beton, in file order, without decoding an image:
    ``labels`` and ``identifiers`` (int64 (N,)), ``heights`` and ``widths`` (int64 (N,))."""
    _, column = _open(path)
    return {
        "labels": np.asarray(column["label"], dtype=np.int64),
        "identifiers": np.asarray(column["identifier"], dtype=np.int64),
        "heights": np.asarray(column["image"]["height"], dtype=np.int64),
        "widths": np.asarray(column["image"]["width"], dtype=np.int64),
    }
