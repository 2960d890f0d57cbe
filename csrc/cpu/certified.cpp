// The certified bf16 path (certified.h): packing for the bf16 pass, the
// bound, the exact re-rank and the fallback.
//
// The bound. Notation: y is a row as the fp32 kernel reads it (the packed
// floats, normalised for cosine), c_j, b_j, s_j a centroid, its bias and its
// scale; the fp32 kernel's key is K_j = fl(b_j + s_j * acc_j) with acc_j its
// fma chain for y.c_j, and T_j = b_j + s_j (y.c_j) is the key in exact
// arithmetic. u = 2^-24; tau = 2^-126 bounds what one fp32 operation can lose
// to gradual underflow or to FTZ/DAZ (the bf16 pass always flushes; the fp32
// kernel may, if the thread was told to); gamma_n = n u / (1 - n u).
//
// Centring. With w_j = s_j c_j (exact in double), float vectors mu (rows)
// and nu (centroids), beta_j = b_j + mu.w_j and rho(y) = y.nu - mu.nu,
//     T_j = beta_j + (y - mu).(w_j - nu) + rho(y)        (exact identity).
// rho is one number per row, so it never changes a row's ranking, and
// beta_j is per centroid, so it folds into the bias. The centres are means:
// nu of the w_j, and mu = -nu / 2 for l2 (the centroid mean: rows lie among
// the centroids) or -nu for cosine (the mean unit centroid: rows point the
// same way). Centring shrinks the vectors whose bf16 rounding errors count,
// which is what makes the bound tight for features far from the origin.
//
// The bf16 pass computes A_j = fl(beta^_j + D~_j), where D~_j is the
// VDPBF16PS chain (n = 2 * pairs steps) over y^ = bf16(fl(y - mu)) and
// w^_j = bf16(w_j - nu), with errors e_y = (y - mu) - y^, e_j = (w_j - nu) - w^_j.
// With V_j = T_j - rho(y) and Cauchy-Schwarz:
//   (1) |(y - mu).(w_j - nu) - y^.w^_j| <= |y^||e_j| + |e_y||w^_j| + |e_y||e_j|   =: R1
//   (2) |D~_j - y^.w^_j| <= gamma_n |y^||w^_j| + n tau (1 + gamma_n)               =: R2
//       (n fp32 roundings, each losing at most u of its result or tau to FTZ)
//   (3) |beta^_j - beta_j| <= beta_err (computed with its own error at prepare)
//   (4) A_j = fl(v_j), v_j = beta^_j + D~_j, so v_j >= below(A_j) with
//       below(a) = a - (u (|a| + tau) / (1 - u) + tau), increasing in a.
// Every centroid j outside the candidates has A_j >= A_out, the best
// approximate key outside them, hence
//   V_j >= below(A_out) - beta_err - R1 - R2                     (norms: max over j).
// The fp32 kernel's own rounding: |s_j (acc_j - y.c_j)| <= eps_acc =
//   gamma_D |y| max|w_j| + max|s_j| (D tau (1 + gamma_D) + tau sqrt(D) (|y| + max|c_j|)),
// the last term for DAZ (|y|_1 <= sqrt(D) |y|); then K_j >= low(T_j - eps_acc)
// with low(t) = t - u |t| - 2 tau (the final fma's rounding, a flushed bias),
// increasing in t. So every j outside the candidates has
//   K_j >= low(below(A_out) - beta_err - R1 - R2 + rho - rho_err - eps_acc),
// and if that is > K_k, the row's k-th exact key, no such centroid can enter
// or tie into the row's top-k: the candidates' exact keys, inserted with
// topk_insert (lower index wins ties), are the fp32 kernel's top-k, bit for
// bit. Else the row goes to the fp32 kernel. The bounds assume finite fp32
// values: rows whose norms allow an overflow in either pass fall back, and so
// do NaN bounds (every test is written to fail on NaN). The check's own double
// arithmetic (relative 2^-53 per step) is covered by a slack of 2^-40 times
// the magnitudes involved. The rounding mode is round-to-nearest (the C and
// torch default); the bf16 pass and this bookkeeping set their own MXCSR.
#include "certified.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "bf16.h"

