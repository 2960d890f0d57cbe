"""Datasets and loaders (layer 5): the offline datasets behind one registry, FFCV
``.beton`` writers, and FFCV train / eval loader pipelines.

FFCV is optional: it is imported only by the functions that write or read betons, which
raise an ImportError naming the install command when it is missing.
"""
from .beton import (classes_path, dataset_classes, iter_samples, read_classes, read_columns,
                    read_wnids, sample_of, write_beton, write_image_folder, write_offline)
from .loaders import (IMAGENET_MEAN, IMAGENET_STD, channel_stats, default_crop, eval_loader,
                      train_loader)
from .registry import (ArrayDataset, cache_dir, get, missing, names, options, split_indices,
                       splits)

__all__ = [
    "ArrayDataset", "get", "names", "options", "splits", "missing", "split_indices", "cache_dir",
    "write_beton", "write_image_folder", "write_offline", "read_classes", "read_wnids",
    "classes_path", "sample_of", "dataset_classes", "iter_samples", "read_columns",
    "eval_loader", "train_loader", "default_crop", "channel_stats", "IMAGENET_MEAN", "IMAGENET_STD",
]

from .bias import BiasPlan, BiasSpec, bias_path, plan_bias, read_bias, write_biased  # noqa: E402
__all__ += ["BiasSpec", "BiasPlan", "plan_bias", "write_biased", "bias_path", "read_bias"]
