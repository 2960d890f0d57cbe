// The CPU backend of every fastvote op. fm_vote / nearest_centroids are fused:
// rows are packed a tile at a time (converted to float32, normalised for
// cosine, checked for NaN/Inf on the way), the tile micro-kernel scores them
// against all centroids keeping only each row's top-k, and votes go into a
// per-thread histogram. Extra memory is O(tile + threads * K), never O(N * K).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "certified.h"
#include "fastvote/checks.h"
#include "fastvote/topk.h"
#include "tile_kernel.h"

namespace fastvote {

const char* cpu_tile_kernel_name() { return cpu::tile_kernel_name(); }

std::pair<int64_t, int64_t> cpu_certified_stats() {
  const cpu::CertifiedStats s = cpu::certified_stats();
  return {s.rows, s.fallback_rows};
}

namespace cpu {
namespace {

constexpr float kNormEps = 1e-12f;  // as torch.nn.functional.normalize
constexpr int64_t kNoRow = std::numeric_limits<int64_t>::max();
constexpr int64_t kLogitRowsPerTask = 64;

// Rows per tile: sized so the packed tile stays in a core's L2 (~256 KB).
int64_t tile_rows(int64_t dim) {
  const int64_t rows = (256 * 1024 / static_cast<int64_t>(sizeof(float))) / dim / kSlab * kSlab;
  return std::clamp<int64_t>(rows, kSlab, 8 * kSlab);
}

// Rows per tile of the certified path: its candidate pass streams every
// centroid once a tile, so up to 8 fp32 tiles' rows (K = 100,000: 1.65x
// faster than one, RESULTS.md), while each thread still gets 4 tiles.
int64_t certified_tile_rows(int64_t n, int64_t dim) {
  const int64_t share = (n + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
  return std::clamp<int64_t>((share + kSlab - 1) / kSlab * kSlab, tile_rows(dim), 8 * tile_rows(dim));
}

// Rows the certified path takes before for_each_tile may give up on it (more than half fell back).
constexpr int64_t kGuardRows = 4096;

// Rows per task of nearest_in_groups' GroupFn path (no packed tile to keep in
// L2; a group's centroids are packed once a task).
constexpr int64_t kGroupTileRows = 512;

int num_workers(int64_t tasks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks)));
}

// Records the lowest offending row seen by any thread.
struct FirstBadRow {
  std::atomic<int64_t> row{kNoRow};
  void record(int64_t r) {
    int64_t cur = row.load();
    while (r < cur && !row.compare_exchange_weak(cur, r)) {
    }
  }
  bool any() const { return row.load() != kNoRow; }
};

// A [rows, cols] view with arbitrary strides, read as float32.
template <typename scalar_t>
struct Matrix {
  const scalar_t* data;
  int64_t s0, s1;
  explicit Matrix(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), s0(t.stride(0)), s1(t.stride(1)) {}
  float operator()(int64_t i, int64_t j) const { return static_cast<float>(data[i * s0 + j * s1]); }
};

// Calls fn(scalar_t{}) for the input's dtype. A function, not AT_DISPATCH_*:
// OpenMP pragmas cannot sit inside a macro's arguments.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kDouble: return fn(double{});
    case at::kHalf: return fn(c10::Half{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    default: TORCH_CHECK_TYPE(false, "fastvote: unsupported dtype ", dtype);
  }
}

// Centroids as the micro-kernel reads them, and the per-centroid terms that
// turn a dot product into a key (smaller is better):
//   l2:     key = ||c||^2 - 2 x.c   (= squared distance - ||x||^2)
//   cosine: key = -(x_n . c) / ||c||
struct Centroids {
  at::Tensor storage;  // a float32 copy, only when the input is not usable as is
  const float* data = nullptr;
  int64_t ldc = 0, count = 0, dim = 0;
  std::vector<float> bias, scale;
};

// `arg` names the input in errors ("centroids", or sample_scores' "targets").
Centroids prepare_centroids(const char* op, const at::Tensor& centroids, Metric metric,
                            const char* arg = "centroids") {
  Centroids c;
  c.storage = centroids;
  if (centroids.scalar_type() != at::kFloat || centroids.stride(1) != 1) {
    c.storage = centroids.to(at::kFloat).contiguous();
  }
  c.data = c.storage.const_data_ptr<float>();
  c.ldc = c.storage.stride(0);
  c.count = c.storage.size(0);
  c.dim = c.storage.size(1);
  c.bias.resize(c.count);
  c.scale.resize(c.count);
  // Each centroid's float64 sum of squares in feature order, four centroids at once (four
  // independent chains of adds: a chain alone waits on each add's latency; k-means calls this
  // every batch, K = 10,000 x 512 in 8 ms), over the threads when K x D is large.
  constexpr int kChains = 4;
  std::vector<double> sums(c.count);
  const int64_t quads = (c.count + kChains - 1) / kChains;
#pragma omp parallel for num_threads(num_workers(c.count * c.dim >= (1 << 20) ? quads : 1)) schedule(static)
  for (int64_t q = 0; q < quads; ++q) {
    const float* rows[kChains];
    double sq[kChains] = {};
    for (int i = 0; i < kChains; ++i) rows[i] = c.data + std::min(q * kChains + i, c.count - 1) * c.ldc;
    for (int64_t d = 0; d < c.dim; ++d) {
      for (int i = 0; i < kChains; ++i) sq[i] += static_cast<double>(rows[i][d]) * rows[i][d];
    }
    for (int i = 0; i < kChains && q * kChains + i < c.count; ++i) sums[q * kChains + i] = sq[i];
  }
  for (int64_t j = 0; j < c.count; ++j) {
    const double sq = sums[j];
    if (!std::isfinite(static_cast<float>(sq))) fail_non_finite(op, arg, j);
    if (metric == Metric::L2) {
      c.bias[j] = static_cast<float>(sq);
      c.scale[j] = -2.0f;
    } else {
      c.bias[j] = 0.0f;
      c.scale[j] = -1.0f / std::max(static_cast<float>(std::sqrt(sq)), kNormEps);
    }
  }
  return c;
}

// Row i of a tile's source: row i of the input, or (gathered) row order[i].
struct SameRow {
  int64_t operator()(int64_t i) const { return i; }
};
struct RowAt {
  const int64_t* order;
  int64_t operator()(int64_t i) const { return order[i]; }
};

// Asks for the cache lines of rows [first, end) (contiguous ones: x.s1 == 1).
// Gathered rows lie anywhere in the input; the scalar packing walks a slab's
// 32 rows in short strides the hardware prefetcher does not follow, and
// packing one slab while the next one's rows arrive hides most of the memory
// latency. (The kernels' pack_slab streams each row whole, which the hardware
// prefetcher follows: there this measured slower.)
template <typename scalar_t, typename Rows>
void prefetch_rows(const Matrix<scalar_t>& x, int64_t first, int64_t end, int64_t dim, Rows row_at) {
#if defined(__GNUC__)
  constexpr uintptr_t kLine = 64;
  for (int64_t i = first; i < end; ++i) {
    const uintptr_t row = reinterpret_cast<uintptr_t>(x.data + row_at(i) * x.s0);
    const uintptr_t row_end = row + dim * sizeof(scalar_t);
    for (uintptr_t line = row & ~(kLine - 1); line < row_end; line += kLine) {
      __builtin_prefetch(reinterpret_cast<const void*>(line));
    }
  }
#endif
}

// The scalar pack_slab (tile_kernel.h), for any dtype and stride: rows
// x[src[r]], r < in_slab.
//
// A slab is written kChunk dimensions at a time (a 4 KB block that stays in
// L1): row by row, each of a row's D values went to its own cache line of a
// 64 KB slab, and packing cost more than the distances against a few dozen
// centroids (k-means' groups). A row's squared norm sums dimension d into
// partial sum d % kLanes, the partials then added pairwise: a fixed order (the
// same bits on every CPU and thread count) without a chain of dependent adds.
template <typename scalar_t>
void pack_slab_scalar(const Matrix<scalar_t>& x, const int64_t* src, int64_t in_slab,
                      int64_t dim, float* slab, float* sqnorm) {
  constexpr int kLanes = 16;
  constexpr int64_t kChunk = 32;
  float part[kSlab][kLanes] = {};
  for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
    const int64_t d1 = std::min(dim, d0 + kChunk);
    for (int64_t r = 0; r < in_slab; ++r) {
      float* p = part[r];
      int64_t d = d0;
      const scalar_t* row = x.data + src[r] * x.s0;
      for (; d + kLanes <= d1; d += kLanes) {  // (d0 is a multiple of kLanes: lane l is d % kLanes)
        float v[kLanes];
        if (x.s1 == 1) {  // (a contiguous row: loads the compiler can vectorise)
          for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(row[d + l]);
        } else {
          for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(row[(d + l) * x.s1]);
        }
        for (int l = 0; l < kLanes; ++l) p[l] += v[l] * v[l];
        for (int l = 0; l < kLanes; ++l) slab[(d + l) * kSlab + r] = v[l];
      }
      for (; d < d1; ++d) {
        const float v = x(src[r], d);
        p[d % kLanes] += v * v;
        slab[d * kSlab + r] = v;
      }
    }
    for (int64_t r = in_slab; r < kSlab; ++r) {  // zero padding rows of the last slab
      for (int64_t d = d0; d < d1; ++d) slab[d * kSlab + r] = 0.0f;
    }
  }
  for (int64_t r = 0; r < in_slab; ++r) {
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) part[r][l] += part[r][l + width];
    }
    sqnorm[r] = part[r][0];
  }
}

