#include "server/metrics.h"

#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/text_serializer.h"

namespace anchorserve {
namespace {

using ::testing::HasSubstr;

std::string Render(const MetricsRegistry& metrics) {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, metrics.registry()->Collect());
  return out.str();
}

TEST(MetricsRegistryTest, RendersEveryContractMetric) {
  MetricsRegistry metrics;
  const std::string text = Render(metrics);
  for (const char* name : {
           "# TYPE anchorserve_requests_total counter",
           "# TYPE anchorserve_request_duration_seconds histogram",
           "# TYPE anchorserve_queue_duration_seconds histogram",
           "# TYPE anchorserve_compute_duration_seconds histogram",
           "# TYPE anchorserve_batch_size histogram",
           "# TYPE anchorserve_tokens_total counter",
           "# TYPE anchorserve_density histogram",
           "# TYPE anchorserve_queue_depth gauge",
           "# TYPE anchorserve_inflight_requests gauge",
           "# TYPE anchorserve_received_bytes_total counter",
           "# TYPE anchorserve_sent_bytes_total counter",
           "# TYPE anchorserve_pinned_host_bytes gauge",
       }) {
    EXPECT_THAT(text, HasSubstr(name));
  }
}

TEST(MetricsRegistryTest, RecordsWithLabels) {
  MetricsRegistry metrics;
  metrics.CountRequest(Rpc::kAttend, grpc::StatusCode::OK);
  metrics.CountRequest(Rpc::kAttend, grpc::StatusCode::OK);
  metrics.CountRequest(Rpc::kAttendStream, grpc::StatusCode::INVALID_ARGUMENT);
  metrics.ObserveRequestDuration(Rpc::kGetServerInfo, 0.003);
  metrics.ObserveBatchSize(3);
  metrics.AddTokens(4096);
  metrics.ObserveDensity(0.4);
  metrics.CountModeRun(/*dense=*/true, /*chosen_by_auto=*/true);
  metrics.CountModeRun(/*dense=*/true, /*chosen_by_auto=*/true);
  metrics.CountModeRun(/*dense=*/false, /*chosen_by_auto=*/false);
  metrics.SetQueueDepth(Queue::kAttention, 5);
  metrics.RequestStarted();
  metrics.RequestStarted();
  metrics.RequestDone();
  metrics.AddReceivedBytes(1000);
  metrics.AddSentBytes(500);
  const std::string text = Render(metrics);
  EXPECT_THAT(text, HasSubstr("anchorserve_requests_total{code=\"OK\",rpc=\"Attend\"} 2"));
  EXPECT_THAT(
      text,
      HasSubstr("anchorserve_requests_total{code=\"INVALID_ARGUMENT\",rpc=\"AttendStream\"} 1"));
  EXPECT_THAT(text,
              HasSubstr("anchorserve_request_duration_seconds_count{rpc=\"GetServerInfo\"} 1"));
  EXPECT_THAT(text, HasSubstr("anchorserve_batch_size_sum 3"));
  EXPECT_THAT(text, HasSubstr("anchorserve_tokens_total 4096"));
  EXPECT_THAT(text, HasSubstr("anchorserve_density_bucket{le=\"0.5\"} 1"));
  EXPECT_THAT(text, HasSubstr("anchorserve_density_bucket{le=\"0.3\"} 0"));
  EXPECT_THAT(text, HasSubstr("anchorserve_mode_runs_total{chosen_by=\"auto\",mode=\"dense\"} 2"));
  EXPECT_THAT(text,
              HasSubstr("anchorserve_mode_runs_total{chosen_by=\"request\",mode=\"anchor\"} 1"));
  EXPECT_THAT(text, HasSubstr("anchorserve_mode_runs_total{chosen_by=\"auto\",mode=\"anchor\"} 0"));
  EXPECT_THAT(text, HasSubstr("anchorserve_queue_depth{queue=\"attention\"} 5"));
  EXPECT_THAT(text, HasSubstr("anchorserve_inflight_requests 1"));
  EXPECT_THAT(text, HasSubstr("anchorserve_received_bytes_total 1000"));
  EXPECT_THAT(text, HasSubstr("anchorserve_sent_bytes_total 500"));
}

TEST(MetricsRegistryTest, OutOfRangeCodeCountsAsUnknown) {
  MetricsRegistry metrics;
  metrics.CountRequest(Rpc::kAttend, static_cast<grpc::StatusCode>(-1));
  EXPECT_THAT(Render(metrics),
              HasSubstr("anchorserve_requests_total{code=\"UNKNOWN\",rpc=\"Attend\"} 1"));
}

}  // namespace
}  // namespace anchorserve
