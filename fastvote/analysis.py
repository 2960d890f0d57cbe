"""Feature-distribution analysis (the paper's "why do FM/LM work" picture): where the
kept and the pruned source classes sit relative to the target data in the surrogate's
feature space.

``feature_space`` embeds, in 2-D, the source class centroids (the class means FM votes
with), the target training features and optionally a sub-sample of source samples;
``plot_feature_space`` draws it. Both take plain arrays (numpy or torch), so any
features at hand will do: e.g. ``fastvote.features.collect(...)["features"]``.

    space = feature_space(src["features"], src["labels"], tgt["features"], result.kept_classes)
    plot_feature_space(space, "runs/lm/features.png", class_names=result.class_names)

For label-free FM, pass the cluster assignments as ``source_labels`` and the kept
clusters as ``kept_classes``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fastvote.plots import MAX_LABELLED_CLASSES, plt, save_figure

METHODS = ("pca", "tsne")
METRICS = ("l2", "cosine")
MAX_POINTS = 2000  # target points drawn at most: t-SNE is quadratic, a plot is unreadable beyond
CHUNK = 1 << 16    # source rows summed at a time (bounds the float64 copy)
KEYS = ("method", "metric", "centroids", "kept", "target", "target_vote", "source", "source_labels")


def _matrix(x: Any, name: str) -> np.ndarray:
    """numpy or torch -> a 2-D float array, checked finite."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.ndim != 2 or array.shape[0] == 0 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name}: expected a non-empty numeric 2-D array (rows, feature dims), "
                         f"got {array.dtype} of shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    return array


def _ids(x: Any, name: str) -> np.ndarray:
    """numpy, torch or a sequence of ints -> int64 (n,)."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ValueError(f"{name}: expected a 1-D array of int class ids, got {array.dtype} "
                         f"of shape {array.shape}")
    return array.astype(np.int64)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _class_means(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float64 (K, D) mean feature of every class (each must have a sample), summed in chunks."""
    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise ValueError(f"source_labels: classes {empty[:10].tolist()} have no samples, so no "
                         f"centroid; expected every class 0..{num_classes - 1} present")
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    for start in range(0, len(features), CHUNK):
        part = torch.from_numpy(np.asarray(features[start:start + CHUNK], dtype=np.float64))
        sums.index_add_(0, torch.from_numpy(labels[start:start + CHUNK]), part)
    return sums.numpy() / counts[:, None]


