"""Surrogate and source architectures, and their checkpoints.

Every model here is a :class:`Classifier`: a ``backbone`` mapping images
(float [B, 3, H, W]) to pooled features (float [B, F], the penultimate globally
pooled representation, e.g. ResNet's avgpool output) and a linear ``head``
(F -> num_classes). LM votes on the logits, FM on the features; the prune step
gets both from one pass with :meth:`Classifier.forward_both`.

Architectures come from one registry (:func:`build_model`), never pretrained
(nothing can be downloaded): torchvision's ResNets with a small-image stem for
16-32 px inputs; ``tiny``, a ~25k-parameter CNN (the surrogate measured in
DATA.md); and Vision Transformers built with torchvision's VisionTransformer
(features: the class token after the final LayerNorm), with smaller patches for
small images (:func:`vit_patch_size`). Parameters (backbone, without the head;
a 1000-class head adds F * 1000 + 1000; measured at 224 px, ImageNet stem):

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

Surrogates users already have: :func:`build_model` also builds any torchvision
classification model by name (``"efficientnet_b0"``, ``"convnext_tiny"``, ...) and
any timm model as ``"timm:<name>"`` (random init; timm is optional), so a
checkpoint of one rebuilds; :func:`load_surrogate` reads such weights as the
libraries ship them (plain state dicts, ``.safetensors``), TorchScript files and
pickled modules; :func:`preprocessing_of` says what input the published weights
expect; a user's own network becomes a Classifier with :func:`as_classifier`.

Checkpoints (:func:`save_checkpoint`, :func:`load_model`) hold the state dict
and the metadata that rebuilds the model; they are written atomically.
:func:`load_state_dict_flexible` also reads foreign state dicts: DDP's
``module.`` and torch.compile's ``_orig_mod.`` prefixes, torchvision's own
ResNet and ViT layouts (``fc.*``, ``heads.head.*``), and the usual wrappers
(``{"state_dict": ...}``, the DP4TL release's ``{"state_dicts": {"network": ...}}``).
"""
from __future__ import annotations

import contextlib
import copy
import numbers
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer

from .atomic import atomic_path
from .data.loaders import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ARCHS", "SMALL_IMAGE_MAX", "Classifier", "build_model", "as_classifier", "unwrap_model",
    "save_checkpoint", "load_checkpoint", "load_model", "load_state_dict_flexible",
    "load_surrogate", "preprocessing_of", "IMAGENET_MEAN", "IMAGENET_STD",
    "atomic_save", "vit_patch_size", "VIT_IMAGE_SIZE", "TIMM_PREFIX",
]

# Inputs up to this side (px) get the small-image stem: the ResNet ImageNet stem's
# stride-2 conv + max-pool would shrink a 32 px image to 8 px before the first block,
# a ViT's 16 px patches would leave it 2 x 2 tokens.
SMALL_IMAGE_MAX = 64
# A ViT is built for one input side: this one when image_size is None (ImageNet stem).
VIT_IMAGE_SIZE = 224
_VIT_PATCH = 16  # the ImageNet-stem patch, the "/16" of the names
_CHECKPOINT_FORMAT = "fastvote.model"
_WRAPPER_KEYS = ("state_dict", "state_dicts", "network", "model")  # containers seen in the wild
_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
# where torchvision keeps the classifier Linear: ResNet & co., VisionTransformer
_HEAD_PATHS = ("fc", "heads.head", "heads")
TIMM_PREFIX = "timm:"  # build_model("timm:<name>") builds timm.create_model(name)
# The 87.5% centre crop of ImageNet evaluation: resize to resolution / 0.875, crop.
_CROP_PCT = 0.875


