"""What input published weights expect: :func:`preprocessing_of`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torchvision
from torch import nn

from ..data.loaders import IMAGENET_MEAN, IMAGENET_STD
from .arch import _REGISTRY, TIMM_PREFIX, _timm
from .classifier import unwrap_model

__all__ = ["preprocessing_of"]

# The 87.5% centre crop of ImageNet evaluation: resize to resolution / 0.875, crop.
_CROP_PCT = 0.875


def _prep(resolution: int, resize: int, mean, std, interpolation: str) -> Dict[str, Any]:
    return {"resolution": int(resolution), "resize": int(resize),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "interpolation": str(interpolation)}


def _timm_prep(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    # as timm's transforms_imagenet_eval: floor(side / crop_pct), bicubic unless stated
    side = cfg["input_size"][-1]
    resize = math.floor(side / (cfg.get("crop_pct") or _CROP_PCT))
    return _prep(side, resize, cfg["mean"], cfg["std"], cfg.get("interpolation") or "bicubic")


def preprocessing_of(model: Optional[nn.Module] = None, *, arch: Optional[str] = None,
                     weights: Any = None) -> Optional[Dict[str, Any]]:
    """What input published weights expect, or None when nothing is known.

    Returns ``{"resolution": 224, "resize": 256, "mean": [...], "std": [...],
    "interpolation": "bilinear"}``: resize the short side to ``resize`` with
    PIL's antialiased ``interpolation`` ("bilinear" or "bicubic"),
    centre-crop ``resolution``, normalise with ``mean`` / ``std`` (0..1 scale),
    as the eval loader does (``fastvote.data.eval_loader``). The first that applies:

    - ``model`` holds a timm model: its ``pretrained_cfg`` (``input_size``,
      ``crop_pct`` -> ``resize = floor(resolution / crop_pct)``, mean, std,
      ``interpolation``, bicubic if unstated: timm's eval transform). A
      ``crop_mode`` "squash" or "border" is not reproduced: the loader keeps
      the aspect ratio and crops the centre.
    - ``model`` holds an EfficientNet-Lite (efficientnet_lite_pytorch): its
      image size, the 87.5% crop, bilinear and ImageNet statistics (lite0:
      224 / 256), the torchvision transform of the package's README.
    - ``arch`` (default ``model.arch``, unless that is one of :data:`ARCHS`:
      fastvote trained those weights and their checkpoint holds the
      preprocessing): ``"timm:<name>"``: timm's pretrained cfg of tag
      ``weights`` (e.g. "c3_in1k"; None: the default tag); a torchvision model
      name: its weights enum's ``transforms()`` (crop_size, resize_size, mean,
      std, interpolation; offline), for ``weights`` a member, its name ("IMAGENET1K_V1") or
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
                return _prep(side, round(side / _CROP_PCT), IMAGENET_MEAN, IMAGENET_STD,
                             "bilinear")
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
    return _prep(transform.crop_size[0], transform.resize_size[0], transform.mean, transform.std,
                 transform.interpolation.value)
