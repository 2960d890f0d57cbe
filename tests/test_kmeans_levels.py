"""k-means' two-level passes (fastvote.cluster._Groups, issue 23): the
compiled within-group search against a float64 reference and the per-group
loop, the seeding within groups, the bounds' exactness, the choice, and the
clusters found."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvote import cluster, ops

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="fastvote._C is not built")


def _groups_case(n, d, starts, seed):
    g = torch.Generator().manual_seed(seed)
    k = starts[-1]
    x = torch.randn(n + 5, d, generator=g)
    c = torch.randn(k, d, generator=g)
    owners = torch.tensor([i for i in range(len(starts) - 1) if starts[i + 1] > starts[i]])  # groups with centroids
    group = torch.sort(owners[torch.randint(0, len(owners), (n,), generator=g)]).values
    order = torch.randperm(n + 5, generator=g)[:n]  # gathered rows, as the passes pass them
    row_starts = torch.searchsorted(group, torch.arange(len(starts)))
    return x, c, group, order, row_starts


def _reference(x, c, group, order, starts, k=2):
    dist = torch.cdist(x[order].double(), c.double()).square()
    d2 = torch.full((len(order), k), float("inf"), dtype=torch.float64)
    idx = torch.full((len(order), k), -1)
    for g in range(len(starts) - 1):
        rows, (lo, hi) = (group == g).nonzero()[:, 0], starts[g:g + 2]
        if len(rows) and hi > lo:
            values, at = dist[rows, lo:hi].sort(dim=1, stable=True)
            d2[rows, :min(k, hi - lo)], idx[rows, :min(k, hi - lo)] = values[:, :k], at[:, :k] + lo
    return d2, idx


@pytest.mark.parametrize("k", [1, 2, 3])  # 1: the seeding's distance updates; 2: the passes
@pytest.mark.parametrize("n,d,starts", [
    (700, 33, [0, 1, 9, 9, 40, 41]),  # a one-centroid group, a group without rows or centroids
    (1, 3, [0, 5]),  # one row, one group
    (0, 8, [0, 2, 4]),  # no rows
    (2000, 512, [0, 100, 230, 300]),  # the benchmark's width, tiles of several groups
    (300, 1, [0, 3, 7]),  # D = 1
])
def test_nearest_in_groups_matches_float64_and_the_loop(n, d, starts, k):
    from fastvote import _C

    x, c, group, order, row_starts = _groups_case(n, d, starts, seed=n + d)
    d2, idx = _C.nearest_in_groups(x, order, row_starts, c, torch.tensor(starts), k)
    ref_d2, ref_idx = _reference(x, c, group, order, starts, k)
    assert torch.equal(idx[:, 0], ref_idx[:, 0])
    assert torch.equal(torch.isinf(d2), torch.isinf(ref_d2)) and torch.equal(idx == -1, ref_idx == -1)
    finite = torch.isfinite(ref_d2)
    torch.testing.assert_close(d2[finite].double(), ref_d2[finite], rtol=1e-5, atol=1e-3)
    # the per-group loop (other devices, AVX2-only CPUs) agrees with the compiled call
    loop_d2, loop_idx = cluster._nearest_in_groups_loop(x, order, row_starts, cluster._Geometry(c), starts, k)
    assert torch.equal(loop_idx[:, 0], idx[:, 0]) and loop_idx.shape == idx.shape


def test_refining_groups_at_once_equals_refining_each():
    """The split groups' Lloyd passes in one call a pass give each group the
    centroids its own passes give (a group of one centroid, one of as many
    centroids as rows, one centroid no row chooses)."""
    g = torch.Generator().manual_seed(3)
    fits = [(torch.randn(n, 37, generator=g) + 5 * i, torch.randn(m, 37, generator=g) + 5 * i)
            for i, (n, m) in enumerate([(400, 7), (3, 3), (50, 1), (90, 4)])]
    fits[3][1][0] += 1e4  # far from every row: chosen by none, it stays
    together = cluster._refine_in_groups(fits, "l2", 5)
    for (rows, seeds), got in zip(fits, together):
        assert torch.equal(got, cluster._refine(rows, seeds, "l2", 5))
    assert torch.equal(together[3][0], fits[3][1][0]) and cluster._refine_in_groups([], "l2", 5) == []


def test_drift_is_never_below_the_exact_distance():
    """The passes' bounds loosen by each centroid's drift, computed in float32
    and rounded up: never below the float64 distance, on odd D, huge and tiny
    norms, moves far below the norms' unit of rounding and no move at all."""
    g = torch.Generator().manual_seed(5)
    for d in (1, 3, 512, 1027):
        c = torch.randn(4000, d, generator=g) * torch.logspace(-20, 15, 4000)[:, None]
        moved = c + torch.randn(4000, d, generator=g) * c.abs() * torch.logspace(-7, 0, 4000)[:, None]
        moved[:5] = c[:5]
        drift = cluster._drift(moved, c)
        exact = torch.linalg.vector_norm(moved.double() - c.double(), dim=1)
        assert bool((drift.double() >= exact).all()) and bool((drift[:5] < 1e-20).all())
        assert bool((drift.double() <= exact * (1 + 1e-3) + 1e-20).all())  # (and not loose)


