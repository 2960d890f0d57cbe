"""Training loops, written once: supervised (pre)training of a surrogate or of a
source model on a pruned subset (:func:`train_classifier`), transfer to a target
(:func:`finetune`: linear probe or full finetune), and top-1 (:func:`evaluate`).

Every optimizer step of the project (these loops, :func:`fastvote.ssl.pretrain_moco`,
the baselines' :func:`fastvote.scores.train_run`, adversarial training through
``perturb``) is taken by one epoch runner, :func:`run_epoch`: the rate schedule, AMP
(autocast, GradScaler) and the epoch's statistics live there alone; a loop supplies
its per-batch hooks (``prepare``, ``forward``, ``on_step``). The per-epoch seeding
and resume helpers (:func:`seed_epoch`, :func:`set_loader_epoch`, :func:`resume`,
:func:`rng_state`) are public for the loops of other modules.

Loaders are any iterables of ``(images, labels[, identifiers])`` batches (images
float [B, 3, H, W], labels int64 [B]): torch DataLoaders, or ``fastvote.data``'s
FFCV loaders. AMP is float16 autocast + GradScaler on CUDA and bfloat16 autocast on the
CPU (by default on CPUs with bf16 units: :func:`fastvote.features.resolve_amp`).

Recipes follow the DP4TL release (SPEC.md, "The protocol to reproduce"):
pretraining is SGD (momentum 0.9, weight decay 5e-5 on every parameter) with a
triangular learning rate stepped per iteration (0 -> ``lr`` at ``lr_peak_epoch`` ->
0 at the end); finetuning uses a per-iteration cosine decay to 0, Adam or SGD, and
picks its epoch on a validation split (the release picked it on test; SPEC's
DECISION forbids that).

Determinism and resume (``train_classifier``): at the start of every epoch,
python's, numpy's and torch's global generators are seeded from ``(seed, epoch)``
and the loader is told the epoch, so an epoch's randomness does not depend on
what ran before it. A run killed after epoch e and resumed from its checkpoint
therefore ends with bitwise the same weights as an uninterrupted run, provided
the loader's order is a function of the epoch:
  - a torch DataLoader with ``shuffle=True`` and no ``generator`` draws its order
    from torch's global generator, which is seeded per epoch: fine;
  - a DataLoader with a ``DistributedSampler`` gets ``sampler.set_epoch(epoch)``;
  - an FFCV Loader gets ``loader.next_epoch = epoch`` (its random order is
    ``seed + epoch``): build it with a fixed ``seed``. Its augmentations (crops,
    flips) come from numba's generator, which FFCV does not seed: with them a
    resumed run matches an uninterrupted one in distribution, not bitwise.
On CUDA, bitwise equality also needs ``torch.use_deterministic_algorithms(True)``
(cuDNN picks nondeterministic kernels otherwise); this module does not change
that global setting.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() twice (two FFCV epochs)

from . import data as fvdata, distributed, progress as bars
from .features import autocast, iterate_outputs, resolve_amp, split_batch
from .rng import keeps_rng, rng_state, set_rng_state
from .models import (Classifier, as_classifier, atomic_save, load_state_dict_flexible,
                     save_checkpoint, unwrap_model)

__all__ = [
    "TrainConfig", "train_classifier", "training_setup", "finetune", "evaluate",
    "run_epoch", "EpochStats", "to_device", "classification", "seed_epoch", "set_loader_epoch",
    "rng_state", "resume", "is_sharded", "batches_per_epoch", "epoch_samples", "warn_small_epoch",
    "FINETUNE_MODES", "FINETUNE_OPTIMIZERS", "FINETUNE_DEFAULTS", "STATE_FILE", "MODEL_FILE",
]

# perturb(model, images, labels) -> images: a training-batch transform that sees the model
Perturb = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# run_epoch's hooks. prepare(batch) -> inputs, outside autocast (device copies, augmentation,
# attacks); forward(inputs) -> (loss, logits [B, K], labels [B]), under autocast;
# on_step(inputs, logits, labels), after each optimizer step.
Prepare = Callable[[Any], Any]
Forward = Callable[[Any], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
OnStep = Callable[[Any, torch.Tensor, torch.Tensor], None]

STATE_FILE = "train_state.pt"  # the resumable state, replaced at the end of every epoch
MODEL_FILE = "model.pt"        # the trained model (save_checkpoint format), when training ends
_STATE_FORMAT = "fastvote.train_state"

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("triangular", "cosine")
FINETUNE_MODES = ("linear", "full")
FINETUNE_OPTIMIZERS = ("adam", "sgd")
# The release's transfer configs (configs/imagenet_transfer_to_downstream/*.json):
# batch 128, cosine decay, LP Adam 0.01 / 50 epochs, FF Adam 1e-4 or SGD 0.1 wd 5e-4 / 200.
# A linear probe with SGD is not in the release; 0.1 is SGD's usual probe rate.
FINETUNE_DEFAULTS: Dict[Tuple[str, str], Dict[str, float]] = {
    ("linear", "adam"): {"epochs": 50, "lr": 0.01, "weight_decay": 0.0},
    ("linear", "sgd"): {"epochs": 50, "lr": 0.1, "weight_decay": 0.0},
    ("full", "adam"): {"epochs": 200, "lr": 1e-4, "weight_decay": 0.0},
    ("full", "sgd"): {"epochs": 200, "lr": 0.1, "weight_decay": 5e-4},
}


@dataclass
class TrainConfig:
    """The supervised training recipe; defaults are the release's ResNet-18 surrogate
    on ImageNet (configs/imagenet_train_from_scratch/rn18_16.json).

    Attributes:
        epochs: passes over the training loader.
        batch_size: images a batch per process; the loader must be built with it (the
            learning rate is tuned to it), and a loader exposing ``batch_size`` is checked.
        lr: peak learning rate of the triangular schedule.
        momentum, weight_decay: SGD's (weight decay on every parameter, as the release).
        optimizer: "sgd" (the release's CNN recipe) or "adamw" (its ViT recipe;
            no weight decay on biases, norms, position embeddings and class token).
        schedule: "triangular" (0 -> ``lr`` at ``lr_peak_epoch`` -> 0, the CNN
            recipe) or "cosine" (linear warmup over ``warmup_epochs``, then cosine
            to 0: the ViT recipe).
        warmup_epochs: the cosine schedule's warmup, in epochs.
        lr_peak_epoch: where the rate peaks, in epochs; None -> ``epochs * 2 / 16``
            (the release peaks at epoch 2 of 16).
        label_smoothing: cross-entropy label smoothing.
        amp: mixed precision (:func:`fastvote.features.resolve_amp`): float16 autocast + GradScaler on CUDA,
            bfloat16 autocast on the CPU; None -> on for CUDA and for CPUs with bf16 units.
        seed: seeds every epoch's randomness together with the epoch index.
        log_every: iterations between progress-bar updates (each one syncs the device).
        min_resolution, max_resolution, start_ramp, end_ramp: progressive resolution
            (the release: 160, 192, 11, 13 for 16 epochs); all None -> off. Before
            each epoch :func:`train_classifier` sets its loader's crop side to
            :meth:`resolution_at` (``fastvote.data.set_resolution``: loaders of
            ``fastvote.data`` only).
    """

    epochs: int = 16
    batch_size: int = 1024
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 5e-5
    optimizer: str = "sgd"
    schedule: str = "triangular"
    warmup_epochs: float = 0.0
    lr_peak_epoch: Optional[float] = None
    label_smoothing: float = 0.0
    amp: Optional[bool] = None
    seed: int = 0
    log_every: int = 20
    min_resolution: Optional[int] = None
    max_resolution: Optional[int] = None
    start_ramp: Optional[int] = None
    end_ramp: Optional[int] = None

    def __post_init__(self):
        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: expected {expected}")

        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "an int >= 1")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size",
             "an int >= 1")
        need(self.lr > 0, "lr", "> 0")
        need(0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.lr_peak_epoch is None or 0 <= self.lr_peak_epoch <= self.epochs,
             "lr_peak_epoch", f"None or in [0, epochs={self.epochs}]")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {list(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, "schedule", f"one of {list(SCHEDULES)}")
        need(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", f"in [0, epochs={self.epochs}]")
        need(isinstance(self.log_every, int) and self.log_every >= 1, "log_every",
             "an int >= 1")
        ramp = (self.min_resolution, self.max_resolution, self.start_ramp, self.end_ramp)
        need(all(v is None for v in ramp) or (
            all(v is not None for v in ramp) and 0 < self.min_resolution <= self.max_resolution
            and 0 <= self.start_ramp <= self.end_ramp), "min_resolution",
            "min_resolution, max_resolution, start_ramp, end_ramp all None, or all set with "
            "0 < min_resolution <= max_resolution and start_ramp <= end_ramp")

    @property
    def peak_epoch(self) -> float:
        """``lr_peak_epoch`` resolved."""
        return self.epochs * 2 / 16 if self.lr_peak_epoch is None else float(self.lr_peak_epoch)

    def lr_at(self, t: float) -> float:
        """The rate at ``t`` epochs into training (fractional)."""
        if self.schedule == "cosine":
            if t < self.warmup_epochs:
                return self.lr * t / self.warmup_epochs
            done = (t - self.warmup_epochs) / max(self.epochs - self.warmup_epochs, 1e-12)
            return 0.5 * self.lr * (1 + math.cos(math.pi * min(done, 1.0)))
        peak = self.peak_epoch
        if t < peak:
            return self.lr * t / peak
        return self.lr * max(self.epochs - t, 0.0) / (self.epochs - peak)

    def resolution_at(self, epoch: int) -> Optional[int]:
        """The release's progressive resolution for ``epoch``: ``min_resolution`` up to
        ``start_ramp``, ``max_resolution`` from ``end_ramp``, linear in between, rounded
        to a multiple of 32. None when progressive resolution is off."""
        if self.min_resolution is None:
            return None
        if epoch <= self.start_ramp:
            return self.min_resolution
        if epoch >= self.end_ramp:
            return self.max_resolution
        res = np.interp(epoch, [self.start_ramp, self.end_ramp],
                        [self.min_resolution, self.max_resolution])
        return int(np.round(res / 32)) * 32


# --------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------

def seed_epoch(seed: int, epoch: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) from (seed, epoch)."""
    value = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def set_loader_epoch(loader: Iterable, epoch: int) -> None:
    """Tell a loader which epoch comes next, so its order depends on the epoch only."""
    if hasattr(loader, "next_epoch"):  # ffcv.loader.Loader
        loader.next_epoch = epoch
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):  # DistributedSampler
        sampler.set_epoch(epoch)


