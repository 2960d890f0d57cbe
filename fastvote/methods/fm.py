"""FM (feature mapping, SPEC.md): source classes are represented by the mean
surrogate feature of their samples (or, label-free, by K-means clusters of the
source features); each target sample votes for its nearest centroid(s); the
most-voted classes/clusters are kept with all their samples."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from fastvote import progress as bars

from fastvote import distributed, ops
from fastvote.cluster import kmeans
from fastvote.methods.base import VOTE_OPTIONS, Selection, View, vote
from fastvote.methods.spec import Option, only_with
from fastvote.select import class_indices, select_classes
from fastvote.voting import FMVoter, combine

CLASS_WISE = True
NEEDS = {"source": ("features", "labels"), "target": ("features",)}
CENTROIDS = ("class", "kmeans")
OPTIONS = VOTE_OPTIONS + (
    Option("metric", str, "l2", "distance to the centroids: l2 (the paper) or cosine", choices=("l2", "cosine")),
    Option("temperature", float, 1.0, "softmax temperature of weight='soft' (> 0)", low=0.0),
    Option("centroids", str, "class", "source class means, or label-free K-means clusters", choices=CENTROIDS),
    Option("num_clusters", int, None, "K-means clusters (default: the number of source classes)", low=1),
    Option("iterations", int, 20, "at most this many K-means passes over the source", low=1),
)


def check(method: str, options, given) -> None:
    """Options that would be ignored are errors, not silently recorded."""
    only_with(method, options, given, ("num_clusters", "iterations"), "centroids='kmeans'",
              options["centroids"] == "kmeans")
    only_with(method, options, given, ("temperature",), "weight='soft'", options["weight"] == "soft")
    if options["temperature"] <= 0:
        raise ValueError(f"method={method!r}: temperature={options['temperature']!r} is invalid; expected > 0")


def source_centroids(source: View, progress: bool = True) -> Tuple[torch.Tensor, np.ndarray]:
    """Class means of the source features, streamed (each rank sums its shard
    under torchrun): ([P, D] float32 centroids, [K] bool mask of the P classes
    that have samples; a class without any has no centroid)."""
    sums = counts = None
    for batch in tqdm(source.batches(("features", "labels"), shard=True), desc="source class centroids",
                      leave=False, disable=bars.disable(progress)):
        s, c = ops.class_centroids(batch["features"], batch["labels"].to(batch["features"].device),
                                   source.num_classes)
        sums, counts = (s.cpu(), c.cpu()) if sums is None else (sums + s.cpu(), counts + c.cpu())
    if sums is None:
        raise ValueError("the source is empty: no features to average")
    if distributed.active():  # float64 sums, integer counts: the centroids of one process
        packed = distributed.all_reduce_(torch.cat([sums, counts[:, None].double()], 1))
        sums, counts = packed[:, :-1], packed[:, -1].long()
    present = (counts > 0).numpy()
    return (sums[present] / counts[present, None]).float(), present


def _to_label_space(values: torch.Tensor, present: np.ndarray) -> torch.Tensor:
    """[P] values of the classes with a centroid -> [K], zero for the others."""
    full = torch.zeros(len(present), dtype=values.dtype)
    full[torch.from_numpy(present)] = values.cpu()
    return full


def select(source: View, targets: Sequence[View], *, keep: int, k: int = 1, metric: str = "l2",
           weight: str = "count", temperature: float = 1.0, centroids: str = "class",
           num_clusters: Optional[int] = None, reverse: bool = False, normalize_targets: bool = False,
           iterations: int = 20, seed: int = 0, device: Optional[torch.device] = None,
           progress: bool = True) -> Selection:
    """Keeps `keep` source classes (or clusters) by FM votes."""
    info = {"centroids": centroids}
    present = None
    if centroids == "class":
        centers, present = source_centroids(source, progress)
        groups = source.labels
    elif centroids == "kmeans":
        num_clusters = num_clusters or source.num_classes
        info["num_clusters"] = num_clusters
        centers, groups = kmeans(lambda: (b["features"] for b in source.batches(("features",), shard=True)),
                                 num_clusters, num_rows=source.num_rows, sharded=True, metric=metric,
                                 iterations=iterations, seed=seed, device=device, progress=progress)
    else:
        raise ValueError(f"centroids='{centroids}' is unknown; expected one of {CENTROIDS}")
    voters = vote(targets, lambda: FMVoter(centers, k, metric, weight, temperature), "features", progress, "FM")
    votes, scores = combine(voters, normalize=normalize_targets)
    if present is not None and not present.all():  # back to the label space: no centroid, no vote
        votes, scores = _to_label_space(votes, present), _to_label_space(scores, present)
    higher_first = voters[0].higher_score_first
    kept = select_classes(votes, scores, keep, higher_score_first=higher_first, reverse=reverse, present=present)
    return Selection(indices=class_indices(groups, kept), kept_classes=kept, votes=votes, scores=scores,
                     groups=np.asarray(groups), info=info)
