#include "server/attention_executor.h"

#include <chrono>
#include <new>

#include "absl/strings/str_cat.h"
#include "kernels/sparsity_stats.h"

namespace anchorserve {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

size_t LseCount(const AttentionTask& task) {
  return static_cast<size_t>(task.shape.num_q_heads) * static_cast<size_t>(task.shape.seq_len);
}

}  // namespace

double AttentionExecutor::Run(absl::Span<BatchJob* const> batch_jobs) {
  if (batch_jobs.empty()) return 0;
  // The batch key starts with the job kind, so every job here is an AttentionJob.
  std::vector<AttentionJob*> batch;
  batch.reserve(batch_jobs.size());
  for (BatchJob* job : batch_jobs) batch.push_back(static_cast<AttentionJob*>(job));
  std::vector<AttentionTask*> tasks;
  std::vector<AttentionJob*> recall_jobs;
  // [Hq, N] per recall job: the sparse pass's LSE, which ComputeRecall compares with dense.
  std::vector<std::vector<float>> sparse_lse;
  tasks.reserve(batch.size());
  for (AttentionJob* job : batch) {
    job->task.status = absl::OkStatus();
    job->task.maybe_lse = nullptr;
    if (job->compute_recall) recall_jobs.push_back(job);
    tasks.push_back(&job->task);
  }
  sparse_lse.resize(recall_jobs.size());
  for (size_t i = 0; i < recall_jobs.size(); ++i) {
    sparse_lse[i].assign(LseCount(recall_jobs[i]->task), 0.0f);
    recall_jobs[i]->task.maybe_lse = sparse_lse[i].data();
  }

  const auto start = std::chrono::steady_clock::now();
  const absl::Status run_status = backend_->Run(tasks);
  const double seconds = SecondsSince(start);

  for (AttentionJob* job : batch) {
    if (!run_status.ok()) {
      job->status = run_status;
    } else if (!job->task.status.ok()) {
      job->status = job->task.status;
    } else if (job->task.head_stats.size() != static_cast<size_t>(job->task.shape.num_q_heads)) {
      job->status = absl::InternalError(
          absl::StrCat("backend returned statistics for ", job->task.head_stats.size(),
                       " heads, expected ", job->task.shape.num_q_heads));
    } else {
      job->status = absl::OkStatus();
      job->summary = SummarizeHeads(job->task.shape.seq_len, job->task.head_stats);
    }
  }
  if (!recall_jobs.empty()) RunRecall(recall_jobs);
  for (AttentionJob* job : batch) {
    if (!job->status.ok()) continue;
    metrics_->ObserveDensity(job->summary.density);
    metrics_->CountModeRun(job->task.config.mode == AttentionMode::kDense,
                           !job->mode_choice.empty());
  }
  // maybe_lse points into sparse_lse, which dies with this call.
  for (AttentionJob* job : recall_jobs) job->task.maybe_lse = nullptr;
  return seconds;
}

void AttentionExecutor::RunRecall(absl::Span<AttentionJob* const> jobs) {
  struct DensePass {
    AttentionJob* job;
    std::unique_ptr<char[]> out;  // like q
    std::vector<float> lse;       // [Hq, N]
    AttentionTask task;
  };
  std::vector<DensePass> passes;
  passes.reserve(jobs.size());
  for (AttentionJob* job : jobs) {
    if (!job->status.ok() || job->task.Cancelled()) continue;
    const AttentionTask& sparse = job->task;
    const size_t out_bytes = static_cast<size_t>(sparse.shape.seq_len) * sparse.shape.num_q_heads *
                             sparse.shape.head_dim * ElementSize(sparse.dtype);
    DensePass pass{job, std::unique_ptr<char[]>(new (std::nothrow) char[out_bytes]), {}, {}};
    if (pass.out == nullptr) {
      job->status = absl::ResourceExhaustedError(absl::StrCat(
          "cannot allocate ", out_bytes, " bytes for the dense pass of compute_recall"));
      continue;
    }
    pass.lse.assign(LseCount(sparse), 0.0f);
    passes.push_back(std::move(pass));
  }
  if (passes.empty()) return;
  // Set pointers only now: `passes` no longer reallocates.
  std::vector<AttentionTask*> tasks;
  for (DensePass& pass : passes) {
    const AttentionTask& sparse = pass.job->task;
    pass.task.shape = sparse.shape;
    pass.task.dtype = sparse.dtype;
    pass.task.layout = sparse.layout;
    pass.task.q = sparse.q;
    pass.task.k = sparse.k;
    pass.task.v = sparse.v;
    pass.task.out = pass.out.get();
    pass.task.maybe_lse = pass.lse.data();
    pass.task.config = sparse.config;
    pass.task.config.mode = AttentionMode::kDense;
    pass.task.maybe_cancelled = sparse.maybe_cancelled;
    tasks.push_back(&pass.task);
  }
  const absl::Status status = backend_->Run(tasks);
  for (DensePass& pass : passes) {
    AttentionJob& job = *pass.job;
    if (!status.ok()) {
      job.status = absl::Status(status.code(),
                                absl::StrCat("dense pass for compute_recall: ", status.message()));
      continue;
    }
    if (!pass.task.status.ok()) {
      job.status = pass.task.status;
      continue;
    }
    job.recall = ComputeRecall(job.task, pass.out.get(), pass.lse.data());
  }
}

}  // namespace anchorserve
