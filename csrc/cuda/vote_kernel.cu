// The CUDA backend of every fastvote op: the same contract as the CPU backend
// (csrc/cpu/vote_kernel.cpp), the same argument checks (fastvote/checks.h),
// registered under the CUDA dispatch key. The kernels are in the .cuh files
// beside this one; this file sizes and launches them.
//
// Errors without stalls: kernels record the first centroid (or label
// position) and the first feature / logit row holding NaN/Inf in a two-slot
// int64 flag on the device (atomicMin), keep such rows out of the votes, and
// carry on. Once all of an op's kernels are queued, the op reads those 16
// bytes back -- its single host synchronisation, after the work rather than
// between launches (the opt-in certified bf16 path adds one: how many rows
// it hands back to the fused kernel) -- and raises the CPU backend's error.
// Everything else runs on the current stream with workspace from the caching
// allocator.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>

#include "certified.cuh"
#include "fastvote/certify.h"
#include "fastvote/checks.h"
#include "fastvote/topk.h"
#include "fm_kernel.cuh"
#include "lm_kernel.cuh"
#include "reduce_kernels.cuh"

namespace fastvote {
namespace cuda {
namespace {

constexpr int64_t kNoRow = std::numeric_limits<int64_t>::max();
// Class and centroid indices are int32 on the device.
constexpr int64_t kMaxClasses = int64_t{1} << 30;
// k above kMaxListK: keys are materialised for this many (row, class) pairs
// at a time (64 MB of float32) and sorted.
constexpr int64_t kSortChunk = int64_t{1} << 24;
// class_centroids: at most this many chunks of rows in label order, each
// leaving two [D] float64 partials (16 KB per feature column in all).
constexpr int64_t kClassChunks = 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(items, per_block), 1, INT_MAX));
}

struct Device {
  int sms;
  int smem_optin;
};

Device device_info(const at::Tensor& t) {
  const int index = t.get_device();
  Device d{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
  return d;
}

// Blocks of `kernel` that fit on the whole device at once (persistent grids).
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads, size_t smem, const Device& dev) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  TORCH_CHECK(per_sm > 0, "fastvote: a kernel needing ", smem,
              " bytes of shared memory cannot run on this GPU");
  return static_cast<int64_t>(per_sm) * dev.sms;
}