// A tile's packed rows, starting on a cache line: a slab's row of kSlab floats
// is then two whole lines, which the kernels' 64-byte loads and stores never
// straddle (measured: the AVX-512 kernel ~15% faster at K = 1000).
struct PackedTile {
  std::vector<float> storage;
  float* data;
  explicit PackedTile(int64_t floats) : storage(floats + 16) {
    void* start = storage.data();
    size_t space = storage.size() * sizeof(float);
    data = static_cast<float*>(std::align(64, floats * sizeof(float), start, space));
  }
};

// Packs rows [row0, row0 + rows) (of the input, or as row_at maps them) into
// slabs (see tile_kernel.h) and stores each row's squared norm: with `pack`
// (the kernels' pack_slab) for contiguous float32 rows where it is not null,
// else with the scalar code; both write the same bits. Returns the first
// input row with NaN/Inf, or -1.
template <typename scalar_t, typename Rows = SameRow>
int64_t pack_rows(const Matrix<scalar_t>& x, int64_t row0, int64_t rows, int64_t dim,
                  Metric metric, PackSlabFn pack, float* packed, float* sqnorm,
                  Rows row_at = {}) {
  if (!std::is_same_v<scalar_t, float> || x.s1 != 1) pack = nullptr;
  const bool prefetch = pack == nullptr && !std::is_same_v<Rows, SameRow> && x.s1 == 1;
  if (prefetch) prefetch_rows(x, row0, row0 + std::min<int64_t>(kSlab, rows), dim, row_at);
  for (int64_t s0 = 0; s0 < rows; s0 += kSlab) {
    const int64_t in_slab = std::min<int64_t>(kSlab, rows - s0);
    if (prefetch && s0 + kSlab < rows) {
      prefetch_rows(x, row0 + s0 + kSlab, row0 + std::min(rows, s0 + 2 * kSlab), dim, row_at);
    }
    // Gathered rows for pack_slab: the first two lines of each of the next slab's rows, so that
    // their fetches (and the hardware prefetcher's streams after them) start while this slab is
    // packed (k-means' within-group passes: 0.56 -> 0.42 us a row at 34 centroids a group, the
    // in-order rows' 0.38; the whole rows, as the scalar path asks, measured slower).
    if (pack != nullptr && !std::is_same_v<Rows, SameRow> && s0 + kSlab < rows) {
      for (int64_t r = s0 + kSlab; r < std::min(rows, s0 + 2 * kSlab); ++r) {
        const char* at = reinterpret_cast<const char*>(x.data + row_at(row0 + r) * x.s0);
        __builtin_prefetch(at);
        __builtin_prefetch(at + 64);
      }
    }
    float* slab = packed + (s0 / kSlab) * dim * kSlab;
    int64_t src[kSlab];
    for (int64_t r = 0; r < in_slab; ++r) src[r] = row_at(row0 + s0 + r);
    if (pack != nullptr) {
      const float* from[kSlab];  // (scalar_t is float here)
      for (int64_t r = 0; r < in_slab; ++r) {
        from[r] = reinterpret_cast<const float*>(x.data + src[r] * x.s0);
      }
      pack(from, static_cast<int>(in_slab), dim, slab, sqnorm + s0);
    } else {
      pack_slab_scalar(x, src, in_slab, dim, slab, sqnorm + s0);
    }
    float inv[kSlab];
    for (int64_t r = 0; r < in_slab; ++r) {
      const float sq = sqnorm[s0 + r];
      // One test catches NaN, Inf and squares that overflow float32.
      if (!std::isfinite(sq)) return src[r];
      inv[r] = 1.0f / std::max(std::sqrt(sq), kNormEps);
    }
    if (metric == Metric::Cosine) {
      for (int64_t d = 0; d < dim; ++d) {
        for (int64_t r = 0; r < in_slab; ++r) slab[d * kSlab + r] *= inv[r];
      }
    }
  }
  return -1;
}

// Empties a tile's top-k lists before the kernel fills them: no entries, and
// thresholds that admit any key on the tile's `rows` and none on its padding.
void empty_lists(std::vector<int>& counts, std::vector<float>& thresholds, int64_t rows) {
  std::fill(counts.begin(), counts.end(), 0);
  std::fill(thresholds.begin(), thresholds.begin() + rows, NAN);
  std::fill(thresholds.begin() + rows, thresholds.end(), -INFINITY);
}

// Runs the fused top-k over all rows of `features` and hands each finished
// tile to consume(thread, row0, rows, keys[rows][k], indices[rows][k], sqnorm[rows]).
// run(job, row0) runs the micro-kernel on a packed tile (default: the top-k
// kernel; sample_scores' also sums squared keys).
template <typename Consume, typename Run>
void for_each_tile(const char* op, const at::Tensor& features, const Centroids& c,
                   Metric metric, int k, int workers, int64_t tile, Consume&& consume, Run&& run) {
  const int64_t n = features.size(0);
  const int64_t dim = features.size(1);
  const int64_t num_tiles = (n + tile - 1) / tile;
  const PackSlabFn pack = kernels().pack_slab;
  FirstBadRow bad;
  dispatch_float(features.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const Matrix<scalar_t> x(features);
#pragma omp parallel num_threads(workers)
    {
      const int thread = omp_get_thread_num();
      PackedTile packed(tile * dim);
      std::vector<float> keys(tile * k), thresholds(tile), sqnorm(tile);
      std::vector<int64_t> indices(tile * k);
      std::vector<int> counts(tile);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < num_tiles; ++t) {
        if (bad.any()) continue;
        const int64_t row0 = t * tile;
        const int64_t rows = std::min(tile, n - row0);
        const int64_t first_bad =
            pack_rows(x, row0, rows, dim, metric, pack, packed.data, sqnorm.data());
        if (first_bad >= 0) {
          bad.record(first_bad);
          continue;
        }
        empty_lists(counts, thresholds, rows);
        const TileJob job{packed.data, rows,        dim,            c.data,
                          c.ldc,       c.count,     c.bias.data(),  c.scale.data(),
                          k,           keys.data(), indices.data(), counts.data(),
                          thresholds.data()};
        run(job, row0);
        consume(thread, row0, rows, keys.data(), indices.data(), sqnorm.data());
      }
    }
  });
  if (bad.any()) fail_non_finite(op, "features", bad.row.load());
}

