// Info, unary and small streaming attention checked against the local CPU backend and a
// hand-checked case, health, reflection and the /metrics endpoint of a running server.
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/attention_client.h"
#include "client/local_reference.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"

namespace anchorserve::e2e {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using ServingStatus = grpc::health::v1::HealthCheckResponse;

// One server for the suite, started with non-default limits and defaults so the test can tell
// reported values from hard-coded ones. Odd output chunk size: reassembly must not assume
// element or power-of-two boundaries.
class BasicE2eTest : public SharedServerTest {
 protected:
  static void SetUpTestSuite() {
    StartSharedServer({
        "--cpu_threads=2",
        "--max_seq_len=100000",
        "--max_heads=64",
        "--max_batch_requests=3",
        "--max_queue_size=17",
        "--stream_chunk_bytes=65537",
        "--default_theta=11.5",
        "--default_block_size=64",
        "--default_step=8",
        // Ignored while the default mass target is 0 (off); a request's target uses them.
        "--default_mass_density_cap=0.9",
        "--default_mass_min_theta=0.5",
    });
  }
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(SharedServerTest::SetUp());
    client_ = MakeClient(*server_);
    ASSERT_NE(client_, nullptr);
  }

  std::unique_ptr<AttentionClient> client_;
};

TEST_F(BasicE2eTest, InfoReportsBackendLimitsAndDefaults) {
  absl::StatusOr<v1::GetServerInfoResponse> info = client_->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->backend(), "cpu");
  EXPECT_FALSE(info->version().empty());
  EXPECT_FALSE(info->device().empty());
  EXPECT_THAT(info->supported_dtypes(), Contains(v1::DATA_TYPE_BF16));
  EXPECT_THAT(info->supported_dtypes(), Contains(v1::DATA_TYPE_FP32));
  EXPECT_THAT(info->supported_head_dims(), Contains(128));
  const v1::ServerLimits& limits = info->limits();
  EXPECT_EQ(limits.max_seq_len(), 100000);
  EXPECT_EQ(limits.max_heads(), 64);
  EXPECT_EQ(limits.max_batch_requests(), 3);
  EXPECT_EQ(limits.max_queue_size(), 17);
  EXPECT_EQ(limits.stream_chunk_bytes(), 65537);
  EXPECT_EQ(limits.max_message_bytes(), 268435456);
  EXPECT_EQ(limits.max_request_bytes(), int64_t{4294967296});
  const v1::AnchorConfig& defaults = info->defaults();
  ASSERT_TRUE(defaults.has_theta() && defaults.has_block_size() && defaults.has_step() &&
              defaults.has_init_groups() && defaults.has_local_groups());
  EXPECT_EQ(defaults.theta(), 11.5);
  EXPECT_EQ(defaults.block_size(), 64);
  EXPECT_EQ(defaults.step(), 8);
  EXPECT_EQ(defaults.init_groups(), 1);
  EXPECT_EQ(defaults.local_groups(), 1);
  ASSERT_TRUE(defaults.has_mass_target() && defaults.has_mass_density_cap() &&
              defaults.has_mass_min_theta());
  EXPECT_EQ(defaults.mass_target(), 0.0);
  EXPECT_FLOAT_EQ(defaults.mass_density_cap(), 0.9f);
  EXPECT_EQ(defaults.mass_min_theta(), 0.5);
}

