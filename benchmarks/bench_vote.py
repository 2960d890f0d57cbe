"""Voting cost: fastvote's fused fm_vote / lm_vote against what a user would
write in torch, measured side by side in one run. Every row is written the
moment it is measured, so a timeout or a crash keeps what came before.

fm_vote contenders, for each (N, K, D, k) and metric:
  fused-rows4  fastvote.ops.fm_vote, fp32 vector loads   } CUDA: the fp32 loader layout
  fused-rows   fastvote.ops.fm_vote, fp32 scalar rows    } pinned by FASTVOTE_CUDA_LAYOUT
  fused        fastvote.ops.fm_vote (CPU: one kernel)
  torch-fp32   chunked GEMM + topk + bincount, as a user writes it (TF32 off)
  torch-tf32   the same with TF32 matmuls (CUDA)
  torch-bf16   the same on bfloat16 copies of each chunk, scores in float32 (CUDA)
  torch-naive  one [N, K] score matrix, where it fits (l2 holds two of them at its peak)
  faiss        IndexFlatL2 / IndexFlatIP search + bincount (CPU, when installed)
  gemm         the bare chunked fp32 [N, D] x [D, K] product: the floor
lm_vote: fused, torch (topk + bincount) and the read floor (one pass over the logits).

Each row: the median time of --repeats runs after a warm-up, rows/s, TFLOP/s
(2NKD) or GB/s, the fraction of the floor, the peak memory above the inputs
(the CUDA caching allocator's peak; sampled RSS on the CPU), and agreement:
recall of the picks against a float64 reference on the first 2,048 rows, and
the share of votes that differ from torch-fp32's. A contender that would not
fit the free memory (torch.cuda.mem_get_info) is recorded as skipped; one that
runs out of memory or fails is recorded as such and the run goes on (exit
status 1 when any failed other than by memory).

    python benchmarks/bench_vote.py                      # CPU, RESULTS.md's shapes
    python benchmarks/bench_vote.py --device cuda --jsonl rows.jsonl --markdown table.md
    python benchmarks/bench_vote.py --quick              # small shapes, a smoke run
    python benchmarks/bench_vote.py --results benchmarks/RESULTS.md   # append the table
    python benchmarks/bench_vote.py --weights            # fused votes only, each weight
                                                         # (count, rank, soft)
    python benchmarks/bench_vote.py --certified          # the fp32 kernel against the
                                                         # certified bf16 path, side by side

--certified times fm_vote and nearest_centroids under each kernel pinned by
FASTVOTE_CPU_KERNEL (CPU: the fp32 one this CPU runs, "bf16emu", the certified
path with VDPBF16PS emulated, for tests and slower than fp32, "avx512bf16",
native, where the CPU has AVX512_BF16, and "amxbf16", on AMX tiles, where it has
AMX-BF16) or FASTVOTE_CUDA_KERNEL (CUDA: "fp32",
the fused kernel, and "bf16", the certified path on tensor cores). Its status
column gives the share of rows the certificate sent back to the fp32 kernel,
and whether the answers were identical to the fp32 kernel's (they must be).
--certified-rows caps N. On CUDA the default run ends with these rows too.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

import fastvote.ops as ops

CPU_SHAPES = [(100_000, 1000, 512, 1), (100_000, 1000, 512, 5), (20_000, 100_000, 512, 5)]
CUDA_SHAPES = [(1_000_000, 1000, 512, 1), (1_000_000, 1000, 512, 5), (20_000, 100_000, 512, 5)]
# The same kinds of shape, small: k = 1 and 5, K >> N, D not a multiple of 4.
QUICK_SHAPES = [(4_000, 300, 64, 1), (4_000, 300, 64, 5), (1_000, 5_000, 67, 5)]
CPU_LOGITS = [(100_000, 1000, 5)]
CERTIFIED_SHAPES = [(100_000, 1000, 512, 5), (20_000, 100_000, 512, 5)]
CUDA_CERTIFIED = [(1_000_000, 1000, 512, 5), (20_000, 100_000, 512, 5)]
QUICK_CERTIFIED = [(4_000, 300, 64, 5), (1_000, 5_000, 67, 5)]
CUDA_LOGITS = [(1_000_000, 1000, 1), (1_000_000, 1000, 5)]
QUICK_LOGITS = [(4_000, 300, 1), (4_000, 300, 5)]
# The "peak extra memory at N = 10M" check of the fused kernel (K = 1000, D = 512, k = 5).
MEMORY_ROWS = {"cuda": 10_000_000, "quick": 20_000}
SAMPLE_ROWS = 2048  # rows whose picks are checked against the float64 reference
CHUNK_ELEMENTS = 1 << 26  # a torch contender's chunk of scores: 256 MB of float32
# Share of the free memory a contender may plan to use: the CPU's is shared with other work.
MEMORY_SHARE = {"cuda": 0.85, "cpu": 0.5}
LAYOUT_ENV = "FASTVOTE_CUDA_LAYOUT"


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


def free_bytes(device: torch.device) -> int:
    """Memory a contender may still allocate on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemFree"])


