// A backend for server tests: records what it ran, can hold a run at a gate, and computes a
// cheap function of every input byte (so tests see that Q, K and V arrived intact):
//   out byte i = q[i] ^ rotl(k[i % |k|], 1) ^ rotl(v[i % |v|], 2).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/types/span.h"
#include "kernels/backend.h"

namespace anchorserve::fakes {

inline uint8_t FakeOutputByte(uint8_t q, uint8_t k, uint8_t v) {
  const uint8_t k1 = static_cast<uint8_t>((k << 1) | (k >> 7));
  const uint8_t v2 = static_cast<uint8_t>((v << 2) | (v >> 6));
  return static_cast<uint8_t>(q ^ k1 ^ v2);
}

inline size_t TensorBytes(const AttentionTask& task, int heads) {
  return static_cast<size_t>(task.shape.seq_len) * heads * task.shape.head_dim *
         ElementSize(task.dtype);
}

inline std::vector<uint8_t> FakeOutput(absl::Span<const uint8_t> q, absl::Span<const uint8_t> k,
                                       absl::Span<const uint8_t> v) {
  std::vector<uint8_t> out(q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    out[i] = FakeOutputByte(q[i], k[i % k.size()], v[i % v.size()]);
  }
  return out;
}

class FakeBackend final : public AttentionBackend {
 public:
  struct RunRecord {
    std::vector<const void*> q;  // q pointers of the tasks, in batch order
    std::vector<int64_t> seq_lens;
    AttentionMode mode = AttentionMode::kAnchor;
  };

  BackendInfo Info() const override {
    absl::MutexLock lock(&mu_);
    return info_;
  }
  void SetInfo(BackendInfo info) {
    absl::MutexLock lock(&mu_);
    info_ = std::move(info);
  }

  // The dtypes of Info(), then SetCanRun's status.
  absl::Status CanRun(const AttentionProblem& problem) const override {
    absl::MutexLock lock(&mu_);
    if (std::find(info_.dtypes.begin(), info_.dtypes.end(), problem.dtype) == info_.dtypes.end()) {
      return absl::FailedPreconditionError(absl::StrCat("dtype ",
                                                        std::string(DTypeName(problem.dtype)),
                                                        " is not supported by the fake backend"));
    }
    return supports_;
  }
  void SetCanRun(absl::Status status) {
    absl::MutexLock lock(&mu_);
    supports_ = std::move(status);
  }
  // Run() returns this (after the gate) without computing.
  void SetRunStatus(absl::Status status) {
    absl::MutexLock lock(&mu_);
    run_status_ = std::move(status);
  }

  // While closed, Run() blocks after recording its batch (the "backend is busy").
  void CloseGate() {
    absl::MutexLock lock(&mu_);
    gate_open_ = false;
  }
  void OpenGate() {
    absl::MutexLock lock(&mu_);
    gate_open_ = true;
  }
  // Blocks until `runs` Run() calls have started.
  void WaitForRuns(int runs) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return static_cast<int>(runs_.size()) >= runs;
    };
    mu_.Await(absl::Condition(&enough));
  }

  // Blocks until a task of the run held at the gate has been cancelled.
  void WaitForCancelledTask() {
    while (true) {
      {
        absl::MutexLock lock(&mu_);
        for (const AttentionTask* task : gated_tasks_) {
          if (task->Cancelled()) return;
        }
      }
      absl::SleepFor(absl::Milliseconds(1));
    }
  }

  std::vector<RunRecord> runs() const {
    absl::MutexLock lock(&mu_);
    return runs_;
  }
  // Whether any run included a task reading `q`.
  bool Computed(const void* q) const {
    absl::MutexLock lock(&mu_);
    for (const RunRecord& run : runs_) {
      for (const void* p : run.q) {
        if (p == q) return true;
      }
    }
    return false;
  }

  absl::Status Run(absl::Span<AttentionTask* const> batch) override {
    absl::Status run_status;
    {
      absl::MutexLock lock(&mu_);
      RunRecord record;
      for (const AttentionTask* task : batch) {
        record.q.push_back(task->q);
        record.seq_lens.push_back(task->shape.seq_len);
        record.mode = task->config.mode;
      }
      runs_.push_back(std::move(record));
      gated_tasks_.assign(batch.begin(), batch.end());
      mu_.Await(absl::Condition(&gate_open_));
      gated_tasks_.clear();
      run_status = run_status_;
    }
    if (!run_status.ok()) return run_status;
    for (AttentionTask* task : batch) {
      if (task->Cancelled()) {  // abandoned mid-way, as real backends do
        task->status = absl::CancelledError("fake backend: task cancelled");
        continue;
      }
      const size_t q_bytes = TensorBytes(*task, task->shape.num_q_heads);
      const size_t kv_bytes = TensorBytes(*task, task->shape.num_kv_heads);
      const auto* q = static_cast<const uint8_t*>(task->q);
      const auto* k = static_cast<const uint8_t*>(task->k);
      const auto* v = static_cast<const uint8_t*>(task->v);
      auto* out = static_cast<uint8_t*>(task->out);
      for (size_t i = 0; i < q_bytes; ++i) {
        out[i] = FakeOutputByte(q[i], k[i % kv_bytes], v[i % kv_bytes]);
      }
      if (task->maybe_lse != nullptr) {
        std::fill_n(task->maybe_lse,
                    static_cast<size_t>(task->shape.num_q_heads) * task->shape.seq_len, 1.0f);
      }
      // Dense accounting: every causal entry computed, no stripes.
      task->head_stats.assign(task->shape.num_q_heads, HeadStats{});
      for (HeadStats& stats : task->head_stats) {
        stats.computed_entries = CausalEntries(task->shape.seq_len);
      }
      task->times.compute_seconds = 0.5;
      task->times.identification_seconds = 0.25;
      task->status = absl::OkStatus();
    }
    return absl::OkStatus();
  }

 private:
  mutable absl::Mutex mu_;
  BackendInfo info_ ABSL_GUARDED_BY(mu_) = {
      "fake", "test device", {DType::kBf16, DType::kFp16, DType::kFp32}, {}};
  absl::Status supports_ ABSL_GUARDED_BY(mu_);
  absl::Status run_status_ ABSL_GUARDED_BY(mu_);
  bool gate_open_ ABSL_GUARDED_BY(mu_) = true;
  std::vector<RunRecord> runs_ ABSL_GUARDED_BY(mu_);
  std::vector<const AttentionTask*> gated_tasks_ ABSL_GUARDED_BY(mu_);
};

}  // namespace anchorserve::fakes