// Whether a launch of `kernel` should keep its vote histogram of `bins` bins
// in shared memory: only when the histogram fits the opt-in limit and costs
// no resident blocks per SM (a 48 KB histogram beside a large k would halve
// them). Sets the kernel's dynamic shared-memory limit for the chosen layout
// and returns the bins to pass (0: global atomics) and the bytes to launch with.
template <typename Kernel>
std::pair<int, size_t> choose_hist(Kernel kernel, int threads, size_t smem_without, int bins,
                                   const Device& dev) {
  auto per_sm = [&](size_t smem) {
    if (smem > static_cast<size_t>(dev.smem_optin)) return 0;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
    return blocks;
  };
  const size_t smem_with = smem_without + hist_bytes(bins);
  if (bins > 0 && bins <= kSharedHistBins && per_sm(smem_with) >= per_sm(smem_without)) {
    per_sm(smem_with);
    return {bins, smem_with};
  }
  per_sm(smem_without);
  return {0, smem_without};
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Slot 0: first bad centroid / label position; slot 1: first bad row.
class ErrorFlags {
 public:
  explicit ErrorFlags(const at::Tensor& like)
      : flags_(at::full({2}, kNoRow, like.options().dtype(at::kLong))) {}
  long long* centroid() { return reinterpret_cast<long long*>(flags_.mutable_data_ptr<int64_t>()); }
  long long* row() { return centroid() + 1; }
  at::Tensor row_slot() { return flags_.narrow(0, 1, 1); }
  // The op's single host synchronisation (see the top of this file).
  std::array<int64_t, 2> read() const {
    const at::Tensor host = flags_.cpu();
    const int64_t* f = host.const_data_ptr<int64_t>();
    return {f[0], f[1]};
  }
  // Raises the CPU backend's error for the first bad centroid, then row.
  void raise_non_finite(const char* op, const char* centroid_arg, const char* row_arg) const {
    const std::array<int64_t, 2> f = read();
    if (f[0] != kNoRow) fail_non_finite(op, centroid_arg, f[0]);
    if (f[1] != kNoRow) fail_non_finite(op, row_arg, f[1]);
  }

 private:
  at::Tensor flags_;
};

void check_limits(const char* op, int64_t num_classes, int64_t dim) {
  TORCH_CHECK_VALUE(num_classes <= kMaxClasses, "fastvote.", op, ": K=", num_classes,
                    " is above the CUDA backend's limit of 2^30 classes; use the CPU");
  TORCH_CHECK_VALUE(dim <= INT_MAX, "fastvote.", op, ": D=", dim,
                    " is above the CUDA backend's limit of 2^31 - 1 feature dimensions");
}

// Fixed-point vote sums -> float64 votes: the conversion of
// fastvote::fixed_to_double (int64 -> double, then an exact scaling).
at::Tensor votes_from_units(const at::Tensor& units) {
  return units.to(at::kDouble).mul_(kFixedToDouble);
}

// An int64 tensor as the uint64 the device atomics add to.
unsigned long long* as_u64(at::Tensor& t) {
  return reinterpret_cast<unsigned long long*>(t.mutable_data_ptr<int64_t>());
}

// Row groups for the column-reduction kernels: enough blocks to fill the GPU.
int64_t rows_per_group(int64_t n, int64_t col_blocks, const Device& dev) {
  const int64_t groups = std::clamp<int64_t>(ceil_div(8 * dev.sms, col_blocks), 1, 65535);
  return std::max<int64_t>(ceil_div(n, groups), 1);
}

// out[j] = sum of partial[:, j] in row-group order (deterministic; see reduce_kernels.cuh).
void sum_partials(const at::Tensor& partial, at::Tensor& out) {
  const int64_t cols = partial.size(1);
  reduce::sum_partials_kernel<<<grid_for(cols, reduce::kThreads), reduce::kThreads, 0,
                                current_stream()>>>(partial.const_data_ptr<double>(),
                                                    partial.size(0), cols,
                                                    out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- fm_vote / nearest_centroids -------------------------------------------

struct Centroids {
  at::Tensor storage;  // float32 [K, D], unit stride along D (the input itself when it is)
  at::Tensor bias, scale;
  int64_t count() const { return storage.size(0); }
  int64_t dim() const { return storage.size(1); }
};

Centroids prepare_centroids(const at::Tensor& centroids, Metric metric, ErrorFlags& flags) {
  const int64_t count = centroids.size(0);
  const int64_t dim = centroids.size(1);
  const at::TensorOptions f32 = centroids.options().dtype(at::kFloat);
  const bool usable = centroids.scalar_type() == at::kFloat && centroids.stride(1) == 1;
  Centroids c;
  c.storage = usable ? centroids : at::empty({count, dim}, f32);
  c.bias = at::empty({count}, f32);
  c.scale = at::empty({count}, f32);
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(count, reduce::kWarps), 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, centroids.scalar_type(),
                                  "fastvote_prepare_centroids", [&] {
    reduce::prepare_centroids_kernel<scalar_t><<<blocks, reduce::kThreads, 0, current_stream()>>>(
        centroids.const_data_ptr<scalar_t>(), centroids.stride(0), centroids.stride(1),
        static_cast<int>(count), static_cast<int>(dim), metric,
        usable ? nullptr : c.storage.mutable_data_ptr<float>(), c.bias.mutable_data_ptr<float>(),
        c.scale.mutable_data_ptr<float>(), flags.centroid());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c;
}

// How many ranges to split the centroids into, and their length in tiles. A
// persistent grid runs ceil(items / resident) rounds of equal items: pick the
// split (of up to ~4 rounds' worth of items) that leaves the least idle.
// Fewer splits win ties: each split adds a prologue and a merge.
std::pair<int64_t, int64_t> choose_splits(int64_t row_tiles, int64_t col_tiles, int64_t resident) {
  std::pair<int64_t, int64_t> best{1, col_tiles};
  double best_use = 0.0;
  const int64_t most = std::min(col_tiles, std::max<int64_t>(1, ceil_div(4 * resident, row_tiles)));
  for (int64_t want = 1; want <= most; ++want) {
    const int64_t tiles = ceil_div(col_tiles, want);
    const int64_t splits = ceil_div(col_tiles, tiles);
    const int64_t items = row_tiles * splits;
    const int64_t grid = std::min(items, resident);
    const double use = static_cast<double>(items) / (ceil_div(items, grid) * resident);
    if (use > best_use + 1e-9) {
      best_use = use;
      best = {splits, tiles};
    }
  }
  return best;
}

// FASTVOTE_CUDA_LAYOUT=rows keeps the fused kernel on scalar row loads where
// vector loads would apply; "rows4" (or unset) allows vector loads. On sm_90
// the vector-load variant spills registers, so benchmarks/bench_vote.py times
// both. Read at every call, so a process can switch between them.
bool vector_loads_allowed() {
  const char* value = std::getenv("FASTVOTE_CUDA_LAYOUT");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "rows4") == 0) return true;
  TORCH_CHECK_VALUE(std::strcmp(value, "rows") == 0, "fastvote: FASTVOTE_CUDA_LAYOUT=", value,
                    " is unknown; expected 'rows4' (vector loads where aligned, the default) or "
                    "'rows' (scalar row loads)");
  return false;
}

// How the fused kernel reads the operands (fm_kernel.cuh, Layout): vector
// loads when both the feature rows and the centroid rows are 4-element
// aligned runs along D (16-bit and 32-bit inputs) and FASTVOTE_CUDA_LAYOUT
// allows them, row-fastest reads for a transposed feature matrix.
fm::Layout fused_layout(const at::Tensor& features, const Centroids& c) {
  const int64_t n = features.size(0);
  const int64_t bytes = static_cast<int64_t>(features.element_size());
  const bool x_vec = features.stride(1) == 1 &&
                     reinterpret_cast<uintptr_t>(features.const_data_ptr()) % (4 * bytes) == 0 &&
                     (n <= 1 || features.stride(0) % 4 == 0);
  const bool c_vec = c.storage.stride(1) == 1 &&
                     reinterpret_cast<uintptr_t>(c.storage.const_data_ptr()) % 16 == 0 &&
                     (c.count() <= 1 || c.storage.stride(0) % 4 == 0);
  if (bytes <= 4 && c.dim() % 4 == 0 && x_vec && c_vec && vector_loads_allowed()) {
    return fm::Layout::Rows4;
  }
  if (features.stride(0) == 1 && features.stride(1) != 1) return fm::Layout::Cols;
  return fm::Layout::Rows;
}

template <typename scalar_t>
auto fused_kernel_for(fm::Layout layout) {
  switch (layout) {
    case fm::Layout::Rows4:
      // 4 elements of at most 16 bytes (not float64, which fused_layout never reads so).
      if constexpr (sizeof(scalar_t) <= 4) return fm::fused_kernel<scalar_t, fm::Layout::Rows4>;
      return fm::fused_kernel<scalar_t, fm::Layout::Rows>;
    case fm::Layout::Cols: return fm::fused_kernel<scalar_t, fm::Layout::Cols>;
    default: return fm::fused_kernel<scalar_t, fm::Layout::Rows>;
  }
}

// What one fused launch writes, by mode.
struct FusedOut {
  unsigned long long* votes = nullptr;  // Vote: [K] counts or fixed-point units
  float* values = nullptr;              // Nearest: [n, k]
  int64_t* indices = nullptr;
  float* keys = nullptr;  // Keys: [n, K]
  float* sq = nullptr;    // Keys: [n]
};

void run_fused(fm::Mode mode, const at::Tensor& features, int64_t row_offset, const Centroids& c,
               Metric metric, int k, Weight weight, float inv_temperature, long long* bad_row,
               const FusedOut& out) {
  const int64_t n = features.size(0);
  if (n == 0) return;
  const int64_t num_c = c.count();
  const Device dev = device_info(features);
  const int64_t row_tiles = ceil_div(n, fm::kBM);
  const int64_t col_tiles = ceil_div(num_c, fm::kBN);
  const size_t base_smem = fm::smem_bytes(k, 0);
  TORCH_CHECK(base_smem <= static_cast<size_t>(dev.smem_optin), "fastvote: k=", k, " needs ",
              base_smem, " bytes of shared memory per block; this GPU allows ", dev.smem_optin);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                  "fastvote_fused", [&] {
    const auto kernel = fused_kernel_for<scalar_t>(fused_layout(features, c));
    const auto [hist_bins, smem] = choose_hist(
        kernel, fm::kThreads, base_smem, mode == fm::Mode::Vote ? static_cast<int>(num_c) : 0, dev);
    const int64_t resident = resident_blocks(kernel, fm::kThreads, smem, dev);
    const auto [splits, tiles_per_split] = choose_splits(row_tiles, col_tiles, resident);
    const int64_t items = row_tiles * splits;

    at::Tensor part_keys, part_idx, arrivals;
    fm::Args<scalar_t> a{};
    if (splits > 1 && mode != fm::Mode::Keys) {
      part_keys = at::empty({items * fm::kBM * k}, features.options().dtype(at::kFloat));
      part_idx = at::empty({items * fm::kBM * k}, features.options().dtype(at::kInt));
      arrivals = at::zeros({row_tiles}, features.options().dtype(at::kInt));
      a.part_keys = part_keys.mutable_data_ptr<float>();
      a.part_idx = part_idx.mutable_data_ptr<int>();
      a.arrivals = arrivals.mutable_data_ptr<int>();
    }
    a.x = features.const_data_ptr<scalar_t>();
    a.xs0 = features.stride(0);
    a.xs1 = features.stride(1);
    a.n = n;
    a.row_offset = row_offset;
    a.dim = static_cast<int>(c.dim());
    a.c = c.storage.const_data_ptr<float>();
    a.ldc = c.storage.stride(0);
    a.num_c = static_cast<int>(num_c);
    a.bias = c.bias.const_data_ptr<float>();
    a.scale = c.scale.const_data_ptr<float>();
    a.metric = metric;
    a.mode = mode;
    a.weight = weight;
    a.inv_temperature = inv_temperature;
    a.k = k;
    a.splits = static_cast<int>(splits);
    a.tiles_per_split = static_cast<int>(tiles_per_split);
    a.items = items;
    a.hist_bins = hist_bins;
    a.votes = out.votes;
    a.values = out.values;
    a.indices = out.indices;
    a.keys_out = out.keys;
    a.sq_out = out.sq;
    a.bad_row = bad_row;
    const int64_t grid = std::min(items, resident);
    kernel<<<static_cast<unsigned>(grid), fm::kThreads, smem, current_stream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Rows [r0, r0 + rows) of `features`: every key, float32 [rows, K], and the
// rows' squared norms. The large-k path ranks these with a stable sort.
std::tuple<at::Tensor, at::Tensor> fused_keys(const at::Tensor& features, int64_t r0, int64_t rows,
                                              const Centroids& c, Metric metric, long long* bad_row) {
  const at::TensorOptions f32 = features.options().dtype(at::kFloat);
  at::Tensor keys = at::empty({rows, c.count()}, f32);
  at::Tensor sq = at::empty({rows}, f32);
  FusedOut out;
  out.keys = keys.mutable_data_ptr<float>();
  out.sq = sq.mutable_data_ptr<float>();
  run_fused(fm::Mode::Keys, features.narrow(0, r0, rows), r0, c, metric, 1, Weight::Count, 1.0f,
            bad_row, out);
  return {keys, sq};
}

// The k smallest keys of each row, best first; a stable sort keeps equal keys
// in index order, which is the tie rule.
std::tuple<at::Tensor, at::Tensor> sorted_topk(const at::Tensor& keys, int64_t k) {
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  return {std::get<0>(sorted).narrow(1, 0, k), std::get<1>(sorted).narrow(1, 0, k)};
}

// Adds the votes of rows' sorted picks (the large-k path) to the fixed-point
// `units`, with the fused kernels' weights and arithmetic.
void add_sorted_votes(const at::Tensor& top_keys, const at::Tensor& top_idx, Weight weight,
                      float inv_temperature, at::Tensor& units) {
  const int64_t rows = top_keys.size(0);
  const int64_t k = top_keys.size(1);
  if (rows == 0) return;
  TORCH_INTERNAL_ASSERT(top_keys.stride(1) == 1 && top_idx.stride(1) == 1);
  at::Tensor weights = at::empty({weight == Weight::Count ? 0 : rows * k},
                                 top_keys.options().dtype(at::kFloat));
  reduce::sorted_votes_kernel<<<grid_for(rows, reduce::kThreads), reduce::kThreads, 0,
                                current_stream()>>>(
      top_keys.const_data_ptr<float>(), top_keys.stride(0), top_idx.const_data_ptr<int64_t>(),
      top_idx.stride(0), rows, static_cast<int>(k), weight, inv_temperature,
      weights.mutable_data_ptr<float>(), as_u64(units));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t sort_chunk_rows(int64_t num_classes) { return std::max<int64_t>(1, kSortChunk / num_classes); }

// ---- the certified bf16 path (certified.cuh) ---------------------------------

// Rows through the certified path since the process started, and how many of
// them the proof sent back to the fused kernel (_C.cuda_bf16_stats()).
std::atomic<int64_t> g_certified_rows{0}, g_certified_fallback_rows{0};

// FASTVOTE_CUDA_KERNEL=bf16 answers fm_vote / nearest_centroids through the
// certified bf16 tensor-core path, whose answers are the fused kernel's, bit
// for bit; "fp32" (or unset) keeps them on the fused fp32 kernel. The path is
// opt-in until a GPU run has checked it. Read at every call.
bool certified_requested(const at::Tensor& features) {
  const char* value = std::getenv("FASTVOTE_CUDA_KERNEL");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "fp32") == 0) return false;
  TORCH_CHECK_VALUE(std::strcmp(value, "bf16") == 0, "fastvote: FASTVOTE_CUDA_KERNEL=", value,
                    " is unknown; expected 'fp32' (the fused fp32 kernel, the default) or 'bf16' "
                    "(certified bf16 tensor-core candidates, the same answers)");
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, features.get_device()));
  TORCH_CHECK(major >= 8, "fastvote: FASTVOTE_CUDA_KERNEL=bf16 needs bf16 tensor cores (compute "
              "capability 8.0 or later); this GPU's is ", major, ".x");
  return true;
}

// Whether a call takes the certified path: rows to score, centroids left
// outside the k + m candidates, lists of k + m + 1 that the fused kernel's
// list code holds, and D padded to the pass's stages within an int.
bool certified_applies(int64_t n, int64_t num_c, int64_t dim, int64_t k) {
  return n > 0 && num_c > k + certify::kExtraCandidates && k <= certified::kMaxK &&
         dim <= INT_MAX - certified::kBK;
}

// Rows a chunk of the certified path packs at a time: 2^25 bf16 features
// (64 MB), with their candidate lists and bound terms.
int64_t certified_chunk_rows(int64_t dp) { return std::max<int64_t>(certified::kBM, (int64_t{1} << 25) / dp); }

// The centroids as the candidate pass reads them, and the bound's centroid
// terms, on the device.
struct CertifiedCentroids {
  at::Tensor packed;    // int16 [K][dp]: bf16 of w_j - nu, zero padded
  at::Tensor beta_hat;  // float32 [K]: the pass's bias
  at::Tensor mu, nu;    // float32 [D]: the row and centroid centres
  at::Tensor terms;     // bytes of one certify::CentroidTerms
  int dp;               // D rounded up to the pass's stages (kBK)
};

CertifiedCentroids prepare_certified(const Centroids& c, Metric metric, const Device& dev) {
  const int64_t count = c.count();
  const int64_t dim = c.dim();
  const at::TensorOptions opts = c.storage.options();
  CertifiedCentroids cc;
  cc.dp = static_cast<int>(ceil_div(dim, certified::kBK) * certified::kBK);
  cc.packed = at::empty({count, cc.dp}, opts.dtype(at::kShort));
  cc.beta_hat = at::empty({count}, opts.dtype(at::kFloat));
  cc.mu = at::empty({dim}, opts.dtype(at::kFloat));
  cc.nu = at::empty({dim}, opts.dtype(at::kFloat));
  cc.terms = at::zeros({static_cast<int64_t>(sizeof(certify::CentroidTerms))}, opts.dtype(at::kByte));
  auto* terms = reinterpret_cast<certify::CentroidTerms*>(cc.terms.mutable_data_ptr<uint8_t>());

  // The column sums of w_j = scale_j c_j, then the centres from them.
  const int64_t col_blocks = ceil_div(dim, 32);
  const int64_t group = rows_per_group(count, col_blocks, dev);
  const int64_t groups = ceil_div(count, group);
  at::Tensor partial = at::empty({groups, dim}, opts.dtype(at::kDouble));
  at::Tensor sums = at::empty({dim}, opts.dtype(at::kDouble));
  reduce::column_sums_kernel<float>
      <<<dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(groups)), reduce::kThreads, 0,
         current_stream()>>>(c.storage.const_data_ptr<float>(), c.storage.stride(0), 1, count,
                             static_cast<int>(dim), c.scale.const_data_ptr<float>(), group,
                             partial.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_partials(partial, sums);
  certified::centres_kernel<<<1, certified::kThreads, 0, current_stream()>>>(
      sums.const_data_ptr<double>(), static_cast<int>(count), static_cast<int>(dim), metric,
      cc.mu.mutable_data_ptr<float>(), cc.nu.mutable_data_ptr<float>(), terms);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(count, certified::kWarps), 65535));
  certified::pack_centroids_kernel<<<blocks, certified::kThreads, 0, current_stream()>>>(
      c.storage.const_data_ptr<float>(), c.storage.stride(0), static_cast<int>(count),
      static_cast<int>(dim), cc.dp, c.bias.const_data_ptr<float>(), c.scale.const_data_ptr<float>(),
      cc.mu.const_data_ptr<float>(), cc.nu.const_data_ptr<float>(),
      reinterpret_cast<uint16_t*>(cc.packed.mutable_data_ptr<int16_t>()),
      cc.beta_hat.mutable_data_ptr<float>(), terms);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return cc;
}

