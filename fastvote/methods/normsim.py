"""NormSim (Wang et al., NeurIPS 2024, "CLIPLoss and Norm-Based Data Selection
Methods for Multimodal Contrastive Learning"), sample-wise: every source sample
is scored by its similarity to the target's samples and the best are kept.

Definition, as implemented (docs/SELECTION.md, "Per-sample target scores"):
- Source and target rows are the surrogate's pooled features (or precomputed
  embeddings), L2-normalised; cos(x, t) their dot product.
- p = "inf" (default): NormSim_inf(x) = max_j cos(x, t_j), the best similarity
  to any target sample (its nearest target sample).
- p = "2": NormSim_2(x) = sqrt(mean_j cos(x, t_j)^2), the RMS similarity. The
  paper writes the p-norm of the similarity vector, (sum_j |cos|^p)^(1/p); the
  authors' code (baselines/vas2.py) scores x^T S x with S = sum_j t_j t_j^T / M,
  the square of ours. All three rank alike; dividing by M makes scores of
  different targets comparable. For p = inf the paper's |cos| and our signed
  max differ only for a sample more anti-aligned to some target sample than
  aligned to every one.
- Several targets: their samples are pooled (NormSim over the union).
- The `keep` highest scores are kept (ties by a seeded random key,
  base.tie_keys); ratio = the fraction of source SAMPLES removed.
- cap: at most `cap` kept samples per source class, or per k-means cluster
  (cosine, `num_clusters`, seeded) when the source has no labels;
  fastvote.select.capped_rows states the rule (MetaCLIP's balance; when the
  budget exceeds what the cap allows, the tail is drawn with MetaCLIP's
  min(1, cap / count) weights).

Scores are computed over the whole source on every rank (not sharded), like
the other sample-wise methods; the op is fastvote.ops.sample_scores.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from fastvote import ops
from fastvote import progress as bars
from fastvote.cluster import kmeans
from fastvote.methods.base import Selection, View, rank, sample_selection
from fastvote.methods.spec import Option, only_with
from fastvote.select import capped_rows

CLASS_WISE = False
NEEDS = {"source": ("features",), "target": ("features",)}
P_CHOICES = ("inf", "2")
# torchrun reads "--p" as an abbreviation of its own --print-completion: the flag is --pnorm.
P = Option("p", str, "inf", "NormSim's norm over the target similarities: inf (the best one) or 2 (their RMS)",
           choices=P_CHOICES, flag="--pnorm")
CAP = Option("cap", int, None, "at most this many kept samples per source class (per k-means cluster without "
             "labels); MetaCLIP's balance", low=1)
OPTIONS = (
    P, CAP,
    Option("num_clusters", int, None, "k-means clusters standing in for classes when capping an unlabelled source",
           low=1),
)
SCORE_NAMES = {"inf": "NormSim_inf: the best cosine similarity to a target sample",
               "2": "NormSim_2: the RMS cosine similarity to the target samples"}


def check(method: str, options, given) -> None:
    only_with(method, options, given, ("num_clusters",), "cap=", options["cap"] is not None)


def target_features(targets: Sequence[View], device, progress: bool) -> torch.Tensor:
    """Every target sample's features, pooled: float32 [M, D] on `device`."""
    rows = [batch["features"].float().to(device)
            for i, target in enumerate(targets)
            for batch in tqdm(target.batches(("features",)), desc=f"target features ({i + 1}/{len(targets)})",
                              leave=False, disable=bars.disable(progress))]
    return torch.cat(rows)


def scores(source: View, targets: Sequence[View], p: str, device=None, progress: bool = True) -> torch.Tensor:
    """NormSim_p of every source sample against the pooled targets: float64 [N]."""
    if p not in P_CHOICES:
        raise ValueError(f"p={p!r} is invalid; expected one of {list(P_CHOICES)}")
    device = device or source.device
    tgt = target_features(targets, device, progress)
    out = []
    for batch in tqdm(source.batches(("features",)), desc=f"NormSim_{p} scores", leave=False,
                      disable=bars.disable(progress)):
        values, _, rms = ops.sample_scores(batch["features"].to(device), tgt, 1)
        out.append((values[:, 0].double() if p == "inf" else rms).cpu())
    return torch.cat(out)


def cap_groups(source: View, num_clusters: Optional[int], seed: int, device, progress: bool
               ) -> Tuple[np.ndarray, str]:
    """The groups a cap counts in: the source labels, or (label-free) the
    source's k-means clusters (cosine, seeded). Returns (int64 [N], what)."""
    if source.labels is not None:
        return np.asarray(source.labels, dtype=np.int64), "source classes"
    if not num_clusters:
        raise ValueError("cap= on an unlabelled source caps per k-means cluster; give num_clusters= as well")
    _, groups = kmeans(lambda: (b["features"] for b in source.batches(("features",), shard=True)), num_clusters,
                       num_rows=source.num_rows, sharded=True, metric="cosine", seed=seed, device=device,
                       progress=progress)
    return np.asarray(groups, dtype=np.int64), f"{num_clusters} k-means clusters (cosine)"


def keep_best(values: torch.Tensor, keep: int, seed: int, cap: Optional[int], groups: Optional[np.ndarray],
              candidates: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Dict[str, object]]:
    """Sorted rows of the `keep` highest `values` (among `candidates` rows when
    given), at most `cap` per group when capped. Returns (rows, facts)."""
    order = rank(values.numpy(), seed, descending=True)
    if candidates is not None:
        order = order[np.isin(order, candidates)]
    if cap is None:
        return np.sort(order[:keep]), {}
    rows, facts = capped_rows(order, groups, keep, cap, seed)
    if facts["tail_drawn"]:
        warnings.warn(f"cap={cap} allows only {facts['under_cap']} of the {keep} samples to keep; the other "
                      f"{facts['tail_drawn']} were drawn over the cap with MetaCLIP's min(1, cap/count) weights "
                      f"(a group now holds up to {facts['most_kept_in_a_group']}); raise cap or keep fewer "
                      "(docs/SELECTION.md, 'Caps')", stacklevel=3)
    return rows, facts


def select(source: View, targets: Sequence[View], *, keep: int, p: str = "inf", cap: Optional[int] = None,
           num_clusters: Optional[int] = None, seed: int = 0, device=None, progress: bool = True) -> Selection:
    """Keeps the `keep` source SAMPLES (prune's ratio: the fraction of samples
    removed) most similar to the target by NormSim_p, at most `cap` a class."""
    values = scores(source, targets, p, device, progress)
    info: Dict[str, object] = {"score": SCORE_NAMES[p], "p": p, "seed": seed}
    groups = None
    if cap is not None:
        groups, info["cap_groups"] = cap_groups(source, num_clusters, seed, device, progress)
    rows, facts = keep_best(values, keep, seed, cap, groups)
    selection = sample_selection(rows, values, {**info, **facts})
    selection.groups = groups
    return selection
