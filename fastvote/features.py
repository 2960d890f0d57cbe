"""Run a model over a loader: logits and pooled features, batch by batch.

:func:`iterate_outputs` streams (the voters consume one batch at a time and
never hold all rows); :func:`collect` concatenates, for small data. Both run the
model in eval mode under ``torch.inference_mode`` and show a tqdm progress bar.
By default (:func:`autocast_dtype`) the forward runs under float16 autocast on CUDA
and bfloat16 autocast on a CPU with bf16 units (avx512_bf16 or AMX), in float32
elsewhere; on the CPU, weights and images are channels-last for the pass (oneDNN's
fast convolutions; 1.2-1.8x fp32 NCHW, benchmarks/RESULTS.md, issue 23), and a long
pass folds each BatchNorm into its convolution (a traced copy of the model).

A loader is any iterable of ``(images, labels)`` or ``(images, labels,
identifiers)`` batches: images float [B, 3, H, W], labels and identifiers int64
[B] — a torch DataLoader or one of ``fastvote.data``'s loaders (FFCV, or torch without it).
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, Optional, Sequence

import functools

import torch
from torch import Tensor, nn
from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() twice (two FFCV epochs)

from . import progress as bars
from .models import as_classifier

__all__ = ["OUTPUTS", "FOLD_MIN_BATCHES", "BF16_FLAGS", "cpu_flags", "cpu_has_bf16_units", "autocast_dtype",
           "precision", "resolve_amp", "autocast", "split_batch", "iterate_outputs", "collect"]

OUTPUTS = ("logits", "features")
FOLD_MIN_BATCHES = 8  # a CPU pass this long (or of unknown length) runs with BatchNorms folded
# CPU flags (Linux /proc/cpuinfo names) of bf16 dot-product units; without them oneDNN
# emulates bf16 through fp32 and a bf16 pass is slower than fp32 (ResNet-18: 0.5x, measured)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset:
    """The CPU's feature flags as /proc/cpuinfo lists them (its first "flags" line;
    empty where there is no such file)."""
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 units (:data:`BF16_FLAGS`) and torch's oneDNN may use
    them: ONEDNN_MAX_CPU_ISA=AVX2 (a user's cap, or benchmarks/bench_surrogate.py --isa
    avx2) leaves bf16 emulated, so the default is float32 there."""
    return any(f in cpu_flags() for f in BF16_FLAGS) and _onednn_runs_bf16()


