// A request of more than 64 MiB that cannot go unary (the server's message limit is 16 MiB) is
// streamed in chunks both ways and matches the local CPU backend element for element; a large
// unary request (inputs copied into the server's reused buffers, output received into a buffer
// the client wrote during the call) does too, call after call.
#include <cmath>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/attention_client.h"
#include "client/local_reference.h"
#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"

namespace anchorserve::e2e {
namespace {

constexpr int64_t kMiB = int64_t{1} << 20;

class StreamingE2eTest : public OwnServerTest {};

TEST_F(StreamingE2eTest, LargeRequestIsStreamedAndMatchesLocalCpu) {
  ASSERT_NO_FATAL_FAILURE(StartServer(
      {
          "--cpu_threads=2",
          "--max_message_bytes=16777216",  // 16 MiB: the request below cannot be one message
          "--stream_chunk_bytes=3000001",  // odd, so output chunks split elements
      },
      absl::Seconds(240)));
  absl::StatusOr<v1::GetServerInfoResponse> info = client_->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_EQ(info->limits().max_message_bytes(), 16 * kMiB);

  // fp32 [2048, 32, 128] = 32 MiB per tensor, 96 MiB in all. Compute is kept cheap: groups of 16
  // rows and theta = -inf (anchor region only), so the CPU spends its time on the bytes.
  constexpr uint64_t kSeed = 20261122;
  SCOPED_TRACE(absl::StrCat("seed ", kSeed));
  absl::StatusOr<QkvTensors> qkv =
      MakeQkv(InputKind::kRandom, 2048, 32, 32, 128, DType::kFp32, Layout::kTokenMajor, kSeed);
  ASSERT_TRUE(qkv.ok()) << qkv.status();
  v1::AnchorConfig config;
  config.set_block_size(16);
  config.set_step(1);
  config.set_theta(-INFINITY);
  const AttendInputs inputs = InputsFor(*qkv, config);
  ASSERT_GE(inputs.PayloadBytes(), 64 * kMiB);

  // Unary is refused by the server's message limit.
  absl::StatusOr<AttendResult> unary = client_->Attend(inputs);
  EXPECT_EQ(unary.status().code(), absl::StatusCode::kResourceExhausted) << unary.status();

  absl::StatusOr<AttendResult> streamed =
      client_->AttendAuto(inputs, info->limits().max_message_bytes());
  ASSERT_TRUE(streamed.ok()) << streamed.status();
  EXPECT_TRUE(streamed->streamed);
  ASSERT_TRUE(streamed->output.has_value());
  EXPECT_EQ(streamed->output->bytes.size(), qkv->q.bytes.size());
  EXPECT_EQ(streamed->metrics.effective_config().theta(), -INFINITY);
  EXPECT_GT(streamed->metrics.density(), 0);
  EXPECT_LT(streamed->metrics.density(), 0.05);  // about 1.5 groups of 16 keys per row of 2048

  absl::StatusOr<CpuVerification> verified = VerifyOnCpu(
      inputs.q, inputs.k, inputs.v, streamed->metrics.effective_config(), *streamed->output, 2);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_EQ(verified->comparison.over_tolerance, 0) << verified->comparison.Describe();
  EXPECT_DOUBLE_EQ(streamed->metrics.density(), verified->local.summary.density);

  // The bytes really crossed the wire in chunks.
  absl::StatusOr<std::string> page = HttpGet(server_->metrics_port(), "/metrics");
  ASSERT_TRUE(page.ok()) << page.status();
  absl::StatusOr<double> received = FindMetricValue(*page, "anchorserve_received_bytes_total", {});
  ASSERT_TRUE(received.ok()) << received.status();
  EXPECT_GE(*received, static_cast<double>(inputs.PayloadBytes()));
  absl::StatusOr<double> ok_streams =
      FindMetricValue(*page, "anchorserve_requests_total", {"rpc=\"AttendStream\"", "code=\"OK\""});
  ASSERT_TRUE(ok_streams.ok()) << ok_streams.status();
  EXPECT_EQ(*ok_streams, 1);
}

TEST_F(StreamingE2eTest, LargeUnaryRequestsMatchLocalCpu) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"--cpu_threads=2"}, absl::Seconds(240)));
  // fp32 [1024, 32, 128] = 16 MiB per tensor: gRPC receives each in many slices, so the server
  // copies it, and the output is large enough for the client's background-written buffer.
  v1::AnchorConfig config;
  config.set_block_size(16);
  config.set_step(1);
  config.set_theta(-INFINITY);
  for (uint64_t seed : {uint64_t{20261205}, uint64_t{20261206}}) {
    SCOPED_TRACE(absl::StrCat("seed ", seed));
    absl::StatusOr<QkvTensors> qkv =
        MakeQkv(InputKind::kRandom, 1024, 32, 32, 128, DType::kFp32, Layout::kTokenMajor, seed);
    ASSERT_TRUE(qkv.ok()) << qkv.status();
    const AttendInputs inputs = InputsFor(*qkv, config);
    absl::StatusOr<AttendResult> unary = client_->Attend(inputs);
    ASSERT_TRUE(unary.ok()) << unary.status();
    EXPECT_FALSE(unary->streamed);
    ASSERT_TRUE(unary->output.has_value());
    ASSERT_EQ(unary->output->bytes.size(), qkv->q.bytes.size());
    absl::StatusOr<CpuVerification> verified = VerifyOnCpu(
        inputs.q, inputs.k, inputs.v, unary->metrics.effective_config(), *unary->output, 2);
    ASSERT_TRUE(verified.ok()) << verified.status();
    EXPECT_EQ(verified->comparison.over_tolerance, 0) << verified->comparison.Describe();
    EXPECT_EQ(verified->comparison.non_finite, 0);
  }
}

}  // namespace
}  // namespace anchorserve::e2e
