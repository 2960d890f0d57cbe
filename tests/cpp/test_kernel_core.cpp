// ctest: what every backend shares (csrc/include/fastvote/topk.h) and the CPU
// tile micro-kernels, each variant this CPU runs, against plain references.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "fastvote/topk.h"
#include "tile_kernel.h"

namespace {

int failures = 0;

#define CHECK(cond, ...)                                        \
  do {                                                          \
    if (!(cond)) {                                              \
      ++failures;                                               \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                        \
      std::fprintf(stderr, "\n");                               \
    }                                                           \
  } while (0)

// The tie rule restated: stable sort by key keeps equal keys in index order.
std::vector<int64_t> reference_topk(const std::vector<float>& keys, int k) {
  std::vector<int64_t> order(keys.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return keys[a] < keys[b]; });
  order.resize(k);
  return order;
}

void test_insert_matches_stable_sort() {
  std::mt19937 rng(1);
  for (int trial = 0; trial < 2000; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 40);
    const int k = 1 + static_cast<int>(rng() % n);
    // Few distinct values: many exact ties.
    std::vector<float> in(n);
    for (float& v : in) v = static_cast<float>(static_cast<int>(rng() % 5)) - 2.0f;
    std::vector<float> keys(k);
    std::vector<int64_t> idx(k);
    int count = 0;
    float threshold = fastvote::reject_threshold(keys.data(), count, k);
    for (int i = 0; i < n; ++i) {
      if (fastvote::admits(in[i], threshold)) {
        count = fastvote::topk_insert(keys.data(), idx.data(), count, k, in[i], static_cast<int64_t>(i));
        threshold = fastvote::reject_threshold(keys.data(), count, k);
      }
    }
    CHECK(count == k, "count %d != k %d", count, k);
    const std::vector<int64_t> ref = reference_topk(in, k);
    for (int r = 0; r < k; ++r) {
      CHECK(idx[r] == ref[r], "trial %d rank %d: idx %lld != %lld", trial, r, (long long)idx[r], (long long)ref[r]);
    }
    // Out-of-order arrival (as on a GPU): the explicit index rule still holds.
    std::vector<int> perm(n);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    count = 0;
    for (int i : perm) count = fastvote::topk_insert(keys.data(), idx.data(), count, k, in[i], static_cast<int64_t>(i));
    for (int r = 0; r < k; ++r) CHECK(idx[r] == ref[r], "shuffled trial %d rank %d", trial, r);
  }
}

void test_threshold_semantics() {
  float keys[2] = {1.0f, 2.0f};
  CHECK(std::isnan(fastvote::reject_threshold(keys, 1, 2)), "not-full lists admit everything");
  CHECK(fastvote::admits(INFINITY, fastvote::reject_threshold(keys, 1, 2)), "inf admitted while not full");
  CHECK(fastvote::reject_threshold(keys, 2, 2) == 2.0f, "full list threshold is the k-th key");
  CHECK(!fastvote::admits(2.0f, 2.0f), "an equal key (higher index) is rejected");
  CHECK(fastvote::admits(1.5f, 2.0f), "a smaller key is admitted");
}