// The top-k kernel: the fp32 tile kernel, or the certified bf16 path
// (certified.h), whose results are the same bits.
template <typename Consume>
void for_each_tile(const char* op, const at::Tensor& features, const Centroids& c,
                   Metric metric, int k, int workers, Consume&& consume) {
  const Kernels& chosen = kernels();
  if (use_certified(chosen, c.count, k)) {
    const CertifiedCentroids cc =
        prepare_certified(chosen, c.data, c.ldc, c.count, c.dim, c.bias.data(), c.scale.data(), metric);
    // Far from the origin (features of mean 100, spread 3) the fp32 kernel's own rounding outweighs
    // the keys' gaps: the certificate proves no row, and the path costs 1.9x the fp32 kernel alone.
    // Unless the kernels are pinned, once kGuardRows rows have taken the path and most fell back,
    // the call's other tiles go to the fp32 kernel (the same bits either way).
    std::atomic<int64_t> tried{0}, failed{0};
    const bool guarded = !kernels_pinned();
    for_each_tile(op, features, c, metric, k, workers, certified_tile_rows(features.size(0), c.dim), consume,
                  [&](const TileJob& job, int64_t) {
                    if (guarded && tried.load() >= kGuardRows && 2 * failed.load() > tried.load()) {
                      return chosen.tile(job);
                    }
                    failed += certified_tile(chosen, cc, job);
                    tried += job.rows;
                  });
    return;
  }
  const TileFn kernel = chosen.tile;
  for_each_tile(op, features, c, metric, k, workers, tile_rows(c.dim), consume,
                [kernel](const TileJob& job, int64_t) { kernel(job); });
}

// Float64 sums over rows (the scores) in a fixed order: the rows are cut into
// groups that depend only on N and the width of a row's contribution, never on
// the thread count; each group adds its rows in order into its own partial, and
// the partials are added in group order. The same bits run to run and for any
// thread count (per-thread sums would depend on which thread took which rows,
// and the scores break ties between equal votes).
struct RowGroups {
  int64_t count, rows;  // groups, rows per group
};

RowGroups row_groups(int64_t n, int64_t width) {
  constexpr int64_t kPartialBytes = int64_t{32} << 20;  // memory for all partials
  constexpr int64_t kMaxGroups = 256;
  const int64_t by_memory = kPartialBytes / (8 * std::max<int64_t>(width, 1));
  const int64_t by_rows = (n + kLogitRowsPerTask - 1) / kLogitRowsPerTask;
  const int64_t count = std::max<int64_t>(1, std::min({by_memory, by_rows, kMaxGroups}));
  return {count, std::max<int64_t>(1, (n + count - 1) / count)};
}

// partial[g * width + j] summed over the groups g in order.
std::vector<double> sum_groups(const std::vector<double>& partial, const RowGroups& groups,
                               int64_t width) {
  std::vector<double> total(width, 0.0);
  for (int64_t g = 0; g < groups.count; ++g) {
    for (int64_t j = 0; j < width; ++j) total[j] += partial[g * width + j];
  }
  return total;
}

