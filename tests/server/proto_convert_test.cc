#include "server/proto_convert.h"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/anchorserve/v1/limits.h"
#include "tests/server/fake_backend.h"

namespace anchorserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A tensor with correctly sized data: shape as given, filled with `fill`.
void SetTensor(v1::Tensor* tensor, v1::DataType dtype, v1::TensorLayout layout,
               std::vector<int64_t> shape, char fill = 1) {
  tensor->set_dtype(dtype);
  tensor->set_layout(layout);
  tensor->clear_shape();
  int64_t elements = 1;
  for (int64_t dim : shape) {
    tensor->add_shape(dim);
    elements *= dim;
  }
  const int64_t element_size = dtype == v1::DATA_TYPE_FP32 ? 4 : 2;
  tensor->set_data(std::string(static_cast<size_t>(elements * element_size), fill));
}

// Q [8, 4, 16], K and V [8, 2, 16], bf16, token-major: valid.
v1::AttendRequest ValidRequest() {
  v1::AttendRequest request;
  SetTensor(request.mutable_q(), v1::DATA_TYPE_BF16, v1::TENSOR_LAYOUT_TOKEN_MAJOR, {8, 4, 16});
  SetTensor(request.mutable_k(), v1::DATA_TYPE_BF16, v1::TENSOR_LAYOUT_TOKEN_MAJOR, {8, 2, 16});
  SetTensor(request.mutable_v(), v1::DATA_TYPE_BF16, v1::TENSOR_LAYOUT_TOKEN_MAJOR, {8, 2, 16});
  return request;
}

v1::TensorSpec Spec(v1::DataType dtype, std::vector<int64_t> shape,
                    v1::TensorLayout layout = v1::TENSOR_LAYOUT_TOKEN_MAJOR) {
  v1::TensorSpec spec;
  spec.set_dtype(dtype);
  spec.set_layout(layout);
  for (int64_t dim : shape) spec.add_shape(dim);
  return spec;
}

v1::StreamHeader Header(std::vector<int64_t> q_shape, std::vector<int64_t> kv_shape,
                        v1::DataType dtype = v1::DATA_TYPE_BF16) {
  v1::StreamHeader header;
  *header.mutable_q() = Spec(dtype, q_shape);
  *header.mutable_k() = Spec(dtype, kv_shape);
  *header.mutable_v() = Spec(dtype, kv_shape);
  return header;
}

ConvertOptions Options() {
  ConvertOptions options;
  options.max_seq_len = 1 << 20;
  options.max_heads = 64;
  options.max_request_bytes = int64_t{1} << 40;
  options.max_message_bytes = 1 << 30;
  return options;
}

void ExpectError(const absl::StatusOr<RequestSpec>& result, absl::StatusCode code,
                 const std::string& field) {
  ASSERT_FALSE(result.ok()) << "expected an error naming " << field;
  EXPECT_EQ(result.status().code(), code) << result.status();
  EXPECT_THAT(std::string(result.status().message()), HasSubstr(field));
}

TEST(ProtoConvertTest, ValidRequestGivesTheSpec) {
  v1::AttendRequest request = ValidRequest();
  request.mutable_options()->set_compute_recall(true);
  absl::StatusOr<RequestSpec> spec = SpecFromAttendRequest(request, Options());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->shape.seq_len, 8);
  EXPECT_EQ(spec->shape.num_q_heads, 4);
  EXPECT_EQ(spec->shape.num_kv_heads, 2);
  EXPECT_EQ(spec->shape.head_dim, 16);
  EXPECT_EQ(spec->dtype, DType::kBf16);
  EXPECT_EQ(spec->layout, Layout::kTokenMajor);
  EXPECT_EQ(spec->q_bytes, 8 * 4 * 16 * 2);
  EXPECT_EQ(spec->k_bytes, 8 * 2 * 16 * 2);
  EXPECT_THAT(spec->q_dims, ElementsAre(8, 4, 16));
  EXPECT_TRUE(spec->compute_recall);
  EXPECT_FALSE(spec->metrics_only);
}

