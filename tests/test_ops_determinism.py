"""Float votes ("rank", "soft") of the CPU backend are deterministic: the
same bits on every call whatever the thread count and schedule, because
each vote is rounded to the 32.32 fixed point of csrc/include/fastvote/topk.h
and summed as integers (the CUDA kernels use the same fixed point and the
same weights, so the two backends agree bit for bit; tests/test_cuda.py
checks that on a GPU).

Against the float64 references: "rank" weights are float32(1 / r), so the
votes must EQUAL the fixed-point sum emulated here; "soft" weights carry
float32 rounding of the softmax, bounded per vote.
"""
import os
import subprocess
import sys

import pytest
import torch

import fastvote.ops as ops

FIXED_ONE = 2.0 ** 32
# (N, K, D, k): D not a multiple of 8, k = K, one row, empty input, several tiles.
SHAPES = [(3000, 97, 67, 5), (500, 13, 9, 13), (1, 7, 5, 3), (0, 5, 3, 2), (777, 300, 130, 64)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def bits(votes):
    """float64 votes as their bit patterns: equality of these is bitwise."""
    return votes.contiguous().view(torch.int64)


def fm_inputs(n, num, dim, seed):
    g = gen(seed)
    return torch.randn(n, dim, generator=g), torch.randn(num, dim, generator=g)


def integer_inputs(n, num, dim, seed):
    g = gen(seed)
    return (torch.randint(-3, 4, (n, dim), generator=g).float(),
            torch.randint(-3, 4, (num, dim), generator=g).float())


def reference_picks(keys, k):
    """Sorted picks by the tie rule (equal keys: lower index first)."""
    values, indices = torch.sort(keys, dim=1, stable=True)
    return values[:, :k], indices[:, :k]


def fixed_point_votes(indices, weights, num):
    """The fixed-point sum of float32 weights: round(w * 2^32) half to even,
    integer sums, then float64 -- what every backend must return."""
    units = torch.round(weights.double() * FIXED_ONE).long()
    total = torch.zeros(num, dtype=torch.int64)
    total.index_add_(0, indices.reshape(-1), units.reshape(-1))
    return total.double() / FIXED_ONE


def with_threads(threads, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- repeatability

@pytest.mark.parametrize("n,num,dim,k", SHAPES)
@pytest.mark.parametrize("weight", ["rank", "soft"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_fm_vote_is_bitwise_repeatable(n, num, dim, k, weight, metric):
    x, c = fm_inputs(n, num, dim, seed=n + num + dim)
    first = with_threads(2, lambda: ops.fm_vote(x, c, k, metric, weight, 0.5))
    for threads in (2, 1, 2):
        again = with_threads(threads, lambda: ops.fm_vote(x, c, k, metric, weight, 0.5))
        assert torch.equal(bits(again), bits(first)), f"threads={threads}"
    # Every vote is a whole number of fixed-point units.
    assert torch.equal(first * FIXED_ONE, torch.round(first * FIXED_ONE))


@pytest.mark.parametrize("n,num,k", [(5000, 50, 5), (300, 1000, 64), (1, 3, 3), (0, 4, 2), (200, 9, 9)])
@pytest.mark.parametrize("weight", ["rank", "soft"])
def test_lm_vote_is_bitwise_repeatable(n, num, k, weight):
    logits = torch.randn(n, num, generator=gen(n + num)) * 4
    first = with_threads(2, lambda: ops.lm_vote(logits, k, weight))
    for threads in (2, 1, 2):
        again = with_threads(threads, lambda: ops.lm_vote(logits, k, weight))
        assert torch.equal(bits(again), bits(first)), f"threads={threads}"


_SUBPROCESS = r"""
import sys, torch, fastvote.ops as ops
g = torch.Generator().manual_seed(3)
x, c = torch.randn(4000, 67, generator=g), torch.randn(211, 67, generator=g)
logits = torch.randn(4000, 333, generator=g) * 3
out = [ops.fm_vote(x, c, 5, "l2", "soft"), ops.fm_vote(x, c, 7, "cosine", "rank"),
       ops.fm_vote(x, c, 3, "l2", "soft", 0.1), ops.lm_vote(logits, 5, "soft"),
       ops.lm_vote(logits, 4, "rank"), ops.lm_scores(logits), ops.fm_scores(x, c, "l2"),
       ops.fm_scores(x, c, "cosine")]
torch.save([t.view(torch.int64) for t in out], sys.argv[1])
"""


def test_votes_equal_across_processes_and_thread_counts(tmp_path):
    """A fresh process with OMP/torch threads 1 and 2: the same bits (scores too)."""
    saved = []
    for threads in ("1", "2"):
        path = tmp_path / f"votes_{threads}_{len(saved)}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        subprocess.run([sys.executable, "-c", _SUBPROCESS, str(path)], env=env, check=True, timeout=300)
        saved.append(torch.load(path))
    for other in saved[1:]:
        for a, b in zip(saved[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("n,num,dim", [(50_000, 300, 40), (3000, 1001, 67), (64 * 300 + 5, 20, 3), (1, 7, 5)])
def test_scores_are_bitwise_repeatable_across_thread_counts(n, num, dim):
    # The tie-break scores reduce over rows in fixed row groups, not per thread.
    g = gen(n + num)
    x, c = torch.randn(n, dim, generator=g), torch.randn(num, dim, generator=g)
    logits = torch.randn(n, num, generator=g) * 4
    calls = {"lm_scores": lambda: ops.lm_scores(logits), "fm_scores l2": lambda: ops.fm_scores(x, c, "l2"),
             "fm_scores cosine": lambda: ops.fm_scores(x, c, "cosine")}
    for name, call in calls.items():
        first = with_threads(2, call)
        for threads in (2, 1, 2, 3):
            assert torch.equal(bits(with_threads(threads, call)), bits(first)), (name, threads)


# ---------------------------------------------------------------- against the references

@pytest.mark.parametrize("n,num,dim,k", SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_fm_rank_votes_equal_the_fixed_point_sum(n, num, dim, k, metric):
    # Integer inputs: float32 keys are exact for l2, so the picks are the
    # reference's; cosine picks come from the kernel (nearest_centroids).
    x, c = integer_inputs(n, num, dim, seed=7 * n + num)
    if metric == "l2":
        keys = torch.cat([kk for _, kk in ops._reference_keys(x, c, metric)]) if n else \
            torch.zeros(0, num, dtype=torch.float64)
        _, indices = reference_picks(keys, k)
    else:
        _, indices = ops.nearest_centroids(x, c, k, metric)
    ranks = torch.arange(1, k + 1, dtype=torch.float32)
    weights = (torch.ones(k) / ranks).expand(n, k)  # float32(1 / r), as the kernels
    expected = fixed_point_votes(indices, weights, num)
    votes = ops.fm_vote(x, c, k, metric, "rank")
    assert torch.equal(votes, expected)
    if metric == "cosine":
        return  # near-ties of integer inputs may resolve differently in float64
    # And the float64 reference, within the fixed-point resolution plus the
    # float32 rounding of 1 / r.
    counts = ops.fm_vote(x, c, k, metric).double()
    resolution = counts * 2.0 ** -33 + ops.fm_vote_reference(x, c, k, metric, "rank") * 2.0 ** -24
    assert ((votes - ops.fm_vote_reference(x, c, k, metric, "rank")).abs() <= resolution).all()


@pytest.mark.parametrize("n,num,dim,k", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_fm_soft_votes_match_the_reference(n, num, dim, k, temperature):
    # Integer inputs: the keys and picks are exact, only the float32 softmax
    # (about 1 ulp per exp, k additions, a division) and the fixed point round.
    x, c = integer_inputs(n, num, dim, seed=n + 3 * num)
    x, c = x / 4, c / 4  # keys of moderate size: the weights are not all 0 or 1
    votes = ops.fm_vote(x, c, k, "l2", "soft", temperature)
    expected = ops.fm_vote_reference(x, c, k, "l2", "soft", temperature)
    counts = ops.fm_vote(x, c, k, "l2").double()
    bound = expected * (k + 3) * 2.0 ** -24 + counts * 2.0 ** -33
    assert ((votes - expected).abs() <= bound).all(), (votes - expected).abs().max()
    assert abs(float(votes.sum()) - n) <= n * k * 2.0 ** -22


@pytest.mark.parametrize("n,num,k", [(5000, 50, 5), (300, 1000, 64), (1, 3, 3), (0, 4, 2), (200, 9, 9)])
def test_lm_votes_match_the_reference(n, num, k):
    logits = torch.randn(n, num, generator=gen(n * num + 1)) * 3
    _, indices = reference_picks(-logits.double(), k)
    weights = (torch.ones(k) / torch.arange(1, k + 1, dtype=torch.float32)).expand(n, k)
    assert torch.equal(ops.lm_vote(logits, k, "rank"), fixed_point_votes(indices, weights, num))
    votes = ops.lm_vote(logits, k, "soft")
    expected = ops.lm_vote_reference(logits, k, "soft")
    counts = ops.lm_vote(logits, k).double()
    bound = expected * (k + 3) * 2.0 ** -24 + counts * 2.0 ** -33
    assert ((votes - expected).abs() <= bound).all(), (votes - expected).abs().max()


def test_soft_weights_of_distant_picks_underflow_to_zero():
    # exp(-105) and exp(-305) are far below the fixed-point resolution: exactly 0.
    logits = torch.tensor([[0.0, -100.0, 5.0, -300.0]])
    votes = ops.lm_vote(logits, 4, "soft")
    assert votes[1] == 0.0 and votes[3] == 0.0
    e5 = torch.exp(torch.tensor(-5.0, dtype=torch.float64))
    torch.testing.assert_close(votes[[2, 0]], torch.stack([1 / (1 + e5), e5 / (1 + e5)]),
                               rtol=1e-6, atol=0)


def test_float_votes_reject_too_many_rows():
    # The fixed point holds 2^31 rows a call; an expanded view costs no memory.
    logits = torch.zeros(1, 3).expand(2 ** 31, 3)
    with pytest.raises(ValueError, match=r"lm_vote: N=2147483648 rows .*2\^31"):
        ops.lm_vote(logits, 1, "soft")


# ---------------------------------------------------------------- issue 22: no NaN, norms in d order

def test_soft_votes_of_overflowing_keys_are_numbers():
    # Finite inputs whose l2 keys overflow float32 (||c||^2 + 2|x.c| > 3.4e38):
    # equal keys weigh alike, a far key weighs 0, and no vote is NaN.
    x = torch.tensor([[1.8e19], [1.8e19]])
    c = torch.tensor([[-1.8e19], [-1.8e19], [1.8e19]])
    both_far = ops.fm_vote(x, c[:2], 2, "l2", "soft")
    assert torch.equal(both_far, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.equal(both_far, ops.fm_vote_reference(x, c[:2], 2, "l2", "soft"))
    one_near = ops.fm_vote(x, c, 3, "l2", "soft")
    assert torch.equal(one_near, torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64))
    assert torch.equal(one_near, ops.fm_vote_reference(x, c, 3, "l2", "soft"))


def test_temperature_whose_inverse_overflows_float32_is_rejected():
    x, c = fm_inputs(20, 6, 4, seed=22)
    for vote in (ops.fm_vote, ops.fm_vote_reference):
        with pytest.raises(ValueError, match=r"fm_vote: temperature=1e-40 is too small; expected a temperature "
                                             r"whose inverse is finite in float32 \(3e-39 or more\)"):
            vote(x, c, 2, "l2", "soft", 1e-40)
    # The smallest temperature allowed: every row's weight on its nearest centroid.
    votes = ops.fm_vote(x, c, 3, "l2", "soft", 3e-39)
    assert torch.equal(votes, ops.fm_vote_reference(x, c, 3, "l2", "soft", 3e-39))
    assert torch.equal(votes, ops.fm_vote(x, c, 1).double())


def order_sensitive_centroids(num, dim, seed):
    """Rows whose ||c||^2 rounds to float32 differently by the order of the float64
    additions: squares 1, 2^-24 (in d order their sum is the float32 midpoint
    1 + 2^-24, which rounds to even, 1) and dim - 2 squares of 2^-60, each lost
    against 1 in d order but summed with each other first in a warp's order,
    which tips the midpoint up. Each row scaled by 2^e, signs random."""
    g = gen(seed)
    c = torch.full((num, dim), 2.0 ** -30)
    c[:, 0], c[:, 1] = 1.0, 2.0 ** -12
    signs = torch.randint(0, 2, (num, dim), generator=g).float() * 2 - 1
    scale = torch.exp2(torch.randint(-20, 21, (num, 1), generator=g).float())
    return c * signs * scale


def warp_order_norms(c):
    """||c||^2 summed as a lane-strided warp sum and a butterfly (the old CUDA order)."""
    squares = c.double() ** 2
    lanes = torch.zeros(c.shape[0], 32, dtype=torch.float64)
    for d in range(c.shape[1]):
        lanes[:, d % 32] += squares[:, d]
    for offset in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[:, torch.arange(32) ^ offset]
    return lanes[:, 0]


def test_centroid_norms_are_summed_in_d_order():
    # A zero row's l2 values are the centroids' ||c||^2 as the kernels hold them:
    # float64 squares added in d order, rounded to float32 (the CUDA kernel too).
    c = torch.cat([order_sensitive_centroids(200, 512, seed=22), torch.randn(100, 512, generator=gen(22))])
    in_order = torch.zeros(c.shape[0], dtype=torch.float64)
    for d in range(c.shape[1]):
        in_order += c[:, d].double() ** 2
    values, indices = ops.nearest_centroids(torch.zeros(1, 512), c, c.shape[0], "l2")
    assert torch.equal(values[0], in_order.float()[indices[0]])
    # The data tells the orders apart: a warp-order sum rounds differently for some rows.
    assert (warp_order_norms(c).float() != in_order.float()).sum() > 0


def sixteen_lane_norms(x):
    """Float32 ||x||^2 per row in the CPU packing's order: dimension d added into
    partial d % 16 (a multiply, then an add), then the partials pairwise."""
    part = torch.zeros(len(x), 16)
    for d in range(x.shape[1]):
        part[:, d % 16] += x[:, d] * x[:, d]
    width = 8
    while width:
        part[:, :width] += part[:, width:2 * width].clone()
        width //= 2
    return part[:, 0]


def test_row_norms_are_summed_in_sixteen_lanes():
    # Against a zero centroid the l2 values are the rows' ||x||^2 as the tile kernel packs them: dimension
    # d added into float32 partial d % 16 (no FMA), then the partials pairwise. The CUDA fused kernel
    # (row_sqnorm_lanes) and the certified path sum in this order too, for bit-equal keys and cosine scales.
    x = torch.randn(1000, 77, generator=gen(23)) * 3
    values, _ = ops.nearest_centroids(x, torch.zeros(1, 77), 1, "l2")
    assert torch.equal(values[:, 0], sixteen_lane_norms(x))
    in_order = torch.zeros(len(x))
    for d in range(x.shape[1]):
        in_order += x[:, d] * x[:, d]
    assert not torch.equal(in_order, sixteen_lane_norms(x))  # the data tells the orders apart


# ---------------------------------------------------------------- packing

GROUP_SIZES = torch.arange(1, 71)  # one group of each size: every partial slab, in both halves


def grouped(n_groups, per_group):
    """row_starts for GROUP_SIZES, and centroid_starts for per_group centroids a group."""
    row_starts = torch.cat([torch.zeros(1, dtype=torch.long), GROUP_SIZES.cumsum(0)])
    return row_starts, torch.arange(n_groups + 1) * per_group


def strided_copy(x):
    """x with stride(1) != 1: packed by the scalar code under every kernel."""
    out = torch.empty(x.shape[1], x.shape[0], dtype=x.dtype).t()
    out.copy_(x)
    return out


def assert_same(a, b):
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("dim", [1, 3, 15, 16, 17, 33, 257, 512])
def test_vector_packing_writes_the_scalar_packings_bits(dim, monkeypatch):
    # The kernels' vectorised pack_slab (contiguous float32 rows) must write the slab bytes and norm bits
    # of the scalar packing, which packs every other layout and dtype, and everything under
    # FASTVOTE_CPU_KERNEL=portable. The same tile kernel on both packings gives equal bits unless the
    # slabs or norms differ. Rows are gathered through a permutation, as k-means' passes gather them.
    from conftest import cpu_kernels
    from fastvote import _C

    g = gen(24)
    n, groups = int(GROUP_SIZES.sum()), len(GROUP_SIZES)
    x = torch.randn(n, dim, generator=g) * 3
    order = torch.randperm(n, generator=g)
    c = torch.randn(3 * groups, dim, generator=g)
    row_starts, centroid_starts = grouped(groups, 3)
    norms = sixteen_lane_norms(x)
    # Against a basis vector e_j a cosine value is the packed x_j / ||x||, exactly.
    eye = torch.eye(dim)
    # 1.0f / max(sqrtf(norm), 1e-12f), rounded once each through float64 (torch's float32 sqrt and
    # division may be off by an ulp).
    inv = (1 / norms.double().sqrt().float().clamp_min(1e-12).double()).float()
    scaled = x * inv[:, None]
    # The float64 reference of the grouped l2 values.
    member = torch.repeat_interleave(torch.arange(groups), GROUP_SIZES)
    d2 = ((x[order].double()[:, None, :] - c.double().view(groups, 3, dim)[member]) ** 2).sum(-1)
    for kernel in cpu_kernels():
        monkeypatch.setenv("FASTVOTE_CPU_KERNEL", kernel)
        picks = _C.nearest_in_groups(x, order, row_starts, c, centroid_starts, 2)
        assert_same(picks, _C.nearest_in_groups(strided_copy(x), order, row_starts, c, centroid_starts, 2))
        torch.testing.assert_close(picks[0].double(), d2.sort(dim=1).values[:, :2],
                                   rtol=1e-5, atol=1e-5 * float(norms.max()))
        zero, _ = _C.nearest_in_groups(x, order, row_starts, torch.zeros(groups, dim), grouped(groups, 1)[1], 1)
        assert torch.equal(zero[:, 0], norms[order])
        for dtype in (torch.float64, torch.bfloat16):  # converted as static_cast<float> while packing
            assert_same(_C.nearest_in_groups(x.to(dtype), order, row_starts, c, centroid_starts, 2),
                        _C.nearest_in_groups(x.to(dtype).float(), order, row_starts, c, centroid_starts, 2))
        for metric in ("l2", "cosine"):
            for rows in (1, 16, 17, 31, 33, 70, n):
                assert_same(ops.nearest_centroids(x[:rows], c[:12], 3, metric),
                            ops.nearest_centroids(strided_copy(x[:rows]), c[:12], 3, metric))
            assert torch.equal(ops.fm_vote(x, c[:12], 3, metric, "rank"),
                               ops.fm_vote(strided_copy(x), c[:12], 3, metric, "rank"))
        values, indices = ops.nearest_centroids(x[:70], eye, dim, "cosine")
        assert torch.equal(values, scaled[:70].gather(1, indices))
        assert torch.equal(indices.sort(dim=1).values, torch.arange(dim).expand(70, dim))


@pytest.mark.parametrize("dim", [1, 17, 33, 512])
def test_rows_read_as_they_lie_give_the_packed_rows_bits(dim, monkeypatch):
    # nearest_in_groups reads contiguous float32 rows straight from memory on AVX-512 (GroupFn: no
    # packing), in blocks of 8 rows and 48 centroids; other layouts are packed for the tile kernel.
    # Both must give the same bits: groups of 1 to 130 centroids (a block's every remainder, several
    # blocks, a group larger than a 32-centroid slab), 1 to 1,100 rows (several 512-row tasks of one
    # group), near-ties (duplicated centroids), norms up to 1e15, k = 1, 2, 3 and k above a group's size.
    from conftest import cpu_kernels
    from fastvote import _C

    g = gen(26)
    sizes = [1, 2, 15, 16, 17, 31, 47, 48, 49, 64, 97, 130]
    rows_per = [3, 1, 9, 8, 17, 1100, 40, 7, 600, 33, 12, 520]
    c = torch.randn(sum(sizes), dim, generator=g)
    c[5] = c[4]  # a near-tie pair inside one group: the lower index must win
    centroid_starts = torch.tensor([0] + sizes).cumsum(0)
    n = sum(rows_per)
    x = torch.randn(n, dim, generator=g) * torch.logspace(-3, 15, n)[torch.randperm(n, generator=g)][:, None]
    x[:4] = c[4]  # rows exactly on a duplicated centroid
    order = torch.randperm(n, generator=g)
    row_starts = torch.tensor([0] + rows_per).cumsum(0)
    for kernel in cpu_kernels():
        monkeypatch.setenv("FASTVOTE_CPU_KERNEL", kernel)
        for k in (1, 2, 3, 200):
            direct = _C.nearest_in_groups(x, order, row_starts, c, centroid_starts, k)
            assert_same(direct, _C.nearest_in_groups(strided_copy(x), order, row_starts, c, centroid_starts, k))
            assert bool((direct[1][:, 0] >= 0).all())  # every row found a centroid of its group
        # the rows on centroid 4 = 5 (group 2's) take 4, then 5
        _, idx = _C.nearest_in_groups(x, torch.arange(4), torch.tensor([0, 0, 0] + [4] * 10), c, centroid_starts, 2)
        assert idx.tolist() == [[4, 5]] * 4


def test_keys_that_overflow_to_inf_rank_by_index(monkeypatch):
    # Finite rows and centroids whose keys |c|^2 - 2 x.c overflow to +inf: every candidate ties at inf, so
    # a row's list is its group's lowest indices, on both packings (the rows-as-they-lie kernel's lane
    # lists start as (+inf, empty), which an inf key must still displace).
    from conftest import cpu_kernels
    from fastvote import _C

    dim, big = 20, 1.5e19  # squares 2.25e38: finite; -2 x.c = 4.5e38: not
    c = torch.zeros(50, dim)
    c[:, 0] = big
    c[7] = 0.0  # one finite key in the second group
    x = torch.zeros(3, dim)
    x[:, 0] = -big
    centroid_starts, row_starts = torch.tensor([0, 5, 50]), torch.tensor([0, 1, 3])
    for kernel in cpu_kernels():
        monkeypatch.setenv("FASTVOTE_CPU_KERNEL", kernel)
        for k in (1, 2, 3):
            direct = _C.nearest_in_groups(x, torch.arange(3), row_starts, c, centroid_starts, k)
            assert_same(direct, _C.nearest_in_groups(strided_copy(x), torch.arange(3), row_starts, c,
                                                     centroid_starts, k))
            assert direct[1].tolist() == [[0, 1, 2][:k], [7, 5, 6][:k], [7, 5, 6][:k]]
            assert torch.isinf(direct[0][0]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e20])
def test_both_packings_report_the_first_bad_row(bad, monkeypatch):
    # NaN, Inf, or a square that overflows float32, in a partial slab's tail dimension: every kernel and
    # both packings name the same input row.
    from conftest import cpu_kernels
    from fastvote import _C

    g = gen(25)
    n, groups, dim = int(GROUP_SIZES.sum()), len(GROUP_SIZES), 17
    x = torch.randn(n, dim, generator=g)
    x[2000, 16] = bad
    order = torch.randperm(n, generator=g)
    c = torch.randn(groups, dim, generator=g)
    row_starts, centroid_starts = grouped(groups, 1)
    for kernel in cpu_kernels():
        monkeypatch.setenv("FASTVOTE_CPU_KERNEL", kernel)
        for features in (x, strided_copy(x)):
            with pytest.raises(ValueError, match="features row 2000 contains NaN or Inf"):
                _C.nearest_in_groups(features, order, row_starts, c, centroid_starts, 1)
            with pytest.raises(ValueError, match="features row 2000 contains NaN or Inf"):
                ops.nearest_centroids(features, c, 1, "cosine")
