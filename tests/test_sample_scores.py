"""fastvote.ops.sample_scores (the per-sample target scores of NormSim) against
its float64 oracle, on every device this machine has and every CPU
micro-kernel it can run, on awkward inputs: odd D, k = M, one row, no rows,
near-ties, exact ties, zero rows, huge norms, low precision, strides."""
import pytest
import torch

import fastvote.ops as ops
from conftest import cpu_kernels

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (N, M, D, k): D = 1 and odd D, M = 1, k = M, N = 1, N = 0, tile and block edges.
SHAPES = [
    (1, 1, 1, 1), (0, 5, 3, 2), (1, 7, 5, 7), (37, 1, 67, 1), (50, 13, 1, 13), (33, 12, 17, 12),
    (300, 40, 67, 5), (257, 100, 130, 7), (129, 25, 9, 25), (64, 37, 1000, 3), (70, 301, 33, 64),
]
VALUE_TOL = 1e-5  # float32 cosines of unit vectors
RMS_TOL = 1e-5    # relative, plus 1e-7 absolute for rows orthogonal to every target


@pytest.fixture(params=cpu_kernels())
def cpu_kernel(request, monkeypatch):
    monkeypatch.setenv("FASTVOTE_CPU_KERNEL", request.param)
    return request.param


def gen(seed):
    return torch.Generator().manual_seed(seed)


def similarity_matrix(features, targets):
    """[N, M] float64 cosine similarities, the oracle's own definition."""
    x = torch.nn.functional.normalize(features.double(), dim=1, eps=ops._NORM_EPS)
    t = torch.nn.functional.normalize(targets.double(), dim=1, eps=ops._NORM_EPS)
    return x @ t.T


def assert_matches_exact(features, targets, k, values, indices, rms, value_tol=VALUE_TOL, rms_tol=RMS_TOL):
    """values/rms within tolerance of float64; the picks a valid top-k of the
    exact similarities (near-ties may resolve either way in float32)."""
    features, targets = features.cpu(), targets.cpu()
    n = features.shape[0]
    assert values.shape == (n, k) and values.dtype == torch.float32
    assert indices.shape == (n, k) and indices.dtype == torch.int64
    assert rms.shape == (n,) and rms.dtype == torch.float64
    if n == 0:
        return
    exact_values, _, exact_rms = ops.sample_scores_exact(features, targets, k)
    values, indices, rms = values.cpu().double(), indices.cpu(), rms.cpu()
    assert (values - exact_values).abs().max() <= value_tol
    assert ((rms - exact_rms).abs() <= rms_tol * exact_rms + 1e-7).all()
    sims = similarity_matrix(features, targets)
    picked = sims.gather(1, indices)
    assert (torch.sort(indices, dim=1).values.diff(dim=1) > 0).all(), "a row picked a target twice"
    assert ((picked - exact_values).abs() <= value_tol).all(), "a pick is not among the k most similar"
    assert ((picked - values).abs() <= value_tol).all(), "returned values disagree with the picks"


# ---------------------------------------------------------------- against float64

@pytest.mark.parametrize("n,m,dim,k", SHAPES)
def test_random_inputs_match_float64(device, cpu_kernel, n, m, dim, k):
    g = gen(n * 1000 + m * 10 + dim)
    x, t = torch.randn(n, dim, generator=g), torch.randn(m, dim, generator=g)
    values, indices, rms = ops.sample_scores(x.to(device), t.to(device), k)
    assert values.device.type == device and rms.device.type == device
    assert_matches_exact(x, t, k, values, indices, rms)


def test_values_are_the_rows_best_similarities_and_rms_its_mean_square(cpu_kernel):
    # The definitions themselves, on a case small enough to write out.
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    values, indices, rms = ops.sample_scores(x, t, 3)
    s = 2 ** -0.5
    assert torch.allclose(values, torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, 0.0], [s, s, -s]]), atol=1e-6)
    assert indices.tolist() == [[0, 1, 2], [1, 0, 2], [0, 1, 2]]  # equal values: lower index first
    assert torch.allclose(rms, torch.tensor([(2 / 3) ** 0.5, (1 / 3) ** 0.5, 0.5 ** 0.5], dtype=torch.float64))