// Per-thread vote histograms: counts, or the fixed-point units of float
// votes (fastvote/topk.h, as the CUDA kernels). Integer sums: the votes do
// not depend on the thread count or on which thread took which rows.
at::Tensor merge_votes(const std::vector<uint64_t>& hist, int64_t num_classes, Weight weight) {
  std::vector<uint64_t> total(num_classes, 0);
  for (size_t i = 0; i < hist.size(); ++i) total[i % num_classes] += hist[i];
  if (weight == Weight::Count) {
    at::Tensor out = at::empty({num_classes}, at::TensorOptions().dtype(at::kLong));
    std::copy(total.begin(), total.end(), out.mutable_data_ptr<int64_t>());
    return out;
  }
  at::Tensor out = at::empty({num_classes}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  for (int64_t j = 0; j < num_classes; ++j) o[j] = fixed_to_double(total[j]);
  return out;
}

// The float votes of one row. Cloned for CPUs with FMA, where vote_exp's
// fmaf is one instruction rather than a libm call; fmaf is correctly rounded
// either way, so the votes do not depend on the clone.
__attribute__((target_clones("fma", "default"))) void add_weighted_votes(
    uint64_t* hist, const float* keys, const int64_t* indices, int k, Weight weight,
    float inv_temperature, float* scratch) {
  row_weights(keys, k, weight, inv_temperature, scratch);
  for (int i = 0; i < k; ++i) hist[indices[i]] += fixed_units(scratch[i]);
}

// sums[into[i]][d] += x[i][d] (subtract: -=) in float64 for the rows i = rows[0], rows[1], ... in
// that order and the columns [d0, d1): class_centroids' and move_rows' loop. Cloned for AVX-512 and
// AVX2 (without them the x86-64 baseline converts two floats an instruction: 4x slower), one
// rounding an element whatever the width: the same sums on every CPU. The next rows' columns are
// prefetched (in class order they lie anywhere in the batch).
__attribute__((target_clones("avx512f", "avx2", "default"))) void add_rows(
    double* sums, int64_t dim, const float* x, int64_t ld, const int64_t* rows, int64_t n,
    const int64_t* into, int64_t d0, int64_t d1, bool subtract) {
  constexpr int64_t kAhead = 2;
  for (int64_t t = 0; t < n; ++t) {
    if (t + kAhead < n) {
      const float* next = x + rows[t + kAhead] * ld;
      for (int64_t d = d0; d < d1; d += 16) __builtin_prefetch(next + d);
    }
    const int64_t i = rows[t];
    double* dst = sums + into[i] * dim;
    const float* row = x + i * ld;
    if (subtract) {
      for (int64_t d = d0; d < d1; ++d) dst[d] -= static_cast<double>(row[d]);
    } else {
      for (int64_t d = d0; d < d1; ++d) dst[d] += static_cast<double>(row[d]);
    }
  }
}

// Thread t's columns of D when `threads` threads split them (whole cache lines of floats).
std::pair<int64_t, int64_t> thread_columns(int64_t dim, int t, int threads) {
  const int64_t lines = (dim + 15) / 16;
  return {std::min(dim, lines * t / threads * 16), std::min(dim, lines * (t + 1) / threads * 16)};
}

// Adds one row's k picks (keys sorted best first) to a vote histogram.
void add_votes(uint64_t* hist, const float* keys, const int64_t* indices, int k, Weight weight,
               float inv_temperature, float* scratch) {
  if (weight == Weight::Count) {
    for (int i = 0; i < k; ++i) hist[indices[i]] += 1;
    return;
  }
  add_weighted_votes(hist, keys, indices, k, weight, inv_temperature, scratch);
}

at::Tensor fm_vote_impl(const at::Tensor& features, const Centroids& c, Metric metric, int k,
                        Weight weight, float inv_temperature) {
  const int64_t tiles = (features.size(0) + tile_rows(c.dim) - 1) / tile_rows(c.dim);
  const int workers = num_workers(tiles);
  std::vector<uint64_t> hist(static_cast<size_t>(workers) * c.count, 0);
  for_each_tile("fm_vote", features, c, metric, k, workers,
                [&](int thread, int64_t, int64_t rows, const float* keys, const int64_t* idx,
                    const float*) {
                  std::vector<float> scratch(k);
                  uint64_t* h = hist.data() + static_cast<size_t>(thread) * c.count;
                  for (int64_t r = 0; r < rows; ++r) {
                    add_votes(h, keys + r * k, idx + r * k, k, weight, inv_temperature,
                              scratch.data());
                  }
                });
  return merge_votes(hist, c.count, weight);
}

at::Tensor fm_vote_cpu(const at::Tensor& features, const at::Tensor& centroids, int64_t k,
                       c10::string_view metric_name, c10::string_view weight_name,
                       double temperature) {
  check_features_centroids("fm_vote", features, centroids);
  check_k("fm_vote", k, centroids.size(0), "centroids");
  const Metric metric = parse_metric("fm_vote", metric_name);
  const Weight weight = parse_weight("fm_vote", weight_name);
  const float inv_t = inverse_temperature("fm_vote", temperature);
  check_weighted_rows("fm_vote", features.size(0), weight);
  const Centroids c = prepare_centroids("fm_vote", centroids, metric);
  return fm_vote_impl(features, c, metric, static_cast<int>(k), weight, inv_t);
}

// nearest_centroids, exact (the top-k kernel) or, where approximate and the
// kernels have a bf16 pass, from that pass alone (approximate_tile).
std::tuple<at::Tensor, at::Tensor> nearest_impl(const char* op, const at::Tensor& features,
                                                const at::Tensor& centroids, int64_t k, Metric metric,
                                                bool approximate) {
  check_features_centroids(op, features, centroids);
  check_k(op, k, centroids.size(0), "centroids");
  const Centroids c = prepare_centroids(op, centroids, metric);
  const int64_t n = features.size(0);
  at::Tensor values = at::empty({n, k}, features.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({n, k}, features.options().dtype(at::kLong));
  float* v = values.mutable_data_ptr<float>();
  int64_t* ix = indices.mutable_data_ptr<int64_t>();
  const auto consume = [&](int, int64_t row0, int64_t rows, const float* keys, const int64_t* idx,
                           const float* sqnorm) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < k; ++i) {
        const float key = keys[r * k + i];
        // Keys omit ||x||^2 (l2) or are negated similarities (cosine).
        v[(row0 + r) * k + i] = metric == Metric::L2 ? std::max(key + sqnorm[r], 0.0f) : -key;
        ix[(row0 + r) * k + i] = idx[r * k + i];
      }
    }
  };
  const int64_t tiles = (n + tile_rows(c.dim) - 1) / tile_rows(c.dim);
  const Kernels& chosen = kernels();
  if (approximate && chosen.candidates != nullptr) {
    const CertifiedCentroids cc =
        prepare_certified(chosen, c.data, c.ldc, c.count, c.dim, c.bias.data(), c.scale.data(), metric);
    for_each_tile(op, features, c, metric, static_cast<int>(k), num_workers(tiles),
                  certified_tile_rows(n, c.dim), consume,
                  [&](const TileJob& job, int64_t) { approximate_tile(chosen, cc, job); });
  } else {
    for_each_tile(op, features, c, metric, static_cast<int>(k), num_workers(tiles), consume);
  }
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> nearest_centroids_cpu(const at::Tensor& features,
                                                         const at::Tensor& centroids, int64_t k,
                                                         c10::string_view metric_name) {
  return nearest_impl("nearest_centroids", features, centroids, k,
                      parse_metric("nearest_centroids", metric_name), false);
}

at::Tensor lm_vote_impl(const at::Tensor& logits, int k, Weight weight) {
  const int64_t n = logits.size(0);
  const int64_t num_classes = logits.size(1);
  const int64_t tasks = (n + kLogitRowsPerTask - 1) / kLogitRowsPerTask;
  const int workers = num_workers(tasks);
  std::vector<uint64_t> hist(static_cast<size_t>(workers) * num_classes, 0);
  FirstBadRow bad;
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const Matrix<scalar_t> x(logits);
#pragma omp parallel num_threads(workers)
    {
      uint64_t* h = hist.data() + static_cast<size_t>(omp_get_thread_num()) * num_classes;
      std::vector<float> keys(k), scratch(k), row(num_classes);
      std::vector<int64_t> idx(k);
      const bool direct = std::is_same_v<scalar_t, float> && logits.stride(1) == 1;
      const LogitsRowFn row_topk = kernels().logits_row;
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t end = std::min(n, (t + 1) * kLogitRowsPerTask);
        for (int64_t r = t * kLogitRowsPerTask; r < end && !bad.any(); ++r) {
          const float* v = row.data();
          if (direct) {
            v = reinterpret_cast<const float*>(x.data + r * x.s0);
          } else {
            for (int64_t j = 0; j < num_classes; ++j) row[j] = x(r, j);
          }
          if (!row_topk(v, num_classes, k, keys.data(), idx.data())) {
            bad.record(r);
            break;
          }
          add_votes(h, keys.data(), idx.data(), k, weight, 1.0f, scratch.data());
        }
      }
    }
  });
  if (bad.any()) fail_non_finite("lm_vote", "logits", bad.row.load());
  return merge_votes(hist, num_classes, weight);
}

at::Tensor lm_vote_cpu(const at::Tensor& logits, int64_t k, c10::string_view weight_name) {
  check_logits("lm_vote", logits);
  check_k("lm_vote", k, logits.size(1), "source classes, the logits' columns");
  const Weight weight = parse_weight("lm_vote", weight_name);
  check_weighted_rows("lm_vote", logits.size(0), weight);
  return lm_vote_impl(logits, static_cast<int>(k), weight);
}

at::Tensor lm_scores_cpu(const at::Tensor& logits) {
  check_logits("lm_scores", logits);
  const int64_t n = logits.size(0);
  const int64_t num_classes = logits.size(1);
  const RowGroups groups = row_groups(n, num_classes);
  std::vector<double> partial(static_cast<size_t>(groups.count) * num_classes, 0.0);
  FirstBadRow bad;
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const Matrix<scalar_t> x(logits);
#pragma omp parallel num_threads(num_workers(groups.count))
    {
      std::vector<float> row(num_classes);
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < groups.count; ++g) {
        double* h = partial.data() + static_cast<size_t>(g) * num_classes;
        const int64_t end = std::min(n, (g + 1) * groups.rows);
        for (int64_t r = g * groups.rows; r < end && !bad.any(); ++r) {
          float top = -INFINITY;
          bool finite = true;
          for (int64_t j = 0; j < num_classes; ++j) {
            row[j] = x(r, j);
            finite &= std::isfinite(row[j]);
            top = std::max(top, row[j]);
          }
          if (!finite) {
            bad.record(r);
            break;
          }
          double total = 0;
          for (int64_t j = 0; j < num_classes; ++j) {
            row[j] = std::exp(row[j] - top);
            total += row[j];
          }
          const double inv = 1.0 / total;
          for (int64_t j = 0; j < num_classes; ++j) h[j] += row[j] * inv;
        }
      }
    }
  });
  if (bad.any()) fail_non_finite("lm_scores", "logits", bad.row.load());
  const std::vector<double> total = sum_groups(partial, groups, num_classes);
  at::Tensor out = at::empty({num_classes}, at::TensorOptions().dtype(at::kDouble));
  std::copy(total.begin(), total.end(), out.mutable_data_ptr<double>());
  return n > 0 ? out.div_(static_cast<double>(n)) : out;
}

