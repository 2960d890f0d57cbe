// The AVX-512 micro-kernel: 12 centroids x 32 rows of accumulators (24 zmm),
// and "bf16emu": the certified bf16 pass with VDPBF16PS emulated in fp32 FMAs.
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

#include "tile_kernel_avx512.h"
#include "tile_kernel_impl.h"

namespace fastvote {
namespace cpu {
namespace {


// bf16_pair_madd on 16 lanes: the bf16 halves widened to fp32 by a mask or a
// shift, then the odd product's FMA, then the even one's.
struct EmulatedBf16Dot {
  using Elem = uint32_t;
  using In = __m512i;
  static In load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static In broadcast(const uint32_t* p) { return _mm512_set1_epi32(static_cast<int>(*p)); }
  static __m512 high(In pairs) {
    return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  // The zero-masked shift: GCC 12 warns about the plain one's undefined source.
  static __m512 low(In pairs) {
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(static_cast<__mmask16>(0xFFFF), pairs, 16));
  }
  static __m512 madd(In c, In x, __m512 acc) {
    acc = _mm512_fmadd_ps(high(c), high(x), acc);
    return _mm512_fmadd_ps(low(c), low(x), acc);
  }
};

// One step of a 16 x 16 transpose in registers: rows i and i + B (i & B == 0)
// swap their off-diagonal B-wide blocks of lanes. After B = 8, 4, 2, 1, r[j]
// holds lane j of every row. (Two-source permutes: GCC 12 warns about the
// unpack intrinsics' undefined sources.)
template <int B>
inline void swap_blocks(__m512 r[16]) {
  alignas(64) int low[16], high[16];
  for (int j = 0; j < 16; ++j) {
    low[j] = (j & B) ? 16 + j - B : j;  // 16 + l: lane l of the second source
    high[j] = (j & B) ? 16 + j : j + B;
  }
  const __m512i to_low = _mm512_load_si512(low), to_high = _mm512_load_si512(high);
  for (int i = 0; i < 16; ++i) {
    if (i & B) continue;
    const __m512 a = r[i], b = r[i + B];
    r[i] = _mm512_permutex2var_ps(a, to_low, b);
    r[i + B] = _mm512_permutex2var_ps(a, to_high, b);
  }
}

// Features [d0, d0 + m) of 16 rows (n of them real, the rest zero) into half
// a slab's columns, their squares into acc[j] (feature d0 + j: partial j).
// fp-contract=off: the squares must not fuse into the adds, or the norms
// would not be the scalar code's bits (here and in the caller it inlines into).
__attribute__((optimize("fp-contract=off"))) inline void pack_block(
    const float* const* rows, int n, int64_t d0, int m, float* out, __m512 acc[16]) {
  const __mmask16 features = static_cast<__mmask16>((1u << m) - 1);
  __m512 r[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = i < n ? _mm512_maskz_loadu_ps(features, rows[i] + d0) : _mm512_setzero_ps();
  }
  swap_blocks<8>(r);
  swap_blocks<4>(r);
  swap_blocks<2>(r);
  swap_blocks<1>(r);
  for (int j = 0; j < m; ++j) {
    acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(r[j], r[j]));
    _mm512_storeu_ps(out + (d0 + j) * kSlab, r[j]);
  }
}

// pack_slab (tile_kernel.h): 16 features of each half slab's 16 rows per step,
// transposed in registers. Both halves advance together, so all 32 rows are
// read at once (more loads in flight for gathered rows; measured faster than
// one half after the other).
__attribute__((optimize("fp-contract=off"))) void pack_slab(
    const float* const* rows, int n, int64_t dim, float* slab, float* sqnorm) {
  static_assert(kSlab == 32, "a slab is two halves of 16 rows");
  __m512 acc[2][16];
  for (int h = 0; h < 2; ++h) {
    for (int j = 0; j < 16; ++j) acc[h][j] = _mm512_setzero_ps();
  }
  const int in_half[2] = {std::min(n, 16), std::max(n - 16, 0)};
  int64_t d0 = 0;
  for (; d0 + 16 <= dim; d0 += 16) {
    for (int h = 0; h < 2; ++h) {
      pack_block(rows + 16 * h, in_half[h], d0, 16, slab + 16 * h, acc[h]);
    }
  }
  if (d0 < dim) {
    for (int h = 0; h < 2; ++h) {
      pack_block(rows + 16 * h, in_half[h], d0, static_cast<int>(dim - d0), slab + 16 * h, acc[h]);
    }
  }
  for (int h = 0; h < 2; ++h) {
    for (int w = 8; w > 0; w /= 2) {
      for (int l = 0; l < w; ++l) acc[h][l] = _mm512_add_ps(acc[h][l], acc[h][l + w]);
    }
    float norms[16];
    _mm512_storeu_ps(norms, acc[h][0]);
    std::copy(norms, norms + in_half[h], sqnorm + 16 * h);
  }
}

void tile(const TileJob& job) { run_tile<Avx512, 12, 2>(job); }
void bf16emu_tile(const Bf16TileJob& job) { run_bf16_tile<Avx512, 12, 2, EmulatedBf16Dot>(job); }
void tile_squares(const TileJob& job, double* row_sums) {
  run_tile_squares<Avx512, 12, 2>(job, row_sums);
}
bool logits_row(const float* v, int64_t n, int k, float* keys, int64_t* idx) {
  return run_logits_row<Avx512>(v, n, k, keys, idx);
}

}  // namespace

// exact_keys is shared with the native bf16 kernel: any FMA gives its bits.
Kernels kernels_avx512() {
  return {tile, logits_row, "avx512", tile_squares, nullptr, exact_keys, pack_slab};
}
Kernels kernels_avx512_bf16emu() {
  return {tile, logits_row, "bf16emu", tile_squares, bf16emu_tile, exact_keys, pack_slab};
}

}  // namespace cpu
}  // namespace fastvote

#pragma GCC pop_options
#endif
