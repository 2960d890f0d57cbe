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
       ops.lm_vote(logits, 4, "rank")]
torch.save([t.view(torch.int64) for t in out], sys.argv[1])
"""


def test_votes_equal_across_processes_and_thread_counts(tmp_path):
    """A fresh process with OMP/torch threads 1 and 2: the same bits."""
    saved = []
    for threads in ("1", "2"):
        path = tmp_path / f"votes_{threads}_{len(saved)}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        subprocess.run([sys.executable, "-c", _SUBPROCESS, str(path)], env=env, check=True, timeout=300)
        saved.append(torch.load(path))
    for other in saved[1:]:
        for a, b in zip(saved[0], other):
            assert torch.equal(a, b)


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