def is_sharded(loader: Iterable) -> bool:
    """Whether each rank reads its own part of `loader` (FFCV distributed=True,
    or a DataLoader with a DistributedSampler)."""
    if getattr(loader, "distributed", False):
        return True
    sampler = getattr(loader, "sampler", None)
    return isinstance(sampler, torch.utils.data.DistributedSampler)


def _data_parallel(model: nn.Module, loader: Iterable, device: torch.device, name: str,
                   require: bool) -> nn.Module:
    """``model`` wrapped in DDP under torchrun when each rank reads a shard of
    `loader`. An unsharded loader trains the whole set on every rank: an error
    when `require` (pretraining: N times the work for nothing), else the
    ranks simply compute the same thing."""
    if not distributed.active() or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    if not is_sharded(loader):
        if require:
            raise ValueError(f"{name}: under torch.distributed every rank must read its own shard; build it "
                             "with distributed=True (FFCV) or a DistributedSampler")
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def epoch_samples(loader: Iterable) -> Optional[int]:
    """The samples one epoch of ``loader`` draws (this rank's, when sharded) before it
    batches them, where the loader tells: ``fastvote.data``'s loaders (FFCV or torch) and
    torch DataLoaders with a sized sampler; else None."""
    order = getattr(loader, "first_traversal_order", None)  # ffcv.loader.Loader
    if order is not None:
        return len(order)
    length = getattr(loader, "length", None)  # fastvote.data.torch_loaders.BetonLoader
    if isinstance(length, numbers.Integral):
        return int(length)
    sampler = getattr(loader, "sampler", None)  # torch DataLoader
    if isinstance(loader, torch.utils.data.DataLoader) and hasattr(sampler, "__len__"):
        return len(sampler)
    return None


