"""The certified bf16 CPU path: a bf16 candidate pass, an exact fp32 re-rank
of each row's best k + m candidates, and a proof (an error bound) that no
other centroid can enter the row's top-k, or else the fp32 kernel for that
row. Its answers must be IDENTICAL to the fp32 kernel's: indices, values and
every vote weight.

"bf16emu" (VDPBF16PS emulated with fp32 FMAs) runs on every CPU and is what
these tests pin; "avx512bf16" (the native instruction) is tested too where
the CPU has AVX512_BF16. The fp32 kernel they must equal is the FMA one this
CPU runs (avx512 or avx2: the same bits). _C.cpu_bf16_stats() counts the
rows through the path and those that fell back, so the tests can check that
the proof is actually exercised both ways.
"""
import os

import pytest
import torch

import fastvote.ops as ops
from fastvote import _C


def _runs(name):
    os.environ["FASTVOTE_CPU_KERNEL"] = name
    try:
        _C.cpu_kernel()
        return True
    except (RuntimeError, ValueError):
        return False
    finally:
        del os.environ["FASTVOTE_CPU_KERNEL"]


def _cpuinfo(field):
    """The first value of `field` in /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), "")
    except OSError:
        return ""


def _cpu_flags():
    return _cpuinfo("flags").split()


HAS_NATIVE = _runs("avx512bf16")
HAS_AMX = _runs("amxbf16")
FP32 = next((name for name in ("avx512", "avx2") if _runs(name)), None)
CERTIFIED = ["bf16emu"] + (["avx512bf16"] if HAS_NATIVE else []) + (["amxbf16"] if HAS_AMX else [])
M = 8  # kExtraCandidates (csrc/cpu/certified.h): K must exceed k + M for the path to run

pytestmark = pytest.mark.skipif(FP32 is None, reason="no fp32 FMA kernel (avx512/avx2) to compare with")


@pytest.fixture(params=CERTIFIED)
def certified(request):
    return request.param


def pinned(kernel, fn):
    before = os.environ.get("FASTVOTE_CPU_KERNEL")
    os.environ["FASTVOTE_CPU_KERNEL"] = kernel
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["FASTVOTE_CPU_KERNEL"]
        else:
            os.environ["FASTVOTE_CPU_KERNEL"] = before


def with_stats(kernel, fn):
    """fn's result under `kernel`, and (rows, fallback_rows) of the certified path during it."""
    rows0, fallback0 = _C.cpu_bf16_stats()
    out = pinned(kernel, fn)
    rows1, fallback1 = _C.cpu_bf16_stats()
    return out, (rows1 - rows0, fallback1 - fallback0)


VOTES = (("count", 1.0), ("rank", 1.0), ("soft", 1.0), ("soft", 0.05))


def all_answers(x, c, k, metric):
    """Every answer the path gives (1 + len(VOTES) calls): the picks and values, and the votes of each weight."""
    values, indices = ops.nearest_centroids(x, c, k, metric)
    return [values, indices] + [ops.fm_vote(x, c, k, metric, weight, t) for weight, t in VOTES]


def assert_identical(x, c, k, metric, kernel):
    """The certified kernel's answers equal the fp32 kernel's, bit for bit; returns its (rows, fallbacks)."""
    expected = pinned(FP32, lambda: all_answers(x, c, k, metric))
    got, stats = with_stats(kernel, lambda: all_answers(x, c, k, metric))
    for name, e, g in zip(["values", "indices", "count", "rank", "soft", "soft t=0.05"], expected, got):
        assert e.dtype == g.dtype and e.shape == g.shape
        assert torch.equal(e, g), f"{kernel} {metric}: {name} differ from {FP32}'s"
    # The path runs (and counts its rows) only when centroids are left outside
    # the candidates; each call decides the same rows.
    calls = 1 + len(VOTES)
    rows, fallbacks = stats
    assert rows == (calls * x.shape[0] if c.shape[0] > k + M else 0) and fallbacks % calls == 0
    return rows // calls, fallbacks // calls


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- selection

