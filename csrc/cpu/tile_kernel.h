// The CPU micro-kernel interfaces. The tile kernel scores one tile of packed feature rows
// against a range of centroids and update each row's top-k list in the
// epilogue, while the products are still in registers. Nothing of size
// rows x K is ever stored (FAISS's tile + heap shape, fused one step further).
#pragma once

#include <cstdint>

namespace fastvote {
namespace cpu {

// Rows are packed in slabs of kSlab rows, each slab laid out [D][kSlab] (zero
// padded), so one vector load reads the same feature of consecutive rows.
constexpr int kSlab = 32;

struct TileJob {
  const float* packed;     // [ceil(rows / kSlab)][dim][kSlab]
  int64_t rows;            // valid rows in the tile
  int64_t dim;             // D
  const float* centroids;  // float32, row j at centroids + j * ldc, contiguous in D
  int64_t ldc;
  int64_t num_centroids;   // K
  const float* bias;       // [K]  key = bias[j] + scale[j] * dot(x, c_j); smaller is better
  const float* scale;      // [K]
  int k;
  float* keys;             // [rows][k] each row's best keys, sorted
  int64_t* indices;        // [rows][k]
  int* counts;             // [rows] how many of the k slots are filled
  float* thresholds;       // [slabs * kSlab] reject_threshold per row; -inf on padding rows
};

using TileFn = void (*)(const TileJob&);
// The tile kernel that also adds each row's sum of squared keys over all
// centroids to row_sums[rows] (float64): for cosine keys, the sum of squared
// similarities, NormSim_2's numerator (sample_scores).
using SquaresTileFn = void (*)(const TileJob&, double* row_sums);
// Top-k keys (-logit) of one contiguous float32 row of n logits into
// keys[k] / indices[k]; false if the row holds NaN or Inf.
using LogitsRowFn = bool (*)(const float* row, int64_t n, int k, float* keys, int64_t* indices);

struct Kernels {
  TileFn tile;
  LogitsRowFn logits_row;
  const char* name;
  SquaresTileFn tile_squares;
};

// The fastest variants the running CPU supports (AVX-512, AVX2+FMA, portable),
// unless FASTVOTE_CPU_KERNEL pins one.
const Kernels& kernels();
inline TileFn tile_kernel() { return kernels().tile; }
inline const char* tile_kernel_name() { return kernels().name; }

#if defined(__x86_64__) && defined(__GNUC__)
Kernels kernels_avx2();
Kernels kernels_avx512();
#endif

}  // namespace cpu
}  // namespace fastvote
