"""The eval loaders' resize: torchvision's ``Resize(resize)`` + ``CenterCrop(side)`` on a
PIL image, the transform ImageNet weights are published with.

``eval_loader(crop_ratio=, interpolation=)`` has two conventions:

- ``"bilinear"`` / ``"bicubic"`` (torchvision's, timm's): resize the SHORT side of the
  whole image to ``resize = round(side / crop_ratio)`` px with PIL's filter (antialiased:
  its support widens with the shrink factor), the long side in proportion, then crop the
  centre ``side`` x ``side``. Here through PIL itself (the torch back end); ``ffcv_resize``
  ports PIL's fixed-point resampler to numba for FFCV's threads, the same bytes.
- ``"area"`` (FFCV's CenterCropRGBImageDecoder, the default up to 64 px): crop the centre
  square of ``crop_ratio`` x the short side, then resize it with cv2's INTER_AREA. It keeps
  a 16-64 px glyph whole; on photos it is not what the weights saw (3 of 6
  EfficientNet-Lite0 top-1 labels changed against torchvision's transform).

torchvision's tensor path (``F.resize(tensor, antialias=True)``) differs from its PIL path
by at most one grey level (0.16 on average on the test photos: float arithmetic vs PIL's
8-bit fixed point); users compare with
the PIL one (``transforms.Resize`` on ``Image.open``), so that is the one matched.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

INTERPOLATIONS = ("area", "bilinear", "bicubic")
_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resized_crop_box(height: int, width: int, side: int, resize: int) -> tuple[int, int, int, int]:
    """torchvision's geometry: the short side resized to ``resize`` (the long one
    truncated, as ``Resize(int)``), then ``CenterCrop(side)``'s corner (half-way offsets
    rounded half to even, as its ``round``). Returns (new_height, new_width, top, left).

    Plain Python a numba function can compile too (``ffcv_resize``)."""
    if width <= height:
        new_width, new_height = resize, int(resize * height / width)
    else:
        new_height, new_width = resize, int(resize * width / height)
    return (new_height, new_width, int(round((new_height - side) / 2.0)),
            int(round((new_width - side) / 2.0)))


def resize_center_crop(image: np.ndarray, side: int, resize: int, interpolation: str) -> np.ndarray:
    """uint8 (h, w, 3) -> (side, side, 3): torchvision's ``Resize(resize,
    interpolation)`` then ``CenterCrop(side)`` on the PIL image, bit for bit."""
    new_height, new_width, top, left = resized_crop_box(*image.shape[:2], side, resize)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize(
        (new_width, new_height), _PIL_FILTERS[interpolation])
    return np.asarray(resized)[top:top + side, left:left + side]
