// The op schemas (one definition, every backend registers against it), the
// argument checks all backends share, and the Python module init.
#include <torch/library.h>
#include <torch/extension.h>

#include <cmath>
#include <string>
#include <utility>

#include "fastvote/checks.h"

namespace fastvote {

namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_matrix(const char* op, const at::Tensor& t, const char* arg, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == 2, "fastvote.", op, ": ", arg, " must be a 2-D tensor ",
                    shape, ", got shape ", t.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), "fastvote.", op, ": ", arg,
                   " has dtype ", t.scalar_type(),
                   "; expected float32, float16, bfloat16 or float64");
}

}  // namespace

Metric parse_metric(const char* op, c10::string_view metric) {
  if (metric == "l2") return Metric::L2;
  if (metric == "cosine") return Metric::Cosine;
  TORCH_CHECK_VALUE(false, "fastvote.", op, ": metric='", std::string(metric),
                    "' is unknown; expected 'l2' or 'cosine'");
}

Weight parse_weight(const char* op, c10::string_view weight) {
  if (weight == "count") return Weight::Count;
  if (weight == "rank") return Weight::Rank;
  if (weight == "soft") return Weight::Soft;
  TORCH_CHECK_VALUE(false, "fastvote.", op, ": weight='", std::string(weight),
                    "' is unknown; expected 'count', 'rank' or 'soft'");
}

float inverse_temperature(const char* op, double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "fastvote.", op,
                    ": temperature=", temperature, " is invalid; expected a finite value > 0");
  // The kernels scale keys by 1 / temperature in float32; an infinite scale
  // would turn a key difference of 0 into NaN.
  const float inverse = static_cast<float>(1.0 / temperature);
  TORCH_CHECK_VALUE(std::isfinite(inverse), "fastvote.", op, ": temperature=", temperature,
                    " is too small; expected a temperature whose inverse is finite in float32 "
                    "(3e-39 or more)");
  return inverse;
}

void check_k(const char* op, int64_t k, int64_t num_classes, const char* what) {
  TORCH_CHECK_VALUE(k >= 1 && k <= num_classes, "fastvote.", op, ": k=", k,
                    " is out of range; expected 1 <= k <= K=", num_classes, " (the number of ",
                    what, ")");
}

void check_weighted_rows(const char* op, int64_t rows, Weight weight) {
  TORCH_CHECK_VALUE(weight == Weight::Count || rows < kMaxWeightedRows, "fastvote.", op, ": N=",
                    rows, " rows is above the limit of 2^31 rows for float weights (the votes are "
                    "64-bit fixed point); vote in batches and add the votes");
}

void check_logits(const char* op, const at::Tensor& logits) {
  check_matrix(op, logits, "logits", "[N, K]");
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "fastvote.", op, ": logits has K=0 classes (shape ",
                    logits.sizes(), "); expected at least one source class");
}

namespace {

// features [N, D] against `other` [K, D] (centroids, or target rows).
void check_features_against(const char* op, const at::Tensor& features, const at::Tensor& other,
                            const char* arg, const char* shape, const char* count,
                            const char* one) {
  check_matrix(op, features, "features", "[N, D]");
  check_matrix(op, other, arg, shape);
  TORCH_CHECK_VALUE(other.size(0) >= 1, "fastvote.", op, ": ", arg, " has ", count,
                    "=0 rows; expected at least one ", one);
  TORCH_CHECK_VALUE(features.size(1) == other.size(1), "fastvote.", op,
                    ": features has D=", features.size(1), " but ", arg, " has D=",
                    other.size(1), "; expected the same feature dimension");
  TORCH_CHECK_VALUE(features.size(1) >= 1, "fastvote.", op,
                    ": features has D=0; expected at least one feature dimension");
  TORCH_CHECK_VALUE(features.device() == other.device(), "fastvote.", op,
                    ": features is on ", features.device(), " but ", arg, " is on ",
                    other.device(), "; expected both on the same device");
}

}  // namespace

void check_features_centroids(const char* op, const at::Tensor& features,
                              const at::Tensor& centroids) {
  check_features_against(op, features, centroids, "centroids", "[K, D]", "K", "centroid");
}

void check_features_targets(const char* op, const at::Tensor& features,
                            const at::Tensor& targets) {
  check_features_against(op, features, targets, "targets", "[M, D]", "M", "target row");
}

