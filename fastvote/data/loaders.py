"""Train and eval loaders over the betons of ``beton.py``: FFCV pipelines, or torch
DataLoaders (``torch_loaders.py``) where FFCV is not installed (``backend()``).

Both loaders yield ``(images, labels)`` — or ``(images, labels, identifiers)`` with
``with_identifier=True`` — where ``images`` is float32 (B, 3, resolution, resolution),
normalised with ``mean`` / ``std`` (given on the 0..1 scale, as torchvision does) and
laid out channels-last in memory; ``labels`` and ``identifiers`` are int64 (B,).

``labels`` and ``identifiers`` are fresh tensors. ``images`` on the CPU live in ffcv's
batch buffers, which it reuses a few batches later: ``.clone()`` the ones you keep.

``indices=`` are sample positions in the SOURCE dataset, i.e. the ``identifier`` field,
so a subset means the same samples whether the beton holds the whole source or a part.

The result is an ``ffcv.loader.Loader``, or a ``torch_loaders.BetonLoader`` that yields
the same batches in the same order: ``len()``, ``batch_size``, ``next_epoch``, iteration,
one epoch per ``for``; ``set_resolution`` changes its output side between epochs.

An epoch yields every sample once (``drop_last=False``, the default of both); with
``drop_last=True`` the last, partial batch is left out, and a ``batch_size`` larger than
the samples (on each rank) is a ValueError, never an empty epoch.

FFCV's Loader sets numba's and torch's thread counts to ``num_workers`` when it is built
and at every pass; fastvote's FFCV loaders put the caller's counts back (``keep_threads``),
so ``torch.get_num_threads()`` is what it was before.
The environment variable FASTVOTE_LOADER=torch picks the torch loaders even with FFCV.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
import warnings
from typing import Sequence

import numpy as np
import torch

from .beton import FFCV_INSTALL, _open, default_workers, iter_samples, require_ffcv, sample_of
from .resampling import INTERPOLATIONS
from .torch_loaders import BetonLoader, Normalize

# torchvision's ImageNet statistics, on the 0..1 scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RandomResizedCrop's defaults (torchvision's and ffcv's).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
SMALL_IMAGE_MAX = 64  # px; as fastvote.models' small-image stem


def default_crop(resolution: int) -> dict:
    """The train crop for images of this size, as train_loader keywords: the
    release's RandomResizedCrop for ImageNet-sized images, none up to 64 px
    (an 8% crop of a 16 px digit is noise; measured on the offline haystack,
    the surrogate's train accuracy went 0.60 -> 0.88 without it)."""
    if resolution <= SMALL_IMAGE_MAX:
        return {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)}
    return {"scale": CROP_SCALE, "ratio": CROP_RATIO}
ORDERS = ("sequential", "random")
BACKENDS = ("ffcv", "torch")
_warned = False  # the torch path's warning: once a process
log = logging.getLogger(__name__)


IMAGENET_CROP_RATIO = 224 / 256  # ImageNet's eval: resize the short side to 256, centre crop 224


def default_crop_ratio(resolution: int) -> float:
    """The eval loader's centre-crop ratio for images of this size: ImageNet's
    224/256 above 64 px (photos, where the object fills the middle), the whole
    image up to 64 px (digits and glyphs fill the frame)."""
    return 1.0 if resolution <= SMALL_IMAGE_MAX else IMAGENET_CROP_RATIO


def default_interpolation(resolution: int) -> str:
    """The eval loader's resize for images of this size (``resampling.py``): torchvision's
    antialiased bilinear above 64 px, what weights that state no transform expect (as
    ``default_crop_ratio``); FFCV's area filter up to 64 px, as fastvote always had."""
    return "area" if resolution <= SMALL_IMAGE_MAX else "bilinear"


def backend() -> str:
    """The loaders' backend: "ffcv" where ``import ffcv`` works, else "torch" (which the
    environment variable FASTVOTE_LOADER=torch also picks; =ffcv insists on FFCV)."""
    forced = os.environ.get("FASTVOTE_LOADER", "")
    if forced not in ("", *BACKENDS):
        raise ValueError(f"FASTVOTE_LOADER={forced!r}: expected one of {list(BACKENDS)} or unset")
    if forced == "torch":
        return "torch"
    if forced == "ffcv":
        require_ffcv()
        return "ffcv"
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return "torch"
    return "ffcv"