TEST(ProtoConvertTest, HeadMajorReadsHeadsFromTheFirstDim) {
  v1::AttendRequest request;
  SetTensor(request.mutable_q(), v1::DATA_TYPE_FP16, v1::TENSOR_LAYOUT_HEAD_MAJOR, {4, 8, 16});
  SetTensor(request.mutable_k(), v1::DATA_TYPE_FP16, v1::TENSOR_LAYOUT_HEAD_MAJOR, {2, 8, 16});
  SetTensor(request.mutable_v(), v1::DATA_TYPE_FP16, v1::TENSOR_LAYOUT_HEAD_MAJOR, {2, 8, 16});
  absl::StatusOr<RequestSpec> spec = SpecFromAttendRequest(request, Options());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->shape.seq_len, 8);
  EXPECT_EQ(spec->shape.num_q_heads, 4);
  EXPECT_EQ(spec->layout, Layout::kHeadMajor);

  request.mutable_q()->set_shape(0, 0);
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "q.shape[0] (num_heads) must be positive, got 0");
}

TEST(ProtoConvertTest, WrongByteCountNamesTheTensorAndShape) {
  v1::AttendRequest request = ValidRequest();
  request.mutable_k()->mutable_data()->resize(100);
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "k.data has 100 bytes, expected 512 for shape [8, 2, 16] bf16");
}

TEST(ProtoConvertTest, MissingTensor) {
  v1::AttendRequest request = ValidRequest();
  request.clear_v();
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "missing v");
}

TEST(ProtoConvertTest, ZeroAndNegativeDims) {
  v1::AttendRequest request = ValidRequest();
  request.mutable_q()->set_shape(1, 0);
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "q.shape[1] (num_heads) must be positive, got 0");
  request = ValidRequest();
  request.mutable_k()->set_shape(2, -16);
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "k.shape[2] (head_dim) must be positive, got -16");
  request = ValidRequest();
  request.mutable_v()->set_shape(0, 0);
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "v.shape[0] (seq_len)");
}

TEST(ProtoConvertTest, WrongRank) {
  v1::AttendRequest request = ValidRequest();
  request.mutable_q()->mutable_shape()->RemoveLast();
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "q.shape must have 3 dims");
}

TEST(ProtoConvertTest, DimProductOverflow) {
  v1::StreamHeader header = Header({int64_t{1} << 40, int64_t{1} << 22, 128}, {8, 2, 16});
  ExpectError(SpecFromStreamHeader(header, Options()), absl::StatusCode::kInvalidArgument,
              "q.shape [1099511627776, 4194304, 128] has more elements than int64 can count");
  // The element count fits int64 but the byte count does not.
  header = Header({int64_t{1} << 31, int64_t{1} << 24, 128}, {8, 2, 16}, v1::DATA_TYPE_FP32);
  ExpectError(SpecFromStreamHeader(header, Options()), absl::StatusCode::kInvalidArgument,
              "more bytes than int64 can count");
}

TEST(ProtoConvertTest, HeadDimOverTheMaximum) {
  ExpectError(SpecFromStreamHeader(Header({8, 4, 512}, {8, 2, 512}), Options()),
              absl::StatusCode::kInvalidArgument, "q.shape[2] (head_dim) must be at most 256");
}

TEST(ProtoConvertTest, UnknownOrUnsetDtypeAndLayout) {
  v1::AttendRequest request = ValidRequest();
  request.mutable_q()->set_dtype(static_cast<v1::DataType>(99));
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "q.dtype must be DATA_TYPE_BF16, DATA_TYPE_FP16 or DATA_TYPE_FP32, got unknown "
              "value 99");
  request = ValidRequest();
  request.mutable_k()->set_dtype(v1::DATA_TYPE_UNSPECIFIED);
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "k.dtype must be");
  request = ValidRequest();
  request.mutable_v()->set_layout(static_cast<v1::TensorLayout>(7));
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "v.layout must be TENSOR_LAYOUT_TOKEN_MAJOR or TENSOR_LAYOUT_HEAD_MAJOR, got unknown "
              "value 7");
  request = ValidRequest();
  request.mutable_q()->set_layout(v1::TENSOR_LAYOUT_UNSPECIFIED);
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "q.layout must be");
}

