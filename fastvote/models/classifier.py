"""The :class:`Classifier` every fastvote model is, and views of other networks as one.

A Classifier is a ``backbone`` mapping images (float [B, 3, H, W]) to pooled
features (float [B, F], the penultimate globally pooled representation, e.g.
ResNet's avgpool output) and a linear ``head`` (F -> num_classes). LM votes on
the logits, FM on the features; the prune step gets both from one pass with
:meth:`Classifier.forward_both`. A user's own network (torchvision, timm, or any
whose pooled features feed a final nn.Linear) becomes one with
:func:`as_classifier`; a TorchScript file (``load_surrogate``) with ``_script_view``.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["Classifier", "as_classifier", "unwrap_model"]

# where torchvision keeps the classifier Linear: ResNet & co., VisionTransformer
_HEAD_PATHS = ("fc", "heads.head", "heads")


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
# TorchScript files
# --------------------------------------------------------------------------

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
