// ctest: what every backend shares (csrc/include/fastvote/topk.h) and the CPU
// tile micro-kernels, each variant this CPU runs, against plain references;
// the certified bf16 path: its conversion, its emulated VDPBF16PS, the native
// one where the CPU has it, and its answers against the fp32 kernel's; the
// CUDA path's tensor-core error bound against an adversarial emulation of the
// hardware model it assumes (fastvote/certify.h).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "bf16.h"
#include "certified.h"
#include "fastvote/certify.h"
#include "fastvote/topk.h"
#include "tile_kernel.h"
#include "tile_kernel_impl.h"  // the portable exact_keys, tested beside the native ones

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


float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

uint32_t to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

// Round to nearest even, ties included; denormals flush to signed zero.
void test_bf16_conversion() {
  using fastvote::cpu::bf16_bits;
  CHECK(bf16_bits(1.0f) == 0x3F80u, "1.0 -> %x", bf16_bits(1.0f));
  CHECK(bf16_bits(from_bits(0x3F808000u)) == 0x3F80u, "a tie rounds to the even 0x3F80");
  CHECK(bf16_bits(from_bits(0x3F818000u)) == 0x3F82u, "a tie rounds to the even 0x3F82");
  CHECK(bf16_bits(from_bits(0x3F808001u)) == 0x3F81u, "above the tie rounds up");
  CHECK(bf16_bits(from_bits(0x3F807FFFu)) == 0x3F80u, "below the tie rounds down");
  CHECK(bf16_bits(-3.0f) == 0xC040u, "-3.0 -> %x", bf16_bits(-3.0f));
  CHECK(bf16_bits(from_bits(0x00400000u)) == 0x0000u, "a float denormal flushes to +0");
  CHECK(bf16_bits(from_bits(0x80000001u)) == 0x8000u, "a negative denormal flushes to -0");
  CHECK(bf16_bits(0x1p-126f) == 0x0080u, "the smallest normal stays");
  CHECK(bf16_bits(from_bits(0x7F7FFFFFu)) == 0x7F80u, "FLT_MAX rounds to bf16 infinity");
  CHECK(fastvote::cpu::bf16_low(0x12343F80u) == 1.0f && fastvote::cpu::bf16_high(0x3F801234u) == 1.0f,
        "pair halves");
}

// The emulated VDPBF16PS step against the SDM's definition evaluated in
// double (exact for these magnitudes, then one rounding to float): the odd
// pair first, then the even one, each rounded once.
void test_bf16_pair_step() {
  // acc = 1, odd product 2^24, even product 1: odd first gives 2^24 (the tie
  // 2^24 + 1 rounds to even, and so does the next), even first 2^24 + 2.
  const uint32_t one = 0x3F80u, two12 = fastvote::cpu::bf16_bits(4096.0f);
  const uint32_t pair = one | (two12 << 16);
  CHECK(fastvote::cpu::bf16_pair_madd(pair, pair, 1.0f) == 16777216.0f, "the odd product is added first: %a",
        fastvote::cpu::bf16_pair_madd(pair, pair, 1.0f));
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> value(-4.0f, 4.0f);
  for (int trial = 0; trial < 20000; ++trial) {
    const uint32_t c = fastvote::cpu::bf16_bits(value(rng)) | (fastvote::cpu::bf16_bits(value(rng)) << 16);
    const uint32_t x = fastvote::cpu::bf16_bits(value(rng)) | (fastvote::cpu::bf16_bits(value(rng)) << 16);
    const float acc = std::ldexp(value(rng), static_cast<int>(rng() % 16));
    const float hi = static_cast<float>(acc + static_cast<double>(from_bits(c & 0xFFFF0000u)) * from_bits(x & 0xFFFF0000u));
    const float ref = static_cast<float>(hi + static_cast<double>(from_bits(c << 16)) * from_bits(x << 16));
    const float got = fastvote::cpu::bf16_pair_madd(c, x, acc);
    CHECK(to_bits(got) == to_bits(ref), "pair step %d: %a != %a", trial, got, ref);
    if (to_bits(got) != to_bits(ref)) break;
  }
}