def test_kernel_names_and_automatic_choice():
    assert _runs("bf16emu"), "the emulation runs on every CPU"
    flags = _cpu_flags()
    native_cpu = "avx512_bf16" in flags and "avx512f" in flags
    assert HAS_NATIVE == native_cpu
    # AMX needs Linux's permission too, so the flag is necessary, not sufficient.
    assert not HAS_AMX or ("amx_bf16" in flags and "avx512f" in flags)
    # The bf16 pass that pays where the CPU has one: AMX tiles, else VDPBF16PS on
    # AMD (on Intel it runs at half the fp32 FMA's rate); else today's fp32
    # kernels, never the emulation.
    if HAS_AMX:
        expected = {"amxbf16"}
    elif native_cpu and _cpuinfo("vendor_id") == "AuthenticAMD":
        expected = {"avx512bf16"}
    else:
        expected = {"avx512", "avx2", "portable"}
    assert _C.cpu_kernel() in expected
    for name, runs in (("avx512bf16", HAS_NATIVE), ("amxbf16", HAS_AMX)):
        if not runs:
            with pytest.raises((RuntimeError, ValueError), match=f"{name}.*not available.*bf16emu"):
                pinned(name, _C.cpu_kernel)


# ---------------------------------------------------------------- identical answers

# (N, K, D, k): D = 1, 3, 33, 257 (odd: a half-empty last bf16 pair), one row,
# no rows, k = K and K = 1 (no centroid left outside the candidates), tile edges.
SHAPES = [(300, 40, 67, 5), (257, 100, 130, 7), (1, 50, 33, 1), (0, 20, 8, 3), (100, 30, 1, 2),
          (100, 30, 3, 1), (64, 37, 257, 3), (129, 25, 9, 25), (50, 1, 5, 1), (40, 14, 16, 5)]


@pytest.mark.parametrize("n,num,dim,k", SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_random_inputs(certified, n, num, dim, k, metric):
    g = gen(n * 7 + num * 3 + dim)
    x = torch.randn(n, dim, generator=g)
    c = torch.randn(num, dim, generator=g)
    assert_identical(x, c, k, metric, certified)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_features_far_from_the_origin(certified, metric):
    # A large common offset: what centring is for (the bound would fail without it).
    g = gen(1)
    offset = torch.rand(48, generator=g) * 50
    x = offset + torch.randn(400, 48, generator=g)
    c = offset + torch.randn(60, 48, generator=g)
    rows, fallbacks = assert_identical(x, c, 3, metric, certified)
    assert rows == 400 and fallbacks < 40, f"{fallbacks} of 400 rows unproven"


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_near_ties_fall_back(certified, metric):
    # Rows at the centre of centroids on a sphere around it: every key within
    # rounding of the others, so no row's top-k can be proven from bf16.
    g = gen(2)
    centre = torch.randn(1, 40, generator=g)
    directions = torch.nn.functional.normalize(torch.randn(50, 40, generator=g), dim=1)
    c = centre + directions
    x = centre + 1e-5 * torch.randn(120, 40, generator=g)
    if metric == "cosine":  # near-ties of angle: centroids at equal angles from the rows
        x = centre.expand(120, 40) + 1e-6 * torch.randn(120, 40, generator=g)
        c = torch.cat([centre + 1e-6 * torch.randn(25, 40, generator=g), 2 * centre + 1e-6 * torch.randn(25, 40, generator=g)])
    rows, fallbacks = assert_identical(x, c, 5, metric, certified)
    assert rows == 120 and fallbacks > 60, f"only {fallbacks} of 120 near-tied rows fell back"


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_well_separated_rows_are_proven(certified, metric):
    g = gen(3)
    c = 10 * torch.randn(200, 64, generator=g)
    x = c[torch.randint(0, 200, (500,), generator=g)] + 0.1 * torch.randn(500, 64, generator=g)
    rows, fallbacks = assert_identical(x, c, 5, metric, certified)
    assert rows == 500 and fallbacks <= 5, f"{fallbacks} of 500 well-separated rows fell back"


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 2, 10])
def test_duplicated_centroids(certified, metric, k):
    # Exact ties: the lower index must win, as in the fp32 kernel.
    g = gen(4)
    base = torch.randn(19, 33, generator=g)
    c = torch.cat([base, base, base[:5]])
    x = torch.randn(200, 33, generator=g)
    assert_identical(x, c, k, metric, certified)


