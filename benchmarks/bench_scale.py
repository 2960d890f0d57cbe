"""Pruning a source whose surrogate outputs do not fit in memory: peak memory
and rows/s of fastvote.prune on a 10-million-row feature file (K = 1000
classes, D = 512, float32: 20.5 GB on disk), generated once.

The source is precomputed outputs in .npy files (features.npy, labels.npy;
target features.npy and logits.npy), which prune reads a chunk at a time.
Each method runs in a fresh process that reports its own peak resident set
(VmHWM: unlike ru_maxrss it is not inherited across exec from the parent),
so one run's memory does not hide another's. Target: under
2 GB whatever the row count.

    python benchmarks/bench_scale.py --dir /data/bench_scale            # 10M rows (generates once)
    python benchmarks/bench_scale.py --rows 200000 --results benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_vote import write_atomic  # the script's own folder is on sys.path

GENERATE_CHUNK = 1 << 18  # rows generated and written at a time (512 MB of 512-d float32)
# name -> (method, prune keyword arguments)
METHODS = {
    "lm": ("lm", {}),
    "fm": ("fm", {}),
    "fm-kmeans": ("fm:iterations=2", {"centroids": "kmeans"}),
}


def generate(folder: Path, rows: int, classes: int, dim: int, target_rows: int, seed: int) -> None:
    """Class-clustered Gaussian features (a class's rows around its centre),
    written once; the target resembles a tenth of the classes."""
    from fastvote.data.npy import NpyWriter

    source, target = folder / "source", folder / "target"
    if (source / "features.npy").is_file() and (target / "logits.npy").is_file():
        return
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    started = time.perf_counter()
    with NpyWriter(source / "features.npy", (rows, dim), np.float32) as features, \
            NpyWriter(source / "labels.npy", (rows,), np.int64) as labels:
        for start in range(0, rows, GENERATE_CHUNK):
            n = min(GENERATE_CHUNK, rows - start)
            y = rng.integers(0, classes, n)
            x = rng.standard_normal((n, dim), dtype=np.float32)
            x += centers[y]
            features.write(x)
            labels.write(y)
            print(f"\rgenerating {start + n:,}/{rows:,} rows ({time.perf_counter() - started:.0f} s)",
                  end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    near = rng.choice(classes, max(1, classes // 10), replace=False)
    y = near[rng.integers(0, len(near), target_rows)]
    x = centers[y] + rng.standard_normal((target_rows, dim), dtype=np.float32)
    with NpyWriter(target / "features.npy", x.shape, np.float32) as f:
        f.write(x)
    logits = rng.standard_normal((target_rows, classes), dtype=np.float32)
    logits[np.arange(target_rows), y] += 3  # the surrogate mostly recognises the near classes
    with NpyWriter(target / "logits.npy", logits.shape, np.float32) as f:
        f.write(logits)


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux VmHWM; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(folder: Path, name: str, keep: int) -> dict:
    """One prune in this process (called in a fresh child): timings and peak RSS."""
    import torch

    import fastvote

    baseline = peak_rss_mb()  # the interpreter + torch
    method, kw = METHODS[name]
    started = time.perf_counter()
    result = fastvote.prune(folder / "source", folder / "target", method=method, keep=keep,
                            device="cpu", workdir=folder / "work", progress=False, **kw)
    seconds = time.perf_counter() - started
    rows = result.manifest["source"]["num_samples"]
    targets = result.manifest["targets"][0]["num_samples"]
    return {"method": name, "rows": rows, "target_rows": targets, "seconds": seconds,
            "rows_per_s": (targets if name == "lm" else rows) / seconds,
            "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline, "kept_samples": len(result.indices),
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=None, help="where the feature files live (default: $FASTVOTE_CACHE/bench_scale-ROWS)")
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--target-rows", type=int, default=50_000)
    p.add_argument("--keep", type=int, default=100, help="classes (clusters) kept")
    p.add_argument("--methods", default="lm,fm,fm-kmeans", help=f"comma-separated, of {sorted(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--results", help="append the table to this Markdown file")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = p.parse_args(argv)

    from fastvote.data import cache_dir

    folder = Path(args.dir or cache_dir() / f"bench_scale-{args.rows}x{args.classes}x{args.dim}")
    if args.child:
        print(json.dumps(run_one(folder, args.child, args.keep)))
        return 0
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        p.error(f"--methods: {unknown} unknown; expected some of {sorted(METHODS)}")
    generate(folder, args.rows, args.classes, args.dim, args.target_rows, args.seed)
    size_gb = (folder / "source" / "features.npy").stat().st_size / 1e9
    rows = []
    for name in names:
        done = subprocess.run([sys.executable, __file__, "--dir", str(folder), "--keep", str(args.keep),
                               "--child", name], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:10s} {row['seconds']:8.1f} s  {row['rows_per_s']:12,.0f} rows/s  peak {row['peak_rss_mb']:7.0f} MB "
              f"(interpreter + torch {row['baseline_rss_mb']:.0f} MB)", flush=True)
    cpu = platform.processor() or platform.machine()
    table = [f"\n### bench_scale: prune from {args.rows:,} rows x {args.dim} (K = {args.classes}, "
             f"{size_gb:.1f} GB float32 on disk)\n",
             f"{dt.date.today()}, {cpu}, {os.cpu_count()} cores, torch threads {rows[0]['threads'] if rows else '-'}; "
             f"`python benchmarks/bench_scale.py --rows {args.rows}`. rows/s: source rows (LM: target rows, it "
             "reads no source outputs). Peak RSS of a fresh process per method.\n",
             "| method | seconds | rows/s | peak RSS (MB) | of which interpreter + torch | kept samples |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['method']} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['baseline_rss_mb']:.0f} | {r['kept_samples']:,} |")
    text = "\n".join(table) + "\n"
    print(text)
    if args.json:
        write_atomic(args.json, json.dumps(rows, indent=1))
    if args.results:
        write_atomic(args.results, text, append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
