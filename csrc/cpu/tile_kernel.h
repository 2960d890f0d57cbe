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

// Elem: float (the fp32 kernels), or uint32_t for the bf16 candidate pass,
// where each element is a pair of bf16 features (2p in the low half, 2p + 1
// in the high half: VDPBF16PS's layout) and dim counts pairs.
template <class Elem>
struct BasicTileJob {
  const Elem* packed;      // [ceil(rows / kSlab)][dim][kSlab]
  int64_t rows;            // valid rows in the tile
  int64_t dim;             // D (pairs for bf16)
  const Elem* centroids;   // row j at centroids + j * ldc, contiguous in D
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
using TileJob = BasicTileJob<float>;
using Bf16TileJob = BasicTileJob<uint32_t>;

using TileFn = void (*)(const TileJob&);
// The bf16 candidate pass: the tile kernel's loop and epilogue with each fp32
// fma replaced by one VDPBF16PS step per pair (native, or emulated bit for
// bit), or its AMX twin (TDPBF16PS tiles).
using Bf16TileFn = void (*)(const Bf16TileJob&);
// What a candidate pass needs of its operands, and how it errs.
struct CandidateShape {
  // dim (pairs) and each centroid row (ldc) are zero padded to a multiple of
  // pair_block, and the centroids to a multiple of centroid_block rows.
  int pair_block = 1, centroid_block = 1;
  // 0: a VDPBF16PS chain, pair after pair (certify::fma_chain_error); else
  // steps of this many products added in an unspecified order and rounding
  // (certify::tensor_core_error).
  int products_per_step = 0;
  // The fewest centroids from which the path pays (certified.h's
  // use_certified; the automatic choice only).
  int64_t pays_from = 800;
};
// The exact fp32 keys of kSlab (row, centroid) pairs of one slab (slab:
// [dim][kSlab], as `tile` reads it): lane l, row lane_row[l] of the slab
// against centroid idx[l] (-1: none, keys[l] untouched), with the tile
// kernel's arithmetic: acc = fma(c[d], x[d], acc) for d = 0, 1, ..., then
// key = fma(scale, acc, bias). Same bits as `tile`.
using ExactKeysFn = void (*)(const float* slab, int64_t dim, const float* centroids, int64_t ldc,
                             const float* bias, const float* scale, const int* lane_row, const int64_t* idx,
                             float* keys);
// The tile kernel that also adds each row's sum of squared keys over all
// centroids to row_sums[rows] (float64): for cosine keys, the sum of squared
// similarities, NormSim_2's numerator (sample_scores).
using SquaresTileFn = void (*)(const TileJob&, double* row_sums);
// Top-k keys (-logit) of one contiguous float32 row of n logits into
// keys[k] / indices[k]; false if the row holds NaN or Inf.
using LogitsRowFn = bool (*)(const float* row, int64_t n, int k, float* keys, int64_t* indices);
// Packs one slab (see kSlab) from n <= kSlab contiguous float32 rows rows[r]
// of dim features: slab[d * kSlab + r] = rows[r][d] (zero for r >= n), and
// sqnorm[r] = the row's squared norm in a fixed order, the CUDA kernels' too:
// dimension d added into float32 partial d % 16 (a multiply, then an add: no
// FMA), then the 16 partials added pairwise (partial l += partial l + w for
// w = 8, 4, 2, 1). Every variant writes the same bits.
using PackSlabFn = void (*)(const float* const* rows, int n, int64_t dim, float* slab,
                            float* sqnorm);

// k-means' within-group search (nearest_in_groups) straight from the rows:
// n contiguous float32 rows (rows[i], dim features each) against one group's
// `count` centroids, packed as pack_slab packs rows (ceil(count / kSlab) slabs
// of [dim][kSlab]). Writes each row's top-k keys and indices (within the
// group; counts[i] of the k slots filled) and its squared norm, all with the
// bits of packing the rows and running `tile` (each key's fma chain over d,
// the norm in pack_slab's order, candidates in increasing index).
struct GroupJob {
  const float* const* rows;
  int64_t n;
  int64_t dim;
  const float* slabs;
  int64_t count;
  const float* bias;   // [count]
  const float* scale;  // [count]
  int k;
  float* keys;       // [n][k]
  int64_t* indices;  // [n][k]
  int* counts;       // [n]
  float* sqnorm;     // [n]
};
using GroupFn = void (*)(const GroupJob&);

struct Kernels {
  TileFn tile;
  LogitsRowFn logits_row;
  const char* name;
  SquaresTileFn tile_squares;
  // Certified bf16 variants only (null elsewhere): their top-k comes from a
  // bf16 candidate pass, an exact re-rank and, for rows it cannot certify,
  // `tile` (certified.h). `tile` is then an fp32 FMA kernel, whose results
  // theirs equal bit for bit.
  Bf16TileFn candidates;
  ExactKeysFn exact_keys;
  // A vectorised pack_slab; null where the callers' scalar packing (any
  // dtype, any stride) is the one to use, as in "portable".
  PackSlabFn pack_slab;
  // A vectorised GroupFn; null where nearest_in_groups packs the rows for `tile`.
  GroupFn group_rows;
  CandidateShape candidate_shape;  // of `candidates`
};

// The fastest variants the running CPU supports, unless FASTVOTE_CPU_KERNEL
// pins one: AVX-512 with the certified bf16 pass on AMX tiles where the CPU
// has AMX-BF16 ("amxbf16"), else with VDPBF16PS on AMD CPUs with AVX512_BF16
// ("avx512bf16": Zen 4/5 run it at twice the fp32 FMA's rate; Intel's run it
// at half, so there it is only pinned), then AVX-512, AVX2+FMA, portable.
// "bf16emu", the certified pass with VDPBF16PS emulated in fp32 FMAs (slower
// than fp32: for tests), runs on every CPU but only when pinned.
const Kernels& kernels();
bool kernels_pinned();  // FASTVOTE_CPU_KERNEL names the variant
inline TileFn tile_kernel() { return kernels().tile; }
inline const char* tile_kernel_name() { return kernels().name; }

#if defined(__x86_64__) && defined(__GNUC__)
Kernels kernels_avx2();
Kernels kernels_avx512();
Kernels kernels_avx512_bf16emu();  // "bf16emu" on AVX-512F CPUs
Kernels kernels_avx512bf16();
Kernels kernels_amxbf16();
// AMX-BF16, and Linux lets this process use the tiles. Call only where the CPU
// has avx512f: its file is compiled for AVX-512.
bool cpu_has_amx_bf16();
#endif

}  // namespace cpu
}  // namespace fastvote