def batches_per_epoch(loader: Iterable, name: str) -> int:
    """``len(loader)``, or an error naming the argument ``name`` when it has none or is 0
    (a per-iteration schedule needs it); the error names the batch size and the samples."""
    if not hasattr(loader, "__len__"):
        raise TypeError(f"{name}: a {type(loader).__name__} has no len(); the per-iteration "
                        f"learning-rate schedule needs the number of batches an epoch")
    if len(loader) == 0:
        samples = epoch_samples(loader)
        held = "" if samples is None else f" of its {samples} samples"
        settings = " and ".join(f"{key}={getattr(loader, key)}" for key in ("batch_size", "drop_last")
                                if hasattr(loader, key))
        raise ValueError(f"{name}: makes no batch{held} (len 0){' with ' + settings if settings else ''}: "
                         f"every epoch would be empty; build it with a batch_size <= "
                         f"{samples if samples else 'the samples'} (for fastvote's training: "
                         f"TrainConfig(batch_size=...), train_config= in fastvote.prune) or with drop_last=False")
    return len(loader)


def warn_small_epoch(loader: Iterable, batch_size: int, name: str) -> None:
    """Warn when an epoch of ``loader`` holds fewer samples than one batch of the recipe's
    ``batch_size``: every step then trains on the whole set, a smaller batch than the
    learning rate was tuned for (a source smaller than the default surrogate's 1024)."""
    samples = epoch_samples(loader)
    if samples is not None and 0 < samples < batch_size:
        warnings.warn(f"{name}: {samples} samples an epoch, fewer than the recipe's batch_size={batch_size}: "
                      f"each epoch is one batch of {samples} (the batch clamped to the samples), while the "
                      f"learning rate was tuned to {batch_size}; to choose the batch and rate yourself pass "
                      f"TrainConfig(batch_size=..., lr=...) (train_config= in fastvote.prune)", stacklevel=3)


