#!/usr/bin/env bash
# The one script to run on a GPU machine (H100 / H200: Python 3.12 with torch
# 2.11 cu130 installed, nvcc, no network). It builds fastvote's extension with
# its CUDA kernels in place against the installed torch, runs the op tests, the
# CUDA paths of MoCo / PGD / ViT / K-means (tests/test_gpu_settings.py) and
# the CUDA tests (tests/test_cuda.py first), compute-sanitizer's memcheck and
# racecheck over benchmarks/sanitize_ops.py, then the CUDA benchmark, and
# writes under $OUT (default ./gpu_out):
#   summary.txt                      one line per step (status, seconds), the test tally
#   log.txt                          versions, nvidia-smi, the build
#   tests.txt                        pytest's output
#   memcheck.txt, racecheck.txt      compute-sanitizer's reports
#   bench.txt, bench_cuda.json, bench_cuda.md   the vote benchmark
#   loaders.txt, loaders.json        bench_loaders.py: torch loaders at 224 px into a ResNet-50
# Every step runs under `timeout` within one budget (BUDGET_S, default 420 s,
# so a failed run leaves time for a second inside 15 minutes); a failed step
# does not stop the next. Exit status: 0 when every step passed.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: prints the steps, builds
#                                            # nothing, runs tests/test_cuda.py (which
#                                            # skips without a GPU) and the quick CPU benchmark
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET_S="${BUDGET_S:-420}"
START=$(date +%s)
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY="$(command -v python3 || command -v python)"; fi
fi
export PY
# The interpreter's bin holds ninja (torch's extension build needs it) and friends.
PY_BIN="$(dirname "$(command -v "$PY")")"
export PATH="$PY_BIN:$PATH"
# The in-place build is imported from the checkout (no pip install needed).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi

SUMMARY="$OUT/summary.txt"
LOG="$OUT/log.txt"
: > "$SUMMARY"
: > "$LOG"
FAILED=0

# step NAME CAP_S LOGFILE CMD...: runs CMD under timeout (CAP_S or the time
# left, whichever is less), output to the console and LOGFILE, status to the summary.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((BUDGET_S - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    printf '%-8s %-16s\n' "$name" "SKIPPED (budget)" | tee -a "$SUMMARY"
    FAILED=1
    return 1
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  if ((DRY_RUN)) && [[ "$name" != env && "$name" != bench-cpu && "$name" != collect ]]; then
    printf '%-8s %-16s\n' "$name" "dry run" | tee -a "$SUMMARY"
    return 0
  fi
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  ((rc == 0)) || FAILED=1
  printf '%-8s %-16s %4ss\n' "$name" "$status" "$(($(date +%s) - t0))" | tee -a "$SUMMARY"
  return $rc
}

versions() {
  nvidia-smi || echo "nvidia-smi: not found"
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version || echo "nvcc: not found"
  "$PY" - <<'EOF'
import os, platform, shutil, sysconfig, torch
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
print("Python.h:", header if os.path.exists(header) else f"MISSING (looked for {header})",
      "| ninja:", shutil.which("ninja") or "not on PATH")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| sm", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
          "| memory", f"{p.total_memory / 2**30:.0f} GiB")
EOF
}

build() {
  FASTVOTE_CUDA=1 "$PY" setup.py build_ext --inplace
}

# compute-sanitizer TOOL: one small pass over every kernel (benchmarks/sanitize_ops.py).
sanitize() {
  local tool=$1 cs="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
  [[ -x "$cs" ]] || cs="$(command -v compute-sanitizer)" || { echo "compute-sanitizer: not found"; return 1; }
  "$cs" --tool "$tool" --error-exitcode 1 "$PY" benchmarks/sanitize_ops.py
}

# Steps that are shell functions run in a child bash (timeout needs a program).
export -f versions build sanitize

{
  echo "fastvote GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  ((DRY_RUN)) && echo "DRY RUN: nothing built; tests/test_cuda.py runs (it skips without a GPU); the quick CPU benchmark stands in"
} | tee -a "$SUMMARY"

step env 30 "$LOG" bash -c versions
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device', '| torch', torch.__version__)" \
  >> "$SUMMARY" 2>&1
step build 240 "$LOG" bash -c build
if ((DRY_RUN)); then
  step collect 60 "$OUT/tests.txt" "$PY" -m pytest -q -rs tests/test_cuda.py
  step bench-cpu 120 "$OUT/bench.txt" "$PY" benchmarks/bench_vote.py --device cpu --quick \
    --json "$OUT/bench_cpu.json" --markdown "$OUT/bench_cpu.md"
else
  # Not -x: on a first GPU run, every failure is worth seeing (bounded by --maxfail).
  # test_cuda.py first: --maxfail is not spent on test_ops' CUDA cases.
  step tests 240 "$OUT/tests.txt" "$PY" -m pytest -q -rs --maxfail=25 --durations=10 \
    tests/test_cuda.py tests/test_ops.py tests/test_gpu_settings.py
  step memcheck 90 "$OUT/memcheck.txt" bash -c "sanitize memcheck"
  step racecheck 90 "$OUT/racecheck.txt" bash -c "sanitize racecheck"
  step bench 200 "$OUT/bench.txt" "$PY" benchmarks/bench_vote.py --device cuda \
    --json "$OUT/bench_cuda.json" --markdown "$OUT/bench_cuda.md"
  # Loaders at 224 px into a ResNet-50 (no ffcv on the GPU machine: the torch path vs torchvision)
  step loaders 100 "$OUT/loaders.txt" "$PY" benchmarks/bench_loaders.py --device cuda --arch resnet50 \
    --loaders torchvision,fastvote-torch --images 1024 --batch 128 --workers 16 --out "${TMPDIR:-/tmp}/fastvote-loaders" \
    --json "$OUT/loaders.json"
fi
# Issue 15, DataComp-small shape on one GPU: 12.8M x 768 float16 generated on the GPU (200 random centres
# + noise), K = 100,000, seeding and one k-means pass (fused nearest-centroid op); DataComp: ~10 min on 8 GPUs.
((DRY_RUN)) || step kmeans-datacomp-small 180 "$OUT/kmeans_datacomp.txt" "$PY" -c "
import torch; from fastvote import cluster; g = torch.Generator('cuda').manual_seed(0); n = 12_800_000
c = torch.randn(200, 768, device='cuda', generator=g)
x = torch.cat([(c[torch.randint(0, 200, (b,), device='cuda', generator=g)] + 0.5 * torch.randn(b, 768, device='cuda', generator=g)).half() for b in [n // 50] * 50])
f = cluster.fit(lambda: x.split(1 << 18), 100_000, rows=range(n), num_rows=n, iterations=1, device='cuda', progress=False)
print(f'12.8M x 768, K=100000: seeding {f.seeding_seconds:.1f} s, pass {f.pass_seconds[0]:.1f} s ({f.fit_rows} rows)')"
if [[ -s "$OUT/tests.txt" ]]; then
  echo "pytest: $(grep -E '(passed|failed|skipped|error)' "$OUT/tests.txt" | tail -n 1)" | tee -a "$SUMMARY"
fi
echo "total $(($(date +%s) - START))s; outputs in $OUT" | tee -a "$SUMMARY"
exit $FAILED
