"""NormSim at web scale (issue 25): `fastvote normsim-prune` over float16
embedding shards against a target's embeddings, rows/s and peak memory, in a
fresh process (VmHWM), with the known answer checked.

Data: bench_kmeans's pool (concept clusters of uneven sizes, float16 shards,
reproducible per row block) and its target: 10,000 fresh rows of the first 5%
of the concepts. The prune keeps 10% of the pool (ratio 0.9) by NormSim_p;
recall = the share of the target concepts' rows kept, precision = the share of
kept rows that are target-concept rows (at most ~50%: the budget is about
twice those rows).

Also, on one 65,536-row chunk: the fused op (fastvote.ops.sample_scores)
against plain torch (normalise, matmul in 8,192-row blocks, max and mean of
squares): the same numbers, and what the fusion buys.

    python benchmarks/bench_normsim.py --dir /tmp/bench_normsim --rows 10000000 --shards 100
    python benchmarks/bench_normsim.py --rows 1000000 --shards 10 --results benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_kmeans import blobs, cpu_model, write_pool  # the script's own folder is on sys.path
from bench_vote import write_atomic

# CPU seconds beside wall seconds: on a shared machine rows per CPU-second is the figure the load changes least.
CHILD = """
import json, os, sys, time, torch
torch.set_num_threads({threads})
from fastvote.data.score_shards import normsim_prune
hwm = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024
baseline = hwm()
started, cpu = time.perf_counter(), time.process_time()
r = normsim_prune({pool!r}, {target!r}, {out!r}, ratio={ratio}, p={p!r}, device='cpu', progress=False)
print(json.dumps({{"total_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
                  "load_average": os.getloadavg(), **r.manifest["seconds"], "kept_rows": r.kept_rows,
                  "cutoff": r.cutoff, "peak_rss_mb": hwm(), "baseline_rss_mb": baseline}}))
"""


def known_answer(pool: Path, out: Path, rows: int, shards: int, dim: int, true_clusters: int, seed: int):
    """(recall, precision) of the kept rows against the target's concepts (labels regenerated)."""
    near = max(1, true_clusters // 20)
    hit = kept_total = relevant = 0
    for i in range(shards):
        lo, hi = rows * i // shards, rows * (i + 1) // shards
        _, _, labels = blobs(hi - lo, 1, true_clusters, seed, start=lo)  # labels do not depend on dim
        kept = np.load(out / "kept" / f"{i:05d}.npy")
        hit += int((labels[kept] < near).sum())
        kept_total += len(kept)
        relevant += int((labels < near).sum())
    return hit / relevant, hit / kept_total


def fused_vs_torch(pool: Path, target: Path, threads: int) -> dict:
    """Seconds for one 65,536-row chunk: the fused op and plain torch."""
    import torch
    import torch.nn.functional as F

    import fastvote.ops as ops

    torch.set_num_threads(threads)
    x = torch.from_numpy(np.load(sorted(pool.glob("*.npy"))[0])[:65536])
    t = torch.from_numpy(np.load(target))
    started = time.perf_counter()
    values, _, rms = ops.sample_scores(x, t, 1)
    fused = time.perf_counter() - started
    started = time.perf_counter()
    tn = F.normalize(t, dim=1)
    best, mean_sq = [], []
    for block in x.split(8192):
        s = F.normalize(block.float(), dim=1) @ tn.T  # 8,192 x M float32: 328 MB at M = 10,000
        best.append(s.max(1).values)
        mean_sq.append(s.pow(2).mean(1))
    plain = time.perf_counter() - started
    same = (float((torch.cat(best) - values[:, 0]).abs().max()),
            float((torch.cat(mean_sq).double().sqrt() - rms).abs().max()))
    return {"chunk_rows": len(x), "fused_s": fused, "torch_s": plain, "max_abs_diff_max": same[0],
            "max_abs_diff_rms": same[1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/bench_normsim", help="where the shards and outputs go")
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--true-clusters", type=int, default=10_000, help="concepts in the pool")
    p.add_argument("--ratio", type=float, default=0.9, help="fraction of the pool removed")
    p.add_argument("--p", default="inf", choices=("inf", "2"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", help="append the table to this Markdown file")
    args = p.parse_args(argv)

    pool = Path(args.dir) / "pool"
    target = pool.parent / "pool-target.npy"
    started = time.perf_counter()
    write_pool(pool, args.rows, args.shards, args.dim, args.true_clusters, args.seed)
    written = time.perf_counter() - started
    out = Path(args.dir) / f"out-{args.p}"
    code = CHILD.format(threads=args.threads, pool=str(pool), target=str(target), out=str(out), ratio=args.ratio,
                        p=args.p)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    run = json.loads(done.stdout.strip().splitlines()[-1])
    recall, precision = known_answer(pool, out, args.rows, args.shards, args.dim, args.true_clusters, args.seed)
    chunk = fused_vs_torch(pool, target, args.threads)
    target_rows = len(np.load(target, mmap_mode="r"))
    result = {"rows": args.rows, "shards": args.shards, "dim": args.dim, "target_rows": target_rows, "p": args.p,
              "threads": args.threads, "cpu": cpu_model(), "write_pool_s": written, **run,
              "rows_per_s": args.rows / run["scoring"], "recall": recall, "precision": precision, "chunk": chunk}
    print(json.dumps(result, indent=1))
    if args.results:
        size_gb = sum(f.stat().st_size for f in pool.glob("*.npy")) / 1e9
        text = (f"\n### normsim-prune: {args.rows:,} x {args.dim} float16 in {args.shards} shards ({size_gb:.1f} GB) "
                f"against {target_rows:,} target rows\n\n"
                f"{dt.date.today()}, {result['cpu']}, {args.threads} torch threads; "
                f"`python benchmarks/bench_normsim.py --rows {args.rows} --shards {args.shards} --p {args.p}` "
                f"(keep {1 - args.ratio:.0%} by NormSim_{args.p}; a fresh process).\n\n"
                "| figure | value |\n|---|---|\n"
                f"| scoring pass (every row against every target row) | {run['scoring']:.1f} s, "
                f"**{result['rows_per_s']:,.0f} rows/s** ({2 * args.dim * target_rows * result['rows_per_s'] / 1e9:,.0f} "
                "GFLOP/s) |\n"
                f"| CPU time of the whole prune (user + system, {args.threads} threads) | {run['cpu_s']:.0f} s: "
                f"{args.rows / run['cpu_s'] * args.threads:,.0f} rows/s if the process had had its {args.threads} "
                f"cores to itself (load average at the end: {run['load_average'][0]:.1f}) |\n"
                f"| selecting (two histogram passes over the score files, kept-row files) | {run['selecting']:.1f} s |\n"
                f"| peak RSS (VmHWM) | **{run['peak_rss_mb']:,.0f} MB** (interpreter + torch: "
                f"{run['baseline_rss_mb']:,.0f} MB) |\n"
                f"| kept | {run['kept_rows']:,} rows, cut-off NormSim_{args.p} = {run['cutoff']:.4f} |\n"
                f"| known answer (target: the first 5% of the concepts) | recall {recall:.3f}, precision "
                f"{precision:.3f} |\n"
                f"| one 65,536-row chunk: fused op vs plain torch (normalise, matmul in 8,192-row blocks, max, "
                f"mean of squares) | {chunk['fused_s']:.2f} s vs {chunk['torch_s']:.2f} s; results within "
                f"{max(chunk['max_abs_diff_max'], chunk['max_abs_diff_rms']):.1e} |\n")
        write_atomic(args.results, text, append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
