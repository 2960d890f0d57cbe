// The certified bf16 path of fm_vote / nearest_centroids (FASTVOTE_CUDA_KERNEL=bf16;
// vote_kernel.cu launches it): the answers of the fused fp32 kernel
// (fm_kernel.cuh), bit for bit, from approximate keys on bf16 tensor cores.
//   centres_kernel, pack_centroids_kernel: the centroids centred and in bf16,
//     each one's bias for the pass, and the bound's centroid terms;
//   pack_rows_kernel: each row as the fused kernel reads it (cosine:
//     normalised), centred, in bf16, with its terms of the bound;
//   candidates_kernel: approximate keys from mma.sync m16n8k16 (bf16 in, fp32
//     accumulate), each row's best k + m of them and the best one outside,
//     in the fused kernel's row tiles, centroid splits and lists;
//   rerank_kernel: the candidates' exact keys with the fused kernel's
//     arithmetic, their top-k, and the proof (fastvote/certify.h) that no
//     other centroid can enter it; proven rows vote or write their picks,
//     the others are listed for the fused kernel.
#pragma once

#include "device_common.cuh"
#include "fastvote/certify.h"

namespace fastvote {
namespace cuda {
namespace certified {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 128;  // rows per tile
constexpr int kBN = 64;   // centroids per tile: one list_offer<2> pass, lane l with l and l + 32
constexpr int kBK = 32;   // features per shared-memory stage: two m16n8k16 steps
// Packed rows and centroids are padded with zeros to a multiple of kBK features.
constexpr int kPitch = kBK / 2 + 4;  // words (bf16 pairs) per staged row: conflict-free fragment reads
constexpr int kPitchKeys = kBN + 4;
constexpr int kStageWords = 2 * (kBM + kBN) * kPitch;  // double-buffered rows and centroids
constexpr int kKeyTileWords = kBM * kPitchKeys;
// One region serves as the staging buffers and the key tile.
constexpr int kScratchWords = kStageWords > kKeyTileWords ? kStageWords : kKeyTileWords;
constexpr int kRowsPerWarp = kBM / kWarps;
// Each thread moves 16 bytes (8 bf16) a load: two of the row stage, one of the centroid stage.
constexpr int kChunksPerRow = kBK / 8;
static_assert(kBM * kChunksPerRow == 2 * kThreads && kBN * kChunksPerRow == kThreads,
              "the stage loads below assume 128 x 32 and 64 x 32 stages");
// Warps in a 4 x 2 grid, each with 32 rows x 32 centroids: 2 x 4 m16n8 tiles.
constexpr int kWarpRows = 32;
constexpr int kWarpCols = 32;
static_assert((kBM / kWarpRows) * (kBN / kWarpCols) == kWarps, "one warp tile per warp");
// Lists of k + m + 1 use the fused kernel's list code (capacity kMaxListK).
constexpr int kMaxK = kMaxListK - certify::kExtraCandidates - 1;

// Shared memory of candidates_kernel: [scratch | list keys | list indices | flag].
__host__ __device__ constexpr size_t candidates_smem_bytes(int kl) {
  return sizeof(float) * kScratchWords + (sizeof(float) + sizeof(int)) * kBM * static_cast<size_t>(kl) + 16;
}

// A row as pack_rows_kernel leaves it for rerank_kernel.
struct RowInfo {
  certify::RowTerms terms;
  float sq;   // squared norm, as the fused kernel computes it (l2 values, NaN/Inf check)
  float inv;  // the fused kernel's scale for the row: 1 / ||x|| for cosine, else 1
};

// Non-negative doubles order as their bit patterns, NaN (of either sign) above +inf.
__device__ __forceinline__ void atomic_max(double* slot, double v) {
  atomicMax(reinterpret_cast<unsigned long long*>(slot),
            static_cast<unsigned long long>(__double_as_longlong(v)));
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// ---- the centroids ------------------------------------------------------------

// One block: the centres from the column sums of w_j = scale_j c_j (sums[dim]):
// nu their mean, mu = -nu / 2 (l2) or -nu (cosine), and the terms mu.nu,
// its error and |nu| (the other terms are maxima, zero until pack_centroids_kernel).
__global__ void __launch_bounds__(kThreads)
    centres_kernel(const double* sums, int num_c, int dim, Metric metric, float* mu, float* nu,
                   certify::CentroidTerms* terms) {
  __shared__ double partial[3][kWarps];
  const double row_sign = metric == Metric::L2 ? -0.5 : -1.0;
  double mu_nu = 0.0, mu_nu_abs = 0.0, nu_sq = 0.0;
  for (int d = threadIdx.x; d < dim; d += kThreads) {
    const double mean = sums[d] / static_cast<double>(num_c);
    nu[d] = static_cast<float>(mean);
    mu[d] = static_cast<float>(row_sign * mean);
    const double product = static_cast<double>(mu[d]) * nu[d];
    mu_nu += product;
    mu_nu_abs += fabs(product);
    nu_sq += static_cast<double>(nu[d]) * nu[d];
  }
  const int warp = threadIdx.x / 32;
  mu_nu = warp_sum(mu_nu);
  mu_nu_abs = warp_sum(mu_nu_abs);
  nu_sq = warp_sum(nu_sq);
  if (threadIdx.x % 32 == 0) {
    partial[0][warp] = mu_nu;
    partial[1][warp] = mu_nu_abs;
    partial[2][warp] = nu_sq;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total[3] = {0.0, 0.0, 0.0};
    for (int w = 0; w < kWarps; ++w)
      for (int i = 0; i < 3; ++i) total[i] += partial[i][w];
    terms->mu_nu = total[0];
    terms->mu_nu_err = static_cast<double>(dim + 2) * 0x1p-52 * total[1];
    terms->nu_norm = certify::norm_bound(total[2], dim);
    terms->finite = is_finite(terms->nu_norm) && is_finite(terms->mu_nu);
  }
}

// Warp per centroid: its bf16 features of w_j - nu (packed [num_c][dp],
// zero padded), beta^_j (the pass's bias) and its terms of the bound, maxed
// into terms (the CPU's pack_centroid, csrc/cpu/certified.cpp, in parallel).
__global__ void __launch_bounds__(kThreads)
    pack_centroids_kernel(const float* c, int64_t ldc, int num_c, int dim, int dp, const float* bias,
                          const float* scale, const float* mu, const float* nu, uint16_t* packed,
                          float* beta_hat, certify::CentroidTerms* terms) {
  const int lane = threadIdx.x % 32;
  for (int j = blockIdx.x * kWarps + threadIdx.x / 32; j < num_c; j += gridDim.x * kWarps) {
    const float* cj = c + j * ldc;
    const double s = scale[j];
    double hat_sq = 0.0, err_sq = 0.0, c_sq = 0.0, beta = 0.0, beta_abs = 0.0;
    for (int d = lane; d < dp; d += 32) {
      uint32_t bits = 0;
      if (d < dim) {
        const double w = s * cj[d];  // exact: 24 x 24 bits
        const double t = w - nu[d];  // one rounding (fused or not)
        bits = certify::bf16_bits(static_cast<float>(t));
        const double hat = certify::bf16_value(bits);
        const double err = t - hat;  // exact: t and its bf16 are within a factor 2 (or it is 0)
        hat_sq += hat * hat;
        err_sq += err * err;
        c_sq += static_cast<double>(cj[d]) * cj[d];
        beta += mu[d] * w;
        beta_abs += fabs(mu[d] * w);
      }
      packed[static_cast<int64_t>(j) * dp + d] = static_cast<uint16_t>(bits);
    }
    hat_sq = warp_sum(hat_sq);
    err_sq = warp_sum(err_sq);
    c_sq = warp_sum(c_sq);
    beta = warp_sum(beta);
    beta_abs = warp_sum(beta_abs);
    if (lane == 0) {
      const certify::CentroidBound b =
          certify::centroid_bound(hat_sq, err_sq, c_sq, beta + bias[j], beta_abs + fabsf(bias[j]), dim);
      beta_hat[j] = b.beta_hat;
      atomic_max(&terms->w_norm, b.hat);
      atomic_max(&terms->w_err, b.err);
      atomic_max(&terms->beta_err, b.beta_err);
      atomic_max(&terms->beta_max, b.beta_abs);
      atomic_max(&terms->w_exact, fabs(s) * b.c_len);
      atomic_max(&terms->c_norm, b.c_len);
      atomic_max(&terms->scale_max, fabs(s));
      atomic_max(&terms->bias_max, fabs(static_cast<double>(bias[j])));
      if (!(is_finite(b.hat) && is_finite(b.err) && is_finite(b.beta_err) && is_finite(b.beta_abs))) {
        terms->finite = 0;
      }
    }
  }
}

// ---- the rows -----------------------------------------------------------------

// Warp per row of the chunk: the squared norm in the fused kernel's order
// (row_sqnorm_lanes: lanes l and l + 16 square dimensions d0 + l and
// d0 + 16 + l, and lane l adds both to partial l % 16, in d order; then the
// partials pairwise), the NaN/Inf check, the row as the fused kernel reads it, y, and
// bf16(fl(y - mu)) into packed [n][dp] (zero padded), with the row's terms.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pack_rows_kernel(const scalar_t* x, int64_t xs0, int64_t xs1, int64_t n, int64_t row_offset,
                     int dim, int dp, Metric metric, const float* mu, const float* nu,
                     const certify::CentroidTerms* terms, uint16_t* packed, RowInfo* info,
                     long long* bad_row) {
  const int lane = threadIdx.x % 32;
  const bool cosine = metric == Metric::Cosine;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < n;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const scalar_t* p = x + row * xs0;
    const int part = lane % kNormLanes;
    float sq = 0.0f;  // lane l < 16: partial l (lanes 16-31 hold copies)
    for (int d0 = 0; d0 < dim; d0 += 32) {
      const int d = d0 + lane;
      const float v = d < dim ? to_float(p[d * xs1]) : 0.0f;
      const float square = __fmul_rn(v, v);
      const float first = __shfl_sync(kFullMask, square, part);
      const float second = __shfl_sync(kFullMask, square, part + kNormLanes);
      if (d0 + part < dim) sq = __fadd_rn(sq, first);
      if (d0 + kNormLanes + part < dim) sq = __fadd_rn(sq, second);
    }
    for (int width = kNormLanes / 2; width > 0; width /= 2) {
      sq = __fadd_rn(sq, __shfl_down_sync(kFullMask, sq, width));  // (lanes >= width: unused)
    }
    sq = __shfl_sync(kFullMask, sq, 0);
    const bool finite = is_finite(sq);
    if (!finite && lane == 0) atomicMin(bad_row, static_cast<long long>(row_offset + row));
    const float inv = cosine && finite ? inverse_norm(sq) : 1.0f;
    double hat_sq = 0.0, err_sq = 0.0, y_sq = 0.0, dot_nu = 0.0;
    for (int d = lane; d < dp; d += 32) {
      uint32_t bits = 0;
      if (d < dim) {
        const float v = to_float(p[d * xs1]);
        const float y = cosine ? __fmul_rn(v, inv) : v;
        const float t = __fsub_rn(y, mu[d]);
        bits = certify::bf16_bits(t);
        const double hat = certify::bf16_value(bits);
        const double err = static_cast<double>(t) - hat;  // exact
        hat_sq += hat * hat;
        err_sq += err * err;
        y_sq += static_cast<double>(y) * y;
        dot_nu += static_cast<double>(y) * nu[d];
      }
      packed[row * dp + d] = static_cast<uint16_t>(bits);
    }
    hat_sq = warp_sum(hat_sq);
    err_sq = warp_sum(err_sq);
    y_sq = warp_sum(y_sq);
    dot_nu = warp_sum(dot_nu);
    if (lane == 0) {
      RowInfo r;
      r.terms = certify::row_terms(*terms, certify::norm_bound(hat_sq, dim), certify::norm_bound(err_sq, dim),
                                   certify::norm_bound(y_sq, dim), dot_nu, dim);
      r.sq = sq;
      r.inv = inv;
      info[row] = r;
    }
  }
}

// ---- the candidate pass ----------------------------------------------------------

// d += a * b on the tensor cores: a 16 x 16 (rows x features, row-major) and
// b 16 x 8 (features x centroids) bf16 fragments, d 16 x 8 fp32 (PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type").
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the launcher asks for compute capability 8.0 first
#endif
}

struct CandidateArgs {
  const uint32_t* rows;   // [n][dp / 2] bf16 pairs (feature 2p in the low half)
  const uint32_t* cents;  // [num_c][dp / 2]
  int64_t n;
  int dp;
  int num_c;
  const float* beta_hat;  // the pass's bias: A_j = fl(beta^_j + D~_j)
  int kl;                 // list capacity: k + m candidates and the best key outside them
  int splits;
  int tiles_per_split;
  int64_t items;     // row tiles * splits
  float* part_keys;  // splits > 1: [items][kBM][kl]
  int* part_idx;
  int* arrivals;     // splits > 1: [row tiles], zeroed
  float* cand_keys;  // [n][kl], each row's list, best first
  int* cand_idx;
};

// One thread's share of a stage: Q 16-byte chunks of Rows x kBK bf16 (rows
// r = tid / kChunksPerRow + q * (kThreads / kChunksPerRow)); rows past `rows`
// read as zeros.
template <int Q>
struct StageLoads {
  uint4 v[Q];
  __device__ __forceinline__ void load(const uint32_t* base, int64_t pitch_words, int rows, int d0) {
    const int chunk = threadIdx.x % kChunksPerRow;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const int r = threadIdx.x / kChunksPerRow + q * (kThreads / kChunksPerRow);
      v[q] = r < rows ? *reinterpret_cast<const uint4*>(base + r * pitch_words + d0 / 2 + chunk * 4)
                      : make_uint4(0u, 0u, 0u, 0u);
    }
  }
  __device__ __forceinline__ void store(uint32_t* stage) const {
    const int chunk = threadIdx.x % kChunksPerRow;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const int r = threadIdx.x / kChunksPerRow + q * (kThreads / kChunksPerRow);
      *reinterpret_cast<uint4*>(stage + r * kPitch + chunk * 4) = v[q];
    }
  }
};