// What the certified path writes: fm_vote's votes, or nearest_centroids' picks.
struct CertifiedOut {
  at::Tensor units;            // [K] counts or fixed-point units
  at::Tensor values, indices;  // [N, k]
};

// fm_vote (Vote) or nearest_centroids (Nearest) through the certified path:
// chunks of rows packed, their candidates, the exact re-rank and the proof,
// then the rows it could not prove through the fused kernel, gathered (votes
// are integer sums: the same in any order). Reading back how many rows fell
// back is the path's one host synchronisation besides the op's error flags.
void run_certified(fm::Mode mode, const at::Tensor& features, const Centroids& c, Metric metric,
                   int k, Weight weight, float inv_temperature, long long* bad_row,
                   const CertifiedOut& out) {
  const int64_t n = features.size(0);
  const int num_c = static_cast<int>(c.count());
  const int dim = static_cast<int>(c.dim());
  const int kl = k + certify::kExtraCandidates + 1;
  const Device dev = device_info(features);
  const CertifiedCentroids cc = prepare_certified(c, metric, dev);
  const certify::PassError pass = certify::tensor_core_error(cc.dp / 16);
  const auto* terms = reinterpret_cast<const certify::CentroidTerms*>(cc.terms.const_data_ptr<uint8_t>());

  const at::TensorOptions opts = features.options();
  const int64_t chunk = std::min(n, certified_chunk_rows(cc.dp));
  at::Tensor packed = at::empty({chunk, cc.dp}, opts.dtype(at::kShort));
  at::Tensor info = at::empty({chunk * static_cast<int64_t>(sizeof(certified::RowInfo))}, opts.dtype(at::kByte));
  at::Tensor cand_keys = at::empty({chunk, kl}, opts.dtype(at::kFloat));
  at::Tensor cand_idx = at::empty({chunk, kl}, opts.dtype(at::kInt));
  at::Tensor fallback = at::empty({n}, opts.dtype(at::kLong));
  at::Tensor fallback_count = at::zeros({1}, opts.dtype(at::kLong));
  at::Tensor units = out.units;
  auto* packed_rows = reinterpret_cast<uint16_t*>(packed.mutable_data_ptr<int16_t>());
  auto* row_info = reinterpret_cast<certified::RowInfo*>(info.mutable_data_ptr<uint8_t>());

  const size_t candidates_smem = certified::candidates_smem_bytes(kl);
  TORCH_CHECK(candidates_smem <= static_cast<size_t>(dev.smem_optin), "fastvote: k=", k, " needs ",
              candidates_smem, " bytes of shared memory per block; this GPU allows ", dev.smem_optin);
  const int64_t resident = resident_blocks(certified::candidates_kernel, certified::kThreads, candidates_smem, dev);
  const int64_t col_tiles = ceil_div(num_c, certified::kBN);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                  "fastvote_certified", [&] {
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t rows = std::min(chunk, n - r0);
      const at::Tensor x = features.narrow(0, r0, rows);
      certified::pack_rows_kernel<scalar_t>
          <<<grid_for(rows, certified::kWarps), certified::kThreads, 0, current_stream()>>>(
              x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), rows, r0, dim, cc.dp, metric,
              cc.mu.const_data_ptr<float>(), cc.nu.const_data_ptr<float>(), terms, packed_rows,
              row_info, bad_row);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      const int64_t row_tiles = ceil_div(rows, certified::kBM);
      const auto [splits, tiles_per_split] = choose_splits(row_tiles, col_tiles, resident);
      at::Tensor part_keys, part_idx, arrivals;
      certified::CandidateArgs a{};
      a.items = row_tiles * splits;
      if (splits > 1) {
        part_keys = at::empty({a.items * certified::kBM * kl}, opts.dtype(at::kFloat));
        part_idx = at::empty({a.items * certified::kBM * kl}, opts.dtype(at::kInt));
        arrivals = at::zeros({row_tiles}, opts.dtype(at::kInt));
        a.part_keys = part_keys.mutable_data_ptr<float>();
        a.part_idx = part_idx.mutable_data_ptr<int>();
        a.arrivals = arrivals.mutable_data_ptr<int>();
      }
      a.rows = reinterpret_cast<const uint32_t*>(packed_rows);
      a.cents = reinterpret_cast<const uint32_t*>(cc.packed.const_data_ptr<int16_t>());
      a.n = rows;
      a.dp = cc.dp;
      a.num_c = num_c;
      a.beta_hat = cc.beta_hat.const_data_ptr<float>();
      a.kl = kl;
      a.splits = static_cast<int>(splits);
      a.tiles_per_split = static_cast<int>(tiles_per_split);
      a.cand_keys = cand_keys.mutable_data_ptr<float>();
      a.cand_idx = cand_idx.mutable_data_ptr<int>();
      certified::candidates_kernel<<<static_cast<unsigned>(std::min(a.items, resident)), certified::kThreads,
                                     candidates_smem, current_stream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      certified::RerankArgs<scalar_t> b{};
      b.x = x.const_data_ptr<scalar_t>();
      b.xs0 = x.stride(0);
      b.xs1 = x.stride(1);
      b.n = rows;
      b.row_offset = r0;
      b.dim = dim;
      b.c = c.storage.const_data_ptr<float>();
      b.ldc = c.storage.stride(0);
      b.num_c = num_c;
      b.bias = c.bias.const_data_ptr<float>();
      b.scale = c.scale.const_data_ptr<float>();
      b.metric = metric;
      b.vote = mode == fm::Mode::Vote;
      b.weight = weight;
      b.inv_temperature = inv_temperature;
      b.k = k;
      b.cand_keys = cand_keys.const_data_ptr<float>();
      b.cand_idx = cand_idx.const_data_ptr<int>();
      b.info = row_info;
      b.terms = terms;
      b.pass = pass;
      if (b.vote) {
        b.votes = as_u64(units);
      } else {
        b.values = out.values.mutable_data_ptr<float>();
        b.indices = out.indices.mutable_data_ptr<int64_t>();
      }
      b.fallback = fallback.mutable_data_ptr<int64_t>();
      b.fallback_count = as_u64(fallback_count);
      certified::rerank_kernel<scalar_t>
          <<<grid_for(rows, certified::kRerankRows), certified::kThreads,
             certified::rerank_smem_bytes(k), current_stream()>>>(b);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });

  const int64_t fallen = fallback_count.item<int64_t>();
  g_certified_rows += n;
  g_certified_fallback_rows += fallen;
  if (fallen == 0) return;
  const at::Tensor unproven = fallback.narrow(0, 0, fallen);
  const at::Tensor again = features.index_select(0, unproven);  // finite rows: bad_row stays untouched
  FusedOut fused;
  if (mode == fm::Mode::Vote) {
    fused.votes = as_u64(units);
    run_fused(fm::Mode::Vote, again, 0, c, metric, k, weight, inv_temperature, bad_row, fused);
    return;
  }
  at::Tensor values = at::empty({fallen, k}, opts.dtype(at::kFloat));
  at::Tensor indices = at::empty({fallen, k}, opts.dtype(at::kLong));
  fused.values = values.mutable_data_ptr<float>();
  fused.indices = indices.mutable_data_ptr<int64_t>();
  run_fused(fm::Mode::Nearest, again, 0, c, metric, k, Weight::Count, 1.0f, bad_row, fused);
  out.values.index_copy_(0, unproven, values);
  out.indices.index_copy_(0, unproven, indices);
}

