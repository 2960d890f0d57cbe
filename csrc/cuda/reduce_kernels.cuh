// The smaller CUDA kernels: centroid preparation (shared by the fm ops) and
// the dense reductions behind lm_scores, fm_scores and class_centroids, and
// the votes of the large-k path. All are memory-bound passes; sums are
// float64 as on the CPU. Every float64 reduction is deterministic: partial
// sums are written, then added in a fixed order (float64 atomics would add
// them in arrival order, which changes the last bits from run to run; the
// scores break ties between equal votes and k-means feeds on the class sums).
#pragma once

#include "device_common.cuh"

namespace fastvote {
namespace cuda {
namespace reduce {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Warp per centroid: an fp32 copy when the input is not usable as is, the
// terms that turn a dot product into a key (as the CPU backend computes them:
// ||c||^2 in float64 added in d order, then rounded), and the NaN/Inf check.
//   l2:     key = ||c||^2 - 2 x.c
//   cosine: key = -(x_n . c) / ||c||
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    prepare_centroids_kernel(const scalar_t* c, int64_t s0, int64_t s1, int num_c, int dim,
                             Metric metric, float* copy, float* bias, float* scale, long long* bad) {
  const int lane = threadIdx.x % 32;
  for (int j = blockIdx.x * kWarps + threadIdx.x / 32; j < num_c; j += gridDim.x * kWarps) {
    const scalar_t* row = c + j * s0;
    // Each lane squares one element of a 32-wide chunk (exact in float64: FMA
    // contraction changes nothing) and every lane adds the chunk's squares in
    // d order, so the sum is the CPU's bit for bit (a lane-strided sum and a
    // butterfly would differ from it in the last place, now and then).
    double sq = 0.0;
    for (int d0 = 0; d0 < dim; d0 += 32) {
      const int d = d0 + lane;
      double square = 0.0;
      if (d < dim) {
        const float v = to_float(row[d * s1]);
        if (copy != nullptr) copy[static_cast<int64_t>(j) * dim + d] = v;
        square = static_cast<double>(v) * v;
      }
      const int width = min(32, dim - d0);
      for (int i = 0; i < width; ++i) sq += __shfl_sync(kFullMask, square, i);
    }
    if (lane == 0) {
      const float sqf = static_cast<float>(sq);
      if (!is_finite(sqf)) atomicMin(bad, static_cast<long long>(j));
      if (metric == Metric::L2) {
        bias[j] = sqf;
        scale[j] = -2.0f;
      } else {
        bias[j] = 0.0f;
        scale[j] = __fdiv_rn(-1.0f, fmaxf(static_cast<float>(sqrt(sq)), kNormEps));
      }
    }
  }
}

// ---- fm_scores -------------------------------------------------------------

// Fixed-order sums of per-block partials: out[j] = sum over g of
// partial[g * cols + j], g ascending; a thread per column.
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const double* partial, int64_t groups, int64_t cols, double* out) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < cols;
       j += static_cast<int64_t>(gridDim.x) * kThreads) {
    double total = 0.0;
    for (int64_t g = 0; g < groups; ++g) total += partial[g * cols + j];
    out[j] = total;
  }
}

// Thread per row: squared norm, NaN/Inf check, the row's scale for the column
// sums (1 / ||x|| for cosine), and the block's sum of squared norms
// (partial[blockIdx.x]).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    feature_rows_kernel(const scalar_t* x, int64_t s0, int64_t s1, int64_t n, int dim, Metric metric,
                        float* row_scale, double* partial, long long* bad) {
  __shared__ double warp_partial[kWarps];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  double sq_sum = 0.0;
  if (row < n) {
    const float sq = row_sqnorm(x + row * s0, s1, dim);
    if (!is_finite(sq)) atomicMin(bad, static_cast<long long>(row));
    row_scale[row] = metric == Metric::Cosine && is_finite(sq) ? inverse_norm(sq) : 1.0f;
    sq_sum = sq;
  }
  sq_sum = warp_sum(sq_sum);
  if (threadIdx.x % 32 == 0) warp_partial[threadIdx.x / 32] = sq_sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += warp_partial[w];
    partial[blockIdx.x] = total;
  }
}