at::Tensor fm_scores_cpu(const at::Tensor& features, const at::Tensor& centroids,
                         c10::string_view metric_name) {
  check_features_centroids("fm_scores", features, centroids);
  const Metric metric = parse_metric("fm_scores", metric_name);
  const Centroids c = prepare_centroids("fm_scores", centroids, metric);
  const int64_t n = features.size(0);
  const int64_t dim = features.size(1);
  // Per row group: the sum of the rows (normalised for cosine), then sum ||x||^2.
  const RowGroups groups = row_groups(n, dim + 1);
  std::vector<double> partial(static_cast<size_t>(groups.count) * (dim + 1), 0.0);
  FirstBadRow bad;
  dispatch_float(features.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const Matrix<scalar_t> x(features);
#pragma omp parallel num_threads(num_workers(groups.count))
    {
      std::vector<float> row(dim);
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < groups.count; ++g) {
        double* s = partial.data() + static_cast<size_t>(g) * (dim + 1);
        const int64_t end = std::min(n, (g + 1) * groups.rows);
        for (int64_t r = g * groups.rows; r < end && !bad.any(); ++r) {
          float sq = 0;
          for (int64_t d = 0; d < dim; ++d) {
            row[d] = x(r, d);
            sq += row[d] * row[d];
          }
          if (!std::isfinite(sq)) {
            bad.record(r);
            break;
          }
          const float inv = metric == Metric::Cosine ? 1.0f / std::max(std::sqrt(sq), kNormEps) : 1.0f;
          for (int64_t d = 0; d < dim; ++d) s[d] += row[d] * inv;
          s[dim] += sq;
        }
      }
    }
  });
  if (bad.any()) fail_non_finite("fm_scores", "features", bad.row.load());
  std::vector<double> mean = sum_groups(partial, groups, dim + 1);
  at::Tensor out = at::zeros({c.count}, at::TensorOptions().dtype(at::kDouble));
  if (n == 0) return out;
  for (double& m : mean) m /= static_cast<double>(n);
  double* o = out.mutable_data_ptr<double>();
  for (int64_t j = 0; j < c.count; ++j) {
    const float* cj = c.data + j * c.ldc;
    double dot = 0;
    for (int64_t d = 0; d < dim; ++d) dot += cj[d] * mean[d];
    // Mean squared distance, or mean cosine similarity (scale = -1/||c||).
    o[j] = metric == Metric::L2 ? c.bias[j] - 2.0 * dot + mean[dim] : -c.scale[j] * dot;
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> class_centroids_cpu(const at::Tensor& features,
                                                       const at::Tensor& labels,
                                                       int64_t num_classes) {
  check_class_centroids(features, labels, num_classes);
  const int64_t n = features.size(0);
  const int64_t dim = features.size(1);
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  const int64_t* l = lab.const_data_ptr<int64_t>();
  at::Tensor counts = at::zeros({num_classes}, at::TensorOptions().dtype(at::kLong));
  int64_t* cnt = counts.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (l[i] < 0 || l[i] >= num_classes) fail_label(i, l[i], num_classes);
    ++cnt[l[i]];
  }
  at::Tensor sums = at::zeros({num_classes, dim}, at::TensorOptions().dtype(at::kDouble));
  double* s = sums.mutable_data_ptr<double>();
  // Each class adds its rows in row order (the bits), the rows taken in row order while the K x D
  // sums fit in cache, else in class order (a stable counting sort), so that a class's sums stay
  // in cache while its rows are added: at K = 10,000, D = 512 a 65,536-row batch took 61 ms in row
  // order, 40 ms in class order, where the seeding's small K read every row in 64-column pieces.
  std::vector<int64_t> order(n);
  if (num_classes * dim * static_cast<int64_t>(sizeof(double)) <= (1 << 20)) {
    for (int64_t i = 0; i < n; ++i) order[i] = i;
  } else {
    std::vector<int64_t> next(num_classes);
    for (int64_t j = 0, at = 0; j < num_classes; at += cnt[j], ++j) next[j] = at;
    for (int64_t i = 0; i < n; ++i) order[next[l[i]]++] = i;
  }
  // Threads own disjoint column ranges: no races, no per-thread K x D copies.
  const int threads = num_workers(n * dim >= (1 << 16) ? (dim + 15) / 16 : 1);
  FirstBadRow bad;
  dispatch_float(features.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const Matrix<scalar_t> x(features);
    // Summed without a test per value (a loop the compiler vectorises): float64 sums of finite
    // float32 values cannot overflow, so a non-finite sum means a NaN/Inf input, whose first row
    // a second, checking pass finds.
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; ++t) {
      const auto [d0, d1] = thread_columns(dim, t, threads);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (x.s1 == 1) {
          add_rows(s, dim, x.data, x.s0, order.data(), n, l, d0, d1, false);
          continue;
        }
      }
      for (const int64_t i : order) {
        double* dst = s + l[i] * dim;
        for (int64_t d = d0; d < d1; ++d) dst[d] += x(i, d);
      }
    }
    bool finite = true;
    for (int64_t j = 0; j < num_classes * dim; ++j) finite &= std::isfinite(s[j]);
    if (finite) return;
    for (int64_t i = 0; i < n && !bad.any(); ++i) {
      for (int64_t d = 0; d < dim; ++d) {
        if (!std::isfinite(x(i, d))) {
          bad.record(i);
          break;
        }
      }
    }
  });
  if (bad.any()) fail_non_finite("class_centroids", "features", bad.row.load());
  return {sums, counts};
}

// Each source row against every target row (cosine): its k most similar
// target rows (values descending, ties -> lower index) and its RMS similarity
// sqrt(mean_j cos(x, t_j)^2), in one pass over the features: the squared
// similarities are summed in the top-k kernel's epilogue (float64 across
// centroid blocks), so nothing of size N x M is ever stored.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_scores_cpu(const at::Tensor& features,
                                                                 const at::Tensor& targets,
                                                                 int64_t k) {
  check_features_targets("sample_scores", features, targets);
  check_k("sample_scores", k, targets.size(0), "target rows");
  const Centroids c = prepare_centroids("sample_scores", targets, Metric::Cosine, "targets");
  const int64_t n = features.size(0);
  at::Tensor values = at::empty({n, k}, features.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({n, k}, features.options().dtype(at::kLong));
  at::Tensor rms = at::zeros({n}, features.options().dtype(at::kDouble));
  float* v = values.mutable_data_ptr<float>();
  int64_t* ix = indices.mutable_data_ptr<int64_t>();
  double* sums = rms.mutable_data_ptr<double>();
  const double inv_m = 1.0 / static_cast<double>(c.count);
  const SquaresTileFn squares = kernels().tile_squares;
  const int64_t tiles = (n + tile_rows(c.dim) - 1) / tile_rows(c.dim);
  for_each_tile(
      "sample_scores", features, c, Metric::Cosine, static_cast<int>(k), num_workers(tiles), tile_rows(c.dim),
      [&](int, int64_t row0, int64_t rows, const float* keys, const int64_t* idx, const float*) {
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t i = 0; i < k; ++i) {
            v[(row0 + r) * k + i] = -keys[r * k + i];  // keys are negated similarities
            ix[(row0 + r) * k + i] = idx[r * k + i];
          }
          sums[row0 + r] = std::sqrt(sums[row0 + r] * inv_m);
        }
      },
      // Tiles own disjoint rows: each adds to its own slice of the output.
      [&](const TileJob& job, int64_t row0) { squares(job, sums + row0); });
  return {values, indices, rms};
}

