// k-means++ seeding's greedy picks (fastvote/cluster.py, _pick_in_round): a
// round's b picks over its M candidates in one call. In numpy a pick was
// several array calls on [trials, M] arrays; here it is one pass over the
// trials' rows of the candidate distances. Not an op: only fastvote.cluster
// calls it. One thread, sums in a fixed order: the picks depend on the
// arguments alone.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fastvote {
namespace cpu {
namespace {

constexpr const char* kOp = "greedy_picks";
constexpr int kLanes = 8;  // partial sums of a score (independent adds the compiler can vectorise)
constexpr double kCovered = 1e-12;  // a potential this small: every candidate is covered

void check_array(const at::Tensor& t, const char* arg, at::ScalarType dtype, int64_t dims,
                 const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dims, "fastvote.", kOp, ": ", arg, " must be a ", dims,
                    "-D tensor ", shape, ", got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "fastvote.", kOp, ": ", arg, " has dtype ",
                   t.scalar_type(), "; expected ", dtype);
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastvote.", kOp, ": ", arg, " is on ", t.device(),
                    "; expected a CPU tensor");
}

// What trial row `row` leaves of the potential: sum_i weight[i] * min(row[i], now[i]), in
// float64 (scores of near-equal trials are compared), in kLanes interleaved partial sums
// added in a fixed order. The picks' hot loop (33 trials x M a pick at K = 10,000): compiled
// for AVX-512 and AVX2 too, chosen at load time, all with a separate multiply and add (no FMA
// contraction), so every CPU gets the same bits as the baseline code.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default"), optimize("fp-contract=off")))
#endif
double score(const float* row, const float* now, const double* weight, int64_t m) {
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= m; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] += weight[i + l] * std::min(row[i + l], now[i + l]);
  }
  double total = 0;
  for (; i < m; ++i) total += weight[i] * std::min(row[i], now[i]);
  for (int l = 0; l < kLanes; ++l) total += lane[l];
  return total;
}

// What trial row `row` removes from the potential where it covers (its finite entries, at
// `cols`): sum_i weight[i] * (now[i] - min(row[i], now[i])), in float64.
double gain(const int32_t* cols, const float* row, int64_t count, const float* now,
            const double* weight) {
  double total = 0;
  for (int64_t e = 0; e < count; ++e) {
    const int32_t i = cols[e];
    total += weight[i] * (static_cast<double>(now[i]) - std::min(row[e], now[i]));
  }
  return total;
}

// Which candidates each candidate covers, and at what distance (two-level seeding: the ~2% of pairs
// where i searches t's group; build_group_covers).
struct Covers {
  std::vector<int64_t> start;  // row t's entries: [start[t], start[t + 1])
  std::vector<int32_t> cols;
  std::vector<float> dist;
};

// x . y in 16 interleaved float32 partial sums added pairwise, each a multiply then an add (no
// FMA contraction): the same bits from every clone, so on every CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default"), optimize("fp-contract=off")))
#endif
float dot(const float* x, const float* y, int64_t dim) {
  constexpr int kParts = 16;
  float part[kParts] = {};
  int64_t d = 0;
  for (; d + kParts <= dim; d += kParts) {
    for (int l = 0; l < kParts; ++l) part[l] += x[d + l] * y[d + l];
  }
  for (int l = 0; d < dim; ++d, ++l) part[l] += x[d] * y[d];
  for (int w = kParts / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  }
  return part[0];
}

// Two-level seeding's covers, computed directly: candidate t covers candidate i when i searches
// t's group (searched[i, r] == searched[t, 0] for some r), at the squared distance
// max(sq[t] + sq[i] - 2 x_t . x_i, 0) / scale. Only those pairs (~2% at K = 10,000) are
// computed, in place of an M x M GEMM, a mask and a scan.
void build_group_covers(Covers& covers, const float* x, int64_t dim, const float* sq, const int64_t* searched,
                        int64_t reach, int64_t m, double scale) {
  int64_t groups = 0;
  for (int64_t e = 0; e < m * reach; ++e) groups = std::max(groups, searched[e] + 1);
  // searching[g]: the candidates that search group g, in increasing order (a counting sort)
  std::vector<int64_t> first(groups + 1, 0);
  for (int64_t e = 0; e < m * reach; ++e) ++first[searched[e] + 1];
  for (int64_t g = 0; g < groups; ++g) first[g + 1] += first[g];
  std::vector<int32_t> searching(m * reach);
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t r = 0; r < reach; ++r) searching[fill[searched[i * reach + r]]++] = static_cast<int32_t>(i);
  }
  covers.start.assign(m + 1, 0);
  for (int64_t t = 0; t < m; ++t) {
    const int64_t g = searched[t * reach];
    covers.start[t + 1] = covers.start[t] + first[g + 1] - first[g];
  }
  covers.cols.resize(covers.start[m]);
  covers.dist.resize(covers.start[m]);
  const float unit = static_cast<float>(scale);
  for (int64_t t = 0; t < m; ++t) {
    const int64_t g = searched[t * reach];
    int64_t e = covers.start[t];
    for (int64_t s = first[g]; s < first[g + 1]; ++s, ++e) {
      const int32_t i = searching[s];
      const float d2 = sq[t] + sq[i] - 2.0f * dot(x + t * dim, x + i * dim, dim);
      covers.cols[e] = i;
      covers.dist[e] = std::max(d2, 0.0f) / unit;
    }
  }
}