// Block = 32 columns x 8 row lanes, per (column chunk, row group): column sums
// of x * row_scale in float64, into partial[row group][dim].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    column_sums_kernel(const scalar_t* x, int64_t s0, int64_t s1, int64_t n, int dim,
                       const float* row_scale, int64_t rows_per_group, double* partial_out) {
  __shared__ double partial[kWarps][32];
  const int lane = threadIdx.x % 32;
  const int row_lane = threadIdx.x / 32;
  const int d = blockIdx.x * 32 + lane;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t r1 = min(n, r0 + rows_per_group);
  double acc = 0.0;
  if (d < dim) {
    for (int64_t r = r0 + row_lane; r < r1; r += kWarps) {
      acc += __fmul_rn(to_float(x[r * s0 + d * s1]), row_scale[r]);
    }
  }
  partial[row_lane][lane] = acc;
  __syncthreads();
  if (row_lane == 0 && d < dim) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += partial[w][lane];
    partial_out[static_cast<int64_t>(blockIdx.y) * dim + d] = total;
  }
}

// Warp per centroid, from the column sums (sums[dim] = sum of ||x||^2):
//   l2:     ||c||^2 - 2 c.mean(x) + mean(||x||^2)
//   cosine: c_n . mean(x_n) = -scale * c.mean(x_n)
__global__ void __launch_bounds__(kThreads)
    fm_scores_kernel(const float* c, int64_t ldc, int num_c, int dim, const float* bias,
                     const float* scale, const double* sums, double n, Metric metric, double* out) {
  const int lane = threadIdx.x % 32;
  for (int j = blockIdx.x * kWarps + threadIdx.x / 32; j < num_c; j += gridDim.x * kWarps) {
    double dot = 0.0;
    for (int d = lane; d < dim; d += 32) dot += c[j * ldc + d] * (sums[d] / n);
    dot = warp_sum(dot);
    if (lane == 0) {
      out[j] = metric == Metric::L2 ? bias[j] - 2.0 * dot + sums[dim] / n
                                    : -static_cast<double>(scale[j]) * dot;
    }
  }
}

// ---- lm_scores -------------------------------------------------------------

// Warp per row: the row's max, NaN/Inf check, and 1 / sum(exp(x - max)).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    logit_rows_kernel(const scalar_t* x, int64_t s0, int64_t s1, int64_t n, int num_c,
                      float* row_max, double* row_inv_sum, long long* bad) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < n;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const scalar_t* p = x + row * s0;
    float top = -INFINITY;
    bool finite = true;
    for (int j = lane; j < num_c; j += 32) {
      const float v = to_float(p[j * s1]);
      finite &= is_finite(v);
      top = fmaxf(top, v);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      top = fmaxf(top, __shfl_xor_sync(kFullMask, top, offset));
    }
    if (!__all_sync(kFullMask, finite)) {
      // The op raises after the launch; the sums need only defined values.
      if (lane == 0) {
        atomicMin(bad, static_cast<long long>(row));
        row_max[row] = 0.0f;
        row_inv_sum[row] = 0.0;
      }
      continue;
    }
    double total = 0.0;
    for (int j = lane; j < num_c; j += 32) total += expf(to_float(p[j * s1]) - top);
    total = warp_sum(total);
    if (lane == 0) {
      row_max[row] = top;
      row_inv_sum[row] = 1.0 / total;
    }
  }
}

// Thread per class, block per (256 classes, row group): sums of the softmax
// probabilities in float64, into partial[row group][num_c].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    class_probs_kernel(const scalar_t* x, int64_t s0, int64_t s1, int64_t n, int num_c,
                       const float* row_max, const double* row_inv_sum, int64_t rows_per_group,
                       double* partial) {
  const int j = blockIdx.x * kThreads + threadIdx.x;
  if (j >= num_c) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t r1 = min(n, r0 + rows_per_group);
  double acc = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    acc += static_cast<double>(expf(to_float(x[r * s0 + j * s1]) - row_max[r])) * row_inv_sum[r];
  }
  partial[static_cast<int64_t>(blockIdx.y) * num_c + j] = acc;
}

// ---- class_centroids -------------------------------------------------------

// Grid-stride over the labels: counts (shared histogram when it fits) and
// the first position whose label is out of range.
__global__ void __launch_bounds__(kThreads)
    label_counts_kernel(const int64_t* labels, int64_t n, int num_classes, int hist_bins,
                        unsigned long long* counts, long long* bad) {
  extern __shared__ __align__(16) unsigned char smem[];
  const VoteSink sink = make_sink(smem, hist_bins, counts);
  hist_clear(sink, hist_bins);
  __syncthreads();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t label = labels[i];
    if (label < 0 || label >= num_classes) {
      atomicMin(bad, static_cast<long long>(i));
      continue;
    }
    sink.add(static_cast<int>(label), 1ull);
  }
  hist_flush(sink, hist_bins);
}

