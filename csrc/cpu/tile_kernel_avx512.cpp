// The AVX-512 micro-kernel: 12 centroids x 32 rows of accumulators (24 zmm),
// and "bf16emu": the certified bf16 pass with VDPBF16PS emulated in fp32 FMAs.
// Only this file is compiled for AVX-512 (the pragma below, after all
// includes of shared headers); it runs only where the CPU reports avx512f.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

// A row's squared norm in pack_slab's order: feature d into partial d % 16
// (a multiply, then an add), then the partials added pairwise.
__attribute__((optimize("fp-contract=off"))) float row_sqnorm(const float* row, int64_t dim) {
  __m512 part = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= dim; d += 16) {
    const __m512 v = _mm512_loadu_ps(row + d);
    part = _mm512_add_ps(part, _mm512_mul_ps(v, v));
  }
  if (d < dim) {  // (the zeros past the end add +0 to non-negative partials: no change)
    const __m512 v = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (dim - d)) - 1), row + d);
    part = _mm512_add_ps(part, _mm512_mul_ps(v, v));
  }
  alignas(64) float p[16];
  _mm512_store_ps(p, part);
  for (int w = 8; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) p[l] += p[l + w];
  }
  return p[0];
}

// GroupFn's block: R rows x NV vectors of 16 centroids (j0 on) of
// accumulators, each row's feature d broadcast from the row itself, the
// centroids' read from their slabs. Where `next` is set, the next block's
// rows are prefetched a line per 16 features.
template <int NV, int R>
inline void group_dots(const float* const* x, const float* const* next, int64_t dim,
                       const float* slabs, int64_t j0, __m512 acc[R][NV]) {
  const float* c0[NV];  // vector v: centroids j0 + 16 v on, half a slab
  for (int v = 0; v < NV; ++v) {
    const int64_t j = j0 + 16 * v;
    c0[v] = slabs + (j / kSlab) * dim * kSlab + j % kSlab;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t d0 = 0; d0 < dim; d0 += 16) {
    if (next != nullptr) {
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next[r] + d0), _MM_HINT_T0);
    }
    // (the prefetch's test outside the inner loop: inside, it left the compiler one register short,
    // and it kept an accumulator on the stack)
    const int64_t d1 = std::min(dim, d0 + 16);
    for (int64_t d = d0; d < d1; ++d) {
      __m512 c[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[v] = _mm512_load_ps(c0[v] + d * kSlab);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 xr = _mm512_set1_ps(x[r][d]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(c[v], xr, acc[r][v]);
      }
    }
  }
}

// The block's keys into each row's top-k list, in increasing centroid order
// (j0 + 16 v + lane; `valid` of the block's lanes are centroids).
template <int NV, int R>
inline void group_insert(const __m512 acc[R][NV], const GroupJob& job, int64_t row0, int live, int64_t j0,
                         int valid, float threshold[R]) {
  for (int v = 0; v < NV; ++v) {
    const int in_vector = std::clamp(valid - 16 * v, 0, 16);
    const __mmask16 lanes = static_cast<__mmask16>((1u << in_vector) - 1);
    const __m512 bias = _mm512_maskz_loadu_ps(lanes, job.bias + j0 + 16 * v);
    const __m512 scale = _mm512_maskz_loadu_ps(lanes, job.scale + j0 + 16 * v);
    for (int r = 0; r < live; ++r) {
      const __m512 key = _mm512_fmadd_ps(scale, acc[r][v], bias);
      unsigned mask = lanes & Avx512::admits(key, _mm512_set1_ps(threshold[r]));
      if (!mask) continue;
      alignas(64) float lane_keys[16];
      _mm512_store_ps(lane_keys, key);
      const int64_t row = row0 + r;
      float* keys = job.keys + row * job.k;
      int64_t* idx = job.indices + row * job.k;
      for (; mask; mask &= mask - 1) {
        const int lane = __builtin_ctz(mask);
        job.counts[row] = topk_insert(keys, idx, job.counts[row], job.k, lane_keys[lane], j0 + 16 * v + lane);
        threshold[r] = reject_threshold(keys, job.counts[row], job.k);
      }
    }
  }
}

// k <= 2 (every call k-means makes): a row keeps, per lane l, its best two
// (key, index) among the centroids j = l (mod 16) scored so far, and merges
// the 16 lanes once, at the end. The same list as topk_insert over every
// candidate in increasing index (ranks_before's order: a lane sees its
// candidates in increasing index, so a strict compare keeps a tie's lower
// index; an empty slot is (+inf, kEmpty), which even a +inf key ranks
// before), without the scalar insert and its mispredicted branches per
// admitted lane: the first vector of a row admits all 16 (2/3 of a
// 48-centroid group's time went to the epilogue). Keys are never NaN here:
// the rows' and centroids' squared norms are finite (checked), so
// |acc| <= |x| |c| stays finite.
constexpr int kEmpty = INT32_MAX;

