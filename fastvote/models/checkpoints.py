"""Checkpoints and weight files: fastvote's own, and surrogates users already have.

Checkpoints (:func:`save_checkpoint`, :func:`load_model`) hold the state dict
and the metadata that rebuilds the model; they are written atomically.
:func:`load_state_dict_flexible` also reads foreign state dicts: DDP's
``module.`` and torch.compile's ``_orig_mod.`` prefixes, torchvision's own
ResNet and ViT layouts (``fc.*``, ``heads.head.*``), and the usual wrappers
(``{"state_dict": ...}``, the DP4TL release's ``{"state_dicts": {"network": ...}}``).
:func:`load_surrogate` reads weights as the libraries ship them (plain state
dicts, ``.safetensors``), TorchScript files and pickled modules.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..atomic import atomic_path
from .arch import ARCHS, _REGISTRY, _foreign, _is_int, _view, build_model, check_arch
from .classifier import Classifier, _head_path, _script_view, as_classifier, unwrap_model
from .preprocessing import preprocessing_of

__all__ = ["atomic_save", "load_checkpoint", "load_model", "load_state_dict_flexible",
           "load_surrogate", "save_checkpoint"]

_CHECKPOINT_FORMAT = "fastvote.model"
_WRAPPER_KEYS = ("state_dict", "state_dicts", "network", "model")  # containers seen in the wild
_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary name beside ``path``, fsync, then rename over
    it: readers see the old file or the new one, never a partial one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # to a handle: the archive is not named after the random temporary file
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
            the weights expect, used instead of the source's), ``resize`` and
            ``interpolation`` (the eval transform's short side before the centre
            crop, "bilinear" or "bicubic": see :func:`preprocessing_of`) and
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