def feature_space(source_features: Any, source_labels: Any, target_features: Any,
                  kept_classes: Sequence[int] | Any, *, method: str = "pca", metric: str = "l2",
                  num_classes: int | None = None, source_points: int = 0,
                  max_points: int = MAX_POINTS, seed: int = 0) -> dict:
    """2-D embedding of the source class centroids, the target features and (optionally)
    some source samples, with the kept / pruned flag of every class.

    Args:
        source_features: (N, D) surrogate features of the source (numpy or torch).
        source_labels: (N,) their class (or cluster) ids.
        target_features: (M, D) surrogate features of the target training samples.
        kept_classes: ids of the kept source classes (e.g. ``PruneResult.kept_classes``).
        method: "pca" — fit on the centroids and the drawn target points (the geometry FM
            votes in), source samples projected onto it; or "tsne" — all drawn points
            embedded together (init "pca", perplexity min(30, (n - 1) / 3), one thread).
        metric: "l2" (raw features, as FM's default) or "cosine" (features and centroids
            L2-normalised first, as FM with metric="cosine").
        num_classes: K (default ``max(source_labels) + 1``); every class needs a sample.
        source_points: source samples to draw as well (seeded uniform pick; 0: none).
        max_points: at most this many target points (seeded uniform pick beyond).
        seed: seeds the picks and t-SNE; the same inputs and seed give the same output.

    Returns:
        dict: ``method``, ``metric``, ``seed``; ``centroids`` float64 (K, 2); ``kept`` bool
        (K,); ``target`` float64 (T, 2) with ``target_index`` (rows of target_features,
        sorted) and ``target_vote`` (each row's nearest centroid in feature space: its
        top-1 FM vote); ``source`` float64 (S, 2) with ``source_index`` and
        ``source_labels``; ``explained_variance`` (2,) fraction per PCA axis, or None.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {list(METHODS)}")
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {list(METRICS)}")
    for name, value, low in (("source_points", source_points, 0), ("max_points", max_points, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r}: expected an int >= {low}")
    source = _matrix(source_features, "source_features")
    target = _matrix(target_features, "target_features")
    labels = _ids(source_labels, "source_labels")
    kept = _ids(kept_classes, "kept_classes")
    if source.shape[1] < 2:
        raise ValueError(f"source_features: expected at least 2 feature dims for a 2-D "
                         f"embedding, got shape {source.shape}")
    if target.shape[1] != source.shape[1]:
        raise ValueError(f"target_features: expected (M, {source.shape[1]}) like source_features, "
                         f"got shape {target.shape}")
    if labels.shape != (len(source),):
        raise ValueError(f"source_labels: expected shape ({len(source)},), one per source row, "
                         f"got {labels.shape}")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"source_labels: expected ids 0 <= y < num_classes={num_classes}, "
                         f"got min {labels.min()} and max {labels.max()}")
    if len(kept) and (kept.min() < 0 or kept.max() >= num_classes):
        bad = kept[(kept < 0) | (kept >= num_classes)][:5].tolist()
        raise ValueError(f"kept_classes: expected class ids 0 <= c < {num_classes}, got {bad}")

    centroids = _class_means(source, labels, num_classes)
    target_rng, source_rng = map(np.random.default_rng, np.random.SeedSequence(seed).spawn(2))
    target_index = (np.sort(target_rng.choice(len(target), max_points, replace=False))
                    if len(target) > max_points else np.arange(len(target)))
    source_index = np.sort(source_rng.choice(len(source), min(source_points, len(source)),
                                             replace=False))
    drawn_target = target[target_index].astype(np.float64)
    drawn_source = source[source_index].astype(np.float64)
    if metric == "cosine":
        centroids, drawn_target, drawn_source = map(_normalize, (centroids, drawn_target, drawn_source))
        target_vote = np.argmax(drawn_target @ centroids.T, axis=1)
    else:  # argmin ||x - c||^2 = argmin ||c||^2 - 2 x.c; ties -> lower id, as the voters
        target_vote = np.argmin((centroids ** 2).sum(1) - 2 * drawn_target @ centroids.T, axis=1)

    explained = None
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, svd_solver="full").fit(np.vstack([centroids, drawn_target]))
        points = pca.transform(np.vstack([centroids, drawn_target, drawn_source]))
        explained = pca.explained_variance_ratio_.copy()
    else:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        stacked = np.vstack([centroids, drawn_target, drawn_source])
        perplexity = min(30.0, max(1.0, (len(stacked) - 1) / 3))
        if len(stacked) <= perplexity:
            raise ValueError(f"method='tsne' needs more than {perplexity:g} points, got "
                             f"{len(stacked)} (centroids + target + source points)")
        # One thread: the parallel gradient sums in thread order, so this makes the result
        # the same on every machine (and a few thousand points need no more; on busy cores
        # OpenMP's barriers made it 10x slower).
        with threadpool_limits(1):
            points = TSNE(n_components=2, perplexity=perplexity, init="pca",
                          random_state=seed).fit_transform(stacked)
    split = np.cumsum([num_classes, len(drawn_target)])
    centroid_xy, target_xy, source_xy = np.split(np.asarray(points, dtype=np.float64), split)
    return {
        "method": method, "metric": metric, "seed": seed,
        "centroids": centroid_xy, "kept": np.isin(np.arange(num_classes), kept),
        "target": target_xy, "target_index": target_index.astype(np.int64),
        "target_vote": target_vote.astype(np.int64),
        "source": source_xy, "source_index": source_index.astype(np.int64),
        "source_labels": labels[source_index],
        "explained_variance": explained,
    }


def plot_feature_space(embedding: dict, path: str | os.PathLike, *,
                       class_names: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Scatter of ``feature_space``'s output: kept centroids (orange circles) vs pruned
    (grey crosses), target points (small blue dots), source samples if any (faint, by
    kept/pruned class); class names written beside the centroids when there are at most
    ``MAX_LABELLED_CLASSES``. Written atomically (``save_figure``); returns ``path``."""
    missing = [k for k in KEYS if k not in embedding]
    if missing:
        raise ValueError(f"embedding: missing {missing}; expected the dict feature_space returns")
    centroids, kept = np.asarray(embedding["centroids"]), np.asarray(embedding["kept"], bool)
    target, votes = np.asarray(embedding["target"]), np.asarray(embedding["target_vote"])
    source, source_labels = np.asarray(embedding["source"]), np.asarray(embedding["source_labels"])
    if class_names is not None and len(class_names) != len(centroids):
        raise ValueError(f"class_names: expected {len(centroids)} names (one a source class), "
                         f"got {len(class_names)}")

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    if len(source):
        in_kept = kept[source_labels]
        for mask, color, what in ((~in_kept, "tab:gray", "pruned"), (in_kept, "tab:orange", "kept")):
            ax.scatter(source[mask, 0], source[mask, 1], s=4, color=color, alpha=0.25, linewidths=0,
                       label=f"source samples of {what} classes ({int(mask.sum())})")
    share = float(kept[votes].mean()) if len(votes) else 0.0
    ax.scatter(target[:, 0], target[:, 1], s=8, color="tab:blue", alpha=0.6, linewidths=0,
               label=f"target samples ({len(target)}; {share:.0%} nearest a kept centroid)")
    ax.scatter(centroids[~kept, 0], centroids[~kept, 1], s=40, marker="x", color="dimgray",
               label=f"pruned source class centroids ({int((~kept).sum())})", zorder=3)
    ax.scatter(centroids[kept, 0], centroids[kept, 1], s=70, marker="o", color="tab:orange",
               edgecolors="black", label=f"kept source class centroids ({int(kept.sum())})", zorder=4)
    if len(centroids) <= MAX_LABELLED_CLASSES:
        names = class_names if class_names is not None else [str(j) for j in range(len(centroids))]
        for (x, y), name, is_kept in zip(centroids, names, kept):
            ax.annotate(name, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7,
                        color="black" if is_kept else "dimgray")
    explained = embedding.get("explained_variance")
    if embedding["method"] == "pca" and explained is not None:
        ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
        ax.set_ylabel(f"PC 2 ({explained[1]:.0%} of variance)")
    else:
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    method = "PCA" if embedding["method"] == "pca" else "t-SNE"
    ax.set_title(title or f"{method} of surrogate features ({embedding['metric']}): "
                          f"{int(kept.sum())} kept / {int((~kept).sum())} pruned source classes",
                 fontsize=10)
    ax.legend(fontsize=7, loc="best", markerscale=1.5)
    ax.grid(alpha=0.2)
    return save_figure(fig, path)