__global__ void __launch_bounds__(kThreads, 2) candidates_kernel(const CandidateArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* scratch = reinterpret_cast<uint32_t*>(smem);
  float* key_tile = reinterpret_cast<float*>(scratch);
  float* list_keys = reinterpret_cast<float*>(scratch + kScratchWords);
  int* list_idx = reinterpret_cast<int*>(list_keys + kBM * a.kl);
  int* last_flag = list_idx + kBM * a.kl;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int group = lane / 4;  // the fragments' groupID and threadID_in_group
  const int quad = lane % 4;
  const int warp_row = (warp % (kBM / kWarpRows)) * kWarpRows;
  const int warp_col = (warp / (kBM / kWarpRows)) * kWarpCols;
  const int kl = a.kl;
  const int64_t pitch_words = a.dp / 2;

  for (int64_t item = blockIdx.x; item < a.items; item += gridDim.x) {
    const int64_t tile = item / a.splits;
    const int64_t row0 = tile * kBM;
    const int tile_rows = static_cast<int>(min(static_cast<int64_t>(kBM), a.n - row0));
    const int64_t span = static_cast<int64_t>(a.tiles_per_split) * kBN;
    const int c_begin = static_cast<int>((item % a.splits) * span);
    const int c_end = static_cast<int>(min(static_cast<int64_t>(a.num_c), c_begin + span));

    for (int e = tid; e < kBM * kl; e += kThreads) {
      list_keys[e] = INFINITY;
      list_idx[e] = kSentinelIndex;
    }
    __syncthreads();

    for (int j0 = c_begin; j0 < c_end; j0 += kBN) {
      const uint32_t* row_base = a.rows + row0 * pitch_words;
      const uint32_t* cent_base = a.cents + static_cast<int64_t>(j0) * pitch_words;
      const int tile_cols = min(kBN, c_end - j0);
      StageLoads<2> la;
      StageLoads<1> lb;
      float acc[2][4][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;

      la.load(row_base, pitch_words, tile_rows, 0);
      lb.load(cent_base, pitch_words, tile_cols, 0);
      la.store(scratch);
      lb.store(scratch + kBM * kPitch);
      __syncthreads();
      int buf = 0;
      for (int d0 = 0; d0 < a.dp; d0 += kBK) {
        const bool more = d0 + kBK < a.dp;
        if (more) {  // in flight during the products below
          la.load(row_base, pitch_words, tile_rows, d0 + kBK);
          lb.load(cent_base, pitch_words, tile_cols, d0 + kBK);
        }
        const uint32_t* as = scratch + buf * (kBM + kBN) * kPitch;
        const uint32_t* bs = as + kBM * kPitch;
#pragma unroll
        for (int ks = 0; ks < kBK / 16; ++ks) {
          const int kw = ks * 8;  // the step's first word (pair of features)
          uint32_t af[2][4], bf[4][2];
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            const uint32_t* r = as + (warp_row + mi * 16 + group) * kPitch + kw + quad;
            af[mi][0] = r[0];               // row g,     features 2q, 2q + 1
            af[mi][1] = r[8 * kPitch];      // row g + 8
            af[mi][2] = r[4];               // row g,     features 2q + 8, 2q + 9
            af[mi][3] = r[8 * kPitch + 4];  // row g + 8
          }
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) {
            const uint32_t* c = bs + (warp_col + ni * 8 + group) * kPitch + kw + quad;
            bf[ni][0] = c[0];  // centroid g, features 2q, 2q + 1
            bf[ni][1] = c[4];  // features 2q + 8, 2q + 9
          }
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) mma_bf16(acc[mi][ni], af[mi], bf[ni]);
        }
        if (more) {
          uint32_t* next = scratch + (buf ^ 1) * (kBM + kBN) * kPitch;
          la.store(next);
          lb.store(next + kBM * kPitch);
        }
        __syncthreads();
        buf ^= 1;
      }

      // Epilogue: approximate keys into the key tile (the stages are free now),
      // then each warp offers its 16 rows' 64 keys to their lists.
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int m = warp_row + mi * 16 + group + (e < 2 ? 0 : 8);
            const int col = warp_col + ni * 8 + quad * 2 + (e & 1);
            const int j = j0 + col;
            key_tile[m * kPitchKeys + col] = j < c_end ? __fadd_rn(a.beta_hat[j], acc[mi][ni][e]) : INFINITY;
          }
        }
      }
      __syncthreads();
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int m = warp * kRowsPerWarp + r;
        if (m >= tile_rows) break;
        const float* kt = key_tile + m * kPitchKeys;
        const int c0 = j0 + lane;
        const float cand_key[2] = {kt[lane], kt[lane + 32]};
        const int cand_idx[2] = {c0, c0 + 32};
        const bool valid[2] = {c0 < c_end, c0 + 32 < c_end};
        if (j0 == c_begin) {  // the row's list is still empty
          list_fill<2>(list_keys + m * kl, list_idx + m * kl, kl, cand_key, cand_idx, valid);
        } else {
          list_offer<2>(list_keys + m * kl, list_idx + m * kl, kl, cand_key, cand_idx, valid);
        }
      }
      __syncthreads();
    }

    if (a.splits > 1) {
      // Publish this range's lists; the last range of the row tile to arrive
      // merges them (as the fused kernel does).
      const int64_t base = item * kBM * kl;
      for (int e = tid; e < kBM * kl; e += kThreads) {
        a.part_keys[base + e] = list_keys[e];
        a.part_idx[base + e] = list_idx[e];
      }
      __threadfence();
      __syncthreads();
      if (tid == 0) *last_flag = atomicAdd(a.arrivals + tile, 1) == a.splits - 1;
      __syncthreads();
      if (*last_flag == 0) continue;
      __threadfence();
      for (int e = tid; e < kBM * kl; e += kThreads) {
        list_keys[e] = INFINITY;
        list_idx[e] = kSentinelIndex;
      }
      __syncthreads();
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int m = warp * kRowsPerWarp + r;
        if (m >= tile_rows) break;
        for (int s = 0; s < a.splits; ++s) {
          // L2 reads: other blocks wrote these.
          const int64_t src = ((tile * a.splits + s) * kBM + m) * kl;
          float cand_key[2];
          int cand_idx[2];
          bool valid[2];
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int p = lane + 32 * u;
            cand_key[u] = p < kl ? __ldcg(a.part_keys + src + p) : INFINITY;
            cand_idx[u] = p < kl ? __ldcg(a.part_idx + src + p) : kSentinelIndex;
            valid[u] = p < kl && cand_idx[u] < a.num_c;
          }
          if (s == 0) {
            list_fill<2>(list_keys + m * kl, list_idx + m * kl, kl, cand_key, cand_idx, valid);
          } else {
            list_offer<2>(list_keys + m * kl, list_idx + m * kl, kl, cand_key, cand_idx, valid);
          }
        }
      }
      __syncthreads();
    }

    for (int e = tid; e < kBM * kl; e += kThreads) {
      const int64_t row = row0 + e / kl;
      if (row < a.n) {
        a.cand_keys[row * kl + e % kl] = list_keys[e];
        a.cand_idx[row * kl + e % kl] = list_idx[e];
      }
    }
    __syncthreads();
  }
}