at::Tensor fm_vote_cuda(const at::Tensor& features, const at::Tensor& centroids, int64_t k,
                        c10::string_view metric_name, c10::string_view weight_name,
                        double temperature) {
  check_features_centroids("fm_vote", features, centroids);
  check_k("fm_vote", k, centroids.size(0), "centroids");
  const Metric metric = parse_metric("fm_vote", metric_name);
  const Weight weight = parse_weight("fm_vote", weight_name);
  const float inv_t = inverse_temperature("fm_vote", temperature);
  check_limits("fm_vote", centroids.size(0), centroids.size(1));
  check_weighted_rows("fm_vote", features.size(0), weight);
  const c10::cuda::CUDAGuard guard(features.device());
  const bool bf16 = certified_requested(features);

  ErrorFlags flags(features);
  const Centroids c = prepare_centroids(centroids, metric, flags);
  const int64_t n = features.size(0);
  const int64_t num_c = c.count();
  at::Tensor units = at::zeros({num_c}, features.options().dtype(at::kLong));
  if (bf16 && certified_applies(n, num_c, c.dim(), k)) {
    run_certified(fm::Mode::Vote, features, c, metric, static_cast<int>(k), weight, inv_t, flags.row(),
                  {units, {}, {}});
  } else if (k <= kMaxListK) {
    FusedOut out;
    out.votes = as_u64(units);
    run_fused(fm::Mode::Vote, features, 0, c, metric, static_cast<int>(k), weight, inv_t,
              flags.row(), out);
  } else {
    const int64_t chunk = sort_chunk_rows(num_c);
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t rows = std::min(chunk, n - r0);
      const auto keys = fused_keys(features, r0, rows, c, metric, flags.row());
      const auto top = sorted_topk(std::get<0>(keys), k);
      add_sorted_votes(std::get<0>(top), std::get<1>(top), weight, inv_t, units);
    }
  }
  flags.raise_non_finite("fm_vote", "centroids", "features");
  return weight == Weight::Count ? units : votes_from_units(units);
}