TEST(ProtoConvertTest, MismatchedDtypeOrLayout) {
  v1::AttendRequest request = ValidRequest();
  SetTensor(request.mutable_v(), v1::DATA_TYPE_FP16, v1::TENSOR_LAYOUT_TOKEN_MAJOR, {8, 2, 16});
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "v.dtype (fp16) must equal q.dtype (bf16)");
  request = ValidRequest();
  SetTensor(request.mutable_k(), v1::DATA_TYPE_BF16, v1::TENSOR_LAYOUT_HEAD_MAJOR, {2, 8, 16});
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "k.layout (TENSOR_LAYOUT_HEAD_MAJOR) must equal q.layout");
}

TEST(ProtoConvertTest, MismatchedShapes) {
  v1::AttendRequest request = ValidRequest();
  SetTensor(request.mutable_k(), v1::DATA_TYPE_BF16, v1::TENSOR_LAYOUT_TOKEN_MAJOR, {7, 2, 16});
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "k.shape[0] (seq_len) = 7 must equal q.shape[0] (seq_len) = 8");
  request = ValidRequest();
  SetTensor(request.mutable_k(), v1::DATA_TYPE_BF16, v1::TENSOR_LAYOUT_TOKEN_MAJOR, {8, 2, 32});
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "k.shape[2] (head_dim) = 32 must equal q.shape[2] (head_dim) = 16");
  request = ValidRequest();
  SetTensor(request.mutable_v(), v1::DATA_TYPE_BF16, v1::TENSOR_LAYOUT_TOKEN_MAJOR, {8, 1, 16});
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "v.shape [8, 1, 16] must equal k.shape [8, 2, 16]");
}

TEST(ProtoConvertTest, HeadsNotDivisible) {
  v1::AttendRequest request = ValidRequest();
  SetTensor(request.mutable_q(), v1::DATA_TYPE_BF16, v1::TENSOR_LAYOUT_TOKEN_MAJOR, {8, 3, 16});
  ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
              "q.shape[1] (num_heads) = 3 must be a multiple of k.shape[1] (num_heads) = 2");
}

TEST(ProtoConvertTest, LimitsAreResourceExhaustedNamingTheFlag) {
  ConvertOptions options = Options();
  options.max_seq_len = 4;
  ExpectError(SpecFromAttendRequest(ValidRequest(), options), absl::StatusCode::kResourceExhausted,
              "q.shape[0] (seq_len) = 8 is over the limit --max_seq_len=4");

  options = Options();
  options.max_heads = 3;
  ExpectError(SpecFromAttendRequest(ValidRequest(), options), absl::StatusCode::kResourceExhausted,
              "q.shape[1] (num_heads) = 4 is over the limit --max_heads=3");

  options = Options();
  options.max_request_bytes = 2047;  // q 1024 + k 512 + v 512 = 2048
  ExpectError(SpecFromAttendRequest(ValidRequest(), options), absl::StatusCode::kResourceExhausted,
              "q, k and v hold 2048 bytes together, over the limit --max_request_bytes=2047");
  options.max_request_bytes = 2048;
  EXPECT_TRUE(SpecFromAttendRequest(ValidRequest(), options).ok());
}

TEST(ProtoConvertTest, HugeStreamHeaderIsRefusedBeforeAllocation) {
  // 1 TiB of q: the header alone is enough to refuse it.
  ConvertOptions options = Options();
  options.max_request_bytes = int64_t{4} << 30;
  options.max_seq_len = int64_t{1} << 40;
  ExpectError(SpecFromStreamHeader(Header({int64_t{1} << 32, 64, 128}, {int64_t{1} << 32, 8, 128}),
                                   options),
              absl::StatusCode::kResourceExhausted, "--max_request_bytes=4294967296");
}