void test_weights() {
  const float keys[4] = {-3.0f, -1.0f, 0.5f, 2.0f};
  float w[4];
  fastvote::row_weights(keys, 4, fastvote::Weight::Count, 1.0f, w);
  for (float v : w) CHECK(v == 1.0f, "count weight %g", v);
  fastvote::row_weights(keys, 4, fastvote::Weight::Rank, 1.0f, w);
  for (int r = 0; r < 4; ++r) CHECK(w[r] == 1.0f / (r + 1), "rank weight %d", r);
  for (float inv_t : {1.0f, 4.0f, 0.1f}) {
    fastvote::row_weights(keys, 4, fastvote::Weight::Soft, inv_t, w);
    double total = 0, ref[4];
    for (int r = 0; r < 4; ++r) total += ref[r] = std::exp(-static_cast<double>(keys[r]) * inv_t);
    for (int r = 0; r < 4; ++r) CHECK(std::fabs(w[r] - ref[r] / total) < 1e-6, "soft weight %d", r);
  }
  // Shift invariance: the per-row ||x||^2 that l2 keys omit does not matter.
  const float shifted[4] = {97.0f, 99.0f, 100.5f, 102.0f};
  float w2[4];
  fastvote::row_weights(keys, 4, fastvote::Weight::Soft, 1.0f, w);
  fastvote::row_weights(shifted, 4, fastvote::Weight::Soft, 1.0f, w2);
  for (int r = 0; r < 4; ++r) CHECK(std::fabs(w[r] - w2[r]) < 1e-6, "shift invariance %d", r);
  // Large keys: no overflow (every exponent <= 0).
  const float big[2] = {1e30f, 2e30f};
  fastvote::row_weights(big, 2, fastvote::Weight::Soft, 1.0f, w);
  CHECK(w[0] == 1.0f && w[1] == 0.0f, "soft weights of huge keys %g %g", w[0], w[1]);
  // Infinite keys (l2 keys of finite inputs can overflow): equal keys weigh alike,
  // a far key 0, no NaN; neither an infinite inverse temperature.
  const float inf = INFINITY;
  const float all_far[3] = {inf, inf, inf}, one_near[3] = {-inf, inf, inf}, ties[2] = {-inf, -inf};
  fastvote::row_weights(all_far, 3, fastvote::Weight::Soft, 1.0f, w);
  for (int r = 0; r < 3; ++r) CHECK(w[r] == 1.0f / 3.0f, "soft weight of +inf keys %d: %g", r, w[r]);
  fastvote::row_weights(one_near, 3, fastvote::Weight::Soft, 1.0f, w);
  CHECK(w[0] == 1.0f && w[1] == 0.0f && w[2] == 0.0f, "-inf then +inf: %g %g %g", w[0], w[1], w[2]);
  fastvote::row_weights(ties, 2, fastvote::Weight::Soft, inf, w);
  CHECK(w[0] == 0.5f && w[1] == 0.5f, "-inf ties at an infinite inverse temperature: %g %g", w[0], w[1]);
  // A weight outside [0, 1] counts 0 units (converting NaN to an integer is undefined).
  CHECK(fastvote::fixed_units(NAN) == 0 && fastvote::fixed_units(inf) == 0 &&
            fastvote::fixed_units(-0.5f) == 0,
        "non-finite or negative weights: 0 units");
  CHECK(fastvote::fixed_units(1.0f) == (uint64_t{1} << 32), "weight 1: 2^32 units");
}

// vote_exp against double exp: within 1 ulp over [-80, 0] (every 61st float of
// the range; all of them were checked once: at most 0.94 ulp), and 0 below.
void test_vote_exp() {
  double worst = 0;
  int steps = 0;
  for (float x = -80.0f; x <= 0.0f; ++steps) {
    const float got = fastvote::vote_exp(x);
    const float ref = static_cast<float>(std::exp(static_cast<double>(x)));
    const double ulp = std::nextafter(ref, INFINITY) - ref;
    worst = std::max(worst, std::fabs(got - std::exp(static_cast<double>(x))) / ulp);
    for (int i = 0; i < 61; ++i) x = std::nextafter(x, 1.0f);
  }
  CHECK(worst <= 1.0, "vote_exp: %.3f ulp from exp over %d points", worst, steps);
  CHECK(fastvote::vote_exp(0.0f) == 1.0f, "vote_exp(0) = %a", fastvote::vote_exp(0.0f));
  CHECK(fastvote::vote_exp(-80.5f) == 0.0f && fastvote::vote_exp(-1e30f) == 0.0f &&
            fastvote::vote_exp(-INFINITY) == 0.0f && fastvote::vote_exp(NAN) == 0.0f,
        "vote_exp below -80 / NaN is 0");
}

// The 32.32 fixed point: weights rounded half to even, 1.0 = 2^32.
void test_fixed_point() {
  CHECK(fastvote::fixed_units(1.0f) == (uint64_t{1} << 32), "1.0 -> 2^32");
  CHECK(fastvote::fixed_units(0.0f) == 0, "0 -> 0");
  CHECK(fastvote::fixed_units(0.5f) == (uint64_t{1} << 31), "0.5 -> 2^31");
  CHECK(fastvote::fixed_units(std::ldexp(1.0f, -33)) == 0, "half a unit rounds to even (0)");
  CHECK(fastvote::fixed_units(std::ldexp(3.0f, -33)) == 2, "1.5 units round to even (2)");
  CHECK(fastvote::fixed_units(std::ldexp(1.0f, -40)) == 0, "far below a unit -> 0");
  const float third = 1.0f / 3.0f;
  CHECK(fastvote::fixed_units(third) == static_cast<uint64_t>(std::nearbyint(double(third) * 4294967296.0)),
        "1/3 -> nearest unit");
  CHECK(fastvote::fixed_to_double(uint64_t{3} << 31) == 1.5, "units -> double");
  // A full bin: 2^31 - 1 rows of weight 1 stay below 2^63 and convert exactly.
  const uint64_t most = ((uint64_t{1} << 31) - 1) << 32;
  CHECK(fastvote::fixed_to_double(most) == 2147483647.0, "the largest bin converts exactly");
}