// ---- the exact re-rank and the proof --------------------------------------------

constexpr int kRerankRows = 32;  // rows per block

// Shared memory of rerank_kernel: [exact keys | list keys | list indices | weights].
__host__ __device__ constexpr size_t rerank_smem_bytes(int k) {
  return kRerankRows * (sizeof(float) * (k + certify::kExtraCandidates) +
                        (2 * sizeof(float) + sizeof(int)) * static_cast<size_t>(k));
}

template <typename scalar_t>
struct RerankArgs {
  const scalar_t* x;  // the chunk's rows [n, dim], any strides
  int64_t xs0, xs1;
  int64_t n;
  int64_t row_offset;  // the chunk's first row in the op's features
  int dim;
  const float* c;  // the fused kernel's centroids, bias and scale
  int64_t ldc;
  int num_c;
  const float* bias;
  const float* scale;
  Metric metric;
  bool vote;  // votes, else each row's picks
  Weight weight;
  float inv_temperature;
  int k;
  const float* cand_keys;  // [n][k + m + 1] from candidates_kernel
  const int* cand_idx;
  const RowInfo* info;
  const certify::CentroidTerms* terms;
  certify::PassError pass;
  unsigned long long* votes;  // vote: [K]
  float* values;              // picks: [N][k] of the op
  int64_t* indices;
  int64_t* fallback;  // [N]: rows of the op for the fused kernel
  unsigned long long* fallback_count;
};

