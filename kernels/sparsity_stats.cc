#include "kernels/sparsity_stats.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace anchorserve {
namespace {

float ElementAsFloat(const void* data, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::kFp32:
      return static_cast<const float*>(data)[index];
    case DType::kBf16:
      return Bf16ToFloat(static_cast<const uint16_t*>(data)[index]);
    case DType::kFp16:
      return Fp16ToFloat(static_cast<const uint16_t*>(data)[index]);
  }
  return std::numeric_limits<float>::quiet_NaN();
}

}  // namespace

RequestSummary SummarizeHeads(int64_t seq_len, absl::Span<const HeadStats> heads) {
  RequestSummary summary;
  const double causal = static_cast<double>(CausalEntries(seq_len));
  if (causal <= 0 || heads.empty()) return summary;
  double computed_sum = 0;
  double stripe_sum = 0;
  int64_t total_stripes = 0;
  summary.heads.reserve(heads.size());
  for (const HeadStats& stats : heads) {
    HeadSummary head;
    head.density = static_cast<double>(stats.computed_entries) / causal;
    head.stripe_density = static_cast<double>(stats.stripe_entries) / causal;
    head.stripes.groups = stats.stripe_groups;
    head.mass.groups = stats.mass_groups;
    head.mass.full_groups = stats.mass_full_groups;
    if (stats.mass_groups > 0) {
      head.mass.theta_min = stats.mass_theta_min;
      head.mass.theta_max = stats.mass_theta_max;
      head.mass.theta_mean = stats.mass_theta_sum / static_cast<double>(stats.mass_groups);
    }
    head.mass.estimated_kept_mass = stats.estimated_mass_sum / static_cast<double>(seq_len);
    summary.estimated_kept_mass += head.mass.estimated_kept_mass;
    if (stats.stripe_groups > 0) {
      head.stripes.min = stats.stripes_min;
      head.stripes.max = stats.stripes_max;
      head.stripes.mean =
          static_cast<double>(stats.stripes_total) / static_cast<double>(stats.stripe_groups);
      // Request-wide min/max over every (head, group) with candidates.
      summary.stripes.min = summary.stripes.groups == 0
                                ? stats.stripes_min
                                : std::min(summary.stripes.min, stats.stripes_min);
      summary.stripes.max = std::max(summary.stripes.max, stats.stripes_max);
      summary.stripes.groups += stats.stripe_groups;
      total_stripes += stats.stripes_total;
    }
    computed_sum += static_cast<double>(stats.computed_entries);
    stripe_sum += static_cast<double>(stats.stripe_entries);
    summary.heads.push_back(head);
  }
  const double all = causal * static_cast<double>(heads.size());
  summary.density = computed_sum / all;
  summary.stripe_density = stripe_sum / all;
  summary.estimated_kept_mass /= static_cast<double>(heads.size());
  if (summary.stripes.groups > 0) {
    summary.stripes.mean =
        static_cast<double>(total_stripes) / static_cast<double>(summary.stripes.groups);
  }
  return summary;
}

RecallStats ComputeRecall(const AttentionTask& sparse, const void* dense_out,
                          const float* dense_lse) {
  RecallStats stats;
  const AttentionShape& shape = sparse.shape;
  const int64_t elements = shape.seq_len * shape.num_q_heads * shape.head_dim;
  if (elements <= 0 || sparse.out == nullptr || dense_out == nullptr) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    stats.output_recall_tau_0_01 = nan;
    stats.output_recall_tau_0_005 = nan;
    stats.attention_mass_mean = nan;
    stats.attention_mass_min = nan;
    return stats;
  }
  // Both outputs share dtype and layout, so elements correspond index by index. A NaN on either
  // side counts as a miss.
  int64_t within_0_01 = 0;
  int64_t within_0_005 = 0;
  for (int64_t i = 0; i < elements; ++i) {
    const double diff = std::fabs(static_cast<double>(ElementAsFloat(sparse.out, sparse.dtype, i)) -
                                  static_cast<double>(ElementAsFloat(dense_out, sparse.dtype, i)));
    within_0_01 += diff < 0.01;
    within_0_005 += diff < 0.005;
  }
  stats.output_recall_tau_0_01 = static_cast<double>(within_0_01) / static_cast<double>(elements);
  stats.output_recall_tau_0_005 = static_cast<double>(within_0_005) / static_cast<double>(elements);

  if (sparse.maybe_lse == nullptr || dense_lse == nullptr) {
    stats.attention_mass_mean = std::numeric_limits<double>::quiet_NaN();
    stats.attention_mass_min = std::numeric_limits<double>::quiet_NaN();
    stats.head_attention_mass.assign(static_cast<size_t>(shape.num_q_heads),
                                     std::numeric_limits<double>::quiet_NaN());
    return stats;
  }
  const int64_t rows = shape.seq_len * shape.num_q_heads;
  double mass_sum = 0;
  double mass_min = std::numeric_limits<double>::infinity();
  stats.head_attention_mass.reserve(static_cast<size_t>(shape.num_q_heads));
  // LSE is [Hq, N], so each head's rows are contiguous.
  for (int h = 0; h < shape.num_q_heads; ++h) {
    double head_sum = 0;
    for (int64_t row = h * shape.seq_len; row < (h + 1) * shape.seq_len; ++row) {
      double mass = std::exp(static_cast<double>(sparse.maybe_lse[row]) -
                             static_cast<double>(dense_lse[row]));
      // Rounding can push a row that kept every key slightly above 1; NaN stays NaN.
      if (mass > 1.0) mass = 1.0;
      head_sum += mass;
      mass_min = std::isnan(mass) ? mass : std::min(mass_min, mass);
    }
    mass_sum += head_sum;
    stats.head_attention_mass.push_back(head_sum / static_cast<double>(shape.seq_len));
  }
  stats.attention_mass_mean = mass_sum / static_cast<double>(rows);
  stats.attention_mass_min = mass_min;
  return stats;
}

}  // namespace anchorserve
