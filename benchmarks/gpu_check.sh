#!/usr/bin/env bash
# The one script to run on a lent GPU machine (one H100 or H200, Python 3.12 with
# torch 2.11 cu130, nvcc, 16 cores, no network; 15 minutes of device time in all,
# start-up included, and at most 8 files back from $OUT). Steps, in order of
# value, each its own process under its own cap, all within one budget
# (BUDGET_S, default 515 s: with ~120 s of start-up a failed run leaves ~265 s for
# one rerun inside 15 minutes):
#   env          versions, nvidia-smi, the interpreter's ninja, the device's name
#   build        the extension with its CUDA kernels, in place
#   tests-cuda   tests/test_cuda.py alone (a sticky CUDA error cannot fail other files)
#   bench        benchmarks/bench_vote.py: every row written as it is measured; last,
#                the fused fp32 kernel against the certified bf16 path (FASTVOTE_CUDA_KERNEL=bf16)
#   memcheck     compute-sanitizer memcheck over benchmarks/sanitize_ops.py
#   tests-other  the CUDA cases of tests/test_ops.py, and tests/test_gpu_settings.py
#   racecheck    compute-sanitizer racecheck over benchmarks/sanitize_ops.py
#   loaders      bench_loaders.py: torchvision vs fastvote's torch loaders into a ResNet-50
#   kmeans       k-means at DataComp-small scale (12.8M x 768, K = 100,000): only when asked
# Files under $OUT (default ./gpu_out), five at most of the eight that come back:
#   summary.txt        written first, then a line per step; the plan, the test tallies,
#                      the benchmark's headline, the file check (also printed last)
#   log.txt            every step's output, one after the other
#   bench_vote.jsonl   one JSON row per measurement, appended as measured
#   bench_vote.md      the benchmark's table (rewritten after each row)
#   loaders.json       bench_loaders' rows
# Exit status 0 when every step that ran passed.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   STEPS=bench,loaders SKIP_BUILD=1 bash benchmarks/gpu_check.sh   # these steps only,
#                                                # on a warm machine that has the build
#   bash benchmarks/gpu_check.sh --rerun         # a warm machine: what passed last time
#                                                # there (and the build) is skipped
#   KMEANS=1 bash benchmarks/gpu_check.sh        # the k-means step too
#   bash benchmarks/gpu_check.sh --plan          # print the plan and check its arithmetic
#   bash benchmarks/gpu_check.sh --rehearse      # the CPU rehearsal (CI runs it)
#
# --rehearse runs on a machine without a GPU and says REHEARSAL throughout; no
# figure from it belongs in RESULTS.md. It prints the GPU run's plan and checks
# it (the benchmark inside the first 300 s, everything inside the budget), then
# runs every step's own logic with CUDA faked onto the CPU (benchmarks/fake_cuda.py,
# the CPU kernels standing in): tests/test_cuda.py (its parametrisation and
# checks, so a test that asks for k > K fails here), the benchmark on small
# shapes writing its real files, sanitize_ops.py where compute-sanitizer would
# run, the collection of the other GPU tests and tests/test_gpu_settings.py,
# tiny loaders and k-means; the build step checks the toolchain and imports the
# existing build instead of compiling. Last it checks $OUT against the limits
# of what comes back (8 files, 2 folders deep, plain names).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODE=gpu
case "${1:-}" in
  --rehearse) MODE=rehearse ;;
  --rerun) MODE=rerun ;;
  --plan) MODE=plan ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--rehearse | --rerun | --plan]" >&2; exit 2 ;;
esac
REHEARSE=0
[[ $MODE == rehearse ]] && REHEARSE=1

BUDGET_S="${BUDGET_S:-515}"
DEVICE_S=900        # device time lent to a session, start-up included
STARTUP_S=120       # a machine's start and the transfers, roughly
BENCH_BY_S=300      # the benchmark must have started by then (estimated)

