"""Label-free FM at scale (issue 15): fastvote.cluster's seeding, capped
fitting sample and bounded Lloyd passes against a float64 reference, and
fastvote.data.shards (shard reading, per-shard outputs, keep rules, errors).
Peak RSS independent of N is a benchmark (benchmarks/bench_kmeans.py scale)."""
import json
import math
import os
import threading
import time

import numpy as np
import pytest
import torch

from fastvote import cluster, ops
from fastvote.cli import main as cli_main
from fastvote.data.shards import ShardSource, cluster_prune


def blobs(n, d, k, seed=0, spread=6.0):
    g = np.random.default_rng(seed)
    centres = g.normal(0, spread, (k, d)).astype(np.float32)
    labels = g.integers(0, k, n)
    return (centres[labels] + g.normal(0, 1, (n, d))).astype(np.float32), labels, centres


def lloyd_reference(x, centroids, iterations):
    """Plain float64 Lloyd from given centroids (empty clusters keep their centroid)."""
    x, c = x.astype(np.float64), centroids.astype(np.float64).copy()
    for _ in range(iterations):
        a = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        for j in range(len(c)):
            if (a == j).any():
                c[j] = x[a == j].mean(0)
    return c, ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)


def fit(x, k, batch=37, **kw):
    xt = torch.from_numpy(x)
    return cluster.fit(lambda: xt.split(batch), k, rows=range(len(x)), num_rows=len(x), progress=False, **kw)


# ---------------------------------------------------------------- k-means

