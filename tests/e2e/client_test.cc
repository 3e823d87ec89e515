// Unit tests of anchor_client pieces that need no server: .npy files, tensor validation, error
// sentences, output comparison.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/attention_client.h"
#include "client/host_tensor.h"
#include "client/local_reference.h"
#include "client/npy.h"
#include "gmock/gmock.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"

namespace anchorserve {
namespace {

using ::testing::HasSubstr;

std::string ToString(const std::vector<uint8_t>& bytes) {
  return std::string(bytes.begin(), bytes.end());
}

HostTensor RandomTensor(DType dtype, std::array<int64_t, 3> shape, uint32_t seed) {
  HostTensor tensor = *AllocateHostTensor(dtype, Layout::kTokenMajor, shape);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> values(static_cast<size_t>(tensor.NumElements()));
  for (float& value : values) value = normal(rng);
  ConvertFromFloat(values.data(), values.size(), dtype, tensor.bytes.data());
  return tensor;
}

TEST(NpyTest, RoundTripsEveryDtype) {
  for (DType dtype : {DType::kBf16, DType::kFp16, DType::kFp32}) {
    SCOPED_TRACE(DTypeName(dtype));
    const HostTensor tensor = RandomTensor(dtype, {5, 3, 7}, 1);
    absl::StatusOr<std::string> header = MakeNpyHeader(dtype, tensor.shape);
    ASSERT_TRUE(header.ok()) << header.status();
    EXPECT_EQ(header->size() % 64, 0u) << "data must start 64-byte aligned";
    EXPECT_EQ(header->back(), '\n');
    const std::string file = *header + ToString(tensor.bytes);
    absl::StatusOr<NpyArray> parsed = ParseNpy(file);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->dtype, dtype);
    EXPECT_THAT(parsed->shape, ::testing::ElementsAre(5, 3, 7));
    EXPECT_TRUE(parsed->data == tensor.bytes);
  }
}

TEST(NpyTest, RoundTripsThroughAFile) {
  const HostTensor tensor = RandomTensor(DType::kFp16, {4, 2, 8}, 2);
  const std::string path = ::testing::TempDir() + "/anchor_client_test.npy";
  ASSERT_TRUE(WriteTensorNpy(path, tensor).ok());
  absl::StatusOr<HostTensor> read = ReadTensorNpy(path, Layout::kHeadMajor);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->layout, Layout::kHeadMajor);
  EXPECT_EQ(read->shape, tensor.shape);
  EXPECT_TRUE(read->bytes == tensor.bytes);
  std::remove(path.c_str());
}

// A header written the way NumPy writes one (version 1.0, spaces and a newline as padding).
TEST(NpyTest, ParsesNumpyStyleHeaders) {
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1, 2), }";
  std::string body = dict;
  while ((10 + body.size() + 1) % 64 != 0) body.push_back(' ');
  body.push_back('\n');
  std::string file = std::string("\x93NUMPY\x01\x00", 8);
  file.push_back(static_cast<char>(body.size() & 0xff));
  file.push_back(static_cast<char>(body.size() >> 8));
  file += body;
  const float values[4] = {1.5f, -2.0f, 0.25f, 8.0f};
  file.append(reinterpret_cast<const char*>(values), sizeof(values));
  absl::StatusOr<NpyArray> parsed = ParseNpy(file);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->data.size(), sizeof(values));
  float back[4];
  std::memcpy(back, parsed->data.data(), sizeof(back));
  EXPECT_EQ(back[3], 8.0f);

  // Version 2.0 (4-byte header length) with double quotes.
  const std::string dict2 =
      "{\"descr\": \"<u2\", \"fortran_order\": False, \"shape\": (1, 1, 1)}\n";
  std::string file2 = std::string("\x93NUMPY\x02\x00", 8);
  for (int i = 0; i < 4; ++i) file2.push_back(static_cast<char>((dict2.size() >> (8 * i)) & 0xff));
  file2 += dict2;
  file2 += std::string("\x80\x3f", 2);  // bf16 1.0
  absl::StatusOr<NpyArray> parsed2 = ParseNpy(file2);
  ASSERT_TRUE(parsed2.ok()) << parsed2.status();
  EXPECT_EQ(parsed2->dtype, DType::kBf16);
}

