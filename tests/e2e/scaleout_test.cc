// Several replicas behind one client channel: three servers on 127.0.0.1, 127.0.0.2 and
// 127.0.0.3 (Linux loopback answers on all of 127.0.0.0/8), a list target, requests spread
// round-robin over all three, and a replica taken away with SIGTERM while requests keep coming
// costs none of them.
#include <signal.h>

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"

namespace anchorserve::e2e {
namespace {

using ::testing::HasSubstr;

constexpr const char* kReplicaHosts[] = {"127.0.0.1", "127.0.0.2", "127.0.0.3"};

// A small request: milliseconds of work on one CPU thread.
absl::StatusOr<QkvTensors> SmallQkv(uint64_t seed) {
  return MakeQkv(InputKind::kRandom, 256, 4, 2, 64, DType::kBf16, Layout::kTokenMajor, seed);
}

class ScaleOutE2eTest : public ::testing::Test {
 protected:
  void StartReplicas(const std::vector<std::string>& flags) {
    for (const char* host : kReplicaHosts) {
      absl::StatusOr<std::unique_ptr<ServerProcess>> server =
          ServerProcess::Start(flags, absl::Seconds(60), host);
      ASSERT_TRUE(server.ok()) << host << ": " << server.status();
      replicas_.push_back(*std::move(server));
    }
  }

  // "127.0.0.1:P1,127.0.0.2:P2,127.0.0.3:P3".
  std::string ListTarget() const {
    std::vector<std::string> targets;
    for (const auto& replica : replicas_) targets.push_back(replica->target());
    return absl::StrJoin(targets, ",");
  }

  // Attend calls the replica answered OK, from its /metrics.
  static absl::StatusOr<double> AttendsServed(const ServerProcess& replica) {
    absl::StatusOr<std::string> page =
        HttpGet(replica.metrics_port(), "/metrics", absl::Seconds(10), replica.host());
    if (!page.ok()) return page.status();
    absl::StatusOr<double> value =
        FindMetricValue(*page, "anchorserve_requests_total", {"rpc=\"Attend\"", "code=\"OK\""});
    if (value.status().code() == absl::StatusCode::kNotFound) return 0.0;  // none yet
    return value;
  }

  void TearDown() override {
    if (!HasFailure()) return;
    for (const auto& replica : replicas_) {
      std::fprintf(stderr, "---- anchorserve on %s ----\n%s\n", replica->host().c_str(),
                   replica->Log().c_str());
    }
  }