// A mass target on the structured generator: every head reports the thresholds it chose and the
// mass it kept (estimated by the backend, measured against dense with compute_recall).
TEST_F(BasicE2eTest, MassTargetReportsPerHeadBudgets) {
  constexpr int kHeads = 4;
  absl::StatusOr<QkvTensors> qkv =
      MakeQkv(InputKind::kStructured, 8192, kHeads, 2, 64, DType::kBf16, Layout::kTokenMajor, 31);
  ASSERT_TRUE(qkv.ok()) << qkv.status();
  v1::AnchorConfig config;
  config.set_mass_target(0.95);
  AttendInputs inputs = InputsFor(*qkv, config, /*metrics_only=*/true);
  inputs.options.set_compute_recall(true);
  absl::StatusOr<AttendResult> result = client_->Attend(inputs);
  ASSERT_TRUE(result.ok()) << result.status();
  const v1::AttentionMetrics& metrics = result->metrics;
  const v1::AnchorConfig& effective = metrics.effective_config();
  EXPECT_FLOAT_EQ(effective.mass_target(), 0.95f);
  EXPECT_FLOAT_EQ(effective.mass_density_cap(), 0.9f);  // the server's defaults
  EXPECT_EQ(effective.mass_min_theta(), 0.5);
  ASSERT_TRUE(metrics.has_recall());
  ASSERT_EQ(metrics.heads_size(), kHeads);
  int heads_with_thresholds = 0;
  double estimated_sum = 0, true_sum = 0;
  for (const v1::HeadMetrics& head : metrics.heads()) {
    SCOPED_TRACE(absl::StrCat("head ", head.head()));
    ASSERT_TRUE(head.has_mass());
    const v1::MassBudget& mass = head.mass();
    // Every group with candidates either chose a threshold or kept everything.
    EXPECT_EQ(mass.groups() + mass.full_groups(), head.stripes_per_group().groups());
    if (mass.groups() > 0) {
      ++heads_with_thresholds;
      EXPECT_GT(mass.theta_min(), 0.0);
      EXPECT_GE(mass.theta_min(), effective.mass_min_theta());
      EXPECT_LE(mass.theta_min(), mass.theta_mean());
      EXPECT_LE(mass.theta_mean(), mass.theta_max());
    }
    EXPECT_GT(mass.estimated_kept_mass(), 0.0);
    EXPECT_LE(mass.estimated_kept_mass(), 1.0);
    EXPECT_GT(mass.true_kept_mass(), 0.0);
    EXPECT_LE(mass.true_kept_mass(), 1.0);
    estimated_sum += mass.estimated_kept_mass();
    true_sum += mass.true_kept_mass();
  }
  EXPECT_GT(heads_with_thresholds, 0);
  EXPECT_NEAR(metrics.estimated_kept_mass(), estimated_sum / kHeads, 1e-12);
  // Each head has N rows, so the heads' mean is the request's attention-mass recall.
  EXPECT_NEAR(metrics.recall().attention_mass_mean(), true_sum / kHeads, 1e-9);

  v1::AnchorConfig bad;
  bad.set_mass_target(1.5);
  absl::StatusOr<AttendResult> refused = client_->Attend(InputsFor(*qkv, bad, true));
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("config.mass_target"));
}

// Token-major fp32, N = 2, Hq = 2, Hkv = 1, d = 2, softmax_scale = 1:
//   k0 = [1, 0], k1 = [0, 1], v0 = [1, 2], v1 = [5, -2]
//   row 0 sees only key 0:                       O = v0 = [1, 2] (both heads)
//   row 1, head 0, q = [ln 3, 0]: scores ln3, 0 -> weights 3/4, 1/4 -> O = [2, 1]
//   row 1, head 1, q = [0, ln 3]: scores 0, ln3 -> weights 1/4, 3/4 -> O = [4, -1]
TEST_F(BasicE2eTest, HandCheckedTinyCase) {
  const float ln3 = std::log(3.0f);
  const std::vector<float> q = {0.5f, -0.25f, 0.5f, -0.25f,  // token 0, heads 0 and 1
                                ln3,  0.0f,   0.0f, ln3};    // token 1
  const std::vector<float> k = {1, 0, 0, 1};
  const std::vector<float> v = {1, 2, 5, -2};
  const std::vector<float> expected = {1, 2, 1, 2, 2, 1, 4, -1};
  auto as_bytes = [](const std::vector<float>& values) {
    return absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(values.data()),
                               values.size() * sizeof(float));
  };
  AttendInputs inputs;
  inputs.q = TensorView{DType::kFp32, Layout::kTokenMajor, {2, 2, 2}, as_bytes(q)};
  inputs.k = TensorView{DType::kFp32, Layout::kTokenMajor, {2, 1, 2}, as_bytes(k)};
  inputs.v = TensorView{DType::kFp32, Layout::kTokenMajor, {2, 1, 2}, as_bytes(v)};
  inputs.config.set_softmax_scale(1.0);
  for (v1::AttentionMode mode : {v1::ATTENTION_MODE_DENSE, v1::ATTENTION_MODE_ANCHOR}) {
    SCOPED_TRACE(v1::AttentionMode_Name(mode));
    inputs.config.set_mode(mode);
    for (bool streamed : {false, true}) {
      SCOPED_TRACE(streamed ? "streamed" : "unary");
      absl::StatusOr<AttendResult> result =
          streamed ? client_->AttendStreamed(inputs) : client_->Attend(inputs);
      ASSERT_TRUE(result.ok()) << result.status();
      ASSERT_TRUE(result->output.has_value());
      ASSERT_EQ(result->output->bytes.size(), expected.size() * sizeof(float));
      std::vector<float> got(expected.size());
      std::memcpy(got.data(), result->output->bytes.data(), result->output->bytes.size());
      for (size_t i = 0; i < expected.size(); ++i) {
        EXPECT_NEAR(got[i], expected[i], 2e-6) << "element " << i;
      }
      EXPECT_DOUBLE_EQ(result->metrics.density(), 1.0);  // N < group size: all of A(i)
      EXPECT_EQ(result->metrics.effective_config().softmax_scale(), 1.0);
      EXPECT_FALSE(result->request_id.empty());
    }
  }
}

