// lm_vote in one pass over the logits: a warp per row (persistent grid), the
// row's top-k by key = -logit, votes into a block histogram. k == 1 keeps a
// running best per lane and reduces it once per row; larger k uses the warp
// list of device_common.cuh. Memory-bound: when rows are contiguous and
// 16-byte aligned each lane reads 16 bytes per load.
#pragma once

#include "device_common.cuh"

namespace fastvote {
namespace cuda {
namespace lm {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t>
struct Args {
  const scalar_t* x;  // logits [n, num_c], any strides (unit column stride when V > 1)
  int64_t s0, s1;
  int64_t n;
  int num_c;
  int k;
  Weight weight;
  int hist_bins;  // > 0: votes go through a shared histogram of num_c bins
  unsigned long long* votes;
  long long* bad_row;
};

// Shared memory: [hist | per-warp list keys, list indices, weights].
__host__ __device__ constexpr size_t smem_bytes(int k, int hist_bins) {
  return hist_bytes(hist_bins) + static_cast<size_t>(kWarps) * k * (2 * sizeof(float) + sizeof(int));
}

// One chunk of 32 * V logits of a row: lane l gets V of them as keys (-logit).
// V > 1: the lane's V consecutive elements in one 16-byte load (full chunks).
template <typename scalar_t, int V>
__device__ __forceinline__ void load_chunk(const scalar_t* row, int64_t stride, int64_t c0, int num_c,
                                           float (&key)[V], int (&index)[V], bool (&valid)[V],
                                           bool& finite) {
  const int lane = threadIdx.x & 31;
  if constexpr (V > 1) {
    if (c0 + 32 * V <= num_c) {
      const float4 raw = __ldg(reinterpret_cast<const float4*>(row + c0 + lane * V));
      scalar_t vals[V];
      static_assert(sizeof(vals) == sizeof(raw), "V elements must fill 16 bytes");
      memcpy(vals, &raw, sizeof(raw));
#pragma unroll
      for (int u = 0; u < V; ++u) {
        const float v = to_float(vals[u]);
        finite &= is_finite(v);
        key[u] = -v;
        index[u] = static_cast<int>(c0) + lane * V + u;
        valid[u] = true;
      }
      return;
    }
  }
#pragma unroll
  for (int u = 0; u < V; ++u) {
    const int64_t j = V > 1 ? c0 + lane * V + u : c0 + lane;
    valid[u] = j < num_c;
    const float v = valid[u] ? to_float(row[j * stride]) : 0.0f;
    finite &= is_finite(v);
    key[u] = -v;
    index[u] = static_cast<int>(j);
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) vote_kernel(const Args<scalar_t> a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int k = a.k;
  float* lists = reinterpret_cast<float*>(smem + hist_bytes(a.hist_bins));
  float* list_keys = lists + warp * k;
  int* list_idx = reinterpret_cast<int*>(lists + kWarps * k) + warp * k;
  float* weights = lists + 2 * kWarps * k + warp * k;
  const VoteSink sink = make_sink(smem, a.hist_bins, a.votes);

  hist_clear(sink, a.hist_bins);
  __syncthreads();

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < a.n;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const scalar_t* p = a.x + row * a.s0;
    bool finite = true;
    if (k == 1) {
      float best_key = INFINITY;
      int best_idx = kSentinelIndex;
#pragma unroll 4  // several loads in flight per warp: this path is bandwidth-bound
      for (int64_t c0 = 0; c0 < a.num_c; c0 += 32 * V) {
        float key[V];
        int index[V];
        bool valid[V];
        load_chunk<scalar_t, V>(p, a.s1, c0, a.num_c, key, index, valid, finite);
#pragma unroll
        for (int u = 0; u < V; ++u) {
          if (valid[u] && ranks_before(key[u], index[u], best_key, best_idx)) {
            best_key = key[u];
            best_idx = index[u];
          }
        }
      }
      warp_argmin(best_key, best_idx);
      if (lane == 0) {
        list_keys[0] = best_key;
        list_idx[0] = best_idx;
      }
    } else {
      list_reset(list_keys, list_idx, k);
      __syncwarp();
      for (int64_t c0 = 0; c0 < a.num_c; c0 += 32 * V) {
        float key[V];
        int index[V];
        bool valid[V];
        load_chunk<scalar_t, V>(p, a.s1, c0, a.num_c, key, index, valid, finite);
        if (c0 == 0) {
          list_fill<V>(list_keys, list_idx, k, key, index, valid);
        } else {
          list_offer<V>(list_keys, list_idx, k, key, index, valid);
        }
      }
    }
    if (!__all_sync(kFullMask, finite)) {
      // The op raises after the launch; this row casts no votes.
      if (lane == 0) atomicMin(a.bad_row, static_cast<long long>(row));
      __syncwarp();
      continue;
    }
    __syncwarp();
    if (a.weight != Weight::Count) {
      if (lane == 0) row_weights(list_keys, k, a.weight, 1.0f, weights);
      __syncwarp();
    }
    for (int r = lane; r < k; r += 32) {
      const int j = list_idx[r];
      sink.add(j, a.weight == Weight::Count ? 1ull : fixed_units(weights[r]));
    }
    __syncwarp();
  }
  hist_flush(sink, a.hist_bins);
}

}  // namespace lm
}  // namespace cuda
}  // namespace fastvote