struct LaneBest {
  __m512 key[2];
  __m512i idx[2];
};

// ranks_before (fastvote/topk.h) lane by lane: the lanes where (ka, ia) ranks before (kb, ib).
inline __mmask16 ranks_before(__m512 ka, __m512i ia, __m512 kb, __m512i ib) {
  return _mm512_cmp_ps_mask(ka, kb, _CMP_LT_OQ) |
         (_mm512_cmp_ps_mask(ka, kb, _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(ia, ib));
}

template <int NV, int R>
inline void group_lanes(const __m512 acc[R][NV], const GroupJob& job, int live, int64_t j0, int valid,
                        LaneBest best[R]) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int v = 0; v < NV; ++v) {
    const int in_vector = std::clamp(valid - 16 * v, 0, 16);
    const __mmask16 lanes = static_cast<__mmask16>((1u << in_vector) - 1);
    const __m512 bias = _mm512_maskz_loadu_ps(lanes, job.bias + j0 + 16 * v);
    const __m512 scale = _mm512_maskz_loadu_ps(lanes, job.scale + j0 + 16 * v);
    const __m512i j = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j0 + 16 * v)));
    for (int r = 0; r < live; ++r) {
      LaneBest& b = best[r];
      const __m512 key = _mm512_fmadd_ps(scale, acc[r][v], bias);
      const __mmask16 first = lanes & ranks_before(key, j, b.key[0], b.idx[0]);
      const __mmask16 second = lanes & ~first & ranks_before(key, j, b.key[1], b.idx[1]);
      b.key[1] = _mm512_mask_mov_ps(_mm512_mask_mov_ps(b.key[1], first, b.key[0]), second, key);
      b.idx[1] = _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(b.idx[1], first, b.idx[0]), second, j);
      b.key[0] = _mm512_mask_mov_ps(b.key[0], first, key);
      b.idx[0] = _mm512_mask_mov_epi32(b.idx[0], first, j);
    }
  }
}

// The first of a row's 16 lane lists (ranks_before's order), removed from them: its key and index.
// (A tree of lane swaps, lane l against lane l ^ w for w = 8, 4, 2, 1, leaves the first pair in every
// lane. Zero-masked permutes: GCC 12 warns about the undefined sources of the unmasked shuffles and
// of the reduce intrinsics.)
inline void pop_best(LaneBest& b, float* key, int64_t* index) {
  __m512 k = b.key[0];
  __m512i i = b.idx[0];
  for (int w = 8; w > 0; w /= 2) {
    const __m512i swap = _mm512_xor_si512(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(w));
    const __m512 other_k = _mm512_maskz_permutexvar_ps(0xFFFF, swap, k);
    const __m512i other_i = _mm512_maskz_permutexvar_epi32(0xFFFF, swap, i);
    const __mmask16 before = ranks_before(other_k, other_i, k, i);
    k = _mm512_mask_mov_ps(k, before, other_k);
    i = _mm512_mask_mov_epi32(i, before, other_i);
  }
  alignas(64) float keys[16];
  alignas(64) int32_t indices[16];
  _mm512_store_ps(keys, k);
  _mm512_store_si512(indices, i);
  *key = keys[0];
  *index = indices[0];
  const __mmask16 at = _mm512_cmpeq_epi32_mask(b.idx[0], i);
  b.key[0] = _mm512_mask_mov_ps(b.key[0], at, b.key[1]);
  b.idx[0] = _mm512_mask_mov_epi32(b.idx[0], at, b.idx[1]);
}

// The rows x against the group's centroids in blocks of up to 48 (24 accumulators and 3 centroid
// vectors of the 32 registers), the last block of as many vectors as it needs: epilogue(acc, j0,
// valid) takes each block's accumulators acc[R][NV] (centroids j0 on, `valid` of its lanes). The
// next block of rows (`next`, if any) is prefetched during the first. (Blocks of 64 centroids, 6
// rows, read the centroids from L2 at ~40 bytes a cycle and ran at 2/3 of the fp32 peak.)
template <int R, class Epilogue>
void for_each_block(const GroupJob& job, const float* const* x, const float* const* next, Epilogue&& epilogue) {
  for (int64_t j0 = 0; j0 < job.count; j0 += 48) {
    const int valid = static_cast<int>(std::min<int64_t>(48, job.count - j0));
    const float* const* ahead = j0 == 0 ? next : nullptr;
    const auto block = [&](auto vectors) {
      constexpr int NV = decltype(vectors)::value;
      __m512 acc[R][NV];
      group_dots<NV, R>(x, ahead, job.dim, job.slabs, j0, acc);
      epilogue(vectors, acc, j0, valid);
    };
    switch ((valid + 15) / 16) {
      case 1: block(std::integral_constant<int, 1>{}); break;
      case 2: block(std::integral_constant<int, 2>{}); break;
      default: block(std::integral_constant<int, 3>{}); break;
    }
  }
}