TEST(ProtoConvertTest, UnaryOutputMustFitOneMessageUnlessMetricsOnly) {
  ConvertOptions options = Options();
  options.max_message_bytes = kMessageOverheadBytes + 1000;  // q has 1024 bytes
  ExpectError(SpecFromAttendRequest(ValidRequest(), options), absl::StatusCode::kResourceExhausted,
              "--max_message_bytes");
  v1::AttendRequest request = ValidRequest();
  request.mutable_options()->set_metrics_only(true);
  EXPECT_TRUE(SpecFromAttendRequest(request, options).ok());
}

TEST(ProtoConvertTest, ConfigDefaultsAndOverrides) {
  AnchorConfig defaults;
  defaults.theta = 7.0f;
  defaults.block_size = 64;
  defaults.step = 8;
  absl::StatusOr<AnchorConfig> merged = AnchorConfigFromProto(v1::AnchorConfig(), defaults);
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(merged->theta, 7.0f);
  EXPECT_EQ(merged->block_size, 64);
  EXPECT_EQ(merged->step, 8);
  EXPECT_EQ(merged->mode, AttentionMode::kAnchor);

  v1::AnchorConfig request;
  request.set_mode(v1::ATTENTION_MODE_DENSE);
  request.set_theta(15.0);
  request.set_step(4);
  request.set_init_groups(0);
  request.set_local_groups(2);
  request.set_softmax_scale(0.125);
  merged = AnchorConfigFromProto(request, defaults);
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(merged->mode, AttentionMode::kDense);
  EXPECT_EQ(merged->theta, 15.0f);
  EXPECT_EQ(merged->block_size, 64);
  EXPECT_EQ(merged->step, 4);
  EXPECT_EQ(merged->init_groups, 0);
  EXPECT_EQ(merged->local_groups, 2);
  EXPECT_EQ(merged->softmax_scale, 0.125f);
}

TEST(ProtoConvertTest, AutoModeIsResolvedPerRequestAndExplained) {
  // ValidRequest has N = 8: with block 2, step 2 (groups of 4 rows) the anchor region (init and
  // local group) covers everything, so auto runs dense.
  v1::AttendRequest request = ValidRequest();
  request.mutable_config()->set_block_size(2);
  request.mutable_config()->set_step(2);
  ConvertOptions options = Options();
  options.defaults.mode = AttentionMode::kAuto;
  absl::StatusOr<RequestSpec> spec = SpecFromAttendRequest(request, options);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->config.mode, AttentionMode::kDense);
  EXPECT_THAT(spec->mode_choice, HasSubstr("auto: dense"));
  EXPECT_THAT(spec->mode_choice, HasSubstr("N=8"));

  // The request's own mode wins over the default and leaves no explanation.
  request.mutable_config()->set_mode(v1::ATTENTION_MODE_ANCHOR);
  spec = SpecFromAttendRequest(request, options);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->config.mode, AttentionMode::kAnchor);
  EXPECT_EQ(spec->mode_choice, "");

  // ATTENTION_MODE_AUTO with a default of anchor; the effective config echoes the resolved mode.
  request.mutable_config()->set_mode(v1::ATTENTION_MODE_AUTO);
  options.defaults.mode = AttentionMode::kAnchor;
  spec = SpecFromAttendRequest(request, options);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->config.mode, AttentionMode::kDense);
  EXPECT_EQ(AnchorConfigToProto(spec->config).mode(), v1::ATTENTION_MODE_DENSE);

  request.mutable_config()->set_mode(static_cast<v1::AttentionMode>(9));
  ExpectError(SpecFromAttendRequest(request, options), absl::StatusCode::kInvalidArgument,
              "config.mode");
}