TEST(NpyTest, RejectsMalformedFilesWithClearErrors) {
  absl::StatusOr<std::string> header = MakeNpyHeader(DType::kFp32, std::vector<int64_t>{2, 2, 2});
  ASSERT_TRUE(header.ok());
  const std::string good = *header + std::string(32, '\0');
  ASSERT_TRUE(ParseNpy(good).ok());

  struct Case {
    std::string name;
    std::string file;
    std::string fragment;
  };
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string file = good;
    file.replace(file.find(from), from.size(), to);
    return file;
  };
  const std::vector<Case> cases = {
      {"empty", "", "magic"},
      {"not npy", "PK\x03\x04 zip file", "magic"},
      {"truncated data", good.substr(0, good.size() - 4), "needs 32"},
      {"extra data", good + "xx", "needs 32"},
      {"header longer than file", good.substr(0, 20), "header claims"},
      {"version 9", replace(std::string("\x93NUMPY\x01", 7), std::string("\x93NUMPY\x09", 7)),
       "version 9"},
      {"big endian", replace("'<f4'", "'>f4'"), "big-endian"},
      {"float64", replace("'<f4'", "'<f8'"), "'<f8' is not supported"},
      {"fortran order", replace("False", "True "), "Fortran"},
      {"no shape", replace("'shape'", "'shapf'"), "'shape'"},
      {"bad dim", replace("(2, 2, 2)", "(2, x, 2)"), "bad dimension"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    absl::StatusOr<NpyArray> parsed = ParseNpy(c.file, "test.npy");
    ASSERT_FALSE(parsed.ok());
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(parsed.status().message(), HasSubstr("test.npy"));
    EXPECT_THAT(parsed.status().message(), HasSubstr(c.fragment));
  }
}

TEST(NpyTest, TensorFilesMustBeThreeDimensional) {
  const std::string path = ::testing::TempDir() + "/anchor_client_2d.npy";
  const std::vector<uint8_t> data(6 * 4);
  ASSERT_TRUE(WriteNpyFile(path, DType::kFp32, std::vector<int64_t>{2, 3}, data).ok());
  absl::StatusOr<HostTensor> read = ReadTensorNpy(path, Layout::kTokenMajor);
  EXPECT_EQ(read.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(read.status().message(), HasSubstr("3-D"));
  std::remove(path.c_str());
  EXPECT_EQ(ReadNpyFile(path).status().code(), absl::StatusCode::kNotFound);
}

TEST(HostTensorTest, ValidatesQkv) {
  const HostTensor q = RandomTensor(DType::kBf16, {8, 4, 16}, 3);
  const HostTensor k = RandomTensor(DType::kBf16, {8, 2, 16}, 4);
  absl::StatusOr<AttentionShape> shape = ValidateQkv(q.View(), k.View(), k.View());
  ASSERT_TRUE(shape.ok()) << shape.status();
  EXPECT_EQ(shape->seq_len, 8);
  EXPECT_EQ(shape->num_q_heads, 4);
  EXPECT_EQ(shape->num_kv_heads, 2);
  EXPECT_EQ(shape->head_dim, 16);

  TensorView short_q = q.View();
  short_q.bytes = short_q.bytes.subspan(2);
  EXPECT_THAT(ValidateQkv(short_q, k.View(), k.View()).status().message(),
              HasSubstr("q has 1022 bytes, expected 1024"));
  const HostTensor k3 = RandomTensor(DType::kBf16, {8, 3, 16}, 5);
  EXPECT_THAT(ValidateQkv(q.View(), k3.View(), k3.View()).status().message(),
              HasSubstr("multiple"));
  TensorView huge = q.View();
  huge.shape = {int64_t{1} << 40, int64_t{1} << 30, 16};
  EXPECT_THAT(ValidateQkv(huge, k.View(), k.View()).status().message(), HasSubstr("int64"));
  TensorView zero = q.View();
  zero.shape = {8, 0, 16};
  EXPECT_THAT(ValidateQkv(zero, k.View(), k.View()).status().message(),
              HasSubstr("q.shape[1] (num_heads) must be positive, got 0"));
}

TEST(HostTensorTest, ConfigFromProtoKeepsDefaultsForUnsetFields) {
  v1::AnchorConfig proto;
  proto.set_mode(v1::ATTENTION_MODE_DENSE);
  proto.set_step(4);
  absl::StatusOr<AnchorConfig> config = AnchorConfigFromProto(proto);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->mode, AttentionMode::kDense);
  EXPECT_EQ(config->step, 4);
  EXPECT_EQ(config->block_size, AnchorConfig{}.block_size);
  proto.set_theta(std::numeric_limits<double>::quiet_NaN());
  EXPECT_EQ(AnchorConfigFromProto(proto).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ErrorSentenceTest, NamesServerAndRpc) {
  const absl::Status refused = FromGrpcStatus(
      grpc::Status(grpc::StatusCode::UNAVAILABLE,
                   "failed to connect to all addresses; last error: UNKNOWN: "
                   "ipv4:127.0.0.1:50051: Failed to connect to remote host: Connection refused"),
      "127.0.0.1:50051", "Attend");
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(refused.message(), "server at 127.0.0.1:50051 is unavailable: connection refused");

  const absl::Status invalid = FromGrpcStatus(
      grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "q.data has 3 bytes"), "h:1", "Attend");
  EXPECT_EQ(invalid.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(invalid.message(), "server at h:1 rejected Attend: q.data has 3 bytes");

  const absl::Status late = FromGrpcStatus(
      grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "Deadline Exceeded"), "h:1", "Attend");
  EXPECT_EQ(late.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(late.message(), HasSubstr("did not finish before its deadline"));

  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK, "h:1", "Attend").ok());
}

