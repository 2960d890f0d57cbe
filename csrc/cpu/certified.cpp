// The certified bf16 path (certified.h): packing for the bf16 pass, the
// exact re-rank and the fallback. The bound, and its derivation, are in
// fastvote/certify.h (shared with the CUDA path); this pass's accumulation is
// a VDPBF16PS chain of 2 * pairs fp32 FMAs (certify::fma_chain_error).
#include "certified.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "bf16.h"

namespace fastvote {
namespace cpu {
namespace {

std::atomic<int64_t> g_rows{0}, g_fallback_rows{0};

// The re-rank's first batch: the k best approximate keys and this many more.
// On Gaussian rows (D = 512, k = 5) 3 more prove most rows (certify.h).
constexpr int kFirstBatchExtra = 3;

// certify::norm_bound for a float sum of n squares (1 or 2 roundings each,
// whether or not the compiler fuses them; gradual underflow loses <= 2^-150 each).
double norm_bound_f32(float sum, int64_t n) {
  const double terms = 2.0 * static_cast<double>(n);
  return std::sqrt((sum + terms * 0x1p-150) * (1 + 2 * certify::gamma(terms))) * (1 + 0x1p-50);
}

// Per row of a slab: what packing learnt about it (float sums, pack_bf16_slab).
struct RowSums {
  float bf16_sq[kSlab], err_sq[kSlab], sq[kSlab], dot_nu[kSlab];
};

// One slab of the fp32 tile -> bf16 pairs of y - mu, and each row's sums of
// y^^2, (fl(y - mu) - y^)^2 (exact differences: y^ is within a factor 2 of
// its source, or 0), y^2 and y.nu, each a lane's sum over d in order. Lanes
// (rows) innermost and the sums in locals, so it vectorises (with them in
// `sums` and a branch for an odd D's last feature it ran scalar: 12% of the
// path at K = 1,000); cloned per ISA: only the speed differs, the bf16 bits
// cannot, and the bound allows for any rounding of the sums.
__attribute__((target_clones("avx512f", "avx2", "default"))) void pack_bf16_slab(
    const float* __restrict slab, int64_t dim, const float* __restrict mu, const float* __restrict nu,
    uint32_t* __restrict out, RowSums& sums) {
  float bf16_sq[kSlab] = {}, err_sq[kSlab] = {}, sq[kSlab] = {}, dot_nu[kSlab] = {};
  // Feature d of every lane: its bf16 bits, and the sums.
  const auto feature = [&](int64_t d, int lane) -> uint32_t {
    const float y = slab[d * kSlab + lane];
    const float t = y - mu[d];
    const uint32_t bits = bf16_bits(t);
    const float hat = bf16_low(bits);
    const float err = t - hat;
    bf16_sq[lane] += hat * hat;
    err_sq[lane] += err * err;
    sq[lane] += y * y;
    dot_nu[lane] += y * nu[d];
    return bits;
  };
  const int64_t whole = dim / 2;
  for (int64_t p = 0; p < whole; ++p) {
    for (int lane = 0; lane < kSlab; ++lane) {
      const uint32_t low = feature(2 * p, lane);
      out[p * kSlab + lane] = low | (feature(2 * p + 1, lane) << 16);
    }
  }
  if (dim % 2) {  // an odd D's last pair: its high half bf16 zero
    for (int lane = 0; lane < kSlab; ++lane) out[whole * kSlab + lane] = feature(dim - 1, lane);
  }
  std::copy(bf16_sq, bf16_sq + kSlab, sums.bf16_sq);
  std::copy(err_sq, err_sq + kSlab, sums.err_sq);
  std::copy(sq, sq + kSlab, sums.sq);
  std::copy(dot_nu, dot_nu + kSlab, sums.dot_nu);
}

// A row's terms of the bound, from its float sums.
certify::RowTerms row_terms(const CertifiedCentroids& cc, const RowSums& sums, int lane) {
  const int64_t n = cc.dim;
  return certify::row_terms(cc.terms, norm_bound_f32(sums.bf16_sq[lane], n),
                            norm_bound_f32(sums.err_sq[lane], n), norm_bound_f32(sums.sq[lane], n),
                            static_cast<double>(sums.dot_nu[lane]), n);
}

// One centroid: its bf16 pairs of w_j - nu (into out) and its terms of the
// bound, beta^_j among them.
certify::CentroidBound pack_centroid(const CertifiedCentroids& cc, const float* c, float bias,
                                     float scale, uint32_t* out) {
  const int64_t dim = cc.dim;
  double hat_sq = 0, err_sq = 0, c_sq = 0, beta = bias, beta_abs = std::fabs(bias);
  for (int64_t d = 0; d < dim; ++d) {
    const double w = static_cast<double>(scale) * c[d];  // exact: 24 x 24 bits
    const double t = w - cc.nu[d];
    const uint32_t bits = bf16_bits(static_cast<float>(t));
    const double err = t - bf16_low(bits);  // exact: t and its bf16 are within a factor 2 (or it is 0)
    out[d / 2] |= bits << (16 * (d % 2));
    hat_sq += static_cast<double>(bf16_low(bits)) * bf16_low(bits);
    err_sq += err * err;
    c_sq += static_cast<double>(c[d]) * c[d];
    beta += cc.mu[d] * w;
    beta_abs += std::fabs(cc.mu[d] * w);
  }
  return certify::centroid_bound(hat_sq, err_sq, c_sq, beta, beta_abs, dim);
}

int64_t round_up(int64_t n, int64_t block) { return (n + block - 1) / block * block; }

// job's fp32 tile as the bf16 pass reads it: [slab][pair][lane] pairs of y - mu (pairs past a row's
// zero); each row r's sums go to row(r, sums, lane) as its slab is packed.
template <class Row>
std::vector<uint32_t> pack_bf16_rows(const CertifiedCentroids& cc, const TileJob& job, Row&& row) {
  const int64_t slabs = (job.rows + kSlab - 1) / kSlab, pairs = cc.stride;
  std::vector<uint32_t> packed(slabs * pairs * kSlab, 0u);
  const Mxcsr ieee(0);
  RowSums sums;
  for (int64_t s = 0; s < slabs; ++s) {
    pack_bf16_slab(job.packed + s * job.dim * kSlab, job.dim, cc.mu.data(), cc.nu.data(),
                   packed.data() + s * pairs * kSlab, sums);
    for (int lane = 0; lane < kSlab && s * kSlab + lane < job.rows; ++lane) row(s * kSlab + lane, sums, lane);
  }
  return packed;
}

// The rows `which` of job scored again by the fp32 kernel, packed into their own tile.
void rescore(const Kernels& kernels, const TileJob& job, const std::vector<int64_t>& which) {
  if (which.empty()) return;
  const int64_t n = static_cast<int64_t>(which.size()), dim = job.dim;
  const int k = job.k;
  const int64_t slabs = (n + kSlab - 1) / kSlab;
  std::vector<float> packed(slabs * dim * kSlab, 0.0f), keys(n * k), thresholds(slabs * kSlab, -INFINITY);
  std::fill(thresholds.begin(), thresholds.begin() + n, NAN);
  std::vector<int64_t> idx(n * k);
  std::vector<int> counts(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = which[i];
    const float* src = job.packed + (r / kSlab) * dim * kSlab + r % kSlab;
    float* dst = packed.data() + (i / kSlab) * dim * kSlab + i % kSlab;
    for (int64_t d = 0; d < dim; ++d) dst[d * kSlab] = src[d * kSlab];
  }
  const TileJob again{packed.data(), n,           dim,         job.centroids, job.ldc,
                      job.num_centroids, job.bias, job.scale,  k,             keys.data(),
                      idx.data(),    counts.data(), thresholds.data()};
  kernels.tile(again);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = which[i];
    std::copy_n(keys.begin() + i * k, k, job.keys + r * k);
    std::copy_n(idx.begin() + i * k, k, job.indices + r * k);
    job.counts[r] = counts[i];
  }
}

}  // namespace

bool use_certified(const Kernels& kernels, int64_t num_centroids, int k) {
  return kernels.candidates != nullptr && num_centroids > k + certify::kExtraCandidates &&
         (num_centroids >= kernels.candidate_shape.pays_from || kernels_pinned());
}

CertifiedCentroids prepare_certified(const Kernels& kernels, const float* centroids, int64_t ldc,
                                     int64_t count, int64_t dim, const float* bias,
                                     const float* scale, Metric metric) {
  const Mxcsr ieee(0);  // gradual underflow, as the bound assumes
  CertifiedCentroids cc;
  cc.count = count;
  cc.dim = dim;
  cc.pairs = (dim + 1) / 2;
  cc.shape = kernels.candidate_shape;
  cc.stride = round_up(cc.pairs, cc.shape.pair_block);
  cc.packed.assign(round_up(count, cc.shape.centroid_block) * cc.stride, 0u);
  cc.bias.resize(count);
  cc.ones.assign(count, 1.0f);
  cc.mu.resize(dim);
  cc.nu.resize(dim);

  std::vector<double> mean(dim, 0.0);
  for (int64_t j = 0; j < count; ++j) {
    for (int64_t d = 0; d < dim; ++d) mean[d] += static_cast<double>(scale[j]) * centroids[j * ldc + d];
  }
  const double row_sign = metric == Metric::L2 ? -0.5 : -1.0;
  double mu_nu = 0, mu_nu_abs = 0, nu_sq = 0;
  for (int64_t d = 0; d < dim; ++d) {
    cc.nu[d] = static_cast<float>(mean[d] / static_cast<double>(count));
    cc.mu[d] = static_cast<float>(row_sign * mean[d] / static_cast<double>(count));
    mu_nu += static_cast<double>(cc.mu[d]) * cc.nu[d];
    mu_nu_abs += std::fabs(static_cast<double>(cc.mu[d]) * cc.nu[d]);
    nu_sq += static_cast<double>(cc.nu[d]) * cc.nu[d];
  }
  certify::CentroidTerms& terms = cc.terms;
  terms.mu_nu = mu_nu;
  terms.mu_nu_err = static_cast<double>(dim + 2) * 0x1p-52 * mu_nu_abs;
  terms.nu_norm = certify::norm_bound(nu_sq, dim);

  double w_norm = 0, w_err = 0, beta_err = 0, beta_max = 0, w_exact = 0, c_norm = 0, scale_max = 0,
         bias_max = 0;
  bool finite = true;
#pragma omp parallel reduction(max : w_norm, w_err, beta_err, beta_max, w_exact, c_norm, \
                                   scale_max, bias_max) reduction(&& : finite)
  {
    const Mxcsr worker_ieee(0);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < count; ++j) {
      const certify::CentroidBound b = pack_centroid(cc, centroids + j * ldc, bias[j], scale[j],
                                                     cc.packed.data() + j * cc.stride);
      cc.bias[j] = b.beta_hat;
      finite = finite && std::isfinite(b.hat) && std::isfinite(b.err) && std::isfinite(b.beta_err) &&
               std::isfinite(b.beta_abs);
      w_norm = std::max(w_norm, b.hat);
      w_err = std::max(w_err, b.err);
      beta_err = std::max(beta_err, b.beta_err);
      beta_max = std::max(beta_max, b.beta_abs);
      w_exact = std::max(w_exact, std::fabs(static_cast<double>(scale[j])) * b.c_len);
      c_norm = std::max(c_norm, b.c_len);
      scale_max = std::max(scale_max, static_cast<double>(std::fabs(scale[j])));
      bias_max = std::max(bias_max, static_cast<double>(std::fabs(bias[j])));
    }
  }
  terms.w_norm = w_norm;
  terms.w_err = w_err;
  terms.beta_err = beta_err;
  terms.beta_max = beta_max;
  terms.w_exact = w_exact;
  terms.c_norm = c_norm;
  terms.scale_max = scale_max;
  terms.bias_max = bias_max;
  terms.finite = finite && std::isfinite(terms.nu_norm) && std::isfinite(terms.mu_nu);
  return cc;
}