TEST(ProtoConvertTest, MassTargetDefaultsOverridesAndEcho) {
  AnchorConfig defaults;
  defaults.mass_target = 0.9f;
  defaults.mass_density_cap = 0.5f;
  defaults.mass_min_theta = 1.0f;
  absl::StatusOr<AnchorConfig> merged = AnchorConfigFromProto(v1::AnchorConfig(), defaults);
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(merged->mass_target, 0.9f);
  EXPECT_EQ(merged->mass_density_cap, 0.5f);
  EXPECT_EQ(merged->mass_min_theta, 1.0f);

  v1::AnchorConfig request;
  request.set_mass_target(0.95);
  request.set_mass_density_cap(0.25);
  request.set_mass_min_theta(-2.0);
  merged = AnchorConfigFromProto(request, defaults);
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(merged->mass_target, 0.95f);
  EXPECT_EQ(merged->mass_density_cap, 0.25f);
  EXPECT_EQ(merged->mass_min_theta, -2.0f);
  EXPECT_TRUE(merged->UsesMassTarget());

  // 0 switches the default's target off; the echo carries every field back.
  request.set_mass_target(0.0);
  merged = AnchorConfigFromProto(request, defaults);
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_FALSE(merged->UsesMassTarget());
  const v1::AnchorConfig echoed = AnchorConfigToProto(*merged);
  ASSERT_TRUE(echoed.has_mass_target() && echoed.has_mass_density_cap() &&
              echoed.has_mass_min_theta());
  EXPECT_EQ(echoed.mass_target(), 0.0);
  EXPECT_EQ(echoed.mass_density_cap(), 0.25);
  EXPECT_EQ(echoed.mass_min_theta(), -2.0);
  absl::StatusOr<AnchorConfig> round_trip = AnchorConfigFromProto(echoed, AnchorConfig());
  ASSERT_TRUE(round_trip.ok()) << round_trip.status();
  EXPECT_EQ(AttentionBatchKey({{}, DType::kBf16, Layout::kTokenMajor, *round_trip}),
            AttentionBatchKey({{}, DType::kBf16, Layout::kTokenMajor, *merged}));
}

TEST(ProtoConvertTest, MassTargetRefusedByTheBackendIsFailedPrecondition) {
  // What the cuda backend answers (CanRunOnCuda) reaches the caller unchanged.
  fakes::FakeBackend backend;
  backend.SetInfo({"fake", "test", {DType::kBf16}, {16}});
  backend.SetCanRun(absl::FailedPreconditionError(
      "config.step 32 with config.mass_target: the cuda backend's mass targets support step <= "
      "16"));
  ConvertOptions options = Options();
  options.backend = &backend;
  options.backend_info = backend.Info();
  v1::AttendRequest request = ValidRequest();
  request.mutable_config()->set_mass_target(0.95);
  ExpectError(SpecFromAttendRequest(request, options), absl::StatusCode::kFailedPrecondition,
              "config.step");
}

TEST(ProtoConvertTest, InfiniteThetaIsAllowed) {
  for (double theta :
       {std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity()}) {
    v1::AnchorConfig request;
    request.set_theta(theta);
    absl::StatusOr<AnchorConfig> merged = AnchorConfigFromProto(request, AnchorConfig());
    ASSERT_TRUE(merged.ok()) << merged.status();
    EXPECT_EQ(merged->theta, static_cast<float>(theta));
  }
}