std::tuple<at::Tensor, at::Tensor> nearest_centroids_cuda(const at::Tensor& features,
                                                          const at::Tensor& centroids, int64_t k,
                                                          c10::string_view metric_name) {
  check_features_centroids("nearest_centroids", features, centroids);
  check_k("nearest_centroids", k, centroids.size(0), "centroids");
  const Metric metric = parse_metric("nearest_centroids", metric_name);
  check_limits("nearest_centroids", centroids.size(0), centroids.size(1));
  const c10::cuda::CUDAGuard guard(features.device());
  const bool bf16 = certified_requested(features);

  ErrorFlags flags(features);
  const Centroids c = prepare_centroids(centroids, metric, flags);
  const int64_t n = features.size(0);
  at::Tensor values = at::empty({n, k}, features.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({n, k}, features.options().dtype(at::kLong));
  if (bf16 && certified_applies(n, c.count(), c.dim(), k)) {
    run_certified(fm::Mode::Nearest, features, c, metric, static_cast<int>(k), Weight::Count, 1.0f,
                  flags.row(), {{}, values, indices});
  } else if (k <= kMaxListK) {
    FusedOut out;
    out.values = values.mutable_data_ptr<float>();
    out.indices = indices.mutable_data_ptr<int64_t>();
    run_fused(fm::Mode::Nearest, features, 0, c, metric, static_cast<int>(k), Weight::Count, 1.0f,
              flags.row(), out);
  } else {
    const int64_t chunk = sort_chunk_rows(c.count());
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t rows = std::min(chunk, n - r0);
      const auto keys = fused_keys(features, r0, rows, c, metric, flags.row());
      const auto top = sorted_topk(std::get<0>(keys), k);
      const at::Tensor& top_keys = std::get<0>(top);
      // Keys omit ||x||^2 (l2) or are negated similarities (cosine).
      values.narrow(0, r0, rows)
          .copy_(metric == Metric::L2 ? top_keys.add(std::get<1>(keys).unsqueeze(1)).clamp_min_(0)
                                      : top_keys.neg());
      indices.narrow(0, r0, rows).copy_(std::get<1>(top));
    }
  }
  flags.raise_non_finite("nearest_centroids", "centroids", "features");
  return {values, indices};
}

