// The certified bf16 pass on CPUs with AVX512_BF16 (Zen 4/5, Sapphire Rapids
// and later): the AVX-512 tile loop with one VDPBF16PS per pair of features,
// 32 multiply-adds per instruction where the fp32 kernel does 16. Everything
// else (the fp32 tile for uncertified rows, exact keys, logits, squares) is
// the AVX-512 kernel's. Only this file is compiled for AVX512_BF16; it runs
// only where the CPU reports it.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "fastvote/topk.h"
#include "tile_kernel.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16,fma")

#include "tile_kernel_avx512.h"
#include "tile_kernel_impl.h"

namespace fastvote {
namespace cpu {
namespace {

struct NativeBf16Dot {
  using Elem = uint32_t;
  using In = __m512i;
  static In load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static In broadcast(const uint32_t* p) { return _mm512_set1_epi32(static_cast<int>(*p)); }
  static __m512 madd(In c, In x, __m512 acc) {
    return _mm512_dpbf16_ps(acc, (__m512bh)c, (__m512bh)x);
  }
};

void bf16_tile(const Bf16TileJob& job) { run_bf16_tile<Avx512, 12, 2, NativeBf16Dot>(job); }

}  // namespace

Kernels kernels_avx512bf16() {
  Kernels k = kernels_avx512();
  k.name = "avx512bf16";
  k.candidates = bf16_tile;
  return k;
}

}  // namespace cpu
}  // namespace fastvote

#pragma GCC pop_options
#endif