// Random bf16 pairs of a wide range of magnitudes (products that flush, and
// an all-zero row and centroid) through a kernel's bf16 candidate pass.
struct Bf16Outputs {
  std::vector<float> keys;
  std::vector<int64_t> idx;
};

Bf16Outputs run_candidates(fastvote::cpu::Bf16TileFn pass, int rows, int num, int pairs, int k,
                           unsigned seed) {
  const int kSlab = fastvote::cpu::kSlab;
  const int slabs = (rows + kSlab - 1) / kSlab;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  const auto bf16 = [&](int i) {
    const int scale = static_cast<int>(rng() % 200) - 140;  // down to 2^-140: products flush
    return fastvote::cpu::bf16_bits(i == 0 ? 0.0f : std::ldexp(value(rng), scale / 4 * (i % 3)));
  };
  std::vector<uint32_t> packed(slabs * pairs * kSlab, 0u), c(num * pairs);
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < pairs; ++p)
      packed[(r / kSlab) * pairs * kSlab + p * kSlab + r % kSlab] = bf16(r) | (bf16(r + p) << 16);
  for (int j = 0; j < num; ++j)
    for (int p = 0; p < pairs; ++p) c[j * pairs + p] = bf16(j) | (bf16(j + p) << 16);
  std::vector<float> bias(num), ones(num, 1.0f);
  for (float& b : bias) b = value(rng) * 1e-30f;
  Bf16Outputs out{std::vector<float>(rows * k), std::vector<int64_t>(rows * k)};
  std::vector<float> thresholds(slabs * kSlab, -INFINITY);
  std::fill(thresholds.begin(), thresholds.begin() + rows, NAN);
  std::vector<int> counts(rows, 0);
  const fastvote::cpu::Bf16TileJob job{packed.data(), rows, pairs, c.data(), pairs, num, bias.data(),
                                       ones.data(), k, out.keys.data(), out.idx.data(), counts.data(),
                                       thresholds.data()};
  pass(job);
  return out;
}

const fastvote::cpu::Kernels* pinned(const char* name) {
  setenv("FASTVOTE_CPU_KERNEL", name, 1);
  const fastvote::cpu::Kernels* k = nullptr;
  try {
    k = &fastvote::cpu::kernels();
  } catch (const std::invalid_argument&) {
  }
  unsetenv("FASTVOTE_CPU_KERNEL");
  return k;
}

