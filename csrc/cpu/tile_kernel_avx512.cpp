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
Kernels kernels_avx512() { return {tile, logits_row, "avx512", tile_squares, nullptr, exact_keys}; }
Kernels kernels_avx512_bf16emu() {
  return {tile, logits_row, "bf16emu", tile_squares, bf16emu_tile, exact_keys};
}

}  // namespace cpu
}  // namespace fastvote

#pragma GCC pop_options
#endif