struct UnaryCase {
  InputKind kind;
  DType dtype;
  Layout layout;
  uint64_t seed;
};

// Server output vs the local CPU backend run with the server's effective_config: same code, so
// every element must agree within the dtype's tolerance and density must be equal.
TEST_F(BasicE2eTest, UnaryMatchesLocalCpuBackend) {
  const std::vector<UnaryCase> cases = {
      {InputKind::kStructured, DType::kBf16, Layout::kTokenMajor, 11},
      {InputKind::kStructured, DType::kFp16, Layout::kHeadMajor, 12},
      {InputKind::kRandom, DType::kFp32, Layout::kTokenMajor, 13},
      {InputKind::kRandom, DType::kBf16, Layout::kHeadMajor, 14},
  };
  for (const UnaryCase& c : cases) {
    SCOPED_TRACE(absl::StrCat("seed ", c.seed, " dtype ", std::string(DTypeName(c.dtype)),
                              " layout ", LayoutName(c.layout)));
    absl::StatusOr<QkvTensors> qkv = MakeQkv(c.kind, 777, 4, 2, 64, c.dtype, c.layout, c.seed);
    ASSERT_TRUE(qkv.ok()) << qkv.status();
    v1::AnchorConfig config;
    config.set_block_size(16);  // groups of 32 rows: many groups with stripe candidates
    config.set_step(2);
    config.set_theta(c.kind == InputKind::kStructured ? 8.0 : 1.0);
    AttendInputs inputs = InputsFor(*qkv, config);
    inputs.request_id = absl::StrCat("unary-", c.seed);

    absl::StatusOr<AttendResult> result = client_->Attend(inputs);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->request_id, inputs.request_id);
    EXPECT_FALSE(result->streamed);
    ASSERT_TRUE(result->output.has_value());
    const v1::AttentionMetrics& metrics = result->metrics;
    EXPECT_EQ(metrics.backend(), "cpu");
    EXPECT_EQ(metrics.heads_size(), 4);
    EXPECT_GE(metrics.batch_size(), 1);
    EXPECT_GT(metrics.density(), 0);
    EXPECT_LE(metrics.density(), 1);
    EXPECT_NEAR(metrics.sparsity(), 1 - metrics.density(), 1e-12);
    EXPECT_EQ(metrics.effective_config().block_size(), 16);
    EXPECT_EQ(metrics.effective_config().theta(), config.theta());
    EXPECT_EQ(metrics.effective_config().step(), 2);
    EXPECT_GE(metrics.total_seconds(), metrics.compute_seconds());

    absl::StatusOr<CpuVerification> verified =
        VerifyOnCpu(inputs.q, inputs.k, inputs.v, metrics.effective_config(), *result->output, 1);
    ASSERT_TRUE(verified.ok()) << verified.status();
    EXPECT_EQ(verified->comparison.over_tolerance, 0) << verified->comparison.Describe();
    const RequestSummary& local = verified->local.summary;
    EXPECT_DOUBLE_EQ(metrics.density(), local.density);
    EXPECT_DOUBLE_EQ(metrics.stripe_density(), local.stripe_density);
    EXPECT_EQ(metrics.stripes_per_group().groups(), local.stripes.groups);
  }
}