// The emulated pass against a scalar model built on bf16_pair_madd with
// FTZ/DAZ, and the native pass against the emulated one, bit for bit.
void test_bf16_candidate_pass() {
  const fastvote::cpu::Kernels* emu = pinned("bf16emu");
  CHECK(emu != nullptr && emu->candidates != nullptr, "bf16emu runs on every CPU");
  if (emu == nullptr) return;
  const fastvote::cpu::Kernels* native = pinned("avx512bf16");
  if (native == nullptr) std::printf("avx512bf16: not supported by this CPU, native == emulated skipped\n");
  struct Shape { int rows, num, pairs, k; };
  for (const Shape s : {Shape{1, 1, 1, 1}, Shape{45, 29, 34, 29}, Shape{70, 100, 5, 7}, Shape{33, 13, 129, 4}}) {
    const Bf16Outputs e = run_candidates(emu->candidates, s.rows, s.num, s.pairs, s.k, 11);
    // The model: each (row, centroid) chain in pair order, then + bias, all flushed.
    Bf16Outputs again = run_candidates(
        [](const fastvote::cpu::Bf16TileJob& job) {
          const fastvote::cpu::Mxcsr flush(fastvote::cpu::Mxcsr::kFlushDenormals);
          const int kSlab = fastvote::cpu::kSlab;
          for (int64_t r = 0; r < job.rows; ++r) {
            int count = 0;
            for (int64_t j = 0; j < job.num_centroids; ++j) {
              float acc = 0.0f;
              for (int64_t p = 0; p < job.dim; ++p) {
                acc = fastvote::cpu::bf16_pair_madd(job.centroids[j * job.ldc + p],
                                                    job.packed[(r / kSlab) * job.dim * kSlab + p * kSlab + r % kSlab], acc);
              }
              const float key = std::fma(job.scale[j], acc, job.bias[j]);
              count = fastvote::topk_insert(job.keys + r * job.k, job.indices + r * job.k, count, job.k, key, j);
            }
          }
        },
        s.rows, s.num, s.pairs, s.k, 11);
    for (size_t i = 0; i < e.keys.size(); ++i) {
      CHECK(to_bits(e.keys[i]) == to_bits(again.keys[i]) && e.idx[i] == again.idx[i],
            "bf16emu vs its scalar model, shape (%d,%d,%d,%d) entry %zu: %a/%lld != %a/%lld", s.rows, s.num,
            s.pairs, s.k, i, e.keys[i], (long long)e.idx[i], again.keys[i], (long long)again.idx[i]);
    }
    if (native == nullptr) continue;
    const Bf16Outputs n = run_candidates(native->candidates, s.rows, s.num, s.pairs, s.k, 11);
    for (size_t i = 0; i < e.keys.size(); ++i) {
      CHECK(to_bits(e.keys[i]) == to_bits(n.keys[i]) && e.idx[i] == n.idx[i],
            "native vs emulated VDPBF16PS, shape (%d,%d,%d,%d) entry %zu: %a/%lld != %a/%lld", s.rows, s.num,
            s.pairs, s.k, i, n.keys[i], (long long)n.idx[i], e.keys[i], (long long)e.idx[i]);
    }
  }
}

// The certified path against the fp32 kernel it stands for: equal keys and
// indices, on random rows and on near-ties, which must fall back.
void test_certified_tile(const char* name) {
  const fastvote::cpu::Kernels* certified_kernels = pinned(name);
  if (certified_kernels == nullptr) {
    std::printf("%s: not supported by this CPU, its certified tile skipped\n", name);
    return;
  }
  const int kSlab = fastvote::cpu::kSlab;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  struct Shape { int rows, num, dim, k; float spread; };
  // spread: how far the centroids are from each other (tiny: near-ties).
  for (const Shape s : {Shape{70, 40, 33, 5, 1.0f}, Shape{64, 300, 1, 2, 1.0f}, Shape{40, 50, 257, 1, 1.0f},
                        Shape{96, 30, 16, 3, 1e-6f}}) {
    const int slabs = (s.rows + kSlab - 1) / kSlab;
    std::vector<float> c(s.num * s.dim), packed(slabs * s.dim * kSlab, 0.0f);
    for (float& v : c) v = 3.0f + s.spread * normal(rng);
    for (int r = 0; r < s.rows; ++r)
      for (int d = 0; d < s.dim; ++d) packed[(r / kSlab) * s.dim * kSlab + d * kSlab + r % kSlab] = 3.0f + normal(rng);
    std::vector<float> bias(s.num), scale(s.num, -2.0f);
    for (int j = 0; j < s.num; ++j) {
      double sq = 0;
      for (int d = 0; d < s.dim; ++d) sq += static_cast<double>(c[j * s.dim + d]) * c[j * s.dim + d];
      bias[j] = static_cast<float>(sq);
    }
    const auto run = [&](bool certified, std::vector<float>& keys, std::vector<int64_t>& idx) {
      keys.assign(s.rows * s.k, 0.0f);
      idx.assign(s.rows * s.k, -1);
      std::vector<float> thresholds(slabs * kSlab, -INFINITY);
      std::fill(thresholds.begin(), thresholds.begin() + s.rows, NAN);
      std::vector<int> counts(s.rows, 0);
      const fastvote::cpu::TileJob job{packed.data(), s.rows, s.dim, c.data(), s.dim, s.num, bias.data(),
                                       scale.data(), s.k, keys.data(), idx.data(), counts.data(), thresholds.data()};
      if (!certified) return certified_kernels->tile(job);
      const fastvote::cpu::CertifiedCentroids cc = fastvote::cpu::prepare_certified(
          *certified_kernels, c.data(), s.dim, s.num, s.dim, bias.data(), scale.data(), fastvote::Metric::L2);
      fastvote::cpu::certified_tile(*certified_kernels, cc, job);
    };
    std::vector<float> k32, kc;
    std::vector<int64_t> i32, ic;
    run(false, k32, i32);
    const fastvote::cpu::CertifiedStats before = fastvote::cpu::certified_stats();
    run(true, kc, ic);
    const fastvote::cpu::CertifiedStats after = fastvote::cpu::certified_stats();
    const bool expect_tiles = s.num > s.k + fastvote::certify::kExtraCandidates;
    CHECK(after.rows - before.rows == (expect_tiles ? s.rows : 0), "rows counted");
    for (size_t i = 0; i < k32.size(); ++i) {
      CHECK(to_bits(k32[i]) == to_bits(kc[i]) && i32[i] == ic[i], "%s certified vs fp32, shape (%d,%d,%d,%d) entry %zu",
            name, s.rows, s.num, s.dim, s.k, i);
    }
    const int64_t fallbacks = after.fallback_rows - before.fallback_rows;
    if (s.spread < 1e-3f) {
      CHECK(fallbacks == s.rows, "%s near-ties: every row falls back (%lld of %d)", name, (long long)fallbacks, s.rows);
    }
  }
}


