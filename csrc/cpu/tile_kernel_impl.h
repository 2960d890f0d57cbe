// The micro-kernel body, written once over a tiny vector type V and compiled
// per instruction set by tile_kernel_*.cpp (each with its own target flags).
// Everything here has internal linkage: each ISA's copy stays in its own file,
// so no AVX-512 code can leak into a path run on an older CPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "bf16.h"
#include "fastvote/topk.h"
#include "tile_kernel.h"

namespace fastvote {
namespace cpu {
namespace {

// The tile kernel's inner step, per element type: how a slab element and a
// centroid element are read and multiplied into an fp32 accumulator.
// Float32: one fma per feature.
template <class V>
struct FloatDot {
  using Elem = float;
  using In = typename V::Reg;
  static In load(const float* p) { return V::load(p); }
  static In broadcast(const float* p) { return V::broadcast(p); }
  static typename V::Reg madd(In c, In x, typename V::Reg acc) { return V::fma(c, x, acc); }
};

// What the epilogue adds besides the top-k, per block of NV x W rows: nothing
// (the votes), or each row's sum of squared keys (sample_scores). A template
// parameter, so the vote kernels compile to exactly what they were.
template <class V, int NV>
struct NoRowSums {
  void start() {}
  void add(int, typename V::Reg) {}
  void finish(int64_t, int64_t) {}
};

template <class V, int NV>
struct RowSquareSums {
  double* row_sums;  // [rows], added to
  typename V::Reg acc[NV];
  void start() {
    for (int v = 0; v < NV; ++v) acc[v] = V::zero();
  }
  void add(int v, typename V::Reg key) { acc[v] = V::fma(key, key, acc[v]); }
  // float32 over one block of MR centroids, then float64 across blocks: the
  // sum over thousands of centroids keeps float64's accuracy.
  void finish(int64_t r0, int64_t rows) {
    for (int v = 0; v < NV; ++v) {
      float lanes[V::W];
      V::store(lanes, acc[v]);
      for (int lane = 0; lane < V::W && r0 + v * V::W + lane < rows; ++lane) {
        row_sums[r0 + v * V::W + lane] += lanes[lane];
      }
    }
  }
};

// The epilogue's step for one vector of keys (rows row0 .. row0 + W - 1, one
// centroid cj, above every centroid the lists hold): a lane enters its row's
// list only if it beats the row's threshold (rare once the lists fill up).
template <class V, class Job>
inline void insert_admitted(const Job& job, int64_t row0, typename V::Reg key, int64_t cj) {
  unsigned mask = V::admits(key, V::load(job.thresholds + row0));
  if (!mask) return;
  float lane_keys[V::W];
  V::store(lane_keys, key);
  for (; mask; mask &= mask - 1) {
    const int lane = __builtin_ctz(mask);
    const int64_t row = row0 + lane;
    float* keys = job.keys + row * job.k;
    int64_t* idx = job.indices + row * job.k;
    job.counts[row] = topk_insert</*kIndexAbove=*/true>(keys, idx, job.counts[row], job.k, lane_keys[lane], cj);
    job.thresholds[row] = reject_threshold(keys, job.counts[row], job.k);
  }
}

// MR centroids x (NV vectors of V::W rows) of accumulators live in registers.
template <class V, int MR, int NV, class Dot, class RowSums>
void run_tile_with(const BasicTileJob<typename Dot::Elem>& job, RowSums& row_sums) {
  using Elem = typename Dot::Elem;
  using Reg = typename V::Reg;
  constexpr int W = V::W;
  constexpr int kSub = W * NV;
  static_assert(kSlab % kSub == 0, "a slab must split into whole register blocks");
  const int64_t dim = job.dim;
  const int64_t num_slabs = (job.rows + kSlab - 1) / kSlab;

  for (int64_t j0 = 0; j0 < job.num_centroids; j0 += MR) {
    const int m = static_cast<int>(std::min<int64_t>(MR, job.num_centroids - j0));
    // Short last group: repeat its last centroid; the epilogue ignores j >= m.
    const Elem* c[MR];
    for (int j = 0; j < MR; ++j) c[j] = job.centroids + (j0 + std::min(j, m - 1)) * job.ldc;

    for (int64_t s = 0; s < num_slabs; ++s) {
      for (int sub = 0; sub < kSlab; sub += kSub) {
        const int64_t r0 = s * kSlab + sub;
        if (r0 >= job.rows) break;
        const Elem* x = job.packed + s * dim * kSlab + sub;

        Reg acc[MR][NV];
#pragma GCC unroll 16
        for (int j = 0; j < MR; ++j)
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[j][v] = V::zero();
        for (int64_t d = 0; d < dim; ++d) {
          typename Dot::In xv[NV];
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) xv[v] = Dot::load(x + d * kSlab + v * W);
#pragma GCC unroll 16
          for (int j = 0; j < MR; ++j) {
            const typename Dot::In cj = Dot::broadcast(c[j] + d);
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) acc[j][v] = Dot::madd(cj, xv[v], acc[j][v]);
          }
        }

        // Epilogue: keys for this block, j in increasing centroid order, as
        // the tie rule requires.
        row_sums.start();
        for (int j = 0; j < m; ++j) {
          const int64_t cj = j0 + j;
          const Reg bias = V::broadcast(job.bias + cj);
          const Reg scale = V::broadcast(job.scale + cj);
          for (int v = 0; v < NV; ++v) {
            const int64_t row0 = r0 + v * W;
            const Reg key = V::fma(scale, acc[j][v], bias);
            row_sums.add(v, key);
            insert_admitted<V>(job, row0, key, cj);
          }
        }
        row_sums.finish(r0, job.rows);
      }
    }
  }
}

template <class V, int MR, int NV, class Dot = FloatDot<V>>
void run_tile(const BasicTileJob<typename Dot::Elem>& job) {
  NoRowSums<V, NV> none;
  run_tile_with<V, MR, NV, Dot>(job, none);
}

template <class V, int MR, int NV>
void run_tile_squares(const TileJob& job, double* row_sums) {
  RowSquareSums<V, NV> sums{row_sums, {}};
  run_tile_with<V, MR, NV, FloatDot<V>>(job, sums);
}

// The bf16 candidate pass (Bf16TileFn) on the tile kernel's loop and epilogue.
template <class V, int MR, int NV, class Dot>
void run_bf16_tile(const Bf16TileJob& job) {
  const Mxcsr flush(Mxcsr::kFlushDenormals);
  run_tile<V, MR, NV, Dot>(job);
}

// ExactKeysFn: the lanes side by side, each its own sequential fma chain
// (the lanes only hide the fma latency; each key's order of operations is the
// tile kernel's). std::fma is one instruction in the FMA-enabled files.
inline void exact_keys(const float* slab, int64_t dim, const float* centroids, int64_t ldc,
                       const float* bias, const float* scale, const int* lane_row, const int64_t* idx,
                       float* keys) {
  const float* c[kSlab];
  for (int l = 0; l < kSlab; ++l) c[l] = centroids + std::max<int64_t>(idx[l], 0) * ldc;
  float acc[kSlab] = {};
  for (int64_t d = 0; d < dim; ++d) {
    for (int l = 0; l < kSlab; ++l) acc[l] = std::fma(c[l][d], slab[d * kSlab + lane_row[l]], acc[l]);
  }
  for (int l = 0; l < kSlab; ++l) {
    if (idx[l] >= 0) keys[l] = std::fma(scale[idx[l]], acc[l], bias[idx[l]]);
  }
}

// One contiguous float32 row of logits -> its top-k keys (-logit). Returns
// false if the row holds NaN/Inf (v * 0 + acc turns NaN exactly then). Once
// the list is full, W logits at a time are compared with the k-th; only the
// lanes that beat it are inserted (about k ln(K/k) of them on random rows).
template <class V>
bool run_logits_row(const float* v, int64_t n, int k, float* keys, int64_t* idx) {
  using Reg = typename V::Reg;
  constexpr int W = V::W;
  const float zero = 0.0f, minus_one = -1.0f;
  Reg acc = V::zero();
  int64_t j = 0;
  for (; j + W <= n; j += W) acc = V::fma(V::load(v + j), V::broadcast(&zero), acc);
  float lanes[W];
  V::store(lanes, acc);
  float tail = 0.0f;
  for (; j < n; ++j) tail += v[j] * 0.0f;
  for (int i = 0; i < W; ++i) tail += lanes[i];
  if (tail != 0.0f) return false;  // NaN compares unequal to everything

  int count = 0;
  for (j = 0; j < n && count < k; ++j) count = topk_insert(keys, idx, count, k, -v[j], j);
  for (; j + W <= n; j += W) {
    const float threshold = keys[k - 1];
    const Reg key = V::fma(V::load(v + j), V::broadcast(&minus_one), V::zero());
    for (unsigned mask = V::admits(key, V::broadcast(&threshold)); mask; mask &= mask - 1) {
      const int64_t i = j + __builtin_ctz(mask);
      if (-v[i] < keys[k - 1]) count = topk_insert(keys, idx, count, k, -v[i], i);
    }
  }
  for (; j < n; ++j) {
    if (-v[j] < keys[k - 1]) count = topk_insert(keys, idx, count, k, -v[j], j);
  }
  return true;
}

}  // namespace
}  // namespace cpu
}  // namespace fastvote