class Classifier(nn.Module):
    """``backbone`` (images -> pooled features) followed by a linear ``head``.

    Args:
        backbone: maps float [B, 3, H, W] to float [B, F].
        head: ``nn.Linear(F, num_classes)`` (or a TorchScript one, for
            :func:`load_surrogate`'s view of a TorchScript file).
        arch, image_size, small_images: how :func:`build_model` made it (None for
            a wrapped user module); saved in checkpoints so :func:`load_model`
            can rebuild it.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, *, arch: Optional[str] = None,
                 image_size: Optional[int] = None, small_images: Optional[bool] = None):
        super().__init__()
        if not _is_linear(head):
            raise TypeError(f"head: expected an nn.Linear(feature_dim, num_classes), "
                            f"got {type(head).__name__}")
        self.backbone = backbone
        self.head = head
        self.arch = arch
        self.image_size = image_size
        self.small_images = small_images

    @property
    def feature_dim(self) -> int:
        """F, the width of the pooled features (the head's input)."""
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        """The head's output width."""
        return self.head.out_features

    @torch.jit.export  # a scripted or traced Classifier keeps it (load_surrogate reads it)
    def features(self, x: Tensor) -> Tensor:
        """float [B, 3, H, W] -> pooled features float [B, F]."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """float [B, 3, H, W] -> logits float [B, num_classes]."""
        return self.head(self.backbone(x))

    @torch.jit.export
    def forward_both(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """One pass: ``(logits [B, num_classes], features [B, F])``."""
        features = self.backbone(x)
        return self.head(features), features

    def extra_repr(self) -> str:
        return (f"arch={self.arch}, feature_dim={self.feature_dim}, "
                f"num_classes={self.num_classes}, image_size={self.image_size}")


def _is_linear(module: Any) -> bool:
    """An nn.Linear, or one compiled by TorchScript (which keeps in/out_features)."""
    return isinstance(module, nn.Linear) or (
        isinstance(module, torch.jit.ScriptModule) and module.original_name == "Linear")


# --------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# User modules
# --------------------------------------------------------------------------

def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _without(module: nn.Module, path: str) -> nn.Module:
    """A shallow copy of ``module`` whose submodule at ``path`` is nn.Identity.

    Only the modules along ``path`` are copied (with their own child dicts);
    parameters, buffers and every other child are shared; ``module`` itself
    is not modified.
    """
    name, _, rest = path.partition(".")
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._modules[name] = _without(module._modules[name], rest) if rest else nn.Identity()
    return clone


def _submodule(module: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _is_timm(module: nn.Module) -> bool:
    return all(callable(getattr(module, name, None))
               for name in ("forward_features", "forward_head", "get_classifier"))


def _timm_features(net: nn.Module, x: Tensor) -> Tensor:
    """timm's own split: the pooled (and, where the model has one, normalised)
    pre-logits features its classifier takes."""
    return net.forward_head(net.forward_features(x), pre_logits=True)


def _head_path(module: nn.Module) -> Optional[str]:
    """Where ``module``'s head is (as_classifier's rule), or None: it has no nn.Linear."""
    head = module.get_classifier() if _is_timm(module) else None
    if isinstance(head, nn.Linear):
        return next(name for name, sub in module.named_modules() if sub is head)
    path = next((p for p in _HEAD_PATHS if isinstance(_submodule(module, p), nn.Linear)), None)
    if path is None:
        linears = [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]
        path = linears[-1] if linears else None
    return path


class _Features(nn.Module):
    """A backbone that runs ``net`` and returns its pooled features: ``where(net,
    x)`` for a callable, else the flattened output of submodule ``where`` (a
    forward hook, there only while it runs)."""

    def __init__(self, net: nn.Module, where: Any):
        super().__init__()
        self.net = net
        self.where = where

    def forward(self, x: Tensor) -> Tensor:
        if callable(self.where):
            return self.where(self.net, x)
        out = []
        handle = self.net.get_submodule(self.where).register_forward_hook(
            lambda module, args, output: out.append(output))
        try:
            self.net(x)
        finally:
            handle.remove()
        if not out:
            raise ValueError(f"features={self.where!r}: that submodule did not run in "
                             f"{type(self.net).__name__}'s forward")
        return out[-1].flatten(1)  # the last call, where a module runs more than once

    def extra_repr(self) -> str:
        return f"where={getattr(self.where, '__name__', self.where)!r}"


def as_classifier(module: nn.Module, *, features: Any = None,
                  example: Optional[Tensor] = None) -> Classifier:
    """A :class:`Classifier` view of a network whose forward gives logits.

    The head is found the same way whatever ``features`` says: a timm model's
    ``get_classifier()`` (when it is an nn.Linear); else the first of
    ``module.fc``, ``module.heads.head``, ``module.heads`` that is an nn.Linear;
    else the last nn.Linear registered. The view's logits are always
    ``head(features)``, so a new head (fine-tuning, linear probes) works on any
    view. Where the features come from:

    - ``features=None`` (torchvision, timm, and any network ending like them):
      for timm models ``forward_head(forward_features(x), pre_logits=True)``,
      timm's own pooled features; otherwise the network with the head replaced
      by nn.Identity, i.e. whatever fed the head. That covers torchvision's
      ResNet/ResNeXt/Wide-ResNet/RegNet (``.fc``), VisionTransformer
      (``.heads.head``), EfficientNet, MobileNet, ConvNeXt, DenseNet, VGG, Swin
      (for VGG or MobileNetV3 the features are the hidden layer of the
      classifier MLP, what the last Linear takes).
    - ``features="avgpool"``, a submodule name: the flattened OUTPUT of that
      submodule (a forward hook while ``module`` runs), which must be what the
      head takes. For networks the default cannot split, e.g. a forward that
      returns ``(logits, auxiliary, ...)`` (``example`` then checks the first).
    - ``features=fn``, a callable ``fn(module, x) -> [B, F]``, the features the
      head takes, e.g. ``lambda m, x: m.extract_features(x).mean((2, 3))``.

    Example::

        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=...)
        view = as_classifier(net, example=torch.randn(2, 3, 224, 224))  # head: net._fc
        view = as_classifier(net, features="_avg_pooling")  # the same features, by name
        logits, feats = view.forward_both(images)          # [B, 1000], [B, 1280]

    Parameters are shared with ``module`` (training one trains the other);
    ``module`` is not modified. A Classifier is returned as is (unwrapped from
    DDP/compile).

    Not supported (a wrong answer, not an error, unless ``example`` is given):
    networks whose logits are not ``head(features)``: softmax or other ops after
    the head, or a head that is more than one nn.Linear (then ``features`` has
    to be what its last Linear takes). Pass ``example`` (a float [B, 3, H, W]
    batch) to check that the features are [B, F] and the view's logits equal
    ``module(example)``.

    Raises:
        TypeError: not an nn.Module, no nn.Linear in it, or ``features`` neither
            None, a name nor a callable.
        ValueError: ``features`` names no submodule; ``example`` shows the view
            disagrees with the module.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    module = unwrap_model(module)
    if isinstance(module, Classifier):
        return module
    path = _head_path(module)
    if path is None:
        raise TypeError(
            f"module: {type(module).__name__} has no nn.Linear, so its head cannot be "
            f"found; expected a network whose logits come from a final nn.Linear (e.g. a "
            f"torchvision ResNet), or build a Classifier(backbone, head) yourself")
    head = module.get_submodule(path)
    if features is None and _is_timm(module) and head is module.get_classifier():
        features = _timm_features
    if isinstance(features, str) and _submodule(module, features) is None:
        names = [name for name, _ in module.named_children()]
        raise ValueError(f"features={features!r}: {type(module).__name__} has no such "
                         f"submodule; expected a dotted name such as {names[-3:]}")
    if features is not None and not isinstance(features, str) and not callable(features):
        raise TypeError(f"features: expected None, a submodule name or a callable "
                        f"(module, x) -> [B, F], got {type(features).__name__}")
    backbone = _without(module, path) if features is None else _Features(module, features)
    classifier = Classifier(backbone, head)
    if example is not None:
        _check_view(module, classifier, example, path)
    return classifier