// An ExactKeysFn against the tile kernel it stands for: every lane's key
// equal, bit for bit, to `tile`'s for that (row, centroid), rows permuted and
// repeated across the lanes, lanes with no centroid left as they were.
void test_exact_keys(const char* label, fastvote::cpu::ExactKeysFn exact) {
  const fastvote::cpu::Kernels* fp32 = pinned("avx512");
  if (fp32 == nullptr) fp32 = pinned("avx2");
  if (fp32 == nullptr) fp32 = pinned("portable");
  const int kSlab = fastvote::cpu::kSlab;
  std::mt19937 rng(23);
  std::normal_distribution<float> normal;
  for (const int dim : {1, 17, 64, 257}) {
    const int num = 50, rows = kSlab;
    std::vector<float> packed(dim * kSlab), c(num * dim), bias(num), scale(num, -2.0f);
    for (float& v : packed) v = 1e3f * normal(rng);  // far from the origin: keys are differences of large numbers
    for (float& v : c) v = 1e3f + normal(rng);
    for (float& b : bias) b = normal(rng);
    std::vector<float> all(rows * num);
    std::vector<int64_t> all_idx(rows * num);
    std::vector<float> thresholds(kSlab, NAN);
    std::vector<int> counts(rows, 0);
    fp32->tile({packed.data(), rows, dim, c.data(), dim, num, bias.data(), scale.data(), num, all.data(),
                all_idx.data(), counts.data(), thresholds.data()});
    std::vector<float> by_centroid(rows * num);  // [row][centroid]
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < num; ++i) by_centroid[r * num + all_idx[r * num + i]] = all[r * num + i];
    for (int trial = 0; trial < 4; ++trial) {
      int lane_row[kSlab];
      int64_t idx[kSlab];
      float keys[kSlab];
      for (int l = 0; l < kSlab; ++l) {
        lane_row[l] = static_cast<int>(rng() % rows);
        idx[l] = rng() % 5 == 0 ? -1 : static_cast<int64_t>(rng() % num);
        keys[l] = 12345.0f;
      }
      exact(packed.data(), dim, c.data(), dim, bias.data(), scale.data(), lane_row, idx, keys);
      for (int l = 0; l < kSlab; ++l) {
        const float want = idx[l] < 0 ? 12345.0f : by_centroid[lane_row[l] * num + idx[l]];
        CHECK(to_bits(keys[l]) == to_bits(want), "%s exact keys, D = %d, lane %d (row %d, centroid %lld): %a != %a",
              label, dim, l, lane_row[l], (long long)idx[l], keys[l], want);
      }
    }
  }
}