// The exact key of (row, centroid j), as the fused kernel computes it: one
// fmaf chain over d = 0, 1, ..., of the row as it reads it (cosine: each
// element times the row's scale, rounded), then fmaf(scale, acc, bias).
template <typename scalar_t>
__device__ float exact_key(const RerankArgs<scalar_t>& a, int64_t row, float inv, int j) {
  const scalar_t* p = a.x + row * a.xs0;
  const float* cj = a.c + j * a.ldc;
  const bool cosine = a.metric == Metric::Cosine;
  float acc = 0.0f;
  for (int d = 0; d < a.dim; ++d) {
    const float v = to_float(p[d * a.xs1]);
    acc = fmaf(cosine ? __fmul_rn(v, inv) : v, cj[d], acc);
  }
  return fmaf(a.scale[j], acc, a.bias[j]);
}

// kRerankRows rows a block: a thread per (row, candidate) for the exact keys,
// then a thread per row for its top-k, the proof and what the row gives.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) rerank_kernel(const RerankArgs<scalar_t> a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int k = a.k;
  const int kc = k + certify::kExtraCandidates;  // candidates
  const int kl = kc + 1;                         // ... and the best approximate key outside them
  float* exact = reinterpret_cast<float*>(smem);
  float* list_keys = exact + kRerankRows * kc;
  int* list_idx = reinterpret_cast<int*>(list_keys + kRerankRows * k);
  float* weights = reinterpret_cast<float*>(list_idx + kRerankRows * k);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kRerankRows;

  for (int p = threadIdx.x; p < kRerankRows * kc; p += blockDim.x) {
    const int64_t row = first + p / kc;
    float key = NAN;
    if (row < a.n && is_finite(a.info[row].sq)) {
      const int j = a.cand_idx[row * kl + p % kc];
      if (j < a.num_c) key = exact_key(a, row, a.info[row].inv, j);
    }
    exact[p] = key;
  }
  __syncthreads();

  const int r = threadIdx.x;
  const int64_t row = first + r;
  if (r >= kRerankRows || row >= a.n) return;
  const RowInfo info = a.info[row];
  if (!is_finite(info.sq)) return;  // the op raises; as the fused kernel, no votes from it
  const int* cand = a.cand_idx + row * kl;
  float* keys = list_keys + r * k;
  int* idx = list_idx + r * k;
  bool full = true;  // k + m candidates and one more approximate key: centroids all
  for (int i = 0; i < kl; ++i) full &= cand[i] < a.num_c;
  int count = 0;
  for (int i = 0; full && i < kc; ++i) count = topk_insert(keys, idx, count, k, exact[r * kc + i], cand[i]);
  const bool proven = full && count == k &&
                      certify::certify(*a.terms, a.dim, a.pass, info.terms, a.cand_keys[row * kl + kc], keys[k - 1]);
  const int64_t op_row = a.row_offset + row;
  if (!proven) {
    a.fallback[atomicAdd(a.fallback_count, 1ull)] = op_row;
    return;
  }
  if (a.vote) {
    float* w = weights + r * k;
    if (a.weight != Weight::Count) row_weights(keys, k, a.weight, a.inv_temperature, w);
    for (int e = 0; e < k; ++e) {
      atomicAdd(a.votes + idx[e], a.weight == Weight::Count ? 1ull : fixed_units(w[e]));
    }
  } else {
    // Keys omit ||x||^2 (l2) or are negated similarities (cosine).
    for (int e = 0; e < k; ++e) {
      a.values[op_row * k + e] = a.metric == Metric::Cosine ? -keys[e] : fmaxf(__fadd_rn(keys[e], info.sq), 0.0f);
      a.indices[op_row * k + e] = idx[e];
    }
  }
}

}  // namespace certified
}  // namespace cuda
}  // namespace fastvote
