// A fixed set of worker threads that runs index loops (ParallelFor) with dynamic scheduling.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"

namespace anchorserve::cpu {

class ThreadPool {
 public:
  // `num_threads` workers in all, the calling thread included (so 1 means no extra threads);
  // values below 1 are treated as 1.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Calls fn(item, worker) for every item in [0, count) and returns when all calls are done.
  // Items are handed out in increasing order, one at a time, so callers put the most expensive
  // items first for balance. `worker` is in [0, num_threads()) and identifies the thread, so
  // callers can keep per-worker scratch. Calls from different threads are serialized.
  void ParallelFor(int64_t count, absl::FunctionRef<void(int64_t item, int worker)> fn);

 private:
  void WorkerLoop(int worker);
  void RunItems(int worker);

  const int num_threads_;
  std::vector<std::thread> threads_;

  std::mutex run_mutex_;  // one ParallelFor at a time

  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  uint64_t generation_ = 0;  // bumped for every ParallelFor; guarded by mutex_
  bool shutting_down_ = false;
  int busy_workers_ = 0;  // background workers still in the current job; guarded by mutex_

  // The current job; written under mutex_ before generation_ is bumped.
  std::function<void(int64_t, int)> job_;
  int64_t job_count_ = 0;
  std::atomic<int64_t> next_item_{0};
};

}  // namespace anchorserve::cpu
