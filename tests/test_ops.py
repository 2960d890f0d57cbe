"""Every compiled op against its float64 reference (fastvote.ops.*_reference),
on every device this machine has and every CPU micro-kernel variant it can run.

Two kinds of inputs:
- integer-valued features/centroids/logits: float32 arithmetic on them is
  exact, so compiled and reference results must be EQUAL, ties included;
- random floats: near-ties may legitimately resolve differently in float32,
  so picks are checked to be a valid top-k of the reference keys within a
  tolerance, and vote totals exactly where the inputs have no near-ties.
"""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fastvote.ops as ops
from conftest import cpu_kernels

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (N, K, D, k): D = 1, D not a multiple of 8/16, K = 1, k = K, N = 1, N = 0, tile edges.
SHAPES = [
    (1, 1, 1, 1), (0, 5, 3, 2), (1, 7, 5, 3), (37, 1, 67, 1), (50, 13, 1, 13), (33, 12, 17, 12),
    (300, 40, 67, 5), (257, 100, 130, 7), (129, 25, 9, 25), (64, 37, 1000, 3),
]


@pytest.fixture(params=cpu_kernels())
def cpu_kernel(request, monkeypatch):
    monkeypatch.setenv("FASTVOTE_CPU_KERNEL", request.param)
    return request.param


def gen(seed):
    return torch.Generator().manual_seed(seed)


def reference_key_matrix(features, centroids, metric):
    """[N, K] float64 keys (smaller is better), the oracle's own definition."""
    return torch.cat([keys for _, keys in ops._reference_keys(features, centroids, metric)]) \
        if features.shape[0] else torch.zeros(0, centroids.shape[0], dtype=torch.float64)


def key_tolerance(features, centroids, metric):
    if metric == "cosine":
        return 1e-5
    x2 = features.double().pow(2).sum(1, keepdim=True)
    c2 = centroids.double().pow(2).sum(1).max()
    return 1e-5 * (x2 + c2)  # float32 rounding of ||c||^2 - 2 x.c, per row


def assert_valid_topk(values, indices, features, centroids, k, metric):
    """The picks are a top-k of the reference keys up to float32 rounding."""
    keys = reference_key_matrix(features.cpu(), centroids.cpu(), metric)
    values, indices = values.cpu().double(), indices.cpu()
    assert indices.shape == (features.shape[0], k) and indices.dtype == torch.int64
    assert values.dtype == torch.float64 and values.shape == indices.shape
    if features.shape[0] == 0:
        return
    tol = key_tolerance(features.cpu(), centroids.cpu(), metric)
    ref_top = torch.sort(keys, dim=1, stable=True).values[:, :k]
    picked = keys.gather(1, indices)
    assert (torch.sort(indices, dim=1).values.diff(dim=1) > 0).all(), "a row picked a centroid twice"
    assert ((picked - ref_top).abs() <= tol).all(), "a pick is not among the k nearest"
    expected_values = picked if metric == "l2" else -picked
    assert ((values - expected_values).abs() <= tol).all(), "returned values disagree with the keys"


def integer_inputs(n, num, dim, seed, low=-3, high=4):
    g = gen(seed)
    return (torch.randint(low, high, (n, dim), generator=g).float(),
            torch.randint(low, high, (num, dim), generator=g).float())


def to(device, *tensors):
    return [t.to(device) for t in tensors]


# ---------------------------------------------------------------- the build

def test_compiled_ops_are_under_test():
    assert ops.HAS_EXTENSION
    from fastvote import _C

    assert _C.cpu_kernel() in {"amxbf16", "avx512bf16", "avx512", "avx2", "portable"}
    assert ops.fm_vote.__module__ == "fastvote.ops"
    assert ops._dispatch("fm_vote", torch.zeros(1)) is torch.ops.fastvote.fm_vote
    assert ops._WITH_CUDA == bool(_C.with_cuda)


# ---------------------------------------------------------------- nearest_centroids / fm_vote