// k-means' two-level passes (fastvote/cluster.py, _Groups): each row's k
// nearest among its own group's centroids only. One call for all groups of a
// batch: the tasks are (group, tile of its rows) pairs, so a pass over a
// hundred small groups costs their work, not a hundred calls' set-up. Rows
// are features[at_row[i]] (i < n), group g's [r[g], r[g + 1]) and its
// centroids [g0[g], g0[g + 1]) (checked by the callers), gathered while
// packing (no copy of the batch). emit(i, d2, idx): row i's k squared
// distances, ascending (inf / -1 where its group has fewer than k), and
// centroid indices.
template <class Emit>
void search_in_groups(const char* op, const at::Tensor& features, const int64_t* at_row, const int64_t* r,
                      const int64_t* g0, int64_t groups, const at::Tensor& centroids, int64_t k, Emit emit) {
  // Float32 rows as they lie go straight to the kernels' GroupFn (packing them cost more than
  // their distances to a few dozen centroids); others are packed for the tile kernel.
  const Kernels& chosen = kernels();
  const GroupFn direct =
      features.scalar_type() == at::kFloat && features.stride(1) == 1 ? chosen.group_rows : nullptr;
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (group, first row of the tile)
  const int64_t tile = direct != nullptr ? kGroupTileRows : tile_rows(features.size(1));
  int64_t largest = 0;  // centroids of the largest group
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t row0 = r[g]; row0 < r[g + 1]; row0 += tile) tasks.emplace_back(g, row0);
    largest = std::max(largest, g0[g + 1] - g0[g]);
  }
  const Centroids c = prepare_centroids(op, centroids, Metric::L2);
  const int64_t dim = features.size(1);
  FirstBadRow bad;
  dispatch_float(features.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const Matrix<scalar_t> x(features);
#pragma omp parallel num_threads(num_workers(static_cast<int64_t>(tasks.size())))
    {
      // the packed rows (tile kernel), or the packed centroids of the group last packed (GroupFn)
      const int64_t slabs = direct != nullptr ? (largest + kSlab - 1) / kSlab : (tile + kSlab - 1) / kSlab;
      PackedTile packed(slabs * kSlab * dim);
      int64_t packed_group = -1;
      std::vector<float> keys(tile * k), thresholds(tile), sqnorm(std::max<int64_t>(tile, kSlab));
      std::vector<int64_t> idx(tile * k);
      std::vector<int> counts(tile);
      std::vector<const float*> from(std::max<int64_t>(tile, kSlab));
      std::vector<float> d2(k);
      std::vector<int64_t> at(k);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < static_cast<int64_t>(tasks.size()); ++t) {
        if (bad.any()) continue;
        const auto [g, row0] = tasks[t];
        const int64_t rows = std::min(tile, r[g + 1] - row0);
        const int64_t lo = g0[g], count = g0[g + 1] - lo;
        const int kk = static_cast<int>(std::min<int64_t>(k, count));
        if (direct != nullptr) {
          if (packed_group != g) {  // (a thread's tasks of one group are often in a row)
            for (int64_t j0 = 0; j0 < count; j0 += kSlab) {
              const int in_slab = static_cast<int>(std::min<int64_t>(kSlab, count - j0));
              for (int j = 0; j < in_slab; ++j) from[j] = c.data + (lo + j0 + j) * c.ldc;
              chosen.pack_slab(from.data(), in_slab, dim, packed.data + j0 * dim, sqnorm.data());
            }
            packed_group = g;
          }
          for (int64_t i = 0; i < rows; ++i) {
            from[i] = reinterpret_cast<const float*>(x.data + at_row[row0 + i] * x.s0);
          }
          direct({from.data(), rows, dim, packed.data, count, c.bias.data() + lo, c.scale.data() + lo,
                  kk, keys.data(), idx.data(), counts.data(), sqnorm.data()});
          int64_t first_bad = kNoRow;  // one test catches NaN, Inf and squares that overflow float32
          for (int64_t i = 0; i < rows; ++i) {
            if (!std::isfinite(sqnorm[i])) first_bad = std::min(first_bad, at_row[row0 + i]);
          }
          if (first_bad != kNoRow) {
            bad.record(first_bad);
            continue;
          }
        } else {
          const int64_t first_bad =
              pack_rows(x, row0, rows, dim, Metric::L2, chosen.pack_slab, packed.data,
                        sqnorm.data(), RowAt{at_row});
          if (first_bad >= 0) {
            bad.record(first_bad);
            continue;
          }
          empty_lists(counts, thresholds, rows);
          const TileJob job{packed.data,        rows,        dim, c.data + lo * c.ldc,
                            c.ldc,              count,       c.bias.data() + lo,
                            c.scale.data() + lo, kk,         keys.data(), idx.data(),
                            counts.data(),      thresholds.data()};
          chosen.tile(job);
        }
        for (int64_t i = 0; i < rows; ++i) {
          for (int j = 0; j < k; ++j) {  // (slots past the group's size: inf / -1)
            d2[j] = j < kk ? std::max(keys[i * kk + j] + sqnorm[i], 0.0f) : INFINITY;
            at[j] = j < kk ? idx[i * kk + j] + lo : -1;
          }
          emit(row0 + i, d2.data(), at.data());
        }
      }
    }
  });
  if (bad.any()) fail_non_finite(op, "features", bad.row.load());
}

// nearest_in_groups' and update_in_groups' rows and groups, checked: n rows order[i], each in
// range, in G groups (row_starts r, G + 1 offsets from 0 to n) over the centroids (centroid_starts
// g0, from 0 to K), neither decreasing, every group with rows having centroids.
struct GroupedRows {
  at::Tensor order, row_starts, centroid_starts;  // (int64, contiguous: the pointers' owners)
  const int64_t* at_row;
  const int64_t* r;
  const int64_t* g0;
  int64_t n, groups;
};

GroupedRows grouped_rows(const char* op, const at::Tensor& features, const at::Tensor& order,
                         const at::Tensor& row_starts, const at::Tensor& centroids,
                         const at::Tensor& centroid_starts) {
  check_features_centroids(op, features, centroids);
  GroupedRows g;
  g.order = order.to(at::kLong).contiguous();
  g.row_starts = row_starts.to(at::kLong).contiguous();
  g.centroid_starts = centroid_starts.to(at::kLong).contiguous();
  g.at_row = g.order.const_data_ptr<int64_t>();
  g.r = g.row_starts.const_data_ptr<int64_t>();
  g.g0 = g.centroid_starts.const_data_ptr<int64_t>();
  g.n = g.order.numel();
  g.groups = g.row_starts.numel() - 1;
  TORCH_CHECK_VALUE(g.groups >= 1 && g.centroid_starts.numel() == g.row_starts.numel(), "fastvote.", op,
                    ": row_starts and centroid_starts must both hold groups + 1 >= 2 offsets; got ",
                    g.row_starts.numel(), " and ", g.centroid_starts.numel());
  for (int64_t i = 0; i < g.n; ++i) {
    TORCH_CHECK_INDEX(g.at_row[i] >= 0 && g.at_row[i] < features.size(0), "fastvote.", op, ": order[", i, "]=",
                      g.at_row[i], " is out of range; expected 0 <= order < ", features.size(0));
  }
  TORCH_CHECK_VALUE(g.r[0] == 0 && g.r[g.groups] == g.n && g.g0[0] == 0 && g.g0[g.groups] == centroids.size(0),
                    "fastvote.", op, ": the offsets must run from 0 to the rows (", g.n, ") and to the centroids (",
                    centroids.size(0), ")");
  for (int64_t k = 0; k < g.groups; ++k) {
    TORCH_CHECK_VALUE(g.r[k] <= g.r[k + 1] && g.g0[k] <= g.g0[k + 1], "fastvote.", op,
                      ": offsets must not decrease; group ", k, " does");
    TORCH_CHECK_VALUE(g.r[k] == g.r[k + 1] || g.g0[k] < g.g0[k + 1], "fastvote.", op, ": group ", k,
                      " has rows but no centroids");
  }
  return g;
}