def timed(fn: Callable[[], object], device: torch.device, repeats: int):
    """(median seconds over `repeats` runs after one warm-up, peak extra bytes, the warm-up's output)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    output = fn()
    sync()
    times, peak = [], 0
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        peak = max(peak, mem.peak)
    return statistics.median(times), peak, output


@contextlib.contextmanager
def cuda_layout(layout: Optional[str]):
    """Pins the fused kernel's fp32 loader layout (read by the op at each call)."""
    before = os.environ.get(LAYOUT_ENV)
    if layout is not None:
        os.environ[LAYOUT_ENV] = layout
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LAYOUT_ENV, None)
        else:
            os.environ[LAYOUT_ENV] = before


@contextlib.contextmanager
def matmul_precision(precision: str):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ----------------------------------------------------------------- the contenders

def chunk_rows(num: int) -> int:
    return max(1, CHUNK_ELEMENTS // num)


def torch_picks(x, c, k, metric, precision="fp32"):
    """Top-k centroid indices [N, k] the way a user writes it: per chunk of rows one
    GEMM in `precision` ("fp32", "tf32", "bf16"), then topk. Larger score = nearer."""
    with matmul_precision(precision):
        cc = F.normalize(c, dim=1) if metric == "cosine" else c
        c2 = c.pow(2).sum(1) if metric == "l2" else None
        if precision == "bf16":
            cc = cc.bfloat16()
        step = chunk_rows(c.shape[0])
        for start in range(0, x.shape[0], step):
            xc = x[start:start + step]
            if metric == "cosine":
                xc = F.normalize(xc, dim=1)
            if precision == "bf16":
                xc = xc.bfloat16()
            scores = (xc @ cc.t()).float()
            if metric == "l2":  # ||x||^2 is the same for a whole row: 2 x.c - ||c||^2 ranks alike
                scores = scores.mul_(2).sub_(c2)
            yield scores.topk(k, dim=1).indices


def torch_vote(x, c, k, metric, precision="fp32"):
    votes = torch.zeros(c.shape[0], dtype=torch.int64, device=x.device)
    for picks in torch_picks(x, c, k, metric, precision):
        votes += torch.bincount(picks.reshape(-1), minlength=c.shape[0])
    return votes


def naive_picks(x, c, k, metric):
    """One [N, K] matrix, as a user first writes it. l2's peak holds two: each
    step (2 * product, then minus c's norms) makes a new N x K matrix while the
    one before it is still alive."""
    if metric == "cosine":
        scores = F.normalize(x, dim=1) @ F.normalize(c, dim=1).t()
    else:
        scores = 2 * (x @ c.t()) - c.pow(2).sum(1)
    return scores.topk(k, dim=1).indices


def naive_bytes(n, num, dim, k, metric) -> int:
    picks = n * k * 12  # topk's float32 values and int64 indices
    if metric == "cosine":
        return n * dim * 4 + n * num * 4 + picks  # the normalised copy of x, the scores
    return 2 * n * num * 4 + picks


def gemm_floor(x, c):
    with matmul_precision("fp32"):
        step = chunk_rows(c.shape[0])
        out = torch.empty(min(step, x.shape[0]), c.shape[0], device=x.device, dtype=x.dtype)
        ct = c.t()
        for start in range(0, x.shape[0], step):
            chunk = x[start:start + step]
            torch.mm(chunk, ct, out=out[:chunk.shape[0]])
    return None


def faiss_vote_factory(metric):
    try:
        import faiss
    except ImportError:
        return None

    def picks(x, c, k):
        if metric == "cosine":
            xs = F.normalize(x, dim=1).numpy()
            cs = F.normalize(c, dim=1).numpy()
            index = faiss.IndexFlatIP(cs.shape[1])
        else:
            xs, cs = x.numpy(), c.numpy()
            index = faiss.IndexFlatL2(cs.shape[1])
        index.add(cs)
        return torch.from_numpy(index.search(xs, k)[1])

    return picks


@dataclasses.dataclass
class Contender:
    name: str
    votes: Callable[[], Optional[torch.Tensor]]  # the timed call
    picks: Optional[Callable[[torch.Tensor], torch.Tensor]]  # sample rows -> [S, k] indices
    extra_bytes: int  # planned peak above the inputs
    layout: Optional[str] = None  # FASTVOTE_CUDA_LAYOUT while it runs


def fm_contenders(device, x, c, k, metric) -> List[Contender]:
    n, dim = x.shape
    num = c.shape[0]
    small = 2 * num * dim * 4 + (64 << 20)  # a float32 copy of the centroids, split partials
    chunk = chunk_rows(num)
    chunk_bytes = 3 * chunk * num * 4 + chunk * dim * 4  # scores, their float copy, topk; a normalised chunk
    fused = [("fused-rows4", "rows4"), ("fused-rows", "rows")] if device.type == "cuda" else [("fused", None)]
    # The floor first: every later row's "of floor" is known when it is written.
    out = [Contender("gemm", lambda: gemm_floor(x, c), None, chunk * num * 4)]
    out += [Contender(name, lambda: ops.fm_vote(x, c, k, metric),
                      lambda xs: ops.nearest_centroids(xs, c, k, metric)[1], small, layout)
            for name, layout in fused]
    for precision in (("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32",)):
        out.append(Contender(f"torch-{precision}",
                             lambda p=precision: torch_vote(x, c, k, metric, p),
                             lambda xs, p=precision: torch.cat(list(torch_picks(xs, c, k, metric, p))),
                             chunk_bytes))
    out.append(Contender("torch-naive",
                         lambda: torch.bincount(naive_picks(x, c, k, metric).reshape(-1), minlength=num),
                         lambda xs: naive_picks(xs, c, k, metric), naive_bytes(n, num, dim, k, metric)))
    faiss_picks = faiss_vote_factory(metric) if device.type == "cpu" else None
    if faiss_picks is not None:
        out.append(Contender("faiss", lambda: torch.bincount(faiss_picks(x, c, k).reshape(-1), minlength=num),
                             lambda xs: faiss_picks(xs, c, k), naive_bytes(n, num, dim, k, "cosine")))
    return out


# ----------------------------------------------------------------- agreement

def reference_picks(xs, c, k, metric):
    """[S, k] indices of the k nearest centroids in float64 (ties: lower index)."""
    xd, cd = xs.double(), c.double()
    if metric == "cosine":
        xd, cd = F.normalize(xd, dim=1), F.normalize(cd, dim=1)
    c2 = cd.pow(2).sum(1)
    step = chunk_rows(c.shape[0])
    out = []
    for start in range(0, xd.shape[0], step):
        dots = xd[start:start + step] @ cd.t()
        keys = c2 - 2 * dots if metric == "l2" else -dots  # ||x||^2 omitted: the same for a whole row
        out.append(torch.sort(keys, dim=1, stable=True).indices[:, :k])
    return torch.cat(out)


def recall(picks, reference) -> float:
    """Share of the reference's picks found among the contender's, per row, averaged."""
    k = reference.shape[1]
    hits = (picks[:, :, None] == reference[:, None, :]).any(1).sum()
    return float(hits) / (reference.shape[0] * k)


def vote_difference(votes, reference_votes, picks_total) -> float:
    """Share of the N * k votes cast for another class than the reference's."""
    return float((votes.long() - reference_votes.long()).abs().sum()) / 2 / picks_total


# ----------------------------------------------------------------- runs

class Recorder:
    """Rows as they are measured: a JSON line appended (and closed) per row, the
    Markdown table rewritten whole, one line printed."""

    def __init__(self, header: str, jsonl: Optional[str], markdown_path: Optional[str], device_name: str):
        self.header = header
        self.jsonl = jsonl
        self.markdown_path = markdown_path
        self.device_name = device_name
        self.rows: List[dict] = []
        self.failures = 0
        print(header + "\n\n" + TABLE_HEAD, flush=True)

    def add(self, row: dict) -> None:
        row = {"device": self.device_name, **row}
        floor = next((o["seconds"] for o in self.rows if _same_shape(o, row)
                      and o["method"] == FLOOR.get(row["op"]) and o.get("seconds")), None)
        if floor and row.get("seconds"):
            row["of_floor"] = floor / row["seconds"]
        self.rows.append(row)
        self.failures += row["status"].startswith("error")
        print(table_line(row), flush=True)
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.markdown_path:
            write_atomic(self.markdown_path, markdown(self.rows, self.header))


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out of memory"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"error: {type(exc).__name__}: {first[:160]}"


def run_contender(rec, device, base, contender, repeats, rates, *, sample=None, ref_picks=None,
                  ref_votes=None, picks_total=None):
    """Times one contender and records its row (skipped, out of memory, error or ok)."""
    row = {**base, "method": contender.name, "status": "ok", "layout": contender.layout}
    free = free_bytes(device)
    if contender.extra_bytes > MEMORY_SHARE[device.type] * free:
        row["status"] = (f"skipped: needs {contender.extra_bytes / 2**30:.1f} GiB, "
                         f"{free / 2**30:.1f} GiB free")
        rec.add(row)
        return None
    try:
        with cuda_layout(contender.layout):
            seconds, peak, votes = timed(contender.votes, device, repeats)
            row.update(seconds=seconds, peak_mib=peak / 2**20, **rates(seconds))
            if contender.picks is not None and ref_picks is not None:
                row["recall"] = recall(contender.picks(sample).cpu(), ref_picks)
            if votes is not None and ref_votes is not None:
                row["vote_diff"] = vote_difference(votes.cpu(), ref_votes, picks_total)
    except Exception as exc:  # recorded, not fatal: the next contender may still run
        row["status"] = _outcome(exc)
        votes = None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rec.add(row)
    return votes


def fm_inputs(rec, device, base):
    """Seeded Gaussian rows [N, D] and centroids [K, D] for the row `base`
    describes, or None (a skipped row recorded) when they do not fit."""
    n, num, dim = base["N"], base["K"], base["D"]
    if (n + num) * dim * 4 > MEMORY_SHARE[device.type] * free_bytes(device):
        rec.add({**base, "method": "inputs", "status": "skipped: the inputs do not fit"})
        return None
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn(n, dim, device=device, generator=g), torch.randn(num, dim, device=device, generator=g)


def bench_fm(rec, device, shapes, metric, repeats):
    for n, num, dim, k in shapes:
        base = {"op": "fm_vote", "metric": metric, "N": n, "K": num, "D": dim, "k": k}
        inputs = fm_inputs(rec, device, base)
        if inputs is None:
            continue
        x, c = inputs
        sample = x[:SAMPLE_ROWS]
        try:
            ref_picks = reference_picks(sample, c, k, metric).cpu()
            ref_votes = torch_vote(x, c, k, metric, "fp32").cpu()
        except Exception as exc:
            rec.add({**base, "method": "reference", "status": _outcome(exc)})
            ref_picks = ref_votes = None
        flops = 2.0 * n * num * dim
        for contender in fm_contenders(device, x, c, k, metric):
            run_contender(rec, device, base, contender, repeats,
                          lambda s: {"rows_per_s": n / s, "tflops": flops / s / 1e12},
                          sample=sample, ref_picks=ref_picks, ref_votes=ref_votes, picks_total=n * k)
        del x, c, sample


def bench_lm(rec, device, shapes, repeats):
    for n, num, k in shapes:
        base = {"op": "lm_vote", "metric": "-", "N": n, "K": num, "D": "-", "k": k}
        nbytes = n * num * 4
        if nbytes > MEMORY_SHARE[device.type] * free_bytes(device):
            rec.add({**base, "method": "inputs", "status": "skipped: the inputs do not fit"})
            continue
        logits = torch.randn(n, num, device=device, generator=torch.Generator(device=device).manual_seed(1))

        def torch_lm():
            return torch.bincount(logits.topk(k, dim=1).indices.reshape(-1), minlength=num)

        ref_votes = torch_lm().cpu()
        def read_floor():  # one read of the logits
            logits.amax()

        contenders = [
            Contender("read-floor", read_floor, None, 0),
            Contender("fused", lambda: ops.lm_vote(logits, k), None, 0),
            Contender("torch", torch_lm, None, n * k * 12),
        ]
        for contender in contenders:
            run_contender(rec, device, base, contender, repeats,
                          lambda s: {"rows_per_s": n / s, "gb_per_s": nbytes / s / 1e9},
                          ref_votes=ref_votes, picks_total=n * k)
        del logits


def bench_weights(rec, device, fm_shapes, lm_shapes, metric, repeats):
    """The fused ops alone with each vote weight: what "rank" and "soft" cost
    over "count" (their fixed-point accumulation and softmax weights)."""
    for n, num, dim, k in fm_shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, dim, device=device, generator=g)
        c = torch.randn(num, dim, device=device, generator=g)
        base = {"op": "fm_vote", "metric": metric, "N": n, "K": num, "D": dim, "k": k}
        for weight in ops.WEIGHTS:
            run_contender(rec, device, base,
                          Contender(f"fused {weight}", lambda w=weight: ops.fm_vote(x, c, k, metric, w), None, 0),
                          repeats, lambda s: {"rows_per_s": n / s, "tflops": 2.0 * n * num * dim / s / 1e12})
    for n, num, k in lm_shapes:
        logits = torch.randn(n, num, device=device, generator=torch.Generator(device=device).manual_seed(1))
        base = {"op": "lm_vote", "metric": "-", "N": n, "K": num, "D": "-", "k": k}
        for weight in ops.WEIGHTS:
            run_contender(rec, device, base,
                          Contender(f"fused {weight}", lambda w=weight: ops.lm_vote(logits, k, w), None, 0),
                          repeats, lambda s: {"rows_per_s": n / s, "gb_per_s": n * num * 4 / s / 1e9})


