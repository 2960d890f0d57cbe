// Certified bf16 candidates, exact fp32 answers: the top-k of the fp32 tile
// kernel, bit for bit, from a bf16 candidate pass (VDPBF16PS, or its
// emulation) that keeps each row's best k + m approximate keys, an exact
// re-rank of those with the fp32 kernel's own arithmetic, and a rigorous bound
// on the bf16 pass's error that proves no other centroid can enter the row's
// top-k (fastvote/certify.h, shared with the CUDA path). Rows it cannot
// prove are scored again by the fp32 kernel.
#pragma once

#include <cstdint>
#include <vector>

#include "fastvote/certify.h"
#include "fastvote/topk.h"
#include "tile_kernel.h"

namespace fastvote {
namespace cpu {

// Per op: the centroids as the bf16 pass reads them, and the bound's
// per-centroid terms, maximised over the centroids (fastvote/certify.h).
struct CertifiedCentroids {
  int64_t count = 0, dim = 0, pairs = 0;
  CandidateShape shape;  // of the pass they are packed for
  int64_t stride = 0;    // pairs padded to shape.pair_block
  std::vector<uint32_t> packed;   // [count padded to shape.centroid_block][stride] bf16 pairs of w_j - nu
  std::vector<float> bias, ones;  // beta_j rounded to float, and scale 1
  std::vector<float> mu, nu;      // the row and centroid centres [dim]
  certify::CentroidTerms terms{};  // terms.finite 0: every row goes to the fp32 kernel
};

// True when the kernels have a bf16 pass and there are centroids left
// outside the candidates (otherwise the fp32 kernel alone is the answer),
// and, unless FASTVOTE_CPU_KERNEL pins the kernels, when the path pays: from
// the pass's candidate_shape.pays_from centroids on. Each row costs the path
// a fixed part (packing, the exact re-rank of its first k + 3 candidates),
// and the pass saves a share of each centroid's work: `amxbf16`'s pass beat
// the fp32 kernel from ~400 centroids (nearest_centroids, D = 128 and 512,
// k = 1-8: 1.10-1.74x at 500, RESULTS.md). The VDPBF16PS pass keeps 800, the
// AMX pass's threshold before its re-rank went 32 rows at a time (0.74x at
// 512 then): its own crossover waits for a CPU that chooses it (Zen 4/5).
bool use_certified(const Kernels& kernels, int64_t num_centroids, int k);

// centroids/bias/scale as the fp32 kernel reads them (key = bias + scale * x.c),
// packed for kernels.candidates.
CertifiedCentroids prepare_certified(const Kernels& kernels, const float* centroids, int64_t ldc,
                                     int64_t count, int64_t dim, const float* bias,
                                     const float* scale, Metric metric);

// The fp32 tile kernel's job (packed fp32 rows, k, outputs), answered through
// the certified path: job's keys, indices and counts are those kernels.tile
// would write. Returns how many of its rows the fp32 kernel scored again.
int64_t certified_tile(const Kernels& kernels, const CertifiedCentroids& cc, const TileJob& job);

// The bf16 pass alone, for callers that want a near-nearest centroid rather
// than the nearest (k-means' coarse groups): job's keys and indices are each
// row's best job.k approximate keys (the fp32 key to within the pass's error,
// certify.h), with no re-rank and no certificate. Needs job.k <= cc.count.
void approximate_tile(const Kernels& kernels, const CertifiedCentroids& cc, const TileJob& job);

// Rows through the certified path since the process started, and how many of
// them the certificate sent back to the fp32 kernel (thread-safe counters).
struct CertifiedStats {
  int64_t rows, fallback_rows;
};
CertifiedStats certified_stats();

}  // namespace cpu
}  // namespace fastvote