TEST(ProtoConvertTest, BadConfigNamesTheField) {
  struct Case {
    void (*set)(v1::AnchorConfig*);
    const char* field;
  } cases[] = {
      {[](v1::AnchorConfig* c) { c->set_theta(std::nan("")); }, "config.theta"},
      {[](v1::AnchorConfig* c) { c->set_step(0); }, "config.step"},
      {[](v1::AnchorConfig* c) { c->set_step(kMaxStep + 1); }, "config.step"},
      {[](v1::AnchorConfig* c) { c->set_block_size(0); }, "config.block_size"},
      {[](v1::AnchorConfig* c) { c->set_block_size(kMaxBlockSize + 1); }, "config.block_size"},
      {[](v1::AnchorConfig* c) { c->set_init_groups(-1); }, "config.init_groups"},
      {[](v1::AnchorConfig* c) { c->set_local_groups(0); }, "config.local_groups"},
      {[](v1::AnchorConfig* c) { c->set_softmax_scale(-1.0); }, "config.softmax_scale"},
      {[](v1::AnchorConfig* c) { c->set_softmax_scale(std::nan("")); }, "config.softmax_scale"},
      {[](v1::AnchorConfig* c) { c->set_mode(static_cast<v1::AttentionMode>(9)); }, "config.mode"},
      {[](v1::AnchorConfig* c) { c->set_mass_target(std::nan("")); }, "config.mass_target"},
      {[](v1::AnchorConfig* c) { c->set_mass_target(1.5); }, "config.mass_target"},
      {[](v1::AnchorConfig* c) { c->set_mass_target(-0.1); }, "config.mass_target"},
      {[](v1::AnchorConfig* c) { c->set_mass_target(1e300); }, "config.mass_target"},
      // Values float would round to 0 (mass targets off) or onto 1.
      {[](v1::AnchorConfig* c) { c->set_mass_target(1e-300); }, "config.mass_target"},
      {[](v1::AnchorConfig* c) { c->set_mass_target(1.00000001); }, "config.mass_target"},
      {[](v1::AnchorConfig* c) { c->set_mass_density_cap(1e-300); }, "config.mass_density_cap"},
      {[](v1::AnchorConfig* c) { c->set_mass_density_cap(std::nan("")); },
       "config.mass_density_cap"},
      {[](v1::AnchorConfig* c) { c->set_mass_density_cap(0.0); }, "config.mass_density_cap"},
      {[](v1::AnchorConfig* c) { c->set_mass_density_cap(1.01); }, "config.mass_density_cap"},
      {[](v1::AnchorConfig* c) { c->set_mass_min_theta(std::nan("")); }, "config.mass_min_theta"},
      {[](v1::AnchorConfig* c) { c->set_mass_min_theta(INFINITY); }, "config.mass_min_theta"},
      {[](v1::AnchorConfig* c) { c->set_mass_min_theta(1e300); }, "config.mass_min_theta"},
  };
  for (const Case& c : cases) {
    v1::AttendRequest request = ValidRequest();
    c.set(request.mutable_config());
    ExpectError(SpecFromAttendRequest(request, Options()), absl::StatusCode::kInvalidArgument,
                c.field);
  }
}

TEST(ProtoConvertTest, BackendCapabilities) {
  fakes::FakeBackend backend;
  backend.SetInfo({"fake", "test", {DType::kBf16, DType::kFp16}, {16, 64}});
  ConvertOptions options = Options();
  options.backend = &backend;
  options.backend_info = backend.Info();
  EXPECT_TRUE(SpecFromAttendRequest(ValidRequest(), options).ok());

  ExpectError(SpecFromStreamHeader(Header({8, 4, 16}, {8, 2, 16}, v1::DATA_TYPE_FP32), options),
              absl::StatusCode::kFailedPrecondition,
              "dtype fp32 is not supported by the fake backend");
  // Head dims are the backend's CanRun() to judge (Info lists the tuned ones).
  EXPECT_TRUE(SpecFromStreamHeader(Header({8, 4, 32}, {8, 2, 32}), options).ok());

  backend.SetCanRun(absl::InvalidArgumentError("seq_len too long for fake"));
  ExpectError(SpecFromAttendRequest(ValidRequest(), options), absl::StatusCode::kInvalidArgument,
              "seq_len too long for fake");
}

TEST(ProtoConvertTest, StreamHeaderMissingTensor) {
  v1::StreamHeader header = Header({8, 4, 16}, {8, 2, 16});
  header.clear_k();
  ExpectError(SpecFromStreamHeader(header, Options()), absl::StatusCode::kInvalidArgument,
              "missing header.k");
}

