"""The loaders of ``loaders.py`` without FFCV: torch DataLoaders over the same betons.

``BetonLoader`` yields what FFCV's pipelines in ``loaders.py`` yield (the same tuple,
dtypes, normalisation lookup table and channels-last layout) in the same sample order
for the same seed, epoch, order, indices and shards, since it computes that order as
FFCV's traversal orders do. Crops follow FFCV's decoders: the centre crop of
``crop_ratio`` x the short side, and RandomResizedCrop sampled by FFCV's rule, then a
resize to the output side (cv2's INTER_AREA as FFCV, or PIL without cv2); or, for eval
with a bilinear or bicubic ``interpolation``, torchvision's resize then centre crop
through PIL (``resampling.py``). Unlike FFCV,
the crops and flips are seeded: by (seed, epoch, batch), so they do not depend on
``num_workers``.

Decoding runs in ``num_workers`` DataLoader processes (this process for 1), a batch each
at a time; FFCV's numba threads are several times faster.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import format as beton_format
from .beton import _open
from .resampling import resize_center_crop


def normalize_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 (256, 3): pixel value -> normalised value a channel, computed as FFCV's
    NormalizeImage computes its table (float64, then float32), so values match bit for bit."""
    mean, std = np.array(mean) * 255, np.array(std) * 255
    return ((np.arange(256)[:, None] - mean[None, :]) / std[None, :]).astype(np.float32)


def center_crop(height: int, width: int, ratio: float) -> tuple[int, int, int, int]:
    """FFCV's CenterCropRGBImageDecoder crop: (top, left, height, width)."""
    side = int(ratio * min(height, width))
    return (height - side) // 2, (width - side) // 2, side, side


def random_crop(height: int, width: int, scale, ratio,
                rng: np.random.Generator) -> tuple[int, int, int, int]:
    """FFCV's (and torchvision's) RandomResizedCrop rule: up to 10 tries of an area in
    ``scale`` and a log-uniform aspect ratio in ``ratio``, else the central crop of the
    nearest allowed aspect ratio. (top, left, height, width)."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.uniform(0, height - h + 1)), int(rng.uniform(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize_to(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 (h, w, 3) -> (side, side, 3): cv2's INTER_AREA (FFCV's resize) where cv2 is
    installed; else PIL's BOX filter to shrink (an area average too) and bilinear to enlarge."""
    if image.shape[0] == side and image.shape[1] == side:
        return image
    cv2 = beton_format._cv2()
    if cv2 is not None:
        return cv2.resize(np.ascontiguousarray(image), (side, side), interpolation=cv2.INTER_AREA)
    shrink = image.shape[0] >= side and image.shape[1] >= side
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((side, side), resample))