@pytest.mark.parametrize("rows,dim", [(1, 1), (40, 67), (3000, 130)])
def test_moving_rows_gives_the_bits_of_index_put(rows, dim, monkeypatch):
    # The compiled move (each cluster's rows added in row order, then subtracted) against the two
    # index_put_ calls it replaces: the same float64 bits, even where the order of the adds matters
    # (values over 12 orders of magnitude, a few clusters taking many rows), for contiguous and
    # strided rows, with rows that stay (before == after), rows in no cluster before (-1: the first
    # pass, only added) and one block of columns or several.
    if not ops.HAS_EXTENSION:
        pytest.skip("the compiled move needs the extension")
    g = torch.Generator().manual_seed(rows + dim)
    k = 7
    x = torch.randn(rows, dim, generator=g) * torch.logspace(-6, 6, rows)[torch.randperm(rows, generator=g)][:, None]
    before = torch.randint(-1, k, (rows,), generator=g)
    after = torch.where(torch.rand(rows, generator=g) < 0.3, before, torch.randint(0, k, (rows,), generator=g)).clamp(min=0)
    start = torch.randn(k, dim, generator=g, dtype=torch.float64) * 1e3
    counts0 = torch.randint(0, 50, (k,), generator=g).double()
    for features in (x, x.t().contiguous().t()):
        sums, counts = start.clone(), counts0.clone()
        cluster._move_rows(sums, counts, features, before, after)
        monkeypatch.setattr(ops, "HAS_EXTENSION", False)
        ref_sums, ref_counts = start.clone(), counts0.clone()
        cluster._move_rows(ref_sums, ref_counts, features, before, after)
        monkeypatch.undo()
        assert torch.equal(sums, ref_sums) and torch.equal(counts, ref_counts)
        assert not torch.equal(sums, start) or bool((before == after).all())


