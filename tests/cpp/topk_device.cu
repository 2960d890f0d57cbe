// Instantiates the shared top-k header and the certified path's bound in
// device code, so the CMake build proves nvcc accepts them even where torch's
// headers are not available.
#include "fastvote/certify.h"
#include "fastvote/topk.h"

__global__ void topk_device_check(const float* keys_in, int n, int k, float* keys_out,
                                  int64_t* idx_out, float* weights_out, uint64_t* units_out) {
  float keys[8];
  int64_t idx[8];
  int count = 0;
  float threshold = fastvote::reject_threshold(keys, count, k);
  for (int i = 0; i < n; ++i) {
    if (fastvote::admits(keys_in[i], threshold)) {
      count = fastvote::topk_insert(keys, idx, count, k, keys_in[i], static_cast<int64_t>(i));
      threshold = fastvote::reject_threshold(keys, count, k);
    }
  }
  fastvote::row_weights(keys, count, fastvote::Weight::Soft, 1.0f, weights_out);
  for (int r = 0; r < count; ++r) {
    keys_out[r] = keys[r];
    idx_out[r] = idx[r];
    units_out[r] = fastvote::fixed_units(weights_out[r]);
  }
}

__global__ void certify_device_check(const fastvote::certify::CentroidTerms* cc,
                                     const fastvote::certify::RowTerms* rb, const float* a_out,
                                     const float* kth, int64_t dim, bool* proven) {
  *proven = fastvote::certify::certify(*cc, dim, fastvote::certify::tensor_core_error((dim + 15) / 16), *rb,
                                       *a_out, *kth);
}
