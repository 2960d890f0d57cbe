// Device helpers shared by the CUDA kernels: input conversion, row norms,
// vote histograms (shared or global memory), and the warp-cooperative per-row
// top-k list that applies the tie rule of fastvote/topk.h.
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastvote/topk.h"

namespace fastvote {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kNormEps = 1e-12f;  // as torch.nn.functional.normalize and the CPU backend
// Fused kernels keep each row's list in shared memory, two slots per lane.
constexpr int kMaxListK = 64;
// Empty list slots: every real candidate (index < K < INT_MAX) ranks before it.
constexpr int kSentinelIndex = INT_MAX;
// Vote histograms of up to this many bins (48 KB) may live in shared memory,
// when that costs no resident blocks (the launcher checks the occupancy);
// otherwise votes take one global atomic each (spread over many bins, so
// there is little contention).
constexpr int kSharedHistBins = 6144;
// Float vote weights are accumulated as the 32.32 fixed point of
// fastvote/topk.h (fixed_units), as on the CPU: "rank" and "soft" votes are
// as deterministic as "count" votes, and equal to the CPU's.

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

// False for NaN and +-Inf; no overload ambiguity between std and CUDA math.
__device__ __forceinline__ bool is_finite(float v) { return fabsf(v) <= FLT_MAX; }
__device__ __forceinline__ bool is_finite(double v) { return fabs(v) <= DBL_MAX; }

// Sum of squares of one row, in order and without FMA contraction: the same
// float arithmetic as the CPU's fm_scores, so its cosine scale is bit-equal.
template <typename T>
__device__ float row_sqnorm(const T* row, int64_t stride, int dim) {
  float sq = 0.0f;
  for (int d = 0; d < dim; ++d) {
    const float v = to_float(row[d * stride]);
    sq = __fadd_rn(sq, __fmul_rn(v, v));
  }
  return sq;
}

// The squared norm in the order of the CPU's tile kernel (pack_rows):
// dimension d adds into partial d % kNormLanes, in d order, without FMA;
// then the partials pairwise (l += l + 8, + 4, + 2, + 1). The fused kernel's
// keys, cosine scale and distances are then bit-equal to the CPU's.
constexpr int kNormLanes = 16;

template <typename T>
__device__ float row_sqnorm_lanes(const T* row, int64_t stride, int dim) {
  float part[kNormLanes];
#pragma unroll
  for (int l = 0; l < kNormLanes; ++l) part[l] = 0.0f;
  for (int d0 = 0; d0 < dim; d0 += kNormLanes) {
#pragma unroll
    for (int l = 0; l < kNormLanes; ++l) {
      if (d0 + l < dim) {
        const float v = to_float(row[static_cast<int64_t>(d0 + l) * stride]);
        part[l] = __fadd_rn(part[l], __fmul_rn(v, v));
      }
    }
  }
#pragma unroll
  for (int width = kNormLanes / 2; width > 0; width /= 2) {
#pragma unroll
    for (int l = 0; l < width; ++l) part[l] = __fadd_rn(part[l], part[l + width]);
  }
  return part[0];
}

__device__ __forceinline__ float inverse_norm(float sq) {
  return __fdiv_rn(1.0f, fmaxf(__fsqrt_rn(sq), kNormEps));
}

// A vote histogram: in shared memory when the launch gave the kernel one,
// else straight into the global uint64 bins. A shared bin is two 32-bit
// words, low and high, updated with 32-bit atomics only (64-bit shared
// atomics are CAS loops on sm_90): the low word's atomicAdd returns the old
// value, so each wrap-around is seen exactly once and carried into the high
// word. hi * 2^32 + lo is then the exact integer sum of the bin's units.
// Counts add 1, so the high word is touched once per 2^32 votes; a float
// vote's units are < 2^32 unless its weight is 1.0.
struct VoteSink {
  unsigned* lo;  // shared [bins]; nullptr: no shared histogram
  unsigned* hi;  // shared [bins]
  unsigned long long* global;
  __device__ __forceinline__ void add(int bin, unsigned long long units) const {
    if (lo == nullptr) {
      atomicAdd(global + bin, units);
      return;
    }
    const unsigned low = static_cast<unsigned>(units);
    unsigned high = static_cast<unsigned>(units >> 32);
    if (low != 0) {
      const unsigned old = atomicAdd(lo + bin, low);
      high += old > 0xffffffffu - low;  // the carry out of the low word
    }
    if (high != 0) atomicAdd(hi + bin, high);
  }
};

// Bytes of dynamic shared memory for a histogram (two words a bin), rounded
// to keep what follows it 16-byte aligned.
__host__ __device__ constexpr size_t hist_bytes(int bins) {
  return (static_cast<size_t>(bins) * 2 * sizeof(unsigned) + 15) / 16 * 16;
}

// The sink of a kernel whose dynamic shared memory starts with a histogram
// of `bins` bins (0: none).
__device__ __forceinline__ VoteSink make_sink(unsigned char* smem, int bins,
                                              unsigned long long* global) {
  unsigned* words = reinterpret_cast<unsigned*>(smem);
  return bins > 0 ? VoteSink{words, words + bins, global} : VoteSink{nullptr, nullptr, global};
}

// Block-wide: zero the shared histogram (callers sync before first use).
__device__ __forceinline__ void hist_clear(const VoteSink& sink, int bins) {
  if (sink.lo == nullptr) return;
  for (int i = threadIdx.x; i < bins; i += blockDim.x) sink.lo[i] = sink.hi[i] = 0;
}

// Block-wide: one global atomic per touched bin.
__device__ __forceinline__ void hist_flush(const VoteSink& sink, int bins) {
  if (sink.lo == nullptr) return;
  __syncthreads();
  for (int i = threadIdx.x; i < bins; i += blockDim.x) {
    const unsigned long long v =
        (static_cast<unsigned long long>(sink.hi[i]) << 32) + sink.lo[i];
    if (v != 0) atomicAdd(sink.global + i, v);
  }
}

// ---------------------------------------------------------------------------
// Warp-cooperative top-k list of capacity k <= kMaxListK in shared memory,
// sorted best first by (key, index) (fastvote::ranks_before); lane l owns
// slots l and l + 32. Because the order is total (indices are unique), the
// final list is the exact top-k whatever order candidates are offered in:
// splits of the centroids, tiles and lanes cannot change the result.
// ---------------------------------------------------------------------------

__device__ __forceinline__ void list_reset(float* keys, int* idx, int k) {
  for (int p = threadIdx.x & 31; p < k; p += 32) {
    keys[p] = INFINITY;
    idx[p] = kSentinelIndex;
  }
}

// Inserts a candidate that ranks before the current k-th entry. Warp-collective.
__device__ __forceinline__ void list_insert(float* keys, int* idx, int k, float key, int index) {
  const int lane = threadIdx.x & 31;
  const int p0 = lane;
  const int p1 = lane + 32;
  const bool in0 = p0 < k;
  const bool in1 = p1 < k;
  // The list is sorted, so the entries ranking before the candidate are a prefix.
  const bool before0 = in0 && ranks_before(keys[p0], idx[p0], key, index);
  const bool before1 = in1 && ranks_before(keys[p1], idx[p1], key, index);
  const int pos = __popc(__ballot_sync(kFullMask, before0)) + __popc(__ballot_sync(kFullMask, before1));
  // Slot p > pos takes old slot p - 1; slot pos takes the candidate.
  float key0 = 0.0f, key1 = 0.0f;
  int idx0 = 0, idx1 = 0;
  const bool moves0 = in0 && p0 >= pos;
  const bool moves1 = in1 && p1 >= pos;
  if (moves0) {
    key0 = p0 == pos ? key : keys[p0 - 1];
    idx0 = p0 == pos ? index : idx[p0 - 1];
  }
  if (moves1) {
    key1 = p1 == pos ? key : keys[p1 - 1];
    idx1 = p1 == pos ? index : idx[p1 - 1];
  }
  __syncwarp();
  if (moves0) {
    keys[p0] = key0;
    idx[p0] = idx0;
  }
  if (moves1) {
    keys[p1] = key1;
    idx[p1] = idx1;
  }
  __syncwarp();
}

// Offers each lane's V candidates (valid[v] false: no candidate) to the list.
// Warp-collective; the list must be visible to the whole warp on entry.
template <int V>
__device__ __forceinline__ void list_offer(float* keys, int* idx, int k, const float (&cand_key)[V],
                                           const int (&cand_idx)[V], const bool (&valid)[V]) {
  float kth_key = keys[k - 1];
  int kth_idx = idx[k - 1];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    unsigned pending = __ballot_sync(
        kFullMask, valid[v] && ranks_before(cand_key[v], cand_idx[v], kth_key, kth_idx));
    while (pending != 0) {
      const int src = __ffs(pending) - 1;
      pending &= pending - 1;
      const float key = __shfl_sync(kFullMask, cand_key[v], src);
      const int index = __shfl_sync(kFullMask, cand_idx[v], src);
      // Earlier insertions may have raised the bar since the ballot.
      if (ranks_before(key, index, kth_key, kth_idx)) {
        list_insert(keys, idx, k, key, index);
        kth_key = keys[k - 1];
        kth_idx = idx[k - 1];
      }
    }
  }
}

