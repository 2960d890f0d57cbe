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

void portable(const TileJob& job) { run_tile<Scalar, 4, 8>(job); }

struct Choice {
  TileFn fn;
  const char* name;
};

// What this CPU can run, fastest first.
std::vector<Choice> supported() {
  std::vector<Choice> out;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) out.push_back({tile_kernel_avx512(), "avx512"});
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    out.push_back({tile_kernel_avx2(), "avx2"});
#endif
  out.push_back({portable, "portable"});
  return out;
}

// FASTVOTE_CPU_KERNEL=avx512|avx2|portable pins a variant (tests run each one
// this CPU supports); it is read on every call, so it can change at run time.
Choice choose() {
  static const std::vector<Choice> choices = supported();
  const char* want = std::getenv("FASTVOTE_CPU_KERNEL");
  if (want == nullptr || *want == '\0') return choices.front();
  std::string names;
  for (const Choice& c : choices) {
    if (std::strcmp(c.name, want) == 0) return c;
    names += names.empty() ? c.name : std::string(", ") + c.name;
  }
  throw std::invalid_argument(std::string("fastvote: FASTVOTE_CPU_KERNEL='") + want +
                              "' is not available on this CPU; expected one of: " + names);
}

}  // namespace

TileFn tile_kernel() { return choose().fn; }
const char* tile_kernel_name() { return choose().name; }

}  // namespace cpu
}  // namespace fastvote