// One tile through a micro-kernel variant, integer inputs so float32 is exact.
void test_tile_variant(const char* name) {
  setenv("FASTVOTE_CPU_KERNEL", name, 1);
  fastvote::cpu::TileFn kernel;
  try {
    kernel = fastvote::cpu::tile_kernel();
  } catch (const std::invalid_argument&) {
    std::printf("tile kernel %s: not supported by this CPU, skipped\n", name);
    return;
  }
  std::mt19937 rng(7);
  const int kSlab = fastvote::cpu::kSlab;
  struct Shape { int rows, num, dim, k; };
  for (const Shape s : {Shape{1, 1, 1, 1}, Shape{32, 12, 16, 3}, Shape{45, 29, 67, 29},
                        Shape{70, 100, 9, 7}, Shape{96, 13, 130, 1}}) {
    const int slabs = (s.rows + kSlab - 1) / kSlab;
    std::vector<float> x(s.rows * s.dim), c(s.num * s.dim), packed(slabs * s.dim * kSlab, 0.0f);
    for (float& v : x) v = static_cast<float>(static_cast<int>(rng() % 7) - 3);
    for (float& v : c) v = static_cast<float>(static_cast<int>(rng() % 7) - 3);
    for (int r = 0; r < s.rows; ++r)
      for (int d = 0; d < s.dim; ++d) packed[(r / kSlab) * s.dim * kSlab + d * kSlab + r % kSlab] = x[r * s.dim + d];
    std::vector<float> bias(s.num), scale(s.num, -2.0f);
    for (int j = 0; j < s.num; ++j) {
      bias[j] = 0;
      for (int d = 0; d < s.dim; ++d) bias[j] += c[j * s.dim + d] * c[j * s.dim + d];
    }
    std::vector<float> keys(s.rows * s.k), thresholds(slabs * kSlab, -INFINITY);
    std::fill(thresholds.begin(), thresholds.begin() + s.rows, NAN);
    std::vector<int64_t> idx(s.rows * s.k);
    std::vector<int> counts(s.rows, 0);
    const fastvote::cpu::TileJob job{packed.data(), s.rows, s.dim, c.data(), s.dim, s.num, bias.data(),
                                     scale.data(), s.k, keys.data(), idx.data(), counts.data(),
                                     thresholds.data()};
    kernel(job);
    for (int r = 0; r < s.rows; ++r) {
      std::vector<float> ref_keys(s.num);
      for (int j = 0; j < s.num; ++j) {
        float dot = 0;
        for (int d = 0; d < s.dim; ++d) dot += x[r * s.dim + d] * c[j * s.dim + d];
        ref_keys[j] = bias[j] - 2.0f * dot;
      }
      const std::vector<int64_t> ref = reference_topk(ref_keys, s.k);
      CHECK(counts[r] == s.k, "%s: row %d count %d", name, r, counts[r]);
      for (int i = 0; i < s.k; ++i) {
        CHECK(idx[r * s.k + i] == ref[i], "%s shape (%d,%d,%d,%d) row %d rank %d: %lld != %lld", name,
              s.rows, s.num, s.dim, s.k, r, i, (long long)idx[r * s.k + i], (long long)ref[i]);
        CHECK(keys[r * s.k + i] == ref_keys[ref[i]], "%s: key mismatch row %d rank %d", name, r, i);
      }
    }
  }
  // The logits row scan of the same variant: ties (few distinct values), NaN/Inf.
  const fastvote::cpu::LogitsRowFn scan = fastvote::cpu::kernels().logits_row;
  for (int trial = 0; trial < 300; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 100);
    const int k = 1 + static_cast<int>(rng() % std::min(n, 9));
    std::vector<float> logits(n), keys(k), neg(n);
    for (int j = 0; j < n; ++j) neg[j] = -(logits[j] = static_cast<float>(static_cast<int>(rng() % 6)));
    std::vector<int64_t> idx(k);
    CHECK(scan(logits.data(), n, k, keys.data(), idx.data()), "%s: finite row rejected", name);
    const std::vector<int64_t> ref = reference_topk(neg, k);
    for (int i = 0; i < k; ++i) CHECK(idx[i] == ref[i], "%s logits n=%d k=%d rank %d", name, n, k, i);
    logits[rng() % n] = (trial % 2) ? NAN : -INFINITY;
    CHECK(!scan(logits.data(), n, k, keys.data(), idx.data()), "%s: NaN/Inf row accepted", name);
  }
  std::printf("tile kernel %s: ok\n", name);
  unsetenv("FASTVOTE_CPU_KERNEL");
}

}  // namespace

int main() {
  test_insert_matches_stable_sort();
  test_threshold_semantics();
  test_weights();
  test_vote_exp();
  test_fixed_point();
  for (const char* name : {"avx512", "avx2", "portable"}) test_tile_variant(name);
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("kernel core: all checks passed\n");
  return 0;
}
