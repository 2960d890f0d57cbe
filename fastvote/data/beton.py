"""Write FFCV ``.beton`` files: fields ``image`` (RGB), ``label`` (int), ``identifier``
(int, the sample's position in the source dataset), and the class names in a sidecar
``<file>.classes.json`` (e.g. ``haystack.beton.classes.json``).

Images are stored raw by default, so a round trip is bit exact; ``jpeg=True`` trades
that for size (mean error ~1/255). Grayscale images are replicated to 3 channels. Both
files appear whole or not at all: they are written under temporary names in the target
folder and renamed when complete (the beton first, then its sidecar).

FFCV (``pip install ffcv==1.0.2``, which builds against the apt packages pkg-config,
libopencv-dev and libturbojpeg0-dev) is imported only when a function here is called.
"""
from __future__ import annotations

import json
import os
import queue
import traceback
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .registry import atomic_path, get

FFCV_INSTALL = ("pip install ffcv==1.0.2 (it builds from source and needs "
                "apt-get install -y pkg-config libopencv-dev libturbojpeg0-dev)")
JPEG_QUALITY = 90
MIN_PAGE_SIZE = 8 << 20  # ffcv's default page; a raw sample must fit in one page
CHUNK = 100              # samples handed to a writer process at a time
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
    """What the writer processes read: ``samples[i]`` -> (uint8 (H, W, 3), label, i).

    A failure is sent to the parent at once: ffcv's worker would otherwise wait for
    its page turn before dying, and the parent would learn of it only at the end.
    """

    def __init__(self, dataset, errors, page_size: int, max_resolution: int | None, jpeg: bool):
        self.dataset = dataset
        self.errors = errors
        self.page_size = page_size
        self.max_resolution = max_resolution
        self.jpeg = jpeg

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        try:
            image, label = self.dataset[index][:2]
            image = to_rgb(image)
            self._check_fits(image, index)
            return image, int(label), int(index)
        except BaseException:
            self.errors.put(f"dataset[{index}] failed:\n{traceback.format_exc()}")
            raise

    def _check_fits(self, image: np.ndarray, index: int) -> None:
        if self.jpeg:
            return
        height, width = image.shape[:2]
        scale = min(1.0, self.max_resolution / max(height, width)) if self.max_resolution else 1.0
        size = int(height * scale) * int(width * scale) * 3
        if size > self.page_size:
            raise ValueError(f"image {index} is {height}x{width}: {size} bytes raw, more than a "
                             f"page ({self.page_size}); pass max_resolution= or jpeg=True")


def _page_size(max_resolution: int | None) -> int:
    """A power of two that holds the largest raw image ``max_resolution`` allows."""
    if not max_resolution:
        return MIN_PAGE_SIZE
    return max(MIN_PAGE_SIZE, 1 << (3 * max_resolution ** 2 - 1).bit_length())


def _run_writer(writer, samples: _Samples, order: np.ndarray, errors, num_workers: int,
                desc: str, progress: bool) -> None:
    """ffcv's ``DatasetWriter._write_common`` made safe: it stops at the first failing
    sample (ffcv's would wait forever) and shows progress only when asked."""
    import ctypes
    import multiprocessing as mp

    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import worker_job_indexed_dataset

    writer.num_samples = len(order)
    writer.prepare()  # writes the header, creates the shared metadata block
    processes = []
    try:
        work = mp.Queue()
        positions = list(enumerate(order.tolist()))  # (position in the file, source index)
        for start in range(0, len(positions), CHUNK):
            work.put(positions[start:start + CHUNK])
        for _ in range(num_workers):
            work.put(None)
        allocations = mp.Queue()
        done = mp.Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
        args = (work, writer.metadata_sm, writer.metadata_type, writer.fields, allocator,
                done, allocations, samples)
        processes = [mp.Process(target=worker_job_indexed_dataset, args=args, daemon=True)
                     for _ in range(num_workers)]
        for p in processes:
            p.start()

        def check() -> None:
            """Raise if a writer failed; waits up to 50 ms for news."""
            try:
                failure = errors.get(timeout=0.05)
            except queue.Empty:
                failure = None
            if failure:
                raise RuntimeError(f"writing {desc} failed; nothing was written. {failure}")
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"writing {desc} failed: a writer process exited with code "
                                   f"{dead[0]} (its traceback is above); nothing was written")

        with tqdm(total=len(order), desc=f"writing {desc}", unit="img", disable=not progress) as bar:
            while done.value < len(order):
                check()
                bar.update(done.value - bar.n)
            bar.update(done.value - bar.n)
        table = []
        for _ in processes:
            while True:
                try:
                    table.extend(allocations.get(timeout=0.1))
                    break
                except queue.Empty:
                    check()
        writer.finalize(table)  # the metadata and the allocation table
    finally:
        for p in processes:
            if p.is_alive():
                p.terminate()
            p.join()
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
        num_workers: writer processes (default: all usable cores).
        progress: show a tqdm bar.

    Returns:
        ``path``. Its sidecar ``classes_path(path)`` holds {"classes": [...] or null,
        "num_samples": N}.
    """
    require_ffcv()
    import multiprocessing as mp

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
    errors = mp.Queue()
    samples = _Samples(dataset, errors, page_size, max_resolution, jpeg)
    num_workers = max(1, min(num_workers or default_workers(), -(-len(order) // CHUNK)))
    fields = {
        "image": RGBImageField(write_mode="jpg" if jpeg else "raw", max_resolution=max_resolution,
                               jpeg_quality=jpeg_quality),
        "label": IntField(),
        "identifier": IntField(),
    }
    sidecar = {"classes": None if classes is None else list(classes), "num_samples": len(order)}
    # The inner manager renames first: the beton, then its sidecar.
    with atomic_path(classes_path(path)) as sidecar_tmp, atomic_path(path) as beton_tmp:
        writer = DatasetWriter(str(beton_tmp), fields, page_size=page_size, num_workers=num_workers)
        _run_writer(writer, samples, order, errors, num_workers, path.name, progress)
        sidecar_tmp.write_text(json.dumps(sidecar, indent=1))
    return path


def write_image_folder(root: str | os.PathLike, path: str | os.PathLike, **kw) -> Path:
    """Write an ImageFolder tree (``root/<class>/<image>``) to a beton; class names are
    the folder names, sorted (torchvision's rule). ``kw`` as for ``write_beton``."""
    from torchvision.datasets import ImageFolder

    return write_beton(ImageFolder(str(root)), path, **kw)


def write_offline(name: str, split: str, path: str | os.PathLike, *,
                  indices: Sequence[int] | None = None, max_resolution: int | None = None,
                  jpeg: bool = False, num_workers: int | None = None, progress: bool = True,
                  **dataset_kw) -> Path:
    """Write registry dataset ``get(name, split, **dataset_kw)`` to a beton (see ``write_beton``)."""
    return write_beton(get(name, split, **dataset_kw), path, indices=indices,
                       max_resolution=max_resolution, jpeg=jpeg, num_workers=num_workers,
                       progress=progress)


def _open(path: str | os.PathLike):
    """A beton's reader and its metadata columns by field name, checking the fields."""
    require_ffcv()
    from ffcv.reader import Reader

    reader = Reader(str(path))
    missing = set(FIELDS) - set(reader.field_names)
    if missing:
        raise ValueError(f"{path} lacks the field(s) {sorted(missing)}; expected {list(FIELDS)} "
                         f"(write it with fastvote.data.write_beton)")
    column = {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.field_names)}
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