class EpochStats(NamedTuple):
    """What :func:`run_epoch` returns: the mean loss and the top-1 of the logits over
    the pass's samples, and the optimizer steps taken."""
    loss: float
    acc: float
    steps: int


def to_device(batch, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, Any]:
    """(images, labels, identifiers or None) of a batch; images and labels on ``device``,
    4-d images channels-last on CUDA (the layout the models are moved to)."""
    images, labels, identifiers = split_batch(batch)
    images = images.to(device, non_blocking=True)
    if device.type == "cuda" and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True), identifiers


def classification(model: nn.Module, criterion: nn.Module) -> Forward:
    """The supervised ``forward`` of :func:`run_epoch`: inputs (images, labels, ...) ->
    (``criterion(model(images), labels)``, logits, labels)."""
    def forward(inputs):
        images, labels = inputs[0], inputs[1]
        logits = model(images)
        return criterion(logits, labels), logits, labels
    return forward


def run_epoch(model: nn.Module, batches: Iterable, forward: Forward,
              optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
              lr_at: Callable[[int], float], *, device: torch.device, amp: bool,
              prepare: Optional[Prepare] = None, on_step: Optional[OnStep] = None,
              total: Optional[int] = None, progress: bool = False, desc: str = "train",
              log_every: int = 20, what: str = "training loss",
              over_ranks: bool = True) -> EpochStats:
    """One pass of training, the step every loop of the project takes.

    ``model`` is put in train mode; then per batch i: ``inputs = prepare(batch)``
    (default :func:`to_device`); every param group's rate is set to ``lr_at(i)``;
    ``loss, logits, labels = forward(inputs)`` under autocast when ``amp`` (float16 on
    CUDA, bfloat16 on the CPU);
    the GradScaler-scaled backward and step; ``on_step(inputs, logits, labels)``.

    Returns the mean loss and top-1 of ``logits`` over the pass's samples (of every
    rank under torch.distributed, unless ``over_ranks=False``: a run each rank does on
    its own must not enter a collective) and the steps taken. An empty pass or a
    non-finite mean loss (named ``what`` in the error) raises.
    """
    model.train()
    prepare = prepare or functools.partial(to_device, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, i, lr = 0, -1, 0.0
    bar = tqdm(batches, total=total, desc=desc, disable=bars.disable(progress), unit="batch", leave=False)
    for i, batch in enumerate(bar):
        inputs = prepare(batch)
        lr = lr_at(i)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss, logits, labels = forward(inputs)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if on_step is not None:
            on_step(inputs, logits, labels)
        # accumulate on the device: one host sync an epoch, not one a batch
        loss_sum += loss.detach() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        if progress and (i + 1) % log_every == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{lr:.3g}")
    mean_loss, acc = _epoch_means(loss_sum, correct, seen, device=device, desc=desc, lr=lr, what=what,
                                  over_ranks=over_ranks)
    return EpochStats(mean_loss, acc, i + 1)


def _epoch_means(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, *, device: torch.device, desc: str,
                 lr: float, what: str, over_ranks: bool) -> Tuple[float, float]:
    """(mean loss, top-1) of an epoch over every rank's samples, or this process's
    without ``over_ranks`` (one host sync); an empty epoch or a non-finite loss is an error."""
    if seen == 0:
        raise ValueError(f"{desc}: the training loader yielded no batch")
    if over_ranks and distributed.active():  # every rank reports the epoch over all ranks' samples
        stats = distributed.all_reduce_(torch.stack([loss_sum, correct.double(),
                                                     torch.tensor(float(seen), device=device, dtype=torch.float64)]))
        loss_sum, correct, seen = stats[0], stats[1], int(stats[2].item())
    mean_loss = loss_sum.item() / seen
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"{desc}: the {what} is {mean_loss}; the learning rate "
                                 f"(last {lr:.3g}) is probably too high for this model and data")
    return mean_loss, int(correct.item()) / seen


def evaluate(model: nn.Module, loader: Iterable, device, *, amp: Optional[bool] = None,
             progress: bool = False, desc: str = "eval") -> float:
    """Top-1 accuracy of ``model`` (any module giving logits) over ``loader``, in [0, 1]."""
    correct = torch.zeros((), dtype=torch.int64, device=device)  # one host sync at the end
    seen = 0
    for out in iterate_outputs(model, loader, device=device, want=("logits",), amp=amp,
                               progress=progress, desc=desc):
        correct += (out["logits"].argmax(1) == out["labels"]).sum()
        seen += len(out["labels"])
    if seen == 0:
        raise ValueError(f"{desc}: the loader yielded no samples; expected at least one")
    return correct.item() / seen


