"""Self-supervised prototype pruning, SSP (Sorscher et al., NeurIPS 2022,
"Beyond neural scaling laws"; SPEC.md Baselines), sample-wise, label-free.

Definition, as implemented:
- Embeddings: the surrogate's pooled features, L2-normalised (Sorscher et al.
  use a self-supervised SwAV model; here it is whatever surrogate prune is
  given — pass a self-supervised one to match them).
- Prototypes: spherical k-means (fastvote.cluster.kmeans, metric="cosine",
  seeded) with `num_clusters` clusters (prune's num_clusters; default the
  number of source classes).
- Score = cosine distance to the nearest prototype, 1 - max_j cos(x, c_j).
- keep_hard=True (default; the authors' choice when data is abundant) keeps
  the `keep` FARTHEST samples (the hardest, least prototypical);
  keep_hard=False keeps the nearest (the easiest, for scarce data). Ties by a
  seeded random key. ratio = the fraction of source SAMPLES removed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from fastvote import ops
from fastvote.cluster import kmeans
from fastvote.methods.spec import Option
from fastvote.methods.base import Selection, TrainableSource, View, cached_scores, check_int, keep_top, sample_selection

CLASS_WISE = False
NEEDS = {"source": ("features",), "target": ()}
OPTIONS = (
    Option("keep_hard", bool, True, "keep the samples farthest from their prototype (False: the nearest)"),
    Option("num_clusters", int, None, "k-means prototypes (default: the number of source classes)", low=1),
)
CHUNK = 65536      # rows a distance pass reads at once
KMEANS_BATCH = 4096  # rows a mini-batch k-means update sees


def prototype_distances(features, centroids: torch.Tensor, device=None) -> torch.Tensor:
    """1 - max_j cos(x, c_j) for rows of `features` [N, D] (array-like,
    read in chunks) against centroids [K, D]. Returns float64 [N]."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    c = torch.nn.functional.normalize(centroids.float(), dim=1).to(device)
    out = []
    for start in range(0, len(features), CHUNK):
        x = torch.from_numpy(np.array(features[start:start + CHUNK], dtype=np.float32))
        x = torch.nn.functional.normalize(x, dim=1)
        values, _ = ops.nearest_centroids(x.to(device), c, 1, "cosine")
        out.append((1.0 - values[:, 0].double()).cpu())
    return torch.cat(out)


def select(source: TrainableSource, targets: Sequence[View], *, keep: int, num_clusters: Optional[int] = None,
           keep_hard: bool = True, seed: int = 0, device=None, progress: bool = True) -> Selection:
    """Keeps `keep` source SAMPLES (prune's ratio: the fraction of samples
    removed): the farthest from their nearest k-means prototype (keep_hard) or
    the nearest."""
    if not isinstance(keep_hard, (bool, np.bool_)):
        raise ValueError(f"keep_hard={keep_hard!r} is invalid; expected True (keep the samples farthest from "
                         "their prototype) or False (keep the nearest)")
    num_clusters = check_int("num_clusters", num_clusters or source.num_classes, 1,
                             "k-means prototypes; default the number of source classes")
    info = {"num_clusters": num_clusters, "seed": seed}

    def compute() -> torch.Tensor:
        features = source.array("features")
        chunks = lambda: (torch.from_numpy(np.array(features[s:s + KMEANS_BATCH], dtype=np.float32))
                          for s in range(0, len(features), KMEANS_BATCH))
        centroids, _ = kmeans(chunks, num_clusters, num_rows=len(features), metric="cosine", seed=seed,
                              device=device, progress=progress)
        return prototype_distances(features, centroids, device)

    scores, path = cached_scores(source, "ssp", {"num_clusters": num_clusters, "seed": seed}, compute)
    rows = keep_top(scores.numpy(), keep, seed, highest=bool(keep_hard))
    return sample_selection(rows, scores, {**info, "score": "cosine distance to the nearest k-means prototype",
                                           "keep": "hardest (farthest)" if keep_hard else "easiest (nearest)",
                                           "scores_file": str(path) if path else None})
