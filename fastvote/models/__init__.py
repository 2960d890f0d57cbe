"""Surrogate and source models (``fastvote.models``): architectures, views of any
network as a :class:`Classifier`, and checkpoints.

Every model here is a :class:`Classifier`: a ``backbone`` mapping images
(float [B, 3, H, W]) to pooled features (float [B, F]) and a linear ``head``
(F -> num_classes); LM votes on the logits, FM on the features.

- :mod:`.classifier`: :class:`Classifier`, :func:`as_classifier` (a user's own
  network, torchvision's or timm's as one), :func:`unwrap_model`.
- :mod:`.arch`: :func:`build_model`, the registry of :data:`ARCHS` plus any
  torchvision or ``"timm:<name>"`` model, never pretrained.
- :mod:`.checkpoints`: :func:`save_checkpoint` / :func:`load_model`,
  :func:`load_state_dict_flexible` for foreign state dicts, :func:`load_surrogate`
  for weights as the libraries ship them, TorchScript files and pickled modules.
- :mod:`.preprocessing`: :func:`preprocessing_of`, what input published weights expect.
"""
from ..data.loaders import IMAGENET_MEAN, IMAGENET_STD
from .arch import (ARCHS, CNNS, SMALL_IMAGE_MAX, TIMM_PREFIX, VIT_IMAGE_SIZE, build_model,
                   check_arch, vit_patch_size)
from .checkpoints import (atomic_save, load_checkpoint, load_model, load_state_dict_flexible,
                          load_surrogate, save_checkpoint)
from .classifier import Classifier, as_classifier, unwrap_model
from .preprocessing import preprocessing_of

__all__ = [
    "ARCHS", "SMALL_IMAGE_MAX", "Classifier", "build_model", "as_classifier", "unwrap_model",
    "save_checkpoint", "load_checkpoint", "load_model", "load_state_dict_flexible",
    "load_surrogate", "preprocessing_of", "IMAGENET_MEAN", "IMAGENET_STD",
    "atomic_save", "vit_patch_size", "VIT_IMAGE_SIZE", "TIMM_PREFIX",
]