# name, estimated seconds on an H100 (the issue's reading), cap, what. The caps
# of the default steps add up to the budget, so no step is cut for another's sake.
STEP_TABLE="
env          5  15 versions, nvidia-smi, ninja, the device
build       75 110 the extension with its CUDA kernels, in place (MAX_JOBS=16)
tests-cuda  65  90 tests/test_cuda.py, alone
bench       70 120 benchmarks/bench_vote.py, rows written as measured, fp32 vs certified bf16 last
memcheck    30  45 compute-sanitizer memcheck, benchmarks/sanitize_ops.py
tests-other 35  50 tests/test_ops.py -k cuda, tests/test_gpu_settings.py
racecheck   25  35 compute-sanitizer racecheck, benchmarks/sanitize_ops.py
loaders     35  50 bench_loaders.py: torch loaders into a ResNet-50
kmeans     120 170 k-means, 12.8M x 768 float16, K = 100,000 (only when asked)
"
declare -A EST CAP WHAT
ORDER=()
while read -r name est cap what; do
  [[ -z $name ]] && continue
  ORDER+=("$name"); EST[$name]=$est; CAP[$name]=$cap; WHAT[$name]=$what
done <<< "$STEP_TABLE"

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
STATE="${GPU_CHECK_STATE:-${TMPDIR:-/tmp}/fastvote-gpu-check.passed}"  # survives on a warm machine
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo '?')"

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY="$(command -v python3 || command -v python)"; fi
fi
# ninja (torch's extension build) lives beside the interpreter's environment,
# which a python3 that is a link elsewhere would not point at: ask sys.prefix.
PY_BIN="$("$PY" -c 'import os, sys; print(os.path.join(sys.prefix, "bin"))')"
export PY PATH="$PY_BIN:$PATH"
export PYTHONUNBUFFERED=1  # a step killed by its cap keeps what it printed
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, no install
export MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
CAP_SCALE=1
if ((REHEARSE)); then
  # CI machines have two shared cores, where OpenMP's barriers make two threads far slower than one.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  CAP_SCALE=4  # CPU kernels on a shared machine: the GPU caps would cut the logic short
fi

# ---------------------------------------------------------------- the plan

