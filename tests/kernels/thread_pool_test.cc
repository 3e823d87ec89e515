#include "kernels/cpu/thread_pool.h"

#include <atomic>
#include <vector>

#include "gtest/gtest.h"

namespace anchorserve::cpu {
namespace {

TEST(ThreadPoolTest, RunsEveryItemOnceOnValidWorkers) {
  for (int threads : {0, 1, 2, 5}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.num_threads(), threads < 1 ? 1 : threads);
    for (int64_t count : {0, 1, 7, 1000}) {
      std::vector<std::atomic<int>> hits(count);
      std::atomic<bool> bad_worker{false};
      pool.ParallelFor(count, [&](int64_t item, int worker) {
        hits[item].fetch_add(1);
        if (worker < 0 || worker >= pool.num_threads()) bad_worker = true;
      });
      for (int64_t i = 0; i < count; ++i) EXPECT_EQ(hits[i].load(), 1) << i;
      EXPECT_FALSE(bad_worker.load());
    }
  }
}

TEST(ThreadPoolTest, UsesSeveralWorkersAndSerializesCallers) {
  ThreadPool pool(3);
  std::atomic<int> total{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 3; ++c) {
    callers.emplace_back([&] {
      for (int round = 0; round < 20; ++round) {
        pool.ParallelFor(50, [&](int64_t, int) { total.fetch_add(1); });
      }
    });
  }
  for (std::thread& caller : callers) caller.join();
  EXPECT_EQ(total.load(), 3 * 20 * 50);
}

}  // namespace
}  // namespace anchorserve::cpu
