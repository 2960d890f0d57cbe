// The AVX2+FMA micro-kernel: 5 centroids x 16 rows of accumulators (10 ymm).
// Only this file is compiled for AVX2 (the pragma below, after all includes of
// shared headers); it runs only where the CPU reports avx2 and fma.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "fastvote/topk.h"
#include "tile_kernel.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "tile_kernel_impl.h"

namespace fastvote {
namespace cpu {
namespace {

struct Avx2 {
  static constexpr int W = 8;
  using Reg = __m256;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static unsigned admits(Reg key, Reg threshold) {
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(key, threshold, _CMP_NGE_UQ)));
  }
  static void store(float* p, Reg a) { _mm256_storeu_ps(p, a); }
};

void tile(const TileJob& job) { run_tile<Avx2, 5, 2>(job); }
void tile_squares(const TileJob& job, double* row_sums) {
  run_tile_squares<Avx2, 5, 2>(job, row_sums);
}
bool logits_row(const float* v, int64_t n, int k, float* keys, int64_t* idx) {
  return run_logits_row<Avx2>(v, n, k, keys, idx);
}

}  // namespace

Kernels kernels_avx2() { return {tile, logits_row, "avx2", tile_squares}; }

}  // namespace cpu
}  // namespace fastvote

#pragma GCC pop_options
#endif
