"""Write FFCV ``.beton`` files: fields ``image`` (RGB), ``label`` (int), ``identifier``
(int, the sample's position in the source dataset), and the class names in a sidecar
``<file>.classes.json`` (e.g. ``haystack.beton.classes.json``).

Images are stored raw by default, so a round trip is bit exact; ``jpeg=True`` trades
that for size (mean error ~1/255). Grayscale images are replicated to 3 channels. The
same input gives the same bytes, whatever ``num_workers`` (so a file's fingerprint can
key a cache). Both files appear whole or not at all: they are written under temporary
names in the target folder (``fastvote.atomic``) and renamed when complete (the beton
first, then its sidecar). Readers raise a ValueError naming a file that is not a whole
beton.

FFCV (``pip install ffcv==1.0.2``, which builds against the apt packages pkg-config,
libopencv-dev and libturbojpeg0-dev) is imported only when a function here is called.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import json
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..atomic import atomic_path, remove_stale
from .registry import get

FFCV_INSTALL = ("pip install ffcv==1.0.2 (it builds from source and needs "
                "apt-get install -y pkg-config libopencv-dev libturbojpeg0-dev)")
JPEG_QUALITY = 90
MIN_PAGE_SIZE = 8 << 20  # ffcv's default page; a raw sample must fit in one page
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
    """Class names of the beton at ``path`` (None if it was written without names)."""
    with open(classes_path(path)) as f:
        return json.load(f)["classes"]


def to_rgb(image: Any) -> np.ndarray:
    """A PIL image or a uint8 array (H, W), (H, W, 1) or (H, W, 3) -> uint8 (H, W, 3) contiguous."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"image: expected a PIL image or a uint8 array, got {type(image).__name__} "
                        f"of dtype {array.dtype}; convert it to uint8 0..255 first")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"image: expected a uint8 array (H, W), (H, W, 1) or (H, W, 3), "
                         f"got shape {array.shape}")
    return np.ascontiguousarray(np.broadcast_to(array, array.shape[:2] + (3,)))


class _Samples:
    """What the reading processes produce: ``samples[i]`` -> (the image's metadata row,
    its stored bytes, label, i), encoded by ffcv's own ``image`` field (resize, JPEG),
    so that all the costly work happens there and the writer only places bytes."""

    def __init__(self, dataset, field, page_size: int):
        self.dataset = dataset
        self.field = field
        self.page_size = page_size

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        stored = []

        def malloc(size: int):
            stored.append(np.empty(size, np.uint8))
            return 0, stored[-1]  # the pointer is set where the writer places the bytes

        row = np.zeros(1, self.field.metadata_type)
        try:
            image, label = self.dataset[index][:2]
            self.field.encode(row, to_rgb(image), malloc)
        except ValueError:
            raise  # bad input, already saying what was expected
        except Exception as e:
            raise RuntimeError(f"dataset[{index}] failed: {e!r}") from e
        (data,) = stored
        if data.nbytes > self.page_size:
            raise ValueError(f"image {index} is {row['height'][0]}x{row['width'][0]} stored in "
                             f"{data.nbytes} bytes, more than a page ({self.page_size}); pass "
                             f"a smaller max_resolution= or jpeg=True")
        return row, data, int(label), int(index)


def _page_size(max_resolution: int | None) -> int:
    """A power of two that holds the largest raw image ``max_resolution`` allows."""
    if not max_resolution:
        return MIN_PAGE_SIZE
    return max(MIN_PAGE_SIZE, 1 << (3 * max_resolution ** 2 - 1).bit_length())


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


def _fill(writer, samples: _Samples, order: np.ndarray, num_workers: int, desc: str,
          progress: bool) -> None:
    """Write every sample of ``order`` into the beton that ``writer`` names.

    ffcv's own writer lets each of its processes book the next free page whenever its
    own is full and collects their allocation tables in the order they finish, so the
    same input gave different bytes from run to run. Here ``num_workers`` processes
    read and encode the samples, and this one places them in file order, page after
    page, as ffcv does with one worker: the file is a function of the input.
    """
    from ffcv.memory_allocator import MemoryAllocator

    writer.num_samples = len(order)
    writer.prepare()  # writes the header, creates the metadata block in shared memory
    try:
        allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
        metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
        images, labels, identifiers = (metadata[name] for name in writer.metadata_type.names)
        try:
            with contextlib.closing(_read_ahead(samples, order, num_workers)) as loaded, \
                    allocator:
                for position, (row, data, label, index) in enumerate(tqdm(
                        loaded, total=len(order), unit="img", desc=f"writing {desc}",
                        disable=not progress)):
                    allocator.set_current_sample(position)
                    row["data_ptr"], page = allocator.malloc(data.nbytes)
                    page[:] = data
                    images[position], labels[position], identifiers[position] = row[0], label, index
        except (ValueError, RuntimeError) as e:
            kind = ValueError if isinstance(e, ValueError) else RuntimeError
            raise kind(f"writing {desc} failed, nothing was written: {e}") from e
        finally:
            del metadata, images, labels, identifiers  # views that keep the shared memory open
        writer.finalize(allocator.allocations)  # the metadata and the allocation table
    finally:
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()