def test_moving_rows_refuses_bad_arguments():
    if not ops.HAS_EXTENSION:
        pytest.skip("the compiled move needs the extension")
    from fastvote import _C

    sums, counts, x = torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.ones(2, 4)
    with pytest.raises(IndexError, match="row 1 names cluster 3"):
        _C.move_rows(sums, counts, x, torch.tensor([0, 1]), torch.tensor([2, 3]))
    with pytest.raises(IndexError, match="row 0 names cluster -2 before; expected -1 \\(none\\)"):
        _C.move_rows(sums, counts, x, torch.tensor([-2, 1]), torch.tensor([2, 1]))
    with pytest.raises(IndexError, match="row 1 names cluster -1 after"):
        _C.move_rows(sums, counts, x, torch.tensor([0, -1]), torch.tensor([2, -1]))
    with pytest.raises(ValueError, match="sums must be a contiguous float64"):
        _C.move_rows(sums.float(), counts, x, torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="features must be a float32 \\[B, D\\] tensor, D = 4"):
        _C.move_rows(sums, counts, torch.ones(2, 5), torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="before and after must be \\[B\\] tensors, B = 2"):
        _C.move_rows(sums, counts, x, torch.tensor([0]), torch.tensor([1, 2]))
    assert torch.equal(sums, torch.zeros(3, 4, dtype=torch.float64))  # (nothing moved by a refused call)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_means_and_drift_compiled_match_torch(metric, monkeypatch):
    # The compiled end of a pass against torch's: the l2 means are the same bits (one float64 division,
    # one rounding to float32), the cosine ones within an ulp (the norm's sum runs in another order);
    # an empty cluster keeps its centroid; every drift bounds the exact distance from above, tightly.
    if not ops.HAS_EXTENSION:
        pytest.skip("the compiled end of a pass needs the extension")
    g = torch.Generator().manual_seed(5)
    k, dim = 40, 67
    counts = torch.randint(0, 30, (k,), generator=g).double()
    counts[[0, 7]] = 0
    sums = torch.randn(k, dim, generator=g, dtype=torch.float64) * counts[:, None] * 1e3
    sums[3] *= 1e-30  # tiny and huge means
    sums[4] *= 1e25
    centroids = torch.randn(k, dim, generator=g)
    updated, drift = cluster._means_and_drift(sums, counts, centroids, metric)
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    ref_updated, ref_drift = cluster._means_and_drift(sums, counts, centroids, metric)
    monkeypatch.undo()
    if metric == "l2":
        assert torch.equal(updated, ref_updated)
    else:
        torch.testing.assert_close(updated, ref_updated, rtol=2 ** -23, atol=0)
    assert torch.equal(updated[[0, 7]], centroids[[0, 7]])
    exact = (updated.double() - centroids.double()).norm(dim=1)
    assert bool((drift.double() >= exact).all())
    assert bool((drift.double() <= exact * (1 + 1e-6) + 1e-30).all())
    assert drift[0] == 0 and drift[7] == 0


def test_updating_a_batch_in_groups_equals_searching_its_rows():
    # _C.update_in_groups (a pass's batch, in place) against nearest_in_groups on the rows whose
    # bounds fail and the bounds computed from its answers in torch: the same bits; rows whose bounds
    # hold are left as they were; groups of one centroid give lower = inf; state given as strided views.
    if not ops.HAS_EXTENSION:
        pytest.skip("the compiled update needs the extension")
    from fastvote import _C

    g = torch.Generator().manual_seed(9)
    sizes, rows_per = [1, 3, 16, 17, 50], [5, 40, 0, 33, 70]
    c = torch.randn(sum(sizes), 33, generator=g)
    starts = torch.tensor([0] + sizes).cumsum(0)
    n = sum(rows_per)
    x = torch.randn(n, 33, generator=g) * 2
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(rows_per))[torch.randperm(n, generator=g)]
    order = torch.argsort(group, stable=True)
    row_starts = torch.searchsorted(group[order], torch.arange(len(sizes) + 1))
    state = torch.zeros(3, 2 * n)  # upper, lower, slack as every other value of a row
    upper, lower, slack = state[0, ::2], state[1, ::2], state[2, ::2]
    upper.copy_(torch.rand(n, generator=g) * 10)
    lower.copy_(torch.rand(n, generator=g) * 10)
    slack.copy_(torch.rand(n, generator=g) * 1e-3)
    assigned = torch.randint(0, 100, (2 * n,), generator=g)[::2]
    before = [t.clone() for t in (assigned, upper, lower)]
    need = upper > lower
    work = _C.update_in_groups(x, order, row_starts, c, starts, assigned, upper, lower, slack)
    sub = order[need[order]]
    sub_group = group[sub]
    d2, idx = _C.nearest_in_groups(x, sub, torch.searchsorted(sub_group, torch.arange(len(sizes) + 1)), c, starts, 2)
    assert torch.equal(assigned[sub], idx[:, 0])
    assert torch.equal(upper[sub], (d2[:, 0] + slack[sub]).sqrt())
    assert torch.equal(lower[sub], (d2[:, 1] - slack[sub]).clamp(min=0).sqrt())
    assert bool(torch.isinf(lower[sub][sub_group == 0]).all())
    for now, was in zip((assigned, upper, lower), before):
        assert torch.equal(now[~need], was[~need])
    assert work == int((torch.tensor(sizes)[group] * need).sum())
    with pytest.raises(ValueError, match="upper, lower and slack must be float32 \\[B\\] tensors"):
        _C.update_in_groups(x, order, row_starts, c, starts, assigned, upper[:5], lower, slack)
    with pytest.raises(IndexError, match="order\\[0\\]=500 is out of range"):
        _C.update_in_groups(x, torch.full_like(order, 500), row_starts, c, starts, assigned, upper, lower, slack)