class Normalize(torch.nn.Module):
    """uint8 (B, 3, H, W) -> float32 (B, 3, H, W), (x / 255 - mean) / std per channel.

    For GPU batches; on the CPU ffcv's numba lookup table is 5-20x faster than torch.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        super().__init__()
        shape = (1, 3, 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape) * 255)
        self.to(device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


class _Batches(Dataset):
    """One epoch's batches: ``batches[b]`` -> (images, labels[, identifiers]) as tensors;
    images float32 normalised (channels-last (B, 3, S, S)), or uint8 for a GPU to normalise."""

    def __init__(self, loader: "BetonLoader", batches: list[np.ndarray], epoch: int):
        self.images = loader.images
        self.labels = loader.labels
        self.identifiers = loader.identifiers if loader.with_identifier else None
        self.crop = loader.crop
        self.side = loader.resolution
        self.table = loader.table if loader.device.type == "cpu" else None
        self.batches = batches
        self.seeds = (loader.seed, epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int):
        positions = self.batches[b]
        rng = np.random.default_rng([*self.seeds, b])
        out = np.empty((len(positions), self.side, self.side, 3), np.uint8)
        kind, options = self.crop
        for slot, position in enumerate(positions.tolist()):
            image = self.images[position]
            height, width = image.shape[:2]
            if kind == "center" and options["interpolation"] != "area":  # resize, then crop
                resize = round(self.side / options["ratio"])
                out[slot] = resize_center_crop(image, self.side, resize, options["interpolation"])
                continue
            if kind == "center":
                top, left, h, w = center_crop(height, width, options["ratio"])
            else:
                top, left, h, w = random_crop(height, width, options["scale"], options["ratio"], rng)
            out[slot] = resize_to(image[top:top + h, left:left + w], self.side)
        if kind == "random" and options["flip"]:
            flipped = rng.random(len(positions)) < 0.5  # FFCV's RandomHorizontalFlip(0.5)
            out[flipped] = out[flipped, :, ::-1]
        # (B, S, S, 3) memory viewed as (B, 3, S, S): channels-last, as FFCV's ToTorchImage
        images = torch.from_numpy(out if self.table is None
                                  else self.table[out, np.arange(3)]).permute(0, 3, 1, 2)
        columns = [torch.from_numpy(self.labels[positions])]
        if self.identifiers is not None:
            columns.append(torch.from_numpy(self.identifiers[positions]))
        return (images, *columns)


class BetonLoader:
    """A torch DataLoader over a beton, behaving as ``ffcv.loader.Loader`` does for
    fastvote: ``len()``, ``batch_size``, ``next_epoch`` (the epoch whose order the next
    ``for`` takes; each ``for`` then increments it), one epoch per ``for``."""

    def __init__(self, path: str | os.PathLike, batch_size: int, *, crop: tuple[str, dict],
                 resolution: int, mean, std, positions: np.ndarray | None, order: str,
                 distributed: bool, device, num_workers: int, drop_last: bool,
                 with_identifier: bool, seed: int):
        reader, column = _open(path)
        self.path = str(path)
        self.images = beton_format.Images(reader)
        self.labels = np.asarray(column["label"], dtype=np.int64)
        self.identifiers = np.asarray(column["identifier"], dtype=np.int64)
        self.batch_size = batch_size
        self.crop = crop
        self.resolution = int(resolution)
        self.table = normalize_table(mean, std)
        self.device = torch.device(device)
        if self.device.type != "cpu":
            self.normalize = Normalize(mean, std, self.device)
        self.indices = (np.arange(reader.num_samples, dtype=np.uint64) if positions is None
                        else np.asarray(positions))
        self.order = order
        self.seed = seed
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.with_identifier = with_identifier
        # FFCV's traversal orders shard with torch's DistributedSampler, without dropping
        self.sampler = (DistributedSampler(self.indices, shuffle=order == "random", seed=seed,
                                           drop_last=False) if distributed else None)
        self.next_epoch = 0
        self.length = len(self.sample_order(0))

    def sample_order(self, epoch: int) -> np.ndarray:
        """The beton positions of epoch ``epoch``, in order (FFCV's Random and Sequential)."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            return self.indices[np.array(list(self.sampler))]
        if self.order == "random":
            return np.random.default_rng(self.seed + epoch).permutation(self.indices)
        return self.indices

    def __len__(self) -> int:
        if self.drop_last:
            return self.length // self.batch_size
        return -(-self.length // self.batch_size)

    def __iter__(self):
        epoch = self.next_epoch
        order = self.sample_order(epoch)[:len(self) * self.batch_size].astype(np.int64)
        self.next_epoch += 1
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        workers = self.num_workers if self.num_workers > 1 else 0
        loader = DataLoader(_Batches(self, batches, epoch), batch_size=None, shuffle=False,
                            num_workers=min(workers, len(batches)),
                            pin_memory=self.device.type == "cuda")
        for images, *columns in loader:
            if self.device.type != "cpu":
                images = self.normalize(images.to(self.device, non_blocking=True))
                columns = [c.to(self.device, non_blocking=True) for c in columns]
            yield (images, *columns)