@pytest.mark.parametrize("scale", [1e18, 1e17, 1e-18, 1e-30])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_huge_and_tiny_norms(certified, scale, metric):
    g = gen(5)
    x = torch.randn(90, 33, generator=g) * scale
    c = torch.randn(40, 33, generator=g) * scale
    assert_identical(x, c, 4, metric, certified)


def test_mixed_magnitudes_and_zero_rows(certified):
    g = gen(6)
    x = torch.randn(100, 20, generator=g) * torch.logspace(-20, 15, 100).unsqueeze(1)
    x[::7] = 0.0
    c = torch.randn(60, 20, generator=g) * torch.logspace(-15, 10, 60).unsqueeze(1)
    c[3] = 0.0
    for metric in ("l2", "cosine"):
        assert_identical(x, c, 3, metric, certified)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(certified, dtype):
    g = gen(7)
    x = torch.randn(150, 70, generator=g).to(dtype)
    c = torch.randn(45, 70, generator=g).to(dtype)
    assert_identical(x, c, 3, "l2", certified)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_digits_features(certified, metric):
    datasets = pytest.importorskip("sklearn.datasets")
    x = torch.from_numpy(datasets.load_digits().data).float()  # 1797 x 64, non-negative pixels
    g = gen(8)
    c = x[torch.randperm(len(x), generator=g)[:100]] + 0.5 * torch.randn(100, 64, generator=g)
    rows, fallbacks = assert_identical(x, c, 5, metric, certified)
    assert rows == len(x) and fallbacks < rows // 4


def test_sample_scores_stay_fp32(certified):
    # sample_scores also needs every centroid's squared key: it runs the fp32 kernel.
    g = gen(9)
    x, t = torch.randn(100, 24, generator=g), torch.randn(50, 24, generator=g)
    expected = pinned(FP32, lambda: ops.sample_scores(x, t, 3))
    got, (rows, _) = with_stats(certified, lambda: ops.sample_scores(x, t, 3))
    assert rows == 0
    for e, o in zip(expected, got):
        assert torch.equal(e, o)


# ---------------------------------------------------------------- native == emulated

@pytest.mark.skipif(not HAS_NATIVE, reason="this CPU has no AVX512_BF16: the native pass cannot run here")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_native_pass_equals_the_emulation(metric):
    # Bit-equal candidate passes make bit-equal proofs: the same rows fall back.
    g = gen(10)
    x = torch.randn(700, 129, generator=g) * torch.logspace(-3, 3, 700).unsqueeze(1)
    c = torch.randn(300, 129, generator=g)
    native, native_stats = with_stats("avx512bf16", lambda: all_answers(x, c, 5, metric))
    emulated, emulated_stats = with_stats("bf16emu", lambda: all_answers(x, c, 5, metric))
    assert native_stats == emulated_stats
    for n, e in zip(native, emulated):
        assert torch.equal(n, e)


def test_the_automatic_choice_takes_the_path_only_where_it_pays():
    # Unpinned, a certified kernel answers from its pass's candidate_shape.pays_from centroids
    # on (AMX 500, VDPBF16PS 800): below, its per-row cost outweighs what it saves (k-means'
    # seeding makes many such calls). Pinned, it answers at any K (above), as these tests need.
    pays_from = {"amxbf16": 500, "avx512bf16": 800}.get(_C.cpu_kernel())
    if pays_from is None:
        pytest.skip("the automatic choice on this CPU has no bf16 pass")
    g = gen(11)
    x = torch.randn(64, 24, generator=g)
    for num, expected_rows in ((pays_from - 1, 0), (pays_from, 64)):
        c = torch.randn(num, 24, generator=g)
        rows0, _ = _C.cpu_bf16_stats()
        ops.nearest_centroids(x, c, 1, "l2")
        assert _C.cpu_bf16_stats()[0] - rows0 == expected_rows


