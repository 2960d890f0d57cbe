"""Run a model over a loader: logits and pooled features, batch by batch.

:func:`iterate_outputs` streams (the voters consume one batch at a time and
never hold all rows); :func:`collect` concatenates, for small data. Both run the
model in eval mode under ``torch.inference_mode`` with AMP autocast on CUDA by
default, and show a tqdm progress bar.

A loader is any iterable of ``(images, labels)`` or ``(images, labels,
identifiers)`` batches: images float [B, 3, H, W], labels and identifiers int64
[B] — a torch DataLoader or one of ``fastvote.data``'s loaders (FFCV, or torch without it).
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() twice (two FFCV epochs)

from . import progress as bars
from .models import as_classifier

__all__ = ["OUTPUTS", "resolve_amp", "split_batch", "iterate_outputs", "collect"]

OUTPUTS = ("logits", "features")


def resolve_amp(amp: Optional[bool], device: torch.device) -> bool:
    """AMP (float16 autocast) setting: None -> on for CUDA only; True off CUDA is an error."""
    if amp is None:
        return device.type == "cuda"
    if amp and device.type != "cuda":
        raise ValueError(f"amp=True on device={str(device)!r}: AMP is used on CUDA only; "
                         f"pass amp=None or amp=False")
    return bool(amp)


def split_batch(batch) -> tuple:
    """``(images, labels)`` or ``(images, labels, identifiers)`` -> a 3-tuple (identifiers
    may be None), with a clear error for anything else."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        kind = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) \
            else f"a {type(batch).__name__}"
        raise ValueError(f"loader: a batch was {kind}; expected (images, labels) or "
                         f"(images, labels, identifiers)")
    images, labels, *rest = batch
    return images, labels, (rest[0] if rest else None)


def iterate_outputs(model: nn.Module, loader: Iterable, *, device, want: Sequence[str] = OUTPUTS,
                    amp: Optional[bool] = None, progress: bool = True,
                    desc: str = "outputs") -> Iterator[Dict[str, Tensor]]:
    """Yield, per batch, the model's outputs with the batch's labels.

    Args:
        model: a :class:`~fastvote.models.Classifier`; with ``want=("logits",)`` any
            module giving logits; otherwise anything :func:`~fastvote.models.as_classifier`
            accepts. Moved to ``device``; in eval mode while the generator runs, its
            previous mode restored when the generator finishes or is closed.
        loader: batches of (images, labels[, identifiers]).
        device: where the model runs.
        want: a non-empty subset of ("logits", "features").
        amp: float16 autocast; None -> on for CUDA only.
        progress: show a tqdm bar.
        desc: the bar's label.

    Yields:
        dict, all tensors on ``device`` (so a GPU voter never copies back to the host):
        the wanted ``"logits"`` float32 [B, K] and/or ``"features"`` float32 [B, F],
        ``"labels"`` int64 [B], and ``"identifiers"`` int64 [B] when the loader yields them.
        Output tensors are inference tensors: read them, or ``.clone()`` one to use it
        in autograd.
    """
    want = tuple(want)
    if not want or any(w not in OUTPUTS for w in want) or len(set(want)) != len(want):
        raise ValueError(f"want={want!r}: expected a non-empty subset of {OUTPUTS}")
    device = torch.device(device)
    amp = resolve_amp(amp, device)
    net = model if want == ("logits",) else as_classifier(model)
    total = len(loader) if hasattr(loader, "__len__") else None
    was_training = model.training
    model.to(device).eval()
    net.eval()  # a view from as_classifier has its own copies of the modules on its head's path
    try:
        for batch in tqdm(loader, total=total, desc=desc, disable=bars.disable(progress), unit="batch",
                          leave=False):
            images, labels, identifiers = split_batch(batch)
            # inference mode and autocast only around the forward: the caller's code
            # between yields runs in its own modes
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16,
                                                        enabled=amp):
                images = images.to(device, non_blocking=True)
                if want == ("logits",):
                    computed = {"logits": net(images)}
                elif want == ("features",):
                    computed = {"features": net.features(images)}
                else:
                    logits, features = net.forward_both(images)
                    computed = {"logits": logits, "features": features}
                out = {name: computed[name].float() for name in want}
            out["labels"] = labels.to(device, non_blocking=True)
            if identifiers is not None:
                out["identifiers"] = identifiers.to(device, non_blocking=True)
            yield out
    finally:
        model.train(was_training)


def collect(model: nn.Module, loader: Iterable, *, device, want: Sequence[str] = OUTPUTS,
            amp: Optional[bool] = None, progress: bool = True,
            desc: str = "outputs") -> Dict[str, Tensor]:
    """:func:`iterate_outputs` concatenated over the whole loader, on the CPU.

    For small data (tests, analysis); the prune path streams instead. Returns the
    same keys, each [N, ...]; ordinary (not inference) tensors.

    Raises:
        ValueError: the loader yielded no batch.
    """
    parts: Dict[str, list] = {}
    for out in iterate_outputs(model, loader, device=device, want=want, amp=amp,
                               progress=progress, desc=desc):
        for name, value in out.items():
            parts.setdefault(name, []).append(value.cpu())
    if not parts:
        raise ValueError("loader: yielded no batch; expected at least one")
    return {name: torch.cat(values) for name, values in parts.items()}