def _check_view(module: nn.Module, classifier: Classifier, example: Tensor, path: str) -> None:
    was_training = module.training
    module.eval()
    classifier.eval()  # its own copies of the modules on the head's path (see _without)
    try:
        with torch.no_grad():
            expected = module(example)
            features = classifier.features(example)
    finally:
        module.train(was_training)
        classifier.train(was_training)
    if not isinstance(features, Tensor) or features.dim() != 2 \
            or features.shape[1] != classifier.feature_dim:
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"module: the features on example have shape {got}; expected pooled "
                         f"features [B, {classifier.feature_dim}], what its head {path!r} takes")
    logits = classifier.head(features)
    if isinstance(expected, (tuple, list)):  # (logits, auxiliary outputs...): the logits first
        expected = expected[0]
    if not isinstance(expected, Tensor) or expected.shape != logits.shape \
            or not torch.allclose(expected, logits, rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"module: its output on example differs from its head {path!r} applied to the "
            f"features; as_classifier supports networks whose logits are that layer's "
            f"output (no ops after it; features= says where the features are)")


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------

def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary name beside ``path``, fsync, then rename over
    it: readers see the old file or the new one, never a partial one."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> Path:
    """Write ``model``'s weights and how to rebuild it, atomically.

    Args:
        path: the file to write (parents are created).
        model: a Classifier (possibly DDP/compile-wrapped; saved unwrapped, so
            keys carry no prefix) or any nn.Module (then :func:`load_model` cannot
            rebuild it; read it back with :func:`load_checkpoint`).
        extra: more entries to store (plain Python values and tensors), returned
            under ``"extra"`` by :func:`load_checkpoint`. These keys mean
            something to fastvote.prune: ``resolution`` (input side in px),
            ``mean`` and ``std`` (per-channel, 0..1 scale; the preprocessing
            the weights expect, used instead of the source's) and
            ``class_names``. Without them a checkpoint's surrogate gets the
            source's size and statistics, with a warning.
    """
    model = unwrap_model(model)
    payload = {
        "format": _CHECKPOINT_FORMAT,
        "arch": getattr(model, "arch", None),
        "num_classes": getattr(model, "num_classes", None),
        "image_size": getattr(model, "image_size", None),
        "small_images": getattr(model, "small_images", None),
        "state_dict": model.state_dict(),
        "extra": extra,
    }
    return atomic_save(payload, path)


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> Dict[str, Any]:
    """The dict :func:`save_checkpoint` wrote (``state_dict``, ``arch``,
    ``num_classes``, ``image_size``, ``small_images``, ``extra``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no such checkpoint file")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"path={str(path)!r} is not a fastvote model checkpoint (written by "
                         f"save_checkpoint); for a foreign state dict build the model with "
                         f"build_model and call load_state_dict_flexible")
    return payload


def load_model(path: str | os.PathLike, *, map_location: Any = "cpu", with_extra: bool = False):
    """Rebuild the :class:`Classifier` saved by :func:`save_checkpoint`.

    Returns the model, or ``(model, extra)`` with ``with_extra=True`` (the
    ``**extra`` entries given to save_checkpoint, e.g. the preprocessing).
    """
    payload = load_checkpoint(path, map_location=map_location)
    model = _rebuild(payload, path)
    return (model, payload["extra"]) if with_extra else model


def _rebuild(payload: Mapping[str, Any], path: str | os.PathLike) -> Classifier:
    if payload["arch"] is None:
        raise ValueError(f"path={str(path)!r} holds arch=None, which build_model cannot "
                         f"rebuild (a wrapped user module?); rebuild the module yourself and "
                         f"call load_state_dict_flexible(module, load_checkpoint(path)"
                         f"['state_dict'])")
    model = build_model(payload["arch"], payload["num_classes"],
                        small_images=payload["small_images"], image_size=payload["image_size"])
    return load_state_dict_flexible(model, payload["state_dict"])


def _strip(key: str) -> str:
    while key.startswith(_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _classifier_key(key: str) -> str:
    for head in ("fc.", "heads.head."):
        if key.startswith(head):
            return "head." + key[len(head):]
    return "backbone." + key


def _unwrap_state(state: Any) -> Dict[str, Any]:
    """The state dict inside the usual wrappers, its keys without wrapper prefixes."""
    while (isinstance(state, Mapping) and not any(isinstance(v, Tensor) for v in state.values())
           and any(k in state for k in _WRAPPER_KEYS)):
        state = state[next(k for k in _WRAPPER_KEYS if k in state)]
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a state dict (a mapping of names to tensors), "
                        f"got {type(state).__name__}")
    return {_strip(k): v for k, v in state.items()}


def load_state_dict_flexible(model: nn.Module, state: Mapping[str, Any]) -> nn.Module:
    """Load ``state`` into ``model`` (strictly: every key, every shape) and return it.

    Tolerated: ``module.`` / ``_orig_mod.`` prefixes on the state's keys and on
    ``model`` itself (DDP/compile wrappers); a state nested under
    ``state_dict`` / ``state_dicts`` / ``network`` / ``model``; torchvision's ResNet
    and ViT layouts (``conv1.*`` ... ``fc.*``; ``conv_proj.*`` ... ``heads.head.*``)
    loaded into a :class:`Classifier`.

    Raises:
        ValueError: listing the missing keys, unexpected keys and shape mismatches.
    """
    state = _unwrap_state(state)
    target = unwrap_model(model)
    if isinstance(target, Classifier) and not any(
            k.startswith(("backbone.", "head.")) for k in state):
        # torchvision's layout: the classifier is ``fc`` (ResNet) or ``heads.head`` (ViT),
        # everything else the backbone
        state = {_classifier_key(k): v for k, v in state.items()}
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: {tuple(state[k].shape)} in the state, {tuple(own[k].shape)} in the model"
                  for k in own if k in state and isinstance(state[k], Tensor)
                  and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def some(keys):
            return f"{len(keys)} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"
        desc = f"arch={target.arch!r}" if isinstance(target, Classifier) else type(target).__name__
        raise ValueError(
            f"state does not fit the model ({desc}): missing keys {some(missing)}; unexpected "
            f"keys {some(unexpected)}; shape mismatches {some(mismatched)}. Expected the state "
            f"of the same architecture and num_classes ('module.'/'_orig_mod.' prefixes and "
            f"torchvision's fc layout are handled)")
    target.load_state_dict(state)
    return model


# --------------------------------------------------------------------------
# Surrogates users already have
# --------------------------------------------------------------------------

def load_surrogate(path: str | os.PathLike, arch: Optional[str] = None,
                   num_classes: Optional[int] = None) -> Tuple[Classifier, Dict[str, Any]]:
    """A :class:`Classifier` from a file of any usual kind, and what is known about it.

    ``path`` may hold:

    (a) a fastvote checkpoint (:func:`save_checkpoint`): as :func:`load_model`.
    (b) a plain state dict as torchvision and timm ship weights
        (``resnet18-f37072fd.pth``, timm's ``model.safetensors`` or
        ``pytorch_model.bin``; also inside ``{"state_dict": ...}`` /
        ``{"model": ...}``, keys with ``module.`` / ``_orig_mod.`` prefixes), or
        a Classifier's own ``state_dict()``: loaded strictly into ``arch``
        (required: a state dict does not say its architecture; any
        :func:`build_model` name), with ``num_classes`` read off the head
        weight's shape when not given.
    (c) a TorchScript file (``torch.jit.save``): the logits are its output; the
        features its ``features(x)``, a method or a submodule giving [B, F] (a
        Classifier scripted or traced keeps its ``features`` and
        ``forward_both``, which are ``@torch.jit.export``; export one in your
        own module). Without one it still gives logits (LM); only asking for
        features raises a ValueError. ``num_classes`` / ``feature_dim`` come
        from its last Linear layer; ``forward_both`` is two calls unless it
        exports one.
    (d) a pickled nn.Module (``torch.save(model)``), viewed with
        :func:`as_classifier`. Unpickling RUNS CODE the file names (as any
        ``torch.load(weights_only=False)``): load only files you trust. Every
        other kind is read with ``weights_only=True`` first, so (a) and (b)
        files never reach the unpickler.

    ``arch`` is used for (b) only; the other kinds say what they are.

    Returns:
        ``(model, info)``: ``info["format"]`` is "fastvote", "state_dict",
        "torchscript" or "pickle"; for (a) the rest is the checkpoint's extra
        (e.g. "resolution", "mean", "std"), otherwise :func:`preprocessing_of`'s
        keys ("resolution", "resize", "mean", "std") where known (for (b) of
        torchvision's weights, matched by file name, else ``arch``'s default).

    Raises:
        FileNotFoundError: no such file.
        ValueError: (b) without ``arch`` (the message names ``--arch``), a state
            that does not fit it (the first missing / unexpected keys and shape
            mismatches), or a model whose head is not ``num_classes`` wide.
        TypeError: a network without a Linear head.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no such surrogate file")
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 1):
        raise ValueError(f"num_classes={num_classes!r}: expected an int >= 1 or None")
    if _is_torchscript(path):
        model = _script_view(torch.jit.load(path, map_location="cpu"))
        info = {"format": "torchscript", **(preprocessing_of(model) or {})}
    else:
        obj = _read(path)
        if isinstance(obj, nn.Module):
            model = as_classifier(obj)
            info = {"format": "pickle", **(preprocessing_of(model) or {})}
        elif isinstance(obj, Mapping) and obj.get("format") == _CHECKPOINT_FORMAT:
            model, info = _rebuild(obj, path), {"format": "fastvote", **obj["extra"]}
        else:
            model = _from_state(obj, arch, num_classes, path)
            try:
                prep = preprocessing_of(arch=arch, weights=path.name)
            except ValueError:  # renamed or fine-tuned weights: the arch's default ones
                prep = preprocessing_of(arch=arch)
            info = {"format": "state_dict", **(prep or {})}
    if num_classes is not None and model.num_classes != num_classes:
        raise ValueError(f"path={str(path)!r} holds a model with {model.num_classes} classes; "
                         f"expected num_classes={num_classes}")
    return model, info


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save archives hold compiled code (constants.pkl); torch.save ones do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _read(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # timm's and Hugging Face's format
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # a pickled module (or objects beside the tensors): this runs the file's code,
        # hence load_surrogate's "only files you trust"
        return torch.load(path, map_location="cpu", weights_only=False)


def _from_state(state: Any, arch: Optional[str], num_classes: Optional[int],
                path: Path) -> Classifier:
    state = _unwrap_state(state)
    if arch is None:
        raise ValueError(
            f"path={str(path)!r} holds a plain state dict ({len(state)} tensors), which does not "
            f"say its architecture; pass arch= (--arch on the command line): one of fastvote's "
            f"{list(ARCHS)}, a torchvision model name (e.g. 'resnet50') or 'timm:<name>'")
    if arch in _REGISTRY or any(k.startswith("backbone.") for k in state):
        # fastvote's layout (a Classifier's state_dict), or torchvision's ResNet / ViT one
        # that load_state_dict_flexible maps onto it
        rows = num_classes or _rows(state, ("head.weight", "fc.weight", "heads.head.weight"), arch)
        return load_state_dict_flexible(build_model(arch, rows), state)
    check_arch(arch)
    net = _foreign(arch)  # the library's default head, to find where the head is
    head = _head_path(net)
    if head is None:
        raise TypeError(f"arch={arch!r} has no nn.Linear head; a surrogate needs one")
    rows = num_classes or _rows(state, (f"{head}.weight",), arch)
    if rows != net.get_submodule(head).out_features:
        net = _foreign(arch, rows)
    # strictly into the library's own layout, then viewed: as build_model(arch) would be
    return _view(load_state_dict_flexible(net, state), arch, None)


def _rows(state: Mapping[str, Any], keys: Tuple[str, ...], arch: str) -> int:
    """num_classes, read off the head weight's shape."""
    key = next((k for k in keys if k in state), None)
    if key is None:
        raise ValueError(f"the state dict has no {' / '.join(keys)}, the head of arch={arch!r}, "
                         f"so its num_classes is unknown; pass num_classes= or check arch")
    return int(state[key].shape[0])


def _script_features(script: nn.Module, x: Tensor) -> Tensor:
    if not hasattr(script, "features"):
        raise ValueError(
            "this TorchScript model gives logits only (label mapping): it has no `features` "
            "method or submodule for the pooled features that feature mapping needs; save "
            "a scripted or traced fastvote Classifier (as_classifier(net)), or export a "
            "features(x) -> [B, F] method")
    features = script.features(x)
    if features.dim() != 2:
        raise ValueError(f"this TorchScript model's `features` gives shape "
                         f"{tuple(features.shape)}; expected pooled features [B, F]")
    return features


class _ScriptView(Classifier):
    """A TorchScript classifier: logits from calling it, features from its ``features``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone.net(x)

    def forward_both(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        script = self.backbone.net
        if hasattr(script, "forward_both"):  # a scripted Classifier: one pass
            return script.forward_both(x)
        return script(x), self.backbone(x)


def _script_view(script: nn.Module) -> Classifier:
    linears = [sub for _, sub in script.named_modules() if _is_linear(sub)]
    if not linears:
        raise TypeError("the TorchScript model has no Linear layer, so its head (and "
                        "num_classes) is unknown; expected a classifier ending in one")
    return _ScriptView(_Features(script, _script_features), linears[-1])


def _prep(resolution: int, resize: int, mean, std) -> Dict[str, Any]:
    return {"resolution": int(resolution), "resize": int(resize),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _timm_prep(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    side = cfg["input_size"][-1]
    return _prep(side, round(side / cfg.get("crop_pct", _CROP_PCT)), cfg["mean"], cfg["std"])


def preprocessing_of(model: Optional[nn.Module] = None, *, arch: Optional[str] = None,
                     weights: Any = None) -> Optional[Dict[str, Any]]:
    """What input published weights expect, or None when nothing is known.

    Returns ``{"resolution": 224, "resize": 256, "mean": [...], "std": [...]}``:
    resize the short side to ``resize``, centre-crop ``resolution``, normalise
    with ``mean`` / ``std`` (0..1 scale). The first that applies:

    - ``model`` holds a timm model: its ``pretrained_cfg`` (``input_size``,
      ``crop_pct`` -> ``resize = round(resolution / crop_pct)``, mean, std).
    - ``model`` holds an EfficientNet-Lite (efficientnet_lite_pytorch): its
      image size, the 87.5% crop and ImageNet statistics (lite0: 224 / 256).
    - ``arch`` (default ``model.arch``, unless that is one of :data:`ARCHS`:
      fastvote trained those weights and their checkpoint holds the
      preprocessing): ``"timm:<name>"``: timm's pretrained cfg of tag
      ``weights`` (e.g. "c3_in1k"; None: the default tag); a torchvision model
      name: its weights enum's ``transforms()`` (crop_size, resize_size, mean,
      std; offline), for ``weights`` a member, its name ("IMAGENET1K_V1") or
      the file name torchvision downloads ("resnet50-0676ba61.pth"), None the
      DEFAULT; anything else: None.

    Raises:
        ValueError: ``weights`` names none of ``arch``'s published weights.
    """
    if model is not None:
        model = unwrap_model(model)
        for sub in model.modules():
            if isinstance(getattr(sub, "pretrained_cfg", None), dict):  # timm
                return _timm_prep(sub.pretrained_cfg)
            if type(sub).__name__ == "EfficientNet" and \
                    type(sub).__module__.startswith("efficientnet_lite_pytorch"):
                side = sub._global_params.image_size
                return _prep(side, round(side / _CROP_PCT), IMAGENET_MEAN, IMAGENET_STD)
        own = getattr(model, "arch", None)
        arch = arch if arch is not None or own in _REGISTRY else own
    if arch is None:
        return None
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX):] + ("" if weights is None else f".{weights}")
        try:
            cfg = _timm(arch).models.get_pretrained_cfg(name)
        except RuntimeError as error:  # timm's "Invalid pretrained tag"
            raise ValueError(f"weights={weights!r}: {error}") from None
        return None if cfg is None else _timm_prep(cfg.to_dict())
    if arch not in torchvision.models.list_models(module=torchvision.models):
        return None
    published = torchvision.models.get_model_weights(arch)
    member = published.DEFAULT if weights is None else next(
        (m for m in published if weights in (m, m.name, str(m), Path(m.url).name)), None)
    if member is None:
        raise ValueError(f"weights={weights!r}: expected one of {arch}'s published weights "
                         f"{[m.name for m in published]} or their files "
                         f"{[Path(m.url).name for m in published]}")
    transform = member.transforms()
    return _prep(transform.crop_size[0], transform.resize_size[0], transform.mean, transform.std)