// ---- lm_vote ----------------------------------------------------------------

template <typename scalar_t, int V>
void launch_lm_vote(const at::Tensor& logits, int k, Weight weight, at::Tensor& units,
                    long long* bad_row) {
  const int64_t num_c = logits.size(1);
  const Device dev = device_info(logits);
  const auto kernel = lm::vote_kernel<scalar_t, V>;
  const auto [hist_bins, smem] =
      choose_hist(kernel, lm::kThreads, lm::smem_bytes(k, 0), static_cast<int>(num_c), dev);
  const int64_t resident = resident_blocks(kernel, lm::kThreads, smem, dev);
  lm::Args<scalar_t> a{};
  a.x = logits.const_data_ptr<scalar_t>();
  a.s0 = logits.stride(0);
  a.s1 = logits.stride(1);
  a.n = logits.size(0);
  a.num_c = static_cast<int>(num_c);
  a.k = k;
  a.weight = weight;
  a.hist_bins = hist_bins;
  a.votes = as_u64(units);
  a.bad_row = bad_row;
  const int64_t grid = std::min(ceil_div(a.n, lm::kWarps), resident);
  kernel<<<static_cast<unsigned>(grid), lm::kThreads, smem, current_stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Rows can be read 16 bytes at a time: unit column stride, every row aligned.
bool rows_vectorizable(const at::Tensor& t) {
  const int64_t bytes = static_cast<int64_t>(t.element_size());
  return t.stride(1) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 &&
         (t.size(0) <= 1 || (t.stride(0) * bytes) % 16 == 0);
}

at::Tensor lm_vote_cuda(const at::Tensor& logits, int64_t k, c10::string_view weight_name) {
  check_logits("lm_vote", logits);
  check_k("lm_vote", k, logits.size(1), "source classes, the logits' columns");
  const Weight weight = parse_weight("lm_vote", weight_name);
  check_limits("lm_vote", logits.size(1), 0);
  check_weighted_rows("lm_vote", logits.size(0), weight);
  const c10::cuda::CUDAGuard guard(logits.device());

  ErrorFlags flags(logits);
  const int64_t n = logits.size(0);
  const int64_t num_c = logits.size(1);
  at::Tensor units = at::zeros({num_c}, logits.options().dtype(at::kLong));
  if (k <= kMaxListK) {
    if (n > 0) {
      const bool vectorized = rows_vectorizable(logits);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                      "fastvote_lm_vote", [&] {
        constexpr int V = 16 / sizeof(scalar_t);
        if (vectorized) {
          launch_lm_vote<scalar_t, V>(logits, static_cast<int>(k), weight, units, flags.row());
        } else {
          launch_lm_vote<scalar_t, 1>(logits, static_cast<int>(k), weight, units, flags.row());
        }
      });
    }
  } else {
    const int64_t chunk = sort_chunk_rows(num_c);
    at::Tensor bad_slot = flags.row_slot();
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t rows = std::min(chunk, n - r0);
      const at::Tensor keys = logits.narrow(0, r0, rows).to(at::kFloat).neg();  // .to may alias the input
      // The first row with NaN/Inf, kept on the device like the kernels' flags.
      const at::Tensor row_ids = at::arange(r0, r0 + rows, logits.options().dtype(at::kLong));
      const at::Tensor first_bad =
          at::where(at::isfinite(keys).all(1), kNoRow, row_ids).min().reshape({1});
      bad_slot.copy_(at::minimum(bad_slot, first_bad));
      const auto top = sorted_topk(keys, k);
      add_sorted_votes(std::get<0>(top), std::get<1>(top), weight, 1.0f, units);
    }
  }
  flags.raise_non_finite("lm_vote", "logits", "logits");
  return weight == Weight::Count ? units : votes_from_units(units);
}