@pytest.mark.parametrize("n,d,k", [(301, 13, 6), (500, 7, 40), (64, 3, 64), (200, 9, 1)])
def test_bounded_passes_equal_plain_lloyd_in_float64(n, d, k):
    """Hamerly's bounds skip rows, never change the result: the passes equal
    float64 Lloyd from the same seeds (awkward D, K = N, K = 1)."""
    x, _, _ = blobs(n, d, max(k, 2), seed=n)
    seeds = fit(x, k, iterations=0, seed=2).centroids.numpy()
    result = fit(x, k, iterations=6, tol=0.0, seed=2)
    assert result.restarts == 0 or k == n
    if result.restarts == 0:
        ref, assign = lloyd_reference(x, seeds, result.passes)
        np.testing.assert_allclose(result.centroids.numpy(), ref, rtol=0, atol=1e-4)
    # the streamed assignment is every row's nearest final centroid, with its exact distance
    xt = torch.from_numpy(x)
    got = list(cluster.assign(lambda: xt.split(50), result.centroids, progress=False))
    idx, d2 = torch.cat([g[0] for g in got]).numpy(), torch.cat([g[1] for g in got]).numpy()
    full = ((x[:, None, :].astype(np.float64) - result.centroids.numpy()[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(d2, full[np.arange(n), idx], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(full[np.arange(n), idx], full.min(1), rtol=1e-5, atol=1e-4)


def test_bounds_skip_most_rows_once_converging():
    x, _, _ = blobs(4000, 16, 30, seed=1, spread=3.0)  # 30 touching blobs, 20 clusters: several passes to converge
    # seeds refined on a 320-row sample (16 a cluster): from pass 2 the bounds skip most rows
    result = fit(x, 20, batch=512, iterations=8, tol=0.0, seed=0, sample_size=320)
    assert result.passes == 8 and result.computed[0] == 1.0, result.computed
    assert result.computed[1] < 0.3 and np.mean(result.computed[1:]) < 0.3, result.computed
    # a sample as large as half the rows is not refined (its passes would cost as much as the real ones):
    # pass 2 starts from the seeds themselves, which move a blob's radius and loosen nearly every bound
    # (0.86-0.96 of the rows over seeds 0-7, against < 0.3 when refined)
    result = fit(x, 20, batch=512, iterations=8, tol=0.0, seed=0, sample_size=2000)
    assert result.computed[0] == 1.0 and result.computed[1] > 0.8 and result.computed[-1] < 0.1, result.computed


def test_bounds_stay_valid_when_a_few_centroids_jump():
    """A few centroids jump far each step (as restarted ones do), the rest
    drift a little: the movers the bounds pick are computed for every row,
    and after every update each row holds its nearest centroid, an upper bound
    on that distance and a lower bound on every other (float64 check)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 19, generator=g) * 3
    c = x[:300] + 0.5 * torch.randn(300, 19, generator=g)
    bounds = cluster._Bounds(len(x), torch.device("cpu"))
    geometry = cluster._Geometry(c)
    bounds.update(x, slice(0, len(x)), geometry)
    picked, works = [], []
    for step in range(6):
        new = c + 0.02 * torch.randn(c.shape, generator=g)
        jump = torch.randperm(300, generator=g)[:3]
        new[jump] = x[torch.randperm(len(x), generator=g)[:3]]
        drift = (new.double() - c.double()).norm(dim=1).float()
        # the centroid gaps exact, or bounded from the previous ones (as fit() does at few rows a cluster)
        geometry = cluster._Geometry(new, geometry, drift) if step % 2 else cluster._Geometry(new)
        gaps = torch.cdist(new.double(), new.double()).fill_diagonal_(float("inf")).min(1).values
        assert bool((2 * geometry.half_gap().double() <= gaps * (1 + 1e-6)).all())
        bounds.moved(drift, geometry, False)
        picked.append(len(bounds.movers))
        work = sum(bounds.update(x[lo:lo + 700], slice(lo, lo + 700), geometry)[1] for lo in range(0, len(x), 700))
        works.append(work / len(x))
        d = torch.cdist(x.double(), new.double())
        own = d.gather(1, bounds.assigned[:, None])[:, 0]
        assert bool((own <= d.min(1).values + 1e-5).all())
        assert bool((bounds.upper.double() >= own * (1 - 1e-5)).all())
        others = d.scatter(1, bounds.assigned[:, None], float("inf")).min(1).values
        assert bool((bounds.lower.double() <= others * (1 + 1e-5)).all())
        c = new
    assert max(picked) > 0 and max(works) < 0.5, (picked, works)


def test_seeding_finds_well_separated_blobs_and_is_not_quadratic_in_steps():
    """Each blob gets one center (purity 1) at K = 200, in rounds, not K steps."""
    x, labels, _ = blobs(20000, 24, 200, seed=3, spread=20.0)
    result = fit(x, 200, batch=4096, iterations=0, seed=0)
    xt = torch.from_numpy(x)
    idx = torch.cat([a for a, _ in cluster.assign(lambda: xt.split(4096), result.centroids, progress=False)]).numpy()
    covered = len({int(np.bincount(labels[idx == j]).argmax()) for j in np.unique(idx)})
    assert covered >= 196  # k-means++ on well-separated blobs: at most a few blobs share a center


def test_fitting_sample_is_capped_and_seeded():
    x, _, _ = blobs(3000, 8, 5, seed=4)
    capped = fit(x, 5, max_rows_per_cluster=100, iterations=3, seed=1)
    assert capped.fit_rows == 500
    again = fit(x, 5, batch=211, max_rows_per_cluster=100, iterations=3, seed=1)  # other batching, same rows
    torch.testing.assert_close(capped.centroids, again.centroids, rtol=0, atol=1e-5)
    assert fit(x, 5, max_rows_per_cluster=None, iterations=1).fit_rows == 3000


def test_empty_clusters_restart_at_sample_rows():
    x = np.zeros((40, 4), np.float32)
    x[20:] = 10.0  # two distinct points: 3 clusters must leave one empty, and it restarts
    result = fit(x, 3, iterations=3, tol=0.0)
    assert result.restarts >= 1 and torch.isfinite(result.centroids).all()


class FakeRanks:
    """torch.distributed's all-reduce for ranks run as threads: each rank's
    tensor is summed in rank order and every rank gets the sum."""

    def __init__(self, n):
        self.n, self.barrier, self.slots, self.local = n, threading.Barrier(n), [None] * n, threading.local()

    def all_reduce_(self, t):
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()
        return t.copy_(total)


@pytest.mark.parametrize("cap,hierarchical", [(None, False), (30, False), (None, True), (30, True)])
def test_any_split_over_ranks_gives_the_same_clusters(monkeypatch, cap, hierarchical):
    """Rank-independence through the sharded code path: three ranks (threads,
    uneven row ranges, one without rows) all-reducing their sums give the
    single-process centroids, with full passes and with a capped sample, flat
    and two-level."""
    x, _, _ = blobs(900, 11, 7, seed=5)
    one = fit(x, 7, iterations=5, tol=0.0, max_rows_per_cluster=cap, seed=3, hierarchical=hierarchical)
    assert one.groups == (min(math.ceil(cluster._COARSE_PER_ROOT_K * math.sqrt(7)), 7) if hierarchical else 0)
    group = FakeRanks(3)
    monkeypatch.setattr(cluster.distributed, "all_reduce_", group.all_reduce_)
    xt, results = torch.from_numpy(x), [None] * 3

    def rank(r, rows):
        group.local.rank = r
        part = xt[rows.start:rows.stop]
        results[r] = cluster.fit(lambda: part.split(64), 7, rows=rows, num_rows=900, sharded=True, iterations=5,
                                 tol=0.0, max_rows_per_cluster=cap, seed=3, progress=False, hierarchical=hierarchical)

    threads = [threading.Thread(target=rank, args=(r, rows))
               for r, rows in enumerate((range(0, 413), range(413, 413), range(413, 900)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        torch.testing.assert_close(r.centroids, one.centroids, rtol=0, atol=1e-5)
        assert r.passes == one.passes and r.fit_rows == one.fit_rows


def test_kmeans_argument_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="max_rows_per_cluster=0 is invalid"):
        cluster.kmeans(lambda: [x], 2, max_rows_per_cluster=0, progress=False)
    with pytest.raises(ValueError, match="sample_size=0 is invalid"):
        cluster.kmeans(lambda: [x], 2, sample_size=0, progress=False)
    with pytest.raises(ValueError, match="num_clusters=11 exceeds the 10 rows"):
        cluster.kmeans(lambda: [x], 11, progress=False)


# ---------------------------------------------------------------- shards

@pytest.fixture
def pool(tmp_path):
    """Four shards (npy float16, npz with uids, a one-row shard), blobs of 12 clusters, and a target."""
    g = np.random.default_rng(0)
    centres = g.normal(0, 8, (12, 10)).astype(np.float32)
    folder = tmp_path / "pool"
    folder.mkdir()
    rows = []
    for i, n in enumerate([250, 1, 180, 333]):
        labels = g.integers(0, 12, n)
        x = (centres[labels] + g.normal(0, 1, (n, 10))).astype(np.float16)
        rows.append((x, labels))
        if i == 2:
            np.savez(folder / f"s{i}.npz", emb=x, uid=np.array([f"u{i}-{j}" for j in range(n)]))
        else:
            np.save(folder / f"s{i}.npy", x)
    target = (centres[g.integers(0, 2, 60)] + g.normal(0, 1, (60, 10))).astype(np.float32)
    np.save(tmp_path / "target.npy", target)
    return folder, tmp_path / "target.npy", rows


def kept_rows(out, name):
    return np.load(out / "kept" / f"{name}.npy")


def test_cluster_prune_writes_per_shard_outputs(pool, tmp_path):
    folder, target, rows = pool
    out = tmp_path / "out"
    r = cluster_prune(folder, target, out, clusters=12, keep_clusters="voted", device="cpu", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 764 and [s["rows"] for s in manifest["source"]] == [250, 1, 180, 333]
    assert int(r.sizes.sum()) == 764 and (out / "kept" / "s2.ids.npy").exists()
    # the assignment files are every row's nearest centroid; kept rows are exactly the voted clusters' members
    voted = set(np.flatnonzero(r.votes.numpy() > 0).tolist())
    assert set(r.kept_clusters.tolist()) == voted and 1 <= len(voted) <= 4  # the target is 2 blobs
    total = 0
    for i, (x, _) in enumerate(rows):
        assigned = np.load(out / "assignments" / f"s{i}.npy")
        _, nearest = ops.nearest_centroids(torch.from_numpy(x.astype(np.float32)), r.centroids, 1)
        assert np.array_equal(assigned, nearest[:, 0].numpy())
        kept = kept_rows(out, f"s{i}")
        assert np.array_equal(kept, np.flatnonzero(np.isin(assigned, list(voted))))
        total += len(kept)
    ids = np.load(out / "kept" / "s2.ids.npy")
    assert list(ids) == [f"u2-{j}" for j in kept_rows(out, "s2")]
    assert total == r.kept_rows == manifest["kept_rows"]


def test_keep_budget_is_exact_and_fills_by_distance(pool, tmp_path):
    folder, target, _ = pool
    out = tmp_path / "out"
    r = cluster_prune(folder, target, out, clusters=12, keep=100, device="cpu", progress=False)
    assert r.kept_rows == 100
    sizes, order = r.sizes.numpy(), r.kept_clusters.numpy()
    whole, partial = order[:-1], order[-1]
    assert sizes[whole].sum() < 100 <= sizes[whole].sum() + sizes[partial]
    # the partial cluster gives its rows nearest to its centroid
    gave, rest = [], []
    for name in ("s0", "s1", "s2", "s3"):
        a, d2 = np.load(out / "assignments" / f"{name}.npy"), np.load(out / "distances" / f"{name}.npy")
        kept = np.zeros(len(a), bool)
        kept[kept_rows(out, name)] = True
        gave += d2[(a == partial) & kept].tolist()
        rest += d2[(a == partial) & ~kept].tolist()
    assert len(gave) == 100 - sizes[whole].sum() and (not rest or max(gave) <= min(rest))
    by_ratio = cluster_prune(folder, target, tmp_path / "out2", clusters=12, ratio=0.75, device="cpu", progress=False)
    assert by_ratio.kept_rows == round(764 * 0.25)
    by_count = cluster_prune(folder, target, tmp_path / "out3", clusters=12, keep_clusters=3, device="cpu",
                             progress=False)
    assert len(by_count.kept_clusters) == 3 and by_count.kept_rows == int(by_count.sizes[by_count.kept_clusters].sum())


def test_shard_split_does_not_change_the_clusters(pool, tmp_path):
    """The same rows in one shard or four give the same clusters."""
    folder, target, rows = pool
    one = tmp_path / "one"
    one.mkdir()
    np.save(one / "all.npy", np.concatenate([x for x, _ in rows]))
    a = cluster_prune(folder, target, tmp_path / "a", clusters=12, keep=50, device="cpu", progress=False)
    b = cluster_prune(one, target, tmp_path / "b", clusters=12, keep=50, device="cpu", progress=False)
    torch.testing.assert_close(a.centroids, b.centroids, rtol=0, atol=1e-5)
    assert torch.equal(a.votes, b.votes)


def test_cli_cluster_prune_under_torchrun_matches_one_process(pool, tmp_path):
    """Two gloo ranks (each its own shards, rows 251 / 513) write the same
    per-shard outputs as one process: clusters, assignments, kept rows and ids."""
    from test_distributed import torchrun

    folder, target, _ = pool
    args = ["cluster-prune", "--source", folder, "--target", target, "--clusters", "12", "--keep", "100"]
    cli_main(["--device", "cpu", *map(str, args), "--out", str(tmp_path / "one")])
    torchrun("-m", "fastvote.cli", "--device", "cpu", *args, "--out", tmp_path / "two")
    one, two = tmp_path / "one", tmp_path / "two"
    np.testing.assert_allclose(np.load(two / "centroids.npy"), np.load(one / "centroids.npy"), rtol=0, atol=1e-5)
    for name in ("votes.npy", "sizes.npy", "kept_clusters.npy"):
        assert np.array_equal(np.load(one / name), np.load(two / name)), name
    for sub in ("assignments", "kept"):
        files = sorted(p.name for p in (one / sub).iterdir())
        assert files == sorted(p.name for p in (two / sub).iterdir()) and files, sub
        for f in files:
            assert np.array_equal(np.load(one / sub / f), np.load(two / sub / f)), f"{sub}/{f}"
    manifest = [json.loads((d / "manifest.json").read_text()) for d in (one, two)]
    assert manifest[0]["kept_rows"] == manifest[1]["kept_rows"] == 100


def test_a_glob_and_a_rerun_replace_the_outputs(pool, tmp_path):
    folder, target, _ = pool
    out = tmp_path / "out"
    cluster_prune(folder, target, out, clusters=12, keep=50, device="cpu", progress=False)
    r = cluster_prune(str(folder / "s[03].npy"), target, out, clusters=5, keep=50, device="cpu", progress=False)
    assert r.num_rows == 583 and sorted(p.name for p in (out / "kept").iterdir()) == ["s0.npy", "s3.npy"]


@pytest.mark.parametrize("case,match", [
    ("width", "s9.npy holds float16 rows of width 11, but shard .*s0.npy holds float16 rows of width 10"),
    ("dtype", "s9.npy holds float32 rows of width 10, but shard .*s0.npy holds float16"),
    ("empty", "s9.npy is empty"),
    ("int", "s9.npy holds int64 embeddings; expected float16 or float32"),
    ("nan", "s9.npy row 3 contains NaN"),
    ("npz", "s9.npz holds 2 2-D float members"),
])
def test_bad_shards_name_the_shard(pool, tmp_path, case, match):
    folder, target, _ = pool
    bad = {"width": np.zeros((5, 11), np.float16), "dtype": np.zeros((5, 10), np.float32),
           "empty": np.zeros((0, 10), np.float16), "int": np.zeros((5, 10), np.int64),
           "nan": np.zeros((5, 10), np.float16)}
    if case == "npz":
        np.savez(folder / "s9.npz", a=np.zeros((5, 10), np.float16), b=np.zeros((5, 10), np.float16))
    else:
        if case == "nan":
            bad["nan"][3, 2] = np.nan
        np.save(folder / "s9.npy", bad[case])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        cluster_prune(folder, target, out, clusters=4, keep=10, device="cpu", progress=False)
    manifest = out / "manifest.json"  # none, or fastvote's unfinished mark
    assert not manifest.exists() or not json.loads(manifest.read_text())["complete"]


def test_other_bad_inputs(pool, tmp_path):
    folder, target, _ = pool
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="clusters=765 exceeds the 764 rows of the source's 4 shards"):
        cluster_prune(folder, target, out, clusters=765, keep=10, device="cpu", progress=False)
    with pytest.raises(ValueError, match="give exactly one of keep="):
        cluster_prune(folder, target, out, clusters=4, keep=10, ratio=0.5, device="cpu", progress=False)
    with pytest.raises(ValueError, match="keep_clusters='all' is invalid"):
        cluster_prune(folder, target, out, clusters=4, keep_clusters="all", device="cpu", progress=False)
    with pytest.raises(ValueError, match="keep=765 is invalid"):
        cluster_prune(folder, target, out, clusters=4, keep=765, device="cpu", progress=False)
    np.save(tmp_path / "wide.npy", np.zeros((3, 11), np.float32))
    with pytest.raises(ValueError, match="target's embeddings have width 11 but the source's 10"):
        cluster_prune(folder, tmp_path / "wide.npy", out, clusters=4, keep=10, device="cpu", progress=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .npy or .npz shards"):
        ShardSource(tmp_path / "nothing")


def test_a_shard_changed_between_passes_is_an_error(pool):
    folder, _, _ = pool
    source = ShardSource(folder)
    shard = source.shards[0]
    next(source.chunks(shard))
    time.sleep(0.01)
    np.save(shard.path, np.zeros((250, 10), np.float16))  # same size, new mtime
    os.utime(shard.path, ns=(shard.mtime_ns + 10**9, shard.mtime_ns + 10**9))
    with pytest.raises(ValueError, match=r"s0.npy changed since it was opened"):
        next(source.chunks(shard))


def test_rows_are_checked_finite_until_a_shard_was_read_whole(pool, monkeypatch):
    """A shard's NaN/Inf test runs on its reads until one has gone through
    every row (a pass stopped early checks again), then stops: a file
    changed since is refused before any row is read."""
    folder, _, _ = pool
    source = ShardSource(folder, chunk_rows=100)
    shard = source.shards[0]
    tested = []
    real = np.isfinite
    monkeypatch.setattr(np, "isfinite", lambda block: tested.append(len(block)) or real(block))
    next(source.chunks(shard))  # one chunk, then stopped
    list(source.chunks(shard))
    assert tested == [100, 100, 100, 50]
    list(source.chunks(shard))
    assert tested == [100, 100, 100, 50]  # read whole once: not tested again
    list(source.chunks(source.shards[1]))
    assert len(tested) > 4  # (another shard is)


def test_cli_cluster_prune(pool, tmp_path, capsys):
    folder, target, _ = pool
    out = tmp_path / "out"
    assert cli_main(["cluster-prune", "--source", str(folder), "--target", str(target), "--clusters", "12",
                     "--keep", "120", "--out", str(out), "--device", "cpu"]) == 0
    assert "kept 120 of 764 source rows" in capsys.readouterr().out
    assert cli_main(["cluster-prune", "--source", str(folder), "--target", str(target), "--clusters", "999",
                     "--keep", "12", "--out", str(out), "--device", "cpu"]) == 2
    assert "clusters=999 exceeds the 764 rows" in capsys.readouterr().err
