"""fastvote: choose the part of a huge pretraining (source) set worth
pretraining on for a given downstream (target) task, by target-driven voting
(DP4TL's label mapping and feature mapping), with fused CPU/CUDA vote kernels.

Layers (each imports only from those above it): the compiled kernels
(``fastvote._C``) -> ``fastvote.ops`` -> voting/selection -> methods ->
data/models/train -> experiment and CLI.
"""
__version__ = "0.1.0"

from fastvote import ops  # noqa: E402,F401  (registers torch.ops.fastvote.*)
from fastvote.prune import PruneResult, prune  # noqa: E402

__all__ = ["ops", "prune", "PruneResult", "__version__"]
