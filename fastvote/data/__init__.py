"""Datasets and loaders (layer 5): the offline datasets behind one registry, FFCV
``.beton`` writers (numpy, no FFCV needed), and train / eval loaders.

FFCV is optional: the loaders are FFCV pipelines where ``import ffcv`` works and torch
DataLoaders over the same betons otherwise (``backend()``; one warning a process says so).
"""
from .beton import (IMAGE_FOLDER_MAX_SIDE, classes_path, dataset_classes, iter_samples, read_classes, read_columns,
                    read_wnids, sample_of, write_beton, write_image_folder, write_offline)
from .loaders import (IMAGENET_MEAN, IMAGENET_STD, backend, channel_stats, default_crop, default_crop_ratio,
                      default_interpolation, eval_loader, set_resolution, train_loader)
from .registry import (ArrayDataset, cache_dir, get, missing, names, options, split_indices,
                       splits)

__all__ = [
    "IMAGE_FOLDER_MAX_SIDE", "ArrayDataset", "get", "names", "options", "splits", "missing", "split_indices", "cache_dir",
    "write_beton", "write_image_folder", "write_offline", "read_classes", "read_wnids",
    "classes_path", "sample_of", "dataset_classes", "iter_samples", "read_columns",
    "eval_loader", "train_loader", "set_resolution", "backend", "default_crop", "default_crop_ratio", "channel_stats",
    "default_interpolation",
    "IMAGENET_MEAN", "IMAGENET_STD",
]

from .bias import BiasPlan, BiasSpec, bias_path, plan_bias, read_bias, write_biased  # noqa: E402
__all__ += ["BiasSpec", "BiasPlan", "plan_bias", "write_biased", "bias_path", "read_bias"]
