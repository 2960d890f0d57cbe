"""Surrogate and source architectures, and their checkpoints.

Every model here is a :class:`Classifier`: a ``backbone`` mapping images
(float [B, 3, H, W]) to pooled features (float [B, F], the penultimate globally
pooled representation, e.g. ResNet's avgpool output) and a linear ``head``
(F -> num_classes). LM votes on the logits, FM on the features; the prune step
gets both from one pass with :meth:`Classifier.forward_both`.

Architectures come from one registry (:func:`build_model`): torchvision's
ResNets (never pretrained: nothing can be downloaded) with a small-image stem
for 16-32 px inputs, and ``tiny``, a ~25k-parameter CNN (the surrogate measured
in DATA.md). A user's own network becomes a Classifier with :func:`as_classifier`.

Checkpoints (:func:`save_checkpoint`, :func:`load_model`) hold the state dict
and the metadata that rebuilds the model; they are written atomically.
:func:`load_state_dict_flexible` also reads foreign state dicts: DDP's
``module.`` and torch.compile's ``_orig_mod.`` prefixes, torchvision's own
ResNet layout (``fc.*``), and the usual wrappers (``{"state_dict": ...}``,
the DP4TL release's ``{"state_dicts": {"network": ...}}``).
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

__all__ = [
    "ARCHS", "SMALL_IMAGE_MAX", "Classifier", "build_model", "as_classifier", "unwrap_model",
    "save_checkpoint", "load_checkpoint", "load_model", "load_state_dict_flexible",
    "atomic_save",
]

# Inputs up to this side (px) get the small-image ResNet stem: the ImageNet stem's
# stride-2 conv + max-pool would shrink a 32 px image to 8 px before the first block.
SMALL_IMAGE_MAX = 64
_CHECKPOINT_FORMAT = "fastvote.model"
_WRAPPER_KEYS = ("state_dict", "state_dicts", "network", "model")  # containers seen in the wild
_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


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

def _resnet(name: str) -> Callable[[bool], Tuple[nn.Module, int]]:
    def build(small_images: bool) -> Tuple[nn.Module, int]:
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


def _tiny(small_images: bool) -> Tuple[nn.Module, int]:
    """3 x (3x3 conv, BN, ReLU), 2x max-pool after the first two, global average
    pool: 16-32-64 channels, 23.7k parameters without the head. Any input size."""
    del small_images  # one stem serves every size

    def block(c_in: int, c_out: int):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True)]

    backbone = nn.Sequential(*block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2),
                             *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return backbone, 64


# name -> builder(small_images) -> (backbone, feature_dim)
_REGISTRY: Dict[str, Callable[[bool], Tuple[nn.Module, int]]] = {
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
    "resnet101": _resnet("resnet101"),
    "tiny": _tiny,
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
        small_images: use the small-image ResNet stem (3x3 stride-1 conv, no
            max-pool). None: decide from ``image_size`` (<= SMALL_IMAGE_MAX px ->
            small), or the ImageNet stem when ``image_size`` is None too.
            ``tiny`` has one stem for all sizes and ignores it.
        image_size: the input side in px the model is meant for (metadata, and
            the stem choice).
        seed: initialise under this seed without touching the global RNG
            (None: draw from the global RNG, as torch does).
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
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        backbone, feature_dim = _REGISTRY[arch](bool(small_images))
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


def as_classifier(module: nn.Module, *, example: Optional[Tensor] = None) -> Classifier:
    """A :class:`Classifier` view of a network whose forward gives logits.

    Supported: a Classifier (returned as is, unwrapped from DDP/compile); a
    network whose logits are the output of its last ``nn.Linear`` applied to the
    pooled features: torchvision's ResNet/ResNeXt/Wide-ResNet/RegNet (``.fc``),
    EfficientNet, MobileNet, ConvNeXt, DenseNet, VGG, ViT, Swin, and any module
    ending like them. The head is ``module.fc`` when it is an ``nn.Linear``, else
    the last ``nn.Linear`` registered; the backbone is the network with that
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
    if isinstance(getattr(module, "fc", None), nn.Linear):
        path = "fc"
    else:
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


def load_state_dict_flexible(model: nn.Module, state: Mapping[str, Any]) -> nn.Module:
    """Load ``state`` into ``model`` (strictly: every key, every shape) and return it.

    Tolerated: ``module.`` / ``_orig_mod.`` prefixes on the state's keys and on
    ``model`` itself (DDP/compile wrappers); a state nested under
    ``state_dict`` / ``state_dicts`` / ``network`` / ``model``; torchvision's ResNet
    layout (``conv1.*`` ... ``fc.*``) loaded into a :class:`Classifier`.

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
        # torchvision's layout: the classifier is ``fc``, everything else the backbone
        state = {("head." + k[3:] if k.startswith("fc.") else "backbone." + k): v
                 for k, v in state.items()}
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
