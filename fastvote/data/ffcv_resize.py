"""FFCV's eval decoder with torchvision's resize (``resampling.py``): PIL's resampler
ported to numba, so FFCV's decoding threads give the bytes the torch back end gets
from PIL (tests/test_preprocessing.py checks it against PIL on many sizes).

Pillow's ``Resample.c``, 8 bits a channel: per output pixel, the filter's weights over
the input pixels in its (shrink-widened) support are normalised, rounded to 22-bit fixed
point, and summed in 32-bit integers; one pass along each axis, each rounded to uint8.
Only the crop's rows and columns are computed: each output pixel depends only on its
own position, so that equals resizing the whole image and cropping. About as fast as
FFCV's own crop + cv2 INTER_AREA (4.0 vs 3.8 ms an ImageNet-sized photo, one thread).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.pipeline.compiler import Compiler

from .resampling import resized_crop_box

_PRECISION_BITS = 22  # Pillow's: 32 bits - 8 for the value - 2 for the sum's headroom
_HALF = 1 << (_PRECISION_BITS - 1)  # starts each sum: rounds it to nearest
_box = numba.njit(cache=True, nogil=True)(resized_crop_box)


@numba.njit(cache=True, nogil=True)
def _filter(x: float, bicubic: bool) -> float:
    """Pillow's bilinear (triangle, support 1) or bicubic (a = -0.5, support 2) filter."""
    x = abs(x)
    if bicubic:
        if x < 1.0:
            return ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
        if x < 2.0:
            return (((x - 5) * x + 8) * x - 4) * -0.5
        return 0.0
    return 1.0 - x if x < 1.0 else 0.0


@numba.njit(cache=True, nogil=True)
def _weights(in_size: int, out_size: int, first: int, count: int, bicubic: bool):
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for output pixels
    ``first .. first + count - 1`` of a resize from ``in_size`` to ``out_size``:
    (starts int64 [count], lengths int64 [count], fixed-point weights int32 [count, K])."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # shrinking widens the filter: the antialiasing
    support = (2.0 if bicubic else 1.0) * filterscale
    inverse = 1.0 / filterscale  # Pillow multiplies by it (dividing rounds differently)
    starts = np.empty(count, np.int64)
    lengths = np.empty(count, np.int64)
    weights = np.zeros((count, int(math.ceil(support)) * 2 + 1), np.int32)
    k = np.empty(weights.shape[1])
    for i in range(count):
        center = (first + i + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C's (int): truncation, as int()
        xmax = min(int(center + support + 0.5), in_size) - xmin
        total = 0.0
        for x in range(xmax):
            k[x] = _filter((x + xmin - center + 0.5) * inverse, bicubic)
            total += k[x]
        for x in range(xmax):
            w = k[x] / total if total != 0.0 else k[x]
            w *= 1 << _PRECISION_BITS
            weights[i, x] = int(w - 0.5) if w < 0 else int(w + 0.5)
        starts[i], lengths[i] = xmin, xmax
    return starts, lengths, weights


@numba.njit(cache=True, nogil=True)
def _clip8(total: np.int32) -> np.uint8:
    return np.uint8(min(max(total >> _PRECISION_BITS, 0), 255))


@numba.njit(cache=True, nogil=True)
def _horizontal(src: np.ndarray, starts, lengths, weights, out: np.ndarray) -> None:
    """out[y, x] = the fixed-point sum of src[y, starts[x] + t] * weights[x, t]; in int32
    as Pillow's C ints (it cannot overflow), which is twice as fast as int64 here."""
    for y in range(out.shape[0]):
        for x in range(out.shape[1]):
            red = green = blue = np.int32(_HALF)
            for t in range(lengths[x]):
                weight = weights[x, t]
                red += np.int32(src[y, starts[x] + t, 0]) * weight
                green += np.int32(src[y, starts[x] + t, 1]) * weight
                blue += np.int32(src[y, starts[x] + t, 2]) * weight
            out[y, x, 0], out[y, x, 1], out[y, x, 2] = _clip8(red), _clip8(green), _clip8(blue)


@numba.njit(cache=True, nogil=True)
def _vertical(src: np.ndarray, starts, lengths, weights, out: np.ndarray) -> None:
    """out[y, x] = the fixed-point sum of src[starts[y] + t, x] * weights[y, t]."""
    sums = np.empty(out.shape[1:], np.int32)  # a whole row at a time: the loops vectorise
    for y in range(out.shape[0]):
        sums[:] = _HALF
        for t in range(lengths[y]):
            weight = weights[y, t]
            row = src[starts[y] + t]
            for x in range(out.shape[1]):
                for c in range(3):
                    sums[x, c] += np.int32(row[x, c]) * weight
        for x in range(out.shape[1]):
            for c in range(3):
                out[y, x, c] = _clip8(sums[x, c])


@numba.njit(cache=True, nogil=True)
def resize_center_crop(image: np.ndarray, out: np.ndarray, resize: int, bicubic: bool) -> None:
    """uint8 (h, w, 3) -> ``out`` uint8 (side, side, 3), in place: ``resampling.
    resize_center_crop`` (PIL, bilinear or bicubic) bit for bit."""
    height, width, side = image.shape[0], image.shape[1], out.shape[0]
    new_height, new_width, top, left = _box(height, width, side, resize)
    x_starts, x_lengths, x_weights = _weights(width, new_width, left, side, bicubic)
    y_starts, y_lengths, y_weights = _weights(height, new_height, top, side, bicubic)
    # Each pass rounds to uint8, so their order shows in the last bit. Pillow 13 runs the
    # vertical pass first when the height shrinks by more than twice what the width does
    # (measured against it: tests/test_preprocessing.py); earlier Pillows never did.
    if new_height < height and height - new_height > 2 * (width - new_width):
        first = x_starts[0]  # only the input columns the horizontal pass reads
        columns = image[:, first:x_starts[-1] + x_lengths[-1]]
        rows = np.empty((side, columns.shape[1], 3), np.uint8)
        _vertical(columns, y_starts, y_lengths, y_weights, rows)
        _horizontal(rows, x_starts - first, x_lengths, x_weights, out)
    else:
        first = y_starts[0]  # only the input rows the vertical pass reads
        rows = image[first:y_starts[-1] + y_lengths[-1]]
        columns = np.empty((rows.shape[0], side, 3), np.uint8)
        _horizontal(rows, x_starts, x_lengths, x_weights, columns)
        _vertical(columns, y_starts - first, y_lengths, y_weights, out)


class ResizeCenterCropDecoder(CenterCropRGBImageDecoder):
    """FFCV's CenterCropRGBImageDecoder with torchvision's resize: the short side to
    ``round(side / ratio)`` px with PIL's ``interpolation`` ("bilinear" or "bicubic"),
    then the centre ``side`` x ``side``. ``output_size`` may change between epochs."""

    def __init__(self, output_size, ratio: float, interpolation: str):
        super().__init__(output_size, ratio)
        self.bicubic = interpolation == "bicubic"

    def generate_code(self):
        # ffcv's ResizedCropRGBImageDecoder.generate_code, its crop + cv2 resize replaced
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        ratio, bicubic = self.ratio, self.bicubic

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            resize = int(round(destination.shape[1] / ratio))
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1,
                               False, False)
                    image = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                resize_center_crop(image, destination[dst_ix], resize, bicubic)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
