// The AVX-512 vector type of the tile kernel, shared by the files compiled
// for AVX-512 (include it after their target pragma).
#pragma once

#include <immintrin.h>

namespace fastvote {
namespace cpu {
namespace {

struct Avx512 {
  static constexpr int W = 16;
  using Reg = __m512;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  // NGE_UQ: true when key < threshold or either is NaN (a not-yet-full row).
  static unsigned admits(Reg key, Reg threshold) {
    return _mm512_cmp_ps_mask(key, threshold, _CMP_NGE_UQ);
  }
  static void store(float* p, Reg a) { _mm512_storeu_ps(p, a); }
};

}  // namespace
}  // namespace cpu
}  // namespace fastvote
