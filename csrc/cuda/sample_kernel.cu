// The CUDA backend of sample_scores (the same contract as the CPU's in
// csrc/cpu/vote_kernel.cpp): each source row against every target row, cosine.
//
// Two passes over the features, neither holding N x M:
// - NormSim_2 in float64: mean_j (x.t_j)^2 = x^T G x / M, G = sum_j t_j t_j^T
//   (D x D, built once), a chunk of rows at a time; when M < D the chunk's
//   [rows, M] similarities are cheaper and are squared directly. This pass also
//   finds NaN/Inf rows, so errors name sample_scores' own arguments.
// - the top-k: the fused nearest-centroid kernel (fm_kernel.cuh) with the
//   cosine metric, through the dispatcher: its tie rule, its tiles, its k > 64 path.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "fastvote/checks.h"

namespace fastvote {
namespace cuda {
namespace {

constexpr int64_t kNoRow = std::numeric_limits<int64_t>::max();
constexpr double kNormEps = 1e-12;                     // as torch.nn.functional.normalize
constexpr int64_t kChunkElements = int64_t{1} << 24;   // float64 [rows, width] per chunk: 128 MB

// Rows scaled to unit norm in float64 (norms below kNormEps divided by it).
at::Tensor unit_rows(const at::Tensor& x) {
  const at::Tensor d = x.to(at::kDouble);
  return d / d.norm(2, {1}, /*keepdim=*/true).clamp_min(kNormEps);
}

// The first row (offset by `first`) whose squares overflow float32 or hold
// NaN/Inf, as a [1] int64 device tensor (kNoRow if none): the rule of every backend.
at::Tensor first_bad_row(const at::Tensor& x, int64_t first) {
  const at::Tensor ok = at::isfinite(x.to(at::kFloat).pow(2).sum(1));
  const at::Tensor rows = at::arange(first, first + x.size(0), x.options().dtype(at::kLong));
  return at::where(ok, kNoRow, rows).min().reshape({1});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_scores_cuda(const at::Tensor& features,
                                                                  const at::Tensor& targets,
                                                                  int64_t k) {
  check_features_targets("sample_scores", features, targets);
  check_k("sample_scores", k, targets.size(0), "target rows");
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0);
  const int64_t m = targets.size(0);
  const int64_t dim = features.size(1);

  // Slot 0: first bad target row; slot 1: first bad feature row.
  at::Tensor bad = at::full({2}, kNoRow, features.options().dtype(at::kLong));
  bad.narrow(0, 0, 1).copy_(first_bad_row(targets, 0));
  const at::Tensor t = unit_rows(targets);
  const bool gram = m >= dim;
  const at::Tensor g = gram ? at::matmul(t.t(), t) : at::Tensor();
  at::Tensor rms = at::empty({n}, features.options().dtype(at::kDouble));
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / std::max(dim, gram ? dim : m));
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    const at::Tensor x = features.narrow(0, r0, rows);
    at::Tensor slot = bad.narrow(0, 1, 1);
    slot.copy_(at::minimum(slot, first_bad_row(x, r0)));
    const at::Tensor u = unit_rows(x);
    const at::Tensor q = gram ? (at::matmul(u, g) * u).sum(1) : at::matmul(u, t.t()).pow(2).sum(1);
    rms.narrow(0, r0, rows).copy_(q.div_(static_cast<double>(m)).clamp_min_(0.0).sqrt_());
  }
  // The op's one synchronisation before the top-k: raise for bad rows first.
  const at::Tensor host = bad.cpu();
  const int64_t* flags = host.const_data_ptr<int64_t>();
  if (flags[0] != kNoRow) fail_non_finite("sample_scores", "targets", flags[0]);
  if (flags[1] != kNoRow) fail_non_finite("sample_scores", "features", flags[1]);

  static const auto nearest =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastvote::nearest_centroids", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                    c10::string_view)>();
  auto [values, indices] = nearest.call(features, targets, k, "cosine");
  return {values, indices, rms};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastvote, CUDA, m) {
  m.impl("sample_scores", &cuda::sample_scores_cuda);
}

}  // namespace fastvote