std::tuple<at::Tensor, at::Tensor> nearest_in_groups_impl(const at::Tensor& features,
                                                          const at::Tensor& order,
                                                          const at::Tensor& row_starts,
                                                          const at::Tensor& centroids,
                                                          const at::Tensor& centroid_starts,
                                                          int64_t k) {
  constexpr const char* op = "nearest_in_groups";
  TORCH_CHECK_VALUE(k >= 1, "fastvote.", op, ": k=", k, " is invalid; expected >= 1");
  const GroupedRows g = grouped_rows(op, features, order, row_starts, centroids, centroid_starts);
  const int64_t n = g.n;
  at::Tensor values = at::empty({n, k}, features.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({n, k}, features.options().dtype(at::kLong));
  float* v = values.mutable_data_ptr<float>();
  int64_t* ix = indices.mutable_data_ptr<int64_t>();
  search_in_groups(op, features, g.at_row, g.r, g.g0, g.groups, centroids, k,
                   [&](int64_t i, const float* d2, const int64_t* idx) {
                     std::copy(d2, d2 + k, v + i * k);
                     std::copy(idx, idx + k, ix + i * k);
                   });
  return {values, indices};
}

// One batch of k-means' two-level passes (fastvote/cluster.py, _Groups.update), in place: the
// rows order[i] (sorted by group as in nearest_in_groups) whose bounds do not prove their
// centroid (upper > lower) take their group's nearest two: assigned = the nearest's index,
// upper = sqrt(d2_1 + slack), lower = sqrt(max(d2_2 - slack, 0)) (inf: a group of one centroid),
// float32 as torch computes them. Returns the distances computed (rows x their group's size).
// (The same work as nearest_in_groups and the indexing around it in torch, which took ~6 ms a
// 65,536-row batch.)
int64_t update_in_groups_impl(const at::Tensor& features, const at::Tensor& order, const at::Tensor& row_starts,
                              const at::Tensor& centroids, const at::Tensor& centroid_starts, at::Tensor& assigned,
                              at::Tensor& upper, at::Tensor& lower, const at::Tensor& slack) {
  constexpr const char* op = "update_in_groups";
  const GroupedRows g = grouped_rows(op, features, order, row_starts, centroids, centroid_starts);
  const int64_t rows = features.size(0);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&upper, &lower, &slack}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->scalar_type() == at::kFloat && t->size(0) == rows, "fastvote.", op,
                      ": upper, lower and slack must be float32 [B] tensors, B = ", rows);
  }
  TORCH_CHECK_VALUE(assigned.dim() == 1 && assigned.scalar_type() == at::kLong && assigned.size(0) == rows,
                    "fastvote.", op, ": assigned must be an int64 [B] tensor, B = ", rows);
  // (strided views of the fit's state: read and written through their strides)
  auto a = assigned.accessor<int64_t, 1>();
  auto up = upper.accessor<float, 1>();
  auto low = lower.accessor<float, 1>();
  const auto s = slack.accessor<float, 1>();
  // the rows to search, still sorted by group
  std::vector<int64_t> need, need_starts(g.groups + 1, 0);
  need.reserve(g.n);
  int64_t pairs = 0;
  for (int64_t k = 0; k < g.groups; ++k) {
    for (int64_t i = g.r[k]; i < g.r[k + 1]; ++i) {
      if (up[g.at_row[i]] > low[g.at_row[i]]) need.push_back(g.at_row[i]);
    }
    need_starts[k + 1] = static_cast<int64_t>(need.size());
    pairs += (need_starts[k + 1] - need_starts[k]) * (g.g0[k + 1] - g.g0[k]);
  }
  if (need.empty()) return 0;
  search_in_groups(op, features, need.data(), need_starts.data(), g.g0, g.groups, centroids, 2,
                   [&](int64_t i, const float* d2, const int64_t* idx) {
                     const int64_t row = need[i];
                     a[row] = idx[0];
                     up[row] = std::sqrt(d2[0] + s[row]);
                     low[row] = std::sqrt(std::max(d2[1] - s[row], 0.0f));
                   });
  return pairs;
}

// k-means' passes (fastvote/cluster.py, _move_rows): the rows i whose cluster changed from
// before[i] to after[i] move between the float64 per-cluster sums [K, D] and counts [K], in place:
// every such row added to its new cluster's sums, then subtracted from its old (none where
// before[i] is -1: the first pass), each cluster's rows in row order. The bits of two
// index_put_(accumulate=True) calls in row order (torch's serial CPU loop), without the [M, D]
// float64 copy of the moved rows they need (at K = 10,000 that copy, its page faults and the two
// calls took ~20 ms a batch; in the first pass, a 65,536-row batch's class_centroids and its
// addition to the sums took 37 ms, this 15 ms).
void move_rows_impl(at::Tensor& sums, at::Tensor& counts, const at::Tensor& features,
                    const at::Tensor& before, const at::Tensor& after) {
  constexpr const char* op = "fastvote.move_rows";
  TORCH_CHECK_VALUE(sums.dim() == 2 && sums.scalar_type() == at::kDouble && sums.is_contiguous(), op,
                    ": sums must be a contiguous float64 [K, D] tensor");
  const int64_t num_clusters = sums.size(0), dim = sums.size(1);
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.scalar_type() == at::kDouble && counts.is_contiguous() &&
                        counts.size(0) == num_clusters,
                    op, ": counts must be a contiguous float64 [K] tensor, K = ", num_clusters);
  TORCH_CHECK_VALUE(features.dim() == 2 && features.scalar_type() == at::kFloat && features.size(1) == dim, op,
                    ": features must be a float32 [B, D] tensor, D = ", dim);
  const int64_t n = features.size(0);
  TORCH_CHECK_VALUE(before.dim() == 1 && after.dim() == 1 && before.size(0) == n && after.size(0) == n, op,
                    ": before and after must be [B] tensors, B = ", n);
  const at::Tensor from_t = before.to(at::kLong).contiguous(), to_t = after.to(at::kLong).contiguous();
  const int64_t* from = from_t.const_data_ptr<int64_t>();
  const int64_t* to = to_t.const_data_ptr<int64_t>();
  // The moved rows by new cluster and by old (stable counting sorts: row order within a cluster).
  std::vector<int64_t> next_to(num_clusters + 1, 0), next_from(num_clusters + 1, 0);
  int64_t moved = 0, left = 0;  // rows that joined a cluster; of them, rows that left one
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(to[i] >= 0 && to[i] < num_clusters, op, ": row ", i, " names cluster ", to[i],
                      " after; expected 0 <= cluster < ", num_clusters);
    TORCH_CHECK_INDEX(from[i] >= -1 && from[i] < num_clusters, op, ": row ", i, " names cluster ",
                      from[i], " before; expected -1 (none) <= cluster < ", num_clusters);
    if (from[i] != to[i]) {
      ++next_to[to[i] + 1];
      ++moved;
      if (from[i] >= 0) {
        ++next_from[from[i] + 1];
        ++left;
      }
    }
  }
  for (int64_t j = 0; j < num_clusters; ++j) {
    next_to[j + 1] += next_to[j];
    next_from[j + 1] += next_from[j];
  }
  std::vector<int64_t> by_to(moved), by_from(left);
  for (int64_t i = 0; i < n; ++i) {
    if (from[i] != to[i]) {
      by_to[next_to[to[i]]++] = i;
      if (from[i] >= 0) by_from[next_from[from[i]]++] = i;
    }
  }
  double* s = sums.mutable_data_ptr<double>();
  double* c = counts.mutable_data_ptr<double>();
  for (const int64_t i : by_to) c[to[i]] += 1.0;
  for (const int64_t i : by_from) c[from[i]] -= 1.0;
  const at::Tensor rows = features.stride(1) == 1 ? features : features.contiguous();
  const int threads = num_workers(moved * dim >= (1 << 16) ? (dim + 15) / 16 : 1);
  // Threads own disjoint column ranges (as class_centroids): each element's sum keeps its order.
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int t = 0; t < threads; ++t) {
    const auto [d0, d1] = thread_columns(dim, t, threads);
    add_rows(s, dim, rows.const_data_ptr<float>(), rows.stride(0), by_to.data(), moved, to, d0, d1, false);
    add_rows(s, dim, rows.const_data_ptr<float>(), rows.stride(0), by_from.data(), left, from, d0, d1, true);
  }
}