void check_class_centroids(const at::Tensor& features, const at::Tensor& labels,
                           int64_t num_classes) {
  check_matrix("class_centroids", features, "features", "[N, D]");
  TORCH_CHECK_VALUE(labels.dim() == 1, "fastvote.class_centroids: labels must be a 1-D tensor "
                    "[N], got shape ", labels.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(labels.scalar_type()) &&
                       !at::isComplexType(labels.scalar_type()) &&
                       labels.scalar_type() != at::kBool,
                   "fastvote.class_centroids: labels has dtype ", labels.scalar_type(),
                   "; expected an integer dtype (int64, int32, ...)");
  TORCH_CHECK_VALUE(labels.size(0) == features.size(0), "fastvote.class_centroids: labels has ",
                    labels.size(0), " entries but features has N=", features.size(0),
                    " rows; expected one label per row");
  TORCH_CHECK_VALUE(num_classes >= 1, "fastvote.class_centroids: num_classes=", num_classes,
                    " is invalid; expected >= 1");
  TORCH_CHECK_VALUE(features.device() == labels.device(), "fastvote.class_centroids: features "
                    "is on ", features.device(), " but labels is on ", labels.device(),
                    "; expected both on the same device");
}

void fail_non_finite(const char* op, const char* arg, int64_t row) {
  TORCH_CHECK_VALUE(false, "fastvote.", op, ": ", arg, " row ", row,
                    " contains NaN or Inf (or values whose squares overflow float32); "
                    "expected finite values");
}

void fail_label(int64_t position, int64_t label, int64_t num_classes) {
  TORCH_CHECK_INDEX(false, "fastvote.class_centroids: labels[", position, "]=", label,
                    " is out of range; expected 0 <= label < num_classes=", num_classes);
}

TORCH_LIBRARY(fastvote, m) {
  m.def("lm_vote(Tensor logits, int k=1, str weight=\"count\") -> Tensor");
  m.def(
      "fm_vote(Tensor features, Tensor centroids, int k=1, str metric=\"l2\", "
      "str weight=\"count\", float temperature=1.0) -> Tensor");
  m.def(
      "nearest_centroids(Tensor features, Tensor centroids, int k=1, str metric=\"l2\") "
      "-> (Tensor, Tensor)");
  m.def("class_centroids(Tensor features, Tensor labels, int num_classes) -> (Tensor, Tensor)");
  m.def("lm_scores(Tensor logits) -> Tensor");
  m.def("fm_scores(Tensor features, Tensor centroids, str metric=\"l2\") -> Tensor");
  m.def("sample_scores(Tensor features, Tensor targets, int k=1) -> (Tensor, Tensor, Tensor)");
}

// Defined with the CPU kernels: which tile micro-kernel this CPU runs, and
// k-means' within-group nearest centroids (CPU tensors only; not an op: only
// fastvote.cluster calls it, and on other devices it runs a loop of ops), and
// the certified bf16 path's counters (rows through it, rows it sent back to
// the fp32 kernel).
const char* cpu_tile_kernel_name();
// nearest_centroids (l2) from the bf16 candidate pass alone, approximate (k-means' coarse groups).
std::tuple<at::Tensor, at::Tensor> nearest_centroids_bf16(const at::Tensor& features,
                                                          const at::Tensor& centroids, int64_t k);
std::tuple<at::Tensor, at::Tensor> nearest_in_groups(const at::Tensor& features,
                                                     const at::Tensor& order,
                                                     const at::Tensor& row_starts,
                                                     const at::Tensor& centroids,
                                                     const at::Tensor& centroid_starts, int64_t k);
// ... and one batch of its passes, the bounds updated in place (returns the distances computed).
int64_t update_in_groups(const at::Tensor& features, const at::Tensor& order, const at::Tensor& row_starts,
                         const at::Tensor& centroids, const at::Tensor& centroid_starts, at::Tensor& assigned,
                         at::Tensor& upper, at::Tensor& lower, const at::Tensor& slack);
std::pair<int64_t, int64_t> cpu_certified_stats();
// k-means' passes: the rows whose cluster changed move between the float64 sums and counts, in
// place (CPU tensors; not an op: only fastvote.cluster calls it).
void move_rows(at::Tensor& sums, at::Tensor& counts, const at::Tensor& features, const at::Tensor& before,
               const at::Tensor& after);
// ... and the pass's new centroids and their drifts (CPU tensors).
std::tuple<at::Tensor, at::Tensor> lloyd_means(const at::Tensor& sums, const at::Tensor& counts,
                                               const at::Tensor& centroids, bool normalize);
