// The certified bf16 pass on CPUs with AMX-BF16 (Sapphire Rapids and later):
// TDPBF16PS on 16 x 16 tiles, 8,192 multiply-adds per instruction. On those
// CPUs VDPBF16PS runs at half the fp32 FMA's rate (measured in RESULTS.md),
// so AMX is the only bf16 unit that pays there. Everything else (the fp32
// tile for uncertified rows, exact keys, logits, squares) is the AVX-512
// kernel's. Only this file is compiled for AMX; it runs only where the CPU
// reports AMX-BF16 and Linux grants the process the tile state.
//
// Intel does not specify the order or rounding of TDPBF16PS's accumulation
// (this CPU's results match no sequential model: RESULTS.md), so there is no
// bit-exact emulation of it; its error is bounded by certify::
// tensor_core_error's order-free model instead, 32 products a step, and the
// C++ tests check the instruction against that bound, exactly, where it runs.
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "fastvote/topk.h"
#include "tile_kernel.h"

#pragma GCC push_options
#pragma GCC target("avx512f,fma,amx-tile,amx-bf16")

#include "tile_kernel_avx512.h"
#include "tile_kernel_impl.h"

namespace fastvote {
namespace cpu {
namespace {

constexpr int kBlock = 16;  // a tile: 16 rows of 64 bytes (16 fp32, or 16 bf16 pairs)

// The tile registers' shapes (palette 1): 0-3 accumulate 2 x 2 blocks of
// 16 centroids x 16 rows; 4-5 hold two blocks of centroids, 6-7 two of rows.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      bytes_per_row[t] = 64;
      rows[t] = kBlock;
    }
  }
};

// The pass works through the centroids in chunks of kChunk: a chunk's bf16
// pairs (256 KB at D = 512) stay in L2 while every slab of the job meets
// them. A slab's keys for the whole chunk go to a buffer first, then each row
// keeps its best (merge_chunk): an epilogue that inserted key by key,
// interleaved with the TDPBF16PS chains, took ~4x the products' time
// (K = 1,000, k = 5; RESULTS.md).
constexpr int kChunk = 512;
constexpr int64_t kPairChunk = 128;  // pairs a TDPBF16PS chain runs before its keys go to the buffer
constexpr int kGroups = 64;          // group minima per row and chunk (chunk_bound)
constexpr int kNetwork = kGroups;    // lists up to this long get chunk_bound; longer ones take every key

// A slab's keys for one chunk: [centroid][lane], as the tiles store them.
struct alignas(64) ChunkKeys {
  float v[kChunk][kSlab];
};

// A key that may enter a row's list, and the lists' merge buffer.
struct Entry {
  float key;
  int64_t index;
};

// Each lane's keys of one half-slab that may enter its row's list, in increasing centroid order.
struct Candidates {
  Entry entries[kBlock][kChunk];
  int count[kBlock];
  std::vector<Entry> merged;  // job.k long
};

// An upper bound, per lane, on the kl-th best key of a chunk (kl <= N):
// the kl-th smallest of its groups' minima, since kl groups each hold a key
// at most that. In a microbenchmark (Gaussian keys, 1,024 a row in 64 groups
// of 16, kl = 14) ~15.5 keys a row passed it; a list that learns its
// threshold key by key inserts ~74.
template <int N>
__m512 chunk_bound(const Bf16TileJob& job, const float* keys, int64_t c0, int n, int kl) {
  const int per_group = (n + kGroups - 1) / kGroups;
  __m512 best[N];
  for (int i = 0; i < N; ++i) best[i] = _mm512_set1_ps(INFINITY);
  for (int g = 0; g < n; g += per_group) {
    __m512 low = _mm512_set1_ps(INFINITY);
    for (int j = g; j < std::min(n, g + per_group); ++j) {
      const __m512 key = _mm512_fmadd_ps(_mm512_set1_ps(job.scale[c0 + j]), _mm512_load_ps(keys + j * kSlab),
                                         _mm512_set1_ps(job.bias[c0 + j]));
      low = _mm512_min_ps(low, key);
    }
    // A sorting network's insertion: best[] stays sorted per lane (NaN keys spoil only their own
    // lane, whose row falls back anyway).
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) {
      const __m512 smaller = _mm512_min_ps(best[i], low);
      low = _mm512_max_ps(best[i], low);
      best[i] = smaller;
    }
  }
  alignas(64) float lanes[N][kBlock];
  for (int i = 0; i < N; ++i) _mm512_store_ps(lanes[i], best[i]);
  return _mm512_load_ps(lanes[kl - 1]);
}