// The end of a k-means pass (fastvote/cluster.py, fit): each cluster's new centroid from its float64
// sums and count, the float32 mean (cosine: the unit-normalised mean) or, for an empty cluster, its
// old centroid; and how far each moved (drift [K] float32), never less than the exact distance: the
// float64 sum of the D squared differences and its root are within (D + 3) 2^-53 of it (Higham,
// ch. 3; no square under- or overflows float64), then rounded up to float32. One pass over the
// K x D values (at K = 10,000, D = 512 torch's division, cast and drift took ~20 ms a pass).
std::tuple<at::Tensor, at::Tensor> lloyd_means_impl(const at::Tensor& sums, const at::Tensor& counts,
                                                    const at::Tensor& centroids, bool normalize) {
  constexpr const char* op = "fastvote.lloyd_means";
  TORCH_CHECK_VALUE(sums.dim() == 2 && sums.scalar_type() == at::kDouble, op, ": sums must be a float64 [K, D] tensor");
  const int64_t num_clusters = sums.size(0), dim = sums.size(1);
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.scalar_type() == at::kDouble && counts.size(0) == num_clusters,
                    op, ": counts must be a float64 [K] tensor, K = ", num_clusters);
  TORCH_CHECK_VALUE(centroids.dim() == 2 && centroids.scalar_type() == at::kFloat && centroids.size(0) == num_clusters &&
                        centroids.size(1) == dim,
                    op, ": centroids must be a float32 [K, D] tensor, K = ", num_clusters, ", D = ", dim);
  const at::Tensor s_t = sums.contiguous(), n_t = counts.contiguous(), old_t = centroids.contiguous();
  at::Tensor updated = at::empty({num_clusters, dim}, centroids.options());
  at::Tensor drift = at::empty({num_clusters}, centroids.options());
  const double* s = s_t.const_data_ptr<double>();
  const double* n = n_t.const_data_ptr<double>();
  const float* old = old_t.const_data_ptr<float>();
  float* u = updated.mutable_data_ptr<float>();
  float* moved = drift.mutable_data_ptr<float>();
  const double loosen = 1.0 + (dim + 3) * std::ldexp(1.0, -53);
#pragma omp parallel for num_threads(num_workers(num_clusters * dim >= (1 << 16) ? num_clusters : 1)) schedule(static)
  for (int64_t j = 0; j < num_clusters; ++j) {
    const double* sum = s + j * dim;
    const float* was = old + j * dim;
    float* now = u + j * dim;
    if (n[j] > 0) {
      double norm = 1.0;
      if (normalize) {  // (torch's normalize: the mean over max(its norm, 1e-12))
        double sq = 0;
        for (int64_t d = 0; d < dim; ++d) sq += (sum[d] / n[j]) * (sum[d] / n[j]);
        norm = std::max(std::sqrt(sq), 1e-12);
      }
      for (int64_t d = 0; d < dim; ++d) {
        now[d] = static_cast<float>(normalize ? sum[d] / n[j] / norm : sum[d] / n[j]);
      }
    } else {
      std::copy(was, was + dim, now);
    }
    double sq = 0;
    for (int64_t d = 0; d < dim; ++d) {
      const double diff = static_cast<double>(now[d]) - static_cast<double>(was[d]);
      sq += diff * diff;
    }
    const double bound = std::sqrt(sq) * loosen;
    float f = static_cast<float>(bound);
    if (static_cast<double>(f) < bound) f = std::nextafter(f, INFINITY);
    moved[j] = f;
  }
  return {updated, drift};
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor> nearest_centroids_bf16(const at::Tensor& features,
                                                          const at::Tensor& centroids, int64_t k) {
  return cpu::nearest_impl("nearest_centroids_bf16", features, centroids, k, Metric::L2, true);
}

std::tuple<at::Tensor, at::Tensor> nearest_in_groups(const at::Tensor& features,
                                                     const at::Tensor& order,
                                                     const at::Tensor& row_starts,
                                                     const at::Tensor& centroids,
                                                     const at::Tensor& centroid_starts, int64_t k) {
  return cpu::nearest_in_groups_impl(features, order, row_starts, centroids, centroid_starts, k);
}

int64_t update_in_groups(const at::Tensor& features, const at::Tensor& order, const at::Tensor& row_starts,
                         const at::Tensor& centroids, const at::Tensor& centroid_starts, at::Tensor& assigned,
                         at::Tensor& upper, at::Tensor& lower, const at::Tensor& slack) {
  return cpu::update_in_groups_impl(features, order, row_starts, centroids, centroid_starts, assigned, upper, lower,
                                    slack);
}

void move_rows(at::Tensor& sums, at::Tensor& counts, const at::Tensor& features, const at::Tensor& before,
               const at::Tensor& after) {
  cpu::move_rows_impl(sums, counts, features, before, after);
}

std::tuple<at::Tensor, at::Tensor> lloyd_means(const at::Tensor& sums, const at::Tensor& counts,
                                               const at::Tensor& centroids, bool normalize) {
  return cpu::lloyd_means_impl(sums, counts, centroids, normalize);
}

TORCH_LIBRARY_IMPL(fastvote, CPU, m) {
  m.impl("lm_vote", &cpu::lm_vote_cpu);
  m.impl("fm_vote", &cpu::fm_vote_cpu);
  m.impl("nearest_centroids", &cpu::nearest_centroids_cpu);
  m.impl("class_centroids", &cpu::class_centroids_cpu);
  m.impl("lm_scores", &cpu::lm_scores_cpu);
  m.impl("fm_scores", &cpu::fm_scores_cpu);
  m.impl("sample_scores", &cpu::sample_scores_cpu);
}

}  // namespace fastvote
