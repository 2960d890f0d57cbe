"""Surrogate and source architectures: one registry (:func:`build_model`).

Architectures are never pretrained (nothing can be downloaded): torchvision's
ResNets with a small-image stem for 16-32 px inputs; ``tiny``, a ~25k-parameter
CNN (the surrogate measured in DATA.md); and Vision Transformers built with
torchvision's VisionTransformer (features: the class token after the final
LayerNorm), with smaller patches for small images (:func:`vit_patch_size`).
Parameters (backbone, without the head; a 1000-class head adds F * 1000 + 1000;
measured at 224 px, ImageNet stem):

    tiny        23.7k  (F=64; any input size)
    small        371k  (F=256; tiny 4x wider: the demo's pretrained model)
    resnet18    11.2M  (F=512)     resnet34   21.3M  (F=512)
    resnet50    23.5M  (F=2048)    resnet101  42.5M  (F=2048)
    vit_t_16     5.5M  (F=192, DeiT-Ti)
    vit_s_16    21.7M  (F=384, DeiT-S)
    vit_b_16    85.8M  (F=768, torchvision's vit_b_16 / ViT-B/16)

The small-image variants differ only in the stem (ResNets: -7.7k) and, for
ViTs, the patch embedding and positional embedding (vit_b_16 at 32 px: 85.1M).
So a tiny surrogate is ~3600x smaller than a ViT-B/16 source model, a
ResNet-18 one ~8x, a vit_t_16 one ~16x.

:func:`build_model` also builds any torchvision classification model by name
(``"efficientnet_b0"``, ``"convnext_tiny"``, ...) and any timm model as
``"timm:<name>"`` (random init; timm is optional), so a checkpoint of one rebuilds.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from .classifier import Classifier, as_classifier

__all__ = ["ARCHS", "CNNS", "SMALL_IMAGE_MAX", "TIMM_PREFIX", "VIT_IMAGE_SIZE", "build_model",
           "check_arch", "vit_patch_size"]

# Inputs up to this side (px) get the small-image stem: the ResNet ImageNet stem's
# stride-2 conv + max-pool would shrink a 32 px image to 8 px before the first block,
# a ViT's 16 px patches would leave it 2 x 2 tokens.
SMALL_IMAGE_MAX = 64
# A ViT is built for one input side: this one when image_size is None (ImageNet stem).
VIT_IMAGE_SIZE = 224
_VIT_PATCH = 16  # the ImageNet-stem patch, the "/16" of the names
TIMM_PREFIX = "timm:"  # build_model("timm:<name>") builds timm.create_model(name)


# builder(small_images, image_size) -> (backbone, feature_dim)
_Builder = Callable[[bool, Optional[int]], Tuple[nn.Module, int]]


def _resnet(name: str) -> _Builder:
    def build(small_images: bool, image_size: Optional[int]) -> Tuple[nn.Module, int]:
        net = getattr(torchvision.models, name)(weights=None)
        if small_images:
            # CIFAR-style stem: 3x3 stride-1 conv, no max-pool; initialised as
            # torchvision initialises its convs.
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()  # the backbone ends at avgpool + flatten
        return net, feature_dim
    return build


def _cnn(width: int) -> _Builder:
    """3 x (3x3 conv, BN, ReLU), 2x max-pool after the first two, global average
    pool: width-2*width-4*width channels. One stem for any input size."""

    def build(small_images: bool, image_size: Optional[int]) -> Tuple[nn.Module, int]:
        del small_images, image_size  # one stem serves every size

        def block(c_in: int, c_out: int):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True)]

        backbone = nn.Sequential(*block(3, width), nn.MaxPool2d(2), *block(width, 2 * width),
                                 nn.MaxPool2d(2), *block(2 * width, 4 * width),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return backbone, 4 * width
    return build


def vit_patch_size(image_size: int, small_images: bool) -> int:
    """The patch side (px) :func:`build_model` gives a ViT for ``image_size`` px inputs.

    ImageNet stem (``small_images=False``): 16. Small images: the largest divisor
    of ``image_size`` in [2, max(2, image_size // 8)], i.e. a token grid of at
    least 8 x 8 where the side allows (16 px -> 2, 24 -> 3, 32 -> 4, 64 -> 8):
    16 px patches would leave a 32 px image 4 tokens.

    Raises:
        ValueError: no such patch divides ``image_size`` (torchvision's
            VisionTransformer needs a whole number of patches per side).
    """
    if not small_images:
        if image_size % _VIT_PATCH:
            raise ValueError(
                f"image_size={image_size}: a ViT with the ImageNet stem (small_images=False) "
                f"cuts {_VIT_PATCH} px patches; expected a multiple of {_VIT_PATCH} (e.g. "
                f"{VIT_IMAGE_SIZE}), or small_images=True for smaller patches")
        return _VIT_PATCH
    limit = max(2, image_size // 8)
    for patch in range(limit, 1, -1):
        if image_size % patch == 0:
            return patch
    raise ValueError(
        f"image_size={image_size}: the small-image ViT patch is a divisor of the side in "
        f"[2, {limit}] and there is none; expected a side with such a divisor (e.g. 16, 24 "
        f"or 32)")


# name -> (hidden_dim, num_layers, num_heads, mlp_dim); every one has a class token
_VIT_CONFIGS = {
    "vit_b_16": (768, 12, 12, 3072),  # torchvision.models.vit_b_16 (ViT-B/16)
    "vit_s_16": (384, 12, 6, 1536),   # DeiT-S
    "vit_t_16": (192, 12, 3, 768),    # DeiT-Ti
}


def _vit(name: str) -> _Builder:
    hidden_dim, num_layers, num_heads, mlp_dim = _VIT_CONFIGS[name]

    def build(small_images: bool, image_size: Optional[int]) -> Tuple[nn.Module, int]:
        net = VisionTransformer(image_size=image_size,
                                patch_size=vit_patch_size(image_size, small_images),
                                num_layers=num_layers, num_heads=num_heads,
                                hidden_dim=hidden_dim, mlp_dim=mlp_dim,
                                num_classes=1)  # its head is dropped: keep it small
        net.heads = nn.Identity()  # the backbone ends at the class token
        return net, hidden_dim
    return build


# name -> builder(small_images, image_size) -> (backbone, feature_dim)
_REGISTRY: Dict[str, _Builder] = {
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
    "resnet101": _resnet("resnet101"),
    "tiny": _cnn(16),   # 23.7k parameters: the surrogate measured in DATA.md
    "small": _cnn(64),  # 16x tiny's parameters, ~6x its training time at 16 px on a CPU
    **{name: _vit(name) for name in _VIT_CONFIGS},
}
ARCHS = tuple(_REGISTRY)
CNNS = ("tiny", "small")  # one stem for every input size: small_images does not apply


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    """Draw under ``seed`` without touching the global RNG (None: from the global RNG)."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def _timm(arch: str):
    try:
        import timm  # optional: only "timm:<name>" archs need it
    except ImportError:
        raise ImportError(f"arch={arch!r} needs timm, which is not installed: pip install timm") \
            from None
    return timm


def check_arch(arch: str) -> None:
    """Raise (cheaply: nothing is built) unless ``arch`` names one of :data:`ARCHS`,
    a torchvision classification model or a timm model."""
    if not isinstance(arch, str):
        raise ValueError(f"arch={arch!r}: expected a model name such as 'resnet18' or 'timm:resnet10t'")
    if arch in _REGISTRY:
        return
    if arch.startswith(TIMM_PREFIX):
        if _timm(arch).is_model(arch[len(TIMM_PREFIX):]):
            return
    elif arch in torchvision.models.list_models(module=torchvision.models):
        return
    raise ValueError(
        f"arch={arch!r}: expected one of fastvote's {list(ARCHS)}, a torchvision classification "
        f"model name (torchvision.models.list_models(module=torchvision.models), e.g. "
        f"'efficientnet_b0', 'convnext_tiny'), or 'timm:<name>' for a timm model "
        f"(timm.list_models(), e.g. 'timm:resnet10t')")


def _foreign(arch: str, num_classes: Optional[int] = None) -> nn.Module:
    """The torchvision or timm network ``arch`` as its library builds it, randomly
    initialised (nothing downloaded); None: the library's default num_classes."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if arch.startswith(TIMM_PREFIX):
        return _timm(arch).create_model(arch[len(TIMM_PREFIX):], pretrained=False, **kwargs)
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def _view(net: nn.Module, arch: str, image_size: Optional[int]) -> Classifier:
    model = as_classifier(net)
    model.arch, model.image_size = arch, image_size  # so a checkpoint rebuilds it
    return model


def build_model(arch: str, num_classes: int, *, small_images: Optional[bool] = None,
                image_size: Optional[int] = None, seed: Optional[int] = None) -> Classifier:
    """A freshly initialised :class:`Classifier` (never pretrained weights).

    Args:
        arch: one of :data:`ARCHS` (these win where a torchvision model has the
            same name: at the ImageNet stem they are torchvision's networks); or
            any torchvision classification model name
            (``torchvision.models.list_models(module=torchvision.models)``: e.g.
            ``"efficientnet_b0"``, ``"mobilenet_v3_small"``, ``"convnext_tiny"``);
            or ``"timm:<name>"``, ``timm.create_model(name, pretrained=False)``
            (timm is optional). These two are built as their library builds
            them (its init, its stem, for its input size: ``small_images=True``
            is refused, ``image_size`` is only recorded) and viewed with
            :func:`as_classifier`; ``model.arch`` is ``arch``, so
            :func:`load_model` rebuilds their checkpoints.
        num_classes: head width (K source classes for a surrogate), >= 1.
        small_images: use the small-image stem: for ResNets a 3x3 stride-1 conv
            and no max-pool, for ViTs smaller patches (:func:`vit_patch_size`).
            None: decide from ``image_size`` (<= SMALL_IMAGE_MAX px -> small), or
            the ImageNet stem when ``image_size`` is None too. ``tiny`` and
            ``small`` have one stem for all sizes and ignore it.
        image_size: the input side in px the model is meant for (metadata, and
            the stem choice). A ViT takes only this side; None gives it
            VIT_IMAGE_SIZE (224) with the ImageNet stem, and is refused with
            ``small_images=True``.
        seed: initialise under this seed without touching the global RNG
            (None: draw from the global RNG, as torch does).

    The head of an :data:`ARCHS` model is a fresh ``nn.Linear`` (PyTorch's
    default init); torchvision zero-initialises its ViT head, which would make
    an untrained model's logits all equal (degenerate scores at initialisation).

    Raises:
        ValueError: an unknown arch (the message names the valid families), a bad
            num_classes or image_size, ``small_images=True`` for a torchvision or
            timm arch, or a ViT image_size its patch does not divide (see
            :func:`vit_patch_size`).
        ImportError: a ``"timm:"`` arch without timm installed.
    """
    foreign = arch not in _REGISTRY
    if foreign:
        check_arch(arch)
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: expected an int >= 1")
    if image_size is not None and (not _is_int(image_size) or image_size < 1):
        raise ValueError(f"image_size={image_size!r}: expected an int >= 1 (input side in px) "
                         f"or None")
    num_classes = int(num_classes)
    image_size = None if image_size is None else int(image_size)
    if foreign:
        if small_images:
            raise ValueError(f"small_images=True: only fastvote's {list(ARCHS)} have a "
                             f"small-image stem; {arch} is built as its library builds it")
        with _seeded(seed):
            return _view(_foreign(arch, num_classes), arch, image_size)
    if small_images is None:
        small_images = image_size is not None and image_size <= SMALL_IMAGE_MAX
    if arch in CNNS:
        small_images = None  # not a property of this architecture
    if arch in _VIT_CONFIGS and image_size is None:
        if small_images:
            raise ValueError(f"image_size=None with small_images=True: {arch} is built for one "
                             f"input side and its patch depends on it; expected an int (e.g. 32)")
        image_size = VIT_IMAGE_SIZE  # the only side it takes: record it
    with _seeded(seed):
        backbone, feature_dim = _REGISTRY[arch](bool(small_images), image_size)
        head = nn.Linear(feature_dim, num_classes)
    return Classifier(backbone, head, arch=arch, image_size=image_size, small_images=small_images)
