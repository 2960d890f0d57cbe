"""Training runs for the training-based baselines (GraNd, EL2N, forgetting):
a fresh model of the surrogate's architecture trained from scratch on the
source through FFCV, with every minibatch's forward pass shown to a callback.

The score definitions live in fastvote/methods (they only see a model and
batches); this module owns the loop, the loaders and the models, and the
source view of fastvote.prune calls it (``_ModelView.train_run``).

What a run is (one seed):
- the model: :func:`fresh_model` (build_model(arch, ...) with the seed, or for
  a user network a copy with every layer's reset_parameters() under the seed);
- the data: the source beton's train pipeline WITHOUT augmentation (the full
  image resized to the surrogate's resolution, no flip), shuffled by the seed,
  every sample once an epoch (no dropped last batch), so on the CPU a run is a
  function of its seed;
- the optimiser: the recipe's (fastvote.train.TrainConfig): SGD with momentum
  and weight decay, the triangular rate of the WHOLE recipe sampled per
  iteration (a run stopped at epoch e has seen the rate of the first e epochs
  of a full run), label smoothing, AMP on CUDA.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastvote import progress as bars

from fastvote import data as fvdata
from fastvote.features import resolve_amp
from fastvote.models import Classifier, as_classifier, build_model
from fastvote import train
from fastvote.train import TrainConfig, training_setup

OnBatch = Callable[[Tensor, Tensor, Tensor], None]  # (rows int64 [B], logits [B, K], labels [B])


def recipe(model: nn.Module, config: TrainConfig, prep: dict, num_classes: int) -> dict:
    """What a run depends on besides the data and the seed (a cache key part)."""
    model = as_classifier(model)
    return {"arch": model.arch, "num_classes": int(num_classes), "image_size": model.image_size,
            "small_images": model.small_images, "resolution": prep["resolution"],
            "mean": [float(v) for v in prep["mean"]], "std": [float(v) for v in prep["std"]],
            "augmentation": "none", "epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr,
            "momentum": config.momentum, "weight_decay": config.weight_decay,
            "lr_peak_epoch": config.peak_epoch, "label_smoothing": config.label_smoothing}


def fresh_model(template: nn.Module, num_classes: int, seed: int) -> Classifier:
    """A newly initialised model shaped like `template` with a head over
    `num_classes` classes; the global RNG is left as it was."""
    template = as_classifier(template)
    if template.arch is not None:
        return build_model(template.arch, num_classes, image_size=template.image_size,
                           small_images=template.small_images, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = copy.deepcopy(template).cpu()
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if model.num_classes != num_classes:
            model.head = nn.Linear(model.feature_dim, num_classes)
    return model


def train_run(model: nn.Module, beton, *, config: TrainConfig, epochs: int, prep: dict, seed: int, device,
              rows_of: Callable[[np.ndarray], np.ndarray], on_batch: Optional[OnBatch] = None,
              progress: bool = True, desc: str = "run") -> nn.Module:
    """Trains `model` in place for `epochs` epochs (see the module docstring).

    rows_of: source identifiers (numpy int64) -> stream rows, for on_batch.
    on_batch(rows, logits, labels): called after every step with the detached
        float logits of its forward pass (train mode, before the update).
    Returns the model, in eval mode on `device`.
    """
    device = torch.device(device)
    if epochs == 0:  # scored at initialisation
        return model.to(device).eval()
    amp = resolve_amp(config.amp, device)
    loader = fvdata.train_loader(beton, config.batch_size, resolution=prep["resolution"], mean=prep["mean"],
                                 std=prep["std"], seed=seed, order="random", drop_last=False, with_identifier=True,
                                 scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, device=device)
    optimizer, scaler, criterion = training_setup(model, config, device, amp)
    iters = len(loader)

    def report(inputs, logits, labels):  # logits: the forward pass of the step just taken
        rows = torch.from_numpy(rows_of(inputs[2].cpu().numpy()))
        on_batch(rows, logits.detach().float().cpu(), labels.cpu())

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in tqdm(range(epochs), desc=desc, unit="epoch", leave=False, disable=bars.disable(progress)):
            train.set_loader_epoch(loader, epoch)
            batches = iter(loader)
            # over_ranks=False, no collective: under torchrun a rank may find a run cached
            # that another rank trains
            train.run_epoch(model, batches, train.classification(model, criterion), optimizer, scaler,
                            lambda i: config.lr_at(epoch + i / iters), device=device, amp=amp,
                            on_step=report if on_batch is not None else None, total=iters,
                            desc=f"{desc} epoch {epoch + 1}/{epochs}", over_ranks=False)
    return model.eval()