int64_t certified_tile(const Kernels& kernels, const CertifiedCentroids& cc, const TileJob& job) {
  const int64_t rows = job.rows, dim = job.dim, pairs = cc.stride;
  const int k = job.k;
  const int kc = k + certify::kExtraCandidates;  // candidates
  const int kl = kc + 1;                // ... and the best approximate key outside them
  const int64_t slabs = (rows + kSlab - 1) / kSlab;

  std::vector<certify::RowTerms> bounds(rows);
  const std::vector<uint32_t> packed = pack_bf16_rows(cc, job, [&](int64_t r, const RowSums& sums, int lane) {
    bounds[r] = row_terms(cc, sums, lane);
  });

  std::vector<float> approx(rows * kl), thresholds(slabs * kSlab, -INFINITY);
  std::fill(thresholds.begin(), thresholds.begin() + rows, NAN);
  std::vector<int64_t> approx_idx(rows * kl);
  std::vector<int> approx_counts(rows, 0);
  const Bf16TileJob pass{packed.data(), rows,          pairs,           cc.packed.data(),
                         pairs,         cc.count,      cc.bias.data(),  cc.ones.data(),
                         kl,            approx.data(), approx_idx.data(), approx_counts.data(),
                         thresholds.data()};
  kernels.candidates(pass);
  const certify::PassError pass_error =
      cc.shape.products_per_step == 0
          ? certify::fma_chain_error(2 * pairs)
          : certify::tensor_core_error(2 * pairs / cc.shape.products_per_step, cc.shape.products_per_step);

  // Exact re-rank of the candidates in two batches, the best approximate
  // keys first: most rows are proven after the first, with the next
  // candidate's approximate key as A_out (every centroid not re-ranked has an
  // approximate key at least that: the list is sorted). A slab's (row, m-th
  // candidate) pairs go kSlab at a time (topk_insert's tie rule is explicit,
  // so the order of insertion does not matter).
  const int first = std::min(kc, k + kFirstBatchExtra);
  std::vector<int64_t> fallback;
  int lane_row[kSlab];
  int64_t lane_idx[kSlab];
  float lane_keys[kSlab];
  for (int64_t r0 = 0; r0 < rows; r0 += kSlab) {
    const int lanes = static_cast<int>(std::min<int64_t>(kSlab, rows - r0));
    const float* slab = job.packed + r0 * dim;
    bool open[kSlab] = {};  // rows still to prove (a list the pass could not fill falls back)
    for (int l = 0; l < lanes; ++l) {
      job.counts[r0 + l] = 0;
      open[l] = approx_counts[r0 + l] == kl;
    }
    for (int begin = 0; begin < kc;) {
      const int end = begin == 0 ? first : kc;
      int used = 0;
      const auto flush = [&]() {
        for (int l = used; l < kSlab; ++l) lane_row[l] = 0, lane_idx[l] = -1;
        kernels.exact_keys(slab, dim, job.centroids, job.ldc, job.bias, job.scale, lane_row, lane_idx, lane_keys);
        for (int l = 0; l < used; ++l) {
          const int64_t r = r0 + lane_row[l];
          job.counts[r] = topk_insert(job.keys + r * k, job.indices + r * k, job.counts[r], k, lane_keys[l], lane_idx[l]);
        }
        used = 0;
      };
      for (int m = begin; m < end; ++m) {
        for (int l = 0; l < lanes; ++l) {
          if (!open[l]) continue;
          lane_row[used] = l;
          lane_idx[used++] = approx_idx[(r0 + l) * kl + m];
          if (used == kSlab) flush();
        }
      }
      if (used > 0) flush();
      for (int l = 0; l < lanes; ++l) {
        const int64_t r = r0 + l;
        open[l] = open[l] && !(job.counts[r] == k && certify::certify(cc.terms, dim, pass_error, bounds[r],
                                                                      approx[r * kl + end], job.keys[r * k + k - 1]));
      }
      begin = end;
    }
    for (int l = 0; l < lanes; ++l) {
      if (open[l] || approx_counts[r0 + l] != kl) fallback.push_back(r0 + l);
    }
  }

  g_rows += rows;
  g_fallback_rows += static_cast<int64_t>(fallback.size());
  rescore(kernels, job, fallback);
  return static_cast<int64_t>(fallback.size());
}