// chunk_bound with the shortest network that holds kl (a network's cost is its length).
__m512 chunk_bound(const Bf16TileJob& job, const float* keys, int64_t c0, int n, int kl) {
  if (kl <= 2) return chunk_bound<2>(job, keys, c0, n, kl);
  if (kl <= 4) return chunk_bound<4>(job, keys, c0, n, kl);
  if (kl <= 8) return chunk_bound<8>(job, keys, c0, n, kl);
  if (kl <= 16) return chunk_bound<16>(job, keys, c0, n, kl);
  if (kl <= 32) return chunk_bound<32>(job, keys, c0, n, kl);
  return chunk_bound<kNetwork>(job, keys, c0, n, kl);
}

// Merges one half-slab's keys of a chunk (centroids c0 .. c0 + n - 1) into its rows' lists: every
// key at most the row's bound goes in, and the list keeps its kl best, ties to the lower index
// (topk.h), as a key-by-key insertion in centroid order would. A row with a NaN key is marked in
// `spoiled` (its list is not to be trusted).
void merge_chunk(const Bf16TileJob& job, const float* keys, int64_t c0, int n, int64_t row0, Candidates& cand,
                 uint8_t* spoiled) {
  const int kl = job.k;
  const int lanes = static_cast<int>(std::min<int64_t>(kBlock, job.rows - row0));
  if (lanes <= 0) return;
  const __mmask16 valid = static_cast<__mmask16>((1u << lanes) - 1);
  const __m512 threshold = _mm512_loadu_ps(job.thresholds + row0);
  const __mmask16 open = _mm512_cmp_ps_mask(threshold, threshold, _CMP_UNORD_Q) & valid;  // lists not full
  __m512 bound = _mm512_mask_mov_ps(threshold, open, _mm512_set1_ps(INFINITY));
  if (open && kl <= kNetwork && n >= kl) bound = _mm512_min_ps(bound, chunk_bound(job, keys, c0, n, kl));

  std::fill(cand.count, cand.count + kBlock, 0);
  __mmask16 nan = 0;
  alignas(64) float lane_keys[kBlock];
  for (int j = 0; j < n; ++j) {
    const __m512 key = _mm512_fmadd_ps(_mm512_set1_ps(job.scale[c0 + j]), _mm512_load_ps(keys + j * kSlab),
                                       _mm512_set1_ps(job.bias[c0 + j]));
    nan |= _mm512_cmp_ps_mask(key, key, _CMP_UNORD_Q);
    unsigned in = _mm512_mask_cmp_ps_mask(valid, key, bound, _CMP_LE_OQ);
    if (!in) continue;
    _mm512_store_ps(lane_keys, key);
    for (; in; in &= in - 1) {
      const int lane = __builtin_ctz(in);
      cand.entries[lane][cand.count[lane]++] = {lane_keys[lane], c0 + j};
    }
  }

  const auto before = [](const Entry& x, const Entry& y) { return ranks_before(x.key, x.index, y.key, y.index); };
  for (int lane = 0; lane < lanes; ++lane) {
    const int64_t row = row0 + lane;
    if ((nan >> lane) & 1) spoiled[row] = 1;
    const int added = cand.count[lane];
    if (added == 0) continue;
    Entry* fresh = cand.entries[lane];
    // Only the kl best can enter (a list longer than the network takes every key of its first chunk).
    const int useful = std::min(added, kl);
    if (useful < added) std::nth_element(fresh, fresh + useful, fresh + added, before);
    std::sort(fresh, fresh + useful, before);
    // Merge with the list (whose indices are all below the chunk's): the best kl of both.
    float* list = job.keys + row * kl;
    int64_t* list_idx = job.indices + row * kl;
    const int count = job.counts[row], total = std::min(kl, count + useful);
    for (int out = 0, a = 0, b = 0; out < total; ++out) {
      if (b == useful || (a < count && !ranks_before(fresh[b].key, fresh[b].index, list[a], list_idx[a]))) {
        cand.merged[out] = {list[a], list_idx[a]};
        ++a;
      } else {
        cand.merged[out] = fresh[b++];
      }
    }
    for (int i = 0; i < total; ++i) list[i] = cand.merged[i].key, list_idx[i] = cand.merged[i].index;
    job.counts[row] = total;
    job.thresholds[row] = reject_threshold(list, total, kl);
  }
}