@pytest.mark.parametrize("k", [1, 2, 5, 37])
def test_the_gemm_paths_smallest_break_ties_by_the_lower_column(k):
    # The GEMM path (AVX2-only CPUs) orders a row's k smallest as the fused kernels do: ties to the lower
    # column, at the k-th place too (values 0-4 in 37 columns: ties everywhere)
    part = torch.randint(0, 5, (300, 37), generator=torch.Generator().manual_seed(3)).float()
    values, columns = cluster._smallest(part, k)
    expected_values, expected_columns = torch.sort(part, dim=1, stable=True)
    assert torch.equal(values, expected_values[:, :k]) and torch.equal(columns, expected_columns[:, :k])


def test_nearest_coarse_after_splits_equals_searching_again(monkeypatch):
    """The split rounds' kept lists (cluster._NearestCoarse): after rounds
    that replace some coarse centroids by 1 to 5 parts (one a duplicate of a
    kept centroid: an exact tie, the lower index first), each row's two
    nearest equal those of a search of all coarse centroids, bit for bit,
    with M = 8, 3 and 2 (most rows then searched again)."""
    g = torch.Generator().manual_seed(11)
    sample = torch.randn(3000, 17, generator=g) * 3
    for m, count in ((8, 30), (3, 30), (2, 30), (8, 3)):  # (8, 3): lists wider than the centroids
        coarse = torch.randn(count, 17, generator=g) * 3
        monkeypatch.setattr(cluster._NearestCoarse, "M", m)
        nearest = cluster._NearestCoarse(sample, coarse)
        for round_ in range(6):
            split = torch.rand(len(coarse), generator=g) < 0.3
            split[round_ % len(coarse)] = True
            split[-1] = False  # (a centroid kept)
            parts = [torch.randn(int(torch.randint(1, 6, (1,), generator=g)), 17, generator=g) * 3
                     for _ in range(int(split.sum()))]
            kept = (~split).nonzero()[:, 0]
            parts[-1][0] = coarse[kept[0]]  # a part on a kept centroid
            coarse = nearest.split(split, parts)
            d2, idx = nearest.top(2)
            want_d2, want_idx = cluster._Geometry(coarse).nearest(sample, 2)
            assert torch.equal(d2, want_d2) and torch.equal(idx, want_idx)


def test_nearest_in_groups_near_ties_take_the_lower_index():
    from fastvote import _C

    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # 0, 2 and 3 are the same point
    x = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    d2, idx = _C.nearest_in_groups(x, torch.arange(2), torch.tensor([0, 1, 2]), c, torch.tensor([0, 2, 4]), 2)
    assert idx.tolist() == [[0, 1], [2, 3]]


def test_nearest_in_groups_refuses_bad_offsets_and_rows():
    from fastvote import _C

    x, c = torch.randn(4, 3), torch.randn(3, 3)
    with pytest.raises(IndexError, match=r"order\[1\]=9 is out of range"):
        _C.nearest_in_groups(x, torch.tensor([0, 9]), torch.tensor([0, 2]), c, torch.tensor([0, 3]), 2)
    with pytest.raises(ValueError, match="offsets must run from 0"):
        _C.nearest_in_groups(x, torch.arange(4), torch.tensor([0, 3]), c, torch.tensor([0, 3]), 2)
    with pytest.raises(ValueError, match="group 0 has rows but no centroids"):
        _C.nearest_in_groups(x, torch.arange(4), torch.tensor([0, 4, 4]), c, torch.tensor([0, 0, 3]), 2)
    with pytest.raises(ValueError, match=r"features row 2 contains NaN"):
        x[2, 1] = float("nan")
        _C.nearest_in_groups(x, torch.arange(4), torch.tensor([0, 4]), c, torch.tensor([0, 3]), 1)