namespace fastvote {
namespace cpu {
namespace {

constexpr double kU = 0x1p-24;
constexpr double kTau = 0x1p-126;
constexpr double kOverflow = 0x1p126;  // a quarter of FLT_MAX: sums bounded by it stay finite

std::atomic<int64_t> g_rows{0}, g_fallback_rows{0};

double gamma(double n) { return n * kU / (1 - n * kU); }

// Upper bound on sqrt(sum) where sum (double) added n squares: at most 2
// roundings each at 2^-53, then the sqrt's.
double norm_bound(double sum, int64_t n) {
  return std::sqrt(sum) * (1 + static_cast<double>(n + 4) * 0x1p-52);
}

// The same from a float sum of n squares (1 or 2 roundings each, whether or
// not the compiler fuses them; gradual underflow loses <= 2^-150 each).
double norm_bound_f32(float sum, int64_t n) {
  const double terms = 2.0 * static_cast<double>(n);
  return std::sqrt((sum + terms * 0x1p-150) * (1 + 2 * gamma(terms))) * (1 + 0x1p-50);
}

// Per row of a slab: what packing learnt about it (float sums, pack_bf16_slab).
struct RowSums {
  float bf16_sq[kSlab], err_sq[kSlab], sq[kSlab], dot_nu[kSlab];
};

// One slab of the fp32 tile -> bf16 pairs of y - mu, and each row's sums of
// y^^2, (fl(y - mu) - y^)^2 (exact differences: y^ is within a factor 2 of
// its source, or 0), y^2 and y.nu. Lanes (rows) innermost, so it vectorises;
// cloned per ISA: only the speed differs, the bf16 bits cannot.
__attribute__((target_clones("avx512f", "avx2", "default"))) void pack_bf16_slab(
    const float* slab, int64_t dim, const float* mu, const float* nu, uint32_t* out,
    RowSums& sums) {
  for (int lane = 0; lane < kSlab; ++lane) {
    sums.bf16_sq[lane] = sums.err_sq[lane] = sums.sq[lane] = sums.dot_nu[lane] = 0.0f;
  }
  // One feature of every lane: its bf16 bits, and the sums.
  const auto feature = [&](int64_t d, int lane) -> uint32_t {
    if (d >= dim) return 0;  // an odd D's last pair: bf16 zero
    const float y = slab[d * kSlab + lane];
    const float t = y - mu[d];
    const uint32_t bits = bf16_bits(t);
    const float err = t - bf16_low(bits);
    sums.bf16_sq[lane] += bf16_low(bits) * bf16_low(bits);
    sums.err_sq[lane] += err * err;
    sums.sq[lane] += y * y;
    sums.dot_nu[lane] += y * nu[d];
    return bits;
  };
  for (int64_t p = 0; p < (dim + 1) / 2; ++p) {
    for (int lane = 0; lane < kSlab; ++lane) {
      const uint32_t low = feature(2 * p, lane);
      out[p * kSlab + lane] = low | (feature(2 * p + 1, lane) << 16);
    }
  }
}

// The row terms of the bound.
struct RowBound {
  double y_hat, e_y, y, rho, rho_err;
};

RowBound row_bound(const CertifiedCentroids& cc, const RowSums& sums, int lane) {
  const int64_t n = cc.dim;
  const double sqrt_n = std::sqrt(static_cast<double>(n));
  RowBound rb;
  rb.y_hat = norm_bound_f32(sums.bf16_sq[lane], n);
  rb.y = norm_bound_f32(sums.sq[lane], n);
  // fl(y - mu) is within u |y - mu| (or 2^-150, subnormal) of y - mu itself.
  const double err = norm_bound_f32(sums.err_sq[lane], n);
  rb.e_y = err + 2 * kU * (rb.y_hat + err) + sqrt_n * 0x1p-148;
  rb.rho = static_cast<double>(sums.dot_nu[lane]) - cc.mu_nu;
  rb.rho_err = gamma(2.0 * n) * rb.y * cc.nu_norm + 2.0 * n * 0x1p-149 + cc.mu_nu_err;
  return rb;
}

// The certificate (the derivation at the top of this file): true when every
// centroid outside the candidates provably has an exact key > kth.
bool certify(const CertifiedCentroids& cc, const RowBound& rb, float a_out, float kth) {
  const double n = 2.0 * static_cast<double>(cc.pairs);
  const double dim = static_cast<double>(cc.dim);
  const double sqrt_d = std::sqrt(dim);
  // No overflow in the bf16 pass or in the fp32 kernel, for any centroid.
  const double bf16_sums = rb.y_hat * cc.w_norm * (1 + gamma(n)) + n * kTau + cc.beta_max;
  const double fp32_acc = rb.y * cc.c_norm * (1 + gamma(dim)) + dim * kTau;
  const double fp32_key = cc.bias_max + rb.y * cc.w_exact * (1 + gamma(dim)) + cc.scale_max * dim * kTau;
  if (!(bf16_sums < kOverflow && fp32_acc < kOverflow && fp32_key < kOverflow)) return false;

  const double a = a_out;
  const double below = a - (kU * (std::fabs(a) + kTau) / (1 - kU) + kTau);
  const double r1 = rb.y_hat * cc.w_err + rb.e_y * cc.w_norm + rb.e_y * cc.w_err;
  const double r2 = gamma(n) * rb.y_hat * cc.w_norm + n * kTau * (1 + gamma(n));
  const double eps_acc = gamma(dim) * rb.y * cc.w_exact +
                         cc.scale_max * (dim * kTau * (1 + gamma(dim)) + kTau * sqrt_d * (rb.y + cc.c_norm));
  const double t = below - cc.beta_err - r1 - r2 + rb.rho - rb.rho_err - eps_acc;
  const double low = t - kU * std::fabs(t) - 2 * kTau;
  const double slack = 0x1p-40 * (std::fabs(a) + cc.beta_err + r1 + r2 + std::fabs(rb.rho) +
                                  rb.rho_err + eps_acc + std::fabs(kth));
  return low - slack > static_cast<double>(kth);
}

// One centroid: its bf16 pairs of w_j - nu (into out), beta^_j (into
// beta_hat), and its terms of the bound.
struct CentroidBound {
  double hat, err, beta_err, beta_hat, c_len;  // |w^_j|, |e_j|, |beta^_j - beta_j|, |beta^_j|, |c_j|
};

CentroidBound pack_centroid(const CertifiedCentroids& cc, const float* c, float bias, float scale,
                            uint32_t* out, float* beta_hat) {
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
  *beta_hat = static_cast<float>(beta);
  if (std::fabs(*beta_hat) < 0x1p-126f) *beta_hat = 0.0f;  // the bf16 pass reads it with DAZ
  CentroidBound b;
  b.hat = norm_bound(hat_sq, dim);
  // t is rounded once: within 2^-53 |t| of w_j - nu.
  b.err = norm_bound(err_sq, dim) * (1 + 0x1p-50) + 0x1p-50 * b.hat;
  b.c_len = norm_bound(c_sq, dim);
  // beta's double sum: 2^-53 per product and per addition.
  b.beta_err = std::fabs(*beta_hat - beta) + static_cast<double>(dim + 2) * 0x1p-52 * beta_abs;
  b.beta_hat = std::fabs(*beta_hat);
  return b;
}

}  // namespace

bool use_certified(const Kernels& kernels, int64_t num_centroids, int k) {
  return kernels.candidates != nullptr && num_centroids > k + kExtraCandidates;
}

CertifiedCentroids prepare_certified(const float* centroids, int64_t ldc, int64_t count,
                                     int64_t dim, const float* bias, const float* scale,
                                     Metric metric) {
  const Mxcsr ieee(0);  // gradual underflow, as the bound assumes
  CertifiedCentroids cc;
  cc.count = count;
  cc.dim = dim;
  cc.pairs = (dim + 1) / 2;
  cc.packed.assign(count * cc.pairs, 0u);
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
  cc.mu_nu = mu_nu;
  cc.mu_nu_err = static_cast<double>(dim + 2) * 0x1p-52 * mu_nu_abs;
  cc.nu_norm = norm_bound(nu_sq, dim);

  double w_norm = 0, w_err = 0, beta_err = 0, beta_max = 0, w_exact = 0, c_norm = 0, scale_max = 0,
         bias_max = 0;
  bool finite = true;
#pragma omp parallel reduction(max : w_norm, w_err, beta_err, beta_max, w_exact, c_norm, \
                                   scale_max, bias_max) reduction(&& : finite)
  {
    const Mxcsr worker_ieee(0);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < count; ++j) {
      const CentroidBound b = pack_centroid(cc, centroids + j * ldc, bias[j], scale[j],
                                            cc.packed.data() + j * cc.pairs, &cc.bias[j]);
      finite = finite && std::isfinite(b.hat) && std::isfinite(b.err) && std::isfinite(b.beta_err) &&
               std::isfinite(b.beta_hat);
      w_norm = std::max(w_norm, b.hat);
      w_err = std::max(w_err, b.err);
      beta_err = std::max(beta_err, b.beta_err);
      beta_max = std::max(beta_max, b.beta_hat);
      w_exact = std::max(w_exact, std::fabs(static_cast<double>(scale[j])) * b.c_len);
      c_norm = std::max(c_norm, b.c_len);
      scale_max = std::max(scale_max, static_cast<double>(std::fabs(scale[j])));
      bias_max = std::max(bias_max, static_cast<double>(std::fabs(bias[j])));
    }
  }
  cc.w_norm = w_norm;
  cc.w_err = w_err;
  cc.beta_err = beta_err;
  cc.beta_max = beta_max;
  cc.w_exact = w_exact;
  cc.c_norm = c_norm;
  cc.scale_max = scale_max;
  cc.bias_max = bias_max;
  cc.finite = finite && std::isfinite(cc.nu_norm) && std::isfinite(cc.mu_nu);
  return cc;
}