// GroupFn: blocks of 8 rows, each against every block of the group's centroids (for_each_block).
void group_rows(const GroupJob& job) {
  constexpr int R = 8;
  for (int64_t row0 = 0; row0 < job.n; row0 += R) {
    const int live = static_cast<int>(std::min<int64_t>(R, job.n - row0));
    const float* x[R];
    const float* next[R];
    for (int r = 0; r < R; ++r) {  // (a short last block repeats its last row; its keys are dropped)
      x[r] = job.rows[row0 + std::min(r, live - 1)];
      next[r] = job.rows[std::min(job.n - 1, row0 + R + r)];
    }
    const float* const* ahead = row0 + R < job.n ? next : nullptr;
    if (job.k <= 2) {
      LaneBest best[R];
      for (int r = 0; r < live; ++r) {
        best[r].key[0] = best[r].key[1] = _mm512_set1_ps(INFINITY);
        best[r].idx[0] = best[r].idx[1] = _mm512_set1_epi32(kEmpty);
      }
      for_each_block<R>(job, x, ahead, [&](auto vectors, const auto& acc, int64_t j0, int valid) {
        group_lanes<decltype(vectors)::value, R>(acc, job, live, j0, valid, best);
      });
      for (int r = 0; r < live; ++r) {
        const int64_t row = row0 + r;
        int count = 0;
        for (; count < job.k && count < job.count; ++count) {
          pop_best(best[r], job.keys + row * job.k + count, job.indices + row * job.k + count);
        }
        job.counts[row] = count;
      }
    } else {
      float threshold[R];
      for (int r = 0; r < live; ++r) {
        job.counts[row0 + r] = 0;
        threshold[r] = NAN;
      }
      for_each_block<R>(job, x, ahead, [&](auto vectors, const auto& acc, int64_t j0, int valid) {
        group_insert<decltype(vectors)::value, R>(acc, job, row0, live, j0, valid, threshold);
      });
    }
    for (int r = 0; r < live; ++r) job.sqnorm[row0 + r] = row_sqnorm(x[r], job.dim);
  }
}

// ExactKeysFn with gathers: 16 lanes a register, each lane's centroid feature
// gathered and its row's feature permuted out of the slab's two halves; the
// two registers' chains interleave to hide the fma latency. Offsets are
// int32: centroid matrices of 2^31 floats or more take the scalar lanes.
void exact_keys_gathered(const float* slab, int64_t dim, const float* centroids, int64_t ldc,
                         const float* bias, const float* scale, const int* lane_row, const int64_t* idx,
                         float* keys) {
  int64_t top = 0;
  for (int l = 0; l < kSlab; ++l) top = std::max(top, idx[l]);
  if ((top + 1) * ldc > INT32_MAX) return exact_keys(slab, dim, centroids, ldc, bias, scale, lane_row, idx, keys);
  alignas(64) int offset[kSlab];
  __mmask16 live[2] = {0, 0};
  for (int l = 0; l < kSlab; ++l) {
    offset[l] = static_cast<int>(std::max<int64_t>(idx[l], 0) * ldc);
    if (idx[l] >= 0) live[l / 16] |= static_cast<__mmask16>(1u << (l % 16));
  }
  const __m512i off0 = _mm512_load_si512(offset), off1 = _mm512_load_si512(offset + 16);
  const __m512i row0 = _mm512_loadu_si512(lane_row), row1 = _mm512_loadu_si512(lane_row + 16);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    const __m512 lo = _mm512_loadu_ps(slab + d * kSlab), hi = _mm512_loadu_ps(slab + d * kSlab + 16);
    const __m512 c0 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live[0], off0, centroids + d, 4);
    const __m512 c1 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live[1], off1, centroids + d, 4);
    acc0 = _mm512_fmadd_ps(c0, _mm512_permutex2var_ps(lo, row0, hi), acc0);
    acc1 = _mm512_fmadd_ps(c1, _mm512_permutex2var_ps(lo, row1, hi), acc1);
  }
  alignas(64) float acc[kSlab];
  _mm512_store_ps(acc, acc0);
  _mm512_store_ps(acc + 16, acc1);
  for (int l = 0; l < kSlab; ++l) {
    if (idx[l] >= 0) keys[l] = std::fma(scale[idx[l]], acc[l], bias[idx[l]]);
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

// exact_keys_gathered is shared with the native bf16 kernels: any FMA gives its bits.
Kernels kernels_avx512() {
  return {tile, logits_row, "avx512", tile_squares, nullptr, exact_keys_gathered, pack_slab, group_rows};
}
Kernels kernels_avx512_bf16emu() {
  return {tile, logits_row, "bf16emu", tile_squares, bf16emu_tile, exact_keys_gathered, pack_slab, group_rows};
}

}  // namespace cpu
}  // namespace fastvote

#pragma GCC pop_options
#endif
