// PrefillRunner: every job runs on the engine, and anchorserve_pinned_host_bytes follows the
// page-locked memory the engine keeps between runs, whether the run succeeded or not.
#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "prometheus/text_serializer.h"
#include "server/metrics.h"
#include "server/prefill_job.h"

namespace anchorserve {
namespace {

// Keeps `kept[i]` bytes pinned after its i-th run; runs whose number is in `failing` fail.
class KeepingEngine final : public PrefillEngine {
 public:
  std::string name() const override { return "keeping"; }
  int64_t WorkspaceBytes(int64_t, const AnchorConfig&) const override { return 0; }
  absl::StatusOr<PrefillResult> Run(const PrefillTask&, KvSink*) override {
    kept_now = kept.at(runs);
    if (runs++ == failing_run) return absl::InternalError("device fault");
    return PrefillResult{};
  }
  int64_t KeptPinnedHostBytes() const override { return kept_now; }

  std::vector<int64_t> kept;
  int failing_run = -1;
  int runs = 0;
  int64_t kept_now = 0;
};

// The gauge's value in the text exposition.
double PinnedGauge(const MetricsRegistry& metrics) {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, metrics.registry()->Collect());
  std::istringstream lines(out.str());
  std::string line;
  const std::string name = "anchorserve_pinned_host_bytes ";
  while (std::getline(lines, line)) {
    if (line.rfind(name, 0) == 0) return std::stod(line.substr(name.size()));
  }
  ADD_FAILURE() << "no " << name << "sample in:\n" << out.str();
  return -1;
}

TEST(PrefillRunnerTest, PinnedGaugeFollowsWhatTheEngineKeeps) {
  KeepingEngine engine;
  engine.kept = {1 << 20, 1 << 20, 3 << 20, 0};
  engine.failing_run = 2;
  MetricsRegistry metrics;
  metrics.AddPinnedHostBytes(4096);  // a host buffer pinned elsewhere stays counted
  PrefillRunner runner(&engine, &metrics);
  const std::vector<double> want = {4096 + (1 << 20), 4096 + (1 << 20), 4096 + (3 << 20), 4096};
  for (size_t i = 0; i < want.size(); ++i) {
    PrefillJob job({1, 2, 3});
    BatchJob* batch[] = {&job};
    runner.Run(batch);
    EXPECT_EQ(job.status.ok(), static_cast<int>(i) != engine.failing_run) << "run " << i;
    EXPECT_EQ(PinnedGauge(metrics), want[i]) << "after run " << i;
  }
  EXPECT_EQ(engine.runs, 4);
}

TEST(PrefillRunnerTest, CancelledJobDoesNotRunAndNullMetricsAreFine) {
  KeepingEngine engine;
  engine.kept = {1 << 20};
  PrefillRunner runner(&engine, nullptr);
  PrefillJob cancelled({1});
  cancelled.cancelled = true;
  PrefillJob job({1, 2});
  BatchJob* batch[] = {&cancelled, &job};
  runner.Run(batch);
  EXPECT_EQ(cancelled.status.code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(job.status.ok()) << job.status;
  EXPECT_EQ(engine.runs, 1);
}

}  // namespace
}  // namespace anchorserve