# --------------------------------------------------------------------------
# Supervised (pre)training
# --------------------------------------------------------------------------

def _check_resumable(saved: Dict[str, Any], config, path: Path) -> None:
    """The saved run's config (a dataclass's fields) must equal ``config``'s."""
    now = dataclasses.asdict(config)
    # a field newer than the checkpoint had its default there
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    differ = [f"{k}: {saved.get(k, defaults[k])!r} there, {v!r} now" for k, v in now.items()
              if k != "log_every" and saved.get(k, defaults[k]) != v]
    if differ:
        raise ValueError(f"checkpoint_dir: {path} holds a run with another config ("
                         f"{'; '.join(differ)}); resume with the same config or use a fresh "
                         f"checkpoint_dir")


def resume(checkpoint_dir, file: str, fmt: str, config, *, module: nn.Module,
           optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
           load: Callable[[nn.Module, Dict[str, Any]], None]
           ) -> Tuple[Optional[Path], Optional[Dict[str, list]], int]:
    """Where a resumable loop keeps its state, and what it resumes from.

    Rank 0 reads ``checkpoint_dir/file`` (if there) and hands it to every rank
    (no shared file system needed); its format and config are checked; the
    module (through ``load(module, state)``), optimizer, scaler and RNG states
    are restored. Returns (state path or None, history or None, first epoch).
    """
    path = Path(checkpoint_dir) / file if checkpoint_dir is not None else None
    state = distributed.broadcast_object(
        torch.load(path, map_location="cpu", weights_only=True)
        if path is not None and distributed.is_main() and path.exists() else None)
    if state is None:
        return path, None, 0
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"checkpoint_dir: {path} is not a {fmt} state; use a fresh checkpoint_dir")
    _check_resumable(state["config"], config, path)
    load(module, state)
    optimizer.load_state_dict(state["optimizer"])
    if scaler.is_enabled() and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    # Each epoch re-seeds, so the loop does not need these; restoring them leaves
    # the caller's generators as an uninterrupted run would.
    set_rng_state(state["rng"])
    return path, state["history"], state["epoch"]


def grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """The loss scaler of a loop under ``amp``: float16 (CUDA) needs one; bfloat16 (the
    CPU) has float32's range and does not, so there it is disabled (a pass-through)."""
    return torch.amp.GradScaler("cuda", enabled=amp and torch.device(device).type == "cuda")


