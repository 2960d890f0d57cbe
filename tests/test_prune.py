"""Voting, selection, K-means and fastvote.prune on precomputed outputs
(fast, no surrogate), each against a direct restatement of SPEC.md."""
import json

import numpy as np
import pytest
import torch

import fastvote
from fastvote import ops
from fastvote.cluster import kmeans
from fastvote.select import class_indices, keep_count, rank_classes, select_classes
from fastvote.voting import FMVoter, LMVoter, combine


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- select

def test_keep_count():
    assert keep_count(30, ratio=0.5) == 15
    assert keep_count(30, ratio=2 / 3) == 10
    assert keep_count(30, ratio=0.8) == 6
    assert keep_count(30, ratio=0.0) == 30
    assert keep_count(3, ratio=0.99) == 1  # always at least one class
    assert keep_count(30, keep=7) == 7
    for bad in [dict(), dict(ratio=0.5, keep=3), dict(ratio=1.0), dict(ratio=-0.1), dict(keep=0), dict(keep=31)]:
        with pytest.raises(ValueError):
            keep_count(30, **bad)


def test_rank_classes_tie_rules():
    votes = torch.tensor([3, 0, 3, 1, 0, 0])
    scores = torch.tensor([0.1, 0.5, 0.2, 0.0, 0.5, 0.9], dtype=torch.float64)
    # votes first; equal votes -> higher score; equal score -> lower index
    assert rank_classes(votes, scores, higher_score_first=True).tolist() == [2, 0, 3, 5, 1, 4]
    # FM/l2: smaller mean distance first
    assert rank_classes(votes, scores, higher_score_first=False).tolist() == [0, 2, 3, 1, 4, 5]
    assert select_classes(votes, scores, 2, True).tolist() == [2, 0]
    assert select_classes(votes, scores, 2, True, reverse=True).tolist() == [4, 1]


def test_class_indices_sorted_positions():
    labels = np.array([3, 1, 0, 3, 2, 1])
    assert class_indices(labels, [1, 3]).tolist() == [0, 1, 3, 5]
    assert class_indices(labels, []).tolist() == []


# ---------------------------------------------------------------- voters

def test_lm_voter_streams_and_matches_one_shot():
    logits = torch.randn(1000, 20, generator=gen(1))
    voter = LMVoter(20, k=2)
    for chunk in logits.split(137):
        voter.update(chunk)
    assert torch.equal(voter.votes, ops.lm_vote(logits, 2))
    torch.testing.assert_close(voter.scores(), ops.lm_scores_reference(logits))
    assert voter.rows == 1000


def test_fm_voter_streams_and_matches_one_shot():
    x = torch.randn(700, 9, generator=gen(2))
    c = torch.randn(12, 9, generator=gen(3))
    voter = FMVoter(c, k=3, metric="cosine", weight="soft", temperature=0.5)
    for chunk in x.split(100):
        voter.update(chunk)
    torch.testing.assert_close(voter.votes, ops.fm_vote(x, c, 3, "cosine", "soft", 0.5))
    torch.testing.assert_close(voter.scores(), ops.fm_scores_reference(x, c, "cosine"))
    assert voter.higher_score_first and not FMVoter(c).higher_score_first


def test_combine_multi_task():
    a, b = LMVoter(3), LMVoter(3)
    a.update(torch.tensor([[5.0, 0, 0]] * 90 + [[0, 5.0, 0]] * 10))  # a big target
    b.update(torch.tensor([[0, 0, 5.0]] * 10))                         # a small one
    votes, _ = combine([a, b])
    assert votes.tolist() == [90, 10, 10]
    votes, _ = combine([a, b], normalize=True)  # each target weighs the same
    torch.testing.assert_close(votes, torch.tensor([0.9, 0.1, 1.0], dtype=torch.float64))


# ---------------------------------------------------------------- k-means

