"""Self-supervised pretraining with MoCo v2 (He et al., CVPR 2020, "Momentum Contrast";
Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning").

The paper pretrains its self-supervised source models with MoCo v2 (SPEC.md, "The
protocol to reproduce"); FM voting is the pruning method meant for them. This module
trains a fastvote :class:`~fastvote.models.Classifier`'s backbone that way, in place;
the caller then linear-probes it (:func:`fastvote.train.finetune`).

The method. Two augmented views of every image (:func:`two_crops`) go through a query
encoder (backbone + projection head, trained by SGD) and a key encoder (a copy whose
parameters follow the query's by an exponential moving average, ``k = m*k + (1-m)*q``
after every step, never by gradients). Query and key embeddings are L2-normalised; the
positive of query i is key i, the negatives are the keys of earlier batches held in a
FIFO queue [dim, queue_size]. The loss is InfoNCE: cross-entropy over
``[q.k+, q.queue] / temperature`` with the positive at index 0. After the loss the
batch's keys are enqueued (gathered from every rank under torch.distributed).

Defaults are MoCo v2's ImageNet recipe: batch 256, SGD lr 0.03 (scale it linearly with
the batch size), momentum 0.9, weight decay 1e-4 on every parameter, cosine decay (here
per iteration), 128-d output, 2-layer MLP head (hidden width = the backbone's feature
width), queue 65536, key momentum 0.999, temperature 0.2; augmentation: random resized
crop (scale 0.2-1), colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2,
Gaussian blur (sigma 0.1-2) p 0.5, horizontal flip.

Choices where MoCo's release does not carry over as is:

- Augmentation runs batched on the loader's normalised output, on its device
  (:func:`two_crops`), not per PIL image in data-loading workers: fastvote's FFCV
  loaders give normalised tensors. Each op computes what torchvision's does on one
  image (the tests compare them). The crop is one affine ``grid_sample`` (bilinear,
  sampling clamped to the box; crops never exceed the image, so the resize only
  upsamples and antialiasing does not matter); the flip is folded into the same
  affine map (it commutes with the colour ops and the symmetric blur). Colour jitter
  applies its four ops in a random order per sample, as torchvision's ColorJitter
  does per image. The blur kernel is odd, about 10% of the image side and at least
  3 px (23 px at 224 px, as usual with torchvision's GaussianBlur; 3 px at 16-32 px,
  where sigma 2 then acts as a near-box blur).
- Shuffling BN. MoCo computes the key encoder's BatchNorm statistics on a random
  re-grouping of the batch across GPUs, so that a query and its positive key do not
  share batch statistics (which would let the model find its positive by the batch's
  "signature" instead of by content). On one process, permuting a batch that one
  BatchNorm sees whole changes nothing (the statistics are permutation-invariant), so
  the substitute is MoCo's single-GPU recipe (its official CIFAR demo): BatchNorm
  statistics are computed over groups of ``bn_group_size`` samples (SplitBatchNorm,
  done here by running the unmodified backbone once a group, so the model's own
  modules stay untouched), the query encoder on consecutive groups, the key encoder on
  the groups of a randomly permuted batch, then unpermuted. Under torch.distributed the
  permutation spans all ranks' images (MoCo's ``_batch_shuffle_ddp``) and each rank
  groups its share. ``bn_group_size=None`` puts the whole per-process batch in one
  group: on one process, no shuffle at all. The running statistics (what a linear
  probe uses) are updated once a group, i.e. a few times a step.
- The learning rate follows a cosine per iteration (MoCo v2 steps it per epoch).

Determinism and resume follow :func:`fastvote.train.train_classifier`: every epoch
re-seeds python, numpy and torch from ``(seed, epoch)`` and the augmentation generator
from ``(seed, epoch, rank)``, so a run killed after an epoch and resumed from its
checkpoint ends bitwise equal to an uninterrupted one on the CPU (on CUDA this also
needs ``torch.use_deterministic_algorithms(True)``, and the loader's order must be a
function of the epoch; see train.py's docstring).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() twice (two FFCV epochs)

from . import distributed, progress as bars, train
from .features import resolve_amp, split_batch
from .models import as_classifier, atomic_save, save_checkpoint, unwrap_model

__all__ = ["MocoConfig", "MoCo", "two_crops", "pretrain_moco", "STATE_FILE", "MODEL_FILE"]

STATE_FILE = "moco_state.pt"  # the resumable state, replaced at the end of every epoch
MODEL_FILE = "model.pt"       # the model (save_checkpoint format), when training ends
_STATE_FORMAT = "fastvote.moco_state"
_AUGMENT_STREAM = 0x6D6F636F  # tells the augmentation's seed apart from train.seed_epoch's
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_CROP_TRIES = 10  # torchvision's RandomResizedCrop attempts before its fallback


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pair(value: Any, n: int = 2) -> Optional[Tuple[float, ...]]:
    """``value`` as a tuple of n floats, or None when it is not n real numbers."""
    if not isinstance(value, (tuple, list)) or len(value) != n or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        return None
    return tuple(float(v) for v in value)


@dataclass
class MocoConfig:
    """The MoCo v2 recipe; defaults are the paper's ImageNet ones.

    Attributes:
        epochs: passes over the loader.
        batch_size: images a batch per process; the loader must be built with it (a
            loader exposing ``batch_size`` is checked).
        lr: SGD's initial rate, decayed to 0 by a per-iteration cosine; 0.03 is MoCo's
            for a (global) batch of 256: scale it linearly for other batch sizes.
        sgd_momentum, weight_decay: SGD's (weight decay on every trained parameter).
        dim: width of the normalised embedding (the projection's output).
        queue_size: negatives kept (any size: the queue wraps around).
        momentum: the key encoder's EMA coefficient m in ``k = m*k + (1-m)*q``.
        temperature: InfoNCE's temperature.
        mlp: 2-layer MLP projection head (MoCo v2); False -> one linear layer (v1).
        bn_group_size: samples a BatchNorm statistic is computed over (the shuffling-BN
            substitute, see the module docstring; 32 = MoCo's 256 over 8 GPUs); None ->
            the whole per-process batch.
        crop_scale, crop_ratio: the random resized crop's area fraction and aspect
            ratio (w/h) ranges.
        flip: random horizontal flip (p 0.5).
        jitter: colour jitter's (brightness, contrast, saturation, hue) strengths, as
            torchvision's ColorJitter; applied with probability ``jitter_p``.
        grayscale_p: probability of converting a view to grayscale.
        blur_p, blur_sigma: probability and sigma range of the Gaussian blur.
        seed: seeds every epoch's randomness together with the epoch index, and the
            projection head's and queue's initialisation.
        amp: mixed precision (:func:`fastvote.features.resolve_amp`): float16 autocast + GradScaler on CUDA,
            bfloat16 autocast on the CPU; None -> on for CUDA and for CPUs with bf16 units.
        log_every: iterations between progress-bar updates (each one syncs the device).
    """

    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.03
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    dim: int = 128
    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float = 0.2
    mlp: bool = True
    bn_group_size: Optional[int] = 32
    crop_scale: Tuple[float, float] = (0.2, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    seed: int = 0
    amp: Optional[bool] = None
    log_every: int = 20

    def __post_init__(self):
        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise ValueError(f"MocoConfig.{name}={getattr(self, name)!r}: expected {expected}")

        def real(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, numbers.Real) and not isinstance(value, bool)

        for name in ("epochs", "batch_size", "dim", "queue_size", "log_every"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an int >= 1")
        need(_is_int(self.seed), "seed", "an int")
        need(real("lr") and self.lr > 0, "lr", "a number > 0")
        need(real("sgd_momentum") and 0 <= self.sgd_momentum < 1, "sgd_momentum", "in [0, 1)")
        need(real("weight_decay") and self.weight_decay >= 0, "weight_decay", ">= 0")
        need(real("momentum") and 0 <= self.momentum <= 1, "momentum", "in [0, 1]")
        need(real("temperature") and self.temperature > 0, "temperature", "> 0")
        need(isinstance(self.mlp, bool), "mlp", "a bool")
        need(isinstance(self.flip, bool), "flip", "a bool")
        need(self.bn_group_size is None or (_is_int(self.bn_group_size)
                                            and self.bn_group_size >= 2),
             "bn_group_size", "None or an int >= 2")
        for name in ("jitter_p", "grayscale_p", "blur_p"):
            need(real(name) and 0 <= getattr(self, name) <= 1, name, "a probability in [0, 1]")
        need(self.amp is None or isinstance(self.amp, bool), "amp", "None, True or False")
        scale, ratio = _pair(self.crop_scale), _pair(self.crop_ratio)
        sigma, jitter = _pair(self.blur_sigma), _pair(self.jitter, 4)
        need(scale is not None and 0 < scale[0] <= scale[1] <= 1, "crop_scale",
             "(low, high) with 0 < low <= high <= 1")
        need(ratio is not None and 0 < ratio[0] <= ratio[1], "crop_ratio",
             "(low, high) with 0 < low <= high")
        need(sigma is not None and 0 < sigma[0] <= sigma[1], "blur_sigma",
             "(low, high) with 0 < low <= high")
        need(jitter is not None and min(jitter[:3]) >= 0 and 0 <= jitter[3] <= 0.5, "jitter",
             "(brightness, contrast, saturation, hue), the first three >= 0, hue in [0, 0.5]")
        # tuples of floats: a list given here must compare equal to the tuple a checkpoint holds
        self.crop_scale, self.crop_ratio, self.blur_sigma, self.jitter = scale, ratio, sigma, jitter

    def lr_at(self, t: float) -> float:
        """The cosine rate at ``t`` epochs into training (fractional)."""
        return 0.5 * self.lr * (1 + math.cos(math.pi * t / self.epochs))


# --------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------

def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return torch.empty(n, device=generator.device).uniform_(low, high, generator=generator)


def _crop_params(b: int, h: int, w: int, config: MocoConfig, generator: torch.Generator
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per sample (top, left, height, width, flip) on the generator's device: torchvision's
    RandomResizedCrop.get_params, vectorised (the first of 10 tries that fits the image,
    else the whole image with its aspect ratio clamped to the range), and a coin for the
    horizontal flip (always False without ``config.flip``)."""
    rand = torch.rand(b, _CROP_TRIES, 2, device=generator.device, generator=generator)
    low, high = config.crop_scale
    area = h * w * (low + (high - low) * rand[..., 0])
    log_low, log_high = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    ratio = torch.exp(log_low + (log_high - log_low) * rand[..., 1])
    cw, ch = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax gives the first maximum
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    aspect = w / h
    if aspect < config.crop_ratio[0]:
        fallback = (w, round(w / config.crop_ratio[0]))
    elif aspect > config.crop_ratio[1]:
        fallback = (round(h * config.crop_ratio[1]), h)
    else:
        fallback = (w, h)
    found = fits.any(1)
    cw = torch.where(found, cw, float(fallback[0]))
    ch = torch.where(found, ch, float(fallback[1]))
    offsets = torch.rand(b, 2, device=generator.device, generator=generator)
    top = torch.where(found, (offsets[:, 0] * (h - ch + 1)).floor(), (h - ch) // 2)
    left = torch.where(found, (offsets[:, 1] * (w - cw + 1)).floor(), (w - cw) // 2)
    flip = (torch.rand(b, device=generator.device, generator=generator) < 0.5) & config.flip
    return top, left, ch, cw, flip


def _resized_crop(x: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor,
                  flip: Tensor) -> Tensor:
    """Crop each sample to its box, resize it to x's size (bilinear), flip where asked:
    one batched affine resampling."""
    b, _, h, w = x.shape
    # Output pixel u samples input column left + (u + 0.5) * width / w - 0.5 (the resize
    # convention of align_corners=False); in grid_sample's [-1, 1] coordinates that is
    # x_in = (width / w) * x_out + (2 * left + width) / w - 1. A flip negates x_out.
    theta = torch.zeros(b, 2, 3, device=top.device)
    theta[:, 0, 0] = torch.where(flip, -1.0, 1.0) * width / w
    theta[:, 0, 2] = (2 * left + width) / w - 1
    theta[:, 1, 1] = height / h
    theta[:, 1, 2] = (2 * top + height) / h - 1
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    # Clamp to the centres of the box's edge pixels, as resizing the cropped image
    # would: the edge rows must not blend in pixels outside the box.
    for axis, start, length, side in ((0, left, width, w), (1, top, height, h)):
        low = ((2 * start + 1) / side - 1).to(x.device).view(b, 1, 1)
        high = ((2 * (start + length - 1) + 1) / side - 1).to(x.device).view(b, 1, 1)
        grid[..., axis] = torch.minimum(torch.maximum(grid[..., axis], low), high)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    """[n, 3, H, W] -> luma [n, 1, H, W]."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor | float, factor: Tensor) -> Tensor:
    """torchvision's _blend: factor * x + (1 - factor) * other, clamped to [0, 1]."""
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def _rotate_hue(x: Tensor, shift: Tensor) -> Tensor:
    """torchvision's adjust_hue, batched: RGB -> HSV, hue + shift (mod 1), -> RGB."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    flat = maxc == minc
    chroma = maxc - minc
    saturation = chroma / torch.where(flat, torch.ones_like(maxc), maxc)
    chroma = torch.where(flat, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / chroma, (maxc - g) / chroma, (maxc - b) / chroma
    hue = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
           + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    hue = torch.remainder(hue / 6.0 + shift.view(-1, 1, 1), 1.0)
    sector = hue * 6.0
    i = sector.floor()
    f = sector - i
    v = maxc
    p = (v * (1.0 - saturation)).clamp(0, 1)
    q = (v * (1.0 - saturation * f)).clamp(0, 1)
    t = (v * (1.0 - saturation * (1.0 - f))).clamp(0, 1)
    n, height, width = v.shape
    # rows: R, G, B; columns: the six hue sectors
    table = torch.stack((v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q), 1)
    table = table.view(n, 3, 6, height, width)
    index = (i.long() % 6).view(n, 1, 1, height, width).expand(n, 3, 1, height, width)
    return table.gather(2, index).squeeze(2)


def _colour_jitter(x: Tensor, config: MocoConfig, generator: torch.Generator) -> Tensor:
    """torchvision's ColorJitter with probability ``jitter_p``: per sample, random
    factors and a random order of brightness, contrast, saturation and hue."""
    b = len(x)
    brightness, contrast, saturation, hue = config.jitter
    applied = torch.rand(b, device=generator.device, generator=generator) < config.jitter_p
    factors = [_uniform(b, max(0.0, 1 - s), 1 + s, generator)
               for s in (brightness, contrast, saturation)] + [_uniform(b, -hue, hue, generator)]
    order = torch.rand(b, 4, device=generator.device, generator=generator).argsort(1)
    ops: List[Callable[[Tensor, Tensor], Tensor]] = [
        lambda v, f: _blend(v, 0.0, f.view(-1, 1, 1, 1)),
        lambda v, f: _blend(v, _gray(v).mean((1, 2, 3), keepdim=True), f.view(-1, 1, 1, 1)),
        lambda v, f: _blend(v, _gray(v), f.view(-1, 1, 1, 1)),
        _rotate_hue,
    ]
    strengths = (brightness, contrast, saturation, hue)
    for position in range(4):
        for op_index, op in enumerate(ops):
            if strengths[op_index] == 0:  # torchvision skips an op of strength 0
                continue
            rows = (applied & (order[:, position] == op_index)).nonzero().squeeze(1)
            if len(rows):
                rows_here = rows.to(x.device)
                x[rows_here] = op(x[rows_here], factors[op_index][rows].to(x.device))
    return x


def _blur_kernel_size(side: int) -> int:
    """Odd, ~10% of the image side, at least 3 (23 at 224 px)."""
    return max(3, int(side * 0.1) // 2 * 2 + 1)


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with one sigma a sample, reflect padding (torchvision's)."""
    n, c, h, w = x.shape
    size = _blur_kernel_size(min(h, w))
    offsets = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    kernel = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, size]
    flat = F.pad(x.reshape(1, n * c, h, w), [size // 2] * 4, mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, size, 1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, size), groups=n * c)
    return flat.view(n, c, h, w)


def _augment(x: Tensor, config: MocoConfig, generator: torch.Generator) -> Tensor:
    """One MoCo v2 view of pixel images [B, 3, H, W] in [0, 1]; values stay in [0, 1]."""
    b = len(x)
    x = _resized_crop(x, *_crop_params(b, x.shape[2], x.shape[3], config, generator))
    x = _colour_jitter(x, config, generator)
    gray = (torch.rand(b, device=generator.device, generator=generator)
            < config.grayscale_p).nonzero().squeeze(1).to(x.device)
    x[gray] = _gray(x[gray]).expand(-1, 3, -1, -1)
    blurred = torch.rand(b, device=generator.device, generator=generator) < config.blur_p
    sigma = _uniform(b, *config.blur_sigma, generator)
    rows = blurred.nonzero().squeeze(1)
    if len(rows):
        rows_here = rows.to(x.device)
        x[rows_here] = _gaussian_blur(x[rows_here], sigma[rows].to(x.device, x.dtype))
    return x


def _channel_tensor(values: Sequence[float], name: str, device: torch.device) -> Tensor:
    """[1, 3, 1, 1] on ``device``, checked on the host (no device sync)."""
    values = [float(v) for v in values]
    if len(values) != 3 or (name == "std" and min(values) <= 0):
        raise ValueError(f"{name}={tuple(values)!r}: expected 3 values (one a channel, on the "
                         f"0..1 scale, as the loader normalised with)"
                         + (", all > 0" if name == "std" else ""))
    return torch.tensor(values, device=device).view(1, 3, 1, 1)


def two_crops(images: Tensor, *, mean: Sequence[float], std: Sequence[float],
              config: MocoConfig, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Two independent MoCo v2 views (query, key) of a batch of normalised images.

    Args:
        images: float [B, 3, H, W], normalised as fastvote's loaders give them,
            ``(pixels - mean) / std`` with pixels on the 0..1 scale.
        mean, std: that normalisation (3 values each, 0..1 scale).
        config: the augmentation settings (``crop_scale``, ``crop_ratio``, ``flip``,
            ``jitter``, ``jitter_p``, ``grayscale_p``, ``blur_p``, ``blur_sigma``).
        generator: the only source of randomness (same seed -> same views); its
            parameters are drawn on its device, the images processed on theirs.

    Returns:
        (query, key): float32 [B, 3, H, W] each, normalised with ``mean`` / ``std``.
        The work is done on pixels in [0, 1] (unnormalised, clamped, augmented,
        renormalised), so the views' pixels stay in [0, 1].
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 \
            or min(images.shape[2:]) < 2 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images: got {shape}; expected a float tensor [B, 3, H, W] with "
                         f"H, W >= 2")
    if not isinstance(config, MocoConfig):
        raise TypeError(f"config: expected a MocoConfig, got {type(config).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    mean_t = _channel_tensor(mean, "mean", images.device)
    std_t = _channel_tensor(std, "std", images.device)
    # FFCV's images come from uint8, so they are in [0, 1]; the clamp absorbs rounding
    pixels = (images.float() * std_t + mean_t).clamp_(0, 1)
    return tuple((_augment(pixels, config, generator) - mean_t) / std_t for _ in range(2))


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------

def _all_gather(x: Tensor) -> Tensor:
    """Concatenation over ranks (rank order) of equally shaped tensors; no gradient."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _Encoder(nn.Module):
    """backbone -> projection; in training, BatchNorm statistics per group of
    ``bn_group_size`` consecutive samples (SplitBatchNorm without touching the
    backbone's modules: the backbone runs once a group)."""

    def __init__(self, backbone: nn.Module, projection: nn.Module,
                 bn_group_size: Optional[int]):
        super().__init__()
        self.backbone = backbone
        self.projection = projection
        self.bn_group_size = bn_group_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.bn_group_size is None or len(x) <= self.bn_group_size:
            return self.projection(self.backbone(x))
        groups = x.tensor_split(len(x) // self.bn_group_size)
        return self.projection(torch.cat([self.backbone(g) for g in groups]))


class MoCo(nn.Module):
    """MoCo v2: query encoder, momentum key encoder, queue of negatives, InfoNCE.

    Args:
        backbone: maps float [B, 3, H, W] to features [B, feature_dim] (e.g. a
            Classifier's ``.backbone``); it becomes the query encoder's trunk as is
            (not copied), so training this module trains it.
        feature_dim: the backbone's output width.
        dim, queue_size, momentum, temperature, mlp, bn_group_size: see
            :class:`MocoConfig`.

    Attributes:
        encoder_q: backbone + projection head, trained by gradients.
        encoder_k: a deep copy of ``encoder_q``, no gradients (``requires_grad`` False),
            moved by :meth:`momentum_update`. It runs in the module's mode (train mode
            in training, as MoCo: its BatchNorm uses batch statistics).
        queue: buffer float [dim, queue_size], L2-normalised keys (columns), initially
            random unit vectors; ``queue_ptr`` (int64 [1]) is where the next key goes.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, *, dim: int = 128,
                 queue_size: int = 65536, momentum: float = 0.999, temperature: float = 0.2,
                 mlp: bool = True, bn_group_size: Optional[int] = 32):
        super().__init__()
        for name, value in (("feature_dim", feature_dim), ("dim", dim),
                            ("queue_size", queue_size)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an int >= 1")
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum={momentum!r}: expected in [0, 1]")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: expected > 0")
        if bn_group_size is not None and (not _is_int(bn_group_size) or bn_group_size < 2):
            raise ValueError(f"bn_group_size={bn_group_size!r}: expected None or an int >= 2")
        self.momentum = float(momentum)
        self.temperature = float(temperature)
        # MoCo v2's head: the backbone's fc becomes Linear(F, F) -> ReLU -> Linear(F, dim)
        projection = (nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True),
                                    nn.Linear(feature_dim, dim))
                      if mlp else nn.Linear(feature_dim, dim))
        self.encoder_q = _Encoder(backbone, projection, bn_group_size)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for param in self.encoder_k.parameters():
            param.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``k = m * k + (1 - m) * q`` for every parameter of the key encoder (not its
        buffers: its BatchNorm statistics are its own, as in MoCo). Call it after each
        optimizer step."""
        keys = list(self.encoder_k.parameters())
        queries = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_mul_(keys, self.momentum)  # one kernel a group, not one a tensor
        torch._foreach_add_(keys, queries, alpha=1 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` [n, dim] at the pointer, wrapping around (of more than
        queue_size keys only the last queue_size are kept); no host sync."""
        size = self.queue.shape[1]
        n = len(keys)
        if n > size:
            keys = keys[n - size:]
            self.queue_ptr.add_(n - size).remainder_(size)
        columns = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[:, columns] = keys.T.to(self.queue.dtype)
        self.queue_ptr.add_(len(keys)).remainder_(size)

    @torch.no_grad()
    def _keys(self, im_k: Tensor) -> Tuple[Tensor, Tensor]:
        """(this process's keys [B, dim], every rank's keys [world*B, dim] in rank order),
        L2-normalised; the key encoder sees a randomly permuted batch (shuffling BN).

        The permutation comes from torch's global generator on ``im_k``'s device
        (rank 0's, broadcast, under torch.distributed).
        """
        spread = distributed.active()
        images = _all_gather(im_k) if spread else im_k
        perm = torch.randperm(len(images), device=im_k.device)
        if spread:
            dist.broadcast(perm, src=0)
        mine = perm.view(distributed.world_size(), -1)[distributed.rank()]
        shuffled = F.normalize(self.encoder_k(images[mine]), dim=1)
        shuffled = _all_gather(shuffled) if spread else shuffled
        keys = torch.empty_like(shuffled)
        keys[perm] = shuffled  # unshuffle: row perm[j] of the batch was encoded at j
        return keys.view(-1, len(im_k), keys.shape[1])[distributed.rank()], keys

    def forward(self, im_q: Tensor, im_k: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """InfoNCE on a batch of (query view, key view) pairs, then enqueue the keys.

        Returns:
            loss (scalar, float32), logits [B, 1 + queue_size] (already divided by the
            temperature; column 0 is the positive), labels [B] (zeros).
        """
        q = F.normalize(self.encoder_q(im_q), dim=1)
        k, all_keys = self._keys(im_k)
        positive = (q * k).sum(1, keepdim=True)
        # clone: the queue is overwritten in place below, and autograd keeps it for q's grad
        negative = q @ self.queue.clone().detach().to(q.dtype)
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        self._enqueue(all_keys)
        return loss, logits, labels


# --------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------

def _no_forward_buffer_sync() -> Dict[str, bool]:
    """DDP's keyword that turns off the buffer broadcast of every forward (still synced
    at construction); recent torch renamed it and warns on the old name."""
    parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return ({"forward_sync_buffers": False} if "forward_sync_buffers" in parameters
            else {"broadcast_buffers": False})


def _augment_generator(seed: int, epoch: int) -> torch.Generator:
    """The epoch's augmentation generator (CPU), distinct per rank."""
    value = np.random.SeedSequence([seed, epoch, distributed.rank(),
                                    _AUGMENT_STREAM]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(value))


def _two_views(batch, *, mean, std, config: MocoConfig, generator: torch.Generator,
               device: torch.device) -> Tuple[Tensor, Tensor]:
    """A batch's (query view, key view), channels-last on CUDA: the ``prepare`` of
    MoCo's :func:`fastvote.train.run_epoch` (labels are not used)."""
    images = split_batch(batch)[0].to(device, non_blocking=True)
    im_q, im_k = two_crops(images, mean=mean, std=std, config=config, generator=generator)
    if device.type == "cuda":
        im_q = im_q.contiguous(memory_format=torch.channels_last)
        im_k = im_k.contiguous(memory_format=torch.channels_last)
    return im_q, im_k


@train.keeps_rng
def pretrain_moco(model: nn.Module, loader: Iterable, config: MocoConfig, *,
                  mean: Sequence[float], std: Sequence[float], device,
                  checkpoint_dir=None, progress: bool = True,
                  on_epoch_end: Optional[Callable[[int, Dict[str, list]], None]] = None
                  ) -> Dict[str, list]:
    """MoCo v2 pretraining of a Classifier's backbone, in place; resumable.

    Args:
        model: a :class:`~fastvote.models.Classifier` (or anything
            :func:`~fastvote.models.as_classifier` accepts, possibly DDP-wrapped). Its
            ``backbone`` is the query encoder's trunk and ends with the learned weights
            (in train mode); its ``head`` is not trained (a linear probe replaces it).
            Moved to ``device`` (channels-last on CUDA).
        loader: batches of (images, labels[, identifiers]), images normalised with
            ``mean`` / ``std`` (labels are ignored); needs ``len()``; re-iterated every
            epoch (see train.py's docstring for what its order must do for an exact
            resume).
        config: the recipe.
        mean, std: the loader's normalisation (3 values each, 0..1 scale), undone for
            augmentation and redone after it.
        device: where to train.
        checkpoint_dir: None, or a folder: ``moco_state.pt`` (the MoCo module with the
            backbone, key encoder and queue, optimizer, scaler, epoch, RNG states,
            history, config) is replaced atomically after every epoch, and
            ``model.pt`` (:func:`~fastvote.models.save_checkpoint` of ``model``) written at
            the end, by the main process only. If ``moco_state.pt`` exists the run
            resumes after its last finished epoch (the config must match, else
            ValueError).
        progress: tqdm bars (epochs, and batches within one).
        on_epoch_end: called with the epoch index and the history after each epoch's
            checkpoint is written.

    Under torchrun (torch.distributed initialised, e.g. by
    :func:`fastvote.distributed.init_from_env`) the MoCo module trains as DDP, so the
    query encoder's gradients are averaged over ranks; the loader must give each rank
    its shard (FFCV ``distributed=True`` or a DistributedSampler), in batches of the
    same size on every rank; batch sizes are per rank; keys are gathered from every
    rank before enqueueing and the key batch is shuffled across ranks; losses and top-1
    are over all ranks; rank 0 writes the checkpoints and a resume reads rank 0's state;
    at the end every rank holds rank 0's buffers (BatchNorm statistics).

    Returns:
        history: lists with one entry per finished epoch (including epochs done before a
        resume): ``epoch`` (0-based), ``lr`` (at the epoch's last iteration), ``loss``
        (mean InfoNCE), ``top1`` (how often the positive has the largest logit),
        ``seconds`` (wall time of the epoch).
    """
    device = distributed.local_device(device)
    amp = resolve_amp(config.amp, device)
    iters = train.batches_per_epoch(loader, "loader")
    if distributed.active() and not train.is_sharded(loader):
        raise ValueError("loader: under torch.distributed every rank must read its own shard; "
                         "build it with distributed=True (FFCV) or a DistributedSampler")
    loader_batch = getattr(loader, "batch_size", None)
    if loader_batch is not None and loader_batch != config.batch_size:
        raise ValueError(f"loader.batch_size={loader_batch} but config.batch_size="
                         f"{config.batch_size}: build the loader with the config's batch size "
                         f"(the learning rate is tuned to it)")
    _channel_tensor(mean, "mean", torch.device("cpu"))  # fail before any work
    _channel_tensor(std, "std", torch.device("cpu"))
    classifier = as_classifier(model)
    classifier.to(device)
    # projection head and queue are drawn from the seed, not from whatever ran before
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        moco = MoCo(classifier.backbone, classifier.feature_dim, dim=config.dim,
                    queue_size=config.queue_size, momentum=config.momentum,
                    temperature=config.temperature, mlp=config.mlp,
                    bn_group_size=config.bn_group_size)
    moco.to(device)
    if device.type == "cuda":
        moco.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=config.lr,
                                momentum=config.sgd_momentum, weight_decay=config.weight_decay)
    scaler = train.grad_scaler(device, amp)
    history: Dict[str, list] = {k: [] for k in ("epoch", "lr", "loss", "top1", "seconds")}
    state_path, resumed, start = train.resume(
        checkpoint_dir, STATE_FILE, _STATE_FORMAT, config, module=moco, optimizer=optimizer, scaler=scaler,
        load=lambda m, state: m.load_state_dict(state["moco"]))
    history = resumed or history

    net: nn.Module = moco
    if distributed.active():
        # The whole module, as MoCo does: only the query encoder has trainable parameters.
        # No per-step buffer broadcast: the queue is identical on every rank already, and
        # BatchNorm statistics are synchronised once at the end.
        net = nn.parallel.DistributedDataParallel(
            moco, device_ids=[device.index] if device.type == "cuda" else None,
            **_no_forward_buffer_sync())

    bar = tqdm(range(start, config.epochs), initial=start, total=config.epochs, desc="moco",
               unit="epoch", disable=bars.disable(progress))
    for epoch in bar:
        train.seed_epoch(config.seed, epoch)
        train.set_loader_epoch(loader, epoch)
        began = time.perf_counter()
        # net's forward is InfoNCE on the two views: (loss, logits, labels); the key
        # encoder follows the query encoder after every step
        loss, top1, _ = train.run_epoch(
            net, loader, lambda views: net(*views), optimizer, scaler,
            lambda i: config.lr_at(epoch + i / iters), device=device, amp=amp,
            prepare=functools.partial(_two_views, mean=mean, std=std, config=config, device=device,
                                      generator=_augment_generator(config.seed, epoch)),
            on_step=lambda *_: moco.momentum_update(), total=iters, progress=progress,
            desc=f"epoch {epoch + 1}/{config.epochs}", log_every=config.log_every,
            what="InfoNCE loss")
        record = {"epoch": epoch, "lr": config.lr_at(epoch + (iters - 1) / iters),
                  "loss": loss, "top1": top1, "seconds": time.perf_counter() - began}
        for key, value in record.items():
            history[key].append(value)
        bar.set_postfix(loss=f"{loss:.4f}", top1=f"{top1:.3f}")
        if state_path is not None and distributed.is_main():
            atomic_save({
                "format": _STATE_FORMAT, "epoch": epoch + 1, "config": dataclasses.asdict(config),
                "moco": moco.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "history": history,
                "rng": train.rng_state()}, state_path)
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
    distributed.broadcast_buffers(moco)  # every rank ends with rank 0's BatchNorm statistics
    if checkpoint_dir is not None and distributed.is_main():
        save_checkpoint(Path(checkpoint_dir) / MODEL_FILE, unwrap_model(model), history=history,
                        config=dataclasses.asdict(config))
    distributed.barrier()  # the other ranks return once the checkpoint is there
    return history