TEST(CompareOutputsTest, CountsErrorsAndNeverPassesNaN) {
  const HostTensor expected = RandomTensor(DType::kFp32, {4, 2, 8}, 6);
  HostTensor actual = expected;
  const Tolerance tolerance = VerificationTolerance(DType::kFp32);
  absl::StatusOr<OutputComparison> same = CompareOutputs(actual, expected, tolerance);
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(same->over_tolerance, 0);
  EXPECT_EQ(same->max_abs_error, 0);

  float* values = reinterpret_cast<float*>(actual.bytes.data());
  values[3] += 1.0f;
  values[7] = std::numeric_limits<float>::quiet_NaN();
  absl::StatusOr<OutputComparison> broken = CompareOutputs(actual, expected, tolerance);
  ASSERT_TRUE(broken.ok());
  EXPECT_EQ(broken->over_tolerance, 2);
  EXPECT_EQ(broken->non_finite, 1);
  EXPECT_NEAR(broken->max_abs_error, 1.0, 1e-5);

  HostTensor other_shape = expected;
  other_shape.shape = {2, 4, 8};
  EXPECT_FALSE(CompareOutputs(other_shape, expected, tolerance).ok());
}

TEST(BuildAttendRequestTest, CopiesTensorsAndConfig) {
  const HostTensor q = RandomTensor(DType::kFp16, {6, 2, 4}, 7);
  const HostTensor k = RandomTensor(DType::kFp16, {6, 1, 4}, 8);
  AttendInputs inputs;
  inputs.request_id = "r1";
  inputs.q = q.View();
  inputs.k = k.View();
  inputs.v = k.View();
  inputs.config.set_theta(3.5);
  inputs.options.set_metrics_only(true);
  absl::StatusOr<v1::AttendRequest> request = BuildAttendRequest(inputs);
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_EQ(request->request_id(), "r1");
  EXPECT_EQ(request->q().dtype(), v1::DATA_TYPE_FP16);
  EXPECT_EQ(request->q().layout(), v1::TENSOR_LAYOUT_TOKEN_MAJOR);
  EXPECT_THAT(request->k().shape(), ::testing::ElementsAre(6, 1, 4));
  EXPECT_EQ(request->q().data(), ToString(q.bytes));
  EXPECT_EQ(request->config().theta(), 3.5);
  EXPECT_TRUE(request->options().metrics_only());

  inputs.v = q.View();  // v must match k
  EXPECT_EQ(BuildAttendRequest(inputs).status().code(), absl::StatusCode::kInvalidArgument);
}

// ---- stream protocol checks against a fake server ----------------------------------------------

// Answers AttendStream with a scripted sequence of responses after reading the whole request.
class ScriptedStreamService final : public v1::AttentionService::Service {
 public:
  explicit ScriptedStreamService(std::vector<v1::AttendStreamResponse> script)
      : script_(std::move(script)) {}

  grpc::Status AttendStream(grpc::ServerContext* context,
                            grpc::ServerReaderWriter<v1::AttendStreamResponse,
                                                     v1::AttendStreamRequest>* stream) override {
    v1::AttendStreamRequest request;
    while (stream->Read(&request)) {
    }
    for (const v1::AttendStreamResponse& response : script_) {
      if (!stream->Write(response)) break;
    }
    return grpc::Status::OK;
  }

 private:
  std::vector<v1::AttendStreamResponse> script_;
};

class StreamProtocolTest : public ::testing::Test {
 protected:
  // q = k = v: fp32 [3, 1, 2] (24 bytes).
  void SetUp() override {
    tensor_ = RandomTensor(DType::kFp32, {3, 1, 2}, 9);
    inputs_.q = tensor_.View();
    inputs_.k = tensor_.View();
    inputs_.v = tensor_.View();
  }

