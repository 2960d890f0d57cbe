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
    resnet18    11.2M  (F=512)     resnet34   21.3M  (F=512)
    resnet50    23.5M  (F=2048)    resnet101  42.5M  (F=2048)
    vit_t_16     5.5M  (F=192, DeiT-Ti)
    vit_s_16    21.7M  (F=384, DeiT-S)
    vit_b_16    85.8M  (F=768, torchvision's vit_b_16 / ViT-B/16)

The small-image variants differ only in the stem (ResNets: -7.7k) and, for
ViTs, the patch embedding and positional embedding (vit_b_16 at 32 px: 85.1M).
So a tiny surrogate is ~3600x smaller than a ViT-B/16 source model, a
ResNet-18 one ~8x, a vit_t_16 one ~16x. A user's own network becomes a
Classifier with :func:`as_classifier`.

Checkpoints (:func:`save_checkpoint`, :func:`load_model`) hold the state dict
and the metadata that rebuilds the model; they are written atomically.
:func:`load_state_dict_flexible` also reads foreign state dicts: DDP's
``module.`` and torch.compile's ``_orig_mod.`` prefixes, torchvision's own
ResNet and ViT layouts (``fc.*``, ``heads.head.*``), and the usual wrappers
(``{"state_dict": ...}``, the DP4TL release's ``{"state_dicts": {"network": ...}}``).
"""
from __future__ import annotations

import copy
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer

__all__ = [
    "ARCHS", "SMALL_IMAGE_MAX", "Classifier", "build_model", "as_classifier", "unwrap_model",
    "save_checkpoint", "load_checkpoint", "load_model", "load_state_dict_flexible",
    "atomic_save", "vit_patch_size", "VIT_IMAGE_SIZE",
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


class Classifier(nn.Module):
    """``backbone`` (images -> pooled features) followed by a linear ``head``.

    Args:
        backbone: maps float [B, 3, H, W] to float [B, F].
        head: ``nn.Linear(F, num_classes)``.
        arch, image_size, small_images: how :func:`build_model` made it (None for
            a wrapped user module); saved in checkpoints so :func:`load_model`
            can rebuild it.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, *, arch: Optional[str] = None,
                 image_size: Optional[int] = None, small_images: Optional[bool] = None):
        super().__init__()
        if not isinstance(head, nn.Linear):
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

    def features(self, x: Tensor) -> Tensor:
        """float [B, 3, H, W] -> pooled features float [B, F]."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """float [B, 3, H, W] -> logits float [B, num_classes]."""
        return self.head(self.backbone(x))

    def forward_both(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """One pass: ``(logits [B, num_classes], features [B, F])``."""
        features = self.backbone(x)
        return self.head(features), features

    def extra_repr(self) -> str:
        return (f"arch={self.arch}, feature_dim={self.feature_dim}, "
                f"num_classes={self.num_classes}, image_size={self.image_size}")


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


def _tiny(small_images: bool, image_size: Optional[int]) -> Tuple[nn.Module, int]:
    """3 x (3x3 conv, BN, ReLU), 2x max-pool after the first two, global average
    pool: 16-32-64 channels, 23.7k parameters without the head. Any input size."""
    del small_images, image_size  # one stem serves every size

    def block(c_in: int, c_out: int):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True)]

    backbone = nn.Sequential(*block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2),
                             *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return backbone, 64


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
    "tiny": _tiny,
    **{name: _vit(name) for name in _VIT_CONFIGS},
}
ARCHS = tuple(_REGISTRY)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def build_model(arch: str, num_classes: int, *, small_images: Optional[bool] = None,
                image_size: Optional[int] = None, seed: Optional[int] = None) -> Classifier:
    """A freshly initialised :class:`Classifier` (never pretrained weights).

    Args:
        arch: one of :data:`ARCHS`.
        num_classes: head width (K source classes for a surrogate), >= 1.
        small_images: use the small-image stem: for ResNets a 3x3 stride-1 conv
            and no max-pool, for ViTs smaller patches (:func:`vit_patch_size`).
            None: decide from ``image_size`` (<= SMALL_IMAGE_MAX px -> small), or
            the ImageNet stem when ``image_size`` is None too. ``tiny`` has one
            stem for all sizes and ignores it.
        image_size: the input side in px the model is meant for (metadata, and
            the stem choice). A ViT takes only this side; None gives it
            VIT_IMAGE_SIZE (224) with the ImageNet stem, and is refused with
            ``small_images=True``.
        seed: initialise under this seed without touching the global RNG
            (None: draw from the global RNG, as torch does).

    The head is a fresh ``nn.Linear`` (PyTorch's default init) for every arch;
    torchvision zero-initialises its ViT head, which would make an untrained
    model's logits all equal (degenerate scores at initialisation).

    Raises:
        ValueError: an unknown arch, a bad num_classes or image_size, or a ViT
            image_size its patch does not divide (see :func:`vit_patch_size`).
    """
    if arch not in _REGISTRY:
        raise ValueError(f"arch={arch!r}: expected one of {list(ARCHS)}")
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: expected an int >= 1")
    if image_size is not None and (not _is_int(image_size) or image_size < 1):
        raise ValueError(f"image_size={image_size!r}: expected an int >= 1 (input side in px) "
                         f"or None")
    num_classes = int(num_classes)
    image_size = None if image_size is None else int(image_size)
    if small_images is None:
        small_images = image_size is not None and image_size <= SMALL_IMAGE_MAX
    if arch == "tiny":
        small_images = None  # not a property of this architecture
    if arch in _VIT_CONFIGS and image_size is None:
        if small_images:
            raise ValueError(f"image_size=None with small_images=True: {arch} is built for one "
                             f"input side and its patch depends on it; expected an int (e.g. 32)")
        image_size = VIT_IMAGE_SIZE  # the only side it takes: record it
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
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


def as_classifier(module: nn.Module, *, example: Optional[Tensor] = None) -> Classifier:
    """A :class:`Classifier` view of a network whose forward gives logits.

    Supported: a Classifier (returned as is, unwrapped from DDP/compile); a
    network whose logits are the output of its last ``nn.Linear`` applied to the
    pooled features: torchvision's ResNet/ResNeXt/Wide-ResNet/RegNet (``.fc``),
    VisionTransformer (``.heads.head``), EfficientNet, MobileNet, ConvNeXt,
    DenseNet, VGG, Swin, and any module ending like them. The head is the first
    of ``module.fc``, ``module.heads.head``, ``module.heads`` that is an
    ``nn.Linear``, else the last ``nn.Linear`` registered; the backbone is the
    network with that
    layer replaced by nn.Identity, so the features are what fed it (for VGG or
    MobileNetV3 that is the hidden layer of the classifier MLP). Parameters are
    shared with ``module`` (training one trains the other); ``module`` is not
    modified.

    Not supported (a wrong answer, not an error, unless ``example`` is given):
    networks that transform the logits after that layer (softmax, extra ops in
    forward) or return tuples. Pass ``example`` (a float [B, 3, H, W] batch) to
    check that the view's logits equal ``module(example)``.

    Raises:
        TypeError: not an nn.Module, or no nn.Linear in it.
        ValueError: ``example`` shows the view disagrees with the module.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    module = unwrap_model(module)
    if isinstance(module, Classifier):
        return module
    path = next((p for p in _HEAD_PATHS if isinstance(_submodule(module, p), nn.Linear)), None)
    if path is None:
        linears = [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]
        if not linears:
            raise TypeError(
                f"module: {type(module).__name__} has no nn.Linear, so its head cannot be "
                f"found; expected a network whose logits come from a final nn.Linear (e.g. a "
                f"torchvision ResNet), or build a Classifier(backbone, head) yourself")
        path = linears[-1]
    classifier = Classifier(_without(module, path), module.get_submodule(path))
    if example is not None:
        _check_view(module, classifier, example, path)
    return classifier


def _check_view(module: nn.Module, classifier: Classifier, example: Tensor, path: str) -> None:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            expected = module(example)
            logits, features = classifier.forward_both(example)
    finally:
        module.train(was_training)
    if not isinstance(expected, Tensor) or expected.shape != logits.shape \
            or not torch.allclose(expected, logits, rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"module: its output on example differs from its last Linear ({path!r}) applied to "
            f"what feeds it; as_classifier supports networks whose logits are that layer's "
            f"output (no ops after it, a single tensor returned)")
    if features.dim() != 2:
        raise ValueError(f"module: the input of {path!r} has shape {tuple(features.shape)}; "
                         f"expected pooled features [B, F]")


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------

def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary name beside ``path``, fsync, then rename over
    it: readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> Path:
    """Write ``model``'s weights and how to rebuild it, atomically.

    Args:
        path: the file to write (parents are created).
        model: a Classifier (possibly DDP/compile-wrapped; saved unwrapped, so
            keys carry no prefix) or any nn.Module (then :func:`load_model` cannot
            rebuild it; read it back with :func:`load_checkpoint`).
        extra: more entries to store (plain Python values and tensors), returned
            under ``"extra"`` by :func:`load_checkpoint`.
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
    if payload["arch"] not in _REGISTRY:
        raise ValueError(f"path={str(path)!r} holds arch={payload['arch']!r}, which build_model "
                         f"cannot rebuild (a wrapped user module?); rebuild the module yourself "
                         f"and call load_state_dict_flexible(module, load_checkpoint(path)"
                         f"['state_dict'])")
    model = build_model(payload["arch"], payload["num_classes"],
                        small_images=payload["small_images"], image_size=payload["image_size"])
    load_state_dict_flexible(model, payload["state_dict"])
    return (model, payload["extra"]) if with_extra else model


def _strip(key: str) -> str:
    while key.startswith(_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _classifier_key(key: str) -> str:
    for head in ("fc.", "heads.head."):
        if key.startswith(head):
            return "head." + key[len(head):]
    return "backbone." + key


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
    while (isinstance(state, Mapping) and not any(isinstance(v, Tensor) for v in state.values())
           and any(k in state for k in _WRAPPER_KEYS)):
        state = state[next(k for k in _WRAPPER_KEYS if k in state)]
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a state dict (a mapping of names to tensors), "
                        f"got {type(state).__name__}")
    target = unwrap_model(model)
    state = {_strip(k): v for k, v in state.items()}
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
