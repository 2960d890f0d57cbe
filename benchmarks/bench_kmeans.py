"""K-means for label-free FM at scale (issue 15), side by side in one run.

compare: fastvote.cluster against faiss.Kmeans (faiss-cpu) and scikit-learn
KMeans on the same in-memory data, same K, same iterations (tolerance 0: every
method runs all of them), same threads. Inertia is computed for every method's
centroids by one routine (fastvote.cluster.assign: exact squared distances to
the nearest centroid, summed in float64), so it compares like with like.

scale: fastvote.data.shards.cluster_prune over float16 shards written to
--dir (seeding time, time per pass, the vote, the kept-sample files), in a
fresh process that reports its peak resident set (VmHWM).

Data (both modes): well-separated but uneven clusters, as embeddings of a
pool of many concepts look: `--true-clusters` centres drawn N(0, 1) per
dimension, cluster sizes Dirichlet(2) (some 10x others), each row its centre
plus N(0, sigma^2) noise with sigma drawn per cluster in [0.35, 0.6]
(centres sqrt(2 D) apart, cluster radii 0.35-0.6 sqrt(D): separated, not
trivially). Seeded: the same data for every method.

    python benchmarks/bench_kmeans.py compare --rows 200000 --dim 512 --clusters 1000 --iterations 10
    python benchmarks/bench_kmeans.py scale --dir /tmp/pool --rows 2000000 --shards 20 --clusters 1000
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def blobs(rows: int, dim: int, true_clusters: int, seed: int, start: int = 0, anisotropic: bool = False):
    """Rows [start, start + rows) of the synthetic pool (float32), its
    centres and the rows' true clusters, generated
    per block of rows so any range is reproducible without the whole pool.

    anisotropic: each cluster's noise has its own axis variances (log-normal,
    a 20x spread between the largest and smallest tenth) in one shared random
    rotation, and sigma in [0.8, 1.4]: elongated, overlapping-in-projection
    clusters, as embedding pools have, instead of round separated ones."""
    g = np.random.default_rng(seed)
    centres = g.standard_normal((true_clusters, dim), dtype=np.float32)
    sizes = g.dirichlet(np.full(true_clusters, 2.0))
    if anisotropic:
        sigma = g.uniform(0.8, 1.4, true_clusters).astype(np.float32)
        axes = np.exp(g.standard_normal((true_clusters, dim)) * 0.9).astype(np.float32)
        axes /= np.sqrt((axes ** 2).mean(1, keepdims=True))  # mean variance sigma^2 a dimension
        rotation = np.linalg.qr(g.standard_normal((dim, dim)))[0].astype(np.float32)
    else:
        sigma = g.uniform(0.35, 0.6, true_clusters).astype(np.float32)
    out = np.empty((rows, dim), dtype=np.float32)
    out_labels = np.empty(rows, dtype=np.int64)
    block = 65536
    for lo in range(start - start % block, start + rows, block):  # block b's rows come from seed (seed, b)
        r = np.random.default_rng((seed, lo // block))
        labels = r.choice(true_clusters, size=block, p=sizes)
        noise = r.standard_normal((block, dim), dtype=np.float32)
        if anisotropic:
            noise = (noise * axes[labels]) @ rotation
        x = centres[labels] + sigma[labels, None] * noise
        a, b = max(lo, start), min(lo + block, start + rows)
        if b > a:
            out[a - start:b - start] = x[a - lo:b - lo]
            out_labels[a - start:b - start] = labels[a - lo:b - lo]
    return out, centres, out_labels


def inertia(x: np.ndarray, centroids) -> float:
    import torch

    from fastvote import cluster

    xt = torch.from_numpy(x)
    total = 0.0
    for _, d2 in cluster.assign(lambda: xt.split(16384), torch.as_tensor(np.asarray(centroids, np.float32)),
                                progress=False):
        total += float(d2.double().sum())
    return total


def cpu_model() -> str:
    fields = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return (f"{fields.get('Model name', platform.processor())}, family {fields.get('CPU family')}, model "
            f"{fields.get('Model')}, {fields.get('CPU(s)')} CPUs")


def compare(args) -> dict:
    import torch

    from fastvote import cluster, ops

    torch.set_num_threads(args.threads)
    x, centres, _ = blobs(args.rows, args.dim, args.true_clusters or args.clusters, args.seed,
                          anisotropic=args.data == "anisotropic")
    results = {"data": args.data, "rows": args.rows, "dim": args.dim, "clusters": args.clusters, "iterations": args.iterations,
               "threads": args.threads, "cpu": cpu_model(), "fastvote_cpu_kernel": ops.cpu_kernel(),
               "true_centres_inertia": inertia(x, centres), "methods": {}}
    for method in args.methods.split(","):
        started = time.perf_counter()
        extra = {}
        if method in ("fastvote", "fastvote-flat", "fastvote-hierarchical"):
            xt = torch.from_numpy(x)
            levels = {"fastvote": None, "fastvote-flat": False, "fastvote-hierarchical": True}[method]
            fit = cluster.fit(lambda: xt.split(65536), args.clusters, rows=range(args.rows), num_rows=args.rows,
                              iterations=args.iterations, tol=0.0, seed=args.seed, progress=False,
                              hierarchical=levels)
            centroids = fit.centroids.numpy()
            extra = {"seeding_s": fit.seeding_seconds, "pass_s": fit.pass_seconds, "computed": fit.computed,
                     "passes": fit.passes, "restarts": fit.restarts, "fit_rows": fit.fit_rows}
        elif method == "faiss":
            import faiss

            faiss.omp_set_num_threads(args.threads)
            km = faiss.Kmeans(args.dim, args.clusters, niter=args.iterations, seed=args.seed)  # 256 rows a centroid
            km.train(x)
            centroids = km.centroids
        elif method == "sklearn":
            from sklearn.cluster import KMeans
            from threadpoolctl import threadpool_limits

            with threadpool_limits(args.threads):
                km = KMeans(args.clusters, init="k-means++", n_init=1, max_iter=args.iterations, tol=0.0,
                            algorithm="lloyd", random_state=args.seed).fit(x)
            centroids = km.cluster_centers_
        elif method in ("superkmeans", "superkmeans-flat"):
            from superkmeans import SuperKMeans

            # default: its own choice (hierarchical above 100k rows, early termination); flat: plain
            # 10-iteration Lloyd over its default 30% sample, pruned distances, no early stop
            flat = dict(hierarchical=False, iters=args.iterations, early_termination=False) \
                if method == "superkmeans-flat" else {}
            km = SuperKMeans(args.clusters, args.dim, n_threads=args.threads, seed=args.seed, **flat)
            centroids = np.asarray(km.train(x), dtype=np.float32)
            extra = {"hierarchical": bool(km.hierarchical_)}
        else:
            raise SystemExit(f"--methods: {method!r} is unknown; expected fastvote, fastvote-flat, "
                             "fastvote-hierarchical, faiss, sklearn, superkmeans, superkmeans-flat")
        seconds = time.perf_counter() - started
        results["methods"][method] = {"seconds": seconds, "inertia": inertia(x, centroids), **extra}
        print(method, json.dumps(results["methods"][method]), flush=True)
    fv = results["methods"].get("fastvote")
    for other, r in results["methods"].items():
        if fv and other != "fastvote":
            r["fastvote_speedup"] = r["seconds"] / fv["seconds"]
            r["inertia_vs_fastvote"] = r["inertia"] / fv["inertia"]
    return results


def write_pool(folder: Path, rows: int, shards: int, dim: int, true_clusters: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "done.json"
    spec = {"rows": rows, "shards": shards, "dim": dim, "true_clusters": true_clusters, "seed": seed}
    if done.exists() and json.loads(done.read_text()) == spec:
        return
    for i in range(shards):
        lo, hi = rows * i // shards, rows * (i + 1) // shards
        x, _, _ = blobs(hi - lo, dim, true_clusters, seed, start=lo)
        np.save(folder / f"{i:05d}.npy", x.astype(np.float16))
    # The target: 10,000 fresh rows of the first 5% of the concepts (the pool's clusters, other noise).
    t, _, labels = blobs(200_000, dim, true_clusters, seed, start=rows)
    np.save(folder.parent / f"{folder.name}-target.npy", t[labels < max(1, true_clusters // 20)][:10_000])
    done.write_text(json.dumps(spec))


def scale(args) -> dict:
    pool = Path(args.dir) / "pool"
    started = time.perf_counter()
    write_pool(pool, args.rows, args.shards, args.dim, args.true_clusters or args.clusters, args.seed)
    written = time.perf_counter() - started
    code = f"""