def _onednn_runs_bf16() -> bool:
    """oneDNN's own check (its ISA cap included); True without oneDNN (no cap to honour)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if check is None else bool(check())


def autocast_dtype(amp: Optional[bool], device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a forward pass, None for float32.

    ``amp=None``: float16 on CUDA, bfloat16 on a CPU with bf16 units
    (:func:`cpu_has_bf16_units`), else float32. ``amp=True``: float16 on CUDA,
    bfloat16 on the CPU whatever its units (emulated, slow, without them).
    ``amp=False``: float32."""
    device = torch.device(device)
    if amp is not None and not isinstance(amp, bool):
        raise ValueError(f"amp={amp!r}: expected None (the device's default), True or False")
    if amp is None:
        amp = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_units())
    if not amp:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def precision(amp: Optional[bool], device) -> str:
    """The pass's precision as a name ("float32", "bfloat16", "float16"): what keys cached outputs."""
    dtype = autocast_dtype(amp, device)
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def resolve_amp(amp: Optional[bool], device: torch.device) -> bool:
    """Whether a training loop (or an attack) runs under mixed precision: as
    :func:`autocast_dtype` decides, so None -> on for CUDA (float16, with a GradScaler)
    and for a CPU with bf16 units (bfloat16: the training step measured 3.1x float32 for
    ResNet-18, 2.0x for the demo's CNN on a Xeon with AMX, RESULTS.md); True -> on
    anywhere (a CPU without bf16 units emulates it, slowly); False -> off."""
    return autocast_dtype(amp, device) is not None


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """The autocast region of a loop whose mixed precision is ``enabled``
    (:func:`resolve_amp`): float16 on CUDA, bfloat16 on the CPU. Disabled, it also turns
    off a caller's autocast inside."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=autocast_dtype(True, device), enabled=enabled)


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
        amp: autocast (:func:`autocast_dtype`): None -> float16 on CUDA, bfloat16 on a
            CPU with bf16 units, float32 elsewhere; True -> on (float16 on CUDA,
            bfloat16 on the CPU); False -> float32.
        progress: show a tqdm bar.
        desc: the bar's label.

    On the CPU the model's 4-d weights are channels-last while the generator runs,
    the caller's layout restored when it finishes or is closed, and a pass of
    :data:`FOLD_MIN_BATCHES` or more runs a copy with each BatchNorm folded into the
    convolution before it (where the model traces with torch.fx; the same outputs
    within float rounding).

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
    dtype = autocast_dtype(amp, device)
    net = model if want == ("logits",) else as_classifier(model)
    total = len(loader) if hasattr(loader, "__len__") else None
    was_training = model.training
    model.to(device).eval()
    net.eval()  # a view from as_classifier has its own copies of the modules on its head's path
    # CUDA keeps what it had: the images' layout as the loader gives them (channels-last)
    layout = torch.channels_last if device.type == "cpu" else None
    # On the CPU a pass of FOLD_MIN_BATCHES or more runs a copy with each BatchNorm folded into its
    # convolution, where one traces (ResNet-18 1.1-1.16x, the demo's CNN 1.25-1.3x, fp32 and bf16;
    # the copy and trace take 5-160 ms; RESULTS.md, issue 23)
    long_pass = total is None or total >= FOLD_MIN_BATCHES
    folded = _folded(net, want) if device.type == "cpu" and long_pass else None
    restore = _to_layout(net if folded is None else folded, layout)
    try:
        for batch in tqdm(loader, total=total, desc=desc, disable=bars.disable(progress), unit="batch",
                          leave=False):
            images, labels, identifiers = split_batch(batch)
            # inference mode and autocast only around the forward: the caller's code
            # between yields runs in its own modes
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                images = images.to(device, non_blocking=True)
                if layout is not None and images.dim() == 4:
                    images = images.contiguous(memory_format=layout)
                if folded is not None:
                    computed = dict(zip(want, folded(images)))
                elif want == ("logits",):
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
        restore()
        model.train(was_training)


class _Outputs(nn.Module):
    """The wanted outputs of a classifier as one forward (what torch.fx traces)."""

    def __init__(self, net: nn.Module, want: Sequence[str]):
        super().__init__()
        self.net, self.want = net, tuple(want)

    def forward(self, images: Tensor):
        if self.want == ("logits",):
            return (self.net(images),)
        if self.want == ("features",):
            return (self.net.features(images),)
        logits, features = self.net.forward_both(images)
        return tuple({"logits": logits, "features": features}[name] for name in self.want)


def _folded(net: nn.Module, want: Sequence[str]) -> Optional[nn.Module]:
    """A copy of the eval-mode `net` computing `want` (a tuple in that order),
    each BatchNorm2d after a Conv2d folded into it (torch.fx's fuse: the same
    function, within float rounding); None where nothing folds or the model
    does not trace (TorchScript, data-dependent Python): the pass then runs `net`."""
    def batch_norms(module: nn.Module) -> int:
        return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())

    before = batch_norms(net)
    if not before:
        return None
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(_Outputs(net, want))  # (a deep copy: the caller's model stays as it is)
    except Exception:  # noqa: BLE001 -- anything fx cannot trace runs unfolded, as before
        return None
    return folded if batch_norms(folded) < before else None


def _to_layout(module: nn.Module, layout: Optional[torch.memory_format]):
    """Puts ``module``'s 4-d parameters and buffers in ``layout`` (None: as they are)
    in place; returns a function that puts the caller's tensors back."""
    if layout is None:
        return lambda: None
    params = {id(p): (p, p.data) for p in module.parameters() if p.dim() == 4}
    buffers = [(owner._buffers, name, t) for owner in module.modules() for name, t in owner._buffers.items()
               if t is not None and t.dim() == 4]
    for p, data in params.values():
        p.data = data.contiguous(memory_format=layout)  # the same Parameter: optimizers, shared modules keep it
    for slots, name, t in buffers:
        slots[name] = t.contiguous(memory_format=layout)

    def restore():
        for p, data in params.values():
            p.data = data
        for slots, name, t in buffers:
            slots[name] = t
    return restore


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