// ---- lm_scores, fm_scores, class_centroids ----------------------------------

at::Tensor lm_scores_cuda(const at::Tensor& logits) {
  check_logits("lm_scores", logits);
  check_limits("lm_scores", logits.size(1), 0);
  const c10::cuda::CUDAGuard guard(logits.device());
  ErrorFlags flags(logits);
  const int64_t n = logits.size(0);
  const int64_t num_c = logits.size(1);
  at::Tensor out = at::zeros({num_c}, logits.options().dtype(at::kDouble));
  if (n > 0) {
    const Device dev = device_info(logits);
    at::Tensor row_max = at::empty({n}, logits.options().dtype(at::kFloat));
    at::Tensor row_inv_sum = at::empty({n}, logits.options().dtype(at::kDouble));
    const int64_t col_blocks = ceil_div(num_c, reduce::kThreads);
    const int64_t group = rows_per_group(n, col_blocks, dev);
    const int64_t groups = ceil_div(n, group);
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(groups));
    at::Tensor partial = at::empty({groups, num_c}, logits.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                    "fastvote_lm_scores", [&] {
      const scalar_t* x = logits.const_data_ptr<scalar_t>();
      reduce::logit_rows_kernel<scalar_t>
          <<<grid_for(n, reduce::kWarps), reduce::kThreads, 0, current_stream()>>>(x, logits.stride(0), logits.stride(1), n,
                                 static_cast<int>(num_c), row_max.mutable_data_ptr<float>(),
                                 row_inv_sum.mutable_data_ptr<double>(), flags.row());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      reduce::class_probs_kernel<scalar_t><<<grid, reduce::kThreads, 0, current_stream()>>>(
          x, logits.stride(0), logits.stride(1), n, static_cast<int>(num_c),
          row_max.const_data_ptr<float>(), row_inv_sum.const_data_ptr<double>(), group,
          partial.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    sum_partials(partial, out);
    out.div_(static_cast<double>(n));
  }
  flags.raise_non_finite("lm_scores", "logits", "logits");
  return out;
}

at::Tensor fm_scores_cuda(const at::Tensor& features, const at::Tensor& centroids,
                          c10::string_view metric_name) {
  check_features_centroids("fm_scores", features, centroids);
  const Metric metric = parse_metric("fm_scores", metric_name);
  check_limits("fm_scores", centroids.size(0), centroids.size(1));
  const c10::cuda::CUDAGuard guard(features.device());
  ErrorFlags flags(features);
  const Centroids c = prepare_centroids(centroids, metric, flags);
  const int64_t n = features.size(0);
  const int64_t dim = c.dim();
  at::Tensor out = at::zeros({c.count()}, features.options().dtype(at::kDouble));
  if (n > 0) {
    const Device dev = device_info(features);
    at::Tensor row_scale = at::empty({n}, features.options().dtype(at::kFloat));
    const at::TensorOptions f64 = features.options().dtype(at::kDouble);
    // Column sums of x (scaled to unit norm for cosine), then the sum of ||x||^2.
    at::Tensor sums = at::empty({dim + 1}, f64);
    const int64_t col_blocks = ceil_div(dim, 32);
    const int64_t group = rows_per_group(n, col_blocks, dev);
    const int64_t groups = ceil_div(n, group);
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(groups));
    const unsigned row_blocks = grid_for(n, reduce::kThreads);
    at::Tensor col_partial = at::empty({groups, dim}, f64);
    at::Tensor sq_partial = at::empty({static_cast<int64_t>(row_blocks), 1}, f64);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                    "fastvote_fm_scores", [&] {
      const scalar_t* x = features.const_data_ptr<scalar_t>();
      reduce::feature_rows_kernel<scalar_t><<<row_blocks, reduce::kThreads, 0, current_stream()>>>(
          x, features.stride(0), features.stride(1), n, static_cast<int>(dim), metric,
          row_scale.mutable_data_ptr<float>(), sq_partial.mutable_data_ptr<double>(), flags.row());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      reduce::column_sums_kernel<scalar_t><<<grid, reduce::kThreads, 0, current_stream()>>>(
          x, features.stride(0), features.stride(1), n, static_cast<int>(dim),
          row_scale.const_data_ptr<float>(), group, col_partial.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    at::Tensor col_sums = sums.narrow(0, 0, dim);
    at::Tensor sq_sum = sums.narrow(0, dim, 1);
    sum_partials(col_partial, col_sums);
    sum_partials(sq_partial, sq_sum);
    const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(c.count(), reduce::kWarps), 65535));
    reduce::fm_scores_kernel<<<blocks, reduce::kThreads, 0, current_stream()>>>(
        c.storage.const_data_ptr<float>(), c.storage.stride(0), static_cast<int>(c.count()),
        static_cast<int>(dim), c.bias.const_data_ptr<float>(), c.scale.const_data_ptr<float>(),
        sums.const_data_ptr<double>(), static_cast<double>(n), metric,
        out.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  flags.raise_non_finite("fm_scores", "centroids", "features");
  return out;
}

std::tuple<at::Tensor, at::Tensor> class_centroids_cuda(const at::Tensor& features,
                                                        const at::Tensor& labels,
                                                        int64_t num_classes) {
  check_class_centroids(features, labels, num_classes);
  check_limits("class_centroids", num_classes, features.size(1));
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0);
  const int64_t dim = features.size(1);
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  at::Tensor counts = at::zeros({num_classes}, features.options().dtype(at::kLong));
  at::Tensor sums = at::zeros({num_classes, dim}, features.options().dtype(at::kDouble));
  ErrorFlags flags(features);
  if (n > 0) {
    const Device dev = device_info(features);
    const auto [hist_bins, smem] = choose_hist(reduce::label_counts_kernel, reduce::kThreads, 0,
                                               static_cast<int>(num_classes), dev);
    const int64_t resident = resident_blocks(reduce::label_counts_kernel, reduce::kThreads, smem, dev);
    reduce::label_counts_kernel<<<static_cast<unsigned>(std::min(ceil_div(n, reduce::kThreads), resident)),
                                  reduce::kThreads, smem, current_stream()>>>(
        lab.const_data_ptr<int64_t>(), n, static_cast<int>(num_classes), hist_bins,
        as_u64(counts), flags.centroid());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // D = 0: counts only (a grid of zero column blocks is an invalid launch).
  if (n > 0 && dim > 0) {
    // Rows in label order; a stable sort keeps each class's rows in row order
    // and out-of-range labels (the op raises for them) go last.
    const at::Tensor keys = at::where(lab.ge(0).logical_and(lab.lt(num_classes)), lab, num_classes);
    const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor& sorted_labels = std::get<0>(sorted);
    const at::Tensor& order = std::get<1>(sorted);
    const at::Tensor starts = counts.cumsum(0).sub_(counts);
    // Chunks that depend on N alone (not on the GPU): the same sums on any device.
    const int64_t chunk_rows = std::max<int64_t>(32, ceil_div(n, kClassChunks));
    const int64_t chunks = ceil_div(n, chunk_rows);
    const at::TensorOptions f64 = features.options().dtype(at::kDouble);
    at::Tensor head = at::empty({chunks, dim}, f64);
    at::Tensor tail = at::empty({chunks, dim}, f64);
    const dim3 grid(static_cast<unsigned>(ceil_div(dim, 32)),
                    static_cast<unsigned>(ceil_div(chunks, reduce::kWarps)));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                    "fastvote_class_centroids", [&] {
      reduce::class_runs_kernel<scalar_t><<<grid, reduce::kThreads, 0, current_stream()>>>(
          features.const_data_ptr<scalar_t>(), features.stride(0), features.stride(1), n,
          static_cast<int>(dim), order.const_data_ptr<int64_t>(),
          sorted_labels.const_data_ptr<int64_t>(), static_cast<int>(num_classes), chunk_rows,
          chunks, sums.mutable_data_ptr<double>(), head.mutable_data_ptr<double>(),
          tail.mutable_data_ptr<double>(), flags.row());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    reduce::class_merge_kernel<<<grid_for(num_classes * dim, reduce::kThreads), reduce::kThreads, 0,
                                 current_stream()>>>(
        counts.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
        static_cast<int>(num_classes), static_cast<int>(dim), chunk_rows,
        head.const_data_ptr<double>(), tail.const_data_ptr<double>(),
        sums.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const std::array<int64_t, 2> f = flags.read();
  if (f[0] != kNoRow) fail_label(f[0], lab[f[0]].item<int64_t>(), num_classes);
  if (f[1] != kNoRow) fail_non_finite("class_centroids", "features", f[1]);
  return {sums, counts};
}

}  // namespace
}  // namespace cuda

std::pair<int64_t, int64_t> cuda_certified_stats() {
  return {cuda::g_certified_rows.load(), cuda::g_certified_fallback_rows.load()};
}

TORCH_LIBRARY_IMPL(fastvote, CUDA, m) {
  m.impl("lm_vote", &cuda::lm_vote_cuda);
  m.impl("fm_vote", &cuda::fm_vote_cuda);
  m.impl("nearest_centroids", &cuda::nearest_centroids_cuda);
  m.impl("class_centroids", &cuda::class_centroids_cuda);
  m.impl("lm_scores", &cuda::lm_scores_cuda);
  m.impl("fm_scores", &cuda::fm_scores_cuda);
}

}  // namespace fastvote
