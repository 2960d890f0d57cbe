// Shared by every backend (CPU, CUDA) and by the C++ tests: the per-row top-k
// list with SPEC.md's tie rule and the vote weight rules. No torch in here, so
// the CMake test program and nvcc device code can both include it.
#pragma once

#include <cmath>
#include <cstdint>

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

// Insert (key, index) into the sorted list keys[0..count) / idx[0..count) of
// capacity k, keeping it sorted best first. Returns the new count.
template <typename Index>
FV_HOST_DEVICE int topk_insert(float* keys, Index* idx, int count, int k,
                               float key, Index index) {
  int pos = count < k ? count : k - 1;
  if (count == k && !ranks_before(key, index, keys[k - 1], idx[k - 1])) {
    return count;
  }
  // Shift worse entries one slot down until the new one's place is found.
  while (pos > 0 && ranks_before(key, index, keys[pos - 1], idx[pos - 1])) {
    keys[pos] = keys[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  keys[pos] = key;
  idx[pos] = index;
  return count < k ? count + 1 : k;
}

// Weights of a row's k picks (keys sorted best first):
//   count -> 1 each; rank -> 1/(r+1); soft -> softmax(-key * inv_temperature).
// For LM the key is -logit (inv_temperature 1), for FM/l2 the squared
// distance, for FM/cosine the negated similarity. The softmax is shift
// invariant, so the per-row ||x||^2 that l2 keys omit does not change it.
FV_HOST_DEVICE void row_weights(const float* keys, int k, Weight weight,
                                float inv_temperature, float* out) {
  if (weight == Weight::Count) {
    for (int r = 0; r < k; ++r) out[r] = 1.0f;
  } else if (weight == Weight::Rank) {
    for (int r = 0; r < k; ++r) out[r] = 1.0f / static_cast<float>(r + 1);
  } else {
    // keys[0] is the smallest key, so every exponent is <= 0: no overflow.
    float total = 0.0f;
    for (int r = 0; r < k; ++r) {
      out[r] = expf(-(keys[r] - keys[0]) * inv_temperature);
      total += out[r];
    }
    for (int r = 0; r < k; ++r) out[r] /= total;
  }
}

}  // namespace fastvote