def training_setup(model: nn.Module, config: TrainConfig, device: torch.device, amp: bool):
    """Moves `model` to `device` (channels-last on CUDA) and builds the recipe's
    optimizer (SGD or AdamW), AMP grad scaler and loss: (optimizer, scaler, criterion)."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if config.optimizer == "adamw":
        # the usual ViT practice: no decay on biases, norm weights, embeddings
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            skip = p.ndim <= 1 or name.endswith(("pos_embedding", "class_token"))
            (no_decay if skip else decay).append(p)
        optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                      lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    scaler = grad_scaler(device, amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return optimizer, scaler, criterion


@keeps_rng
def train_classifier(model: nn.Module, train_loader: Iterable, config: TrainConfig, *, device,
                     checkpoint_dir=None, progress: bool = True,
                     val_loader: Optional[Iterable] = None,
                     on_epoch_start: Optional[Callable[[int], None]] = None,
                     on_epoch_end: Optional[Callable[[int, Dict[str, list]], None]] = None,
                     perturb: Optional[Perturb] = None) -> Dict[str, list]:
    """Supervised training with cross-entropy; resumable, deterministic per epoch.

    Args:
        model: any module giving logits [B, K] (a Classifier, possibly DDP-wrapped:
            gradients then sync as DDP does, and only rank 0 writes checkpoints).
            Trained in place, moved to ``device`` (channels-last on CUDA).
        train_loader: batches of (images, labels[, identifiers]); needs ``len()``.
            Re-iterated every epoch; see the module docstring for what its order
            must do for an exact resume.
        config: the recipe.
        device: where to train.
        checkpoint_dir: None, or a folder: ``train_state.pt`` (weights, optimizer,
            scaler, epoch, RNG states, history, config) is replaced atomically after
            every epoch, and ``model.pt`` (:func:`~fastvote.models.save_checkpoint`)
            written at the end. If ``train_state.pt`` exists the run resumes after
            its last finished epoch (the config must match, else ValueError).
        progress: tqdm bars (epochs, and batches within one).
        val_loader: if given, top-1 on it after every epoch (``history["val_acc"]``).
        on_epoch_start: called with the 0-based epoch index before each epoch (e.g. to
            set the loader's resolution from ``config.resolution_at(epoch)``).
        on_epoch_end: called with the epoch index and the history after each epoch's
            checkpoint is written.
        perturb: ``perturb(model, images, labels) -> images``, applied to every
            training batch before the forward pass (adversarial training:
            :class:`fastvote.adversarial.PGD`); it must leave ``model``'s mode as
            it found it (train).

    Returns:
        history: lists with one entry per finished epoch (including epochs done
        before a resume): ``epoch`` (0-based), ``lr`` (at the epoch's last
        iteration), ``train_loss``, ``train_acc``, ``val_acc`` (None without
        ``val_loader``), ``steps`` (optimizer steps of the epoch, on each rank),
        ``seconds`` (wall time of the epoch).

    Under torchrun (torch.distributed initialised, e.g. by
    :func:`fastvote.distributed.init_from_env`) the model trains as DDP: the
    loader must give each rank its shard (FFCV ``distributed=True``), batch
    sizes are per rank, losses and accuracies are over all ranks, rank 0 writes
    the checkpoints and a resume reads rank 0's state.
    """
    device = distributed.local_device(device)
    amp = resolve_amp(config.amp, device)
    iters = batches_per_epoch(train_loader, "train_loader")
    loader_batch = getattr(train_loader, "batch_size", None)
    if loader_batch is not None and loader_batch != config.batch_size:
        raise ValueError(f"train_loader.batch_size={loader_batch} but config.batch_size="
                         f"{config.batch_size}: build the loader with the config's batch size "
                         f"(the learning rate is tuned to it)")
    warn_small_epoch(train_loader, config.batch_size, "train_loader")
    optimizer, scaler, criterion = training_setup(model, config, device, amp)
    net = _data_parallel(model, train_loader, device, "train_loader", require=True)

    def attacked(batch):  # the attack sees the network as it trains (DDP-wrapped or not)
        images, labels, identifiers = to_device(batch, device)
        return perturb(net, images, labels), labels, identifiers

    history: Dict[str, list] = {k: [] for k in
                                ("epoch", "lr", "train_loss", "train_acc", "val_acc", "steps", "seconds")}
    state_path, resumed, start = resume(checkpoint_dir, STATE_FILE, _STATE_FORMAT, config, module=model,
                                        optimizer=optimizer, scaler=scaler,
                                        load=lambda m, state: load_state_dict_flexible(m, state["model"]))
    history = resumed or history

    bar = tqdm(range(start, config.epochs), initial=start, total=config.epochs, desc="train",
               unit="epoch", disable=bars.disable(progress))
    for epoch in bar:
        seed_epoch(config.seed, epoch)
        set_loader_epoch(train_loader, epoch)
        resolution = config.resolution_at(epoch)
        if resolution is not None:
            fvdata.set_resolution(train_loader, resolution)
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        began = time.perf_counter()
        loss, acc, steps = run_epoch(
            net, train_loader, classification(net, criterion), optimizer, scaler,
            lambda i: config.lr_at(epoch + i / iters), device=device, amp=amp,
            prepare=attacked if perturb is not None else None, total=iters, progress=progress,
            desc=f"epoch {epoch + 1}/{config.epochs}", log_every=config.log_every)
        distributed.broadcast_buffers(model)  # every rank ends the epoch with rank 0's model
        val_acc = (evaluate(model, val_loader, device, amp=amp, progress=progress, desc="val")
                   if val_loader is not None else None)
        record = {"epoch": epoch, "lr": config.lr_at(epoch + (iters - 1) / iters),
                  "train_loss": loss, "train_acc": acc, "val_acc": val_acc, "steps": steps,
                  "seconds": time.perf_counter() - began}
        for key, value in record.items():
            history.setdefault(key, []).append(value)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}",
                           **({"val": f"{val_acc:.3f}"} if val_acc is not None else {}))
        if state_path is not None and distributed.is_main():
            atomic_save({
                "format": _STATE_FORMAT, "epoch": epoch + 1, "config": dataclasses.asdict(config),
                "model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "history": history,
                "rng": rng_state()}, state_path)
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
    if checkpoint_dir is not None and distributed.is_main():
        save_checkpoint(Path(checkpoint_dir) / MODEL_FILE, model, history=history,
                        config=dataclasses.asdict(config))
    distributed.barrier()  # the other ranks return once the checkpoint is there
    return history


# --------------------------------------------------------------------------
# Transfer
# --------------------------------------------------------------------------

def _new_head(feature_dim: int, num_classes: int, seed: int) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(feature_dim, num_classes)


def _optimizer(params, name: str, lr: float, weight_decay: float,
               momentum: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _cosine(lr: float, total_steps: int) -> Callable[[int], float]:
    """Cosine decay from ``lr`` at step 0 towards 0 at ``total_steps`` (as the release's
    per-iteration CosineAnnealingLR)."""
    return lambda step: 0.5 * lr * (1 + math.cos(math.pi * step / total_steps))


def _gather_features(probe: Classifier, loader: Iterable, *, device, amp: bool, progress: bool,
                     desc: str) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(features [N, F] float32, labels [N] int64, first batch's size), on ``device``."""
    features, labels = [], []
    for out in iterate_outputs(probe, loader, device=device, want=("features",), amp=amp,
                               progress=progress, desc=desc):
        features.append(out["features"])
        labels.append(out["labels"])
    if not labels:
        raise ValueError(f"{desc}: the loader yielded no batch; expected at least one")
    # cat outside inference mode: ordinary tensors, usable by autograd
    return torch.cat(features), torch.cat(labels), len(labels[0])


@keeps_rng
def finetune(model: nn.Module, train_loader: Iterable, val_loader: Iterable,
             test_loader: Iterable, *, num_classes: int, mode: str = "linear",
             epochs: Optional[int] = None, lr: Optional[float] = None, optimizer: str = "adam",
             weight_decay: Optional[float] = None, momentum: float = 0.9,
             cache_features: bool = True, seed: int = 0, amp: Optional[bool] = None,
             device="cpu", progress: bool = True) -> Dict[str, Any]:
    """Transfer a pretrained model to a target task; pick the epoch on validation.

    A new head (``nn.Linear(F, num_classes)``, initialised from ``seed``) replaces the
    model's. Every epoch ends with top-1 on ``val_loader``; the weights of the first
    epoch with the best validation accuracy are kept, and only then is ``test_loader``
    read, exactly once. The test split never influences any choice.

    Modes:
        "linear": the backbone stays frozen in eval mode (its weights and BatchNorm
            statistics do not change; it is shared with ``model``, not copied, and left
            in eval mode); only the head trains. With ``cache_features=True`` (default)
            the backbone runs once over ``train_loader`` and the head then trains for
            ``epochs`` on those features, reshuffled each epoch by a generator seeded
            from ``seed`` — exact, and much faster, for a train loader without
            augmentation (the release's probe uses none); an augmenting loader would be
            frozen to one view, so pass ``cache_features=False`` to re-read it every
            epoch. The validation features are computed once in either case.
        "full": a deep copy of ``model`` trains entirely (``model`` is untouched).

    Args:
        model: the pretrained network (anything :func:`~fastvote.models.as_classifier`
            accepts); moved to ``device``.
        train_loader, val_loader, test_loader: batches of (images, labels[, ids]); the
            validation split is carved from the target's training split.
        num_classes: the target's classes.
        mode: "linear" or "full".
        epochs, lr, weight_decay: None -> ``FINETUNE_DEFAULTS[(mode, optimizer)]``
            (the release's: 50 / 0.01 / 0 for a linear probe with Adam, 200 / 1e-4 / 0
            for full Adam, 200 / 0.1 / 5e-4 for full SGD).
        optimizer: "adam" or "sgd" (with ``momentum``). The rate decays per iteration
            with a cosine to 0.
        seed: the head's initialisation and every epoch's randomness.
        amp: mixed precision (:func:`fastvote.features.resolve_amp`): float16 autocast + GradScaler on CUDA,
            bfloat16 autocast on the CPU; None -> on for CUDA and for CPUs with bf16 units. (The cached
            probe's head always trains in float32.)
        device: where to run.
        progress: tqdm bars.

    Returns:
        dict: ``val_acc`` (best validation top-1), ``test_acc`` (top-1 on the test split
        of that epoch's weights), ``best_epoch`` (0-based), ``history`` (per epoch:
        ``epoch``, ``lr``, ``train_loss``, ``train_acc``, ``val_acc``), ``model`` (the
        finetuned Classifier with the chosen weights), and the resolved ``mode``,
        ``optimizer``, ``epochs``, ``lr``, ``weight_decay``.
    """
    if mode not in FINETUNE_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {list(FINETUNE_MODES)}")
    if optimizer not in FINETUNE_OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {list(FINETUNE_OPTIMIZERS)}")
    if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: expected an int >= 1")
    if val_loader is None:
        raise ValueError("val_loader=None: finetune picks its epoch on a validation split "
                         "carved from the target's training split (never on test); pass one")
    defaults = FINETUNE_DEFAULTS[(mode, optimizer)]
    epochs = int(defaults["epochs"]) if epochs is None else epochs
    lr = defaults["lr"] if lr is None else lr
    weight_decay = defaults["weight_decay"] if weight_decay is None else weight_decay
    if not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: expected an int >= 1")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"lr={lr!r}, weight_decay={weight_decay!r}: expected lr > 0 and "
                         f"weight_decay >= 0")
    device = distributed.local_device(device)
    amp = resolve_amp(amp, device)
    pretrained = as_classifier(model)
    head = _new_head(pretrained.feature_dim, int(num_classes), seed)
    backbone = pretrained.backbone if mode == "linear" else copy.deepcopy(pretrained.backbone)
    net = Classifier(backbone, head, arch=pretrained.arch, image_size=pretrained.image_size,
                     small_images=pretrained.small_images).to(device)
    if mode == "linear":
        # The backbone only ever runs inside iterate_outputs (eval mode, no autograd), so
        # neither its weights nor its BatchNorm statistics can change; net stays in eval
        # mode so that iterate_outputs, restoring modes, never sets it training.
        net.eval()
        trainable, train_amp = head, False
        val_features, val_labels, _ = _gather_features(net, val_loader, device=device, amp=amp,
                                                       progress=progress, desc="val features")

        def validate() -> float:
            with torch.no_grad():
                return (head(val_features).argmax(1) == val_labels).double().mean().item()

        if cache_features:
            if is_sharded(train_loader):
                raise ValueError("train_loader: a linear probe on cached features needs every training sample "
                                 "on every rank; pass an unsharded loader (distributed=False) or "
                                 "cache_features=False")
            train_features, train_labels, batch_size = _gather_features(
                net, train_loader, device=device, amp=amp, progress=progress,
                desc="train features")
            steps = math.ceil(len(train_labels) / batch_size)
            order_generator = torch.Generator().manual_seed(seed)

            def batches(epoch: int) -> Iterable:
                order = torch.randperm(len(train_labels), generator=order_generator)
                return ((train_features[i], train_labels[i])
                        for i in order.to(device).split(batch_size))
        else:
            steps = batches_per_epoch(train_loader, "train_loader")

            def batches(epoch: int) -> Iterable:
                seed_epoch(seed, epoch)
                set_loader_epoch(train_loader, epoch)
                # clone: iterate_outputs gives inference tensors, which autograd cannot save
                return ((out["features"].clone(), out["labels"]) for out in iterate_outputs(
                    net, train_loader, device=device, want=("features",), amp=amp,
                    progress=False))
    else:
        if device.type == "cuda":
            net.to(memory_format=torch.channels_last)
        trainable, train_amp = _data_parallel(net, train_loader, device, "train_loader", require=False), amp
        steps = batches_per_epoch(train_loader, "train_loader")

        def validate() -> float:
            return evaluate(net, val_loader, device, amp=amp, progress=progress, desc="val")

        def batches(epoch: int) -> Iterable:
            seed_epoch(seed, epoch)
            set_loader_epoch(train_loader, epoch)
            return train_loader

    opt = _optimizer(trainable.parameters(), optimizer, lr, weight_decay, momentum)
    scaler = grad_scaler(device, train_amp)
    criterion = nn.CrossEntropyLoss()
    lr_at = _cosine(lr, epochs * steps)
    history: Dict[str, list] = {k: [] for k in ("epoch", "lr", "train_loss", "train_acc",
                                                "val_acc")}
    best_acc, best_epoch, best_state = -1.0, -1, None
    for epoch in tqdm(range(epochs), desc=f"finetune ({mode})", unit="epoch",
                      disable=bars.disable(progress)):
        loss, acc, _ = run_epoch(
            trainable, batches(epoch), classification(trainable, criterion), opt, scaler,
            lambda i: lr_at(epoch * steps + i), device=device, amp=train_amp, total=steps,
            progress=progress, desc=f"epoch {epoch + 1}/{epochs}")
        distributed.broadcast_buffers(net)  # DDP: every rank validates rank 0's model
        val_acc = validate()
        record = {"epoch": epoch, "lr": lr_at((epoch + 1) * steps - 1), "train_loss": loss,
                  "train_acc": acc, "val_acc": val_acc}
        for key, value in record.items():
            history[key].append(value)
        if val_acc > best_acc:  # strictly: ties keep the earlier epoch
            best_acc, best_epoch = val_acc, epoch
            best_state = {k: v.detach().clone() for k, v in trainable.state_dict().items()}
    trainable.load_state_dict(best_state)
    test_acc = evaluate(net, test_loader, device, amp=amp, progress=progress, desc="test")
    return {"val_acc": best_acc, "test_acc": test_acc, "best_epoch": best_epoch,
            "history": history, "model": net, "mode": mode, "optimizer": optimizer,
            "epochs": epochs, "lr": lr, "weight_decay": weight_decay}
