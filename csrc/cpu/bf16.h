// bf16 as the certified candidate pass uses it: the conversion from fp32,
// pairs of bf16 (uint32: feature 2p in the low half, 2p + 1 in the high
// half, VDPBF16PS's layout), one VDPBF16PS lane step, and the FP mode the
// pass runs in. Included by the per-ISA kernel files (after their target
// pragma) and by certified.cpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastvote/certify.h"

#if defined(__x86_64__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr
#endif

namespace fastvote {
namespace cpu {
namespace {

using certify::bf16_bits;  // the conversion both backends use (fastvote/certify.h)

// A bf16 as fp32 is its bits in the upper half.
inline float bf16_high(uint32_t pair) {
  const uint32_t bits = pair & 0xFFFF0000u;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float bf16_low(uint32_t pair) { return certify::bf16_value(pair); }  // reads the low 16 bits

// One VDPBF16PS lane step as Intel's SDM defines it: the odd (high) pair's
// product is added first, then the even one's, each as one fp32 FMA rounded
// to nearest even (the FMA rounds product plus sum once), with DAZ/FTZ: in
// the emulation those come from the MXCSR (Mxcsr below).
inline float bf16_pair_madd(uint32_t c, uint32_t x, float acc) {
  acc = std::fma(bf16_high(c), bf16_high(x), acc);
  return std::fma(bf16_low(c), bf16_low(x), acc);
}

// Sets FTZ/DAZ for a scope (on this thread). The candidate pass, native or
// emulated, runs with both: its epilogue then rounds alike in both, and the
// emulation's FMAs flush as the instruction does. The certificate's own
// arithmetic runs with neither, whatever the thread was set to. Other
// architectures keep their FP mode (their bf16 pass is only emulated, and
// the bound allows for either).
#if defined(__x86_64__)
class Mxcsr {
 public:
  static constexpr unsigned kFlushDenormals = 0x8040;  // FTZ | DAZ
  explicit Mxcsr(unsigned flush) : saved_(_mm_getcsr()) {
    _mm_setcsr((saved_ & ~kFlushDenormals) | flush);
  }
  ~Mxcsr() { _mm_setcsr(saved_); }
  Mxcsr(const Mxcsr&) = delete;
  Mxcsr& operator=(const Mxcsr&) = delete;

 private:
  unsigned saved_;
};
#else
class Mxcsr {
 public:
  static constexpr unsigned kFlushDenormals = 0;
  explicit Mxcsr(unsigned) {}
};
#endif

}  // namespace
}  // namespace cpu
}  // namespace fastvote