// One job: for each chunk, each slab's TDPBF16PS chains (32 centroids x 32 rows a step: A the
// centroid rows, 16 pairs a tile row; B the slab's [pair][lane] layout, TDPBF16PS's
// pair-interleaved operand as it lies) into the slab's buffer, then its rows' lists.
void amx_tile(const Bf16TileJob& job) {
  const Mxcsr flush(Mxcsr::kFlushDenormals);  // the keys' fma, as run_bf16_tile's
  const TileConfig config;
  _tile_loadconfig(&config);
  const int64_t pairs = job.dim;  // a multiple of 16 (Kernels::candidate_pair_block)
  const int64_t num_slabs = (job.rows + kSlab - 1) / kSlab;
  const int64_t a_stride = job.ldc * sizeof(uint32_t), b_stride = kSlab * sizeof(uint32_t);
  const int64_t c_stride = kSlab * sizeof(float);
  // A thread's buffers (192 KB) are made once: zeroed and page-faulted a job (1,024 rows) at a time, they
  // cost as much as the pass at K = 300.
  thread_local const std::unique_ptr<ChunkKeys> keys(new ChunkKeys);
  thread_local const std::unique_ptr<Candidates> cand(new Candidates);
  cand->merged.resize(job.k);
  std::vector<uint8_t> spoiled(job.rows, 0);

  for (int64_t c0 = 0; c0 < job.num_centroids; c0 += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, job.num_centroids - c0));
    for (int64_t s = 0; s < num_slabs; ++s) {
      const uint32_t* b = job.packed + s * pairs * kSlab;
      // Half the pairs at a time, the partial keys kept in the buffer: the slab's half (16 KB)
      // then stays in L1 while the chunk's centroids stream past it (3% faster than whole rows).
      for (int64_t p0 = 0; p0 < pairs; p0 += kPairChunk) {
        const int64_t p1 = std::min(pairs, p0 + kPairChunk);
        for (int j = 0; j < n; j += 2 * kBlock) {
          // Centroid rows up to a multiple of 32 are there, zero (candidate_centroid_block).
          const uint32_t* a0 = job.centroids + (c0 + j) * job.ldc;
          const uint32_t* a1 = a0 + kBlock * job.ldc;
          float* out[4] = {keys->v[j], keys->v[j] + kBlock, keys->v[j + kBlock], keys->v[j + kBlock] + kBlock};
          if (p0 == 0) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else {
            _tile_loadd(0, out[0], c_stride);
            _tile_loadd(1, out[1], c_stride);
            _tile_loadd(2, out[2], c_stride);
            _tile_loadd(3, out[3], c_stride);
          }
          for (int64_t p = p0; p < p1; p += kBlock) {
            _tile_loadd(4, a0 + p, a_stride);
            _tile_loadd(5, a1 + p, a_stride);
            _tile_loadd(6, b + p * kSlab, b_stride);
            _tile_loadd(7, b + p * kSlab + kBlock, b_stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
          _tile_stored(0, out[0], c_stride);
          _tile_stored(1, out[1], c_stride);
          _tile_stored(2, out[2], c_stride);
          _tile_stored(3, out[3], c_stride);
        }
      }
      for (int half = 0; half < 2; ++half) {
        merge_chunk(job, keys->v[0] + half * kBlock, c0, n, s * kSlab + half * kBlock, *cand, spoiled.data());
      }
    }
  }
  _tile_release();
  for (int64_t r = 0; r < job.rows; ++r) {
    if (spoiled[r]) job.counts[r] = 0;  // a NaN key (sums past float's range): the fp32 kernel's row
  }
}

// AMX-BF16 in CPUID (leaf 7: EDX bit 22, AMX-TILE bit 24), and Linux's
// permission for this process to use the tile data (off until asked for).
bool amx_usable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;
#if defined(SYS_arch_prctl)
  constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

}  // namespace

bool cpu_has_amx_bf16() {
  static const bool usable = amx_usable();
  return usable;
}

Kernels kernels_amxbf16() {
  Kernels k = kernels_avx512();
  k.name = "amxbf16";
  k.candidates = amx_tile;
  k.candidate_shape = {kBlock, 2 * kBlock, 2 * kBlock, /*pays_from=*/500};
  return k;
}

}  // namespace cpu
}  // namespace fastvote

#pragma GCC pop_options
#endif