@pytest.mark.parametrize("dtype", FLOATS)
def test_low_precision_and_strided_inputs(device, dtype):
    g = gen(7)
    x = torch.randn(90, 2 * 37, generator=g).to(dtype)[:, ::2]  # stride 2 along D
    t = torch.randn(37, 23, generator=g).to(dtype).T  # column-major targets [23, 37]
    values, indices, rms = ops.sample_scores(x.to(device), t.to(device), 4)
    # The oracle reads the same rounded inputs, so float32 arithmetic is all that differs.
    assert_matches_exact(x.float(), t.float(), 4, values, indices, rms)


def test_exact_ties_lower_target_index_wins(device, cpu_kernel):
    g = gen(3)
    base = torch.randint(-3, 4, (6, 11), generator=g).float()
    t = base.repeat(4, 1)  # every target row four times: rows j, j+6, j+12, j+18 tie exactly
    x = torch.randint(-3, 4, (50, 11), generator=g).float()
    _, indices, _ = ops.sample_scores(x.to(device), t.to(device), 8)
    _, exact_indices, _ = ops.sample_scores_exact(x, t, 8)
    assert torch.equal(indices.cpu(), exact_indices)


def test_near_ties_pick_a_valid_top_k(device, cpu_kernel):
    g = gen(5)
    base = torch.randn(20, 33, generator=g)
    t = torch.cat([base, base + 1e-7 * torch.randn(20, 33, generator=g)])  # pairs 1e-7 apart
    x = base[:10] + 1e-3 * torch.randn(10, 33, generator=g)
    values, indices, rms = ops.sample_scores(x.to(device), t.to(device), 6)
    assert_matches_exact(x, t, 6, values, indices, rms)


def test_zero_rows_have_zero_similarity(device):
    x = torch.zeros(3, 9)
    t = torch.randn(5, 9, generator=gen(1))
    values, indices, rms = ops.sample_scores(x.to(device), t.to(device), 5)
    assert values.abs().max() == 0 and rms.abs().max() == 0
    assert indices.cpu().tolist() == [[0, 1, 2, 3, 4]] * 3  # all equal: index order


@pytest.mark.parametrize("scale", [1e-6, 1e6, 1e15])
def test_huge_and_small_norms_give_the_same_cosines(device, cpu_kernel, scale):
    g = gen(11)
    x, t = torch.randn(40, 17, generator=g), torch.randn(9, 17, generator=g)
    values, indices, rms = ops.sample_scores((x * scale).to(device), (t / scale ** 0.5).to(device), 3)
    assert_matches_exact(x, t, 3, values, indices, rms)


def test_norms_below_the_epsilon_are_divided_by_it(device, cpu_kernel):
    # As torch.nn.functional.normalize: a row of norm < 1e-12 is divided by
    # 1e-12, so its similarities shrink towards 0 instead of blowing up.
    g = gen(12)
    x, t = 1e-30 * torch.randn(40, 17, generator=g), torch.randn(9, 17, generator=g)
    values, indices, rms = ops.sample_scores(x.to(device), t.to(device), 3)
    assert values.abs().max() < 1e-15 and rms.abs().max() < 1e-15


def test_rows_whose_squares_overflow_are_rejected(device):
    x = torch.randn(40, 5)
    x[8, 1] = 1e30
    with pytest.raises(ValueError, match="features row 8"):
        ops.sample_scores(x.to(device), torch.randn(3, 5).to(device))


def test_many_targets_across_tiles(device, cpu_kernel):
    # M beyond every register block and D beyond one tile's stage.
    g = gen(13)
    x, t = torch.randn(301, 200, generator=g), torch.randn(1031, 200, generator=g)
    values, indices, rms = ops.sample_scores(x.to(device), t.to(device), 10)
    assert_matches_exact(x, t, 10, values, indices, rms)