// Class sums in a fixed order, so CUDA k-means is reproducible (float64
// atomics would add in arrival order). The rows are visited in label order (a
// stable sort: `order` and `sorted_labels`; out-of-range labels sort last, as
// num_classes) and cut into chunks of chunk_rows positions, which depend on N
// alone. A class's run of rows within one chunk is summed in row order; a class
// inside one chunk is final there, and a class spanning chunks q0 < ... < q1
// leaves its run in q0 as that chunk's `tail` and its runs in q0+1..q1 as those
// chunks' `head`, which class_merge_kernel adds in chunk order.
// Warp per (32 columns, chunk); a lane per column.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    class_runs_kernel(const scalar_t* x, int64_t s0, int64_t s1, int64_t n, int dim,
                      const int64_t* order, const int64_t* sorted_labels, int num_classes,
                      int64_t chunk_rows, int64_t chunks, double* sums, double* head, double* tail,
                      long long* bad) {
  const int d = blockIdx.x * 32 + threadIdx.x % 32;
  const int64_t q = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32;
  if (d >= dim || q >= chunks) return;  // no warp collectives below
  const int64_t r0 = q * chunk_rows;
  const int64_t r1 = min(n, r0 + chunk_rows);
  int64_t run_start = r0;
  double acc = 0.0;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t label = sorted_labels[i];
    if (label >= num_classes) break;  // out of range: reported by label_counts_kernel
    const int64_t row = order[i];
    const float v = to_float(x[row * s0 + d * s1]);
    if (!is_finite(v)) atomicMin(bad, static_cast<long long>(row));
    acc += v;
    if (i + 1 == r1 || sorted_labels[i + 1] != label) {  // the run ends here
      const bool from_before = run_start == r0 && r0 > 0 && sorted_labels[r0 - 1] == label;
      const bool goes_on = i + 1 == r1 && r1 < n && sorted_labels[r1] == label;
      if (from_before) {
        head[q * dim + d] = acc;
      } else if (goes_on) {
        tail[q * dim + d] = acc;
      } else {
        sums[label * dim + d] = acc;
      }
      acc = 0.0;
      run_start = i + 1;
    }
  }
}

// Thread per (class, column): the classes that span chunks, from their tail
// and heads in chunk order (see class_runs_kernel). starts[c]: the position of
// class c's first row in label order.
__global__ void __launch_bounds__(kThreads)
    class_merge_kernel(const int64_t* counts, const int64_t* starts, int num_classes, int dim,
                       int64_t chunk_rows, const double* head, const double* tail, double* sums) {
  const int64_t items = static_cast<int64_t>(num_classes) * dim;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < items;
       t += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = t / dim;
    const int64_t d = t % dim;
    if (counts[c] == 0) continue;
    const int64_t first = starts[c] / chunk_rows;
    const int64_t last = (starts[c] + counts[c] - 1) / chunk_rows;
    if (first == last) continue;  // final in class_runs_kernel
    double total = tail[first * dim + d];
    for (int64_t q = first + 1; q <= last; ++q) total += head[q * dim + d];
    sums[t] = total;
  }
}

// ---- votes of the large-k path ---------------------------------------------

// Thread per row of sorted picks (keys best first; row r at keys + r * ldk and
// indices + r * ldi): the weights of fastvote/topk.h into weights[r * k ..],
// then one integer atomic per pick, in the fixed point of the fused kernels.
// The votes are deterministic and equal the CPU's.
__global__ void __launch_bounds__(kThreads)
    sorted_votes_kernel(const float* keys, int64_t ldk, const int64_t* indices, int64_t ldi,
                        int64_t rows, int k, Weight weight, float inv_temperature, float* weights,
                        unsigned long long* votes) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    float* w = weights + r * k;
    if (weight != Weight::Count) row_weights(keys + r * ldk, k, weight, inv_temperature, w);
    for (int i = 0; i < k; ++i) {
      atomicAdd(votes + indices[r * ldi + i], weight == Weight::Count ? 1ull : fixed_units(w[i]));
    }
  }
}

}  // namespace reduce
}  // namespace cuda
}  // namespace fastvote
