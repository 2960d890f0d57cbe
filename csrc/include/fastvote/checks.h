// Argument checks shared by every backend (defined in csrc/vote.cpp). Each
// backend's op calls these first, so a bad call fails the same way on any
// device, with a message that names the argument, its value and what was
// expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include "fastvote/topk.h"

namespace fastvote {

Metric parse_metric(const char* op, c10::string_view metric);
Weight parse_weight(const char* op, c10::string_view weight);
// Checks temperature > 0 and finite, and 1 / temperature finite in float32; returns it.
float inverse_temperature(const char* op, double temperature);

// logits [N, K] floating point, K >= 1, 1 <= k <= K.
void check_logits(const char* op, const at::Tensor& logits);
void check_k(const char* op, int64_t k, int64_t num_classes, const char* what);
// Float ("rank", "soft") votes are fixed point: at most kMaxWeightedRows rows a call.
void check_weighted_rows(const char* op, int64_t rows, Weight weight);
// features [N, D] and centroids [K, D], floating point, same device, K >= 1.
void check_features_centroids(const char* op, const at::Tensor& features,
                              const at::Tensor& centroids);
// features [N, D] and targets [M, D], floating point, same device, M >= 1.
void check_features_targets(const char* op, const at::Tensor& features,
                            const at::Tensor& targets);
// features [N, D] floating, labels [N] integer on the same device, num_classes >= 1.
void check_class_centroids(const at::Tensor& features, const at::Tensor& labels,
                           int64_t num_classes);

// The error for NaN/Inf found by a backend while it reads its inputs.
[[noreturn]] void fail_non_finite(const char* op, const char* arg, int64_t row);
// The error for a label outside [0, num_classes).
[[noreturn]] void fail_label(int64_t position, int64_t label, int64_t num_classes);

}  // namespace fastvote