def test_compiled_and_reference_agree_and_the_reference_is_float32(device):
    g = gen(17)
    x, t = torch.randn(64, 12, generator=g), torch.randn(20, 12, generator=g)
    ref = ops.sample_scores_reference(x, t, 3)
    out = ops.sample_scores(x.to(device), t.to(device), 3)
    assert [r.dtype for r in ref] == [o.dtype for o in out] == [torch.float32, torch.int64, torch.float64]
    assert torch.equal(ref[1], out[1].cpu())
    assert torch.allclose(ref[0], out[0].cpu(), atol=VALUE_TOL) and torch.allclose(ref[2], out[2].cpu(), rtol=RMS_TOL)


# ---------------------------------------------------------------- bad input

def _x(*shape, **kw):
    return torch.randn(*shape, **kw)


def _with_value(t, row, value):
    t = t.clone()
    t[row, 1] = value
    return t


BAD_CALLS = [
    ("D mismatch", lambda: ops.sample_scores(_x(4, 5), _x(3, 6)), ValueError, ["D=5", "targets has D=6"]),
    ("features rank", lambda: ops.sample_scores(_x(5), _x(3, 5)), ValueError, ["features", "2-D", "[5]"]),
    ("targets rank", lambda: ops.sample_scores(_x(4, 5), _x(2, 3, 5)), ValueError, ["targets", "2-D"]),
    ("M = 0", lambda: ops.sample_scores(_x(4, 5), _x(0, 5)), ValueError, ["targets has M=0", "target row"]),
    ("D = 0", lambda: ops.sample_scores(_x(4, 0), _x(3, 0)), ValueError, ["D=0"]),
    ("k = 0", lambda: ops.sample_scores(_x(4, 5), _x(3, 5), 0), ValueError, ["k=0", "1 <= k <= K=3", "target rows"]),
    ("k > M", lambda: ops.sample_scores(_x(4, 5), _x(3, 5), 4), ValueError, ["k=4", "K=3"]),
    ("int targets", lambda: ops.sample_scores(_x(4, 5), torch.ones(3, 5, dtype=torch.int32)), TypeError,
     ["targets has dtype", "expected float32"]),
    ("nan features", lambda: ops.sample_scores(_with_value(_x(300, 5), 123, float("nan")), _x(3, 5)), ValueError,
     ["features row 123", "NaN or Inf"]),
    ("inf targets", lambda: ops.sample_scores(_x(4, 5), _with_value(_x(3, 5), 2, float("inf"))), ValueError,
     ["targets row 2", "NaN or Inf"]),
]


@pytest.mark.parametrize("what,call,exc,words", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_bad_input_errors_name_the_argument(what, call, exc, words, backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setattr(ops, "_dispatch", lambda name, *t: ops.REFERENCES[name])
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), f"{w!r} missing from: {info.value}"


def test_device_mismatch_is_caught_before_any_kernel():
    with pytest.raises((ValueError, RuntimeError), match="device|Device"):
        ops.sample_scores(_x(4, 5), _x(3, 5, device="meta"))


# ---------------------------------------------------------------- registration

@pytest.mark.parametrize("k", [1, 4])
def test_opcheck(device, k):
    torch.library.opcheck(torch.ops.fastvote.sample_scores.default,
                          (_x(20, 9, device=device), _x(6, 9, device=device), k))


def test_torch_compile_traces_the_op():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def best(x, t):
        values, indices, rms = ops.sample_scores(x, t, 2)
        return values[:, 0] + rms

    x, t = _x(50, 8), _x(5, 8)
    values, _, rms = ops.sample_scores(x, t, 2)
    assert torch.allclose(best(x, t), values[:, 0] + rms)


def test_fake_kernel_checks_shapes_under_tracing():
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x, t = torch.empty(10, 8), torch.empty(4, 7)
        with pytest.raises(Exception, match="D=8"):
            torch.ops.fastvote.sample_scores(x, t, 1)
        with pytest.raises(Exception, match="k=5"):
            torch.ops.fastvote.sample_scores(x, torch.empty(4, 8), 5)