def _announce_torch() -> None:
    """Warn, once a process, that the loaders run without FFCV and what that costs."""
    global _warned
    if _warned:
        return
    _warned = True
    why = ("FASTVOTE_LOADER=torch" if os.environ.get("FASTVOTE_LOADER") == "torch"
           else "FFCV is not installed")
    warnings.warn(f"{why}: fastvote's loaders read the betons with torch DataLoaders, several "
                  f"times slower than FFCV at decoding, cropping and normalising images "
                  f"(writing betons and everything else are unchanged); for the fast path: "
                  f"{FFCV_INSTALL}", stacklevel=4)  # the caller of train_loader / eval_loader


def set_resolution(loader, resolution: int) -> None:
    """Make ``loader`` (``train_loader`` / ``eval_loader``'s) crop to ``resolution`` px
    from its next epoch on (progressive resolution). Call it between epochs."""
    if not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution={resolution!r}: expected an int >= 1 (output side in px)")
    decoder = getattr(loader, "_fastvote_decoder", None)
    if decoder is not None:
        # As ffcv-imagenet's train_imagenet.py: each epoch allocates its buffers from the
        # decoder's output_size, and the compiled code takes any size (no recompiling).
        decoder.output_size = (int(resolution), int(resolution))
    elif hasattr(loader, "resolution") and hasattr(loader, "crop"):
        loader.resolution = int(resolution)
    else:
        raise TypeError(f"loader: a {type(loader).__name__}; expected one made by "
                        f"fastvote.data.train_loader or eval_loader")


class _Flat(torch.nn.Module):
    """int64 (B, 1) -> a fresh int64 (B,)."""

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1).clone()


def _check(resolution: int, mean: Sequence[float], std: Sequence[float], order: str) -> None:
    """Fail early, with what was expected, before ffcv compiles anything."""
    if not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution={resolution!r}: expected an int >= 1 (output side in px)")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean={tuple(mean)}, std={tuple(std)}: expected 3 values each (one a "
                         f"channel, 0..1 scale) and std > 0; see channel_stats()")
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: expected one of {list(ORDERS)}")


def _positions(reader, indices: Sequence[int] | None) -> np.ndarray | None:
    """Source positions ``indices`` -> positions in the beton, via its identifier field."""
    if indices is None:
        return None
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or len(indices) == 0:
        raise ValueError(f"indices: expected a non-empty 1-D sequence of sample positions, "
                         f"got shape {indices.shape}")
    identifiers = np.asarray(reader.metadata[f"f{reader.field_names.index('identifier')}"])
    if np.array_equal(identifiers, np.arange(len(identifiers))):
        found, positions = (indices >= 0) & (indices < len(identifiers)), indices
    else:  # the beton holds a part of its source, in some order
        order = np.argsort(identifiers, kind="stable")
        slot = np.clip(np.searchsorted(identifiers[order], indices), 0, len(order) - 1)
        positions = order[slot]
        found = identifiers[positions] == indices
    if not found.all():
        absent = indices[~found][:5].tolist()
        raise ValueError(f"indices: {int((~found).sum())} of them are not in {reader.file_name} "
                         f"(e.g. {absent}); expected identifiers of its samples "
                         f"(it holds {len(identifiers)}, from {identifiers.min()} to {identifiers.max()})")
    return positions.astype(np.uint64)


