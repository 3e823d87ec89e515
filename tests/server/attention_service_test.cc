// The service in process: a real gRPC server on 127.0.0.1:0 (StartGrpcServer, as in main) over
// the fake backend, driven by the generated stubs. Covers startup (NOT_SERVING, "server is
// starting"), the streaming protocol, its errors, draining, deadlines, cancellation, the queue
// limit and the keepalive policy as a client sees them.
#include "server/attention_service.h"

#include <algorithm>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "grpc/grpc.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/server.h"
#include "gtest/gtest.h"
#include "prometheus/text_serializer.h"
#include "server/attention_executor.h"
#include "server/batcher.h"
#include "server/clock.h"
#include "server/grpc_server.h"
#include "server/metrics.h"
#include "tests/server/fake_backend.h"

namespace anchorserve {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

struct Inputs {
  int64_t seq_len, q_heads, kv_heads, head_dim;
  std::string q, k, v;   // bf16 token-major bytes
  std::string expected;  // the fake backend's output

  v1::TensorSpec Spec(bool is_q) const {
    v1::TensorSpec spec;
    spec.set_dtype(v1::DATA_TYPE_BF16);
    spec.set_layout(v1::TENSOR_LAYOUT_TOKEN_MAJOR);
    spec.add_shape(seq_len);
    spec.add_shape(is_q ? q_heads : kv_heads);
    spec.add_shape(head_dim);
    return spec;
  }
};

Inputs MakeInputs(int64_t seq_len, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                  uint32_t seed) {
  Inputs in{seq_len, q_heads, kv_heads, head_dim, {}, {}, {}, {}};
  std::mt19937 rng(seed);
  auto fill = [&](std::string* s, int64_t heads) {
    s->resize(static_cast<size_t>(seq_len * heads * head_dim * 2));
    for (char& c : *s) c = static_cast<char>(rng() & 0xff);
    // Random 16-bit elements, kept finite (the server rejects NaN and infinity): the top
    // exponent bit, bit 6 of each little-endian high byte, is cleared.
    for (size_t i = 1; i < s->size(); i += 2) (*s)[i] = static_cast<char>((*s)[i] & 0xbf);
  };
  fill(&in.q, q_heads);
  fill(&in.k, kv_heads);
  fill(&in.v, kv_heads);
  auto bytes = [](const std::string& s) {
    return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  };
  const std::vector<uint8_t> out = fakes::FakeOutput(bytes(in.q), bytes(in.k), bytes(in.v));
  in.expected.assign(out.begin(), out.end());
  return in;
}

v1::AttendRequest UnaryRequest(const Inputs& in) {
  v1::AttendRequest request;
  auto set = [](v1::Tensor* t, const v1::TensorSpec& spec, const std::string& data) {
    t->set_dtype(spec.dtype());
    t->set_layout(spec.layout());
    *t->mutable_shape() = spec.shape();
    t->set_data(data);
  };
  set(request.mutable_q(), in.Spec(true), in.q);
  set(request.mutable_k(), in.Spec(false), in.k);
  set(request.mutable_v(), in.Spec(false), in.v);
  return request;
}

v1::AttendStreamRequest HeaderMessage(const Inputs& in, const std::string& request_id = "") {
  v1::AttendStreamRequest message;
  v1::StreamHeader* header = message.mutable_header();
  header->set_request_id(request_id);
  *header->mutable_q() = in.Spec(true);
  *header->mutable_k() = in.Spec(false);
  *header->mutable_v() = in.Spec(false);
  return message;
}

v1::AttendStreamRequest ChunkMessage(v1::TensorName tensor, int64_t offset, std::string data) {
  v1::AttendStreamRequest message;
  message.mutable_chunk()->set_tensor(tensor);
  message.mutable_chunk()->set_offset(offset);
  message.mutable_chunk()->set_data(std::move(data));
  return message;
}

// Q, K and V interleaved in chunks of `chunk` bytes.
std::vector<v1::AttendStreamRequest> ChunkMessages(const Inputs& in, size_t chunk) {
  std::vector<v1::AttendStreamRequest> messages;
  const std::pair<v1::TensorName, const std::string*> tensors[] = {
      {v1::TENSOR_NAME_Q, &in.q}, {v1::TENSOR_NAME_K, &in.k}, {v1::TENSOR_NAME_V, &in.v}};
  for (size_t offset = 0; offset < in.q.size(); offset += chunk) {
    for (const auto& [name, data] : tensors) {
      if (offset < data->size()) {
        messages.push_back(
            ChunkMessage(name, static_cast<int64_t>(offset), data->substr(offset, chunk)));
      }
    }
  }
  return messages;
}

struct StreamOutcome {
  grpc::Status status;
  std::vector<v1::AttendStreamResponse> responses;
};

using HealthResponse = grpc::health::v1::HealthCheckResponse;

class AttentionServiceTest : public ::testing::Test {
 protected:
  // Listening and, unless `ready` is false, ready (MakeReady) and SERVING, as main does.
  void StartServer(ServerConfig config = SmallConfig(), bool ready = true,
                   const KeepaliveOptions& keepalive = {},
                   grpc::ChannelArguments args = grpc::ChannelArguments()) {
    config.host = "127.0.0.1";
    config.grpc_port = 0;
    config_ = config;
    service_ = std::make_unique<AttentionServiceImpl>(config, &metrics_, &clock_);
    absl::StatusOr<StartedGrpcServer> started =
        StartGrpcServer(config, {service_.get()}, keepalive);
    ASSERT_TRUE(started.ok()) << started.status();
    server_ = std::move(started->server);
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    channel_ = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", started->port),
                                         grpc::InsecureChannelCredentials(), args);
    stub_ = v1::AttentionService::NewStub(channel_);
    health_stub_ = grpc::health::v1::Health::NewStub(channel_);
    if (ready) MakeReady();
  }