@pytest.mark.parametrize("n,num,dim,k", SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nearest_centroids_random(device, cpu_kernel, n, num, dim, k, metric):
    g = gen(n * 1000 + num * 10 + dim)
    x = torch.randn(n, dim, generator=g)
    c = torch.randn(num, dim, generator=g)
    x, c = to(device, x, c)
    values, indices = ops.nearest_centroids(x, c, k, metric)
    assert values.device.type == device
    assert_valid_topk(values, indices, x, c, k, metric)
    # fm_vote is the histogram of exactly these picks (same kernel, same rows).
    votes = ops.fm_vote(x, c, k, metric)
    assert votes.dtype == torch.int64 and int(votes.sum()) == n * k
    assert torch.equal(votes.cpu(), torch.bincount(indices.cpu().reshape(-1), minlength=num))


@pytest.mark.parametrize("n,num,dim,k", SHAPES)
def test_integer_inputs_are_exact(device, cpu_kernel, n, num, dim, k):
    x, c = integer_inputs(n, num, dim, seed=n + num + dim)
    ref_v, ref_i = ops.nearest_centroids_reference(x, c, k, "l2")
    ref_votes = ops.fm_vote_reference(x, c, k, "l2")
    x, c = to(device, x, c)
    values, indices = ops.nearest_centroids(x, c, k, "l2")
    assert torch.equal(indices.cpu(), ref_i)
    assert torch.equal(values.cpu(), ref_v)
    assert torch.equal(ops.fm_vote(x, c, k, "l2").cpu(), ref_votes)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 2])
def test_duplicate_centroids_lower_index_wins(device, cpu_kernel, metric, k):
    g = gen(7)
    base = torch.randn(19, 33, generator=g)
    c = torch.cat([base, base])  # centroid j and j + 19 are identical
    x = torch.randn(200, 33, generator=g)
    x, c = to(device, x, c)
    _, indices = ops.nearest_centroids(x, c, k, metric)
    indices = indices.cpu()
    assert (indices[:, 0] < 19).all()
    if k == 2:  # the twin is exactly as near, so it comes second
        assert torch.equal(indices[:, 1], indices[:, 0] + 19)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_low_precision_and_strided_inputs(device, dtype, metric):
    g = gen(3)
    big = torch.randn(2 * 151, 3 * 45, generator=g).to(dtype)
    x = big[::2, ::3]  # non-contiguous in both dimensions
    c = torch.randn(45, 29, generator=g).to(dtype).t()  # transposed: [29, 45] strides (1, 29)
    assert not x.is_contiguous() and not c.is_contiguous()
    x, c = to(device, x, c)
    values, indices = ops.nearest_centroids(x, c, 4, metric)
    # The reference sees the same (rounded) input values, in float64.
    assert_valid_topk(values, indices, x.double(), c.double(), 4, metric)
    assert torch.equal(ops.fm_vote(x, c, 4, metric).cpu(),
                       torch.bincount(indices.cpu().reshape(-1), minlength=29))