// The best (key, index) over the warp, in every lane.
__device__ __forceinline__ void warp_argmin(float& key, int& index) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other_key = __shfl_xor_sync(kFullMask, key, offset);
    const int other_idx = __shfl_xor_sync(kFullMask, index, offset);
    if (ranks_before(other_key, other_idx, key, index)) {
      key = other_key;
      index = other_idx;
    }
  }
}

// Fills an EMPTY list with the best min(k, #valid) of the lanes' candidates,
// best first, by repeated warp argmin: k extractions instead of up to 32 * V
// offers, most of which a fresh list would accept and then push out again.
// Warp-collective; the list must be visible to the whole warp on entry.
template <int V>
__device__ __forceinline__ void list_fill(float* keys, int* idx, int k, const float (&cand_key)[V],
                                          const int (&cand_idx)[V], const bool (&valid)[V]) {
  bool left[V];
#pragma unroll
  for (int v = 0; v < V; ++v) left[v] = valid[v];
  for (int r = 0; r < k; ++r) {
    float best_key = INFINITY;
    int best_idx = kSentinelIndex;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (left[v] && ranks_before(cand_key[v], cand_idx[v], best_key, best_idx)) {
        best_key = cand_key[v];
        best_idx = cand_idx[v];
      }
    }
    warp_argmin(best_key, best_idx);
    if (best_idx == kSentinelIndex) break;  // no candidates left (the same in every lane)
#pragma unroll
    for (int v = 0; v < V; ++v) left[v] &= cand_idx[v] != best_idx;
    if ((threadIdx.x & 31) == 0) {
      keys[r] = best_key;
      idx[r] = best_idx;
    }
  }
  __syncwarp();
}

}  // namespace cuda
}  // namespace fastvote