void certified_tile(const Kernels& kernels, const CertifiedCentroids& cc, const TileJob& job) {
  const int64_t rows = job.rows, dim = job.dim, pairs = cc.pairs;
  const int k = job.k;
  const int kc = k + kExtraCandidates;  // candidates
  const int kl = kc + 1;                // ... and the best approximate key outside them
  const int64_t slabs = (rows + kSlab - 1) / kSlab;

  std::vector<RowBound> bounds(rows);
  std::vector<uint32_t> packed(slabs * pairs * kSlab);
  {
    const Mxcsr ieee(0);
    RowSums sums;
    for (int64_t s = 0; s < slabs; ++s) {
      pack_bf16_slab(job.packed + s * dim * kSlab, dim, cc.mu.data(), cc.nu.data(),
                     packed.data() + s * pairs * kSlab, sums);
      for (int lane = 0; lane < kSlab && s * kSlab + lane < rows; ++lane) {
        bounds[s * kSlab + lane] = row_bound(cc, sums, lane);
      }
    }
  }

  std::vector<float> approx(rows * kl), thresholds(slabs * kSlab, -INFINITY);
  std::fill(thresholds.begin(), thresholds.begin() + rows, NAN);
  std::vector<int64_t> approx_idx(rows * kl);
  std::vector<int> approx_counts(rows, 0);
  const Bf16TileJob pass{packed.data(), rows,          pairs,           cc.packed.data(),
                         pairs,         cc.count,      cc.bias.data(),  cc.ones.data(),
                         kl,            approx.data(), approx_idx.data(), approx_counts.data(),
                         thresholds.data()};
  kernels.candidates(pass);

  // Exact re-rank, in increasing centroid order (topk_insert's tie rule is
  // explicit, the order only mirrors the fp32 kernel's), then the proof.
  std::vector<int64_t> fallback;
  std::vector<float> row(dim), exact(kc);
  std::vector<int64_t> cand(kc);
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = job.packed + (r / kSlab) * dim * kSlab + r % kSlab;
    for (int64_t d = 0; d < dim; ++d) row[d] = src[d * kSlab];
    std::copy_n(approx_idx.begin() + r * kl, kc, cand.begin());
    std::sort(cand.begin(), cand.end());
    kernels.exact_keys(row.data(), dim, job.centroids, job.ldc, job.bias, job.scale, cand.data(),
                       kc, exact.data());
    float* keys = job.keys + r * k;
    int64_t* idx = job.indices + r * k;
    int count = 0;
    for (int i = 0; i < kc; ++i) count = topk_insert(keys, idx, count, k, exact[i], cand[i]);
    job.counts[r] = count;
    const bool proven = cc.finite && approx_counts[r] == kl &&
                        certify(cc, bounds[r], approx[r * kl + kc], keys[k - 1]);
    if (!proven) fallback.push_back(r);
  }

  g_rows += rows;
  g_fallback_rows += static_cast<int64_t>(fallback.size());
  if (fallback.empty()) return;

  // The unproven rows, packed into their own tile for the fp32 kernel.
  const int64_t n = static_cast<int64_t>(fallback.size());
  const int64_t fb_slabs = (n + kSlab - 1) / kSlab;
  std::vector<float> fb_packed(fb_slabs * dim * kSlab, 0.0f), fb_keys(n * k),
      fb_thresholds(fb_slabs * kSlab, -INFINITY);
  std::fill(fb_thresholds.begin(), fb_thresholds.begin() + n, NAN);
  std::vector<int64_t> fb_idx(n * k);
  std::vector<int> fb_counts(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = fallback[i];
    const float* src = job.packed + (r / kSlab) * dim * kSlab + r % kSlab;
    float* dst = fb_packed.data() + (i / kSlab) * dim * kSlab + i % kSlab;
    for (int64_t d = 0; d < dim; ++d) dst[d * kSlab] = src[d * kSlab];
  }
  const TileJob fb{fb_packed.data(), n,         dim,           job.centroids,
                   job.ldc,          job.num_centroids, job.bias, job.scale,
                   k,                fb_keys.data(), fb_idx.data(), fb_counts.data(),
                   fb_thresholds.data()};
  kernels.tile(fb);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = fallback[i];
    std::copy_n(fb_keys.begin() + i * k, k, job.keys + r * k);
    std::copy_n(fb_idx.begin() + i * k, k, job.indices + r * k);
    job.counts[r] = fb_counts[i];
  }
}

CertifiedStats certified_stats() { return {g_rows.load(), g_fallback_rows.load()}; }

}  // namespace cpu
}  // namespace fastvote