void check_round(const at::Tensor& now, const at::Tensor& weight, const at::Tensor& uniforms) {
  check_array(now, "now", at::kFloat, 1, "[M]");
  check_array(weight, "weight", at::kFloat, 1, "[M]");
  check_array(uniforms, "uniforms", at::kDouble, 2, "[b, trials]");
  TORCH_CHECK_VALUE(now.size(0) >= 1, "fastvote.", kOp, ": now has no candidates; expected M >= 1");
  TORCH_CHECK_VALUE(uniforms.size(1) >= 1, "fastvote.", kOp, ": uniforms ", uniforms.sizes(),
                    " has no trials; expected [b, trials] with trials >= 1");
}

// The picks of a round: from the covers (sparse) or the dense distances `dist` [m, m].
at::Tensor run_picks(const Covers* covers, const float* dist, const at::Tensor& now, const at::Tensor& weight,
                     const at::Tensor& uniforms) {
  const int64_t m = now.size(0);
  const at::Tensor u_at = uniforms.contiguous();
  const double* u = u_at.const_data_ptr<double>();
  const int64_t picks = uniforms.size(0), trials = uniforms.size(1);
  const at::Tensor now_at = now.contiguous(), weight_at = weight.to(at::kDouble).contiguous();
  std::vector<float> left(now_at.const_data_ptr<float>(), now_at.const_data_ptr<float>() + m);
  const double* w = weight_at.const_data_ptr<double>();
  const bool sparse = covers != nullptr;
  // The cumulative potential in float64: the draws are searched in it to the last candidate.
  std::vector<double> cumulative(m);
  std::vector<int64_t> picked;
  for (int64_t p = 0; p < picks; ++p) {
    double total = 0;
    for (int64_t i = 0; i < m; ++i) cumulative[i] = total += static_cast<double>(left[i]) * w[i];
    if (total <= kCovered) break;  // the rest of the round's uniforms go unused
    int64_t best = -1;
    double best_score = 0;
    for (int64_t t = 0; t < trials; ++t) {
      // numpy's searchsorted(side="right"): the first candidate whose cumulative exceeds the
      // draw, clamped to the last (a draw rounded up to the total).
      const double draw = u[p * trials + t] * total;
      const int64_t j = std::min<int64_t>(
          std::upper_bound(cumulative.begin(), cumulative.end(), draw) - cumulative.begin(), m - 1);
      const int64_t e = sparse ? covers->start[j] : 0;
      const double s = sparse ? -gain(covers->cols.data() + e, covers->dist.data() + e,
                                      covers->start[j + 1] - e, left.data(), w)
                              : score(dist + j * m, left.data(), w, m);
      if (best < 0 || s < best_score) {  // ties: the first trial, as numpy's argmin
        best = j;
        best_score = s;
      }
    }
    picked.push_back(best);
    if (sparse) {
      for (int64_t e = covers->start[best]; e < covers->start[best + 1]; ++e) {
        float& l = left[covers->cols[e]];
        l = std::min(l, covers->dist[e]);
      }
    } else {
      const float* covered = dist + best * m;
      for (int64_t i = 0; i < m; ++i) left[i] = std::min(left[i], covered[i]);
    }
    left[best] = 0;
  }
  return at::tensor(picked, at::kLong);
}

}  // namespace
}  // namespace cpu

at::Tensor greedy_picks(const at::Tensor& between, const at::Tensor& now, const at::Tensor& weight,
                        const at::Tensor& uniforms) {
  using namespace cpu;
  check_array(between, "between", at::kFloat, 2, "[M, M]");
  check_round(now, weight, uniforms);
  const int64_t m = now.size(0);
  TORCH_CHECK_VALUE(between.size(0) == m && between.size(1) == m && weight.size(0) == m,
                    "fastvote.", kOp, ": between ", between.sizes(), " and weight ",
                    weight.sizes(), " must be [M, M] and [M] for the M=", m,
                    " candidates of now");
  const at::Tensor b_at = between.contiguous();
  return run_picks(nullptr, b_at.const_data_ptr<float>(), now, weight, uniforms);
}

at::Tensor greedy_picks_in_groups(const at::Tensor& candidates, const at::Tensor& sq, const at::Tensor& searched,
                                  double scale, const at::Tensor& now, const at::Tensor& weight,
                                  const at::Tensor& uniforms) {
  using namespace cpu;
  check_array(candidates, "candidates", at::kFloat, 2, "[M, D]");
  check_array(sq, "sq", at::kFloat, 1, "[M]");
  check_array(searched, "searched", at::kLong, 2, "[M, R]");
  check_round(now, weight, uniforms);
  const int64_t m = now.size(0);
  TORCH_CHECK_VALUE(candidates.size(0) == m && sq.size(0) == m && searched.size(0) == m && weight.size(0) == m &&
                        searched.size(1) >= 1,
                    "fastvote.", kOp, ": candidates ", candidates.sizes(), ", sq ", sq.sizes(), ", searched ",
                    searched.sizes(), " and weight ", weight.sizes(), " must be [M, D], [M], [M, R >= 1] and [M] "
                    "for the M=", m, " candidates of now");
  TORCH_CHECK_VALUE(scale > 0, "fastvote.", kOp, ": scale=", scale, " is invalid; expected > 0");
  const at::Tensor x = candidates.contiguous(), s = sq.contiguous(), g = searched.contiguous();
  const int64_t* groups = g.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < g.numel(); ++e) {
    TORCH_CHECK_INDEX(groups[e] >= 0, "fastvote.", kOp, ": searched holds group ", groups[e], "; expected >= 0");
  }
  Covers covers;
  build_group_covers(covers, x.const_data_ptr<float>(), x.size(1), s.const_data_ptr<float>(), groups, g.size(1), m,
                     scale);
  return run_picks(&covers, nullptr, now, weight, uniforms);
}

}  // namespace fastvote