def write_beton(dataset, path: str | os.PathLike, *, indices: Sequence[int] | None = None,
                classes: Sequence[str] | None = None, max_resolution: int | None = None,
                jpeg: bool = False, jpeg_quality: int = JPEG_QUALITY,
                num_workers: int | None = None, progress: bool = True) -> Path:
    """Write a map-style dataset of (PIL image or uint8 array, label) to an FFCV beton.

    Args:
        dataset: ``dataset[i]`` -> (image, label, ...); images PIL or uint8 (H, W[, 1|3]).
        path: the .beton to write (replaced whole if it exists).
        indices: positions in ``dataset`` to write, in this order (default: all). Each
            sample's position is stored as its ``identifier``.
        classes: class names for the sidecar (default: ``dataset.classes`` if any).
        max_resolution: shrink images whose long side is larger (cv2 INTER_AREA).
        jpeg: store JPEG (quality ``jpeg_quality``) instead of raw pixels.
        num_workers: processes that read and encode the samples (default: all usable
            cores); the bytes written do not depend on it.
        progress: show a tqdm bar.

    Returns:
        ``path``. Its sidecar ``classes_path(path)`` holds {"classes": [...] or null,
        "num_samples": N}.
    """
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = Path(path)
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
        classes = getattr(dataset, "classes", None)
    page_size = _page_size(max_resolution)
    num_workers = max(1, min(num_workers or default_workers(), -(-len(order) // CHUNK)))
    fields = {
        "image": RGBImageField(write_mode="jpg" if jpeg else "raw", max_resolution=max_resolution,
                               jpeg_quality=jpeg_quality),
        "label": IntField(),
        "identifier": IntField(),
    }
    samples = _Samples(dataset, fields["image"], page_size)
    sidecar = {"classes": None if classes is None else list(classes), "num_samples": len(order)}
    remove_stale(path.parent)  # the half-written betons of killed writers
    # The inner manager renames first: the beton, then its sidecar.
    with atomic_path(classes_path(path)) as sidecar_tmp, atomic_path(path) as beton_tmp:
        writer = DatasetWriter(str(beton_tmp), fields, page_size=page_size, num_workers=num_workers)
        _fill(writer, samples, order, num_workers, path.name, progress)
        sidecar_tmp.write_text(json.dumps(sidecar, indent=1))
    return path


class _ImageFolder:
    """torchvision's ImageFolder, where a file PIL cannot decode is a ValueError naming it."""

    def __init__(self, root: str | os.PathLike):
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(str(root))
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
    the folder names, sorted (torchvision's rule). ``kw`` as for ``write_beton``."""
    return write_beton(_ImageFolder(root), path, **kw)


def write_offline(name: str, split: str, path: str | os.PathLike, *,
                  indices: Sequence[int] | None = None, max_resolution: int | None = None,
                  jpeg: bool = False, num_workers: int | None = None, progress: bool = True,
                  **dataset_kw) -> Path:
    """Write registry dataset ``get(name, split, **dataset_kw)`` to a beton (see ``write_beton``)."""
    return write_beton(get(name, split, **dataset_kw), path, indices=indices,
                       max_resolution=max_resolution, jpeg=jpeg, num_workers=num_workers,
                       progress=progress)


def _check_whole(path: Path) -> None:
    """Raise a ValueError naming ``path`` unless it starts with a beton header and ends
    with the allocation table where that header puts it (``_open`` then checks every
    image against the table). On such files ffcv raises an AssertionError ("file format
    mismatch"), an IndexError or "negative dimensions are not allowed"."""
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

    expected = "expected a .beton written by fastvote.data.write_beton"
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes); {expected}")
    header = np.fromfile(path, dtype=HeaderType, count=1)
    if len(header) == 0 or header[0]["version"] != CURRENT_VERSION:
        raise ValueError(f"{path} is not an FFCV .beton (its first bytes are no format "
                         f"{CURRENT_VERSION} beton header); {expected}")
    table = int(header[0]["alloc_table_ptr"])
    data_start = HeaderType.itemsize + int(header[0]["num_fields"]) * FieldDescType.itemsize
    if not data_start <= table <= size or (size - table) % ALLOC_TABLE_TYPE.itemsize:
        raise ValueError(f"{path} is truncated or damaged: it has {size} bytes and its header "
                         f"puts the allocation table at byte {table}; {expected}, whole")


def _open(path: str | os.PathLike):
    """A beton's reader and its metadata columns by field name, checking the file and
    its fields."""
    require_ffcv()
    from ffcv.reader import Reader

    _check_whole(Path(path))
    reader = Reader(str(path))
    missing = set(FIELDS) - set(reader.field_names)
    if missing:
        raise ValueError(f"{path} lacks the field(s) {sorted(missing)}; expected {list(FIELDS)} "
                         f"(write it with fastvote.data.write_beton)")
    column = {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.field_names)}
    images = column["image"]["data_ptr"]
    if len(images) != reader.num_samples or not np.isin(images, reader.alloc_table["ptr"]).all():
        raise ValueError(f"{path} is truncated or damaged: its metadata or allocation table "
                         f"lacks samples; expected a .beton written by "
                         f"fastvote.data.write_beton, whole")
    return reader, column


def iter_samples(path: str | os.PathLike) -> Iterator[tuple[np.ndarray, int, int]]:
    """Read a beton back in file order without a loader: (uint8 (H, W, 3), label, identifier)."""
    import cv2

    reader, column = _open(path)
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for image, label, identifier in zip(column["image"], column["label"], column["identifier"]):
        start = int(image["data_ptr"])
        stored = data[start:start + sizes[start]]
        height, width = int(image["height"]), int(image["width"])
        if image["mode"] == 0:  # jpg
            pixels = cv2.cvtColor(cv2.imdecode(stored, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        else:
            pixels = np.array(stored).reshape(height, width, 3)
        yield pixels, int(label), int(identifier)


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
