// Run-time choice of the CPU micro-kernel, plus the portable one (any CPU,
// any compiler), which the faster ones are tested against.
#include "tile_kernel.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "tile_kernel_impl.h"

namespace fastvote {
namespace cpu {
namespace {

struct Scalar {
  static constexpr int W = 1;
  using Reg = float;
  static Reg zero() { return 0.0f; }
  static Reg load(const float* p) { return *p; }
  static Reg broadcast(const float* p) { return *p; }
  static Reg fma(Reg a, Reg b, Reg c) { return a * b + c; }
  static unsigned admits(Reg key, Reg threshold) { return fastvote::admits(key, threshold); }
  static void store(float* p, Reg a) { *p = a; }
};

// The fused multiply-add the vector kernels use, for "bf16emu" on CPUs
// without AVX-512: its results must equal theirs, bit for bit.
struct ScalarFma : Scalar {
  static Reg fma(Reg a, Reg b, Reg c) { return std::fma(a, b, c); }
};

struct ScalarBf16Dot {
  using Elem = uint32_t;
  using In = uint32_t;
  static In load(const uint32_t* p) { return *p; }
  static In broadcast(const uint32_t* p) { return *p; }
  static float madd(In c, In x, float acc) { return bf16_pair_madd(c, x, acc); }
};

void portable_tile(const TileJob& job) { run_tile<Scalar, 4, 8>(job); }
void portable_tile_squares(const TileJob& job, double* row_sums) {
  run_tile_squares<Scalar, 4, 8>(job, row_sums);
}
bool portable_logits_row(const float* v, int64_t n, int k, float* keys, int64_t* idx) {
  return run_logits_row<Scalar>(v, n, k, keys, idx);
}
void portable_fma_tile(const TileJob& job) { run_tile<ScalarFma, 4, 8>(job); }
void portable_fma_tile_squares(const TileJob& job, double* row_sums) {
  run_tile_squares<ScalarFma, 4, 8>(job, row_sums);
}
void portable_bf16emu_tile(const Bf16TileJob& job) {
  run_bf16_tile<ScalarFma, 4, 8, ScalarBf16Dot>(job);
}

// What this CPU can run, fastest first; "bf16emu" last, as it is never the
// automatic choice.
std::vector<Kernels> supported() {
  std::vector<Kernels> out;
  Kernels bf16emu = {portable_fma_tile,         portable_logits_row,   "bf16emu",
                     portable_fma_tile_squares, portable_bf16emu_tile, exact_keys};
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    // VDPBF16PS pays only where it outruns the fp32 FMA: AMD's Zen 4/5.
    const bool bf16 = __builtin_cpu_supports("avx512bf16"), fast_bf16 = bf16 && __builtin_cpu_is("amd");
    if (cpu_has_amx_bf16()) out.push_back(kernels_amxbf16());
    if (fast_bf16) out.push_back(kernels_avx512bf16());
    out.push_back(kernels_avx512());
    if (bf16 && !fast_bf16) out.push_back(kernels_avx512bf16());
    bf16emu = kernels_avx512_bf16emu();
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back(kernels_avx2());
#endif
  out.push_back({portable_tile, portable_logits_row, "portable", portable_tile_squares});
  out.push_back(bf16emu);
  return out;
}

// FASTVOTE_CPU_KERNEL=amxbf16|avx512bf16|avx512|avx2|portable|bf16emu pins a variant
// (tests run each one this CPU supports); it is read on every call, so it can
// change at run time.
const Kernels& choose_kernels() {
  static const std::vector<Kernels> choices = supported();
  const char* want = std::getenv("FASTVOTE_CPU_KERNEL");
  if (want == nullptr || *want == '\0') return choices.front();
  std::string names;
  for (const Kernels& c : choices) {
    if (std::strcmp(c.name, want) == 0) return c;
    names += names.empty() ? c.name : std::string(", ") + c.name;
  }
  throw std::invalid_argument(std::string("fastvote: FASTVOTE_CPU_KERNEL='") + want +
                              "' is not available on this CPU; expected one of: " + names);
}

}  // namespace

const Kernels& kernels() { return choose_kernels(); }

bool kernels_pinned() {
  const char* want = std::getenv("FASTVOTE_CPU_KERNEL");
  return want != nullptr && *want != '\0';
}

}  // namespace cpu
}  // namespace fastvote
