// The certified bf16 candidate pass's bound, shared by the CPU path
// (csrc/cpu/certified.cpp: VDPBF16PS, or its emulation) and the CUDA one
// (csrc/cuda/certified.cuh: tensor cores). Both compute approximate keys in
// bf16, keep each row's best k + m candidates and the best key outside them,
// re-rank the candidates with their fp32 kernel's own arithmetic, and use
// certify() below to prove that no other centroid can enter the row's top-k;
// rows it cannot prove go back to the fp32 kernel. No torch in here: host
// C++, nvcc device code and the C++ tests include it.
//
// The bound. Notation: y is a row as the fp32 kernel reads it (normalised
// for cosine), c_j, b_j, s_j a centroid, its bias and its scale; the fp32
// kernel's key is K_j = fl(b_j + s_j * acc_j) with acc_j its fma chain for
// y.c_j (d = 0, 1, ..., D - 1 on the CPU and on CUDA alike), and
// T_j = b_j + s_j (y.c_j) is the key in exact arithmetic. u = 2^-24;
// tau = 2^-126 bounds what one fp32 operation can lose to gradual underflow
// or to FTZ/DAZ (the CPU's bf16 pass always flushes; an fp32 kernel may, if
// its thread was told to; tensor cores may); gamma_n = n u / (1 - n u).
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
// (Any mu and nu keep the bound valid; the means only make it tight.)
//
// The bf16 pass computes A_j = fl(beta^_j + D~_j), where D~_j is its fp32
// accumulation of the products over y^ = bf16(fl(y - mu)) and
// w^_j = bf16(w_j - nu), with errors e_y = (y - mu) - y^, e_j = (w_j - nu) - w^_j.
// bf16 values below 2^-126 are flushed to zero (bf16_bits), so no subnormal
// bf16 input ever reaches the pass. With V_j = T_j - rho(y) and Cauchy-Schwarz:
//   (1) |(y - mu).(w_j - nu) - y^.w^_j| <= |y^||e_j| + |e_y||w^_j| + |e_y||e_j|   =: R1
//   (2) |D~_j - y^.w^_j| <= rel |y^||w^_j| + abs                                   =: R2
//       with (rel, abs) the pass's PassError (fma_chain_error, tensor_core_error)
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
// the magnitudes involved. The rounding mode of the scalar arithmetic is
// round-to-nearest (the C, torch and CUDA default); the CPU's bf16 pass and
// bookkeeping set their own MXCSR.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastvote/topk.h"

