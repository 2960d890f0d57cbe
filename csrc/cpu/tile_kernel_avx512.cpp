// The AVX-512 micro-kernel: 12 centroids x 32 rows of accumulators (24 zmm).
// Only this file is compiled for AVX-512 (the pragma below, after all
// includes of shared headers); it runs only where the CPU reports avx512f.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "fastvote/topk.h"
#include "tile_kernel.h"

#pragma GCC push_options
#pragma GCC target("avx512f,fma")

#include "tile_kernel_impl.h"

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

void tile(const TileJob& job) { run_tile<Avx512, 12, 2>(job); }
void tile_squares(const TileJob& job, double* row_sums) {
  run_tile_squares<Avx512, 12, 2>(job, row_sums);
}
bool logits_row(const float* v, int64_t n, int k, float* keys, int64_t* idx) {
  return run_logits_row<Avx512>(v, n, k, keys, idx);
}

}  // namespace

Kernels kernels_avx512() { return {tile, logits_row, "avx512", tile_squares}; }

}  // namespace cpu
}  // namespace fastvote

#pragma GCC pop_options
#endif