# The variable that pins a device's kernel, and the certified path's counters.
KERNEL_ENV = {"cpu": "FASTVOTE_CPU_KERNEL", "cuda": "FASTVOTE_CUDA_KERNEL"}


def bf16_stats(device) -> tuple:
    from fastvote import _C

    return _C.cuda_bf16_stats() if device.type == "cuda" else _C.cpu_bf16_stats()


def kernel_names(device) -> List[str]:
    """The fp32 kernel, then the certified bf16 ones: on the CPU those this CPU runs."""
    if device.type == "cuda":
        return ["fp32", "bf16"]
    from fastvote import _C

    def runs(name):
        with pinned_kernel(device, name):
            try:
                _C.cpu_kernel()
                return True
            except (RuntimeError, ValueError):
                return False

    fp32 = next(name for name in ("avx512", "avx2", "portable") if runs(name))
    return [fp32] + [name for name in ("bf16emu", "avx512bf16", "amxbf16") if runs(name)]


@contextlib.contextmanager
def pinned_kernel(device, name: str):
    variable = KERNEL_ENV[device.type]
    before = os.environ.get(variable)
    os.environ[variable] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before


def bench_certified(rec, device, shapes, metrics, repeats, max_rows):
    """fm_vote and nearest_centroids under each kernel of the device, side by
    side; the certified ones' rows give their fallback share and whether their
    answers equal the fp32 kernel's (an error row if not)."""
    names = kernel_names(device)
    for n, num, dim, k in shapes:
        n = min(n, max_rows) if max_rows else n
        base = {"op": "fm_vote", "metric": "-", "N": n, "K": num, "D": dim, "k": k}
        inputs = fm_inputs(rec, device, base)
        if inputs is None:
            continue
        x, c = inputs
        for metric in metrics:
            calls = {"fm_vote": lambda: ops.fm_vote(x, c, k, metric),
                     "nearest_centroids": lambda: ops.nearest_centroids(x, c, k, metric)}
            for op, call in calls.items():
                base = {"op": op, "metric": metric, "N": n, "K": num, "D": dim, "k": k}
                expected = None
                for name in names:
                    row = {**base, "method": f"fused-{name}", "status": "ok"}
                    rows0, fallback0 = bf16_stats(device)
                    try:
                        with pinned_kernel(device, name):
                            seconds, peak, out = timed(call, device, repeats)
                    except Exception as exc:  # recorded, not fatal
                        rec.add({**row, "status": _outcome(exc)})
                        continue
                    rows1, fallback1 = bf16_stats(device)
                    row.update(seconds=seconds, peak_mib=peak / 2**20, rows_per_s=n / seconds,
                               tflops=2.0 * n * num * dim / seconds / 1e12)
                    if expected is None:  # the fp32 kernel, first
                        expected = out
                    else:
                        row["fallback"] = (fallback1 - fallback0) / max(1, rows1 - rows0)
                        same = all(torch.equal(a, b) for a, b in zip(out if op == "nearest_centroids" else [out],
                                                                     expected if op == "nearest_centroids" else [expected]))
                        row["status"] = (f"ok, identical, {100 * row['fallback']:.3f}% of rows fell back" if same
                                         else "error: the answers differ from the fp32 kernel's")
                    rec.add(row)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        del x, c