namespace fastvote {
namespace certify {

// m: candidates re-ranked beyond the k asked for. More make the proof fail
// less often (the (k+m+1)-th approximate key lies further from the k-th) and
// cost (k + m) * D exact multiply-adds per row. On Gaussian rows and
// centroids (D = 512, k = 5) on the CPU, m = 3 left 5% of the rows unproven
// at K = 1000 and 18% at K = 100,000; m = 8 left 0.01% and 0.3%.
constexpr int kExtraCandidates = 8;

constexpr double kU = 0x1p-24;
constexpr double kTau = 0x1p-126;
constexpr double kOverflow = 0x1p126;  // a quarter of FLT_MAX: sums bounded by it stay finite

// Per op: the centroids' terms of the bound, maxima over the centroids.
struct CentroidTerms {
  double mu_nu, mu_nu_err, nu_norm;          // mu.nu, its error, a bound on |nu|
  double w_norm, w_err, beta_err, beta_max;  // |w^_j|, |e_j|, |beta^_j - beta_j|, |beta^_j|
  double w_exact, c_norm, scale_max, bias_max;  // |w_j|, |c_j|, |s_j|, |b_j|
  int finite;  // 0: every row goes to the fp32 kernel (an int: CUDA clears it with a plain store)
};

// Per row: bounds on |y^|, |e_y|, |y|, and rho(y) with its error.
struct RowTerms {
  double y_hat, e_y, y, rho, rho_err;
};

// One centroid's terms (centroid_bound): |w^_j|, |e_j|, |beta^_j - beta_j|,
// |beta^_j| and |c_j|, and beta^_j itself, the bf16 pass's bias.
struct CentroidBound {
  double hat, err, beta_err, beta_abs, c_len;
  float beta_hat;
};

// (2): the pass's accumulation error, |D~_j - y^.w^_j| <= rel |y^||w^_j| + abs.
struct PassError {
  double rel, abs;
};

// Internal linkage, as in csrc/cpu/bf16.h: the CPU's per-ISA files include
// this, and each one's copy must stay in its own file.
namespace {

// gamma_n; infinite where n u >= 1 (no bound: the proof fails).
FV_HOST_DEVICE double gamma(double n) { return n * kU < 1 ? n * kU / (1 - n * kU) : INFINITY; }

// Upper bound on sqrt(sum) where sum (double) added n squares in any order:
// at most 2 roundings each at 2^-53, then the sqrt's.
FV_HOST_DEVICE double norm_bound(double sum, int64_t n) {
  return sqrt(sum) * (1 + static_cast<double>(n + 4) * 0x1p-52);
}

// bf16 bits of v (in the low 16 bits), rounded to nearest even; bf16
// denormals (which is what every float below 2^-126 becomes, or zero) flush
// to a zero of v's sign.
FV_HOST_DEVICE uint32_t bf16_bits(float v) {
  uint32_t b;
  memcpy(&b, &v, sizeof(b));
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return (b & 0x7F800000u) == 0 ? (b >> 16) & 0x8000u : rounded;
}

// The bf16 in the low 16 bits of `bits`, as a float.
FV_HOST_DEVICE float bf16_value(uint32_t bits) {
  const uint32_t high = bits << 16;
  float f;
  memcpy(&f, &high, sizeof(f));
  return f;
}

// One centroid's terms from the double sums its packing took over d:
// hat_sq = |w^_j|^2, err_sq = |t - w^_j|^2 with t = w_j - nu rounded once to
// double (exact differences: w^_j is within a factor 2 of t, or 0),
// c_sq = |c_j|^2, beta = b_j + mu.w_j and beta_abs = |b_j| + sum |mu_d w_jd|.
FV_HOST_DEVICE CentroidBound centroid_bound(double hat_sq, double err_sq, double c_sq, double beta,
                                            double beta_abs, int64_t dim) {
  CentroidBound b;
  b.beta_hat = static_cast<float>(beta);
  if (fabsf(b.beta_hat) < 0x1p-126f) b.beta_hat = 0.0f;  // the CPU's pass reads it with DAZ
  b.hat = norm_bound(hat_sq, dim);
  // t is within 2^-53 |t| of w_j - nu.
  b.err = norm_bound(err_sq, dim) * (1 + 0x1p-50) + 0x1p-50 * b.hat;
  b.c_len = norm_bound(c_sq, dim);
  // beta's double sum: 2^-53 per product and per addition.
  b.beta_err = fabs(b.beta_hat - beta) + static_cast<double>(dim + 2) * 0x1p-52 * beta_abs;
  b.beta_abs = fabs(static_cast<double>(b.beta_hat));
  return b;
}

// A row's terms from bounds on its norms (y_hat >= |y^|, err >= |fl(y - mu) - y^|,
// y >= |y|) and dot_nu, y.nu summed in float or double in any order.
FV_HOST_DEVICE RowTerms row_terms(const CentroidTerms& cc, double y_hat, double err, double y,
                                  double dot_nu, int64_t dim) {
  const double n = static_cast<double>(dim);
  RowTerms rb;
  rb.y_hat = y_hat;
  rb.y = y;
  // fl(y - mu) is within u |y - mu| (or 2^-150, subnormal) of y - mu itself.
  rb.e_y = err + 2 * kU * (y_hat + err) + sqrt(n) * 0x1p-148;
  rb.rho = dot_nu - cc.mu_nu;
  rb.rho_err = gamma(2.0 * n) * y * cc.nu_norm + 2.0 * n * 0x1p-149 + cc.mu_nu_err;
  return rb;
}

// (2) for the CPU: VDPBF16PS (or its emulation) is a chain of `steps` fp32
// FMAs, each rounded to nearest or losing at most tau to FTZ/DAZ; the
// products of bf16 values are exact, so the chain errs by at most gamma_n
// sum |y^_d w^_jd| <= gamma_n |y^||w^_j| plus n tau (1 + gamma_n).
FV_HOST_DEVICE PassError fma_chain_error(int64_t steps) {
  const double n = static_cast<double>(steps);
  const double g = gamma(n);
  return {g, n * kTau * (1 + g)};
}

// (2) for tensor cores and AMX: CUDA's mma.sync.m16n8k16 with bf16 inputs
// and fp32 accumulation (P = 16 products a step) or the CPU's TDPBF16PS
// (P = 32), chained along D (`steps` = L instructions, each adding P
// products to the running sum it is given). Neither PTX nor Intel specifies
// the order or the rounding of that accumulation, so the bound assumes only
// this model of one instruction:
//   (a) a product of two bf16 values is exact (8-bit significands: 16 bits,
//       inside fp32's 24), or below 2^-126 may be flushed or rounded (an
//       error of at most tau);
//   (b) its P + 1 operands (P products and the incoming sum) are added by a
//       tree of any shape and order whose nodes each take s >= 2 operands,
//       align them to the largest keeping at least 24 bits below its leading
//       bit (the others truncated or rounded in any direction: each loses
//       less than 2^-23 max|o_i|), add them exactly, and round the sum to
//       fp32 in any direction (less than 2^-23 of it), or lose at most tau
//       below 2^-126 (flushed or subnormal).
// A two-operand node is an fp32 addition in any rounding mode; a (P + 1)-
// operand node is a fused multi-operand adder. A node then errs by less than
// 2^-23 ((s - 1) max|o_i| + |aligned sum|) <= ((1 + 2u)^(s+1) - 1) sum |o_i|.
// By induction over the tree, a node's value is within (F - 1) A of the
// exact sum of its leaves (A: the sum of their magnitudes, F: the largest
// product of (1 + 2u)^(s+1) over the nodes above one of its leaves), plus
// F tau per flush below it. On a leaf's path through one instruction, the
// nodes' other operands hold disjoint sets of the other P leaves, so
// sum (s - 1) <= P and there are at most P nodes: sum (s + 1) <= 3P. The
// running sum is one leaf of the next instruction, so over the chain
// F <= (1 + 2u)^(3P L) <= 1 + gamma_{6P L}, and with at most 2P + 1 losses
// of tau per instruction (P products, P nodes, and the incoming sum, should
// the instruction flush a subnormal one) and Cauchy-Schwarz,
//   |D~_j - y^.w^_j| <= gamma_{6P L} |y^||w^_j| + (2P + 1) L tau (1 + gamma_{6P L}).
// This is an assumption about the hardware, not something PTX or Intel
// promises: measured models of V100, T4 and A100 tensor cores (Fasi, Higham,
// Mikaitis and Pranesh, 2021) are of this kind (products exact, operands
// aligned to the largest, truncation); an accumulator narrower than fp32, as
// reported for FP8 inputs on Hopper, is not. It has not been checked here on
// an H100; the C++ tests check TDPBF16PS against it, exactly, where it runs.
FV_HOST_DEVICE PassError tensor_core_error(int64_t steps, int products = 16) {
  const double l = static_cast<double>(steps), p = static_cast<double>(products);
  const double g = gamma(6 * p * l);
  return {g, (2 * p + 1) * l * kTau * (1 + g)};
}

// The certificate (the derivation at the top of this file): true when every
// centroid outside the candidates provably has an exact key > kth, the row's
// k-th exact key; a_out is the best approximate key outside the candidates.
FV_HOST_DEVICE bool certify(const CentroidTerms& cc, int64_t dim, const PassError& pass,
                            const RowTerms& rb, float a_out, float kth) {
  if (!cc.finite) return false;
  const double n = static_cast<double>(dim);
  const double sqrt_d = sqrt(n);
  // No overflow in the bf16 pass or in the fp32 kernel, for any centroid.
  const double bf16_sums = rb.y_hat * cc.w_norm * (1 + pass.rel) + pass.abs + cc.beta_max;
  const double fp32_acc = rb.y * cc.c_norm * (1 + gamma(n)) + n * kTau;
  const double fp32_key = cc.bias_max + rb.y * cc.w_exact * (1 + gamma(n)) + cc.scale_max * n * kTau;
  if (!(bf16_sums < kOverflow && fp32_acc < kOverflow && fp32_key < kOverflow)) return false;

  const double a = a_out;
  const double below = a - (kU * (fabs(a) + kTau) / (1 - kU) + kTau);
  const double r1 = rb.y_hat * cc.w_err + rb.e_y * cc.w_norm + rb.e_y * cc.w_err;
  const double r2 = pass.rel * rb.y_hat * cc.w_norm + pass.abs;
  const double eps_acc = gamma(n) * rb.y * cc.w_exact +
                         cc.scale_max * (n * kTau * (1 + gamma(n)) + kTau * sqrt_d * (rb.y + cc.c_norm));
  const double t = below - cc.beta_err - r1 - r2 + rb.rho - rb.rho_err - eps_acc;
  const double low = t - kU * fabs(t) - 2 * kTau;
  const double slack = 0x1p-40 * (fabs(a) + cc.beta_err + r1 + r2 + fabs(rb.rho) + rb.rho_err +
                                  eps_acc + fabs(static_cast<double>(kth)));
  return low - slack > static_cast<double>(kth);
}

}  // namespace
}  // namespace certify
}  // namespace fastvote