@pytest.mark.parametrize("weight", ["rank", "soft"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_fm_vote_float_weights(device, cpu_kernel, weight, metric, temperature):
    g = gen(11)
    x = torch.randn(400, 20, generator=g)
    c = torch.randn(30, 20, generator=g)
    keys = reference_key_matrix(x, c, metric)
    top = torch.sort(keys, dim=1).values[:, :4]
    gaps = top.diff(dim=1).min(dim=1, keepdim=True).values
    x = x[(gaps > key_tolerance(x, c, metric)).squeeze(1)]  # keep rows without near-ties
    assert len(x) > 300
    expected = ops.fm_vote_reference(x, c, 3, metric, weight, temperature)
    x, c = to(device, x, c)
    votes = ops.fm_vote(x, c, 3, metric, weight, temperature).cpu()
    assert votes.dtype == torch.float64
    torch.testing.assert_close(votes, expected, rtol=1e-5, atol=1e-5)
    per_row = sum(1 / r for r in (1, 2, 3)) if weight == "rank" else 1.0
    assert abs(float(votes.sum()) - len(x) * per_row) < 1e-4


def test_large_k_and_d_cross_tiles(device, cpu_kernel):
    # Several row tiles, several centroid groups, a short last group and slab.
    x, c = integer_inputs(1000, 301, 45, seed=5, low=-2, high=3)
    ref = ops.fm_vote_reference(x, c, 9, "l2")
    x, c = to(device, x, c)
    assert torch.equal(ops.fm_vote(x, c, 9, "l2").cpu(), ref)


# ---------------------------------------------------------------- lm_vote / lm_scores

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n,num,k", [(1, 1, 1), (0, 4, 2), (100, 10, 10), (333, 1000, 5), (20, 70, 1)])
def test_lm_vote_counts_exact(device, dtype, n, num, k):
    g = gen(n + num)
    logits = torch.randn(n, num, generator=g).to(dtype)
    expected = ops.lm_vote_reference(logits, k)  # no arithmetic: exact on every dtype
    votes = ops.lm_vote(logits.to(device), k).cpu()
    assert votes.dtype == torch.int64 and int(votes.sum()) == n * k
    assert torch.equal(votes, expected)


def test_lm_vote_ties_and_strides(device):
    logits = torch.zeros(5, 8)
    logits[1, [2, 5]] = 1.0  # a tie between 2 and 5: 2 wins
    logits[2] = torch.tensor([3.0, 1, 3, 3, 0, 0, 0, 0])
    votes = ops.lm_vote(logits.to(device), 1).cpu()
    # rows 0, 3, 4: all equal -> class 0; row 1 -> 2; row 2 -> 0
    assert votes.tolist() == [4, 0, 1, 0, 0, 0, 0, 0]
    votes3 = ops.lm_vote(logits.to(device), 3).cpu()
    assert torch.equal(votes3, ops.lm_vote_reference(logits, 3))
    # integer logits with many ties, transposed storage
    g = gen(2)
    ints = torch.randint(0, 3, (60, 90), generator=g).float().t()
    assert torch.equal(ops.lm_vote(ints.to(device), 4).cpu(), ops.lm_vote_reference(ints, 4))


@pytest.mark.parametrize("weight", ["rank", "soft"])
def test_lm_vote_float_weights(device, weight):
    logits = torch.randn(500, 50, generator=gen(4)) * 3
    expected = ops.lm_vote_reference(logits, 5, weight)
    votes = ops.lm_vote(logits.to(device), 5, weight).cpu()
    assert votes.dtype == torch.float64
    torch.testing.assert_close(votes, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", FLOATS)
def test_lm_scores(device, dtype):
    logits = (torch.randn(300, 77, generator=gen(5)) * 4).to(dtype)
    scores = ops.lm_scores(logits.to(device)).cpu()
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, ops.lm_scores_reference(logits), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scores.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(ops.lm_scores(torch.zeros(0, 3, device=device)).cpu(), torch.zeros(3, dtype=torch.float64))


# ---------------------------------------------------------------- fm_scores / class_centroids

@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n", [0, 1, 250])
def test_fm_scores(device, metric, n):
    g = gen(n)
    x = torch.randn(n, 31, generator=g)
    c = torch.randn(12, 31, generator=g)
    scores = ops.fm_scores(*to(device, x, c), metric).cpu()
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, ops.fm_scores_reference(x, c, metric), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("dtype", FLOATS)
def test_class_centroids(device, label_dtype, dtype):
    g = gen(9)
    x = torch.randn(517, 70, generator=g).to(dtype)[:, ::2]
    labels = torch.randint(0, 11, (517,), generator=g).to(label_dtype)
    sums, counts = ops.class_centroids(*to(device, x, labels), 13)
    ref_sums, ref_counts = ops.class_centroids_reference(x, labels, 13)
    assert sums.dtype == torch.float64 and counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), ref_counts) and int(counts[11:].sum()) == 0
    torch.testing.assert_close(sums.cpu(), ref_sums, rtol=1e-12, atol=1e-9)


def test_class_centroids_add_each_class_in_row_order():
    """The CPU kernel adds a class's rows in row order (it visits them sorted
    by class): float64 sums equal to numpy's sequential np.add.at bit for bit,
    with more classes than rows, a class of one row, odd D and huge values."""
    g = gen(4)
    x = torch.randn(2_001, 515, generator=g) * torch.logspace(-3, 30, 2_001)[:, None]
    labels = torch.randint(0, 3_000, (2_001,), generator=g)
    labels[7] = 2_999
    sums, counts = ops.class_centroids(x, labels, 3_000)
    expected = np.zeros((3_000, 515))
    np.add.at(expected, labels.numpy(), x.double().numpy())
    assert np.array_equal(sums.numpy(), expected)
    assert torch.equal(counts, torch.bincount(labels, minlength=3_000))


def test_class_centroids_are_summable_over_batches(device):
    x = torch.randn(300, 8, generator=gen(1)).to(device)
    labels = torch.randint(0, 4, (300,), generator=gen(2)).to(device)
    whole = ops.class_centroids(x, labels, 4)
    parts = [ops.class_centroids(x[i:i + 100], labels[i:i + 100], 4) for i in range(0, 300, 100)]
    torch.testing.assert_close(sum(p[0] for p in parts), whole[0])
    assert torch.equal(sum(p[1] for p in parts), whole[1])


def test_empty_inputs(device):
    x = torch.zeros(0, 6, device=device)
    c = torch.randn(4, 6, device=device)
    assert ops.fm_vote(x, c, 2).tolist() == [0, 0, 0, 0]
    assert ops.fm_vote(x, c, 2, weight="soft").tolist() == [0.0] * 4
    values, indices = ops.nearest_centroids(x, c, 3)
    assert values.shape == (0, 3) and indices.shape == (0, 3)
    assert ops.lm_vote(torch.zeros(0, 4, device=device), 4).tolist() == [0, 0, 0, 0]
    sums, counts = ops.class_centroids(x, torch.zeros(0, dtype=torch.long, device=device), 2)
    assert sums.shape == (2, 6) and counts.tolist() == [0, 0]


# ---------------------------------------------------------------- bad input

def _x(*shape, **kw):
    return torch.randn(*shape, **kw)


BAD_CALLS = [
    # (description, call, exception, words the message must contain)
    ("D mismatch", lambda: ops.fm_vote(_x(4, 5), _x(3, 6)), ValueError, ["D=5", "D=6"]),
    ("features rank", lambda: ops.fm_vote(_x(5), _x(3, 5)), ValueError, ["features", "2-D", "[5]"]),
    ("centroids rank", lambda: ops.nearest_centroids(_x(4, 5), _x(2, 3, 5)), ValueError, ["centroids", "2-D"]),
    ("logits rank", lambda: ops.lm_vote(_x(3, 4, 5)), ValueError, ["logits", "2-D"]),
    ("k = 0", lambda: ops.fm_vote(_x(4, 5), _x(3, 5), 0), ValueError, ["k=0", "1 <= k <= K=3"]),
    ("k > K", lambda: ops.lm_vote(_x(4, 5), 6), ValueError, ["k=6", "K=5"]),
    ("k > K nearest", lambda: ops.nearest_centroids(_x(4, 5), _x(3, 5), 4), ValueError, ["k=4", "K=3"]),
    ("K = 0 centroids", lambda: ops.fm_vote(_x(4, 5), _x(0, 5)), ValueError, ["K=0"]),
    ("K = 0 logits", lambda: ops.lm_vote(_x(4, 0)), ValueError, ["K=0"]),
    ("unknown metric", lambda: ops.fm_vote(_x(4, 5), _x(3, 5), metric="l1"), ValueError, ["metric='l1'", "'l2'", "'cosine'"]),
    ("unknown weight", lambda: ops.lm_vote(_x(4, 5), weight="votes"), ValueError, ["weight='votes'", "'count'"]),
    ("temperature", lambda: ops.fm_vote(_x(4, 5), _x(3, 5), weight="soft", temperature=0.0), ValueError, ["temperature=0"]),
    ("tiny temperature", lambda: ops.fm_vote(_x(4, 5), _x(3, 5), weight="soft", temperature=1e-40), ValueError,
     ["temperature=1e-40", "inverse is finite in float32"]),
    ("int features", lambda: ops.fm_vote(torch.ones(4, 5, dtype=torch.int32), _x(3, 5)), TypeError, ["features", "Int"]),
    ("int logits", lambda: ops.lm_scores(torch.ones(4, 5, dtype=torch.int64)), TypeError, ["logits", "Long"]),
    ("float labels", lambda: ops.class_centroids(_x(4, 5), torch.zeros(4), 2), TypeError, ["labels", "integer"]),
    ("label too large", lambda: ops.class_centroids(_x(4, 5), torch.tensor([0, 1, 7, 1]), 3), IndexError, ["labels[2]=7", "num_classes=3"]),
    ("negative label", lambda: ops.class_centroids(_x(4, 5), torch.tensor([0, -1, 0, 1]), 3), IndexError, ["labels[1]=-1"]),
    ("label count", lambda: ops.class_centroids(_x(4, 5), torch.zeros(3, dtype=torch.long), 3), ValueError, ["3 entries", "N=4"]),
    ("num_classes", lambda: ops.class_centroids(_x(4, 5), torch.zeros(4, dtype=torch.long), 0), ValueError, ["num_classes=0"]),
]


def _with_value(t, row, value):
    t = t.clone()
    t[row, 1] = value
    return t


NON_FINITE = [
    ("nan features", lambda: ops.fm_vote(_with_value(_x(300, 5), 123, float("nan")), _x(3, 5)), ["features row 123"]),
    ("inf features", lambda: ops.nearest_centroids(_with_value(_x(40, 5), 7, float("inf")), _x(3, 5)), ["features row 7"]),
    ("huge features", lambda: ops.fm_vote(_with_value(_x(40, 5), 8, 1e30), _x(3, 5)), ["features row 8"]),
    ("nan centroids", lambda: ops.fm_vote(_x(4, 5), _with_value(_x(3, 5), 2, float("nan"))), ["centroids row 2"]),
    ("nan logits", lambda: ops.lm_vote(_with_value(_x(200, 5), 150, float("nan"))), ["logits row 150"]),
    ("inf logits scores", lambda: ops.lm_scores(_with_value(_x(20, 5), 3, float("-inf"))), ["logits row 3"]),
    ("nan fm_scores", lambda: ops.fm_scores(_with_value(_x(20, 5), 4, float("nan")), _x(3, 5)), ["features row 4"]),
    ("nan class_centroids", lambda: ops.class_centroids(_with_value(_x(20, 5), 5, float("nan")),
                                                         torch.zeros(20, dtype=torch.long), 1), ["features row 5"]),
]


@pytest.mark.parametrize("what,call,exc,words", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_errors(what, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), f"{w!r} missing from: {info.value}"


@pytest.mark.parametrize("what,call,words", NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_non_finite_inputs_are_rejected(what, call, words):
    with pytest.raises(ValueError) as info:
        call()
    for w in words + ["NaN or Inf"]:
        assert w in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_device_mismatch():
    with pytest.raises(ValueError, match="same device"):
        ops.fm_vote(_x(4, 5), _x(3, 5, device="cuda"))


def test_device_mismatch_meta():
    # A device mismatch is caught before any kernel runs, on any machine.
    with pytest.raises((ValueError, RuntimeError), match="device|Device"):
        ops.fm_vote(_x(4, 5), _x(3, 5, device="meta"))


# ---------------------------------------------------------------- registration

OPCHECK_CASES = [
    ("lm_vote", lambda d: (_x(20, 7, device=d), 3, "count")),
    ("lm_vote", lambda d: (_x(20, 7, device=d), 2, "soft")),
    ("fm_vote", lambda d: (_x(20, 9, device=d), _x(6, 9, device=d), 2, "cosine", "rank", 1.0)),
    ("nearest_centroids", lambda d: (_x(20, 9, device=d), _x(6, 9, device=d), 3, "l2")),
    ("class_centroids", lambda d: (_x(20, 9, device=d), torch.randint(0, 4, (20,), device=d), 4)),
    ("lm_scores", lambda d: (_x(20, 7, device=d),)),
    ("fm_scores", lambda d: (_x(20, 9, device=d), _x(6, 9, device=d), "l2")),
]


@pytest.mark.parametrize("name,make", OPCHECK_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(OPCHECK_CASES)])
def test_opcheck(device, name, make):
    torch.library.opcheck(getattr(torch.ops.fastvote, name).default, make(device))


def test_torch_compile_traces_the_ops():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def vote(x, c):
        return ops.fm_vote(x, c, 2, "l2") + ops.lm_vote(x @ c.t(), 1)

    x, c = _x(50, 8), _x(5, 8)
    assert torch.equal(vote(x, c), ops.fm_vote(x, c, 2) + ops.lm_vote(x @ c.t(), 1))


# ---------------------------------------------------------------- the fallback

def test_cpu_only_build_sends_cuda_tensors_to_the_references(monkeypatch):
    # A CPU-only build has no CUDA kernels: on a CUDA machine its ops must run
    # the references (one warning), not meet a dispatcher error. Objects with
    # a CUDA device stand in for CUDA tensors on machines without one.
    monkeypatch.setattr(ops, "_WITH_CUDA", False)
    monkeypatch.setattr(ops, "_WARNED", set())
    cuda, cpu = SimpleNamespace(device=torch.device("cuda", 0)), torch.zeros(1)
    with pytest.warns(RuntimeWarning, match="built without CUDA") as caught:
        assert ops._dispatch("fm_vote", cuda, cuda) is ops.REFERENCES["fm_vote"]
        assert ops._dispatch("lm_scores", cuda) is ops.REFERENCES["lm_scores"]
    assert len(caught) == 1
    assert ops._dispatch("fm_vote", cpu, cuda) is ops.REFERENCES["fm_vote"]  # it names the device mismatch
    assert ops._dispatch("fm_vote", cpu, cpu) is torch.ops.fastvote.fm_vote
    monkeypatch.setattr(ops, "_WITH_CUDA", True)
    assert ops._backend("cuda") == "compiled" and ops._backend("meta") == "compiled"


def test_reference_fallback_warns_once_and_agrees():
    script = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastvote.ops as ops\n"
        "    import fastvote.ops\n"
        "assert not ops.HAS_EXTENSION\n"
        "msgs = [str(m.message) for m in w if 'reference' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "x = torch.randint(-3, 4, (50, 7)).float(); c = torch.randint(-3, 4, (9, 7)).float()\n"
        "torch.save((ops.fm_vote(x, c, 2), ops.nearest_centroids(x, c, 2), x, c), 'out.pt')\n"
        "try:\n"
        "    ops.fm_vote(x, c, 0)\n"
        "except ValueError as e:\n"
        "    assert 'k=0' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error for k=0')\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, FASTVOTE_DISABLE_EXTENSION="1")
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        votes, (values, indices), x, c = torch.load(os.path.join(tmp, "out.pt"))
    assert torch.equal(votes, torch.ops.fastvote.fm_vote(x, c, 2))
    compiled = torch.ops.fastvote.nearest_centroids(x, c, 2)
    assert torch.equal(indices, compiled[1]) and torch.equal(values, compiled[0])