// The same request unary and streamed in odd-sized chunks both ways gives identical bytes.
TEST_F(BasicE2eTest, StreamedMatchesUnary) {
  absl::StatusOr<QkvTensors> qkv =
      MakeQkv(InputKind::kStructured, 1000, 4, 1, 128, DType::kBf16, Layout::kTokenMajor, 21);
  ASSERT_TRUE(qkv.ok()) << qkv.status();
  v1::AnchorConfig config;
  config.set_block_size(32);
  config.set_step(2);
  const AttendInputs inputs = InputsFor(*qkv, config);
  std::unique_ptr<AttentionClient> odd_chunks =
      MakeClient(*server_, absl::Seconds(120), /*stream_chunk_bytes=*/1001);
  ASSERT_NE(odd_chunks, nullptr);

  absl::StatusOr<AttendResult> unary = client_->Attend(inputs);
  ASSERT_TRUE(unary.ok()) << unary.status();
  absl::StatusOr<AttendResult> streamed = odd_chunks->AttendStreamed(inputs);
  ASSERT_TRUE(streamed.ok()) << streamed.status();
  EXPECT_TRUE(streamed->streamed);
  ASSERT_TRUE(unary->output.has_value() && streamed->output.has_value());
  EXPECT_TRUE(unary->output->bytes == streamed->output->bytes)
      << "streamed output differs from the unary output";
  EXPECT_EQ(unary->metrics.density(), streamed->metrics.density());

  // metrics_only: no output either way, same metrics.
  const AttendInputs metrics_only = InputsFor(*qkv, config, /*metrics_only=*/true);
  absl::StatusOr<AttendResult> unary_metrics = client_->Attend(metrics_only);
  ASSERT_TRUE(unary_metrics.ok()) << unary_metrics.status();
  absl::StatusOr<AttendResult> streamed_metrics = odd_chunks->AttendStreamed(metrics_only);
  ASSERT_TRUE(streamed_metrics.ok()) << streamed_metrics.status();
  EXPECT_FALSE(unary_metrics->output.has_value());
  EXPECT_FALSE(streamed_metrics->output.has_value());
  EXPECT_EQ(unary_metrics->metrics.density(), unary->metrics.density());
  EXPECT_EQ(streamed_metrics->metrics.density(), unary->metrics.density());
}

TEST_F(BasicE2eTest, RecallIsReportedWhenAsked) {
  absl::StatusOr<QkvTensors> qkv =
      MakeQkv(InputKind::kStructured, 600, 2, 2, 64, DType::kBf16, Layout::kTokenMajor, 31);
  ASSERT_TRUE(qkv.ok()) << qkv.status();
  v1::AnchorConfig config;
  config.set_block_size(16);
  config.set_step(2);
  AttendInputs inputs = InputsFor(*qkv, config, /*metrics_only=*/true);
  inputs.options.set_compute_recall(true);
  absl::StatusOr<AttendResult> result = client_->Attend(inputs);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_TRUE(result->metrics.has_recall());
  const v1::Recall& recall = result->metrics.recall();
  EXPECT_GT(recall.output_recall_tau_0_01(), 0);
  EXPECT_LE(recall.output_recall_tau_0_01(), 1);
  EXPECT_LE(recall.output_recall_tau_0_005(), recall.output_recall_tau_0_01());
  EXPECT_GT(recall.attention_mass_mean(), 0);
  EXPECT_LE(recall.attention_mass_mean(), 1 + 1e-6);
  EXPECT_LE(recall.attention_mass_min(), recall.attention_mass_mean());

  inputs.options.set_compute_recall(false);
  absl::StatusOr<AttendResult> without = client_->Attend(inputs);
  ASSERT_TRUE(without.ok()) << without.status();
  EXPECT_FALSE(without->metrics.has_recall());
}