def test_kmeans_recovers_blobs():
    g = gen(4)
    centers = torch.randn(6, 8, generator=g) * 8
    labels = torch.randint(0, 6, (3000,), generator=g)
    x = centers[labels] + torch.randn(3000, 8, generator=g)
    centroids, assign = kmeans(lambda: x.split(256), 6, progress=False, seed=1)
    assert centroids.shape == (6, 8) and assign.shape == (3000,)
    # each cluster is one blob (purity 1) and each blob one cluster
    for j in range(6):
        assert len(set(labels[torch.from_numpy(assign == j)].tolist())) == 1
    assert len(set(assign.tolist())) == 6
    # assignments are the nearest centroid of every row
    _, nearest = ops.nearest_centroids(x, centroids, 1)
    assert np.array_equal(nearest[:, 0].numpy(), assign)


def test_kmeans_errors():
    with pytest.raises(ValueError, match="num_clusters=5 exceeds"):
        kmeans(lambda: [torch.randn(3, 2)], 5, progress=False)
    with pytest.raises(ValueError, match="metric='manhattan'"):
        kmeans(lambda: [torch.randn(3, 2)], 2, metric="manhattan", progress=False)


# ---------------------------------------------------------------- prune on precomputed outputs

def blobs_source(num_classes=10, per_class=40, dim=16, seed=0):
    g = gen(seed)
    centers = torch.randn(num_classes, dim, generator=g) * 10  # well separated: K-means finds them
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centers[labels] + torch.randn(len(labels), dim, generator=g)
    return centers, {"features": features, "labels": labels}


def test_prune_fm_keeps_the_target_classes():
    centers, source = blobs_source()
    wanted = torch.tensor([2, 2, 2, 5, 5, 8])
    target = {"features": centers[wanted] + 0.3 * torch.randn(6, 16, generator=gen(9))}
    result = fastvote.prune(source, target, method="fm", keep=3, progress=False)
    assert result.kept_classes.tolist() == [2, 5, 8]
    assert result.votes.tolist()[2] == 3 and int(result.votes.sum()) == 6
    expected = torch.isin(source["labels"], torch.tensor([2, 5, 8])).nonzero().flatten()
    assert torch.equal(result.indices, expected)
    assert result.ratio == pytest.approx(0.7)
    # label-free: K-means clusters stand for classes; kept samples are their members
    free = fastvote.prune({"features": source["features"]}, target, method="fm", keep=3,
                          centroids="kmeans", num_clusters=10, progress=False)
    assert torch.equal(free.indices, expected)
    assert free.manifest["selection"] == {"centroids": "kmeans", "num_clusters": 10}


def test_prune_lm_reverse_and_ratio():
    labels = torch.arange(5).repeat_interleave(4)
    source = {"logits": torch.zeros(20, 5), "labels": labels}
    target = {"logits": torch.tensor([[9.0, 0, 0, 0, 1]] * 3 + [[0, 0, 0, 9.0, 1]])}
    result = fastvote.prune(source, target, method="lm", ratio=0.6, progress=False)
    assert result.kept_classes.tolist() == [0, 3]
    worst = fastvote.prune(source, target, method="lm", keep=2, reverse=True, progress=False)
    # 1, 2 have no votes; 4 has none either but a higher mean probability -> ranks above them
    assert worst.kept_classes.tolist() == [2, 1]


def test_prune_result_round_trip(tmp_path):
    centers, source = blobs_source()
    target = {"features": centers[[1, 1, 4]]}
    result = fastvote.prune(source, target, method="fm", keep=2, progress=False)
    result.save(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["classes.json", "indices.npy", "manifest.json",
                                                                  "votes.png"]
    back = fastvote.PruneResult.load(tmp_path / "r")
    assert torch.equal(back.indices, result.indices) and back.indices.dtype == torch.int64
    assert torch.equal(back.kept_classes, result.kept_classes) and torch.equal(back.votes, result.votes)
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["method"] == "fm" and manifest["arguments"]["keep"] == 2 and manifest["unit"] == "classes"
    assert manifest["source"]["fingerprint"].startswith("sha256:")
    assert {"surrogate", "prune", "total"} <= set(manifest["seconds"])
    assert manifest["versions"]["compiled_ops"] is True


def test_prune_save_is_atomic(tmp_path, monkeypatch):
    centers, source = blobs_source()
    result = fastvote.prune(source, {"features": centers[[1]]}, method="fm", keep=2, progress=False)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken)
    with pytest.raises(OSError):
        result.save(tmp_path / "r")
    assert list(tmp_path.iterdir()) == []  # no result folder, no staging left


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="nope", keep=2), "method='nope'"),
    (dict(method="lm", keep=2, ratio=0.5), "exactly one"),
    (dict(method="fm", keep=2, centroids="medoid"), "centroids='medoid'"),
    (dict(method="fm", keep=99), "keep=99"),
])
def test_prune_bad_arguments(kwargs, match):
    centers, source = blobs_source()
    with pytest.raises(ValueError, match=match):
        fastvote.prune(source, {"features": centers[[1]]}, progress=False, **kwargs)