def bench_memory(rec, device, n):
    """Peak extra memory of fm_vote at N rows (K = 1000, D = 512, k = 5)."""
    num, dim = 1000, 512
    base = {"op": "fm_vote", "metric": "l2", "N": n, "K": num, "D": dim, "k": 5, "note": "memory check"}
    if (n + num) * dim * 4 > MEMORY_SHARE[device.type] * free_bytes(device):
        rec.add({**base, "method": "fused", "status": "skipped: the inputs do not fit"})
        return
    x = torch.randn(n, dim, device=device)
    c = torch.randn(num, dim, device=device)
    run_contender(rec, device, base, Contender("fused", lambda: ops.fm_vote(x, c, 5), None, 0), 1,
                  lambda s: {"rows_per_s": n / s, "tflops": 2.0 * n * num * dim / s / 1e12})


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
    return (f"{cpu}, {torch.get_num_threads()} threads, fastvote CPU kernel {ops.cpu_kernel()}, "
            f"torch {torch.__version__}")


TABLE_HEAD = ("| op | metric | N | K | D | k | method | time (s) | rows/s | TFLOP/s or GB/s | of floor "
              "| peak extra MiB | recall | votes differing | status |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
FLOOR = {"fm_vote": "gemm", "lm_vote": "read-floor"}


def _same_shape(a: dict, b: dict) -> bool:
    return all(a.get(f) == b.get(f) for f in ("op", "metric", "N", "K", "D", "k", "note"))


def table_line(r: dict) -> str:
    def fmt(key, spec):
        return "" if r.get(key) is None else format(r[key], spec)

    rate = f"{r['tflops']:.1f}" if "tflops" in r else (f"{r['gb_per_s']:.0f} GB/s" if "gb_per_s" in r else "")
    dim = r["D"] if isinstance(r["D"], str) else f"{r['D']:,}"
    return (f"| {r['op']} | {r['metric']} | {r['N']:,} | {r['K']:,} | {dim} | {r['k']} | {r['method']} | "
            f"{fmt('seconds', '.4f')} | {fmt('rows_per_s', ',.0f')} | {rate} | {fmt('of_floor', '.2f')} | "
            f"{fmt('peak_mib', '.0f')} | {fmt('recall', '.5f')} | {fmt('vote_diff', '.2e')} | {r['status']} |")


def speedups(rows: List[dict]) -> List[str]:
    """Per shape: each other contender's time over the fastest fused variant's."""
    out, seen = [], []
    for r in rows:
        if any(_same_shape(r, s) for s in seen):
            continue
        seen.append(r)
        same = [o for o in rows if _same_shape(o, r) and o.get("seconds")]
        fused = [o for o in same if o["method"].startswith("fused") and " " not in o["method"]]
        if not fused:
            continue
        best = min(fused, key=lambda o: o["seconds"])
        parts = [f"{o['seconds'] / best['seconds']:.2f}x {o['method']}" for o in same
                 if o is not best and o["method"] not in FLOOR.values()]
        if parts:
            out.append(f"{r['op']} {r['metric']} ({r['N']:,}, {r['K']:,}, {r['D']}, {r['k']}), "
                       f"{best['method']} = 1: " + ", ".join(parts))
    return out


def markdown(rows: List[dict], header: str) -> str:
    lines = [header, "", TABLE_HEAD] + [table_line(r) for r in rows]
    ratios = speedups(rows)
    if ratios:
        lines += ["", "Time relative to the fastest fused variant (same run): " + "; ".join(ratios)]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--metric", default="both", choices=["both"] + list(ops.METRICS))
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run in seconds")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--weights", action="store_true",
                   help="time the fused ops alone with each vote weight instead of the contenders")
    p.add_argument("--certified", action="store_true",
                   help="the fp32 kernel against the certified bf16 path (CPU: emulated, and native where "
                        "the CPU has AVX512_BF16; CUDA: tensor cores), fm_vote and nearest_centroids")
    p.add_argument("--certified-rows", type=int, default=0, help="--certified: at most this many rows (N)")
    p.add_argument("--jsonl", help="append each row here as a JSON line, as it is measured")
    p.add_argument("--markdown", help="write the table here (rewritten after each row)")
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
    metrics = list(ops.METRICS) if args.metric == "both" else [args.metric]

    started = time.time()
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    header = f"### bench_vote {dt.date.today().isoformat()} — {machine(device)}\n\nCommand: `{command}`"
    rec = Recorder(header, args.jsonl, args.markdown, torch.cuda.get_device_name(device)
                   if device.type == "cuda" else machine(device))
    certified_shapes = QUICK_CERTIFIED if args.quick else CUDA_CERTIFIED if device.type == "cuda" else CERTIFIED_SHAPES
    if args.certified:
        bench_certified(rec, device, certified_shapes, metrics, args.repeats, args.certified_rows)
    elif args.weights:
        bench_weights(rec, device, fm_shapes, lm_shapes, metrics[0], args.repeats)
    else:
        # The paper's metric first, then the logits, then cosine: a cut-off run keeps the most.
        bench_fm(rec, device, fm_shapes, metrics[0], args.repeats)
        bench_lm(rec, device, lm_shapes, args.repeats)
        for metric in metrics[1:]:
            bench_fm(rec, device, fm_shapes, metric, args.repeats)
        memory_rows = MEMORY_ROWS["quick"] if args.quick else MEMORY_ROWS.get(device.type)
        if memory_rows:
            bench_memory(rec, device, memory_rows)
        if device.type == "cuda":  # last: a fault in the opt-in path cannot cost the rows above
            bench_certified(rec, device, certified_shapes, metrics, args.repeats, 0)
    rec.header = header + f" ({time.time() - started:.0f} s)"
    table = markdown(rec.rows, rec.header)
    for line in speedups(rec.rows):
        print(line)
    if args.markdown:
        write_atomic(args.markdown, table)
    if args.results:
        write_atomic(args.results, "\n" + table, append=True)
    if rec.failures:
        print(f"bench_vote: {rec.failures} contender(s) failed (see the status column)", file=sys.stderr)
    return 1 if rec.failures else 0


if __name__ == "__main__":
    sys.exit(main())
