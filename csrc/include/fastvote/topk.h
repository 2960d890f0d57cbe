// Shared by every backend (CPU, CUDA) and by the C++ tests: the per-row top-k
// list with SPEC.md's tie rule and the vote weight rules. No torch in here, so
// the CMake test program and nvcc device code can both include it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FV_HOST_DEVICE inline
#endif

namespace fastvote {

// Every backend ranks by a "key" where SMALLER IS BETTER: squared L2 distance,
// or a negated similarity / logit. One direction means one insertion routine.
enum class Metric : int { L2 = 0, Cosine = 1 };
enum class Weight : int { Count = 0, Rank = 1, Soft = 2 };

// Candidate (ka, ia) ranks before (kb, ib): smaller key, then lower index.
FV_HOST_DEVICE bool ranks_before(float ka, int64_t ia, float kb, int64_t ib) {
  return ka < kb || (ka == kb && ia < ib);
}

// The rejection threshold of a row's list: NaN while the list is not full, so
// `!(key >= threshold)` admits anything; afterwards the k-th key. A candidate
// equal to the k-th key is rejected, which is right because within a row
// candidates arrive in increasing index order on every backend.
FV_HOST_DEVICE float reject_threshold(const float* keys, int count, int k) {
  return count < k ? NAN : keys[k - 1];
}

FV_HOST_DEVICE bool admits(float key, float threshold) {
  return !(key >= threshold);
}

// Whether (key, index) goes before a listed (other, other_index): ranks_before;
// with kIndexAbove, for an index above every listed one (a row's keys in
// increasing index order, as the tile kernels' epilogues give them), `key <`
// alone, the same answer (a tie keeps the lower, listed index) in fewer compares.
template <bool kIndexAbove, typename Index>
FV_HOST_DEVICE bool goes_before(float key, Index index, float other, Index other_index) {
  return kIndexAbove ? key < other : ranks_before(key, index, other, other_index);
}

// Insert (key, index) into the sorted list keys[0..count) / idx[0..count) of
// capacity k, keeping it sorted best first. Returns the new count.
template <bool kIndexAbove = false, typename Index>
FV_HOST_DEVICE int topk_insert(float* keys, Index* idx, int count, int k,
                               float key, Index index) {
  int pos = count < k ? count : k - 1;
  if (count == k && !goes_before<kIndexAbove>(key, index, keys[k - 1], idx[k - 1])) {
    return count;
  }
  // Shift worse entries one slot down until the new one's place is found.
  while (pos > 0 && goes_before<kIndexAbove>(key, index, keys[pos - 1], idx[pos - 1])) {
    keys[pos] = keys[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  keys[pos] = key;
  idx[pos] = index;
  return count < k ? count + 1 : k;
}

// exp(x) for x <= 0, the same bits on every backend. The CPU's libm expf and
// CUDA's expf differ in the last place, which would make soft votes differ
// between devices. This one uses only explicit fmaf (one rounding on host
// and device alike, whatever the contraction flags), rintf and exponent bit
// arithmetic, and never a multiply whose result an add consumes, so no
// compiler can fuse a step differently. Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2/2, then the degree-7 Taylor polynomial (truncation < 6e-9
// relative); error about 1 ulp. Below -80 (e^-80 ~ 2e-35, far under the
// fixed-point resolution of the votes) it returns 0, which keeps 2^n normal.
FV_HOST_DEVICE float vote_exp(float x) {
  if (!(x >= -80.0f)) return 0.0f;  // also NaN
  const float n = rintf(x * 1.44269504f);
  float r = fmaf(-n, 0.693145752f, x);  // ln2 split: the high part has 16 bits, so n * hi is exact
  r = fmaf(-n, 1.42860677e-06f, r);
  float p = 1.98412698e-04f;  // 1/7!
  p = fmaf(p, r, 1.38888889e-03f);
  p = fmaf(p, r, 8.33333333e-03f);
  p = fmaf(p, r, 4.16666667e-02f);
  p = fmaf(p, r, 1.66666667e-01f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  // p * 2^n by adding n to the exponent field: p is in [0.7, 1.5] and
  // n >= -116, so the result is normal and the addition exact.
  uint32_t bits;
  memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<uint32_t>(static_cast<int32_t>(n)) << 23;
  memcpy(&p, &bits, sizeof(p));
  return p;
}

// Weights of a row's k picks (keys sorted best first):
//   count -> 1 each; rank -> 1/(r+1); soft -> softmax(-key * inv_temperature).
// For LM the key is -logit (inv_temperature 1), for FM/l2 the squared
// distance, for FM/cosine the negated similarity. The softmax is shift
// invariant, so the per-row ||x||^2 that l2 keys omit does not change it.
// Every step is IEEE-rounded in a fixed order: equal keys give equal weights
// on the CPU and on CUDA.
FV_HOST_DEVICE void row_weights(const float* keys, int k, Weight weight,
                                float inv_temperature, float* out) {
  if (weight == Weight::Count) {
    for (int r = 0; r < k; ++r) out[r] = 1.0f;
  } else if (weight == Weight::Rank) {
    for (int r = 0; r < k; ++r) out[r] = 1.0f / static_cast<float>(r + 1);
  } else {
    // keys[0] is the smallest key, so every exponent is <= 0: no overflow. A key
    // equal to the best weighs exactly 1 without arithmetic: l2 keys of finite
    // inputs can overflow to +-inf, and inf - inf would make a NaN. So the
    // total is at least 1 and every weight a number (vote_exp maps NaN to 0).
    float total = 0.0f;
    for (int r = 0; r < k; ++r) {
      out[r] = keys[r] == keys[0] ? 1.0f : vote_exp(-(keys[r] - keys[0]) * inv_temperature);
      total += out[r];
    }
    for (int r = 0; r < k; ++r) out[r] /= total;
  }
}

// Float votes are summed as unsigned 32.32 fixed point on every backend:
// integer addition is associative, so the sum does not depend on the thread
// count, the schedule or the device, and CPU and CUDA votes are bit-equal
// whenever their picks and keys are. Resolution: each weight (in [0, 1]) is
// rounded to a multiple of 2^-32, an error <= 2^-33 per vote, so a bin that
// received m votes is within m * 2^-33 of the exact sum of its float32
// weights (plus the final conversion to float64, exact below 2^21 votes of
// weight). Overflow: a row adds at most 1.0 = 2^32 units to a bin, so
// kMaxWeightedRows = 2^31 rows keeps every bin below 2^63 (an int64 tensor).
constexpr int64_t kMaxWeightedRows = int64_t{1} << 31;
constexpr double kFixedToDouble = 1.0 / 4294967296.0;

// w * 2^32 is exact in float (w <= 1); rintf rounds half to even on host
// (default rounding mode) and device alike. A weight outside [0, 1] -- NaN or
// Inf, which row_weights never makes -- counts 0: converting a NaN to an integer
// is undefined (0 on the GPU, 2^63 on x86).
FV_HOST_DEVICE uint64_t fixed_units(float weight) {
  if (!(weight >= 0.0f && weight <= 1.0f)) return 0;
  return static_cast<uint64_t>(rintf(weight * 4294967296.0f));
}

FV_HOST_DEVICE double fixed_to_double(uint64_t units) {
  return static_cast<double>(static_cast<int64_t>(units)) * kFixedToDouble;
}

}  // namespace fastvote