TEST(ProtoConvertTest, MetricsOfAFinishedJob) {
  AttentionJob job;
  job.task.shape = {4, 2, 1, 16};
  job.task.config.theta = 9.0f;
  job.task.times.identification_seconds = 0.5;
  job.task.times.compute_seconds = 1.5;
  job.queue_seconds = 0.25;
  job.batch_size = 3;
  std::vector<HeadStats> heads(2);
  heads[0].computed_entries = 10;  // all 4 * 5 / 2 = 10 causal entries
  heads[1].computed_entries = 5;
  heads[1].stripe_entries = 2;
  heads[1].stripe_groups = 1;
  heads[1].stripes_total = 2;
  heads[1].stripes_min = 2;
  heads[1].stripes_max = 2;
  job.summary = SummarizeHeads(4, heads);
  job.recall = RecallStats();
  job.recall->output_recall_tau_0_01 = 0.9;
  job.recall->output_recall_tau_0_005 = 0.8;
  job.recall->attention_mass_mean = 0.95;
  job.recall->attention_mass_min = 0.5;
  job.recall->head_attention_mass = {1.0, 0.9};

  v1::AttentionMetrics metrics;
  FillAttentionMetrics(job, "fake", &metrics);
  EXPECT_DOUBLE_EQ(metrics.density(), 0.75);
  EXPECT_DOUBLE_EQ(metrics.sparsity(), 0.25);
  EXPECT_DOUBLE_EQ(metrics.stripe_density(), 0.1);
  EXPECT_EQ(metrics.stripes_per_group().groups(), 1);
  ASSERT_EQ(metrics.heads_size(), 2);
  EXPECT_EQ(metrics.heads(1).head(), 1);
  EXPECT_DOUBLE_EQ(metrics.heads(1).density(), 0.5);
  EXPECT_DOUBLE_EQ(metrics.heads(1).sparsity(), 0.5);
  EXPECT_EQ(metrics.heads(1).stripes_per_group().max(), 2);
  EXPECT_DOUBLE_EQ(metrics.queue_seconds(), 0.25);
  EXPECT_DOUBLE_EQ(metrics.identification_seconds(), 0.5);
  EXPECT_DOUBLE_EQ(metrics.compute_seconds(), 1.5);
  EXPECT_EQ(metrics.batch_size(), 3);
  EXPECT_EQ(metrics.backend(), "fake");
  ASSERT_TRUE(metrics.has_recall());
  EXPECT_DOUBLE_EQ(metrics.recall().output_recall_tau_0_01(), 0.9);
  EXPECT_DOUBLE_EQ(metrics.recall().attention_mass_min(), 0.5);
  const v1::AnchorConfig& effective = metrics.effective_config();
  EXPECT_TRUE(effective.has_theta() && effective.has_block_size() && effective.has_step() &&
              effective.has_init_groups() && effective.has_local_groups() &&
              effective.has_softmax_scale());
  EXPECT_EQ(effective.mode(), v1::ATTENTION_MODE_ANCHOR);
  EXPECT_DOUBLE_EQ(effective.theta(), 9.0);
  EXPECT_FLOAT_EQ(effective.softmax_scale(), 0.25f);  // 1/sqrt(16) resolved
  // Fixed theta: no mass budgets.
  EXPECT_FALSE(metrics.heads(0).has_mass());
  EXPECT_FALSE(metrics.heads(1).has_mass());
  EXPECT_EQ(metrics.estimated_kept_mass(), 0.0);
  EXPECT_EQ(effective.mass_target(), 0.0);

  job.recall.reset();
  FillAttentionMetrics(job, "fake", &metrics);
  EXPECT_FALSE(metrics.has_recall());
}