// The AMX pass (TDPBF16PS), where it runs, against the order-free bound it
// is certified with (certify::tensor_core_error, 32 products a step): every
// key within gamma_{6PL} sum |products| (+ the flush terms) of the exact dot
// product, computed exactly (every value an __int128 times 2^-60); and each
// row's top-k list equal to the first k of its list of every key (the
// epilogue keeps the best keys it computed, ties to the lower index).
void test_amx_pass_bound() {
  const fastvote::cpu::Kernels* amx = pinned("amxbf16");
  if (amx == nullptr) {
    std::printf("amxbf16: not supported by this CPU, its pass's bound check skipped\n");
    return;
  }
  const fastvote::cpu::CandidateShape shape = amx->candidate_shape;
  const int kSlab = fastvote::cpu::kSlab;
  std::mt19937 rng(17);
  std::uniform_int_distribution<int> exponent(-20, 20), mantissa(128, 255), coin(0, 1);
  // A bf16 of 8 significant bits, exponent in [-20, 20]: products are exact
  // multiples of 2^-54, sums of 1024 of them stay below 2^52.
  const auto value = [&](int scale) {
    const float v = std::ldexp(static_cast<float>(mantissa(rng)), exponent(rng) / scale - 7);
    return coin(rng) ? -v : v;
  };
  // copies > 0: centroid j >= copies repeats centroid j % copies (ties within and across the
  // pass's chunks of 512 centroids). Lists up to 64 long get the pass's group-minimum threshold;
  // longer ones (k = 80, and every reference run: k = num) take every key of their first chunk.
  struct Shape { int rows, num, pairs, k, scale, copies; };
  for (const Shape s : {Shape{33, 70, 16, 3, 1, 0}, Shape{64, 32, 48, 5, 4, 0}, Shape{1, 5, 256, 2, 20, 0},
                        Shape{50, 40, 512, 7, 2, 0}, Shape{40, 1100, 16, 5, 1, 0}, Shape{35, 1100, 16, 5, 1, 300},
                        Shape{20, 600, 32, 12, 1, 0}, Shape{20, 700, 16, 40, 1, 0}, Shape{17, 700, 16, 80, 1, 0}}) {
    const int slabs = (s.rows + kSlab - 1) / kSlab;
    const int padded = (s.num + shape.centroid_block - 1) / shape.centroid_block * shape.centroid_block;
    std::vector<float> x(s.rows * 2 * s.pairs), c(s.num * 2 * s.pairs);
    for (float& v : x) v = value(s.scale);
    for (int j = 0; j < s.num; ++j)
      for (int d = 0; d < 2 * s.pairs; ++d)  // every 3rd centroid nearly cancels row j's products
        c[j * 2 * s.pairs + d] = s.copies > 0 && j >= s.copies ? c[(j % s.copies) * 2 * s.pairs + d]
                                 : (j % 3 == 0 && j < s.rows) ? -x[j * 2 * s.pairs + d] * (d % 5 ? 1.0f : 2.0f)
                                                              : value(s.scale);
    const auto bits = [](float v) { return fastvote::cpu::bf16_bits(v); };
    std::vector<uint32_t> packed(slabs * s.pairs * kSlab, 0u), cp(padded * s.pairs, 0u);
    for (int r = 0; r < s.rows; ++r)
      for (int p = 0; p < s.pairs; ++p)
        packed[(r / kSlab) * s.pairs * kSlab + p * kSlab + r % kSlab] =
            bits(x[r * 2 * s.pairs + 2 * p]) | (bits(x[r * 2 * s.pairs + 2 * p + 1]) << 16);
    for (int j = 0; j < s.num; ++j)
      for (int p = 0; p < s.pairs; ++p)
        cp[j * s.pairs + p] = bits(c[j * 2 * s.pairs + 2 * p]) | (bits(c[j * 2 * s.pairs + 2 * p + 1]) << 16);
    std::vector<float> zeros(s.num, 0.0f), ones(s.num, 1.0f);
    const auto run = [&](int k, std::vector<float>& keys, std::vector<int64_t>& idx) {
      keys.assign(s.rows * k, 0.0f);
      idx.assign(s.rows * k, -1);
      std::vector<float> thresholds(slabs * kSlab, -INFINITY);
      std::fill(thresholds.begin(), thresholds.begin() + s.rows, NAN);
      std::vector<int> counts(s.rows, 0);
      amx->candidates({packed.data(), s.rows, s.pairs, cp.data(), s.pairs, s.num, zeros.data(), ones.data(), k,
                       keys.data(), idx.data(), counts.data(), thresholds.data()});
    };
    std::vector<float> all_keys, top_keys;
    std::vector<int64_t> all_idx, top_idx;
    run(s.num, all_keys, all_idx);
    run(s.k, top_keys, top_idx);
    const fastvote::certify::PassError pass =
        fastvote::certify::tensor_core_error(2 * s.pairs / shape.products_per_step, shape.products_per_step);
    double worst = 0;
    for (int r = 0; r < s.rows; ++r) {
      for (int i = 0; i < s.num; ++i) {
        const int64_t j = all_idx[r * s.num + i];
        __int128 exact = 0;
        double magnitude = 0;
        for (int d = 0; d < 2 * s.pairs; ++d) {
          const double prod = static_cast<double>(x[r * 2 * s.pairs + d]) * c[j * 2 * s.pairs + d];  // exact
          exact += static_cast<__int128>(std::ldexp(prod, 54));
          magnitude += std::fabs(prod);
        }
        const double err = std::fabs(static_cast<double>(all_keys[r * s.num + i]) - std::ldexp(static_cast<double>(exact), -54));
        const double bound = pass.rel * magnitude * (1 + 0x1p-40) + pass.abs;
        worst = std::max(worst, err / bound);
        CHECK(err <= bound, "amxbf16 pass, shape (%d,%d,%d) row %d centroid %lld: error %g over the bound %g",
              s.rows, s.num, s.pairs, r, (long long)j, err, bound);
      }
      for (int i = 0; i < s.k; ++i) {
        CHECK(to_bits(top_keys[r * s.k + i]) == to_bits(all_keys[r * s.num + i]) &&
                  top_idx[r * s.k + i] == all_idx[r * s.num + i],
              "amxbf16 pass, shape (%d,%d,%d): row %d's top-%d entry %d is not its list's", s.rows, s.num, s.pairs,
              r, s.k, i);
      }
    }
    std::printf("amxbf16 pass (%d,%d,%d): largest error %.3g of the bound\n", s.rows, s.num, s.pairs, worst);
  }
}