def test_seeding_within_groups_gives_each_group_its_blobs():
    """Three groups holding 2, 5 and 9 separated blobs (sample rows in
    proportion 9 : 5 : 2, against the blob counts): 16 seeds land one in each
    blob, the counts follow the blobs, not the rows."""
    g = np.random.default_rng(0)
    centres = g.normal(0, 20, (16, 8))
    blob = np.concatenate([np.repeat([0, 1], 200), np.repeat(np.arange(2, 7), 40), np.repeat(np.arange(7, 16), 10)])
    x = torch.from_numpy((centres[blob] + g.normal(0, 1, (len(blob), 8))).astype(np.float32))
    group = torch.from_numpy(np.select([blob < 2, blob < 7], [0, 1], 2))
    reach = torch.stack([group, (group + 1) % 3], 1)  # each row also searches the next group
    for seed in range(5):
        seeds, seed_group = cluster._seed_in_groups(x, 16, reach, np.random.default_rng(seed), progress=False)
        near = torch.cdist(seeds.double(), torch.from_numpy(centres)).argmin(1)
        assert sorted(near.tolist()) == list(range(16)) and torch.bincount(seed_group).tolist() == [2, 5, 9]
        assert torch.equal(seed_group, torch.sort(seed_group).values)


def test_two_level_choice():
    k = cluster.TWO_LEVEL_MIN_CLUSTERS
    assert cluster._two_level(None, k, 16 * k, 200_000 * 512)
    assert not cluster._two_level(None, k - 1, 16 * k, 200_000 * 512)
    assert not cluster._two_level(None, k, 16 * k, 24_000 * 16)  # a flat pass takes milliseconds
    assert cluster._two_level(True, 7, 900, 900) and not cluster._two_level(False, 10 ** 4, 10 ** 6, 10 ** 9)
    assert not cluster._two_level(True, 100, 399, 10 ** 9)  # too few sample rows to seed the groups from
    assert not cluster._two_level(True, 1, 900, 900)


def _blobs(k, per, dim, seed, spread=8.0):
    g = np.random.default_rng(seed)
    centres = g.normal(0, spread, (k, dim)).astype(np.float32)
    labels = np.repeat(np.arange(k), per)
    return (centres[labels] + g.normal(0, 1, (k * per, dim)).astype(np.float32)), labels


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_bounds_skip_rows_and_never_change_the_passes(monkeypatch, metric):
    """The within-group bounds only skip work: the passes give the same
    centroids when every row is recomputed every pass, and the compiled
    batch update (_C.update_in_groups) the same as the torch one around a
    nearest-centroid call a group (CPUs where the GEMM is faster)."""
    x, _ = _blobs(60, 40, 24, seed=1, spread=1.0)  # overlapping: rows change cluster for several passes
    xt = torch.from_numpy(x)

    def run():
        return cluster.fit(lambda: xt.split(500), 60, rows=range(len(x)), num_rows=len(x), iterations=8, tol=0,
                           metric=metric, progress=False, hierarchical=True)

    bounded = run()
    later = bounded.computed[1:]  # the bounds skip work from the second pass on
    assert bounded.groups >= 8 and sum(later) < 0.8 * len(later) * bounded.computed[0]
    with monkeypatch.context() as patch:
        patch.setattr(cluster, "_compiled_groups", lambda device: False)
        looped = run()
    assert torch.equal(bounded.centroids, looped.centroids) and bounded.computed == looped.computed
    moved = cluster._Groups.moved

    def forget(self, drift, geometry, sharded):
        moved(self, drift, geometry, sharded)
        self.upper.fill_(float("inf"))

    monkeypatch.setattr(cluster._Groups, "moved", forget)
    every_row = run()
    assert torch.equal(bounded.centroids, every_row.centroids) and torch.equal(bounded.counts, every_row.counts)


def test_two_level_fit_finds_separated_blobs_as_flat_does_and_assigns_exactly():
    """400 separated blobs, K = 400: two-level passes give as many clusters
    of one blob each as flat ones (within 2%), and the assignment after the
    fit is over all K (the nearest of all centroids, not of the group)."""
    x, labels = _blobs(400, 24, 16, seed=2)
    xt = torch.from_numpy(x)
    pure = {}
    for hierarchical in (False, True):
        centroids, assigned = cluster.kmeans(lambda: xt.split(4096), 400, iterations=6, progress=False,
                                             hierarchical=hierarchical)
        pure[hierarchical] = sum(len(np.unique(labels[assigned == j])) == 1 for j in range(400))
    assert pure[True] >= 0.98 * pure[False] and pure[False] >= 370, pure
    d2 = torch.cdist(xt.double(), centroids.double())
    assert (d2.argmin(1).numpy() == assigned).mean() > 0.9999


