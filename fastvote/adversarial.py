"""Adversarial pretraining: Madry et al.'s PGD adversarial training, as the paper's
adversarially pretrained source models (SPEC.md: PGD, eps 3/255, 3 steps).

:class:`PGD` is a ``perturb`` for :func:`fastvote.train.train_classifier`: every
training batch is replaced by its PGD adversarial examples before the SGD step::

    attack = PGD(mean=mean, std=std)  # the loader's normalisation, 0..1 scale
    train_classifier(model, loader, config, device="cuda", perturb=attack)
    robust_accuracy(model, test_loader, attack, "cuda")

The attack (L-inf by default, L2 too) maximises the cross-entropy of the true label
within ``||x_adv - x|| <= eps`` and ``x_adv`` in [0, 1], in PIXEL space (0..1 scale),
as Madry's ``robustness`` library does: the loader's images are unnormalised
(``x = images * std + mean``), the start is ``x`` plus uniform noise in the eps-ball
(``random_start``), then each of ``steps`` steps moves ``step_size`` along the sign
of the gradient (L-inf) or the per-sample unit gradient (L2), and projects back onto
the ball and the pixel box; the network always sees ``(x + delta - mean) / std``.
The last iterate is returned, normalised again.

Choices, and where the DP4TL release (src/experiment/adv_imagenet_train_from_scratch.py)
differs:
  - Units. The release adds its random start and takes its steps in NORMALISED units
    (``images + U(-eps, eps)``, ``+ alpha * sign(grad)``) and only projects in pixel
    space, so its pixel steps are ``alpha * std`` (~0.23 alpha for ImageNet's std): a
    weaker attack than its nominal one. Here eps and ``step_size`` are pixel units, as
    in ``robustness`` and the paper's "eps = 3/255". ``step_size=None`` is the
    release's ``2 * eps / steps`` (2 eps / 3 at the default 3 steps).
  - Eval mode. The attack runs the model in eval mode (every submodule's mode is
    restored afterwards), as ``robustness``'s ``AttackerModel`` does; the release
    attacks in train mode. In train mode every attack forward would update the
    BatchNorm running statistics (3 of every 4 updates would come from intermediate
    attack iterates, not the images trained on) and each sample's perturbation would
    depend on the rest of its batch. In eval mode the attack is a per-sample function
    of the current weights and changes nothing in the model. The cost: early in
    training the running statistics lag the weights, so the attacked function is
    slightly off the train-mode one; ``robustness`` accepts the same.
  - Gradients. Only the input's gradient is computed (``torch.autograd.grad``): the
    parameters' ``.grad`` are never touched (the release accumulated attack
    gradients into them and cleared them before the step).
  - Precision. ``amp`` (None: on for CUDA and for CPUs with bf16 units, as
    :mod:`fastvote.train`) runs the attack's forward under autocast: float16 on CUDA, as
    the release does, bfloat16 on the CPU; the loss is taken
    in float32 and summed over the batch, not averaged, so per-sample input gradients
    are not shrunk by 1/B towards float16 underflow (the sign and the L2 direction are
    scale-free). With ``amp`` off, an enclosing autocast is disabled: the attack runs
    in float32 (float64 inputs stay float64).
  - Wrappers. The attack runs the bare module (:func:`~fastvote.models.unwrap_model`):
    a DDP wrapper's forward would prepare a gradient reduction that an input-only
    backward never completes.
  - Range. The loader's pixels must lie in [0, 1] (up to ``PIXEL_SLACK``, for
    rounding): wrong ``mean``/``std`` would otherwise silently give another threat
    model, so each call checks (one host sync a batch). A pixel just outside [0, 1]
    (rounding) may stay where it is, so ``x_adv = x`` is always feasible.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() twice (two FFCV epochs)

from . import progress as bars
from .features import autocast, resolve_amp, split_batch
from .models import unwrap_model
from .train import Perturb

__all__ = ["PGD", "NORMS", "PIXEL_SLACK", "robust_accuracy"]

NORMS = ("linf", "l2")
# How far outside [0, 1] an unnormalised pixel may be (float16 / bfloat16 rounding of
# normalised images) before mean/std are taken not to match the images.
PIXEL_SLACK = 0.01


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _channel_values(name: str, values, positive: bool) -> Tuple[float, ...]:
    expected = f"one finite number a channel (0..1 scale){', each > 0' if positive else ''}"
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={values!r}: expected {expected}") from None
    if not out or not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
        raise ValueError(f"{name}={values!r}: expected {expected}")
    return out


@dataclass
class PGD:
    """Projected gradient descent on the cross-entropy, in pixel space (see the module
    docstring); ``PGD(mean=..., std=...)(model, images, labels) -> adversarial images``.

    Attributes:
        mean, std: the loader's per-channel normalisation, 0..1 scale (images are
            ``(pixels - mean) / std``); one value each broadcasts over channels.
        eps: the ball's radius in pixels (0..1 scale); L-inf: in (0, 1), the paper's 3/255.
        steps: gradient steps, >= 0.
        step_size: pixels a step; None -> ``2 * eps / steps`` (the release's).
        random_start: start from a uniform point of the eps-ball (L-inf: per pixel in
            [-eps, eps]; L2: a uniform cube point scaled into the ball, as ``robustness``).
        norm: "linf" or "l2".
        amp: autocast for the attack's forward passes (float16 on CUDA, bfloat16 on the
            CPU); None -> on for CUDA and CPUs with bf16 units (:func:`fastvote.features.resolve_amp`).
        generator: draws the random start (None: the images' device's global generator,
            which ``train_classifier`` seeds every epoch). Drawn contiguous on its own
            device, so a start does not depend on the images' memory format; put it on
            the images' device to avoid a host-device copy.
    """

    mean: Sequence[float]
    std: Sequence[float]
    eps: float = 3 / 255
    steps: int = 3
    step_size: Optional[float] = None
    random_start: bool = True
    norm: str = "linf"
    amp: Optional[bool] = None
    generator: Optional[torch.Generator] = None

    def __post_init__(self):
        self.mean = _channel_values("mean", self.mean, positive=False)
        self.std = _channel_values("std", self.std, positive=True)
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean={self.mean}, std={self.std}: expected the same number of "
                             f"channels in both")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}: expected one of {list(NORMS)}")
        upper = 1 if self.norm == "linf" else math.inf
        if not (_is_real(self.eps) and 0 < self.eps < upper):
            raise ValueError(f"eps={self.eps!r}: expected a number in (0, {upper}) for "
                             f"norm={self.norm!r}, in pixels on the 0..1 scale (3/255, not 3)")
        if not (isinstance(self.steps, numbers.Integral) and not isinstance(self.steps, bool)
                and self.steps >= 0):
            raise ValueError(f"steps={self.steps!r}: expected an int >= 0")
        if self.step_size is not None and not (_is_real(self.step_size)
                                               and 0 < self.step_size < math.inf):
            raise ValueError(f"step_size={self.step_size!r}: expected None (2 * eps / steps) "
                             f"or a finite number > 0, in pixels")
        if not isinstance(self.random_start, bool):
            raise ValueError(f"random_start={self.random_start!r}: expected a bool")
        if self.amp is not None and not isinstance(self.amp, bool):
            raise ValueError(f"amp={self.amp!r}: expected None (on for CUDA only) or a bool")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator={self.generator!r}: expected None or a torch.Generator")

    @property
    def alpha(self) -> float:
        """``step_size`` resolved: pixels a step."""
        if self.step_size is not None:
            return float(self.step_size)
        return 2 * self.eps / max(self.steps, 1)

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        """Adversarial examples for ``images`` (normalised, [B, C, ...], float) and
        ``labels`` (int64 [B]): normalised like ``images``, same dtype, device and shape.

        ``model`` gives logits; its parameters, their ``.grad``, its buffers and every
        submodule's train/eval mode are as they were afterwards. Works inside
        ``torch.no_grad``, ``torch.inference_mode`` and autocast regions.
        """
        self._check_batch(images, labels)
        amp = resolve_amp(self.amp, images.device)
        net = unwrap_model(model)
        # float16/bfloat16 images are attacked in float32; float64 stays float64
        dtype = torch.promote_types(images.dtype, torch.float32)
        shape = (1, -1) + (1,) * (images.dim() - 2)
        modes = [(module, module.training) for module in net.modules()]
        net.eval()
        try:
            # autograd on, whatever the caller's modes; autocast only where amp asks for it
            with torch.inference_mode(False), torch.enable_grad(), \
                    torch.autocast(images.device.type, enabled=False):
                # tensors made here are never inference tensors: autograd may save them
                base = images.detach().to(dtype, copy=True)
                labels = labels.detach().clone()
                mean = torch.tensor(self.mean, dtype=dtype, device=images.device).view(shape)
                std = torch.tensor(self.std, dtype=dtype, device=images.device).view(shape)
                pixels = base * std + mean
                self._check_range(pixels)
                delta = self._start(pixels)
                for _ in range(self.steps):
                    delta.requires_grad_(True)
                    with autocast(images.device, amp):
                        logits = net(base + delta / std)
                    # summed: each sample's input gradient is its own loss's, unscaled by B
                    loss = F.cross_entropy(logits.to(dtype), labels, reduction="sum")
                    grad, = torch.autograd.grad(loss, delta)
                    delta = self._project(pixels, delta.detach() + self.alpha * self._ascent(grad))
                # base + delta / std, not (pixels + delta - mean) / std: a zero delta
                # returns the images bit for bit
                return (base + delta / std).to(images.dtype)
        finally:
            for module, training in modes:
                module.training = training

    def _check_batch(self, images: Tensor, labels: Tensor) -> None:
        if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() < 2:
            kind = (f"a {images.dtype} tensor of shape {tuple(images.shape)}"
                    if isinstance(images, Tensor) else f"a {type(images).__name__}")
            raise ValueError(f"images: got {kind}; expected a float tensor [B, C, ...]")
        channels = len(self.mean)
        if images.shape[0] == 0 or (channels != 1 and images.shape[1] != channels):
            raise ValueError(f"images: shape {tuple(images.shape)}; expected [B >= 1, "
                             f"{channels}, ...] (one channel a value of mean={self.mean})")
        if (not isinstance(labels, Tensor) or labels.dtype != torch.int64
                or tuple(labels.shape) != (images.shape[0],)):
            kind = (f"{labels.dtype} of shape {tuple(labels.shape)}"
                    if isinstance(labels, Tensor) else f"a {type(labels).__name__}")
            raise ValueError(f"labels: got {kind}; expected int64 of shape ({images.shape[0]},)")
        if labels.device != images.device:
            raise ValueError(f"labels: on {labels.device}, images on {images.device}; expected "
                             f"the same device")

    def _check_range(self, pixels: Tensor) -> None:
        low, high = torch.stack(torch.aminmax(pixels)).tolist()  # one host sync
        if not (low >= -PIXEL_SLACK and high <= 1 + PIXEL_SLACK):  # NaN fails too
            raise ValueError(f"images: unnormalised (images * std + mean) they span "
                             f"[{low:.4g}, {high:.4g}]; expected [0, 1]: mean={self.mean} and "
                             f"std={self.std} must be the loader's normalisation, 0..1 scale")

    def _start(self, pixels: Tensor) -> Tensor:
        if not self.random_start:
            return torch.zeros_like(pixels)
        device = pixels.device if self.generator is None else self.generator.device
        noise = torch.empty(pixels.shape, dtype=pixels.dtype, device=device)
        noise = noise.uniform_(-1, 1, generator=self.generator).to(pixels.device)
        delta = noise * self.eps if self.norm == "linf" else noise.renorm(2, 0, self.eps)
        return self._project(pixels, delta)

    def _ascent(self, grad: Tensor) -> Tensor:
        """The steepest-ascent direction of unit norm (the dual norm's maximiser)."""
        if self.norm == "linf":
            return grad.sign()
        norms = torch.linalg.vector_norm(grad, dim=tuple(range(1, grad.dim())), keepdim=True)
        return grad / norms.clamp_min(1e-12)

    def _project(self, pixels: Tensor, delta: Tensor) -> Tensor:
        """Onto the eps-ball, then the pixel box. For L-inf both are boxes and this is the
        exact projection onto their intersection; for L2 (as ``robustness``) clipping
        to the box only shrinks delta, so it stays in the ball."""
        delta = delta.clamp(-self.eps, self.eps) if self.norm == "linf" \
            else delta.renorm(2, 0, self.eps)
        # x + delta in [min(x, 0), max(x, 1)]: [0, 1], widened to keep x itself feasible
        return torch.minimum(torch.maximum(delta, -pixels.clamp(min=0)),
                             (1 - pixels).clamp(min=0))


def robust_accuracy(model: nn.Module, loader: Iterable, attack: Perturb, device, *,
                    amp: Optional[bool] = None, progress: bool = False,
                    desc: str = "robust") -> float:
    """Top-1 accuracy of ``model`` on ``attack``'s adversarial examples, in [0, 1].

    Args:
        model: any module giving logits; moved to ``device``, evaluated in eval mode
            (every submodule's mode restored afterwards).
        loader: batches of (images, labels[, identifiers]).
        attack: ``attack(model, images, labels) -> images``, applied to every batch
            (a :class:`PGD`, or any :data:`fastvote.train.Perturb`).
        device: where to run.
        amp: autocast for the forward on the adversarial images (float16 on CUDA,
            bfloat16 on the CPU); None -> on for CUDA and CPUs with bf16 units (the attack
            has its own).
        progress, desc: a tqdm bar and its label.
    """
    device = torch.device(device)
    amp = resolve_amp(amp, device)
    model.to(device)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)  # one host sync at the end
    seen = 0
    try:
        total = len(loader) if hasattr(loader, "__len__") else None
        for batch in tqdm(loader, total=total, desc=desc, disable=bars.disable(progress), unit="batch",
                          leave=False):
            images, labels, _ = split_batch(batch)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            adversarial = attack(model, images, labels)
            with torch.inference_mode(), autocast(device, amp):
                correct += (model(adversarial).argmax(1) == labels).sum()
            seen += len(labels)
    finally:
        for module, training in modes:
            module.training = training
    if seen == 0:
        raise ValueError(f"{desc}: the loader yielded no samples; expected at least one")
    return correct.item() / seen