// certify::tensor_core_error against its model, emulated adversarially: a
// chain of L instructions, each adding 16 bf16 products to the running sum
// through a random tree of fused adders (random fan-in and order), each
// aligning its operands to the largest with exactly 24 bits (the others cut
// in a random direction) and rounding its sum to fp32 in a random direction;
// products, incoming sums and results below 2^-126 flushed at random. The
// arithmetic is exact: every value is an __int128 times 2^grid.
class TensorCoreModel {
 public:
  TensorCoreModel(int grid, uint64_t seed) : grid_(grid), rng_(seed) {}

  // A float as an integer multiple of 2^grid (exact: the grid lies below its last bit).
  __int128 on_grid(double v) const {
    int e = 0;
    const double m = std::frexp(v, &e);  // v = m 2^e, |m| in [0.5, 1)
    const auto mant = static_cast<__int128>(std::ldexp(m, 53));
    const int shift = e - 53 - grid_;
    return shift >= 0 ? mant * (static_cast<__int128>(1) << shift) : mant / (static_cast<__int128>(1) << -shift);
  }
  long double value(__int128 v) const { return std::ldexp(static_cast<long double>(v), grid_); }

  // The emulated D~ of y^.w^ (bf16 values as floats, D a multiple of 16).
  __int128 dot(const std::vector<float>& y, const std::vector<float>& w) {
    __int128 acc = 0;
    for (size_t d0 = 0; d0 < y.size(); d0 += 16) {
      std::vector<__int128> ops{maybe_flush(acc)};
      for (size_t d = d0; d < d0 + 16; ++d) {
        ops.push_back(maybe_flush(on_grid(static_cast<double>(y[d]) * static_cast<double>(w[d]))));
      }
      while (ops.size() > 1) {  // a random node of s >= 2 random operands
        std::shuffle(ops.begin(), ops.end(), rng_);
        const size_t s = 2 + rng_() % (ops.size() - 1);
        const __int128 sum = node(std::vector<__int128>(ops.end() - s, ops.end()));
        ops.resize(ops.size() - s);
        ops.push_back(sum);
      }
      acc = ops[0];
    }
    return acc;
  }