def _ignore_numba_finalizer_errors() -> None:
    """numba's dispatcher finalizers raise a harmless KeyError when FFCV's
    compiled pipelines are garbage collected ("Exception ignored in:
    <finalize object ...>", several per loader). Drop exactly those from the
    unraisable-exception report; everything else still goes to the old hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_fastvote", False):
        return

    def hook(unraisable):
        tb = unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if (unraisable.exc_type is KeyError and tb is not None
                and "numba" in tb.tb_frame.f_code.co_filename
                and tb.tb_frame.f_code.co_name == "finalizer"):
            return
        previous(unraisable)

    hook._fastvote = True
    sys.unraisablehook = hook


def _check_batches(batch_size: int, samples: int, *, drop_last: bool, distributed: bool) -> None:
    """An epoch holds at least one batch: a ValueError naming ``batch_size`` and the
    samples (each rank's under ``distributed``) where it would be empty."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1 (images a batch)")
    if samples == 0:
        raise ValueError("the beton holds no samples: an epoch would be empty")
    ranks = 1
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        ranks = torch.distributed.get_world_size()
    per_rank = -(-samples // ranks)  # sharded as DistributedSampler, padded
    if drop_last and batch_size > per_rank:
        held = f"{samples} samples" + (f" ({per_rank} on each of {ranks} ranks)" if ranks > 1 else "")
        raise ValueError(f"batch_size={batch_size} with drop_last=True makes no batch of the {held}: "
                         f"every epoch would be empty; pass batch_size <= {per_rank}, or "
                         f"drop_last=False (every sample each epoch, the last batch partial)")


def _thread_counts() -> tuple[int, int | None]:
    """The calling thread's torch thread count, and numba's once numba is imported."""
    numba = sys.modules.get("numba")
    return torch.get_num_threads(), (numba.get_num_threads() if numba is not None else None)


def _set_thread_counts(counts: tuple[int, int | None]) -> None:
    # unconditionally: a thread count set by another thread (ffcv's batch thread) is
    # the default of threads started later, which a get in this one does not show
    torch.set_num_threads(counts[0])
    if counts[1] is not None:
        sys.modules["numba"].set_num_threads(counts[1])


@contextlib.contextmanager
def keep_threads():
    """On leaving the block (however it is left), put back the torch thread count (and
    numba's, once numba is imported) that the calling thread had on entering it; yields a
    callable that puts them back at any point inside. ffcv's Loader sets both to its
    ``num_workers`` when built and at every pass; fastvote's loaders do this themselves.
    (ffcv does not touch ``torch.get_num_interop_threads()``.)"""
    counts = _thread_counts()

    def restore() -> None:
        _set_thread_counts(counts)

    try:
        yield restore
    finally:
        restore()


@functools.lru_cache(maxsize=None)
def _thread_keeping(loader_class: type) -> type:
    """``ffcv.loader.Loader`` (passed in: ffcv is imported lazily) made to leave the caller's
    thread counts as they were when built and at every pass."""

    class ThreadKeepingLoader(loader_class):
        def __init__(self, *args, **kw):
            with keep_threads():
                super().__init__(*args, **kw)

        def __iter__(self):
            with keep_threads() as restore:
                batches = super().__iter__()
            return _restore_after_first(batches, restore)

    return ThreadKeepingLoader


def _restore_after_first(batches, restore):
    """``batches``, calling ``restore`` once the first batch is in: by then ffcv's batch
    thread has set its thread counts (torch's becomes the default of later threads)."""
    restored = False
    for batch in batches:
        if not restored:
            restore()
            restored = True
        yield batch


def _loader(path, batch_size: int, crop: tuple[str, dict], resolution: int, **kw):
    """The loader for the backend: FFCV's pipeline or the torch DataLoader."""
    kind = backend()
    reader, _ = _open(path)  # a file that is not a whole beton: a ValueError naming it
    positions = _positions(reader, kw.pop("indices"))
    _check_batches(batch_size, reader.num_samples if positions is None else len(positions),
                   drop_last=kw["drop_last"], distributed=kw["distributed"])
    if kind == "torch":
        _announce_torch()
        kw["num_workers"] = kw["num_workers"] or default_workers()
        return BetonLoader(path, batch_size, crop=crop, resolution=resolution, positions=positions, **kw)
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip

    kind, options = crop
    size = (resolution, resolution)
    if kind == "center" and options["interpolation"] == "area":
        decoder, augment = CenterCropRGBImageDecoder(size, ratio=options["ratio"]), []
    elif kind == "center":
        from .ffcv_resize import ResizeCenterCropDecoder  # imports ffcv

        decoder = ResizeCenterCropDecoder(size, options["ratio"], options["interpolation"])
        augment = []
    else:
        decoder = RandomResizedCropRGBImageDecoder(size, scale=options["scale"],
                                                   ratio=options["ratio"])
        augment = [RandomHorizontalFlip()] if options["flip"] else []
    loader = _ffcv_loader(path, batch_size, decoder, augment, positions=positions, **kw)
    loader._fastvote_decoder = decoder  # for set_resolution
    return loader


def _cache_ffcv_compiles() -> None:
    """Let numba cache FFCV's compiled pipeline functions on disk, once a process.

    FFCV compiles its pipeline with numba when a loader is built and on its first batch,
    without numba's cache: every process paid it again (measured on this 2-core VM
    under load: 39-45 s). numba keys a cached closure by its code and captured values, so
    a changed pipeline compiles anew; only the image decoder and its C calls cannot be cached
    (they hold ctypes pointers), so a later process pays ~5 s. FFCV has no option for it: its
    compiler module's ``njit`` is swapped for one with ``cache=True``.
    """
    global _caching
    import numba

    # each time: pytest restores the filters after every test
    warnings.filterwarnings("ignore", message=r"Cannot cache compiled function",
                            category=numba.NumbaWarning)
    if _caching:
        return
    _caching = True
    import functools

    from ffcv.pipeline import compiler

    compiler.njit = functools.partial(numba.njit, cache=True)
    log.info("compiling FFCV's pipeline with numba: ~40 s on a 2-core CPU in the first "
             "process, ~5 s in later ones (numba's cache; the decoder is compiled each time)")


_caching = False  # whether _cache_ffcv_compiles has run in this process


def _ffcv_loader(path, batch_size: int, decoder, augment: list, *, mean, std, positions,
                 order: str, distributed: bool, device, num_workers: int | None,
                 drop_last: bool, with_identifier: bool, seed: int):
    """The pipeline both loaders share: decode -> augment -> tensor -> device -> normalise."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ModuleWrapper, NormalizeImage, ToDevice, ToTensor, ToTorchImage

    _ignore_numba_finalizer_errors()
    _cache_ffcv_compiles()

    device = torch.device(device)
    if device.type == "cpu":
        to_device = []
        images = [decoder, *augment, NormalizeImage(np.array(mean) * 255, np.array(std) * 255,
                                                    np.float32),
                  ToTensor(), ToTorchImage(channels_last=True)]
    else:  # move uint8, 4x less than float32, and normalise there (ffcv's own needs cupy)
        to_device = [ToDevice(device, non_blocking=True)]
        images = [decoder, *augment, ToTensor(), *to_device, ToTorchImage(channels_last=True),
                  ModuleWrapper(Normalize(mean, std, device))]

    def column():
        return [IntDecoder(), ToTensor(), *to_device, ModuleWrapper(_Flat())]

    pipelines = {
        "image": images,
        "label": column(),
        "identifier": column() if with_identifier else None,
    }
    return _thread_keeping(Loader)(
        str(path), batch_size=batch_size, num_workers=num_workers or default_workers(),
        order=OrderOption.SEQUENTIAL if order == "sequential" else OrderOption.RANDOM,
        distributed=distributed, seed=seed, indices=positions, pipelines=pipelines, drop_last=drop_last)


def eval_loader(path: str | os.PathLike, batch_size: int, *, resolution: int,
                mean: Sequence[float], std: Sequence[float], indices: Sequence[int] | None = None,
                order: str = "sequential", distributed: bool = False, device="cpu",
                num_workers: int | None = None, drop_last: bool = False,
                with_identifier: bool = False, seed: int = 0, crop_ratio: float = 1.0,
                interpolation: str | None = None):
    """Evaluation loader: the centre square of ``crop_ratio`` x the short side, at
    ``resolution`` px (resized as ``interpolation`` says), normalised. No randomness.
    Both back ends give the same bytes (FFCV through ``ffcv_resize``'s numba port of PIL).

    Args:
        path: a beton written by ``write_beton``.
        batch_size: images a batch.
        resolution: output side in px.
        mean, std: per-channel statistics, 0..1 scale (``channel_stats``, ``IMAGENET_MEAN``).
        indices: source positions to load (default: all), in this order when sequential.
        order: "sequential" or "random" (seeded by ``seed``).
        distributed: shard over the torch.distributed ranks (it must be initialised).
        device: where batches end up ("cpu", "cuda", "cuda:1", ...).
        num_workers: decoding threads (FFCV) or processes (torch; 1: this one); default:
            all usable cores.
        drop_last: False (default): every sample each epoch, the last batch partial;
            True: the last, partial batch is left out (a ``batch_size`` above the
            samples, each rank's when distributed, is then a ValueError: no empty epochs).
        with_identifier: also yield the int64 (B,) identifiers.
        crop_ratio: the crop's side over the image's short side; 1 keeps the whole
            short side, 224 / 256 = 0.875 is ImageNet's "resize 256, centre crop 224".
        interpolation: "bilinear" or "bicubic": torchvision's ``Resize(round(resolution /
            crop_ratio), interpolation)`` + ``CenterCrop(resolution)`` on a PIL image, bit
            for bit; "area": crop first, then shrink with cv2's INTER_AREA (FFCV's
            CenterCropRGBImageDecoder). None: ``default_interpolation(resolution)``.
    """
    _check(resolution, mean, std, order)
    if not 0 < crop_ratio <= 1:  # NaN fails this too
        raise ValueError(f"crop_ratio={crop_ratio!r}: expected 0 < crop_ratio <= 1, the centre "
                         f"crop's side over the short side (0.875 = ImageNet's 224 of 256)")
    if interpolation is None:
        interpolation = default_interpolation(resolution)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}: expected one of {list(INTERPOLATIONS)} "
                         f"or None (bilinear above {SMALL_IMAGE_MAX} px, area up to it)")
    crop = ("center", {"ratio": float(crop_ratio), "interpolation": interpolation})
    return _loader(path, batch_size, crop, resolution,
                   mean=mean, std=std, indices=indices, order=order,
                   distributed=distributed, device=device,
                   num_workers=num_workers, drop_last=drop_last,
                   with_identifier=with_identifier, seed=seed)


def train_loader(path: str | os.PathLike, batch_size: int, *, resolution: int,
                 mean: Sequence[float], std: Sequence[float], indices: Sequence[int] | None = None,
                 order: str = "random", distributed: bool = False, device="cpu",
                 num_workers: int | None = None, drop_last: bool = False,
                 with_identifier: bool = False, seed: int = 0,
                 scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO,
                 flip: bool = True):
    """Training loader: random resized crop (``scale``, ``ratio``) to ``resolution``,
    random horizontal flip (``flip``; turn it off for digits and text, whose mirror
    images are other glyphs), normalise. Arguments as for ``eval_loader``.

    ``seed`` fixes the sample order; with FFCV the crops and flips come from numba's
    generator, which ffcv does not seed; the torch loaders seed them by (seed, epoch, batch).
    """
    _check(resolution, mean, std, order)
    crop = ("random", {"scale": tuple(scale), "ratio": tuple(ratio), "flip": bool(flip)})
    return _loader(path, batch_size, crop, resolution, mean=mean, std=std, indices=indices,
                   order=order, distributed=distributed, device=device,
                   num_workers=num_workers, drop_last=drop_last,
                   with_identifier=with_identifier, seed=seed)


def channel_stats(source, *, image_key: str = "image", label_key: str = "label"
                  ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of all pixels, on the 0..1 scale: ``(mean, std)``.

    ``source`` is a beton path (read back without a loader) or a map-style dataset of
    items ``sample_of`` accepts (keys as there); grayscale counts as 3 equal channels.
    """
    if isinstance(source, (str, os.PathLike)):
        images = (image for image, _, _ in iter_samples(source))
    else:
        images = (sample_of(source[i], image_key=image_key, label_key=label_key)[0]
                  for i in range(len(source)))
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    for image in images:
        pixels = image.reshape(-1, 3).astype(np.float64) / 255
        total += pixels.sum(0)
        squares += (pixels ** 2).sum(0)
        count += len(pixels)
    if count == 0:
        raise ValueError(f"channel_stats: {source!r} holds no pixels")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0))
    return tuple(mean.tolist()), tuple(std.tolist())
