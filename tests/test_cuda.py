"""The CUDA backend (csrc/cuda) against the CPU backend (torch.ops.fastvote on
CPU tensors) and the float64 references (fastvote.ops.*_reference).

tests/test_ops.py already runs every op on CUDA with the shapes and errors of
the foundation issue; this file covers what is specific to the GPU kernels:
row tiles x centroid tiles, centroids split across blocks and merged, shared
vs global vote histograms, the sorted path for k > 64, float votes equal to
the CPU's bit for bit (one 32.32 fixed point), deterministic scores, K > 65,535, N * K >
2^31 (64-bit indexing), low-precision and strided inputs, determinism, the
current stream, and the errors raised after the kernels (NaN/Inf rows).

Comparisons, as in test_ops.py: integer-valued inputs make float32 arithmetic
exact, so CUDA, CPU and the reference must be EQUAL, ties included; on random
floats picks are compared on the rows without near-ties (where float32
rounding may legitimately reorder), and values within float32 tolerance.
"""
import contextlib
import os

import pytest
import torch

import fastvote.ops as ops

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: the CUDA backend is checked on a GPU machine by benchmarks/gpu_check.sh")
# `gpu_check.sh --rehearse` runs this file with CUDA faked onto the CPU
# (benchmarks/fake_cuda.py): every test's own logic runs, against the CPU
# kernels. These tests mean something only on the real device.
device_only = pytest.mark.skipif(os.environ.get("FASTVOTE_FAKE_CUDA") == "1",
                                 reason="CUDA faked onto the CPU: needs the real device")

OPS = ("lm_vote", "fm_vote", "nearest_centroids", "class_centroids", "lm_scores", "fm_scores")
LOW = [torch.float32, torch.float16, torch.bfloat16]
# (N, K, D, k): D = 1, D = 67, K = 1, k = K, N = 1, N = 0, row/centroid tile edges (128).
SHAPES = [
    (1, 1, 1, 1), (0, 5, 3, 2), (1, 7, 5, 3), (37, 1, 67, 1), (50, 13, 1, 13), (129, 128, 67, 5),
    (300, 129, 16, 7), (257, 300, 130, 64), (1000, 40, 67, 2),
]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def cuda(*tensors):
    return [t.cuda() for t in tensors]


def cpu_op(name, *args):
    """The CPU backend itself (CPU tensors dispatch to it)."""
    return getattr(torch.ops.fastvote, name)(*[a.cpu() if torch.is_tensor(a) else a for a in args])


def integer_inputs(n, num, dim, seed, low=-3, high=4):
    g = gen(seed)
    return (torch.randint(low, high, (n, dim), generator=g).float(),
            torch.randint(low, high, (num, dim), generator=g).float())


def reference_keys(x, c, metric):
    """[N, K] float64 keys of the reference (smaller is better)."""
    if x.shape[0] == 0:
        return torch.zeros(0, c.shape[0], dtype=torch.float64)
    return torch.cat([keys for _, keys in ops._reference_keys(x.cpu(), c.cpu(), metric)])


def key_tolerance(x, c, metric):
    """Per-row float32 rounding of a key, [N, 1] (or a scalar for cosine)."""
    if metric == "cosine":
        return 1e-5
    x2 = x.cpu().double().pow(2).sum(1, keepdim=True)
    return 1e-5 * (x2 + c.cpu().double().pow(2).sum(1).max())


def clear_rows(x, c, k, metric):
    """Rows whose first k + 1 reference keys are pairwise further apart than
    float32 rounding: their top-k and its order are the same in any precision."""
    keys = reference_keys(x, c, metric)
    top = torch.sort(keys, dim=1).values[:, :k + 1]
    if top.shape[1] < 2:
        return torch.ones(x.shape[0], dtype=torch.bool)
    return (top.diff(dim=1) > 2 * key_tolerance(x, c, metric)).all(1)


# ---------------------------------------------------------------- registration

@device_only
def test_cuda_kernels_are_registered():
    from fastvote import _C

    assert _C.with_cuda, "fastvote._C was built without its CUDA sources"
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvote::{name}", "CUDA"), name


# ---------------------------------------------------------------- fm_vote / nearest_centroids