def test_the_automatic_choice_gives_up_where_no_row_can_be_proven():
    # Far from the origin the fp32 kernel's own rounding outweighs the keys' gaps: every row falls
    # back, and the path would cost the bf16 pass on top of the fp32 kernel. Unpinned, a call stops
    # taking the path after kGuardRows (4,096) rows of which most fell back: fewer rows go through it
    # than the call has, and the answers stay the fp32 kernel's. Pinned, every row still takes it.
    if _C.cpu_kernel() not in {"amxbf16", "avx512bf16"}:
        pytest.skip("the automatic choice on this CPU has no bf16 pass")
    g = gen(13)
    x = torch.randn(12000, 512, generator=g) * 3 + 100  # (at D = 64 the same offset is proven: 0.8% fall back)
    c = torch.randn(1000, 512, generator=g) * 3 + 100
    rows0, fallback0 = _C.cpu_bf16_stats()
    auto = ops.nearest_centroids(x, c, 5, "l2"), ops.fm_vote(x, c, 5, "l2")
    rows, fallback = (a - b for a, b in zip(_C.cpu_bf16_stats(), (rows0, fallback0)))
    assert 4096 <= rows < 2 * len(x) and fallback == rows  # (two calls, each giving up within a few tiles)
    fp32 = pinned("avx512", lambda: (ops.nearest_centroids(x, c, 5, "l2"), ops.fm_vote(x, c, 5, "l2")))
    assert all(torch.equal(a, b) for a, b in zip(auto[0], fp32[0])) and torch.equal(auto[1], fp32[1])
    _, (pinned_rows, _) = with_stats(_C.cpu_kernel(), lambda: ops.fm_vote(x, c, 5, "l2"))
    assert pinned_rows == len(x)


# ---------------------------------------------------------------- the bf16 pass alone (k-means' coarse groups)

@pytest.mark.parametrize("n,num,dim,k,offset", [(300, 40, 33, 1, 0.0), (257, 600, 512, 8, 100.0), (1, 3, 7, 3, 5.0),
                                                (0, 5, 16, 2, 0.0), (50, 1, 9, 1, 1e4)])
def test_nearest_centroids_bf16_is_near_the_nearest(certified, n, num, dim, k, offset):
    """_C.nearest_centroids_bf16, the bf16 pass without its re-rank: each
    row's k near-nearest centroids, their squared distances within the pass's
    rounding (~2^-8 of |x - m| |c - m|, m the centroids' mean: the centring
    that keeps it small far from the origin) of the exact ones, and each
    within twice that of the exact k-th nearest; k = K and one row included."""
    g = gen(12 + n)
    x = torch.randn(n, dim, generator=g) * 3 + offset
    c = torch.randn(num, dim, generator=g) * 3 + offset
    values, idx = pinned(certified, lambda: _C.nearest_centroids_bf16(x, c, k))
    assert values.shape == idx.shape == (n, k) and values.dtype == torch.float32 and idx.dtype == torch.int64
    if n == 0:
        return
    assert bool((idx >= 0).all() and (idx < num).all())
    assert all(len(set(row)) == k for row in idx.tolist())  # k distinct centroids a row
    exact = torch.cdist(x.double(), c.double()).square()
    m = c.double().mean(0)
    spread = (x.double() - m).norm(dim=1, keepdim=True) * (c.double() - m).norm(dim=1).max()
    tol = 2 ** -6 * spread + 1e-5 * (x.double().square().sum(1, keepdim=True) + c.double().square().sum(1).max())
    assert bool(((values.double() - exact.gather(1, idx)).abs() <= tol).all())
    best = exact.topk(k, 1, largest=False).values
    assert bool((exact.gather(1, idx).sort(1).values <= best + 2 * tol).all())


def test_nearest_centroids_bf16_without_a_bf16_pass_is_the_exact_op():
    g = gen(13)
    x, c = torch.randn(100, 24, generator=g), torch.randn(30, 24, generator=g)
    got = pinned(FP32, lambda: _C.nearest_centroids_bf16(x, c, 3))
    expected = pinned(FP32, lambda: ops.nearest_centroids(x, c, 3, "l2"))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_nearest_centroids_bf16_near_floats_range(certified):
    # Norms of 1.7e19 (squares 2.9e38: the fp32 kernel accepts them) overflow the bf16 pass's sums
    # (x . (-2 c) ~ -5.8e38): those rows are scored by the fp32 kernel.
    g = gen(14)
    c = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1) * 1.7e19
    x = c[:6] + torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1) * 1e17
    values, idx = pinned(certified, lambda: _C.nearest_centroids_bf16(x, c, 2))
    exact_values, exact_idx = pinned(FP32, lambda: ops.nearest_centroids(x, c, 2, "l2"))
    assert torch.equal(idx[:, 0], torch.arange(6)) and torch.equal(idx, exact_idx)
    assert bool(torch.isfinite(values).all())
