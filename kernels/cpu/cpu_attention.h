// The CPU implementation of one AttentionTask (dense flash-style kernel and the three-phase
// AnchorAttention path), below the AttentionBackend interface so tests can reach its internals.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/attention_types.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cpu/tile_kernels.h"

namespace anchorserve::cpu {

// Largest seq_len the CPU backend accepts (key indices are stored as int32).
inline constexpr int64_t kMaxCpuSeqLen = (int64_t{1} << 31) - 4096;

// Runs `task` (already validated) on `pool` with `kernels`: writes task->out, task->maybe_lse,
// task->head_stats and task->times; sets task->status to CANCELLED and stops early when the task
// is cancelled. `maybe_stripes`, when non-null, receives the selected key indices S_g of every
// (query head, group), [Hq * num_groups], sorted (empty in dense mode); `maybe_group_thetas`
// the threshold each (query head, group) used, [Hq * num_groups] (config.theta, or the chosen one
// in mass-target mode, +inf where a group kept every candidate; NaN for groups that identify
// nothing; empty in dense mode). Non-OK only when scratch memory cannot be allocated.
absl::Status RunCpuAttention(AttentionTask* task, ThreadPool* pool, const TileKernels& kernels,
                             std::vector<std::vector<int64_t>>* maybe_stripes = nullptr,
                             std::vector<float>* maybe_group_thetas = nullptr);

}  // namespace anchorserve::cpu
