"""The vote ops: one typed Python function per op, a fake (meta) kernel for
each so they trace under torch.compile, and a pure-PyTorch reference of each.

The compiled kernels (``fastvote._C``, registered as ``torch.ops.fastvote.*``
for CPU and, when built with CUDA, for CUDA) are dispatched by device. The
references compute in float64 and are the oracle the tests compare against;
they are also the fallback (slower, and memory grows with a chunk of rows x K
x D): for every device when the extension is not built, announced by one
warning at import, and for CUDA tensors when it was built without CUDA
(``_C.with_cuda`` is False), announced by one warning at the first such call.
``FASTVOTE_DISABLE_EXTENSION=1`` forces the fallback.

Conventions shared by every op (see SPEC.md):
- keys rank candidates, smaller is better: squared L2 distance, or the negated
  cosine similarity / logit; equal keys -> lower index first;
- ``weight``: "count" (1 per pick; votes are exact int64), "rank" (1/rank),
  "soft" (softmax of the row's k picked logits, or of -distance/temperature);
  float votes are float64, like every other reduction over rows.
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Callable, Dict, Optional, Set, Tuple

import torch
from torch import Tensor

__all__ = [
    "HAS_EXTENSION", "METRICS", "WEIGHTS", "cpu_kernel",
    "lm_vote", "fm_vote", "nearest_centroids", "class_centroids", "lm_scores", "fm_scores",
    "lm_vote_reference", "fm_vote_reference", "nearest_centroids_reference",
    "class_centroids_reference", "lm_scores_reference", "fm_scores_reference",
]

METRICS = ("l2", "cosine")
WEIGHTS = ("count", "rank", "soft")
_NORM_EPS = 1e-12  # as torch.nn.functional.normalize and the kernels
_REFERENCE_CHUNK = 1 << 22  # elements of the rows x K x D block the references hold at once


def _load_extension() -> Tuple[Optional[ModuleType], str]:
    if os.environ.get("FASTVOTE_DISABLE_EXTENSION") == "1":
        return None, "FASTVOTE_DISABLE_EXTENSION=1 is set"
    try:
        from fastvote import _C  # importing registers torch.ops.fastvote.*
    except ImportError as exc:
        return None, f"the compiled extension did not import ({exc})"
    return _C, ""


_C, _WHY_NOT = _load_extension()
HAS_EXTENSION = _C is not None
if not HAS_EXTENSION:
    warnings.warn(
        f"fastvote: {_WHY_NOT}; using the pure-PyTorch reference ops, which are much slower. "
        "Build the extension with `pip install --no-build-isolation -e .`.",
        RuntimeWarning, stacklevel=2)
# Its CUDA kernels exist only in a build that found the CUDA toolkit.
_WITH_CUDA = HAS_EXTENSION and bool(_C.with_cuda)
_WARNED: Set[str] = set()  # device types whose fallback was announced


# --------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------

def lm_vote(logits: Tensor, k: int = 1, weight: str = "count") -> Tensor:
    """LM votes: each row votes for its k largest logits.

    Args:
        logits: [N, K] float32/float16/bfloat16/float64, any strides, finite.
        k: picks per row, 1 <= k <= K.
        weight: "count" | "rank" | "soft" (softmax of the picked logits).
    Returns:
        votes [K]: int64 for "count" (sums to N * k), else float64.
    """
    return _dispatch("lm_vote", logits)(logits, k, weight)


def fm_vote(features: Tensor, centroids: Tensor, k: int = 1, metric: str = "l2",
            weight: str = "count", temperature: float = 1.0) -> Tensor:
    """FM votes: each feature row votes for its k nearest centroids.

    Args:
        features: [N, D] float, any strides, finite.
        centroids: [K, D] float on the same device.
        k: picks per row, 1 <= k <= K.
        metric: "l2" (squared Euclidean, the paper) or "cosine".
        weight: "count" | "rank" | "soft" (softmax of -squared distance / temperature,
            or of cosine similarity / temperature).
        temperature: > 0 with 1 / temperature finite in float32 (3e-39 or more); used by "soft" only.
    Returns:
        votes [K]: int64 for "count", else float64.
    """
    return _dispatch("fm_vote", features, centroids)(features, centroids, k, metric, weight, temperature)


def nearest_centroids(features: Tensor, centroids: Tensor, k: int = 1,
                      metric: str = "l2") -> Tuple[Tensor, Tensor]:
    """The k nearest centroids of every row (also K-means' assignment step).

    Returns:
        values [N, k] float32: squared L2 distances (ascending) or cosine
            similarities (descending); indices [N, k] int64. Ties -> lower index.
    """
    return _dispatch("nearest_centroids", features, centroids)(features, centroids, k, metric)


def class_centroids(features: Tensor, labels: Tensor, num_classes: int) -> Tuple[Tensor, Tensor]:
    """Per-class feature sums and counts; summable across batches and processes.

    Args:
        features: [N, D] float; labels: [N] integer in [0, num_classes).
    Returns:
        sums [num_classes, D] float64, counts [num_classes] int64. The centroids
        are ``sums / counts[:, None]`` once every batch has been added.
    """
    return _dispatch("class_centroids", features, labels)(features, labels, num_classes)


def lm_scores(logits: Tensor) -> Tensor:
    """Mean softmax probability of each class over the rows: float64 [K] (zeros if N = 0).

    The dense secondary score that breaks ties between equally voted classes.
    """
    return _dispatch("lm_scores", logits)(logits)


def fm_scores(features: Tensor, centroids: Tensor, metric: str = "l2") -> Tensor:
    """Mean squared distance (l2) or mean cosine similarity (cosine) from each
    centroid to the rows: float64 [K] (zeros if N = 0). The FM tie-breaker."""
    return _dispatch("fm_scores", features, centroids)(features, centroids, metric)


def _backend(device_type: str) -> str:
    """"compiled" where fastvote._C has kernels for tensors on `device_type`
    (CPU; CUDA when built with CUDA; meta: the fake kernels below), else
    "reference": a CPU-only build would meet CUDA tensors with a dispatcher
    error, so they take the references, announced once per device type."""
    if not HAS_EXTENSION:
        return "reference"  # announced at import
    if device_type in ("cpu", "meta") or (device_type == "cuda" and _WITH_CUDA):
        return "compiled"
    if device_type not in _WARNED:
        _WARNED.add(device_type)
        why = " (it was built without CUDA: fastvote._C.with_cuda is False)" if device_type == "cuda" else ""
        warnings.warn(f"fastvote: the compiled extension has no {device_type} kernels{why}; {device_type} "
                      "tensors use the pure-PyTorch reference ops, which are much slower.",
                      RuntimeWarning, stacklevel=4)  # the caller of the public op
    return "reference"


def _dispatch(name: str, *tensors: Tensor) -> Callable:
    """The kernel of op `name` for these inputs: compiled when every input is
    on a device it serves (else the references, which also name a device
    mismatch where the dispatcher would not)."""
    for t in tensors:
        if _backend(t.device.type) != "compiled":
            return REFERENCES[name]
    return getattr(torch.ops.fastvote, name)


# --------------------------------------------------------------------------
# Fake kernels: output shapes and dtypes only (torch.compile, opcheck)
# --------------------------------------------------------------------------

def _votes_dtype(weight: str) -> torch.dtype:
    return torch.int64 if weight == "count" else torch.float64


def _check_same_device(op: str, a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    if a.device != b.device:
        raise ValueError(f"fastvote.{op}: {a_name} is on {a.device} but {b_name} is on "
                         f"{b.device}; expected both on the same device")


if HAS_EXTENSION:
    @torch.library.register_fake("fastvote::lm_vote")
    def _lm_vote_fake(logits, k=1, weight="count"):
        return logits.new_empty(logits.shape[1], dtype=_votes_dtype(weight))

    @torch.library.register_fake("fastvote::fm_vote")
    def _fm_vote_fake(features, centroids, k=1, metric="l2", weight="count", temperature=1.0):
        _check_same_device("fm_vote", features, "features", centroids, "centroids")
        return features.new_empty(centroids.shape[0], dtype=_votes_dtype(weight))

    @torch.library.register_fake("fastvote::nearest_centroids")
    def _nearest_centroids_fake(features, centroids, k=1, metric="l2"):
        _check_same_device("nearest_centroids", features, "features", centroids, "centroids")
        n = features.shape[0]
        return (features.new_empty((n, k), dtype=torch.float32),
                features.new_empty((n, k), dtype=torch.int64))

    @torch.library.register_fake("fastvote::class_centroids")
    def _class_centroids_fake(features, labels, num_classes):
        _check_same_device("class_centroids", features, "features", labels, "labels")
        return (features.new_empty((num_classes, features.shape[1]), dtype=torch.float64),
                features.new_empty(num_classes, dtype=torch.int64))

    @torch.library.register_fake("fastvote::lm_scores")
    def _lm_scores_fake(logits):
        return logits.new_empty(logits.shape[1], dtype=torch.float64)

    @torch.library.register_fake("fastvote::fm_scores")
    def _fm_scores_fake(features, centroids, metric="l2"):
        _check_same_device("fm_scores", features, "features", centroids, "centroids")
        return features.new_empty(centroids.shape[0], dtype=torch.float64)


# --------------------------------------------------------------------------
# References: float64, written for clarity; the same checks as the kernels
# --------------------------------------------------------------------------

def cpu_kernel() -> Optional[str]:
    """The instruction set of the compiled CPU kernels ("avx512", "avx2", ...), or None without the extension."""
    return str(_C.cpu_kernel()) if HAS_EXTENSION else None


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_matrix(op: str, t: Tensor, arg: str, shape: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"fastvote.{op}: {arg} must be a 2-D tensor {shape}, got shape "
                         f"{list(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"fastvote.{op}: {arg} has dtype {t.dtype}; expected float32, float16, "
                        "bfloat16 or float64")


def _check_finite(op: str, t: Tensor, arg: str, squares: bool = True) -> None:
    # Feature rows whose squared norm overflows float32 are rejected like
    # NaN/Inf, as in the kernels; logits are checked element by element.
    if squares:
        bad = ~torch.isfinite(t.float().pow(2).sum(1))
    else:
        bad = ~torch.isfinite(t).all(1)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"fastvote.{op}: {arg} row {row} contains NaN or Inf (or values whose "
                         "squares overflow float32); expected finite values")


def _check_k(op: str, k: int, num: int, what: str) -> None:
    if not 1 <= k <= num:
        raise ValueError(f"fastvote.{op}: k={k} is out of range; expected 1 <= k <= K={num} "
                         f"(the number of {what})")


def _check_choice(op: str, arg: str, value: str, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        expected = ", ".join(f"'{c}'" for c in choices[:-1]) + f" or '{choices[-1]}'"
        raise ValueError(f"fastvote.{op}: {arg}='{value}' is unknown; expected {expected}")


def _check_logits(op: str, logits: Tensor) -> None:
    _check_matrix(op, logits, "logits", "[N, K]")
    if logits.shape[1] < 1:
        raise ValueError(f"fastvote.{op}: logits has K=0 classes (shape {list(logits.shape)}); "
                         "expected at least one source class")
    _check_finite(op, logits, "logits", squares=False)


def _check_features_centroids(op: str, features: Tensor, centroids: Tensor, arg: str = "centroids",
                              rows: str = "K", one: str = "centroid") -> None:
    """features [N, D] against `arg` [rows, D] (sample_scores: targets [M, D], "target row")."""
    _check_matrix(op, features, "features", "[N, D]")
    _check_matrix(op, centroids, arg, f"[{rows}, D]")
    if centroids.shape[0] < 1:
        raise ValueError(f"fastvote.{op}: {arg} has {rows}=0 rows; expected at least one {one}")
    if features.shape[1] != centroids.shape[1]:
        raise ValueError(f"fastvote.{op}: features has D={features.shape[1]} but {arg} has "
                         f"D={centroids.shape[1]}; expected the same feature dimension")
    if features.shape[1] < 1:
        raise ValueError(f"fastvote.{op}: features has D=0; expected at least one feature dimension")
    _check_same_device(op, features, "features", centroids, arg)
    _check_finite(op, centroids, arg)
    _check_finite(op, features, "features")


def _row_chunks(n: int, per_row: int):
    step = max(1, _REFERENCE_CHUNK // max(1, per_row))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _reference_keys(features: Tensor, centroids: Tensor, metric: str):
    """Yields (start, keys[rows, K] float64) chunk by chunk; smaller key is better.

    l2 keys are squared distances from explicit differences (no ||x||^2 - 2x.c
    cancellation, and identical centroids give bit-identical keys, so ties are
    exact); cosine keys are negated similarities of the normalised vectors.
    """
    x = features.double()
    c = centroids.double()
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1, eps=_NORM_EPS)
        c = torch.nn.functional.normalize(c, dim=1, eps=_NORM_EPS)
    for start, end in _row_chunks(x.shape[0], c.shape[0] * c.shape[1]):
        block = x[start:end, None, :]
        if metric == "l2":
            keys = (block - c[None]).pow(2).sum(-1)
        else:
            keys = -(block * c[None]).sum(-1)
        yield start, keys


def _topk_stable(keys: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    # A stable sort puts equal keys in index order: the tie rule of SPEC.md.
    values, indices = torch.sort(keys, dim=1, stable=True)
    return values[:, :k], indices[:, :k]


def _accumulate_votes(votes: Tensor, keys: Tensor, indices: Tensor, weight: str,
                      inv_temperature: float) -> None:
    if weight == "count":
        w = torch.ones_like(keys)
    elif weight == "rank":
        w = (1.0 / torch.arange(1, keys.shape[1] + 1, dtype=torch.float64)).expand_as(keys)
    else:
        w = torch.softmax(-keys * inv_temperature, dim=1)
    votes.index_add_(0, indices.reshape(-1).cpu(), w.reshape(-1).to(votes.dtype).cpu())


def _inverse_temperature(op: str, temperature: float) -> float:
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"fastvote.{op}: temperature={temperature} is invalid; expected a finite "
                         "value > 0")
    # As the kernels, which scale keys by 1 / temperature in float32.
    if not torch.tensor(1.0 / temperature, dtype=torch.float64).float().isfinite():
        raise ValueError(f"fastvote.{op}: temperature={temperature} is too small; expected a "
                         "temperature whose inverse is finite in float32 (3e-39 or more)")
    return 1.0 / temperature


def lm_vote_reference(logits: Tensor, k: int = 1, weight: str = "count") -> Tensor:
    _check_logits("lm_vote", logits)
    _check_k("lm_vote", k, logits.shape[1], "source classes, the logits' columns")
    _check_choice("lm_vote", "weight", weight, WEIGHTS)
    votes = torch.zeros(logits.shape[1], dtype=_votes_dtype(weight))
    keys, indices = _topk_stable(-logits.double(), k)
    _accumulate_votes(votes, keys, indices, weight, 1.0)
    return votes.to(logits.device)


def fm_vote_reference(features: Tensor, centroids: Tensor, k: int = 1, metric: str = "l2",
                      weight: str = "count", temperature: float = 1.0) -> Tensor:
    _check_features_centroids("fm_vote", features, centroids)
    _check_k("fm_vote", k, centroids.shape[0], "centroids")
    _check_choice("fm_vote", "metric", metric, METRICS)
    _check_choice("fm_vote", "weight", weight, WEIGHTS)
    inv_t = _inverse_temperature("fm_vote", temperature)
    votes = torch.zeros(centroids.shape[0], dtype=_votes_dtype(weight))
    for _, keys in _reference_keys(features, centroids, metric):
        top, indices = _topk_stable(keys, k)
        _accumulate_votes(votes, top, indices, weight, inv_t)
    return votes.to(features.device)


def nearest_centroids_reference(features: Tensor, centroids: Tensor, k: int = 1,
                                metric: str = "l2") -> Tuple[Tensor, Tensor]:
    _check_features_centroids("nearest_centroids", features, centroids)
    _check_k("nearest_centroids", k, centroids.shape[0], "centroids")
    _check_choice("nearest_centroids", "metric", metric, METRICS)
    n = features.shape[0]
    values = torch.empty(n, k, dtype=torch.float64, device=features.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=features.device)
    for start, keys in _reference_keys(features, centroids, metric):
        top, idx = _topk_stable(keys, k)
        values[start:start + len(top)] = top if metric == "l2" else -top
        indices[start:start + len(top)] = idx
    return values.float(), indices


def class_centroids_reference(features: Tensor, labels: Tensor,
                              num_classes: int) -> Tuple[Tensor, Tensor]:
    _check_matrix("class_centroids", features, "features", "[N, D]")
    if labels.dim() != 1:
        raise ValueError("fastvote.class_centroids: labels must be a 1-D tensor [N], got shape "
                         f"{list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"fastvote.class_centroids: labels has dtype {labels.dtype}; expected an "
                        "integer dtype (int64, int32, ...)")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"fastvote.class_centroids: labels has {labels.shape[0]} entries but "
                         f"features has N={features.shape[0]} rows; expected one label per row")
    if num_classes < 1:
        raise ValueError(f"fastvote.class_centroids: num_classes={num_classes} is invalid; "
                         "expected >= 1")
    _check_same_device("class_centroids", features, "features", labels, "labels")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        pos = int(bad.nonzero()[0, 0])
        raise IndexError(f"fastvote.class_centroids: labels[{pos}]={int(labels[pos])} is out of "
                         f"range; expected 0 <= label < num_classes={num_classes}")
    if not torch.isfinite(features).all():
        row = int((~torch.isfinite(features)).any(1).nonzero()[0, 0])
        raise ValueError(f"fastvote.class_centroids: features row {row} contains NaN or Inf; "
                         "expected finite values")
    lab = labels.long()
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, lab, features.double())
    counts = torch.bincount(lab, minlength=num_classes)
    return sums, counts


def lm_scores_reference(logits: Tensor) -> Tensor:
    _check_logits("lm_scores", logits)
    if logits.shape[0] == 0:
        return torch.zeros(logits.shape[1], dtype=torch.float64, device=logits.device)
    return torch.softmax(logits.double(), dim=1).mean(0)


def fm_scores_reference(features: Tensor, centroids: Tensor, metric: str = "l2") -> Tensor:
    _check_features_centroids("fm_scores", features, centroids)
    _check_choice("fm_scores", "metric", metric, METRICS)
    scores = torch.zeros(centroids.shape[0], dtype=torch.float64, device=features.device)
    n = features.shape[0]
    if n == 0:
        return scores
    for _, keys in _reference_keys(features, centroids, metric):
        scores += keys.sum(0)
    scores /= n
    return scores if metric == "l2" else -scores


REFERENCES: Dict[str, Callable] = {
    "lm_vote": lm_vote_reference,
    "fm_vote": fm_vote_reference,
    "nearest_centroids": nearest_centroids_reference,
    "class_centroids": class_centroids_reference,
    "lm_scores": lm_scores_reference,
    "fm_scores": fm_scores_reference,
}


# --------------------------------------------------------------------------
# Per-sample target scores (NormSim): each source row against all target rows
# --------------------------------------------------------------------------

def sample_scores(features: Tensor, targets: Tensor, k: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    """Each feature row's similarity to a set of target rows, both L2-normalised
    (cosine), in one pass with no N x M matrix: the per-sample target scores of
    NormSim (Wang et al., NeurIPS 2024).

    Args:
        features: [N, D] float (the source), any strides, finite.
        targets: [M, D] float on the same device (the target's embeddings).
        k: target rows returned per source row, 1 <= k <= M.
    Returns:
        values [N, k] float32: the k largest cosine similarities, descending
            (values[:, 0] is NormSim_inf, the best similarity to any target row);
        indices [N, k] int64: those target rows (equal values -> lower index);
        rms [N] float64: NormSim_2 = sqrt(mean_j cos(x, t_j)^2), the RMS of the
            row's M similarities (the paper's 2-norm over the target divided by
            sqrt(M): the same ranking, comparable across target sizes).
    """
    return _dispatch("sample_scores", features, targets)(features, targets, k)


if HAS_EXTENSION:
    @torch.library.register_fake("fastvote::sample_scores")
    def _sample_scores_fake(features, targets, k=1):
        _check_same_device("sample_scores", features, "features", targets, "targets")
        torch._check(features.dim() == 2 and targets.dim() == 2,
                     lambda: "fastvote.sample_scores: features and targets must be 2-D")
        torch._check(features.shape[1] == targets.shape[1],
                     lambda: f"fastvote.sample_scores: features has D={features.shape[1]} but targets has "
                             f"D={targets.shape[1]}; expected the same feature dimension")
        torch._check(1 <= k <= targets.shape[0],
                     lambda: f"fastvote.sample_scores: k={k} is out of range; expected 1 <= k <= "
                             f"M={targets.shape[0]}")
        n = features.shape[0]
        return (features.new_empty((n, k), dtype=torch.float32),
                features.new_empty((n, k), dtype=torch.int64),
                features.new_empty((n,), dtype=torch.float64))


def _check_features_targets(op: str, features: Tensor, targets: Tensor) -> None:
    _check_features_centroids(op, features, targets, "targets", "M", "target row")


def sample_scores_exact(features: Tensor, targets: Tensor, k: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`sample_scores` in float64 throughout (values float64 too): the
    oracle the kernels are tested against."""
    _check_features_targets("sample_scores", features, targets)
    _check_k("sample_scores", k, targets.shape[0], "target rows")
    n = features.shape[0]
    values = torch.empty(n, k, dtype=torch.float64, device=features.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=features.device)
    rms = torch.empty(n, dtype=torch.float64, device=features.device)
    for start, keys in _reference_keys(features, targets, "cosine"):  # keys: negated similarities
        top, idx = _topk_stable(keys, k)
        values[start:start + len(top)] = -top
        indices[start:start + len(top)] = idx
        rms[start:start + len(top)] = keys.pow(2).mean(1).sqrt()
    return values, indices, rms


def sample_scores_reference(features: Tensor, targets: Tensor, k: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    values, indices, rms = sample_scores_exact(features, targets, k)
    return values.float(), indices, rms


REFERENCES["sample_scores"] = sample_scores_reference
__all__ += ["sample_scores", "sample_scores_reference", "sample_scores_exact"]