 private:
  static int top_bit(__int128 v) {
    unsigned __int128 a = v < 0 ? -static_cast<unsigned __int128>(v) : static_cast<unsigned __int128>(v);
    int bit = -1;
    while (a != 0) {
      a >>= 1;
      ++bit;
    }
    return bit;
  }
  // v cut to a multiple of 2^(grid + shift): down, up, toward zero or to nearest, at random.
  __int128 cut(__int128 v, int shift) {
    if (shift <= 0) return v;
    const __int128 unit = static_cast<__int128>(1) << shift;
    __int128 down = v / unit * unit;
    if (down > v) down -= unit;  // division truncates toward zero
    const __int128 up = down == v ? v : down + unit;
    switch (rng_() % 4) {
      case 0: return down;
      case 1: return up;
      case 2: return v >= 0 ? down : up;
      default: return v - down < up - v ? down : up;
    }
  }
  // Below 2^-126: flushed to zero half the time.
  __int128 maybe_flush(__int128 v) {
    return v != 0 && top_bit(v) + grid_ < -126 && rng_() % 2 ? 0 : v;
  }
  // A fused adder: align to the largest operand's leading bit - 23, add, round to fp32.
  __int128 node(const std::vector<__int128>& ops) {
    __int128 largest = 0;
    for (const __int128 o : ops) largest = std::max(largest, o < 0 ? -o : o);
    const int align = top_bit(largest) - 23;
    __int128 sum = 0;
    for (const __int128 o : ops) sum += cut(o, align);
    if (sum == 0) return 0;
    const int exponent = std::max(top_bit(sum) + grid_ - 23, -149);  // fp32's last bit, or the subnormal one
    return maybe_flush(cut(sum, exponent - grid_));
  }

  int grid_;
  std::mt19937_64 rng_;
};

