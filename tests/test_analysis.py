"""fastvote.analysis: the 2-D feature-space embedding (checked against scikit-learn's PCA
and a brute-force nearest centroid), t-SNE, the plot file, and input errors."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA

from fastvote import data
from fastvote.analysis import feature_space, plot_feature_space
from fastvote.plots import MAX_LABELLED_CLASSES

K, D = 12, 16


@pytest.fixture(scope="module")
def features():
    """12 Gaussian source classes of 40 in 16-D; 90 target points near classes 2, 5 and 9."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (K, D))
    labels = np.repeat(np.arange(K), 40)
    rng.shuffle(labels)
    source = (centres[labels] + rng.normal(0, 1, (len(labels), D))).astype(np.float32)
    target = (centres[np.repeat([2, 5, 9], 30)] + rng.normal(0, 1.5, (90, D))).astype(np.float32)
    return source, labels, target


def means(source, labels):
    return np.stack([source[labels == c].astype(np.float64).mean(0) for c in range(K)])


def test_pca_matches_sklearn(features, one_thread):
    source, labels, target = features
    kept = [9, 2, 5, 0]
    space = feature_space(source, labels, target, kept, source_points=100, seed=3)
    centroids = means(source, labels)
    reference = PCA(n_components=2, svd_solver="full").fit(np.vstack([centroids, target]))
    np.testing.assert_allclose(space["centroids"], reference.transform(centroids), atol=1e-9)
    np.testing.assert_allclose(space["target"], reference.transform(target.astype(np.float64)), atol=1e-9)
    index = space["source_index"]
    assert len(index) == 100 and (np.diff(index) > 0).all()
    np.testing.assert_allclose(space["source"], reference.transform(source[index].astype(np.float64)),
                               atol=1e-9)
    np.testing.assert_array_equal(space["source_labels"], labels[index])
    np.testing.assert_allclose(space["explained_variance"], reference.explained_variance_ratio_)
    # And by hand: the top-2 right singular vectors of the centred fit set, up to sign.
    fit = np.vstack([centroids, target])
    _, _, vt = np.linalg.svd(fit - fit.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(space["centroids"]), np.abs((centroids - fit.mean(0)) @ vt[:2].T),
                               atol=1e-9)

    assert space["kept"].dtype == bool and space["kept"].shape == (K,)
    np.testing.assert_array_equal(np.flatnonzero(space["kept"]), sorted(kept))
    np.testing.assert_array_equal(space["target_index"], np.arange(90))
    distances = ((target[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(space["target_vote"], distances.argmin(1))  # FM's top-1 vote
    assert set(space["target_vote"].tolist()) <= {2, 5, 9}


def test_inputs_seed_and_cosine(features, one_thread):
    source, labels, target = features
    space = feature_space(source, labels, target, [1, 2], max_points=40, source_points=50, seed=1)
    assert space["target"].shape == (40, 2) and space["source"].shape == (50, 2)
    assert space["centroids"].shape == (K, 2)
    index = space["target_index"]
    assert len(np.unique(index)) == 40 and (np.diff(index) > 0).all() and index.max() < 90
    # torch in, same out; same seed, same picks; another seed, other picks.
    from_torch = feature_space(torch.from_numpy(source), torch.from_numpy(labels),
                               torch.from_numpy(target), torch.tensor([1, 2]), max_points=40,
                               source_points=50, seed=1)
    for key in ("centroids", "target", "source", "target_index", "source_index", "kept"):
        np.testing.assert_array_equal(from_torch[key], space[key])
    other = feature_space(source, labels, target, [1, 2], max_points=40, source_points=50, seed=2)
    assert not np.array_equal(other["target_index"], index)

    # cosine: normalised features and centroids, as FM with metric="cosine".
    cosine = feature_space(source, labels, target, [], metric="cosine")
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    centroids, points = unit(means(source, labels)), unit(target.astype(np.float64))
    reference = PCA(n_components=2, svd_solver="full").fit(np.vstack([centroids, points]))
    np.testing.assert_allclose(cosine["centroids"], reference.transform(centroids), atol=1e-9)
    np.testing.assert_array_equal(cosine["target_vote"], (points @ centroids.T).argmax(1))
    assert not cosine["kept"].any()


def test_tsne(features, one_thread):
    source, labels, target = features
    space = feature_space(source, labels, target[::3], [2, 5, 9], method="tsne", source_points=60)
    assert space["centroids"].shape == (K, 2) and space["target"].shape == (30, 2)
    assert space["source"].shape == (60, 2) and space["explained_variance"] is None
    assert all(np.isfinite(space[k]).all() for k in ("centroids", "target", "source"))
    again = feature_space(source, labels, target[::3], [2, 5, 9], method="tsne", source_points=60)
    np.testing.assert_array_equal(again["centroids"], space["centroids"])
    tiny = feature_space(source, labels, target[:2], [0], method="tsne")  # 14 points: low perplexity
    assert tiny["target"].shape == (2, 2)


def test_plot(features, tmp_path, one_thread):
    source, labels, target = features
    for method, kwargs in (("pca", {"source_points": 80}), ("tsne", {})):
        space = feature_space(source, labels, target, [2, 5], method=method, **kwargs)
        path = plot_feature_space(space, tmp_path / f"{method}.png",
                                  class_names=[f"class {c}" for c in range(K)], title=method)
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 300
    # Many classes: no names written, still a picture.
    many = MAX_LABELLED_CLASSES + 5
    rng = np.random.default_rng(0)
    space = feature_space(rng.normal(size=(many * 2, 8)), np.repeat(np.arange(many), 2),
                          rng.normal(size=(20, 8)), np.arange(10))
    plot_feature_space(space, tmp_path / "many.png")
    assert sorted(os.listdir(tmp_path)) == ["many.png", "pca.png", "tsne.png"]  # no temporaries
    with pytest.raises(ValueError, match=r"class_names: expected 85 names"):
        plot_feature_space(space, tmp_path / "x.png", class_names=["a"])
    with pytest.raises(ValueError, match=r"embedding: missing \['target'"):
        plot_feature_space({k: v for k, v in space.items() if k != "target"}, tmp_path / "x.png")


@pytest.mark.skipif(bool(data.missing("haystack") or data.missing("digits")),
                    reason="offline data missing (see fastvote.data.missing)")
def test_real_images(tmp_path, one_thread):
    """Haystack and digits pixels as features: the digit classes kept, the plot drawn."""
    source = data.get("haystack", "train", size=8, per_class=10, cache=False)
    target = data.get("digits", "train", shots=5, size=8)
    flat = lambda ds: ds.images.reshape(len(ds), -1).astype(np.float32) / 255  # noqa: E731
    space = feature_space(flat(source), source.targets, flat(target), np.arange(10, 20),
                          source_points=150)
    assert space["centroids"].shape == (30, 2) and space["target"].shape == (50, 2)
    np.testing.assert_array_equal(np.flatnonzero(space["kept"]), np.arange(10, 20))
    with Image.open(plot_feature_space(space, tmp_path / "haystack.png",
                                       class_names=source.classes)) as image:
        assert image.format == "PNG"


@pytest.mark.parametrize("change, message", [
    ({"target_features": np.zeros((5, 3))}, r"target_features: expected \(M, 16\) like source_features"),
    ({"kept_classes": [3, 12]}, r"kept_classes: expected class ids 0 <= c < 12, got \[12\]"),
    ({"kept_classes": [-1]}, r"kept_classes: expected class ids 0 <= c < 12, got \[-1\]"),
    ({"kept_classes": [0.5]}, r"kept_classes: expected a 1-D array of int class ids"),
    ({"method": "umap"}, r"method='umap': expected one of \['pca', 'tsne'\]"),
    ({"metric": "l1"}, r"metric='l1': expected one of \['l2', 'cosine'\]"),
    ({"source_labels": np.zeros(7, np.int64)}, r"source_labels: expected shape \(480,\)"),
    ({"source_labels": np.full(480, -1)}, r"source_labels: expected ids 0 <= y < num_classes"),
    ({"num_classes": 13}, r"source_labels: classes \[12\] have no samples"),
    ({"source_features": np.zeros((480,))}, r"source_features: expected a non-empty numeric 2-D"),
    ({"source_features": np.zeros((480, 1)), "target_features": np.zeros((5, 1))},
     r"source_features: expected at least 2 feature dims"),
    ({"target_features": np.full((5, 16), np.nan)}, r"target_features: expected finite values"),
    ({"max_points": 0}, r"max_points=0: expected an int >= 1"),
    ({"source_points": -1}, r"source_points=-1: expected an int >= 0"),
])
def test_bad_inputs(features, change, message):
    source, labels, target = features
    kwargs = dict(dict(source_features=source, source_labels=labels, target_features=target,
                       kept_classes=[1]), **change)
    with pytest.raises(ValueError, match=message):
        feature_space(**kwargs)