# The steps this run takes: STEPS= or the defaults (kmeans with KMEANS=1), less the
# build with SKIP_BUILD=1, less what passed before on this machine with --rerun.
SKIPPED_NOTE=""
plan_steps() {
  local wanted=",${STEPS:-},"
  PLAN=()
  for name in "${ORDER[@]}"; do
    if [[ -n "${STEPS:-}" ]]; then
      [[ $wanted == *",$name,"* ]] || continue
    elif [[ $name == kmeans && "${KMEANS:-0}" != 1 ]]; then
      continue
    fi
    if [[ $name == build && "${SKIP_BUILD:-0}" == 1 ]]; then
      SKIPPED_NOTE+=" build (SKIP_BUILD=1)"; continue
    fi
    if [[ $MODE == rerun && -f $STATE ]] && grep -q "^$name " "$STATE"; then
      SKIPPED_NOTE+=" $name (passed at $(grep "^$name " "$STATE" | tail -n 1 | cut -d' ' -f2))"; continue
    fi
    PLAN+=("$name")
  done
  if [[ -n "${STEPS:-}" ]]; then
    local s
    for s in ${STEPS//,/ }; do
      [[ -n ${EST[$s]:-} ]] || { echo "gpu_check: STEPS names '$s'; expected some of: ${ORDER[*]}" >&2; exit 2; }
    done
  fi
}

# Prints the plan with an estimated timeline and checks its arithmetic; returns 1
# when the benchmark could start after BENCH_BY_S (every step before it at its cap),
# the estimates outlast the budget, or the budget leaves no room for a rerun.
PLAN_OK=1
print_plan() {
  local t=0 caps=0 bench_at=-1 bench_worst=0 rest=0 name
  printf 'plan: budget %ss; estimates from a reading of the code on an H100, each step capped\n' "$BUDGET_S"
  printf '  %-12s %5s %5s  %-13s %s\n' step est cap "est. start-end" what
  for name in "${PLAN[@]}"; do
    [[ $name == bench ]] && bench_at=$t bench_worst=$caps
    printf '  %-12s %4ss %4ss  %5s-%-5s   %s\n' "$name" "${EST[$name]}" "${CAP[$name]}" "${t}s" \
      "$((t + EST[$name]))s" "${WHAT[$name]}"
    t=$((t + EST[$name])); caps=$((caps + CAP[$name]))
    [[ $name == env || $name == build ]] || rest=$((rest + EST[$name]))
  done
  [[ -n $SKIPPED_NOTE ]] && echo "  not run:$SKIPPED_NOTE"
  local problems=()
  if ((bench_at >= 0)); then
    if ((bench_worst <= BENCH_BY_S)); then
      echo "  bench starts at ~${bench_at}s (at worst, every step before it at its cap: ${bench_worst}s): inside the first ${BENCH_BY_S}s"
    else
      problems+=("bench may start at ${bench_worst}s (~${bench_at}s estimated), after the first ${BENCH_BY_S}s")
    fi
  fi
  if ((t <= BUDGET_S)); then
    echo "  estimated total ${t}s: inside the budget of ${BUDGET_S}s (caps add up to ${caps}s)"
  else
    problems+=("estimated total ${t}s exceeds the budget of ${BUDGET_S}s")
  fi
  local room=$((DEVICE_S - STARTUP_S - BUDGET_S))
  echo "  device time: ~${STARTUP_S}s start + ${BUDGET_S}s budget leaves ${room}s of ${DEVICE_S}s for a rerun" \
       "(the steps after the build: ~${rest}s estimated)"
  ((room >= rest)) || problems+=("the budget leaves ${room}s for a rerun, less than the ~${rest}s it would take")
  if ((${#problems[@]})); then
    printf '  PLAN PROBLEM: %s\n' "${problems[@]}"
    PLAN_OK=0
    return 1
  fi
  echo "  plan: OK"
}

plan_steps
if [[ $MODE == plan ]]; then
  print_plan
  exit $((1 - PLAN_OK))
fi

# ---------------------------------------------------------------- the steps

SUMMARY="$OUT/summary.txt"
LOG="$OUT/log.txt"
STEP_OUT="$WORK/step.txt"  # the running step's output, for tallies
: > "$SUMMARY"
: > "$LOG"
[[ $MODE == gpu && -z "${STEPS:-}" ]] && : > "$STATE"  # a full run starts the record --rerun reads afresh
START=$(date +%s)
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }

versions() {
  nvidia-smi || echo "nvidia-smi: not found"
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version || echo "nvcc: not found"
  command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" || echo "compute-sanitizer: not found"
  "$PY" - <<'EOF'
import os, platform, shutil, sys, sysconfig, torch
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print("python", platform.python_version(), sys.prefix, "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
print("Python.h:", header if os.path.exists(header) else f"MISSING (looked for {header})",
      "| ninja:", shutil.which("ninja") or "not on PATH", "| cores:", os.cpu_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name} | sm {p.major}.{p.minor} | {p.multi_processor_count} SMs | "
          f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("device: none (no CUDA device)")
EOF
}

build() {
  FASTVOTE_CUDA=1 "$PY" setup.py build_ext --inplace
}

# The rehearsal's build: what the build needs is there, and the existing build imports.
build_check() {
  "$PY" - <<'EOF'
import os, shutil, sys, sysconfig
ninja = shutil.which("ninja")
print("REHEARSAL build check: nothing compiled")
print("ninja:", ninja or "not on PATH", "| in sys.prefix/bin:", bool(ninja) and ninja.startswith(os.path.join(sys.prefix, "bin")))
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print("Python.h:", "found" if os.path.exists(header) else f"MISSING ({header})")
nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
print("nvcc:", nvcc if os.path.exists(nvcc) else "not here (the GPU machine has it)")
from fastvote import _C
print("fastvote._C imports:", _C.__file__, "| with CUDA:", _C.with_cuda, "| CPU kernel:", _C.cpu_kernel())
if ninja is None:
    sys.exit("ninja is not on PATH: the GPU build would be serial")
EOF
}

# compute-sanitizer TOOL over sanitize_ops.py; without torch's caching allocator,
# so an out-of-bounds access inside a cached block is an access outside any allocation.
sanitize() {
  local tool=$1 cs="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
  [[ -x "$cs" ]] || cs="$(command -v compute-sanitizer)" || { echo "compute-sanitizer: not found"; return 1; }
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$tool" --error-exitcode 1 "$PY" benchmarks/sanitize_ops.py
}

sanitize_rehearsal() {
  echo "REHEARSAL: would run PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $1 --error-exitcode 1 $PY benchmarks/sanitize_ops.py"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$PY" benchmarks/fake_cuda.py benchmarks/sanitize_ops.py
}

TESTS_OTHER=(tests/test_ops.py tests/test_gpu_settings.py -k "cuda or gpu_settings")
tests_other_rehearsal() {
  # The CUDA cases of test_ops mirror its CPU cases, which CI runs: collected here, not run.
  "$PY" benchmarks/fake_cuda.py -m pytest --collect-only -q -p no:cacheprovider tests/test_ops.py -k cuda | tail -n 1 &&
    "$PY" benchmarks/fake_cuda.py -m pytest -q -rs -p no:cacheprovider tests/test_gpu_settings.py
}

# Issue 15, DataComp-small on one GPU: float16 rows generated on the GPU (200 random
# centres + noise), seeding and one k-means pass (the fused nearest-centroid op).
KMEANS_CODE='
import os, torch
from fastvote import cluster
n, num, dim = (int(os.environ[v]) for v in ("KMEANS_ROWS", "KMEANS_K", "KMEANS_DIM"))
g = torch.Generator("cuda").manual_seed(0)
c = torch.randn(200, dim, device="cuda", generator=g)
parts = [n // 50 + (i < n % 50) for i in range(50)]
x = torch.cat([(c[torch.randint(0, 200, (b,), device="cuda", generator=g)]
                + 0.5 * torch.randn(b, dim, device="cuda", generator=g)).half() for b in parts])
f = cluster.fit(lambda: x.split(1 << 18), num, rows=range(n), num_rows=n, iterations=1, device="cuda", progress=False)
print(f"{n} x {dim}, K={num}: seeding {f.seeding_seconds:.1f} s, pass {f.pass_seconds[0]:.1f} s ({f.fit_rows} rows)")
'
kmeans() {
  if ((REHEARSE)); then
    KMEANS_ROWS=20000 KMEANS_K=100 KMEANS_DIM=64 "$PY" benchmarks/fake_cuda.py -c "$KMEANS_CODE"
  else
    KMEANS_ROWS=12800000 KMEANS_K=100000 KMEANS_DIM=768 "$PY" -c "$KMEANS_CODE"
  fi
}

loaders() {
  if ((REHEARSE)); then  # the fastvote path only, tiny, on the CPU (each workload is a child process)
    "$PY" benchmarks/bench_loaders.py --device cpu --arch resnet18 --loaders fastvote-torch --workloads load \
      --images 8 --batch 4 --workers 1 --out "$WORK/loaders" --json "$OUT/loaders.json"
  else
    "$PY" benchmarks/bench_loaders.py --device cuda --arch resnet50 --loaders torchvision,fastvote-torch \
      --images 512 --batch 128 --workers 16 --out "$WORK/loaders" --json "$OUT/loaders.json"
  fi
}

export REHEARSE WORK OUT KMEANS_CODE
export -f versions build build_check sanitize sanitize_rehearsal tests_other_rehearsal kmeans loaders

# The command of step NAME, in CMD.
step_command() {
  local pytest_flags=(-q -rs --maxfail=25 --durations=10 -p no:cacheprovider)
  case "$1:$REHEARSE" in
    env:*) CMD=(bash -c versions) ;;
    build:0) CMD=(bash -c build) ;;
    build:1) CMD=(bash -c build_check) ;;
    tests-cuda:0) CMD=("$PY" -m pytest "${pytest_flags[@]}" tests/test_cuda.py) ;;
    tests-cuda:1) CMD=("$PY" benchmarks/fake_cuda.py -m pytest "${pytest_flags[@]}" tests/test_cuda.py) ;;
    bench:0) CMD=("$PY" benchmarks/bench_vote.py --device cuda --jsonl "$OUT/bench_vote.jsonl" --markdown "$OUT/bench_vote.md") ;;
    bench:1) CMD=("$PY" benchmarks/fake_cuda.py benchmarks/bench_vote.py --device cuda --quick --repeats 1
                  --jsonl "$OUT/bench_vote.jsonl" --markdown "$OUT/bench_vote.md") ;;
    memcheck:0 | racecheck:0) CMD=(bash -c "sanitize $1") ;;
    memcheck:1 | racecheck:1) CMD=(bash -c "sanitize_rehearsal $1") ;;
    tests-other:0) CMD=("$PY" -m pytest "${pytest_flags[@]}" "${TESTS_OTHER[@]}") ;;
    tests-other:1) CMD=(bash -c tests_other_rehearsal) ;;
    loaders:*) CMD=(bash -c loaders) ;;
    kmeans:*) CMD=(bash -c kmeans) ;;
  esac
}