void test_tensor_core_bound() {
  std::mt19937 rng(23);
  // (bf16 exponent range, grid): normal magnitudes, and ones whose products straddle 2^-126.
  struct Range { int lo, hi, grid; };
  double worst = 0;  // the largest error seen, as a share of the bound
  for (const Range range : {Range{-20, 20, -60}, Range{-95, -55, -210}}) {
    TensorCoreModel model(range.grid, rng());
    for (int trial = 0; trial < 400; ++trial) {
      const int steps = 1 + static_cast<int>(rng() % 8);
      const int dim = 16 * steps;
      std::vector<float> y(dim), w(dim);
      const int pattern = trial % 3;
      for (int d = 0; d < dim; ++d) {
        const auto bf16 = [&](int lo, int hi) {
          const float m = (rng() % 2 ? -1.0f : 1.0f) * (1.0f + static_cast<float>(rng() % 256) / 256.0f);
          const int e = lo + static_cast<int>(rng() % static_cast<unsigned>(hi - lo + 1));
          return fastvote::certify::bf16_value(fastvote::certify::bf16_bits(std::ldexp(m, e)));
        };
        y[d] = bf16(range.lo, range.hi);
        // 0: independent; 1: w = +-y, heavy cancellation; 2: one huge product among small ones.
        w[d] = pattern == 0 ? bf16(range.lo, range.hi)
             : pattern == 1 ? (d % 2 ? -y[d] : y[d])
                            : (d == 3 ? bf16(range.hi, range.hi) : bf16(range.lo, range.lo + 4));
      }
      __int128 exact = 0;
      long double magnitude = 0;
      for (int d = 0; d < dim; ++d) {
        const __int128 p = model.on_grid(static_cast<double>(y[d]) * static_cast<double>(w[d]));
        exact += p;
        magnitude += std::fabs(model.value(p));
      }
      const __int128 got = model.dot(y, w);
      const long double error = std::fabs(model.value(got - exact));
      const fastvote::certify::PassError pass = fastvote::certify::tensor_core_error(steps);
      const long double bound = pass.rel * magnitude + pass.abs;
      CHECK(error <= bound, "tensor-core model, %d steps, pattern %d: error %Lg above the bound %Lg", steps, pattern,
            error, bound);
      if (bound > 0) worst = std::max(worst, static_cast<double>(error / bound));
    }
  }
  // The emulation must actually err (else this test proves nothing): beyond one fp32 rounding.
  CHECK(worst > 0.01, "the emulated tensor cores never came near the bound (%g of it)", worst);
  std::printf("tensor-core model: largest error %.3f of the bound\n", worst);
}

// certify() on hand-made terms: a wide gap proves, a narrow one or NaN does not.
void test_certify_decisions() {
  fastvote::certify::CentroidTerms cc{};
  cc.w_norm = cc.w_exact = 2.0;
  cc.c_norm = 1.0;
  cc.w_err = 2.0 * 0x1p-9;
  cc.scale_max = 2.0;
  cc.bias_max = 1.0;
  cc.finite = 1;
  const fastvote::certify::RowTerms rb = fastvote::certify::row_terms(cc, 1.0, 0x1p-9, 1.0, 0.0, 64);
  const fastvote::certify::PassError pass = fastvote::certify::tensor_core_error(4);
  CHECK(fastvote::certify::certify(cc, 64, pass, rb, 1.0f, 0.5f), "a gap of 0.5 against errors near 0.01 is proven");
  CHECK(!fastvote::certify::certify(cc, 64, pass, rb, 1.0f, 0.999f), "a gap of 0.001 is not");
  CHECK(!fastvote::certify::certify(cc, 64, pass, rb, NAN, 0.5f), "NaN is never proven");
  cc.finite = 0;
  CHECK(!fastvote::certify::certify(cc, 64, pass, rb, 1.0f, 0.5f), "non-finite centroid terms prove nothing");
}

}  // namespace

int main() {
  test_insert_matches_stable_sort();
  test_threshold_semantics();
  test_weights();
  test_vote_exp();
  test_fixed_point();
  for (const char* name : {"avx512", "avx2", "portable", "bf16emu", "avx512bf16", "amxbf16"}) test_tile_variant(name);
  test_bf16_conversion();
  test_bf16_pair_step();
  test_bf16_candidate_pass();
  for (const char* name : {"bf16emu", "avx512bf16", "amxbf16"}) test_certified_tile(name);
  test_exact_keys("portable", fastvote::cpu::exact_keys);
  if (const fastvote::cpu::Kernels* avx512 = pinned("avx512")) test_exact_keys("avx512", avx512->exact_keys);
  test_amx_pass_bound();
  test_tensor_core_bound();
  test_certify_decisions();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("kernel core: all checks passed\n");
  return 0;
}