  std::vector<std::unique_ptr<ServerProcess>> replicas_;
};

TEST_F(ScaleOutE2eTest, ListTargetSpreadsRequestsOverEveryReplica) {
  ASSERT_NO_FATAL_FAILURE(StartReplicas({"--cpu_threads=1"}));
  absl::StatusOr<std::unique_ptr<AttentionClient>> client = AttentionClient::Create(ListTarget());
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<QkvTensors> qkv = SmallQkv(1);
  ASSERT_TRUE(qkv.ok()) << qkv.status();

  constexpr int kRequests = 60;
  for (int i = 0; i < kRequests; ++i) {
    absl::StatusOr<AttendResult> result = (*client)->Attend(InputsFor(*qkv, {}, true));
    ASSERT_TRUE(result.ok()) << "request " << i << ": " << result.status();
  }
  double total = 0;
  for (const auto& replica : replicas_) {
    absl::StatusOr<double> served = AttendsServed(*replica);
    ASSERT_TRUE(served.ok()) << served.status();
    // round_robin takes the replicas in turn once connected: about 20 each.
    EXPECT_GE(*served, kRequests / 6) << replica->host() << " answered too few requests";
    total += *served;
  }
  EXPECT_EQ(total, kRequests);
}

TEST_F(ScaleOutE2eTest, SigtermOnOneReplicaCostsNoRequest) {
  ASSERT_NO_FATAL_FAILURE(StartReplicas({"--cpu_threads=1", "--drain_timeout_s=30"}));
  ClientOptions options;
  options.default_deadline = absl::Seconds(60);
  absl::StatusOr<std::unique_ptr<AttentionClient>> client =
      AttentionClient::Create(ListTarget(), options);
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<QkvTensors> qkv = SmallQkv(2);
  ASSERT_TRUE(qkv.ok()) << qkv.status();
  const AttendInputs inputs = InputsFor(*qkv, {}, true);

  // Several threads send requests back to back until told to stop.
  constexpr int kThreads = 4;
  std::atomic<bool> stop{false};
  std::atomic<int64_t> ok_count{0};
  absl::Mutex mu;
  std::vector<std::string> failures;  // guarded by mu
  std::vector<std::thread> senders;
  for (int t = 0; t < kThreads; ++t) {
    senders.emplace_back([&] {
      while (!stop.load()) {
        absl::StatusOr<AttendResult> result = (*client)->Attend(inputs);
        if (result.ok()) {
          ok_count.fetch_add(1);
        } else {
          absl::MutexLock lock(&mu);
          failures.push_back(result.status().ToString());
        }
      }
    });
  }
  auto stop_senders = [&] {
    stop.store(true);
    for (std::thread& sender : senders) sender.join();
    senders.clear();
  };

  // Every replica takes part before one goes away.
  const absl::Time warmup_deadline = absl::Now() + absl::Seconds(30);
  bool all_serving = false;
  while (!all_serving && absl::Now() < warmup_deadline) {
    absl::SleepFor(absl::Milliseconds(200));
    all_serving = true;
    for (const auto& replica : replicas_) {
      all_serving = all_serving && AttendsServed(*replica).value_or(0) >= 5;
    }
  }
  if (!all_serving) stop_senders();
  ASSERT_TRUE(all_serving) << "not every replica served 5 requests within 30 s";

  ServerProcess& leaving = *replicas_[1];
  ASSERT_TRUE(leaving.Signal(SIGTERM).ok());
  absl::StatusOr<int> exit_code = leaving.WaitForExit(absl::Seconds(60));
  const int64_t ok_at_exit = ok_count.load();
  std::map<std::string, double> served_at_exit;
  for (int i : {0, 2}) {
    served_at_exit[replicas_[i]->host()] = AttendsServed(*replicas_[i]).value_or(-1);
  }
  // The others carry on alone for a while.
  absl::SleepFor(absl::Seconds(2));
  stop_senders();

  ASSERT_TRUE(exit_code.ok()) << exit_code.status();
  EXPECT_EQ(*exit_code, 0) << "the leaving replica did not drain cleanly";
  EXPECT_THAT(leaving.Log(), HasSubstr("draining"));
  {
    absl::MutexLock lock(&mu);
    EXPECT_TRUE(failures.empty()) << failures.size() << " requests failed, e.g. "
                                  << failures.front();
  }
  EXPECT_GT(ok_count.load(), ok_at_exit) << "no request succeeded after the replica left";
  for (int i : {0, 2}) {
    absl::StatusOr<double> served = AttendsServed(*replicas_[i]);
    ASSERT_TRUE(served.ok()) << served.status();
    EXPECT_GT(*served, served_at_exit[replicas_[i]->host()])
        << replicas_[i]->host() << " took no requests after the replica left";
  }
}

TEST_F(ScaleOutE2eTest, AnchorctlBalancesOverAListTarget) {
  ASSERT_NO_FATAL_FAILURE(StartReplicas({"--cpu_threads=1"}));
  const std::string target_flag = absl::StrCat("--target=", ListTarget());
  absl::StatusOr<ProcessResult> load = RunProcess(
      {AnchorctlBinary(), target_flag, "load", "--requests=30", "--concurrency=3", "--seq_len=256",
       "--q_heads=4", "--kv_heads=2", "--head_dim=64", "--metrics_only"},
      absl::Seconds(120));
  ASSERT_TRUE(load.ok()) << load.status();
  EXPECT_EQ(load->exit_code, 0) << load->output;
  EXPECT_THAT(load->output, HasSubstr("30 ok, 0 failed"));
  for (const auto& replica : replicas_) {
    absl::StatusOr<double> served = AttendsServed(*replica);
    ASSERT_TRUE(served.ok()) << served.status();
    EXPECT_GT(*served, 0) << replica->host() << " answered none of anchorctl's requests";
  }

  // Streamed through the list too.
  absl::StatusOr<ProcessResult> stream =
      RunProcess({AnchorctlBinary(), target_flag, "attend", "--stream", "--seq_len=256",
                  "--q_heads=4", "--kv_heads=2", "--head_dim=64", "--verify"},
                 absl::Seconds(120));
  ASSERT_TRUE(stream.ok()) << stream.status();
  EXPECT_EQ(stream->exit_code, 0) << stream->output;
  EXPECT_THAT(stream->output, HasSubstr("verification passed"));

  // A list with a name in it is a usage error that names the element.
  absl::StatusOr<ProcessResult> bad =
      RunProcess({AnchorctlBinary(),
                  absl::StrCat("--target=", replicas_[0]->target(), ",replica-b:50051"), "info"},
                 absl::Seconds(30));
  ASSERT_TRUE(bad.ok()) << bad.status();
  EXPECT_EQ(bad->exit_code, 2) << bad->output;
  EXPECT_THAT(bad->output, HasSubstr("'replica-b:50051' is not an IP address"));
}

}  // namespace
}  // namespace anchorserve::e2e