# Runs step NAME under timeout (its cap or the budget left, whichever is less),
# output to the console, log.txt and STEP_OUT; its status to the summary and,
# when it passed, to the state file that --rerun reads.
run_step() {
  local name=$1 left limit t0 rc status
  left=$((BUDGET_S * CAP_SCALE - ($(date +%s) - START)))
  limit=$((CAP[$name] * CAP_SCALE < left ? CAP[$name] * CAP_SCALE : left))
  if ((limit < 10)); then
    printf '%-12s %-28s (est %ss)\n' "$name" "SKIPPED (budget spent)" "${EST[$name]}" | tee -a "$SUMMARY"
    FAILED=1
    return
  fi
  step_command "$name"
  printf '\n===== %s (cap %ss, est %ss): %s\n' "$name" "$limit" "${EST[$name]}" "${CMD[*]}" | tee -a "$LOG"
  t0=$(date +%s)
  : > "$STEP_OUT"
  timeout --kill-after=10 "$limit" "${CMD[@]}" 2>&1 | tee -a "$LOG" "$STEP_OUT"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  if [[ $name == memcheck || $name == racecheck ]] && grep -q "Device not supported" "$STEP_OUT"; then
    status="UNSUPPORTED (compute-sanitizer refused this device)"  # gVisor machines; not a code failure
    rc=0
  fi
  if ((rc == 0)); then
    [[ $status == ok && $REHEARSE == 0 ]] && echo "$name $COMMIT" >> "$STATE"
  else
    FAILED=1
  fi
  printf '%-12s %-28s %4ss (est %ss)\n' "$name" "$status" "$(($(date +%s) - t0))" "${EST[$name]}" | tee -a "$SUMMARY"
  case $name in
    env) grep -m 1 '^device:' "$STEP_OUT" >> "$SUMMARY" ;;
    tests-*) echo "  pytest: $(grep -E '(passed|failed|error|skipped|deselected|collected)' "$STEP_OUT" | tail -n 1)" >> "$SUMMARY" ;;
    bench) grep -E '^(fm_vote|lm_vote) ' "$STEP_OUT" | sed "s/^/  $( ((REHEARSE)) && echo 'REHEARSAL, CPU kernels: ')/" >> "$SUMMARY"
           [[ -f $OUT/bench_vote.jsonl ]] && echo "  bench_vote.jsonl: $(wc -l < "$OUT/bench_vote.jsonl") rows" >> "$SUMMARY" ;;
  esac
}

