#include "tests/test_util/reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>

namespace anchorserve {
namespace {

// One head's q (or one KV head's k / v) as [N, d] doubles.
std::vector<double> LoadHead(const void* data, DType dtype, Layout layout, int64_t n, int num_heads,
                             int d, int head) {
  const TensorStrides strides = StridesFor(layout, n, num_heads, d);
  std::vector<double> out(static_cast<size_t>(n) * d);
  std::vector<float> row(d);
  const auto* bytes = static_cast<const uint8_t*>(data);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t offset = t * strides.token + int64_t{head} * strides.head;
    ConvertToFloat(bytes + offset * static_cast<int64_t>(ElementSize(dtype)), dtype, d, row.data());
    for (int e = 0; e < d; ++e) out[t * d + e] = row[e];
  }
  return out;
}

double Dot(const double* a, const double* b, int d) {
  double sums[4] = {0, 0, 0, 0};  // independent chains: several times faster than one
  int e = 0;
  for (; e + 4 <= d; e += 4) {
    for (int lane = 0; lane < 4; ++lane) sums[lane] += a[e + lane] * b[e + lane];
  }
  for (; e < d; ++e) sums[0] += a[e] * b[e];
  return (sums[0] + sums[1]) + (sums[2] + sums[3]);
}

// The keys of A(i), in increasing order.
void AnchorKeys(const GroupRanges& geo, int64_t i, std::vector<int64_t>* keys) {
  keys->clear();
  for (int64_t j = 0; j < std::min(geo.init_end, i + 1); ++j) keys->push_back(j);
  for (int64_t j = geo.local_begin; j <= i; ++j) keys->push_back(j);
}

// Mass-target mode (section 8 of the spec), evaluated in fp64: the grid level of every
// candidate by its pooled margin, then per level the row-weighted mean over blocks of the
// block's sampled row's (anchor mass + kept candidate mass) / (anchor mass + all candidate
// mass), each candidate weighing exp(min(s_ij - x(i), ceiling)) for that row i.
struct MassSelection {
  double theta = std::numeric_limits<double>::infinity();
  double chosen_estimate = 1.0;    // at the chosen level (1 when every candidate is kept)
  std::vector<double> estimate;    // [kMassThetaBins + 1]
  std::vector<int64_t> kept_keys;  // [kMassThetaBins + 1]
};

MassSelection SelectByMass(const AnchorConfig& config, const std::vector<double>& margins,
                           const std::vector<std::vector<double>>& gaps,  // [blocks][|C_g|]
                           const std::vector<double>& anchor_mass,
                           const std::vector<int64_t>& block_rows) {
  const size_t blocks = anchor_mass.size();
  std::vector<int> level(margins.size());
  for (size_t c = 0; c < margins.size(); ++c) {
    int k = 0;
    while (k <= kMassThetaBins && !(margins[c] >= -static_cast<double>(MassThetaAt(config, k)))) {
      ++k;
    }
    level[c] = k;  // kMassThetaBins + 1: beyond the grid
  }
  MassSelection selection;
  selection.estimate.assign(kMassThetaBins + 1, 0.0);
  selection.kept_keys.assign(kMassThetaBins + 1, 0);
  double rows = 0;
  for (size_t b = 0; b < blocks; ++b) rows += static_cast<double>(block_rows[b]);
  for (size_t b = 0; b < blocks; ++b) {
    std::vector<double> level_mass(kMassThetaBins + 2, 0.0);
    double total = anchor_mass[b];
    for (size_t c = 0; c < margins.size(); ++c) {
      const double mass = std::exp(std::min(gaps[b][c], static_cast<double>(kMassGapCeiling)));
      level_mass[level[c]] += mass;
      total += mass;
    }
    double kept = anchor_mass[b];
    for (int k = 0; k <= kMassThetaBins; ++k) {
      kept += level_mass[k];
      selection.estimate[k] += static_cast<double>(block_rows[b]) * kept / total / rows;
    }
  }
  for (size_t c = 0; c < margins.size(); ++c) {
    for (int k = level[c]; k <= kMassThetaBins; ++k) ++selection.kept_keys[k];
  }
  for (int k = 0; k <= kMassThetaBins && config.mass_target < 1.0f; ++k) {
    if (selection.estimate[k] >= static_cast<double>(config.mass_target)) {
      if (static_cast<double>(selection.kept_keys[k]) <=
          static_cast<double>(config.mass_density_cap) * static_cast<double>(margins.size())) {
        selection.theta = MassThetaAt(config, k);
        selection.chosen_estimate = selection.estimate[k];
      }
      break;
    }
  }
  return selection;
}

void AttendHead(const AttentionTask& task, int h,
                const std::vector<std::vector<int64_t>>* forced_stripes, ReferenceResult* result) {
  const AttentionShape& shape = task.shape;
  const int64_t n = shape.seq_len;
  const int d = shape.head_dim;
  const int kv_head = h / shape.GqaRatio();
  const AnchorConfig& config = task.config;
  const double scale = config.ScaleFor(d);
  const bool dense = config.IsDense();
  const std::vector<double> q =
      LoadHead(task.q, task.dtype, task.layout, n, shape.num_q_heads, d, h);
  const std::vector<double> k =
      LoadHead(task.k, task.dtype, task.layout, n, shape.num_kv_heads, d, kv_head);
  const std::vector<double> v =
      LoadHead(task.v, task.dtype, task.layout, n, shape.num_kv_heads, d, kv_head);
  HeadStats& stats = result->head_stats[h];
  std::vector<int64_t> keys;
  std::vector<double> scores;
  std::vector<double> x;            // anchors of the group's rows
  std::vector<double> anchor_mass;  // sum over A(i) of exp(s_ij - x(i)), per row of the group
  const bool mass = config.UsesMassTarget();

  for (int64_t g = 0; g < result->num_groups; ++g) {
    const GroupRanges geo = GroupRangesOf(config, n, g);
    std::vector<int64_t> selected;
    if (!dense) {
      // Anchors x(i) = max over A(i) of s_ij (only needed when the group has candidates).
      const bool has_candidates = geo.cand_end > geo.cand_begin;
      x.assign(geo.row_end - geo.row_begin, -std::numeric_limits<double>::infinity());
      anchor_mass.assign(geo.row_end - geo.row_begin, 0.0);
      for (int64_t i = geo.row_begin; i < geo.row_end; ++i) {
        AnchorKeys(geo, i, &keys);
        stats.computed_entries += static_cast<int64_t>(keys.size());
        if (!has_candidates) continue;
        double& anchor = x[i - geo.row_begin];
        for (int64_t j : keys) anchor = std::max(anchor, scale * Dot(&q[i * d], &k[j * d], d));
        if (!mass) continue;
        for (int64_t j : keys) {
          anchor_mass[i - geo.row_begin] += std::exp(scale * Dot(&q[i * d], &k[j * d], d) - anchor);
        }
      }
      std::vector<double>& margins = result->stripe_margins[h * result->num_groups + g];
      if (has_candidates) {
        // Pooled queries and anchors of the blocks present.
        std::vector<std::vector<double>> pooled_q;
        std::vector<double> pooled_anchor;
        std::vector<int64_t> sampled_rows;  // each block's last row (mass-target mode)
        std::vector<int64_t> block_rows;
        for (int64_t b0 = geo.row_begin;
             b0 < geo.row_end && pooled_q.size() < static_cast<size_t>(config.step);
             b0 += config.block_size) {
          const int64_t b1 = std::min(geo.row_end, b0 + config.block_size);
          std::vector<double> mean(d, 0.0);
          double anchor = 0;
          for (int64_t i = b0; i < b1; ++i) {
            for (int e = 0; e < d; ++e) mean[e] += q[i * d + e];
            anchor += x[i - geo.row_begin];
          }
          sampled_rows.push_back(b1 - 1);
          block_rows.push_back(b1 - b0);
          for (double& value : mean) value /= static_cast<double>(b1 - b0);
          pooled_q.push_back(std::move(mean));
          pooled_anchor.push_back(anchor / static_cast<double>(b1 - b0));
        }
        std::vector<double> pooled_margins;  // max over blocks of the gap
        // [blocks][|C_g|]: s_ij - x(i) of each block's sampled row i (mass-target mode).
        std::vector<std::vector<double>> sampled_gaps(pooled_q.size());
        std::vector<double> sampled_anchor_mass;
        for (int64_t i : sampled_rows)
          sampled_anchor_mass.push_back(anchor_mass[i - geo.row_begin]);
        for (int64_t j = geo.cand_begin; j < geo.cand_end; ++j) {
          double best = -std::numeric_limits<double>::infinity();
          for (size_t r = 0; r < pooled_q.size(); ++r) {
            const double gap = scale * Dot(pooled_q[r].data(), &k[j * d], d) - pooled_anchor[r];
            best = std::max(best, gap);
            if (!mass) continue;
            const int64_t i = sampled_rows[r];
            sampled_gaps[r].push_back(scale * Dot(&q[i * d], &k[j * d], d) - x[i - geo.row_begin]);
          }
          pooled_margins.push_back(best);
        }
        double theta = config.theta;
        if (mass) {
          MassSelection selection =
              SelectByMass(config, pooled_margins, sampled_gaps, sampled_anchor_mass, block_rows);
          theta = selection.theta;
          const double rows = static_cast<double>(geo.row_end - geo.row_begin);
          stats.estimated_mass_sum += rows * selection.chosen_estimate;
          if (std::isinf(theta)) {
            ++stats.mass_full_groups;
          } else {
            const float chosen = static_cast<float>(theta);
            stats.mass_theta_min =
                stats.mass_groups == 0 ? chosen : std::min(stats.mass_theta_min, chosen);
            stats.mass_theta_max =
                stats.mass_groups == 0 ? chosen : std::max(stats.mass_theta_max, chosen);
            stats.mass_theta_sum += theta;
            ++stats.mass_groups;
          }
          result->mass_estimate[h * result->num_groups + g] = std::move(selection.estimate);
          result->mass_kept_keys[h * result->num_groups + g] = std::move(selection.kept_keys);
        }
        result->group_theta[h * result->num_groups + g] = theta;
        result->pooled_margins[h * result->num_groups + g] = pooled_margins;
        for (size_t c = 0; c < pooled_margins.size(); ++c) {
          const double margin = pooled_margins[c] + theta;
          margins.push_back(margin);
          if (forced_stripes == nullptr && margin >= 0) selected.push_back(geo.cand_begin + c);
        }
        if (forced_stripes != nullptr) {
          selected = (*forced_stripes)[h * result->num_groups + g];
          std::sort(selected.begin(), selected.end());
        }
        const int64_t count = static_cast<int64_t>(selected.size());
        stats.stripe_entries += count * (geo.row_end - geo.row_begin);
        stats.stripes_min = stats.stripe_groups == 0 ? count : std::min(stats.stripes_min, count);
        stats.stripes_max = std::max(stats.stripes_max, count);
        stats.stripes_total += count;
        ++stats.stripe_groups;
      }
      if (mass && !has_candidates) {
        stats.estimated_mass_sum += static_cast<double>(geo.row_end - geo.row_begin);
      }
      result->stripes[h * result->num_groups + g] = selected;
    }
    // Outputs over A(i) u S_g (every key in S_g precedes the group, so the union is disjoint).
    for (int64_t i = geo.row_begin; i < geo.row_end; ++i) {
      if (dense) {
        keys.clear();
        for (int64_t j = 0; j <= i; ++j) keys.push_back(j);
      } else {
        AnchorKeys(geo, i, &keys);
        keys.insert(keys.end(), selected.begin(), selected.end());
      }
      scores.resize(keys.size());
      double max_score = -std::numeric_limits<double>::infinity();
      for (size_t c = 0; c < keys.size(); ++c) {
        scores[c] = scale * Dot(&q[i * d], &k[keys[c] * d], d);
        max_score = std::max(max_score, scores[c]);
      }
      double sum = 0;
      double* out = &result->out[(int64_t{h} * n + i) * d];
      for (size_t c = 0; c < keys.size(); ++c) {
        const double p = std::exp(scores[c] - max_score);
        sum += p;
        const double* value = &v[keys[c] * d];
        for (int e = 0; e < d; ++e) out[e] += p * value[e];
      }
      for (int e = 0; e < d; ++e) out[e] /= sum;
      result->lse[int64_t{h} * n + i] = max_score + std::log(sum);
    }
  }
  if (dense) stats.computed_entries = CausalEntries(n);
  stats.computed_entries += stats.stripe_entries;
}

ReferenceResult Attend(const AttentionTask& task,
                       const std::vector<std::vector<int64_t>>* forced_stripes) {
  const AttentionShape& shape = task.shape;
  ReferenceResult result;
  const int64_t n = shape.seq_len;
  result.num_groups = (n + task.config.GroupSize() - 1) / task.config.GroupSize();
  result.out.assign(static_cast<size_t>(shape.num_q_heads) * n * shape.head_dim, 0.0);
  result.lse.assign(static_cast<size_t>(shape.num_q_heads) * n, 0.0);
  result.head_stats.assign(shape.num_q_heads, HeadStats{});
  result.stripes.assign(static_cast<size_t>(shape.num_q_heads * result.num_groups), {});
  result.stripe_margins.assign(result.stripes.size(), {});
  result.group_theta.assign(result.stripes.size(), std::numeric_limits<double>::quiet_NaN());
  result.pooled_margins.assign(result.stripes.size(), {});
  result.mass_estimate.assign(result.stripes.size(), {});
  result.mass_kept_keys.assign(result.stripes.size(), {});
  const int threads = std::max(
      1, std::min<int>(shape.num_q_heads, static_cast<int>(std::thread::hardware_concurrency())));
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      for (int h = t; h < shape.num_q_heads; h += threads)
        AttendHead(task, h, forced_stripes, &result);
    });
  }
  for (std::thread& worker : workers) worker.join();
  return result;
}

}  // namespace

GroupRanges GroupRangesOf(const AnchorConfig& config, int64_t n, int64_t g) {
  const int64_t group = config.GroupSize();
  const int64_t init_keys = int64_t{config.init_groups} * group;
  const int64_t local_start = (g - config.local_groups + 1) * group;
  GroupRanges geo;
  geo.row_begin = g * group;
  geo.row_end = std::min(n, geo.row_begin + group);
  geo.init_end = std::min(init_keys, n);
  geo.local_begin = std::max(init_keys, local_start);
  geo.cand_begin = init_keys;
  geo.cand_end = std::max(init_keys, std::min(local_start, n));
  return geo;
}

ReferenceResult ReferenceAttend(const AttentionTask& task) { return Attend(task, nullptr); }

ReferenceResult ReferenceAttendWithStripes(const AttentionTask& task,
                                           const std::vector<std::vector<int64_t>>& stripes) {
  return Attend(task, &stripes);
}

}  // namespace anchorserve
