#include "kernels/cpu/thread_pool.h"

#include <algorithm>

namespace anchorserve::cpu {

ThreadPool::ThreadPool(int num_threads) : num_threads_(std::max(1, num_threads)) {
  threads_.reserve(num_threads_ - 1);
  for (int worker = 1; worker < num_threads_; ++worker) {
    threads_.emplace_back([this, worker] { WorkerLoop(worker); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    shutting_down_ = true;
  }
  work_ready_.notify_all();
  for (std::thread& thread : threads_) thread.join();
}

void ThreadPool::RunItems(int worker) {
  while (true) {
    const int64_t item = next_item_.fetch_add(1, std::memory_order_relaxed);
    if (item >= job_count_) return;
    job_(item, worker);
  }
}

void ThreadPool::WorkerLoop(int worker) {
  uint64_t seen_generation = 0;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_ready_.wait(lock, [&] { return shutting_down_ || generation_ != seen_generation; });
      if (shutting_down_) return;
      seen_generation = generation_;
    }
    RunItems(worker);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_workers_ == 0) work_done_.notify_all();
    }
  }
}

void ThreadPool::ParallelFor(int64_t count, absl::FunctionRef<void(int64_t, int)> fn) {
  if (count <= 0) return;
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  if (num_threads_ == 1 || count == 1) {
    for (int64_t item = 0; item < count; ++item) fn(item, 0);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = [fn](int64_t item, int worker) { fn(item, worker); };
    job_count_ = count;
    next_item_.store(0, std::memory_order_relaxed);
    busy_workers_ = num_threads_ - 1;
    ++generation_;
  }
  work_ready_.notify_all();
  RunItems(0);
  std::unique_lock<std::mutex> lock(mutex_);
  work_done_.wait(lock, [&] { return busy_workers_ == 0; });
  job_ = nullptr;
}

}  // namespace anchorserve::cpu