# What comes back from $OUT: at most 8 files, 16 MiB each, no deeper than
# $OUT/a/b/file, names of letters, digits, '.', '_' and '-'.
check_out() {
  local count=0 problems=0 path rel
  while IFS= read -r -d '' path; do
    rel=${path#"$OUT"/}
    if [[ -f $path ]]; then
      count=$((count + 1))
      [[ $(tr -cd / <<< "$rel" | wc -c) -le 2 ]] || { note "  out: $rel is too deep to come back"; problems=1; }
      (($(stat -c %s "$path") <= 16 * 1024 * 1024)) || { note "  out: $rel is over 16 MiB"; problems=1; }
    fi
    [[ $(basename "$rel") =~ ^[A-Za-z0-9._-]+$ ]] || { note "  out: '$rel' has a name that does not come back"; problems=1; }
  done < <(find "$OUT" -mindepth 1 -print0)
  ((count <= 8)) || { note "  out: $count files, more than the 8 that come back"; problems=1; }
  note "files in $OUT: $count of 8 ($(cd "$OUT" && ls | tr '\n' ' '))"
  return $problems
}

{
  ((REHEARSE)) && echo "REHEARSAL on $(uname -n): CUDA faked onto the CPU, nothing built, small shapes, caps x$CAP_SCALE; no figure from this run belongs in RESULTS.md"
  echo "fastvote GPU check ($MODE), $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT, python $PY"
  print_plan
} | tee -a "$SUMMARY"
grep -q 'PLAN PROBLEM' "$SUMMARY" && { PLAN_OK=0; FAILED=1; }

RUN=("${PLAN[@]}")
if ((REHEARSE)) && [[ -z "${STEPS:-}" && "${KMEANS:-0}" != 1 ]]; then
  note "REHEARSAL also runs the kmeans step, which a GPU run takes only when asked"
  RUN+=(kmeans)
fi
for name in "${RUN[@]}"; do
  run_step "$name"
done

check_out || FAILED=1
((REHEARSE)) && note "REHEARSAL: $([[ $FAILED == 0 ]] && echo passed || echo FAILED) in $(($(date +%s) - START))s (step logic only; not GPU figures)"
note "total $(($(date +%s) - START))s of the $((BUDGET_S * CAP_SCALE))s budget$( ((REHEARSE)) && echo " (x$CAP_SCALE: rehearsal)"); outputs in $OUT; exit $FAILED"
echo
echo "==================== summary ($SUMMARY)"
cat "$SUMMARY"
exit $FAILED
