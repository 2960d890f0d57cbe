"""Voting cost: fastvote's fused fm_vote / lm_vote against the best alternatives,
measured side by side in one run.

For each (N, K, D, k):
  fused        fastvote.ops.fm_vote (one pass, no N x K matrix)
  torch        distances as one [N, K] matrix (matmul), topk, bincount
  torch-chunk  the same over row chunks (bounded memory)
  faiss        IndexFlatL2 / IndexFlatIP search + bincount (CPU, when installed)
  gemm         the bare [N, D] x [D, K] product alone, chunked: the floor
and lm_vote against torch topk + bincount and the bandwidth floor (one read of
the logits). Reports the median time, rows/s, GFLOP/s (2NKD), the fraction of
the GEMM floor, and peak extra memory (RSS sampled on CPU, the CUDA caching
allocator's peak on GPU).

    python benchmarks/bench_vote.py                      # CPU, the issue's shapes
    python benchmarks/bench_vote.py --device cuda --json out.json --markdown out.md
    python benchmarks/bench_vote.py --quick              # small shapes, a smoke run
    python benchmarks/bench_vote.py --results benchmarks/RESULTS.md   # append the table
    python benchmarks/bench_vote.py --weights            # fused votes only, each weight
                                                         # (count, rank, soft): the cost of
                                                         # the fixed-point float votes
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

import fastvote.ops as ops

CPU_SHAPES = [(100_000, 1000, 512, 1), (100_000, 1000, 512, 5), (20_000, 100_000, 512, 5)]
CUDA_SHAPES = [(1_000_000, 1000, 512, 1), (1_000_000, 1000, 512, 5), (100_000, 100_000, 512, 5)]
QUICK_SHAPES = [(5_000, 300, 64, 5), (2_000, 5_000, 67, 3)]
CPU_LOGITS = [(100_000, 1000, 5)]
CUDA_LOGITS = [(1_000_000, 1000, 1), (1_000_000, 1000, 5)]
QUICK_LOGITS = [(5_000, 300, 5)]
CUDA_MEMORY_ROWS = 10_000_000  # the "peak extra memory at N = 10M" check
CHUNK_ROWS = 4096


# ----------------------------------------------------------------- measuring

class PeakMemory:
    """Peak memory above the level at entry, in bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            # Large CPU buffers are mmap'd and returned on free, so sampling the
            # resident set catches them.
            self._base = _rss()
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss() - self._base)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._sampler.join()
            self.peak = max(self.peak, _rss() - self._base)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> Dict[str, float]:
    """Median wall time over `repeats` runs after one warm-up, and peak extra memory."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    peak = 0
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        peak = max(peak, mem.peak)
    return {"seconds": statistics.median(times), "peak_extra_bytes": peak}


# ----------------------------------------------------------------- the contenders

def torch_vote(x, c, k, metric):
    """The straightforward way: normalise, one N x K matrix, topk, bincount."""
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
        c = torch.nn.functional.normalize(c, dim=1)
        scores = x @ c.t()
    else:
        scores = 2 * (x @ c.t()) - c.pow(2).sum(1)  # larger = nearer (||x||^2 is per-row constant)
    return torch.bincount(scores.topk(k, dim=1).indices.reshape(-1), minlength=c.shape[0])


def torch_chunked_vote(x, c, k, metric):
    votes = torch.zeros(c.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], CHUNK_ROWS):
        votes += torch_vote(x[start:start + CHUNK_ROWS], c, k, metric)
    return votes


def gemm_floor(x, c):
    out = torch.empty(min(CHUNK_ROWS, x.shape[0]), c.shape[0], device=x.device, dtype=x.dtype)
    ct = c.t()
    for start in range(0, x.shape[0], CHUNK_ROWS):
        chunk = x[start:start + CHUNK_ROWS]
        torch.mm(chunk, ct, out=out[:chunk.shape[0]])
    return out


def faiss_vote_factory(metric):
    try:
        import faiss
    except ImportError:
        return None

    def vote(x, c, k, _metric):
        xs, cs = x.numpy(), c.numpy()
        if metric == "cosine":
            xs = torch.nn.functional.normalize(x, dim=1).numpy()
            cs = torch.nn.functional.normalize(c, dim=1).numpy()
            index = faiss.IndexFlatIP(cs.shape[1])
        else:
            index = faiss.IndexFlatL2(cs.shape[1])
        index.add(cs)
        _, idx = index.search(xs, k)
        return torch.bincount(torch.from_numpy(idx).reshape(-1), minlength=cs.shape[0])

    return vote


# ----------------------------------------------------------------- runs

def bench_fm(device, shapes, metric, repeats, skip_naive_above):
    rows = []
    faiss_vote = faiss_vote_factory(metric) if device.type == "cpu" else None
    for n, num, dim, k in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, dim, device=device, generator=g)
        c = torch.randn(num, dim, device=device, generator=g)
        flops = 2.0 * n * num * dim
        contenders = {
            "fused": lambda: ops.fm_vote(x, c, k, metric),
            "torch": lambda: torch_vote(x, c, k, metric),
            "torch-chunk": lambda: torch_chunked_vote(x, c, k, metric),
            "gemm": lambda: gemm_floor(x, c),
        }
        if n * num > skip_naive_above:
            del contenders["torch"]  # its N x K matrix would not fit
        if faiss_vote is not None:
            contenders["faiss"] = lambda: faiss_vote(x, c, k, metric)
        # Every contender must agree with the fused votes before it is timed.
        reference = contenders["fused"]().cpu()
        for name in ("torch-chunk", "faiss"):
            if name in contenders:
                other = contenders[name]().cpu()
                disagree = int((other - reference).abs().sum()) // 2
                if disagree > n * k * 1e-4:  # near-ties may fall either way in float32
                    raise SystemExit(f"{name} disagrees with fused on {disagree} votes at {(n, num, dim, k)}")
        results = {name: timed(fn, device, repeats) for name, fn in contenders.items()}
        gemm_seconds = results["gemm"]["seconds"]
        for name, r in results.items():
            rows.append({
                "op": "fm_vote", "metric": metric, "N": n, "K": num, "D": dim, "k": k, "method": name,
                "seconds": r["seconds"], "rows_per_s": n / r["seconds"],
                "gflops": flops / r["seconds"] / 1e9, "of_gemm": gemm_seconds / r["seconds"],
                "peak_extra_mb": r["peak_extra_bytes"] / 2**20,
            })
    return rows


def bench_lm(device, shapes, repeats):
    rows = []
    for n, num, k in shapes:
        logits = torch.randn(n, num, device=device, generator=torch.Generator(device=device).manual_seed(1))
        contenders = {
            "fused": lambda: ops.lm_vote(logits, k),
            "torch": lambda: torch.bincount(logits.topk(k, dim=1).indices.reshape(-1), minlength=num),
            "read-floor": lambda: logits.amax(),  # one read of the logits
        }
        results = {name: timed(fn, device, repeats) for name, fn in contenders.items()}
        floor = results["read-floor"]["seconds"]
        nbytes = logits.numel() * logits.element_size()
        for name, r in results.items():
            rows.append({
                "op": "lm_vote", "metric": "-", "N": n, "K": num, "D": "-", "k": k, "method": name,
                "seconds": r["seconds"], "rows_per_s": n / r["seconds"],
                "gb_per_s": nbytes / r["seconds"] / 1e9, "of_floor": floor / r["seconds"],
                "peak_extra_mb": r["peak_extra_bytes"] / 2**20,
            })
    return rows


def bench_weights(device, fm_shapes, lm_shapes, metric, repeats):
    """The fused ops alone with each vote weight: what "rank" and "soft" cost
    over "count" (their fixed-point accumulation and softmax weights)."""
    rows = []
    for n, num, dim, k in fm_shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, dim, device=device, generator=g)
        c = torch.randn(num, dim, device=device, generator=g)
        for weight in ops.WEIGHTS:
            r = timed(lambda: ops.fm_vote(x, c, k, metric, weight), device, repeats)
            rows.append({"op": "fm_vote", "metric": metric, "N": n, "K": num, "D": dim, "k": k,
                         "method": f"fused {weight}", "seconds": r["seconds"], "rows_per_s": n / r["seconds"],
                         "gflops": 2.0 * n * num * dim / r["seconds"] / 1e9,
                         "peak_extra_mb": r["peak_extra_bytes"] / 2**20})
    for n, num, k in lm_shapes:
        logits = torch.randn(n, num, device=device, generator=torch.Generator(device=device).manual_seed(1))
        for weight in ops.WEIGHTS:
            r = timed(lambda: ops.lm_vote(logits, k, weight), device, repeats)
            rows.append({"op": "lm_vote", "metric": "-", "N": n, "K": num, "D": "-", "k": k,
                         "method": f"fused {weight}", "seconds": r["seconds"], "rows_per_s": n / r["seconds"],
                         "gb_per_s": logits.numel() * logits.element_size() / r["seconds"] / 1e9,
                         "peak_extra_mb": r["peak_extra_bytes"] / 2**20})
    return rows


def bench_cuda_memory(device):
    """Peak extra GPU memory of fm_vote at N = 10M rows (K = 1000, D = 512)."""
    n = CUDA_MEMORY_ROWS
    x = torch.randn(n, 512, device=device)
    c = torch.randn(1000, 512, device=device)
    r = timed(lambda: ops.fm_vote(x, c, 5), device, 1)
    return [{"op": "fm_vote", "metric": "l2", "N": n, "K": 1000, "D": 512, "k": 5, "method": "fused",
             "seconds": r["seconds"], "rows_per_s": n / r["seconds"],
             "gflops": 2.0 * n * 1000 * 512 / r["seconds"] / 1e9,
             "peak_extra_mb": r["peak_extra_bytes"] / 2**20, "note": "memory check"}]


# ----------------------------------------------------------------- reporting

def machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from fastvote import _C
    return (f"{cpu}, {torch.get_num_threads()} threads, fastvote CPU kernel {_C.cpu_kernel()}, "
            f"torch {torch.__version__}")


def markdown(rows: List[dict], header: str) -> str:
    lines = [header, "",
             "| op | metric | N | K | D | k | method | time (s) | rows/s | GFLOP/s or GB/s | of floor | peak extra MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = f"{r['gflops']:.0f}" if "gflops" in r else f"{r.get('gb_per_s', 0):.1f} GB/s"
        frac = r.get("of_gemm", r.get("of_floor"))
        lines.append(
            f"| {r['op']} | {r['metric']} | {r['N']:,} | {r['K']:,} | {r['D']} | {r['k']} | {r['method']} | "
            f"{r['seconds']:.4f} | {r['rows_per_s']:,.0f} | {rate} | "
            f"{'' if frac is None else f'{frac:.2f}'} | {r['peak_extra_mb']:.0f} |")
    ratios = speedups(rows)
    if ratios:
        lines += ["", "Fused throughput relative to each alternative (same run): " + "; ".join(ratios)]
    return "\n".join(lines) + "\n"


def speedups(rows: List[dict]) -> List[str]:
    out = []
    keyed = {}
    for r in rows:
        keyed.setdefault((r["op"], r["N"], r["K"], r["D"], r["k"]), {})[r["method"]] = r["seconds"]
    for (op, n, num, dim, k), times in keyed.items():
        if "fused" not in times:
            continue
        parts = [f"{times[m] / times['fused']:.2f}x {m}" for m in ("faiss", "torch-chunk", "torch") if m in times]
        if parts:
            out.append(f"{op} ({n:,}, {num:,}, {dim}, {k}): " + ", ".join(parts))
    return out


def write_atomic(path: str, text: str, append: bool = False) -> None:
    old = ""
    if append and os.path.exists(path):
        with open(path) as f:
            old = f.read()
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(old + text)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--metric", default="l2", choices=list(ops.METRICS))
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run in seconds")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--weights", action="store_true",
                   help="time the fused ops alone with each vote weight instead of the contenders")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--markdown", help="write the table as Markdown here")
    p.add_argument("--results", help="append the table to this Markdown file (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args(argv)

    if not ops.HAS_EXTENSION:
        raise SystemExit("fastvote._C is not built: benchmarking the reference fallback is meaningless")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    if args.quick:
        fm_shapes, lm_shapes = QUICK_SHAPES, QUICK_LOGITS
    elif device.type == "cuda":
        fm_shapes, lm_shapes = CUDA_SHAPES, CUDA_LOGITS
    else:
        fm_shapes, lm_shapes = CPU_SHAPES, CPU_LOGITS
    # The naive [N, K] float32 matrix is skipped above 2 GB (CPU) or 48 GB (GPU).
    skip_naive_above = 5e8 if device.type == "cpu" else 1.2e10

    started = time.time()
    if args.weights:
        rows = bench_weights(device, fm_shapes, lm_shapes, args.metric, args.repeats)
    else:
        rows = bench_fm(device, fm_shapes, args.metric, args.repeats, skip_naive_above)
        rows += bench_lm(device, lm_shapes, args.repeats)
    if device.type == "cuda" and not args.quick and not args.weights:
        rows += bench_cuda_memory(device)

    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    header = (f"### bench_vote {dt.date.today().isoformat()} — {machine(device)}\n\n"
              f"Command: `{command}` ({time.time() - started:.0f} s)")
    table = markdown(rows, header)
    print(table)
    if args.json:
        write_atomic(args.json, json.dumps({"machine": machine(device), "command": command, "rows": rows}, indent=1))
    if args.markdown:
        write_atomic(args.markdown, table)
    if args.results:
        write_atomic(args.results, "\n" + table, append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