@pytest.mark.parametrize("n,num,dim,k", SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_integer_inputs_equal_cpu_and_reference(n, num, dim, k, metric):
    x, c = integer_inputs(n, num, dim, seed=n + 7 * num + dim)
    values, indices = ops.nearest_centroids(*cuda(x, c), k, metric)
    ref_values, ref_indices = ops.nearest_centroids_reference(x, c, k, metric)
    cpu_values, cpu_indices = cpu_op("nearest_centroids", x, c, k, metric)
    votes = ops.fm_vote(*cuda(x, c), k, metric).cpu()
    assert votes.dtype == torch.int64 and int(votes.sum()) == n * k
    # CUDA and CPU run the same float32 arithmetic: equal for either metric.
    assert torch.equal(indices.cpu(), cpu_indices)
    assert torch.equal(votes, cpu_op("fm_vote", x, c, k, metric, "count", 1.0))
    if metric == "l2":  # exact in float32
        assert torch.equal(indices.cpu(), ref_indices)
        assert torch.equal(values.cpu(), ref_values)
        assert torch.equal(votes, ops.fm_vote_reference(x, c, k, metric))
    else:
        torch.testing.assert_close(values.cpu(), ref_values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n,num,dim,k", SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", LOW)
def test_random_inputs_match_cpu_and_reference(n, num, dim, k, metric, dtype):
    g = gen(n * 31 + num + dim)
    x = torch.randn(n, dim, generator=g).to(dtype)
    c = torch.randn(num, dim, generator=g).to(dtype)
    values, indices = ops.nearest_centroids(*cuda(x, c), k, metric)
    values, indices = values.cpu(), indices.cpu()
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (n, k)
    keys = reference_keys(x, c, metric)
    # Values are the keys of the picked centroids (distances / similarities).
    picked = keys.gather(1, indices)
    expected = picked if metric == "l2" else -picked
    assert ((values.double() - expected).abs() <= key_tolerance(x, c, metric)).all()
    clear = clear_rows(x, c, k, metric)
    ref_indices = ops.nearest_centroids_reference(x, c, k, metric)[1]
    assert torch.equal(indices[clear], ref_indices[clear])
    assert torch.equal(indices[clear], cpu_op("nearest_centroids", x, c, k, metric)[1][clear])
    xc = x[clear]
    for weight in ("count", "rank", "soft"):
        votes = ops.fm_vote(*cuda(xc, c), k, metric, weight, 0.5).cpu()
        ref = ops.fm_vote_reference(xc, c, k, metric, weight, 0.5)
        assert votes.dtype == ref.dtype
        if weight == "count":
            assert torch.equal(votes, ref)
            assert torch.equal(votes, cpu_op("fm_vote", xc, c, k, metric, weight, 0.5))
        else:
            torch.testing.assert_close(votes, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(votes, cpu_op("fm_vote", xc, c, k, metric, weight, 0.5),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["strided", "transposed", "offset"])
@pytest.mark.parametrize("dtype", LOW + [torch.float64])
def test_any_strides(layout, dtype):
    g = gen(3)
    if layout == "strided":
        x = torch.randn(2 * 301, 3 * 45, generator=g).to(dtype)[::2, ::3]
        c = torch.randn(45, 2 * 150, generator=g).to(dtype).t()[::2]
    elif layout == "transposed":  # stride(0) == 1: the kernel loads rows fastest
        x = torch.randn(45, 301, generator=g).to(dtype).t()
        c = torch.randn(45, 150, generator=g).to(dtype).t()
    else:  # storage offsets that break 16-byte alignment
        x = torch.randn(301 * 45 + 1, generator=g).to(dtype)[1:].view(301, 45)
        c = torch.randn(150 * 45 + 3, generator=g).to(dtype)[3:].view(150, 45)
    for metric in ("l2", "cosine"):
        clear = clear_rows(x, c, 4, metric)
        _, indices = ops.nearest_centroids(*cuda(x, c), 4, metric)
        assert torch.equal(indices.cpu()[clear],
                           ops.nearest_centroids_reference(x, c, 4, metric)[1][clear])
        assert torch.equal(ops.fm_vote(*cuda(x[clear], c), 4, metric).cpu(),
                           ops.fm_vote_reference(x[clear], c, 4, metric))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_duplicate_centroids_lower_index_wins(metric):
    # Twins 1000 apart: in other centroid tiles, and in other splits of the centroids.
    g = gen(7)
    base = torch.randn(1000, 33, generator=g)
    c = torch.cat([base, base, base])
    x = torch.randn(300, 33, generator=g)
    values, indices = ops.nearest_centroids(*cuda(x, c), 3, metric)
    indices = indices.cpu()
    assert (indices[:, 0] < 1000).all()
    assert torch.equal(indices[:, 1], indices[:, 0] + 1000)
    assert torch.equal(indices[:, 2], indices[:, 0] + 2000)
    assert (values[:, 0] == values[:, 2]).all()


def test_many_centroids_split_across_blocks():
    # K > 65,535, few rows: each row's centroids are split over many blocks and merged.
    for n, num, k in ((1, 70_000, 5), (3, 100_000, 64), (300, 70_001, 1), (3000, 70_000, 5)):
        x, c = integer_inputs(n, num, 8, seed=num + n)
        values, indices = ops.nearest_centroids(*cuda(x, c), k, "l2")
        cpu_values, cpu_indices = cpu_op("nearest_centroids", x, c, k, "l2")
        assert torch.equal(indices.cpu(), cpu_indices) and torch.equal(values.cpu(), cpu_values)
        assert torch.equal(ops.fm_vote(*cuda(x, c), k).cpu(), cpu_op("fm_vote", x, c, k, "l2", "count", 1.0))


def test_ties_across_many_centroids():
    # 70,000 centroids, 700 copies of 100: the lowest copies win, in index order.
    g = gen(8)
    base = torch.randint(-2, 3, (100, 6), generator=g).float()
    c = base.repeat(700, 1)
    x = torch.randint(-2, 3, (500, 6), generator=g).float()
    _, indices = ops.nearest_centroids(*cuda(x, c), 5, "l2")
    assert torch.equal(indices.cpu(), cpu_op("nearest_centroids", x, c, 5, "l2")[1])
    assert torch.equal(indices.cpu(), ops.nearest_centroids_reference(x, base.repeat(5, 1), 5, "l2")[1])


@pytest.mark.parametrize("weight", ["count", "rank", "soft"])
def test_histogram_beyond_shared_memory(weight):
    # K > 6144 bins: votes go straight to global memory; many votes per bin.
    x, c = integer_inputs(50_000, 10_000, 4, seed=1, low=-5, high=6)
    votes = ops.fm_vote(*cuda(x, c), 3, "l2", weight).cpu()
    expected = cpu_op("fm_vote", x, c, 3, "l2", weight, 1.0)
    if weight == "count":
        assert torch.equal(votes, expected)
    else:
        torch.testing.assert_close(votes, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [65, 100, 300])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_k_above_64_takes_the_sorted_path(k, metric):
    x, c = integer_inputs(200, 300, 9, seed=k)
    values, indices = ops.nearest_centroids(*cuda(x, c), k, metric)
    cpu_values, cpu_indices = cpu_op("nearest_centroids", x, c, k, metric)
    if metric == "l2":
        assert torch.equal(indices.cpu(), cpu_indices) and torch.equal(values.cpu(), cpu_values)
    torch.testing.assert_close(values.cpu(), cpu_values, rtol=0, atol=1e-5)
    # l2 keys of integer inputs are exact; cosine ones only away from near-ties.
    rows = torch.ones(len(x), dtype=torch.bool) if metric == "l2" else clear_rows(x, c, k, metric)
    assert torch.equal(indices.cpu()[rows], cpu_indices[rows])
    for weight in ("count", "rank", "soft"):
        votes = ops.fm_vote(*cuda(x[rows], c), k, metric, weight).cpu()
        ref = ops.fm_vote_reference(x[rows], c, k, metric, weight)
        if weight == "count":
            assert torch.equal(votes, ref)
        else:
            torch.testing.assert_close(votes, ref, rtol=1e-5, atol=1e-5)


@device_only
def test_fm_index_overflow():
    # N * K > 2^31 with no N x K buffer.
    num = 70_000
    n = 2**31 // num + 7
    x, c = integer_inputs(n, num, 4, seed=2, low=-4, high=5)
    assert n * num > 2**31
    values, indices = ops.nearest_centroids(*cuda(x, c), 2, "l2")
    cpu_values, cpu_indices = cpu_op("nearest_centroids", x, c, 2, "l2")
    assert torch.equal(indices.cpu(), cpu_indices) and torch.equal(values.cpu(), cpu_values)
    assert torch.equal(ops.fm_vote(*cuda(x, c), 2).cpu(), cpu_op("fm_vote", x, c, 2, "l2", "count", 1.0))


@device_only
def test_no_rows_by_centroids_buffer():
    x = torch.randn(200_000, 32, device="cuda")
    c = torch.randn(2000, 32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ops.fm_vote(x, c, 5, "cosine", "soft")
    ops.nearest_centroids(x, c, 1, "l2")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 16 * 2**20, f"{extra / 2**20:.0f} MB of workspace (N x K would be 1600 MB)"


# ---------------------------------------------------------------- lm_vote / lm_scores

def lm_layouts(logits):
    """The same values as contiguous rows, unaligned rows, a column slice and transposed."""
    n, num = logits.shape
    return {
        "contiguous": logits,
        "offset": torch.cat([logits.new_zeros(1), logits.reshape(-1)])[1:].view(n, num),
        "sliced": torch.cat([logits, logits], 1)[:, :num],
        "transposed": logits.t().contiguous().t(),
    }


@pytest.mark.parametrize("dtype", LOW + [torch.float64])
@pytest.mark.parametrize("n,num", [(1, 1), (0, 4), (100, 10), (333, 1000), (64, 7000), (20, 257)])
def test_lm_vote_matches_reference(dtype, n, num):
    # Few distinct values: many exact ties, which only the tie rule decides.
    logits = torch.randint(-3, 4, (n, num), generator=gen(n + num)).to(dtype)
    layouts = lm_layouts(logits)
    # Every k is clamped to K: k=2 with K=1 is an argument error, not a vote.
    for k in sorted({1, min(2, num), min(7, num), min(64, num), min(65, num)}):
        for weight in ("count", "rank", "soft"):
            ref = ops.lm_vote_reference(logits, k, weight)
            for layout, t in layouts.items():
                votes = ops.lm_vote(t.cuda(), k, weight).cpu()
                assert votes.dtype == ref.dtype, (layout, k, weight)
                if weight == "count":
                    assert torch.equal(votes, ref), (layout, k)
                    assert torch.equal(votes, cpu_op("lm_vote", t, k, weight)), (layout, k)
                else:
                    torch.testing.assert_close(votes, ref, rtol=1e-5, atol=1e-5)


def test_lm_vote_ties_lower_index_wins():
    logits = torch.zeros(5, 300)
    logits[1, [2, 250]] = 1.0
    logits[2, [0, 2, 3, 299]] = 3.0
    votes = ops.lm_vote(logits.cuda(), 1).cpu()
    assert votes[0] == 4 and votes[2] == 1 and int(votes.sum()) == 5
    votes3 = ops.lm_vote(logits.cuda(), 3).cpu()
    assert torch.equal(votes3, ops.lm_vote_reference(logits, 3))


@device_only
@pytest.mark.parametrize("num", [1000, 999])  # rows 16-byte aligned (vector loads) or not
def test_lm_index_overflow(num):
    # N * K > 2^31: one-hot rows whose hot class is known, so the votes are too.
    n = 2**31 // num + 5
    if torch.cuda.mem_get_info()[0] < n * num * 2 + 2**31:
        pytest.skip("needs ~5 GB of free GPU memory")
    rows = torch.arange(n, device="cuda")
    hot = rows * 7919 % num
    logits = torch.zeros(n, num, dtype=torch.float16, device="cuda")
    logits[rows, hot] = 1.0
    expected = torch.bincount(hot, minlength=num).cpu()
    assert torch.equal(ops.lm_vote(logits, 1).cpu(), expected)
    second = (hot == 0).long()  # the best of the zeros: class 0, or 1 when 0 is hot
    assert torch.equal(ops.lm_vote(logits, 2).cpu(), expected + torch.bincount(second, minlength=num).cpu())
    # Mean softmax: e / (e + K - 1) on the hot class, 1 / (e + K - 1) elsewhere.
    e = torch.tensor(1.0, dtype=torch.float64).exp()
    scores = (expected.double() * e + (n - expected.double())) / (n * (e + num - 1))
    torch.testing.assert_close(ops.lm_scores(logits).cpu(), scores, rtol=1e-5, atol=0)
    del logits


@pytest.mark.parametrize("dtype", LOW + [torch.float64])
def test_lm_scores(dtype):
    logits = (torch.randn(3000, 1001, generator=gen(5)) * 4).to(dtype)
    for layout, t in lm_layouts(logits).items():
        scores = ops.lm_scores(t.cuda()).cpu()
        assert scores.dtype == torch.float64
        torch.testing.assert_close(scores, ops.lm_scores_reference(logits), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(scores, cpu_op("lm_scores", t), rtol=1e-5, atol=1e-9)
    assert torch.equal(ops.lm_scores(torch.zeros(0, 3, device="cuda")).cpu(),
                       torch.zeros(3, dtype=torch.float64))


# ---------------------------------------------------------------- fm_scores / class_centroids

@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n", [0, 1, 5000])
def test_fm_scores(metric, dtype, n):
    g = gen(n)
    x = torch.randn(n, 67, generator=g).to(dtype)
    c = torch.randn(300, 67, generator=g).to(dtype)
    scores = ops.fm_scores(*cuda(x, c), metric).cpu()
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, ops.fm_scores_reference(x, c, metric), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, cpu_op("fm_scores", x, c, metric), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("num_classes,ordered", [(13, False), (200, True), (7000, False), (7000, True)])
def test_class_centroids(label_dtype, dtype, num_classes, ordered):
    if label_dtype == torch.uint8 and num_classes > 256:
        pytest.skip("uint8 labels reach 255")
    g = gen(num_classes)
    x = torch.randn(20_000, 2 * 67, generator=g).to(dtype)[:, ::2]
    labels = torch.randint(0, min(num_classes, 256), (20_000,), generator=g)
    if num_classes > 256:
        labels = torch.randint(0, num_classes, (20_000,), generator=g)
    if ordered:
        labels = labels.sort().values
    labels = labels.to(label_dtype)
    sums, counts = ops.class_centroids(*cuda(x, labels), num_classes)
    ref_sums, ref_counts = ops.class_centroids_reference(x, labels, num_classes)
    assert sums.dtype == torch.float64 and counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), ref_counts)
    torch.testing.assert_close(sums.cpu(), ref_sums, rtol=1e-12, atol=1e-9)


# ---------------------------------------------------------------- errors

def with_value(t, row, value):
    t = t.clone()
    t[row, 1] = value
    return t


def _x(*shape):
    return torch.randn(*shape, generator=gen(sum(shape)))


NON_FINITE = [
    ("nan features", lambda: ops.fm_vote(with_value(_x(3000, 5), 1234, float("nan")).cuda(), _x(3, 5).cuda()),
     ["fm_vote", "features row 1234"]),
    ("two bad rows", lambda: ops.fm_vote(with_value(with_value(_x(3000, 5), 2500, float("nan")), 1300, float("inf")).cuda(),
                                         _x(300, 5).cuda(), 2, "cosine", "soft"), ["features row 1300"]),
    ("inf features", lambda: ops.nearest_centroids(with_value(_x(40, 5), 7, float("inf")).cuda(), _x(3, 5).cuda()),
     ["nearest_centroids", "features row 7"]),
    ("huge features", lambda: ops.fm_vote(with_value(_x(40, 5), 8, 1e30).cuda(), _x(3, 5).cuda()), ["features row 8"]),
    ("nan features, k > 64", lambda: ops.fm_vote(with_value(_x(400, 5), 77, float("nan")).cuda(), _x(100, 5).cuda(), 70),
     ["features row 77"]),
    ("centroids first", lambda: ops.fm_vote(with_value(_x(40, 5), 3, float("nan")).cuda(),
                                            with_value(_x(9, 5), 2, float("nan")).cuda()), ["centroids row 2"]),
    ("nan centroids, N = 0", lambda: ops.fm_scores(_x(0, 5).cuda(), with_value(_x(9, 5), 4, float("nan")).cuda()),
     ["centroids row 4"]),
    ("nan logits", lambda: ops.lm_vote(with_value(_x(2000, 50), 1500, float("nan")).cuda()), ["lm_vote", "logits row 1500"]),
    ("nan logits k=5", lambda: ops.lm_vote(with_value(_x(2000, 50), 1501, float("nan")).cuda(), 5), ["logits row 1501"]),
    ("inf logits strided", lambda: ops.lm_vote(with_value(_x(2000, 50), 1502, float("-inf")).t().contiguous().t().cuda(), 3),
     ["logits row 1502"]),
    ("nan logits k > 64", lambda: ops.lm_vote(with_value(_x(200, 100), 99, float("nan")).cuda(), 70, "rank"), ["logits row 99"]),
    ("inf lm_scores", lambda: ops.lm_scores(with_value(_x(20, 5), 3, float("inf")).cuda()), ["lm_scores", "logits row 3"]),
    ("nan fm_scores", lambda: ops.fm_scores(with_value(_x(20, 5), 4, float("nan")).cuda(), _x(3, 5).cuda(), "cosine"),
     ["fm_scores", "features row 4"]),
    ("nan class_centroids", lambda: ops.class_centroids(with_value(_x(20, 5), 5, float("nan")).cuda(),
                                                        torch.zeros(20, dtype=torch.long, device="cuda"), 1),
     ["class_centroids", "features row 5"]),
]


@pytest.mark.parametrize("what,call,words", NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_non_finite_inputs_raise(what, call, words):
    with pytest.raises(ValueError) as info:
        call()
    for w in words + ["NaN or Inf"]:
        assert w in str(info.value), f"{w!r} missing from: {info.value}"


def test_label_errors_come_first():
    x = with_value(_x(6, 5), 1, float("nan")).cuda()  # also a bad row: labels are checked first
    with pytest.raises(IndexError, match=r"labels\[2\]=7.*num_classes=3"):
        ops.class_centroids(x, torch.tensor([0, 1, 7, 1, -1, 9], device="cuda"), 3)
    with pytest.raises(IndexError, match=r"labels\[1\]=-1"):
        ops.class_centroids(x[:3], torch.tensor([0, -1, 0], dtype=torch.int32, device="cuda"), 3)


@device_only
def test_device_mismatch():
    with pytest.raises(ValueError, match="same device"):
        torch.ops.fastvote.fm_vote(_x(4, 5).cuda(), _x(3, 5), 1, "l2", "count", 1.0)
    with pytest.raises(ValueError, match="same device"):
        torch.ops.fastvote.nearest_centroids(_x(4, 5), _x(3, 5).cuda(), 1, "l2")
    with pytest.raises(ValueError, match="same device"):
        torch.ops.fastvote.class_centroids(_x(4, 5).cuda(), torch.zeros(4, dtype=torch.long), 2)


def test_the_op_still_works_after_an_error():
    with pytest.raises(ValueError):
        ops.fm_vote(with_value(_x(40, 5), 3, float("nan")).cuda(), _x(3, 5).cuda())
    x, c = integer_inputs(40, 3, 5, seed=1)
    assert torch.equal(ops.fm_vote(*cuda(x, c)).cpu(), ops.fm_vote_reference(x, c))


# ---------------------------------------------------------------- execution

def test_votes_are_deterministic():
    g = gen(12)
    x = torch.randn(20_000, 24, generator=g).cuda()
    c = torch.randn(3000, 24, generator=g).cuda()
    logits = torch.randn(20_000, 3000, generator=g).cuda()
    for weight in ("count", "rank", "soft"):
        runs = [ops.fm_vote(x, c, 5, "l2", weight) for _ in range(3)]
        assert all(torch.equal(runs[0], r) for r in runs[1:]), weight
        runs = [ops.fm_vote(x[:5], c, 5, "cosine", weight) for _ in range(3)]  # split centroids
        assert all(torch.equal(runs[0], r) for r in runs[1:]), weight
        runs = [ops.lm_vote(logits, 5, weight) for _ in range(3)]
        assert all(torch.equal(runs[0], r) for r in runs[1:]), weight


# ---------------------------------------------------------------- issue 16: one fixed point

FIXED_ONE = 2.0 ** 32


def fm_cases():
    """(features, centroids) on the CPU for each loader layout of the fused
    kernel: vector loads (D % 4 == 0), scalar rows (D = 67), transposed."""
    g = gen(16)
    yield "rows4", torch.randn(3000, 64, generator=g), torch.randn(300, 64, generator=g)
    yield "rows", torch.randn(3000, 67, generator=g), torch.randn(300, 67, generator=g)
    yield "cols", torch.randn(67, 3000, generator=g).t(), torch.randn(300, 67, generator=g)
    x, c = integer_inputs(1000, 500, 13, seed=16)
    yield "integer", x, c


@pytest.mark.parametrize("k", [1, 5, 64, 100])
@pytest.mark.parametrize("weight", ["rank", "soft"])
def test_float_votes_equal_the_cpu_bitwise(k, weight):
    # Same keys (one fmaf chain in d order), same weights (topk.h's row_weights
    # and vote_exp), same 32.32 fixed point and conversion: the same bits.
    for name, x, c in fm_cases():
        for metric in ("l2", "cosine"):
            votes = ops.fm_vote(*cuda(x, c), k, metric, weight, 0.5).cpu()
            expected = cpu_op("fm_vote", x, c, k, metric, weight, 0.5)
            assert torch.equal(votes, expected), (name, metric)
    logits = torch.randn(2000, 700, generator=gen(17)) * 3
    for layout in (logits, logits.t().contiguous().t()):
        assert torch.equal(ops.lm_vote(layout.cuda(), k, weight).cpu(), cpu_op("lm_vote", layout, k, weight))


@pytest.mark.parametrize("k", [5, 100])
def test_float_votes_are_fixed_point_and_repeatable(k):
    # k > 64 (the sorted path) uses the fused path's fixed point too.
    x, c = (t.cuda() for t in integer_inputs(5000, 400, 12, seed=k))
    for weight in ("rank", "soft"):
        runs = [ops.fm_vote(x, c, k, "l2", weight) for _ in range(3)]
        assert all(torch.equal(runs[0], r) for r in runs[1:]), weight
        assert torch.equal(runs[0] * FIXED_ONE, torch.round(runs[0] * FIXED_ONE)), weight


@pytest.mark.parametrize("num,k", [(6144, 30), (6144, 64), (6145, 5), (1000, 40)])
@pytest.mark.parametrize("weight", ["count", "soft"])
def test_shared_or_global_histogram_gives_the_cpu_votes(num, k, weight):
    # The launcher keeps a shared histogram only where it costs no resident blocks.
    x, c = integer_inputs(20_000, num, 8, seed=num + k, low=-4, high=5)
    votes = ops.fm_vote(*cuda(x, c), k, "l2", weight).cpu()
    assert torch.equal(votes, cpu_op("fm_vote", x, c, k, "l2", weight, 1.0))
    logits = torch.randint(-50, 50, (3000, num), generator=gen(num)).float()
    assert torch.equal(ops.lm_vote(logits.cuda(), k, weight).cpu(), cpu_op("lm_vote", logits, k, weight))


def test_scores_are_deterministic():
    # Per-block partials added in block order: no float64 atomics (on the CPU,
    # under `gpu_check.sh --rehearse`: fixed row groups, whatever the threads).
    g = gen(18)
    x = torch.randn(50_000, 40, generator=g).cuda()
    c = torch.randn(300, 40, generator=g).cuda()
    logits = torch.randn(50_000, 300, generator=g).cuda()
    for metric in ("l2", "cosine"):
        runs = [ops.fm_scores(x, c, metric) for _ in range(3)]
        assert all(torch.equal(runs[0], r) for r in runs[1:]), metric
    runs = [ops.lm_scores(logits) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


# ---------------------------------------------------------------- issue 22: CPU == CUDA, reproducible, no NaN

def order_sensitive_centroids(num, dim, seed):
    """Rows whose ||c||^2 rounds to float32 differently by the order of the
    float64 additions (tests/test_ops_determinism.py builds and checks them):
    squares 1, 2^-24 and dim - 2 of 2^-60, scaled by 2^e, random signs."""
    g = gen(seed)
    c = torch.full((num, dim), 2.0 ** -30)
    c[:, 0], c[:, 1] = 1.0, 2.0 ** -12
    signs = torch.randint(0, 2, (num, dim), generator=g).float() * 2 - 1
    return c * signs * torch.exp2(torch.randint(-20, 21, (num, 1), generator=g).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_centroid_norms_are_the_cpus(dtype):
    # A zero row's l2 values are the centroids' ||c||^2: float64 squares added in
    # d order on both backends (the CUDA kernel used to add them lane-strided).
    c = torch.cat([order_sensitive_centroids(300, 512, seed=22), torch.randn(100, 512, generator=gen(22))])
    for centroids in (c.to(dtype), c.to(dtype).t().contiguous().t()):  # as is, and a float32 copy
        x = torch.zeros(1, 512, dtype=dtype)
        values, indices = ops.nearest_centroids(*cuda(x, centroids), len(c), "l2")
        cpu_values, cpu_indices = cpu_op("nearest_centroids", x, centroids, len(c), "l2")
        assert torch.equal(values.cpu(), cpu_values) and torch.equal(indices.cpu(), cpu_indices)


@pytest.mark.parametrize("n,num_classes,ordered", [
    (100_000, 1, False),      # one class through every chunk
    (100_003, 3, True),       # sorted: classes straddle chunk edges
    (50_000, 7000, False),    # many small classes, most inside one chunk
    (40, 5, False),           # fewer rows than a chunk
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_centroids_are_reproducible(n, num_classes, ordered, dtype):
    # Fixed-order partials (rows in label order, chunked by N alone): the same
    # bits on every call, unlike float64 atomics; close to the float64 reference.
    g = gen(n + num_classes)
    x = (torch.randn(n, 2 * 33, generator=g) * 100).to(dtype)[:, ::2]  # D = 33, strided
    labels = torch.randint(0, num_classes, (n,), generator=g)
    if ordered:
        labels = labels.sort().values
    xc, lc = cuda(x, labels)
    runs = [ops.class_centroids(xc, lc, num_classes + 2) for _ in range(3)]  # two empty classes
    for sums, counts in runs[1:]:
        assert torch.equal(sums.view(torch.int64), runs[0][0].view(torch.int64))
        assert torch.equal(counts, runs[0][1])
    ref_sums, ref_counts = ops.class_centroids_reference(x, labels, num_classes + 2)
    assert torch.equal(runs[0][1].cpu(), ref_counts)
    torch.testing.assert_close(runs[0][0].cpu(), ref_sums, rtol=1e-12, atol=1e-9)
    assert (runs[0][0][-2:] == 0).all()


def test_soft_votes_of_overflowing_keys_are_numbers():
    # Finite inputs whose l2 keys overflow float32: equal keys weigh alike, never NaN.
    x = torch.tensor([[1.8e19], [1.8e19]])
    c = torch.tensor([[-1.8e19], [-1.8e19], [1.8e19]])
    both_far = ops.fm_vote(*cuda(x, c[:2]), 2, "l2", "soft").cpu()
    assert torch.equal(both_far, torch.tensor([1.0, 1.0], dtype=torch.float64))
    one_near = ops.fm_vote(*cuda(x, c), 3, "l2", "soft").cpu()
    assert torch.equal(one_near, torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64))
    # k > 64 takes the sorted path: 72 keys of +inf, 70 picks of equal weight, as on the CPU.
    far = torch.full((72, 1), -1.8e19)
    votes = ops.fm_vote(*cuda(x, far), 70, "l2", "soft").cpu()
    assert torch.equal(votes, cpu_op("fm_vote", x, far, 70, "l2", "soft", 1.0))
    assert abs(float(votes.sum()) - 2) < 1e-6 and (votes[70:] == 0).all()
    with pytest.raises(ValueError, match="temperature=1e-40 is too small"):
        ops.fm_vote(*cuda(x, c), 2, "l2", "soft", 1e-40)


@device_only
def test_both_fp32_layouts_give_the_cpus_votes(monkeypatch):
    # FASTVOTE_CUDA_LAYOUT pins vector loads (rows4, the default) or scalar rows:
    # the same fmaf chain either way, so the same votes as the CPU's.
    x, c = (torch.randn(3000, 64, generator=gen(23)), torch.randn(300, 64, generator=gen(24)))
    expected = cpu_op("fm_vote", x, c, 5, "l2", "soft", 0.5)
    for layout in ("rows4", "rows"):
        monkeypatch.setenv("FASTVOTE_CUDA_LAYOUT", layout)
        assert torch.equal(ops.fm_vote(*cuda(x, c), 5, "l2", "soft", 0.5).cpu(), expected), layout
    monkeypatch.setenv("FASTVOTE_CUDA_LAYOUT", "cols")
    with pytest.raises(ValueError, match="FASTVOTE_CUDA_LAYOUT=cols is unknown; expected 'rows4'"):
        ops.fm_vote(*cuda(x, c), 5)


def test_class_centroids_with_no_feature_columns():
    # D = 0, N > 0: counts only, no empty grid launched.
    labels = torch.tensor([0, 2, 2, 1, 2]).cuda()
    sums, counts = ops.class_centroids(torch.zeros(5, 0).cuda(), labels, 4)
    assert sums.shape == (4, 0) and sums.dtype == torch.float64
    assert counts.cpu().tolist() == [1, 1, 3, 0]


def test_runs_on_the_current_stream():
    x, c = integer_inputs(5000, 300, 16, seed=4)
    x, c = cuda(x, c)
    expected = ops.fm_vote(x, c, 3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        votes = ops.fm_vote(x, c, 3, "l2")
        values, indices = ops.nearest_centroids(x, c, 3)
        lm = ops.lm_vote(x @ c.t(), 2)
    stream.synchronize()
    assert torch.equal(votes, expected)
    assert torch.equal(torch.bincount(indices.reshape(-1), minlength=300), expected)
    assert int(lm.sum()) == 2 * 5000


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    x, c = integer_inputs(500, 40, 16, seed=6)
    with torch.cuda.device(0):
        votes = ops.fm_vote(x.to("cuda:1"), c.to("cuda:1"), 3)
    assert votes.device == torch.device("cuda:1")
    assert torch.equal(votes.cpu(), ops.fm_vote_reference(x, c, 3))


OPCHECK_CASES = [
    ("lm_vote", lambda: (_x(20, 7).cuda(), 3, "count")),
    ("lm_vote", lambda: (_x(20, 70).cuda(), 66, "soft")),
    ("fm_vote", lambda: (_x(20, 9).cuda(), _x(6, 9).cuda(), 2, "cosine", "rank", 1.0)),
    ("nearest_centroids", lambda: (_x(20, 9).cuda(), _x(6, 9).cuda(), 3, "l2")),
    ("class_centroids", lambda: (_x(20, 9).cuda(), torch.randint(0, 4, (20,), device="cuda"), 4)),
    ("lm_scores", lambda: (_x(20, 7).cuda(),)),
    ("fm_scores", lambda: (_x(20, 9).cuda(), _x(6, 9).cuda(), "cosine")),
]


@device_only  # opcheck's traces would meet the real device's fake tensors
@pytest.mark.parametrize("name,make", OPCHECK_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(OPCHECK_CASES)])
def test_opcheck(name, make):
    torch.library.opcheck(getattr(torch.ops.fastvote, name).default, make())


# ---------------------------------------------------------------- sample_scores (NormSim)
# csrc/cuda/sample_kernel.cu: RMS from the targets' float64 Gram matrix (M >= D)
# or the chunk's similarities (M < D), top-k from the fused nearest kernel.

def test_sample_scores_is_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastvote::sample_scores", "CUDA")


@pytest.mark.parametrize("n,m,dim,k", [(1, 1, 1, 1), (0, 5, 3, 2), (300, 40, 67, 5), (257, 300, 130, 64),
                                       (129, 12, 512, 12), (1000, 129, 16, 100)])
@device_only  # the CUDA kernel's own claims (float64 RMS, its tie order); faked, the CPU kernel stands in
def test_sample_scores_match_cpu_and_float64(n, m, dim, k):
    x, t = _x(n, dim), _x(m, dim)
    values, indices, rms = ops.sample_scores(*cuda(x, t), k)
    exact_values, exact_indices, exact_rms = ops.sample_scores_exact(x, t, k)
    cpu_values, cpu_indices, cpu_rms = cpu_op("sample_scores", x, t, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64 and rms.dtype == torch.float64
    assert ((values.cpu().double() - exact_values).abs() <= 1e-5).all()  # vacuous for n = 0
    assert torch.allclose(rms.cpu(), exact_rms, rtol=1e-9, atol=1e-12)  # float64 all the way
    assert torch.allclose(rms.cpu(), cpu_rms, rtol=1e-5, atol=1e-7)
    clear = clear_rows(x, t, k, "cosine") if n else torch.zeros(0, dtype=torch.bool)
    assert torch.equal(indices.cpu()[clear], exact_indices[clear])
    assert torch.equal(indices.cpu()[clear], cpu_indices[clear])


@pytest.mark.parametrize("m", [100, 4100])  # the chunk's similarities, or the Gram matrix
@device_only  # the CUDA kernel's own claims (float64 RMS, its tie order); faked, the CPU kernel stands in
def test_sample_scores_rms_over_several_chunks(m):
    # 2^24 / 4096 = 4096 rows a chunk: three chunks, the last one short.
    x, t = cuda(_x(9000, 4096), _x(m, 4096))
    rms = ops.sample_scores(x, t, 1)[2]
    unit = lambda a: torch.nn.functional.normalize(a.double(), dim=1)  # noqa: E731
    expected = (unit(x) @ unit(t).T).pow(2).mean(1).sqrt()  # float64 on the GPU: exact enough, and quick
    assert torch.allclose(rms, expected, rtol=1e-9)


@device_only  # the CUDA kernel's own claims (float64 RMS, its tie order); faked, the CPU kernel stands in
def test_sample_scores_integer_inputs_equal_cpu():
    x, t = integer_inputs(500, 70, 33, seed=9)
    t = torch.cat([t, t])  # exact ties: the lower target index first
    values, indices, _ = ops.sample_scores(*cuda(x, t), 8)
    cpu_values, cpu_indices, _ = cpu_op("sample_scores", x, t, 8)
    assert torch.equal(indices.cpu(), cpu_indices)
    assert torch.equal(indices.cpu(), ops.sample_scores_exact(x, t, 8)[1])


def test_sample_scores_errors_name_its_arguments():
    x, t = _x(5000, 8), _x(6, 8)
    x[4321, 3] = float("nan")
    with pytest.raises(ValueError, match="sample_scores: features row 4321"):
        ops.sample_scores(*cuda(x, t), 2)
    t[5, 0] = float("inf")
    with pytest.raises(ValueError, match="sample_scores: targets row 5"):
        ops.sample_scores(*cuda(_x(10, 8), t), 2)


@device_only  # the CUDA kernel's own claims (float64 RMS, its tie order); faked, the CPU kernel stands in
def test_sample_scores_opcheck():
    torch.library.opcheck(torch.ops.fastvote.sample_scores.default, (_x(20, 9).cuda(), _x(6, 9).cuda(), 3))


# ---------------------------------------------------------------- issue 23: certified bf16 candidates
# FASTVOTE_CUDA_KERNEL=bf16: fm_vote / nearest_centroids from bf16 tensor-core
# candidates (csrc/cuda/certified.cuh), an exact re-rank with the fused
# kernel's arithmetic and a proof (csrc/include/fastvote/certify.h); rows it
# cannot prove go through the fused kernel. Its answers must be IDENTICAL to
# the fused fp32 kernel's: indices, values and every vote weight (the CPU
# path's tests, tests/test_bf16_candidates.py, in the same shapes).
# _C.cuda_bf16_stats() counts the rows through the path and those that fell
# back, so the proof is seen to work both ways. Faked onto the CPU the switch
# does nothing: the identities hold trivially, and the row counts are not checked.

FAKE = os.environ.get("FASTVOTE_FAKE_CUDA") == "1"
BF16_M = 8  # certify::kExtraCandidates: the path runs when K > k + 8 ...
BF16_MAX_K = 55  # ... and the k + 8 + 1 candidates fit the fused kernel's lists of 64
BF16_VOTES = (("count", 1.0), ("rank", 1.0), ("soft", 1.0), ("soft", 0.05))
BF16_ANSWERS = ("values", "indices", "count", "rank", "soft", "soft t=0.05")


@contextlib.contextmanager
def cuda_kernel(name):
    """Pins FASTVOTE_CUDA_KERNEL (the ops read it at every call)."""
    before = os.environ.get("FASTVOTE_CUDA_KERNEL")
    os.environ["FASTVOTE_CUDA_KERNEL"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["FASTVOTE_CUDA_KERNEL"]
        else:
            os.environ["FASTVOTE_CUDA_KERNEL"] = before


def bf16_stats():
    from fastvote import _C

    return _C.cuda_bf16_stats()


def fm_answers(x, c, k, metric):
    """Every answer the path gives (1 + len(BF16_VOTES) calls), on the CPU:
    the picks and values, and the votes of each weight."""
    values, indices = ops.nearest_centroids(x, c, k, metric)
    votes = [ops.fm_vote(x, c, k, metric, weight, temperature) for weight, temperature in BF16_VOTES]
    return [t.cpu() for t in [values, indices] + votes]


def assert_bf16_identical(x, c, k, metric):
    """The bf16 path's answers equal the fused fp32 kernel's and the CPU's
    (the same arithmetic: fma chains in d order, row norms in 16 lanes), bit
    for bit; returns the rows through the path in one call and how many of
    them fell back."""
    xc, cc = cuda(x, c)
    with cuda_kernel("fp32"):
        expected = fm_answers(xc, cc, k, metric)
    before = bf16_stats()
    with cuda_kernel("bf16"):
        got = fm_answers(xc, cc, k, metric)
    after = bf16_stats()
    cpu = fm_answers(x, c, k, metric)
    for name, e, g, h in zip(BF16_ANSWERS, expected, got, cpu):
        assert e.dtype == g.dtype and e.shape == g.shape, name
        assert torch.equal(e, g), f"{metric}: the bf16 path's {name} differ from the fused fp32 kernel's"
        assert torch.equal(g, h), f"{metric}: {name} differ from the CPU kernel's (the fused fp32 kernel's agree)"
    calls = 1 + len(BF16_VOTES)
    rows, fallbacks = after[0] - before[0], after[1] - before[1]
    takes_path = x.shape[0] > 0 and c.shape[0] > k + BF16_M and k <= BF16_MAX_K
    if not FAKE:
        assert rows == (calls * x.shape[0] if takes_path else 0) and fallbacks % calls == 0
    return rows // calls, fallbacks // calls


# (N, K, D, k): D = 1, 3, 33, 257 (below and across the pass's 32-feature stages:
# zero padding), one row, no rows, k = K and K = 1 (no centroid outside the
# candidates: the fused kernel alone), row and centroid tile edges (128, 64),
# k = 55 (the path's largest) and 56 (the fused kernel's).
BF16_SHAPES = [(300, 40, 67, 5), (257, 100, 130, 7), (1, 50, 33, 1), (0, 20, 8, 3), (100, 30, 1, 2),
               (100, 30, 3, 1), (64, 37, 257, 3), (129, 25, 9, 25), (50, 1, 5, 1), (40, 14, 16, 5),
               (200, 65, 32, 1), (130, 100, 40, 55), (60, 100, 24, 56)]


@pytest.mark.parametrize("n,num,dim,k", BF16_SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_bf16_random_inputs(n, num, dim, k, metric):
    g = gen(n * 7 + num * 3 + dim)
    x = torch.randn(n, dim, generator=g)
    c = torch.randn(num, dim, generator=g)
    assert_bf16_identical(x, c, k, metric)


@pytest.mark.parametrize("n,num,dim,k", [(300, 40, 67, 5), (129, 200, 33, 3), (1, 30, 1, 1), (70, 60, 257, 10)])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_bf16_integer_inputs_equal_the_cpu(n, num, dim, k, metric):
    # Exact norms: every answer is the CPU's too, ties (many, and decided by index) included.
    x, c = integer_inputs(n, num, dim, seed=n + num + dim)
    assert_bf16_identical(x, c, k, metric)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_bf16_features_far_from_the_origin(metric):
    # A large common offset: what centring is for (the bound would fail without it).
    g = gen(1)
    offset = torch.rand(48, generator=g) * 50
    x = offset + torch.randn(400, 48, generator=g)
    c = offset + torch.randn(60, 48, generator=g)
    rows, fallbacks = assert_bf16_identical(x, c, 3, metric)
    assert FAKE or (rows == 400 and fallbacks < 40), f"{fallbacks} of 400 rows unproven"


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_bf16_near_ties_fall_back(metric):
    # Rows at the centre of centroids on a sphere around it: every key within
    # rounding of the others, so no row's top-k can be proven from bf16.
    g = gen(2)
    centre = torch.randn(1, 40, generator=g)
    c = centre + torch.nn.functional.normalize(torch.randn(50, 40, generator=g), dim=1)
    x = centre + 1e-5 * torch.randn(120, 40, generator=g)
    if metric == "cosine":  # near-ties of angle: centroids at equal angles from the rows
        x = centre.expand(120, 40) + 1e-6 * torch.randn(120, 40, generator=g)
        c = torch.cat([centre + 1e-6 * torch.randn(25, 40, generator=g), 2 * centre + 1e-6 * torch.randn(25, 40, generator=g)])
    rows, fallbacks = assert_bf16_identical(x, c, 5, metric)
    assert FAKE or (rows == 120 and fallbacks > 60), f"only {fallbacks} of 120 near-tied rows fell back"


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_bf16_well_separated_rows_are_proven(metric):
    g = gen(3)
    c = 10 * torch.randn(200, 64, generator=g)
    x = c[torch.randint(0, 200, (500,), generator=g)] + 0.1 * torch.randn(500, 64, generator=g)
    rows, fallbacks = assert_bf16_identical(x, c, 5, metric)
    assert FAKE or (rows == 500 and fallbacks <= 5), f"{fallbacks} of 500 well-separated rows fell back"


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 2, 10])
def test_bf16_duplicated_centroids(metric, k):
    # Exact ties: the lower index must win, as in the fused kernel.
    g = gen(4)
    base = torch.randn(19, 33, generator=g)
    c = torch.cat([base, base, base[:5]])
    x = torch.randn(200, 33, generator=g)
    assert_bf16_identical(x, c, k, metric)


@pytest.mark.parametrize("scale", [1e18, 1e17, 1e-18, 1e-30])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_bf16_huge_and_tiny_norms(scale, metric):
    # Keys that overflow float32 (1e18: l2 keys near 1e38) or rows whose bf16
    # products flush (1e-30): the proof must fail there, and the fused kernel answer.
    g = gen(5)
    x = torch.randn(90, 33, generator=g) * scale
    c = torch.randn(40, 33, generator=g) * scale
    assert_bf16_identical(x, c, 4, metric)


def test_bf16_mixed_magnitudes_and_zero_rows():
    g = gen(6)
    x = torch.randn(100, 20, generator=g) * torch.logspace(-20, 15, 100).unsqueeze(1)
    x[::7] = 0.0
    c = torch.randn(60, 20, generator=g) * torch.logspace(-15, 10, 60).unsqueeze(1)
    c[3] = 0.0
    for metric in ("l2", "cosine"):
        assert_bf16_identical(x, c, 3, metric)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_bf16_other_dtypes(dtype):
    g = gen(7)
    x = torch.randn(150, 70, generator=g).to(dtype)
    c = torch.randn(45, 70, generator=g).to(dtype)
    assert_bf16_identical(x, c, 3, "l2")
    assert_bf16_identical(x, c, 3, "cosine")


@pytest.mark.parametrize("layout", ["strided", "transposed", "offset"])
def test_bf16_any_strides(layout):
    # The path reads rows with any strides (packing, and again in the re-rank).
    g = gen(8)
    if layout == "strided":
        x = torch.randn(2 * 301, 3 * 45, generator=g)[::2, ::3]
    elif layout == "transposed":
        x = torch.randn(45, 301, generator=g).t()
    else:
        x = torch.randn(301 * 45 + 1, generator=g)[1:].view(301, 45)
    c = torch.randn(150, 2 * 45, generator=g)[:, ::2]
    for metric in ("l2", "cosine"):
        assert_bf16_identical(x, c, 4, metric)


def test_bf16_centroids_split_across_blocks():
    # Few rows, many centroid tiles: the candidate lists are split over blocks and merged.
    for n, num, dim, k in ((3, 3000, 40, 5), (1, 20_000, 16, 55), (200, 9000, 12, 2)):
        g = gen(n + num)
        assert_bf16_identical(torch.randn(n, dim, generator=g), torch.randn(num, dim, generator=g), k, "l2")


def test_bf16_many_chunks():
    # 4,080 rows a chunk at D = 8,200 (2^25 packed features): two chunks, the
    # second's rows numbered from its offset (picks, fallbacks, errors).
    g = gen(10)
    x, c = torch.randn(4500, 8200, generator=g), torch.randn(12, 8200, generator=g)
    rows, _ = assert_bf16_identical(x, c, 2, "l2")
    assert FAKE or rows == 4500
    x[4321, 7] = float("nan")
    with cuda_kernel("bf16"), pytest.raises(ValueError, match="fm_vote: features row 4321 contains NaN"):
        ops.fm_vote(*cuda(x, c), 2)


# Bad rows and centroids through the path: the fused kernel's errors (K > k + 8).
BF16_NON_FINITE = [
    (lambda: ops.fm_vote(with_value(_x(3000, 5), 1234, float("nan")).cuda(), _x(30, 5).cuda(), 3),
     ["fm_vote", "features row 1234"]),
    (lambda: ops.fm_vote(with_value(with_value(_x(3000, 5), 2500, float("nan")), 1300, float("inf")).cuda(),
                         _x(300, 5).cuda(), 2, "cosine", "soft"), ["features row 1300"]),
    (lambda: ops.nearest_centroids(with_value(_x(40, 5), 7, float("inf")).cuda(), _x(30, 5).cuda()),
     ["nearest_centroids", "features row 7"]),
    (lambda: ops.fm_vote(with_value(_x(40, 5), 8, 1e30).cuda(), _x(30, 5).cuda()), ["features row 8"]),
    (lambda: ops.fm_vote(with_value(_x(40, 5), 3, float("nan")).cuda(),
                         with_value(_x(30, 5), 2, float("nan")).cuda()), ["centroids row 2"]),
]


@pytest.mark.parametrize("case", range(len(BF16_NON_FINITE)))
def test_bf16_non_finite_inputs_raise_the_same_errors(case):
    call, words = BF16_NON_FINITE[case]
    with cuda_kernel("bf16"), pytest.raises(ValueError) as info:
        call()
    for w in words + ["NaN or Inf"]:
        assert w in str(info.value), f"{w!r} missing from: {info.value}"
    x, c = integer_inputs(40, 30, 5, seed=1)  # and the path works after the error
    with cuda_kernel("bf16"):
        assert torch.equal(ops.fm_vote(*cuda(x, c), 3).cpu(), ops.fm_vote_reference(x, c, 3))


@device_only  # faked onto the CPU, the CPU kernels stand in and do not read the variable
def test_bf16_switch_is_opt_in_and_checked(monkeypatch):
    monkeypatch.delenv("FASTVOTE_CUDA_KERNEL", raising=False)
    g = gen(9)
    x, c = cuda(torch.randn(50, 16, generator=g), torch.randn(40, 16, generator=g))
    before = bf16_stats()
    ops.fm_vote(x, c, 5)
    with cuda_kernel("fp32"):
        ops.nearest_centroids(x, c, 5)
    assert bf16_stats() == before, "the fused fp32 kernel is the default"
    with cuda_kernel("bf16"):
        ops.fm_vote(x, c, 5)
        assert bf16_stats()[0] == before[0] + 50
        ops.fm_vote(x, c, 32)  # K <= k + 8: the fused kernel
        ops.fm_vote(x, torch.cat([c, c]), 56)  # k above the path's lists
        assert bf16_stats()[0] == before[0] + 50
    with cuda_kernel("tf32"):
        for call in (lambda: ops.fm_vote(x, c, 5), lambda: ops.nearest_centroids(x, c, 65)):
            with pytest.raises(ValueError, match="FASTVOTE_CUDA_KERNEL=tf32 is unknown; expected 'fp32'"):
                call()


@device_only  # the share of rows the proof leaves is the device's to measure
@pytest.mark.parametrize("n,num,dim", [(20_000, 1000, 128), (2000, 20_000, 64)])
def test_bf16_fallback_on_gaussian_inputs_is_small(n, num, dim):
    g = torch.Generator(device="cuda").manual_seed(n + num)
    x = torch.randn(n, dim, device="cuda", generator=g)
    c = torch.randn(num, dim, device="cuda", generator=g)
    for metric in ("l2", "cosine"):
        with cuda_kernel("fp32"):
            expected = ops.nearest_centroids(x, c, 5, metric), ops.fm_vote(x, c, 5, metric, "soft")
        before = bf16_stats()
        with cuda_kernel("bf16"):
            got = ops.nearest_centroids(x, c, 5, metric), ops.fm_vote(x, c, 5, metric, "soft")
        rows, fallbacks = (a - b for a, b in zip(bf16_stats(), before))
        assert torch.equal(got[0][0], expected[0][0]) and torch.equal(got[0][1], expected[0][1])
        assert torch.equal(got[1], expected[1])
        assert rows == 2 * n and fallbacks / rows < 0.01, f"{metric}: {fallbacks / 2} of {n} rows fell back"