  // What main does once the backend exists.
  void MakeReady() {
    executor_ = std::make_unique<AttentionExecutor>(&backend_, &metrics_);
    batcher_ = std::make_unique<DynamicBatcher>(
        BatchLimits{config_.max_batch_requests, config_.max_batch_tokens, config_.max_queue_delay},
        config_.max_queue_size, executor_.get(), &clock_, &metrics_);
    ASSERT_TRUE(service_->SetReady(&backend_, batcher_.get()).ok());
    SetServingHealth(*server_, true);
  }

  // grpc.health.v1.Health/Check of `service`: the status, or the call's error code as a string.
  std::string Health(const std::string& service) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(service);
    HealthResponse response;
    const grpc::Status status = health_stub_->Check(&context, request, &response);
    if (!status.ok()) return absl::StrCat("error ", status.error_code());
    return HealthResponse::ServingStatus_Name(response.status());
  }

  void TearDown() override {
    backend_.OpenGate();
    if (server_ != nullptr) server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    if (batcher_ != nullptr) batcher_->Stop();
  }

  static ServerConfig SmallConfig() {
    ServerConfig config;
    config.max_queue_delay = absl::ZeroDuration();
    config.stream_chunk_bytes = 64;
    config.max_message_bytes = 1 << 20;
    return config;
  }

  StreamOutcome RunStream(const std::vector<v1::AttendStreamRequest>& messages,
                          bool writes_done = true) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
    auto stream = stub_->AttendStream(&context);
    for (const auto& message : messages) {
      if (!stream->Write(message)) break;  // the server already finished the call
    }
    if (writes_done) stream->WritesDone();
    StreamOutcome outcome;
    v1::AttendStreamResponse response;
    while (stream->Read(&response)) outcome.responses.push_back(response);
    outcome.status = stream->Finish();
    return outcome;
  }

  std::string RenderMetrics() {
    std::ostringstream out;
    prometheus::TextSerializer().Serialize(out, metrics_.registry()->Collect());
    return out.str();
  }

  ServerConfig config_;
  RealClock clock_;
  fakes::FakeBackend backend_;
  MetricsRegistry metrics_;
  std::unique_ptr<AttentionExecutor> executor_;
  std::unique_ptr<DynamicBatcher> batcher_;
  std::unique_ptr<AttentionServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::AttentionService::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_stub_;
};