import json, resource, time, torch
torch.set_num_threads({args.threads})
from fastvote.data.shards import cluster_prune
t = time.perf_counter()
r = cluster_prune({str(pool)!r}, {str(pool.parent / 'pool-target.npy')!r}, {str(Path(args.dir) / 'out')!r},
                  clusters={args.clusters}, iterations={args.iterations}, ratio=0.9, device='cpu', progress=False)
total = time.perf_counter() - t
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(json.dumps({{"total_s": total, "seeding_s": r.fit.seeding_seconds, "pass_s": r.fit.pass_seconds,
                  "computed": r.fit.computed, "fit_rows": r.fit.fit_rows, "kept_rows": r.kept_rows,
                  "kept_clusters": len(r.kept_clusters), "peak_rss_mb": int(hwm) / 1024}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    kept = sorted((Path(args.dir) / "out" / "kept").glob("*.npy"))
    return {"rows": args.rows, "shards": args.shards, "dim": args.dim, "dtype": "float16",
            "clusters": args.clusters, "iterations": args.iterations, "threads": args.threads, "cpu": cpu_model(),
            "write_pool_s": written, "kept_files": len(kept), **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("compare", "scale"))
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--true-clusters", type=int, default=None, help="clusters in the data (default: --clusters)")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=("blobs", "anisotropic"), default="blobs", help="compare: the synthetic pool")
    p.add_argument("--methods", default="fastvote,faiss,sklearn")
    p.add_argument("--dir", default="/tmp/bench_kmeans", help="scale: where the shards and outputs go")
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    result = compare(args) if args.mode == "compare" else scale(args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