def test_prune_bad_inputs():
    with pytest.raises(ValueError, match="neither an existing .beton"):
        fastvote.prune("no-such-dataset", {"features": torch.zeros(1, 2)}, keep=1, progress=False)
    with pytest.raises(TypeError, match="source has type int"):
        fastvote.prune(3, {"features": torch.zeros(1, 2)}, keep=1, progress=False)
    with pytest.raises(ValueError, match="needs source labels"):
        fastvote.prune({"features": torch.zeros(4, 2)}, {"features": torch.zeros(1, 2)}, keep=1, progress=False)


# ---------------------------------------------------------------- outputs larger than memory: .npy files

def test_npy_rows_and_writer(tmp_path):
    from fastvote.data.npy import NpyRows, NpyWriter

    a = np.random.default_rng(0).normal(size=(1001, 67)).astype(np.float32)  # D not a multiple of 8
    np.save(tmp_path / "a.npy", a)
    rows = NpyRows(tmp_path / "a.npy")
    assert rows.shape == (1001, 67) and len(rows) == 1001
    assert np.array_equal(np.concatenate(list(rows.chunks(range(3, 1001), 100))), a[3:])
    assert rows.read(1000, 5000).shape == (1, 67) and rows.read(5, 5).shape == (0, 67)
    with NpyWriter(tmp_path / "b.npy", a.shape, np.float32) as w:
        for s in range(0, 1001, 300):
            w.write(a[s:s + 300])
    assert np.array_equal(np.load(tmp_path / "b.npy"), a)
    with pytest.raises(ValueError, match="900 rows written, expected 1001; nothing was kept"):
        with NpyWriter(tmp_path / "c.npy", a.shape, np.float32) as w:
            w.write(a[:900])
    with pytest.raises(RuntimeError):
        with NpyWriter(tmp_path / "d.npy", a.shape, np.float32) as w:
            w.write(a[:10])
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npy"]  # no partial files
    (tmp_path / "t.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        NpyRows(tmp_path / "t.npy")


def test_prune_reads_precomputed_outputs_from_npy_files(tmp_path):
    centers, source = blobs_source()
    target = {"features": centers[torch.tensor([2, 2, 5])] + 0.1,
              "logits": torch.randn(3, 10, generator=gen(4))}
    for role, outputs in (("source", source), ("target", target)):
        (tmp_path / role).mkdir()
        for name, t in outputs.items():
            np.save(tmp_path / role / f"{name}.npy", t.numpy())
    for method, kw in (("lm", {}), ("fm", {}), ("fm", {"centroids": "kmeans", "num_clusters": 10})):
        in_memory = fastvote.prune(source, target, method=method, keep=3, progress=False, **kw)
        paths = {k: str(tmp_path / "source" / f"{k}.npy") for k in source}
        from_files = fastvote.prune(paths, tmp_path / "target", method=method, keep=3, progress=False, **kw)
        assert torch.equal(from_files.indices, in_memory.indices) and torch.equal(from_files.votes, in_memory.votes)
        assert from_files.manifest["source"]["fingerprint"].startswith("sampled-sha256:")
    with pytest.raises(ValueError, match=r"source\['features'\]='x.txt': expected a path to a .npy file"):
        fastvote.prune({"features": "x.txt", "labels": source["labels"]}, target, keep=1, progress=False)
    with pytest.raises(ValueError, match="different row counts"):
        fastvote.prune({"features": str(tmp_path / "source" / "features.npy"), "labels": source["labels"][:5]},
                       target, keep=1, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"the folder .*empty holds none of"):
        fastvote.prune(tmp_path / "empty", target, keep=1, progress=False)
