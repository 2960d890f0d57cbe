// The fused fm_vote / nearest_centroids kernel: one launch reads each feature
// row tile, normalises it (cosine), streams all centroids past it in tiles,
// keeps each row's top-k in shared memory and votes into a block histogram.
// Nothing of size N x K is stored.
//
// Precision: exact fp32 on the CUDA cores (SIMT). Each (row, centroid) dot
// product is one sequential fmaf chain over d = 0..D-1, the order the CPU
// micro-kernel uses, and key = fmaf(scale, dot, bias) as on the CPU. Keys do
// not depend on tiling or splitting, and ties resolve by (key, index), so the
// result is deterministic and, on inputs without near-ties (or integer-valued
// ones), equal to the CPU backend.
//
// Work item = (tile of kBM rows, range of centroid tiles). A persistent grid
// walks the items; when there are fewer row tiles than resident blocks the
// centroids are split into ranges, each item publishes its partial lists, and
// the last item of a row tile to arrive merges them (no second launch).
#pragma once

#include "device_common.cuh"

namespace fastvote {
namespace cuda {
namespace fm {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 128;  // feature rows per tile
constexpr int kBN = 128;  // centroids per tile
constexpr int kBK = 16;   // feature dimensions per shared-memory stage
constexpr int kTM = 8;    // accumulators per thread: kTM rows x kTN centroids
constexpr int kTN = 8;
constexpr int kHalf = kBN / 2;  // the epilogue ranks 64 centroids at a time
// Row pitches padded by 4 floats: conflict-free transposing stores, and rows
// stay 16-byte aligned for the float4 reads of the inner loop.
constexpr int kPitchA = kBM + 4;
constexpr int kPitchB = kBN + 4;
constexpr int kPitchKeys = kHalf + 4;
constexpr int kStageFloats = 2 * kBK * (kPitchA + kPitchB);  // double-buffered A and B
constexpr int kKeyTileFloats = kBM * kPitchKeys;
// One region serves as the staging buffers, the key tile and the row weights.
constexpr int kScratchFloats = kStageFloats > kKeyTileFloats ? kStageFloats : kKeyTileFloats;
constexpr int kRowsPerWarp = kBM / kWarps;
static_assert(kScratchFloats >= kBM * kMaxListK, "row weights must fit the scratch region");
constexpr int kStageLoads = kBM * kBK / kThreads;  // elements of A (and of B) per thread per stage
static_assert(kBM == kBN && kStageLoads == 8, "the loaders below assume square 128 x 16 stages");
static_assert((kBM / kTM) * (kBN / kTN) == kThreads, "one accumulator block per thread");

// How a thread reads its share of a [128 rows x kBK dims] stage of an
// operand (features: A; centroids: B):
//   Rows:  along D, one element per load (any strides);
//   Cols:  along the rows, one element per load (features with stride(0) == 1);
//   Rows4: along D, 4 elements per vector load (unit stride along D, D % 4 == 0,
//          rows aligned to 4 elements: ld.global.v4 for float32).
// Centroids are read Rows4 when features are, else Rows.
enum class Layout : int { Rows = 0, Cols = 1, Rows4 = 2 };

enum class Mode : int {
  Vote = 0,     // votes into a histogram
  Nearest = 1,  // each row's sorted (value, index) pairs
  Keys = 2,     // every key of the chunk, [n][K] (the large-k path sorts them)
};

template <typename scalar_t>
struct Args {
  const scalar_t* x;  // features [n, dim], any strides
  int64_t xs0, xs1;
  int64_t n;
  int64_t row_offset;  // added to row numbers in error reports (chunked callers)
  int dim;
  const float* c;  // centroids fp32 [num_c, dim], unit stride along dim
  int64_t ldc;
  int num_c;
  const float* bias;   // key = bias[j] + scale[j] * dot(x, c_j), smaller is better
  const float* scale;
  Metric metric;
  Mode mode;
  Weight weight;
  float inv_temperature;
  int k;  // list capacity; 1 in Keys mode
  int splits;
  int tiles_per_split;
  int64_t items;  // row tiles * splits
  int hist_bins;  // > 0: votes go through a shared histogram of num_c bins
  unsigned long long* votes;
  float* values;     // Nearest: [n, k]
  int64_t* indices;  // Nearest: [n, k]
  float* keys_out;   // Keys: [n, num_c]
  float* sq_out;     // Keys: [n] squared row norms
  float* part_keys;  // splits > 1: [items][kBM][k]
  int* part_idx;
  int* arrivals;  // splits > 1: [row tiles], zeroed
  long long* bad_row;
};

// Shared memory: [hist | scratch | list keys | list indices | row sq | row inv | flag].
__host__ __device__ constexpr size_t smem_bytes(int k, int hist_bins) {
  return hist_bytes(hist_bins) + sizeof(float) * kScratchFloats +
         (sizeof(float) + sizeof(int)) * kBM * static_cast<size_t>(k) + 2 * sizeof(float) * kBM + 16;
}

// One thread's loads of a stage. Load q (q < Q) covers tile row m0 + q * kDM,
// dims kk0 + q * kDK + [0, W) of the stage. The base pointer is computed once
// per tile and advanced by kBK dims per stage, so the loop does no 64-bit
// index arithmetic per element: one pointer add per load.
// kUnit: the matrix has unit stride along D (always so for the centroids, and
// for Rows4), which frees two registers.
template <typename T, Layout L, bool kUnit = L == Layout::Rows4>
struct StageLoader {
  static constexpr int W = L == Layout::Rows4 ? 4 : 1;
  static constexpr int Q = kStageLoads / W;
  static constexpr int kDM = L == Layout::Cols ? 0 : kThreads * W / kBK;
  static constexpr int kDK = L == Layout::Cols ? kThreads / kBM : 0;
  // W elements of T in one load: float4 for float32, 8 bytes for 16-bit types.
  using Raw = std::conditional_t<sizeof(T) == 4, float4, uint2>;
  static_assert(W == 1 || sizeof(Raw) == W * sizeof(T), "Rows4 reads 16- and 32-bit types");

