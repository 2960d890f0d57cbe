"""A small pass over every CUDA kernel of fastvote for compute-sanitizer
(benchmarks/gpu_check.sh runs it under `--tool memcheck`, then `--tool
racecheck`): each fused-kernel layout (vector loads, scalar rows, transposed),
k in {1, 5, 64} and the sorted path (k > 64), the centroid split with its
merge (N=3, K=3000), shared and global histograms, strided and offset
lm_vote, the score reductions and class_centroids (D = 0 too), and the
certified bf16 path (FASTVOTE_CUDA_KERNEL=bf16: packing, tensor-core
candidates, their split and merge, the re-rank and the fallback). Results are
checked against the CPU backend (the bf16 path: against the fused fp32 kernel)
so a silent wrong answer fails as well.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_ops.py
"""
import os
import sys

import torch

import fastvote.ops as ops


def cpu(name, *args):
    return getattr(torch.ops.fastvote, name)(*[a.cpu() if torch.is_tensor(a) else a for a in args])


def check(what, got, expected, against="CPU"):
    got = [t.cpu() for t in (got if isinstance(got, tuple) else (got,))]
    expected = expected if isinstance(expected, tuple) else (expected,)
    for g, e in zip(got, expected):
        if not torch.equal(g, e):
            raise SystemExit(f"sanitize_ops: {what}: CUDA and {against} disagree")


def main() -> int:
    # Under `gpu_check.sh --rehearse` (benchmarks/fake_cuda.py) the CPU kernels stand in.
    if not torch.cuda.is_available() or not (ops._WITH_CUDA or os.environ.get("FASTVOTE_FAKE_CUDA") == "1"):
        print("sanitize_ops: needs a CUDA device and the CUDA build of fastvote._C")
        return 1
    g = torch.Generator().manual_seed(0)

    def ints(*shape, low=-3, high=4):
        return torch.randint(low, high, shape, generator=g).float()

    cases = {
        "rows (D=67)": (ints(300, 67), ints(300, 67)),
        "rows4 (D=64)": (ints(300, 64), ints(300, 64)),
        "cols (transposed)": (ints(67, 300).t(), ints(300, 67)),
        "offset rows (D=64, unaligned)": (ints(300 * 64 + 1).narrow(0, 1, 300 * 64).view(300, 64), ints(300, 64)),
    }
    for name, (x, c) in cases.items():
        xc, cc = x.cuda(), c.cuda()
        for k in (1, 5, 64, 65):
            for metric in ("l2", "cosine"):
                check(f"nearest_centroids {name} k={k} {metric}", ops.nearest_centroids(xc, cc, k, metric),
                      cpu("nearest_centroids", x, c, k, metric))
                for weight in ("count", "rank", "soft"):
                    check(f"fm_vote {name} k={k} {metric} {weight}",
                          ops.fm_vote(xc, cc, k, metric, weight, 0.5),
                          cpu("fm_vote", x, c, k, metric, weight, 0.5))
        ops.fm_scores(xc, cc, "l2")
        ops.fm_scores(xc, cc, "cosine")

    # The split path: few rows, many centroid tiles, partial lists merged.
    x, c = ints(3, 40), ints(3000, 40)
    for k in (1, 5, 64):
        check(f"split k={k}", ops.nearest_centroids(x.cuda(), c.cuda(), k), cpu("nearest_centroids", x, c, k, "l2"))
        check(f"split votes k={k}", ops.fm_vote(x.cuda(), c.cuda(), k, "l2", "soft"),
              cpu("fm_vote", x, c, k, "l2", "soft", 1.0))
    # Global histogram (K > 6144).
    x, c = ints(500, 8), ints(7000, 8)
    check("global histogram", ops.fm_vote(x.cuda(), c.cuda(), 3, "l2", "rank"), cpu("fm_vote", x, c, 3, "l2", "rank", 1.0))

    # lm_vote: contiguous (vector loads), strided, offset (unaligned), transposed.
    logits = torch.randn(400, 2 * 333 + 1, generator=g)
    layouts = {
        "contiguous": logits[:, :320].contiguous(),
        "strided": logits[:, ::2],
        "offset": logits[:, 1:334],
        "transposed": logits[:, :300].t().contiguous().t(),
    }
    for name, lg in layouts.items():
        for k in (1, 5, 64, 65):
            for weight in ("count", "rank", "soft"):
                check(f"lm_vote {name} k={k} {weight}", ops.lm_vote(lg.cuda(), k, weight), cpu("lm_vote", lg, k, weight))
        ops.lm_scores(lg.cuda())

    # class_centroids: shared and global label histograms, D = 0, strided rows.
    for num_classes, dim in ((10, 33), (7000, 5), (4, 0)):
        x = torch.randn(600, 2 * dim + 1, generator=g)[:, 1::2] if dim else torch.zeros(600, 0)
        labels = torch.randint(0, num_classes, (600,), generator=g)
        sums, counts = ops.class_centroids(x.cuda(), labels.cuda(), num_classes)
        ref_sums, ref_counts = cpu("class_centroids", x, labels, num_classes)
        if not torch.equal(counts.cpu(), ref_counts) or not torch.allclose(sums.cpu(), ref_sums):
            raise SystemExit(f"sanitize_ops: class_centroids K={num_classes} D={dim}: CUDA and CPU disagree")

    # Last (a fault in the opt-in path cannot hide the kernels above): the
    # certified bf16 path against the fused fp32 kernel: odd D, a row tile
    # edge, k at the path's limit (55), the split (N=3, K=3000), integer rows
    # (ties: many fall back) and random ones (most are proven).
    for n, num, dim, k in ((300, 200, 67, 5), (129, 70, 33, 55), (3, 3000, 40, 5)):
        for name, x, c in (("ints", ints(n, dim), ints(num, dim)),
                           ("random", torch.randn(n, dim, generator=g), torch.randn(num, dim, generator=g))):
            xc, cc = x.cuda(), c.cuda()
            for metric in ("l2", "cosine"):
                os.environ["FASTVOTE_CUDA_KERNEL"] = "bf16"
                got = ops.nearest_centroids(xc, cc, k, metric), ops.fm_vote(xc, cc, k, metric, "soft", 0.5)
                os.environ["FASTVOTE_CUDA_KERNEL"] = "fp32"
                expected = ops.nearest_centroids(xc, cc, k, metric), ops.fm_vote(xc, cc, k, metric, "soft", 0.5)
                what = f"bf16 path {name} ({n}, {num}, {dim}, {k}) {metric}"
                check(f"{what} nearest_centroids", got[0], tuple(t.cpu() for t in expected[0]), "the fused kernel")
                check(f"{what} fm_vote", got[1], expected[1].cpu(), "the fused kernel")
    del os.environ["FASTVOTE_CUDA_KERNEL"]

    torch.cuda.synchronize()
    print("sanitize_ops: every kernel ran and agreed with the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