TEST(ProtoConvertTest, MassBudgetMetrics) {
  AttentionJob job;
  job.task.shape = {4, 2, 1, 16};
  job.task.config.mass_target = 0.95f;
  job.task.config.mass_density_cap = 0.5f;
  std::vector<HeadStats> heads(2);
  heads[0].computed_entries = 10;
  heads[0].mass_full_groups = 1;
  heads[0].estimated_mass_sum = 4.0;  // 4 rows: 1.0
  heads[1].computed_entries = 8;
  heads[1].mass_groups = 2;
  heads[1].mass_theta_min = 3.0f;
  heads[1].mass_theta_max = 5.0f;
  heads[1].mass_theta_sum = 8.0;
  heads[1].estimated_mass_sum = 3.8;  // 0.95
  job.summary = SummarizeHeads(4, heads);

  v1::AttentionMetrics metrics;
  FillAttentionMetrics(job, "fake", &metrics);
  ASSERT_EQ(metrics.heads_size(), 2);
  ASSERT_TRUE(metrics.heads(0).has_mass());
  const v1::MassBudget& full = metrics.heads(0).mass();
  EXPECT_EQ(full.groups(), 0);
  EXPECT_EQ(full.full_groups(), 1);
  EXPECT_DOUBLE_EQ(full.estimated_kept_mass(), 1.0);
  const v1::MassBudget& chosen = metrics.heads(1).mass();
  EXPECT_DOUBLE_EQ(chosen.theta_min(), 3.0);
  EXPECT_DOUBLE_EQ(chosen.theta_mean(), 4.0);
  EXPECT_DOUBLE_EQ(chosen.theta_max(), 5.0);
  EXPECT_EQ(chosen.groups(), 2);
  EXPECT_EQ(chosen.full_groups(), 0);
  EXPECT_DOUBLE_EQ(chosen.estimated_kept_mass(), 0.95);
  EXPECT_EQ(chosen.true_kept_mass(), 0.0);  // no recall
  EXPECT_DOUBLE_EQ(metrics.estimated_kept_mass(), (1.0 + 0.95) / 2.0);
  EXPECT_FLOAT_EQ(metrics.effective_config().mass_target(), 0.95f);
  EXPECT_FLOAT_EQ(metrics.effective_config().mass_density_cap(), 0.5f);

  job.recall = RecallStats();
  job.recall->head_attention_mass = {0.99, 0.9};
  FillAttentionMetrics(job, "fake", &metrics);
  EXPECT_DOUBLE_EQ(metrics.heads(0).mass().true_kept_mass(), 0.99);
  EXPECT_DOUBLE_EQ(metrics.heads(1).mass().true_kept_mass(), 0.9);

  // Dense mode ignores the target: no budgets.
  job.task.config.mode = AttentionMode::kDense;
  FillAttentionMetrics(job, "fake", &metrics);
  EXPECT_FALSE(metrics.heads(1).has_mass());
  EXPECT_EQ(metrics.estimated_kept_mass(), 0.0);
}

TEST(ProtoConvertTest, RequestIdsAreBounded) {
  v1::AttendRequest request = ValidRequest();
  request.set_request_id(std::string(kMaxRequestIdBytes, 'x'));
  EXPECT_TRUE(SpecFromAttendRequest(request, Options()).ok());
  request.set_request_id(std::string(kMaxRequestIdBytes + 1, 'x'));
  absl::StatusOr<RequestSpec> spec = SpecFromAttendRequest(request, Options());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(spec.status().message(), HasSubstr("request_id is 257 bytes long"));

  v1::StreamHeader header = Header({8, 4, 16}, {8, 2, 16});
  header.set_request_id(std::string(1 << 20, 'x'));
  spec = SpecFromStreamHeader(header, Options());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(spec.status().message(), HasSubstr("header.request_id"));
}

TEST(ProtoConvertTest, NonFiniteInputsAreNamed) {
  v1::AttendRequest request = ValidRequest();
  absl::StatusOr<RequestSpec> spec = SpecFromAttendRequest(request, Options());
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto check = [&] {
    return CheckFiniteInputs(*spec, request.q().data().data(), request.k().data().data(),
                             request.v().data().data());
  };
  EXPECT_TRUE(check().ok());
  // bf16 +inf as element 3 of v (little-endian 0x7f80).
  (*request.mutable_v()->mutable_data())[6] = static_cast<char>(0x80);
  (*request.mutable_v()->mutable_data())[7] = static_cast<char>(0x7f);
  absl::Status status = check();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("v holds a NaN or infinity (bf16 element 3"));
  // A NaN in q (bf16 0x7fc0) is reported first.
  (*request.mutable_q()->mutable_data())[0] = static_cast<char>(0xc0);
  (*request.mutable_q()->mutable_data())[1] = static_cast<char>(0x7f);
  EXPECT_THAT(check().message(), HasSubstr("q holds a NaN"));
}

}  // namespace
}  // namespace anchorserve