  absl::StatusOr<AttendResult> RunAgainst(std::vector<v1::AttendStreamResponse> script) {
    ScriptedStreamService service(std::move(script));
    int port = 0;
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    if (server == nullptr || port == 0) return absl::InternalError("fake server did not start");
    ClientOptions options;
    options.default_deadline = absl::Seconds(30);
    options.stream_chunk_bytes = 7;  // several chunks per tensor
    absl::StatusOr<std::unique_ptr<AttentionClient>> client =
        AttentionClient::Create(absl::StrCat("127.0.0.1:", port), options);
    if (!client.ok()) return client.status();
    absl::StatusOr<AttendResult> result = (*client)->AttendStreamed(inputs_);
    server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    return result;
  }

  v1::AttendStreamResponse Spec(std::vector<int64_t> shape) const {
    v1::AttendStreamResponse response;
    response.mutable_output_spec()->set_dtype(v1::DATA_TYPE_FP32);
    response.mutable_output_spec()->set_layout(v1::TENSOR_LAYOUT_TOKEN_MAJOR);
    for (int64_t dim : shape) response.mutable_output_spec()->add_shape(dim);
    return response;
  }
  v1::AttendStreamResponse Chunk(int64_t offset, int64_t size) const {
    v1::AttendStreamResponse response;
    response.mutable_chunk()->set_tensor(v1::TENSOR_NAME_OUTPUT);
    response.mutable_chunk()->set_offset(offset);
    response.mutable_chunk()->set_data(
        std::string(reinterpret_cast<const char*>(tensor_.bytes.data()) + offset, size));
    return response;
  }
  static v1::AttendStreamResponse Metrics() {
    v1::AttendStreamResponse response;
    response.set_request_id("fake-1");
    response.mutable_metrics()->set_density(0.5);
    return response;
  }

  HostTensor tensor_;
  AttendInputs inputs_;
};

TEST_F(StreamProtocolTest, ReassemblesAWellFormedStream) {
  absl::StatusOr<AttendResult> result =
      RunAgainst({Spec({3, 1, 2}), Chunk(0, 10), Chunk(10, 14), Metrics()});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->request_id, "fake-1");
  EXPECT_EQ(result->metrics.density(), 0.5);
  ASSERT_TRUE(result->output.has_value());
  EXPECT_TRUE(result->output->bytes == tensor_.bytes);
}

TEST_F(StreamProtocolTest, RejectsProtocolViolations) {
  struct Case {
    std::string name;
    std::vector<v1::AttendStreamResponse> script;
    std::string fragment;
  };
  v1::AttendStreamResponse wrong_tensor = Chunk(0, 24);
  wrong_tensor.mutable_chunk()->set_tensor(v1::TENSOR_NAME_Q);
  v1::AttendStreamResponse one_extra_byte = Chunk(0, 1);
  one_extra_byte.mutable_chunk()->set_offset(24);
  const std::vector<Case> cases = {
      {"wrong output shape", {Spec({3, 2, 1}), Chunk(0, 24), Metrics()}, "shape [3, 2, 1]"},
      {"chunk before spec", {Chunk(0, 24), Spec({3, 1, 2}), Metrics()}, "before output_spec"},
      {"chunk out of order",
       {Spec({3, 1, 2}), Chunk(10, 14), Chunk(0, 10), Metrics()},
       "offset 10, expected 0"},
      {"too many bytes",
       {Spec({3, 1, 2}), Chunk(0, 24), one_extra_byte, Metrics()},
       "more than the 24"},
      {"metrics before all output",
       {Spec({3, 1, 2}), Chunk(0, 10), Metrics()},
       "after 10 of 24 output bytes"},
      {"message after metrics",
       {Spec({3, 1, 2}), Chunk(0, 24), Metrics(), Metrics()},
       "after the final metrics"},
      {"chunk of another tensor", {Spec({3, 1, 2}), wrong_tensor, Metrics()}, "TENSOR_NAME_Q"},
      {"no metrics", {Spec({3, 1, 2}), Chunk(0, 24)}, "without final metrics"},
      {"two specs",
       {Spec({3, 1, 2}), Spec({3, 1, 2}), Chunk(0, 24), Metrics()},
       "output_spec twice"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    absl::StatusOr<AttendResult> result = RunAgainst(c.script);
    ASSERT_FALSE(result.ok());
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal) << result.status();
    EXPECT_THAT(result.status().message(), HasSubstr(c.fragment)) << result.status();
  }
}

}  // namespace
}  // namespace anchorserve