def test_fit_reports_its_groups_and_flat_stays_flat():
    x, _ = _blobs(50, 30, 8, seed=3)
    xt = torch.from_numpy(x)
    kw = dict(rows=range(len(x)), num_rows=len(x), iterations=2, progress=False)
    assert cluster.fit(lambda: [xt], 50, hierarchical=False, **kw).groups == 0
    two = cluster.fit(lambda: [xt], 50, hierarchical=True, **kw)
    wanted = math.ceil(cluster._COARSE_PER_ROOT_K * math.sqrt(50))  # coarse centroids, before the splits
    assert wanted - 1 <= two.groups <= 2 * wanted and two.centroids.shape == (50, 8)


def test_groups_are_split_by_their_cost(monkeypatch):
    """The benchmark's anisotropic mixture (bench_kmeans.blobs: Dirichlet sizes,
    per-cluster axis spreads), small: a row costs the passes its group's
    centroids, and a big broad group also gets many seeds, so splitting the
    costly groups cuts the distances a row computes; without the split
    rounds there are 2 sqrt(K) groups."""
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        from bench_kmeans import blobs
    finally:
        sys.path.remove(bench)
    x = torch.from_numpy(blobs(16000, 128, 200, 0, anisotropic=True)[0])

    def work_a_row(rounds):
        monkeypatch.setattr(cluster, "_SPLIT_ROUNDS", rounds)
        _, groups = cluster._seed_groups(x, 400, np.random.default_rng(0), "l2", progress=False)
        rows = torch.bincount(groups["sample_group"], minlength=len(groups["coarse"])).double()
        return float((rows * torch.diff(groups["starts"]).double()).sum() / rows.sum()), len(groups["coarse"])

    rounds = cluster._SPLIT_ROUNDS
    (unsplit, few), (split, many) = work_a_row(0), work_a_row(rounds)
    wanted = cluster._COARSE_PER_ROOT_K * 20  # coarse centroids: 3 sqrt(400)
    assert few == wanted < many <= 4 * wanted and split < 0.5 * unsplit, (unsplit, few, split, many)


def test_two_level_fits_seed_from_a_smaller_sample():
    """Two levels seed from 4 sample rows a cluster, at least 16,000; a fit
    that turns out flat (a short pass) draws the flat sample, 16 a cluster."""
    torch.manual_seed(0)
    x = torch.randn(70000, 8)
    kw = dict(rows=range(len(x)), num_rows=len(x), iterations=1, progress=False)
    assert cluster.fit(lambda: x.split(8192), 4500, hierarchical=True, **kw).seed_rows == 18000
    assert cluster.fit(lambda: x.split(8192), 2000, hierarchical=True, **kw).seed_rows == 16000
    flat = cluster.fit(lambda: x.split(8192), 4500, **kw)  # 4,500 x 70,000 x 8 multiply-adds: flat
    assert flat.groups == 0 and flat.seed_rows == 70000


@pytest.mark.parametrize("n,d", [(0, 8), (1, 3), (9, 1), (100, 67), (4097, 512)])
def test_distances_to_a_point_by_blocks_are_the_bits_of_the_difference(n, d):
    # _sq_norms_from (blocks of rows, no B x D temporary) against _sq_norms(x - point): the same
    # float32 bits, far from the origin too, in blocks of 7 rows (a short last block) and the default
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(n, d, generator=g) * 3 + 100
    point = torch.randn(d, generator=g) + 100
    expected = cluster._sq_norms(x - point)
    for rows in (7, 4096):
        assert torch.equal(cluster._sq_norms_from(x, point, rows), expected)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("hierarchical", [False, True])
def test_a_column_major_stream_gives_the_same_centroids(metric, hierarchical):
    # The same rows, stored column-major (a transposed array, as numpy and pandas hand them over):
    # the same centroids bit for bit (cosine normalised them in another order: the last bit differed)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6000, 33, generator=g) * 2 + 5
    by_columns = x.t().contiguous().t()
    got = [cluster.kmeans(lambda: rows.split(1024), 300, metric=metric, iterations=3, progress=False,
                          hierarchical=hierarchical) for rows in (x, by_columns)]
    assert torch.equal(got[0][0], got[1][0]) and np.array_equal(got[0][1], got[1][1])
