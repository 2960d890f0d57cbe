// Run-time choice of the CPU micro-kernel, plus the portable one (any CPU,
// any compiler), which the faster ones are tested against.
#include "tile_kernel.h"

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

void portable_tile(const TileJob& job) { run_tile<Scalar, 4, 8>(job); }
void portable_tile_squares(const TileJob& job, double* row_sums) {
  run_tile_squares<Scalar, 4, 8>(job, row_sums);
}
bool portable_logits_row(const float* v, int64_t n, int k, float* keys, int64_t* idx) {
  return run_logits_row<Scalar>(v, n, k, keys, idx);
}

// What this CPU can run, fastest first.
std::vector<Kernels> supported() {
  std::vector<Kernels> out;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) out.push_back(kernels_avx512());
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back(kernels_avx2());
#endif
  out.push_back({portable_tile, portable_logits_row, "portable", portable_tile_squares});
  return out;
}

// FASTVOTE_CPU_KERNEL=avx512|avx2|portable pins a variant (tests run each one
// this CPU supports); it is read on every call, so it can change at run time.
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

}  // namespace cpu
}  // namespace fastvote