  const T* p;     // load 0 of the current stage
  int64_t step;   // from load q to load q + 1
  int64_t along;  // one dim further
  int m0, kk0;
  int rows;       // valid rows of the tile
  int dim;

  // Tile rows [row0, row0 + rows) of a matrix with strides (s0, s1).
  __device__ __forceinline__ StageLoader(const T* base, int64_t s0, int64_t s1, int64_t row0,
                                         int rows_, int dim_) {
    const int tid = threadIdx.x;
    m0 = L == Layout::Cols ? tid % kBM : tid / (kBK / W);
    kk0 = L == Layout::Cols ? tid / kBM : (tid % (kBK / W)) * W;
    rows = rows_;
    dim = dim_;
    along = kUnit ? 1 : s1;
    step = L == Layout::Cols ? kDK * s1 : kDM * s0;
    // Rows past the tile's valid ones are never read; point them at row0.
    p = base + (row0 + (m0 < rows ? m0 : 0)) * s0 + kk0 * along;
  }

  __device__ __forceinline__ bool valid(int q, int d0) const {
    return m0 + q * kDM < rows && d0 + kk0 + q * kDK < dim;
  }

  // Global -> registers: stage d0 (p points at it).
  __device__ __forceinline__ void load(float (&r)[kStageLoads], int d0) const {
    const T* src = p;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      if constexpr (W == 1) {
        r[q] = valid(q, d0) ? to_float(*src) : 0.0f;
      } else {
        // D % 4 == 0: the 4 dims are all inside or all outside the matrix.
        Raw raw;
        memset(&raw, 0, sizeof(raw));
        if (valid(q, d0)) raw = *reinterpret_cast<const Raw*>(src);
        T vals[W];
        memcpy(vals, &raw, sizeof(raw));
#pragma unroll
        for (int i = 0; i < W; ++i) r[q * W + i] = to_float(vals[i]);
      }
      if (q + 1 < Q) src += step;
    }
  }