// k-means++ seeding's greedy picks of a round (csrc/cpu/kmeans_seeding.cpp;
// CPU tensors, not an op: only fastvote.cluster calls it).
at::Tensor greedy_picks(const at::Tensor& between, const at::Tensor& now, const at::Tensor& weight,
                        const at::Tensor& uniforms);
at::Tensor greedy_picks_in_groups(const at::Tensor& candidates, const at::Tensor& sq, const at::Tensor& searched,
                                  double scale, const at::Tensor& now, const at::Tensor& weight,
                                  const at::Tensor& uniforms);

// The certified bf16 CUDA path's counters (csrc/cuda/vote_kernel.cu); none
// without the CUDA kernels.
#ifdef FASTVOTE_WITH_CUDA
std::pair<int64_t, int64_t> cuda_certified_stats();
#else
std::pair<int64_t, int64_t> cuda_certified_stats() { return {0, 0}; }
#endif

}  // namespace fastvote

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvote's compiled ops; they register under torch.ops.fastvote on import.";
  m.def("cpu_kernel", &fastvote::cpu_tile_kernel_name,
        "The CPU tile micro-kernel chosen for this processor at run time.");
  m.def("nearest_centroids_bf16", &fastvote::nearest_centroids_bf16,
        "nearest_centroids (l2) from the bf16 candidate pass alone where the CPU kernels have "
        "one (amxbf16, avx512bf16, bf16emu): approximate squared distances [N, k] and indices, "
        "a near-nearest centroid, not certified; elsewhere the exact op. CPU tensors.");
  m.def("nearest_in_groups", &fastvote::nearest_in_groups,
        "Rows features[order] sorted by group (row_starts [G + 1]) against their own group's "
        "centroids (centroid_starts [G + 1]): squared distances [len(order), k] and indices "
        "(inf / -1 where a group has fewer than k centroids). CPU tensors.");
  m.def("update_in_groups", &fastvote::update_in_groups,
        "One batch of k-means' two-level passes, in place: the rows features[order] (sorted by "
        "group as for nearest_in_groups) whose upper bound exceeds their lower take their group's "
        "nearest two: assigned (int64 [B]), upper = sqrt(d2_1 + slack), lower = sqrt(max(d2_2 - "
        "slack, 0)) (float32 [B]); returns the distances computed. CPU tensors.");
  m.def("move_rows", &fastvote::move_rows,
        "The rows i of features [B, D] float32 whose cluster changed from before[i] to after[i] "
        "([B] int64) move between sums [K, D] and counts [K] (float64, in place): added to the "
        "new cluster's, then subtracted from the old's (none where before[i] is -1), each cluster's rows "
        "in row order. CPU tensors.");
  m.def("lloyd_means", &fastvote::lloyd_means,
        "A k-means pass's new centroids [K, D] float32 from the float64 sums [K, D] and counts [K] "
        "(the means, unit-normalised where normalize; an empty cluster keeps its centroid [K, D]), "
        "and each one's drift [K] float32, never below the exact distance. CPU tensors.");
  m.def("greedy_picks", &fastvote::greedy_picks,
        "k-means++ seeding's greedy picks of a round: the positions [<= b] picked among M "
        "candidates (between [M, M] float32, now and weight [M] float32, uniforms [b, trials] "
        "float64); fewer than b when every candidate is covered first. CPU tensors.");
  m.def("greedy_picks_in_groups", &fastvote::greedy_picks_in_groups,
        "greedy_picks of two-level seeding, the distances computed for the covering pairs only: "
        "candidate t covers i when i searches t's group (candidates [M, D] float32, sq [M] float32 "
        "their squared norms, searched [M, R] int64 each one's groups, its own first; distances "
        "divided by scale). CPU tensors.");
  m.def("cpu_bf16_stats", &fastvote::cpu_certified_stats,
        "(rows, fallback_rows): rows scored by the certified bf16 CPU path since import, and "
        "those whose top-k it could not certify and the fp32 kernel scored again.");
  m.def("cuda_bf16_stats", &fastvote::cuda_certified_stats,
        "(rows, fallback_rows): rows scored by the certified bf16 CUDA path "
        "(FASTVOTE_CUDA_KERNEL=bf16) since import, and those whose top-k it could not certify "
        "and the fused fp32 kernel scored again. (0, 0) in a build without CUDA kernels.");
#ifdef FASTVOTE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