void approximate_tile(const Kernels& kernels, const CertifiedCentroids& cc, const TileJob& job) {
  const int64_t rows = job.rows, pairs = cc.stride;
  std::vector<float> rho(rows);
  const std::vector<uint32_t> packed = pack_bf16_rows(cc, job, [&](int64_t r, const RowSums& sums, int lane) {
    rho[r] = static_cast<float>(sums.dot_nu[lane] - cc.terms.mu_nu);
  });
  const Bf16TileJob pass{packed.data(), rows,      pairs,       cc.packed.data(), pairs,
                         cc.count,      cc.bias.data(), cc.ones.data(), job.k, job.keys,
                         job.indices,   job.counts, job.thresholds};
  kernels.candidates(pass);
  // The pass's keys leave out rho(y), the row's own term of the key (certify.h's centring). A row
  // whose bf16 sums overflowed (norms near float's range: the fp32 kernel's own check allows up to
  // ~1.8e19) has keys that are not finite, or too few: the fp32 kernel scores it.
  std::vector<int64_t> overflowed;
  for (int64_t r = 0; r < rows; ++r) {
    bool finite = job.counts[r] == job.k;
    for (int i = 0; i < job.counts[r]; ++i) {
      job.keys[r * job.k + i] += rho[r];
      finite = finite && std::isfinite(job.keys[r * job.k + i]);
    }
    if (!finite) overflowed.push_back(r);
  }
  rescore(kernels, job, overflowed);
}

CertifiedStats certified_stats() { return {g_rows.load(), g_fallback_rows.load()}; }

}  // namespace cpu
}  // namespace fastvote