  __device__ __forceinline__ void next_stage() { p += kUnit ? kBK : kBK * along; }

  // Registers -> shared [kBK][pitch], transposed; row_scale: cosine's 1 / ||x|| (or null).
  __device__ __forceinline__ void store(const float (&r)[kStageLoads], float* dst, int pitch,
                                        const float* row_scale) const {
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const int m = m0 + q * kDM;
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const float v = r[q * W + i];
        dst[(kk0 + q * kDK + i) * pitch + m] = row_scale != nullptr ? __fmul_rn(v, row_scale[m]) : v;
      }
    }
  }
};

template <typename scalar_t, Layout LA>
__global__ void __launch_bounds__(kThreads, 2) fused_kernel(const Args<scalar_t> a) {
  constexpr Layout LB = LA == Layout::Rows4 ? Layout::Rows4 : Layout::Rows;
  extern __shared__ __align__(16) unsigned char smem[];
  float* scratch = reinterpret_cast<float*>(smem + hist_bytes(a.hist_bins));
  float* list_keys = scratch + kScratchFloats;
  int* list_idx = reinterpret_cast<int*>(list_keys + kBM * a.k);
  float* row_sq = reinterpret_cast<float*>(list_idx + kBM * a.k);
  float* row_inv = row_sq + kBM;
  int* last_flag = reinterpret_cast<int*>(row_inv + kBM);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int ty = tid / (kBN / kTN);  // rows ty*4 + [0,4) and 64 + ty*4 + [0,4)
  const int tx = tid % (kBN / kTN);  // centroids tx*4 + [0,4) and 64 + tx*4 + [0,4)
  const int k = a.k;
  const bool cosine = a.metric == Metric::Cosine;
  const VoteSink sink = make_sink(smem, a.hist_bins, a.votes);

  hist_clear(sink, a.hist_bins);

  for (int64_t item = blockIdx.x; item < a.items; item += gridDim.x) {
    const int64_t tile = item / a.splits;
    const int64_t row0 = tile * kBM;
    const int64_t span = static_cast<int64_t>(a.tiles_per_split) * kBN;
    const int c_begin = static_cast<int>((item % a.splits) * span);
    const int c_end = static_cast<int>(min(static_cast<int64_t>(a.num_c), c_begin + span));

    // Prologue: row norms (NaN/Inf check; cosine scale) and empty lists.
    if (tid < kBM) {
      const int64_t row = row0 + tid;
      float sq = 0.0f;
      if (row < a.n) {
        sq = row_sqnorm_lanes(a.x + row * a.xs0, a.xs1, a.dim);
        if (!is_finite(sq)) atomicMin(a.bad_row, static_cast<long long>(a.row_offset + row));
        if (a.sq_out != nullptr) a.sq_out[row] = sq;
      }
      row_sq[tid] = sq;
      row_inv[tid] = cosine && is_finite(sq) ? inverse_norm(sq) : 1.0f;
    }
    for (int e = tid; e < kBM * k; e += kThreads) {
      list_keys[e] = INFINITY;
      list_idx[e] = kSentinelIndex;
    }
    __syncthreads();

    for (int j0 = c_begin; j0 < c_end; j0 += kBN) {
      const int tile_rows = static_cast<int>(min(static_cast<int64_t>(kBM), a.n - row0));
      StageLoader<scalar_t, LA> la(a.x, a.xs0, a.xs1, row0, tile_rows, a.dim);
      StageLoader<float, LB, true> lb(a.c, a.ldc, 1, j0, min(kBN, c_end - j0), a.dim);
      const float* a_scale = cosine ? row_inv : nullptr;
      float* const as_base = scratch;
      float* const bs_base = scratch + 2 * kBK * kPitchA;
      float ra[kStageLoads], rb[kStageLoads];

      float acc[kTM][kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] = 0.0f;

      la.load(ra, 0);
      lb.load(rb, 0);
      la.store(ra, as_base, kPitchA, a_scale);
      lb.store(rb, bs_base, kPitchB, nullptr);
      __syncthreads();
      int buf = 0;
      for (int d0 = 0; d0 < a.dim; d0 += kBK) {
        const bool more = d0 + kBK < a.dim;
        if (more) {  // in flight during the products below
          la.next_stage();
          lb.next_stage();
          la.load(ra, d0 + kBK);
          lb.load(rb, d0 + kBK);
        }
        // This thread's rows ty*4 + [0,4), 64 + ty*4 + [0,4) and centroids alike.
        const float* as = as_base + buf * kBK * kPitchA + ty * 4;
        const float* bs = bs_base + buf * kBK * kPitchB + tx * 4;
#pragma unroll
        for (int kk = 0; kk < kBK; ++kk) {
          const float4 a0 = *reinterpret_cast<const float4*>(as + kk * kPitchA);
          const float4 a1 = *reinterpret_cast<const float4*>(as + kk * kPitchA + kBM / 2);
          const float4 b0 = *reinterpret_cast<const float4*>(bs + kk * kPitchB);
          const float4 b1 = *reinterpret_cast<const float4*>(bs + kk * kPitchB + kBN / 2);
          const float av[kTM] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
          const float bv[kTN] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
          for (int i = 0; i < kTM; ++i)
#pragma unroll
            for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        if (more) {
          la.store(ra, as_base + (buf ^ 1) * kBK * kPitchA, kPitchA, a_scale);
          lb.store(rb, bs_base + (buf ^ 1) * kBK * kPitchB, kPitchB, nullptr);
        }
        __syncthreads();
        buf ^= 1;
      }

      // Epilogue, one half of the centroid tile at a time: keys, then ranking.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float kscale[4], kbias[4];
        int cols[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          cols[j] = j0 + h * kHalf + tx * 4 + j;
          kscale[j] = cols[j] < c_end ? a.scale[cols[j]] : 0.0f;
          kbias[j] = cols[j] < c_end ? a.bias[cols[j]] : INFINITY;
        }
        if (a.mode == Mode::Keys) {
#pragma unroll
          for (int i = 0; i < kTM; ++i) {
            const int64_t row = row0 + (i < 4 ? 0 : kBM / 2) + ty * 4 + (i & 3);
            if (row >= a.n) continue;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              if (cols[j] < c_end) {
                a.keys_out[row * a.num_c + cols[j]] = fmaf(kscale[j], acc[i][h * 4 + j], kbias[j]);
              }
            }
          }
          continue;  // no shared memory touched: the D loop's last barrier suffices
        }
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          const int m = (i < 4 ? 0 : kBM / 2) + ty * 4 + (i & 3);
          float4 keys;
          keys.x = fmaf(kscale[0], acc[i][h * 4 + 0], kbias[0]);
          keys.y = fmaf(kscale[1], acc[i][h * 4 + 1], kbias[1]);
          keys.z = fmaf(kscale[2], acc[i][h * 4 + 2], kbias[2]);
          keys.w = fmaf(kscale[3], acc[i][h * 4 + 3], kbias[3]);
          *reinterpret_cast<float4*>(scratch + m * kPitchKeys + tx * 4) = keys;
        }
        __syncthreads();
        // Warp w ranks rows [w * 16, w * 16 + 16); lane l holds centroids l and l + 32.
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const int m = warp * kRowsPerWarp + r;
          if (row0 + m >= a.n) break;
          const float* kt = scratch + m * kPitchKeys;
          const int c0 = j0 + h * kHalf + lane;
          const float cand_key[2] = {kt[lane], kt[lane + 32]};
          const int cand_idx[2] = {c0, c0 + 32};
          const bool valid[2] = {c0 < c_end, c0 + 32 < c_end};
          if (j0 == c_begin && h == 0) {  // the row's list is still empty
            list_fill<2>(list_keys + m * k, list_idx + m * k, k, cand_key, cand_idx, valid);
          } else {
            list_offer<2>(list_keys + m * k, list_idx + m * k, k, cand_key, cand_idx, valid);
          }
        }
        __syncthreads();
      }
    }
    if (a.mode == Mode::Keys) continue;

    if (a.splits > 1) {
      // Publish this range's lists; the last range of the row tile to arrive merges.
      const int64_t base = item * kBM * k;
      for (int e = tid; e < kBM * k; e += kThreads) {
        a.part_keys[base + e] = list_keys[e];
        a.part_idx[base + e] = list_idx[e];
      }
      __threadfence();
      __syncthreads();
      if (tid == 0) *last_flag = atomicAdd(a.arrivals + tile, 1) == a.splits - 1;
      __syncthreads();
      if (*last_flag == 0) continue;
      __threadfence();
      for (int e = tid; e < kBM * k; e += kThreads) {
        list_keys[e] = INFINITY;
        list_idx[e] = kSentinelIndex;
      }
      __syncthreads();
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int m = warp * kRowsPerWarp + r;
        if (row0 + m >= a.n) break;
        for (int s = 0; s < a.splits; ++s) {
          // L2 reads: other blocks wrote these.
          const int64_t src = ((tile * a.splits + s) * kBM + m) * k;
          float cand_key[2];
          int cand_idx[2];
          bool valid[2];
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int p = lane + 32 * u;
            cand_key[u] = p < k ? __ldcg(a.part_keys + src + p) : INFINITY;
            cand_idx[u] = p < k ? __ldcg(a.part_idx + src + p) : kSentinelIndex;
            valid[u] = p < k && cand_idx[u] < a.num_c;
          }
          if (s == 0) {
            list_fill<2>(list_keys + m * k, list_idx + m * k, k, cand_key, cand_idx, valid);
          } else {
            list_offer<2>(list_keys + m * k, list_idx + m * k, k, cand_key, cand_idx, valid);
          }
        }
      }
      __syncthreads();
    }

    if (a.mode == Mode::Vote) {
      float* weights = scratch;  // [kBM][k]; the key tile is free now
      if (a.weight != Weight::Count) {
        if (tid < kBM && row0 + tid < a.n && is_finite(row_sq[tid])) {
          row_weights(list_keys + tid * k, k, a.weight, a.inv_temperature, weights + tid * k);
        }
        __syncthreads();
      }
      for (int e = tid; e < kBM * k; e += kThreads) {
        const int m = e / k;
        // Rows with NaN/Inf raise after the launch; never vote with them.
        if (row0 + m >= a.n || !is_finite(row_sq[m])) continue;
        const int j = list_idx[e];
        if (j >= a.num_c) continue;  // a sentinel, only possible with non-finite centroids
        sink.add(j, a.weight == Weight::Count ? 1ull : fixed_units(weights[e]));
      }
    } else {
      for (int e = tid; e < kBM * k; e += kThreads) {
        const int m = e / k;
        const int64_t row = row0 + m;
        if (row >= a.n) continue;
        const float key = list_keys[e];
        // Keys omit ||x||^2 (l2) or are negated similarities (cosine).
        a.values[row * k + e % k] = cosine ? -key : fmaxf(__fadd_rn(key, row_sq[m]), 0.0f);
        a.indices[row * k + e % k] = list_idx[e];
      }
    }
    __syncthreads();
  }
  hist_flush(sink, a.hist_bins);
}

}  // namespace fm
}  // namespace cuda
}  // namespace fastvote