TEST_F(AttentionServiceTest, StartingServerIsNotServingAndRefusesCallsUntilReady) {
  StartServer(SmallConfig(), /*ready=*/false);
  EXPECT_EQ(Health(""), "NOT_SERVING");
  EXPECT_EQ(Health(kAttentionServiceName), "NOT_SERVING");
  const Inputs in = MakeInputs(8, 4, 2, 16, /*seed=*/20);
  {
    grpc::ClientContext context;
    v1::AttendResponse response;
    const grpc::Status status = stub_->Attend(&context, UnaryRequest(in), &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(status.error_message(), "server is starting");
  }
  {
    grpc::ClientContext context;
    v1::GetServerInfoResponse info;
    const grpc::Status status = stub_->GetServerInfo(&context, {}, &info);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(status.error_message(), "server is starting");
  }
  std::vector<v1::AttendStreamRequest> messages = {HeaderMessage(in)};
  for (auto& chunk : ChunkMessages(in, 1 << 10)) messages.push_back(std::move(chunk));
  const StreamOutcome refused = RunStream(messages);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(refused.status.error_message(), "server is starting");
  EXPECT_TRUE(refused.responses.empty());
  EXPECT_TRUE(backend_.runs().empty());
  EXPECT_THAT(RenderMetrics(),
              HasSubstr("anchorserve_requests_total{code=\"UNAVAILABLE\",rpc=\"Attend\"} 1"));

  MakeReady();
  EXPECT_EQ(Health(""), "SERVING");
  EXPECT_EQ(Health(kAttentionServiceName), "SERVING");
  grpc::ClientContext context;
  v1::AttendResponse response;
  const grpc::Status status = stub_->Attend(&context, UnaryRequest(in), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(response.output().data() == in.expected) << "output bytes differ";
  const StreamOutcome served = RunStream(messages);
  EXPECT_TRUE(served.status.ok()) << served.status.error_message();
}

TEST_F(AttentionServiceTest, SetReadyTwiceIsRefused) {
  StartServer();
  EXPECT_EQ(service_->SetReady(&backend_, batcher_.get()).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(AttentionServiceTest, IdleClientPingingWithinTheKeepalivePolicyStaysConnected) {
  // The production policy scaled down 20x (clients may ping every 500 ms instead of 10 s) so that
  // a bounded wait sees several pings. The client pings every second (gRPC clients never ping
  // more often) without any call in flight. gRPC's default server policy (5 min, 2 h without
  // calls, 2 strikes) answers the fourth such ping with GOAWAY too_many_pings, which drops the
  // channel out of READY.
  KeepaliveOptions keepalive;
  keepalive.min_client_ping_interval = absl::Milliseconds(500);
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 1000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  StartServer(SmallConfig(), /*ready=*/true, keepalive, args);
  ASSERT_TRUE(channel_->WaitForConnected(absl::ToChronoTime(absl::Now() + absl::Seconds(30))));
  // About 6 pings; the channel must stay READY meanwhile.
  EXPECT_FALSE(channel_->WaitForStateChange(GRPC_CHANNEL_READY,
                                            absl::ToChronoTime(absl::Now() + absl::Seconds(6))))
      << "channel left READY (now state " << channel_->GetState(false)
      << "): the server sent GOAWAY too_many_pings?";
  grpc::ClientContext context;
  v1::GetServerInfoResponse info;
  EXPECT_TRUE(stub_->GetServerInfo(&context, {}, &info).ok());
}

TEST_F(AttentionServiceTest, UnaryRoundTrip) {
  StartServer();
  const Inputs in = MakeInputs(8, 4, 2, 16, /*seed=*/1);
  v1::AttendRequest request = UnaryRequest(in);
  request.set_request_id("my-request");
  grpc::ClientContext context;
  v1::AttendResponse response;
  const grpc::Status status = stub_->Attend(&context, request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.request_id(), "my-request");
  EXPECT_EQ(response.output().dtype(), v1::DATA_TYPE_BF16);
  EXPECT_EQ(response.output().layout(), v1::TENSOR_LAYOUT_TOKEN_MAJOR);
  EXPECT_THAT(response.output().shape(), ::testing::ElementsAre(8, 4, 16));
  EXPECT_TRUE(response.output().data() == in.expected) << "output bytes differ";
  const v1::AttentionMetrics& metrics = response.metrics();
  EXPECT_EQ(metrics.backend(), "fake");
  EXPECT_EQ(metrics.batch_size(), 1);
  EXPECT_EQ(metrics.heads_size(), 4);
  EXPECT_DOUBLE_EQ(metrics.density(), 1.0);
  EXPECT_DOUBLE_EQ(metrics.compute_seconds(), 0.5);
  EXPECT_GE(metrics.total_seconds(), 0.0);
  EXPECT_TRUE(metrics.effective_config().has_theta());
  EXPECT_FALSE(metrics.has_recall());
  EXPECT_THAT(RenderMetrics(),
              HasSubstr("anchorserve_requests_total{code=\"OK\",rpc=\"Attend\"} 1"));
}

TEST_F(AttentionServiceTest, UnaryMakesUpARequestIdAndHonoursMetricsOnlyAndRecall) {
  StartServer();
  v1::AttendRequest request = UnaryRequest(MakeInputs(8, 2, 2, 8, 2));
  request.mutable_options()->set_metrics_only(true);
  request.mutable_options()->set_compute_recall(true);
  grpc::ClientContext context;
  v1::AttendResponse response;
  const grpc::Status status = stub_->Attend(&context, request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_THAT(response.request_id(), StartsWith("req-"));
  EXPECT_FALSE(response.has_output());
  ASSERT_TRUE(response.metrics().has_recall());
  EXPECT_DOUBLE_EQ(response.metrics().recall().output_recall_tau_0_01(), 1.0);
}

TEST_F(AttentionServiceTest, UnaryBadInputNamesTheField) {
  StartServer();
  v1::AttendRequest request = UnaryRequest(MakeInputs(8, 4, 2, 16, 3));
  request.mutable_q()->set_shape(1, 0);
  grpc::ClientContext context;
  v1::AttendResponse response;
  const grpc::Status status = stub_->Attend(&context, request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(), "q.shape[1] (num_heads) must be positive, got 0");
}

// Attend is served from raw bytes (tensor_wire.h): a body that is no AttendRequest is refused
// with INVALID_ARGUMENT, and the server stays up.
TEST_F(AttentionServiceTest, UnaryBodyThatDoesNotParseIsInvalidArgument) {
  StartServer();
  grpc::GenericStub generic(channel_);
  // A length-delimited q (field 2) claiming 100 bytes of which 3 follow.
  const std::string truncated("\x12\x64\x08\x01\x10", 5);
  const grpc::Slice slice(truncated);
  const grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
  absl::Notification done;
  grpc::Status status;
  generic.UnaryCall(&context, "/anchorserve.v1.AttentionService/Attend", grpc::StubOptions(),
                    &request, &response, [&](grpc::Status call_status) {
                      status = std::move(call_status);
                      done.Notify();
                    });
  done.WaitForNotification();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("does not parse as an AttendRequest"));

  const Inputs in = MakeInputs(8, 4, 2, 16, /*seed=*/4);
  grpc::ClientContext next_context;
  v1::AttendResponse next;
  ASSERT_TRUE(stub_->Attend(&next_context, UnaryRequest(in), &next).ok());
  EXPECT_TRUE(next.output().data() == in.expected) << "output bytes differ";
}

TEST_F(AttentionServiceTest, ServerInfoHasEveryField) {
  StartServer();
  grpc::ClientContext context;
  v1::GetServerInfoResponse info;
  ASSERT_TRUE(stub_->GetServerInfo(&context, {}, &info).ok());
  EXPECT_EQ(info.version(), ServerVersion());
  EXPECT_FALSE(info.version().empty());
  EXPECT_EQ(info.backend(), "fake");
  EXPECT_EQ(info.device(), "test device");
  EXPECT_EQ(info.supported_dtypes_size(), 3);
  EXPECT_EQ(info.limits().max_message_bytes(), 1 << 20);
  EXPECT_EQ(info.limits().stream_chunk_bytes(), 64);
  EXPECT_EQ(info.limits().max_queue_size(), config_.max_queue_size);
  EXPECT_EQ(info.limits().max_request_bytes(), config_.max_request_bytes);
  const v1::AnchorConfig& defaults = info.defaults();
  EXPECT_EQ(defaults.mode(), v1::ATTENTION_MODE_AUTO);
  EXPECT_TRUE(defaults.has_theta() && defaults.has_block_size() && defaults.has_step() &&
              defaults.has_init_groups() && defaults.has_local_groups() &&
              defaults.has_softmax_scale());
  EXPECT_DOUBLE_EQ(defaults.theta(), 12.0);
  EXPECT_EQ(defaults.block_size(), 128);
}

TEST_F(AttentionServiceTest, StreamRoundTripInChunks) {
  StartServer();
  const Inputs in = MakeInputs(8, 4, 2, 16, 4);  // q 1024 bytes, k and v 512
  std::vector<v1::AttendStreamRequest> messages = {HeaderMessage(in, "stream-1")};
  for (auto& chunk : ChunkMessages(in, 100)) messages.push_back(std::move(chunk));
  const StreamOutcome outcome = RunStream(messages);
  ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  ASSERT_GE(outcome.responses.size(), 3u);

  const v1::AttendStreamResponse& first = outcome.responses.front();
  ASSERT_TRUE(first.has_output_spec());
  EXPECT_EQ(first.request_id(), "stream-1");
  EXPECT_THAT(first.output_spec().shape(), ::testing::ElementsAre(8, 4, 16));
  std::string output;
  for (size_t i = 1; i + 1 < outcome.responses.size(); ++i) {
    const v1::AttendStreamResponse& message = outcome.responses[i];
    ASSERT_TRUE(message.has_chunk()) << "message " << i;
    EXPECT_EQ(message.chunk().tensor(), v1::TENSOR_NAME_OUTPUT);
    EXPECT_EQ(message.chunk().offset(), static_cast<int64_t>(output.size()));
    EXPECT_LE(message.chunk().data().size(), 64u);
    output += message.chunk().data();
  }
  EXPECT_EQ(outcome.responses.size(), 2u + 1024u / 64u);
  EXPECT_TRUE(output == in.expected) << "output bytes differ";
  const v1::AttendStreamResponse& last = outcome.responses.back();
  ASSERT_TRUE(last.has_metrics());
  EXPECT_EQ(last.request_id(), "stream-1");
  EXPECT_EQ(last.metrics().heads_size(), 4);
}

TEST_F(AttentionServiceTest, StreamComputesBeforeTheClientHalfCloses) {
  StartServer();
  const Inputs in = MakeInputs(4, 2, 1, 8, 5);
  grpc::ClientContext context;
  auto stream = stub_->AttendStream(&context);
  ASSERT_TRUE(stream->Write(HeaderMessage(in)));
  for (const auto& chunk : ChunkMessages(in, 1 << 10)) ASSERT_TRUE(stream->Write(chunk));
  // No WritesDone yet: the output must come anyway.
  v1::AttendStreamResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_TRUE(response.has_output_spec());
  stream->WritesDone();
  int messages = 1;
  while (stream->Read(&response)) ++messages;
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(messages, 1 + 2 + 1);  // spec, 128 bytes in 64-byte chunks, metrics
}

TEST_F(AttentionServiceTest, StreamMetricsOnlySendsOnlyMetrics) {
  StartServer();
  const Inputs in = MakeInputs(8, 2, 2, 8, 6);
  std::vector<v1::AttendStreamRequest> messages = {HeaderMessage(in)};
  messages[0].mutable_header()->mutable_options()->set_metrics_only(true);
  for (auto& chunk : ChunkMessages(in, 1 << 10)) messages.push_back(std::move(chunk));
  const StreamOutcome outcome = RunStream(messages);
  ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  ASSERT_EQ(outcome.responses.size(), 1u);
  EXPECT_TRUE(outcome.responses[0].has_metrics());
}

TEST_F(AttentionServiceTest, StreamProtocolErrors) {
  StartServer();
  const Inputs in = MakeInputs(8, 4, 2, 16, 7);
  const v1::AttendStreamRequest header = HeaderMessage(in);
  const struct {
    std::vector<v1::AttendStreamRequest> messages;
    const char* expected;
  } cases[] = {
      {{ChunkMessage(v1::TENSOR_NAME_Q, 0, "ab")}, "first message must be a header"},
      {{header, ChunkMessage(v1::TENSOR_NAME_K, 10, "ab")}, "chunk.offset of k is 10, expected 0"},
      {{header, ChunkMessage(v1::TENSOR_NAME_Q, 0, in.q.substr(0, 10)),
        ChunkMessage(v1::TENSOR_NAME_Q, 5, "ab")},
       "chunk.offset of q is 5, expected 10"},
      {{header, ChunkMessage(v1::TENSOR_NAME_V, 0, in.v + "x")},
       "carries 513 bytes, beyond the 512 bytes"},
      {{header, header}, "second header"},
      {{header, ChunkMessage(v1::TENSOR_NAME_OUTPUT, 0, "ab")}, "chunk.tensor must be"},
      {{header, v1::AttendStreamRequest()}, "neither header nor chunk"},
      {{header, ChunkMessage(v1::TENSOR_NAME_Q, 0, in.q)},
       "stream ended before all tensor data arrived: k is missing 512 of 512 bytes; v is "
       "missing 512 of 512 bytes"},
      {{}, "stream ended before a header arrived"},
  };
  for (const auto& c : cases) {
    const StreamOutcome outcome = RunStream(c.messages);
    EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.expected;
    EXPECT_THAT(outcome.status.error_message(), HasSubstr(c.expected));
    EXPECT_TRUE(outcome.responses.empty());
  }
  EXPECT_TRUE(backend_.runs().empty());
}

TEST_F(AttentionServiceTest, ExtraChunkAfterAllDataIsAnError) {
  StartServer();
  backend_.CloseGate();  // keep the job running while the extra chunk arrives
  const Inputs in = MakeInputs(4, 2, 1, 8, 8);
  grpc::ClientContext context;
  auto stream = stub_->AttendStream(&context);
  ASSERT_TRUE(stream->Write(HeaderMessage(in)));
  for (const auto& chunk : ChunkMessages(in, 1 << 10)) ASSERT_TRUE(stream->Write(chunk));
  backend_.WaitForRuns(1);
  stream->Write(ChunkMessage(v1::TENSOR_NAME_Q, static_cast<int64_t>(in.q.size()), "zz"));
  stream->WritesDone();
  backend_.WaitForCancelledTask();  // the server gave up on the job because of the extra chunk
  backend_.OpenGate();
  v1::AttendStreamResponse response;
  while (stream->Read(&response)) {
  }
  const grpc::Status status = stream->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("after all tensor data arrived"));
}

TEST_F(AttentionServiceTest, StreamHeaderOverLimitsIsRefusedBeforeData) {
  ServerConfig config = SmallConfig();
  config.max_request_bytes = 1000;
  StartServer(config);
  const Inputs in = MakeInputs(8, 4, 2, 16, 9);  // 2048 bytes in all
  const StreamOutcome outcome = RunStream({HeaderMessage(in)}, /*writes_done=*/false);
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(outcome.status.error_message(), HasSubstr("--max_request_bytes=1000"));
}

TEST_F(AttentionServiceTest, DrainingRefusesNewCalls) {
  StartServer();
  service_->StartDraining();
  const Inputs in = MakeInputs(4, 2, 1, 8, 10);
  {
    grpc::ClientContext context;
    v1::AttendResponse response;
    const grpc::Status status = stub_->Attend(&context, UnaryRequest(in), &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(status.error_message(), "server is draining");
  }
  {
    grpc::ClientContext context;
    v1::GetServerInfoResponse info;
    EXPECT_EQ(stub_->GetServerInfo(&context, {}, &info).error_code(),
              grpc::StatusCode::UNAVAILABLE);
  }
  const StreamOutcome outcome = RunStream({HeaderMessage(in)});
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(outcome.status.error_message(), "server is draining");
  EXPECT_TRUE(service_->WaitUntilIdle(absl::Now() + absl::Seconds(10)));
}

TEST_F(AttentionServiceTest, DrainLetsInFlightWorkFinish) {
  StartServer();
  backend_.CloseGate();
  const Inputs in = MakeInputs(8, 2, 1, 8, 11);
  grpc::Status status;
  v1::AttendResponse response;
  std::thread call([&] {
    grpc::ClientContext context;
    status = stub_->Attend(&context, UnaryRequest(in), &response);
  });
  backend_.WaitForRuns(1);
  service_->StartDraining();
  EXPECT_FALSE(service_->WaitUntilIdle(absl::Now() + absl::Milliseconds(50)));
  backend_.OpenGate();
  EXPECT_TRUE(service_->WaitUntilIdle(absl::Now() + absl::Seconds(30)));
  call.join();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(response.output().data() == in.expected);
}

// The server learns of a client's deadline or cancellation on its own, a little after the
// client gave up; tests that need the server to have noticed wait this long.
constexpr absl::Duration kServerNoticeMargin = absl::Milliseconds(500);

TEST_F(AttentionServiceTest, DeadlinePassingInTheQueueIsNeverComputed) {
  StartServer();
  backend_.CloseGate();
  const Inputs busy = MakeInputs(8, 2, 1, 8, 12);
  const Inputs late = MakeInputs(5, 2, 1, 8, 13);  // seq_len 5 marks it
  grpc::Status busy_status;
  std::thread busy_call([&] {
    grpc::ClientContext context;
    v1::AttendResponse response;
    busy_status = stub_->Attend(&context, UnaryRequest(busy), &response);
  });
  backend_.WaitForRuns(1);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Milliseconds(200)));
  v1::AttendResponse response;
  const grpc::Status late_status = stub_->Attend(&context, UnaryRequest(late), &response);
  EXPECT_EQ(late_status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  absl::SleepFor(kServerNoticeMargin);  // the server's copy of the deadline passes too
  backend_.OpenGate();
  busy_call.join();
  EXPECT_TRUE(busy_status.ok()) << busy_status.error_message();
  ASSERT_TRUE(service_->WaitUntilIdle(absl::Now() + absl::Seconds(30)));
  for (const auto& run : backend_.runs()) {
    EXPECT_THAT(run.seq_lens, ::testing::Not(::testing::Contains(5)));
  }
  EXPECT_THAT(RenderMetrics(),
              HasSubstr("anchorserve_requests_total{code=\"DEADLINE_EXCEEDED\",rpc=\"Attend\"} 1"));
}

TEST_F(AttentionServiceTest, CancelledQueuedCallIsNeverComputed) {
  StartServer();
  backend_.CloseGate();
  const Inputs busy = MakeInputs(8, 2, 1, 8, 14);
  const Inputs cancelled = MakeInputs(6, 2, 1, 8, 15);  // seq_len 6 marks it
  std::thread busy_call([&] {
    grpc::ClientContext context;
    v1::AttendResponse response;
    stub_->Attend(&context, UnaryRequest(busy), &response);
  });
  backend_.WaitForRuns(1);
  grpc::ClientContext context;
  grpc::Status status;
  std::thread cancelled_call([&] {
    v1::AttendResponse response;
    status = stub_->Attend(&context, UnaryRequest(cancelled), &response);
  });
  while (batcher_->QueueDepth() == 0) absl::SleepFor(absl::Milliseconds(1));  // queued
  context.TryCancel();
  cancelled_call.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
  absl::SleepFor(kServerNoticeMargin);
  backend_.OpenGate();
  busy_call.join();
  ASSERT_TRUE(service_->WaitUntilIdle(absl::Now() + absl::Seconds(30)));
  for (const auto& run : backend_.runs()) {
    EXPECT_THAT(run.seq_lens, ::testing::Not(::testing::Contains(6)));
  }
  EXPECT_THAT(RenderMetrics(),
              HasSubstr("anchorserve_requests_total{code=\"CANCELLED\",rpc=\"Attend\"} 1"));
}

TEST_F(AttentionServiceTest, CancellationReachesTheRunningBackend) {
  StartServer();
  backend_.CloseGate();
  const Inputs in = MakeInputs(8, 2, 1, 8, 16);
  grpc::ClientContext context;
  grpc::Status status;
  std::thread call([&] {
    v1::AttendResponse response;
    status = stub_->Attend(&context, UnaryRequest(in), &response);
  });
  backend_.WaitForRuns(1);
  context.TryCancel();
  backend_.WaitForCancelledTask();  // OnCancel set the task's flag
  backend_.OpenGate();
  call.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
  ASSERT_TRUE(service_->WaitUntilIdle(absl::Now() + absl::Seconds(30)));
  EXPECT_THAT(RenderMetrics(),
              HasSubstr("anchorserve_requests_total{code=\"CANCELLED\",rpc=\"Attend\"} 1"));
}

TEST_F(AttentionServiceTest, FullQueueIsResourceExhausted) {
  ServerConfig config = SmallConfig();
  config.max_queue_size = 1;
  config.max_batch_requests = 1;
  StartServer(config);
  backend_.CloseGate();
  const Inputs in = MakeInputs(4, 2, 1, 8, 16);
  std::vector<std::thread> calls;
  std::vector<grpc::Status> statuses(2);
  for (int i = 0; i < 2; ++i) {
    calls.emplace_back([&, i] {
      grpc::ClientContext context;
      v1::AttendResponse response;
      statuses[i] = stub_->Attend(&context, UnaryRequest(in), &response);
    });
    if (i == 0) backend_.WaitForRuns(1);
  }
  while (batcher_->QueueDepth() == 0) absl::SleepFor(absl::Milliseconds(1));
  {
    grpc::ClientContext context;
    v1::AttendResponse response;
    const grpc::Status status = stub_->Attend(&context, UnaryRequest(in), &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(status.error_message(), HasSubstr("--max_queue_size=1"));
  }
  backend_.OpenGate();
  for (auto& call : calls) call.join();
  for (const auto& status : statuses) EXPECT_TRUE(status.ok()) << status.error_message();
}

}  // namespace
}  // namespace anchorserve