TEST_F(BasicE2eTest, HealthIsServing) {
  for (const char* service : {"", "anchorserve.v1.AttentionService"}) {
    SCOPED_TRACE(absl::StrCat("service '", service, "'"));
    auto status = CheckHealth(client_->channel(), service);
    ASSERT_TRUE(status.ok()) << status.status();
    EXPECT_EQ(*status, ServingStatus::SERVING);
  }
  auto unknown = CheckHealth(client_->channel(), "no.such.Service");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound) << unknown.status();
}

TEST_F(BasicE2eTest, ReflectionListsTheService) {
  absl::StatusOr<std::vector<std::string>> services = ListServices(client_->channel());
  ASSERT_TRUE(services.ok()) << services.status();
  EXPECT_THAT(*services, Contains("anchorserve.v1.AttentionService"));
  EXPECT_THAT(*services, Contains("grpc.health.v1.Health"));
}

TEST_F(BasicE2eTest, MetricsEndpointCountsRequests) {
  absl::StatusOr<QkvTensors> qkv =
      MakeQkv(InputKind::kRandom, 64, 2, 1, 64, DType::kBf16, Layout::kTokenMajor, 41);
  ASSERT_TRUE(qkv.ok()) << qkv.status();
  auto before_page = HttpGet(server_->metrics_port(), "/metrics");
  ASSERT_TRUE(before_page.ok()) << before_page.status();
  const double before =
      FindMetricValue(*before_page, "anchorserve_requests_total", {"rpc=\"Attend\"", "code=\"OK\""})
          .value_or(0);
  // The config is left to the server's default, auto, which runs these 64 rows dense.
  const std::vector<std::string> auto_dense = {"chosen_by=\"auto\"", "mode=\"dense\""};
  const double auto_dense_before =
      FindMetricValue(*before_page, "anchorserve_mode_runs_total", auto_dense).value_or(0);

  for (int i = 0; i < 2; ++i) {
    const absl::StatusOr<AttendResult> result = client_->Attend(InputsFor(*qkv));
    ASSERT_TRUE(result.ok()) << result.status();
  }

  auto page = HttpGet(server_->metrics_port(), "/metrics");
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_THAT(*page, HasSubstr("200 OK"));
  absl::StatusOr<double> after =
      FindMetricValue(*page, "anchorserve_requests_total", {"rpc=\"Attend\"", "code=\"OK\""});
  ASSERT_TRUE(after.ok()) << after.status() << "\n" << *page;
  EXPECT_EQ(*after, before + 2);
  absl::StatusOr<double> auto_dense_after =
      FindMetricValue(*page, "anchorserve_mode_runs_total", auto_dense);
  ASSERT_TRUE(auto_dense_after.ok()) << auto_dense_after.status() << "\n" << *page;
  EXPECT_EQ(*auto_dense_after, auto_dense_before + 2);
  for (const char* name :
       {"anchorserve_request_duration_seconds", "anchorserve_queue_duration_seconds",
        "anchorserve_compute_duration_seconds", "anchorserve_batch_size",
        "anchorserve_tokens_total", "anchorserve_density", "anchorserve_queue_depth",
        "anchorserve_mode_runs_total", "anchorserve_inflight_requests",
        "anchorserve_received_bytes_total", "anchorserve_sent_bytes_total"}) {
    EXPECT_THAT(*page, HasSubstr(name));
  }
  absl::StatusOr<double> tokens = FindMetricValue(*page, "anchorserve_tokens_total", {});
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_GE(*tokens, 128);
}

TEST_F(BasicE2eTest, ConnectionRefusedIsReadable) {
  absl::StatusOr<int> port = UnusedPort();
  ASSERT_TRUE(port.ok()) << port.status();
  const std::string target = absl::StrCat("127.0.0.1:", *port);
  absl::StatusOr<std::unique_ptr<AttentionClient>> nowhere = AttentionClient::Create(target);
  ASSERT_TRUE(nowhere.ok()) << nowhere.status();
  absl::StatusOr<v1::GetServerInfoResponse> info = (*nowhere)->GetServerInfo();
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(info.status().message(),
            absl::StrCat("server at ", target, " is unavailable: connection refused"));
}

}  // namespace
}  // namespace anchorserve::e2e
