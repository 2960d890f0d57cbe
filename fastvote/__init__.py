"""fastvote: choose the part of a huge pretraining (source) set worth
pretraining on for a given downstream (target) task, by target-driven voting
(DP4TL's label mapping and feature mapping), with fused CPU/CUDA vote kernels.

Layers (each imports only from those above it): the compiled kernels
(``fastvote._C``) -> ``fastvote.ops`` -> voting/selection -> methods (their
typed specs) -> data/models/train -> inputs/surrogate/views -> prune/export
-> report/plots -> experiment -> CLI. ``fastvote.atomic`` and
``fastvote.progress`` serve every layer.
"""
__version__ = "0.1.0"

from fastvote import ops  # noqa: E402,F401  (registers torch.ops.fastvote.*)
from fastvote.export import export_outputs  # noqa: E402
from fastvote.prune import PruneResult, prune  # noqa: E402

__all__ = ["ops", "prune", "PruneResult", "export_outputs", "__version__"]

# The public submodules, reachable as attributes (fastvote.train.TrainConfig)
# without importing them all up front: `import fastvote` stays fast.
SUBMODULES = ("adversarial", "analysis", "atomic", "cli", "cluster", "data", "distributed", "experiment", "export",
              "features", "inputs", "methods", "models", "plots", "report", "scores", "select", "ssl", "surrogate",
              "train", "views", "voting")


def __getattr__(name: str):
    if name in SUBMODULES:
        import importlib

        return importlib.import_module(f"fastvote.{name}")
    raise AttributeError(f"module 'fastvote' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SUBMODULES))
