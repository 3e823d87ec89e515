// Malformed and oversized requests against a running server: each gets the right status code and
// a message naming the offending field or limit flag, and the server still serves afterwards.
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/attention_client.h"
#include "google/protobuf/descriptor.pb.h"
#include "grpc/reflection/v1/reflection.grpc.pb.h"
#include "grpc/reflection/v1alpha/list_services.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/impl/codegen/client_unary_call.h"
#include "grpcpp/impl/codegen/sync_stream.h"
#include "grpcpp/support/byte_buffer.h"
#include "gtest/gtest.h"
#include "kernels/attention_types.h"
#include "proto/anchorserve/v1/limits.h"
#include "tests/e2e/e2e_util.h"

namespace anchorserve::e2e {
namespace {

// Limits small enough to exceed with small tensors.
constexpr int64_t kMaxRequestBytes = 1 << 20;
constexpr int64_t kMaxSeqLen = 2048;
constexpr int kMaxHeads = 16;

class BadInputE2eTest : public SharedServerTest {
 protected:
  static void SetUpTestSuite() {
    StartSharedServer({
        "--cpu_threads=2",
        absl::StrCat("--max_request_bytes=", kMaxRequestBytes),
        absl::StrCat("--max_seq_len=", kMaxSeqLen),
        absl::StrCat("--max_heads=", kMaxHeads),
    });
  }
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(SharedServerTest::SetUp());
    client_ = MakeClient(*server_, absl::Seconds(30));
    ASSERT_NE(client_, nullptr);
    // bf16 [64, 4, 64] q and [64, 2, 64] k, v: a valid request to break one field at a time.
    absl::StatusOr<QkvTensors> qkv =
        MakeQkv(InputKind::kRandom, 64, 4, 2, 64, DType::kBf16, Layout::kTokenMajor, 3);
    ASSERT_TRUE(qkv.ok()) << qkv.status();
    qkv_ = *std::move(qkv);
    absl::StatusOr<v1::AttendRequest> request = BuildAttendRequest(InputsFor(qkv_));
    ASSERT_TRUE(request.ok()) << request.status();
    good_ = *std::move(request);
  }

  // The server still answers a good request correctly-shaped.
  void ExpectStillServes() {
    absl::StatusOr<v1::AttendResponse> response = client_->Attend(good_);
    ASSERT_TRUE(response.ok()) << response.status();
    EXPECT_EQ(response->output().data().size(), qkv_.q.bytes.size());
  }

  std::unique_ptr<AttentionClient> client_;
  QkvTensors qkv_;
  v1::AttendRequest good_;
};

struct BadCase {
  std::string name;
  std::function<void(v1::AttendRequest&)> mutate;
  absl::StatusCode code;
  std::vector<std::string> message_fragments;  // each must appear in the server's message
};

void SetShape(v1::Tensor* tensor, std::vector<int64_t> dims) {
  tensor->clear_shape();
  for (int64_t dim : dims) tensor->add_shape(dim);
}

TEST_F(BadInputE2eTest, UnaryRequestsAreRejectedWithTheFieldNamed) {
  using absl::StatusCode;
  const std::vector<BadCase> cases = {
      {"q byte count",
       [](v1::AttendRequest& r) { r.mutable_q()->mutable_data()->resize(r.q().data().size() - 2); },
       StatusCode::kInvalidArgument,
       {"q.data", "bytes"}},
      {"v byte count",
       [](v1::AttendRequest& r) { r.mutable_v()->mutable_data()->append("xy"); },
       StatusCode::kInvalidArgument,
       {"v.data", "bytes"}},
      {"k seq_len differs from q",
       [](v1::AttendRequest& r) {
         SetShape(r.mutable_k(), {32, 2, 64});
         SetShape(r.mutable_v(), {32, 2, 64});
         r.mutable_k()->mutable_data()->resize(32 * 2 * 64 * 2);
         r.mutable_v()->mutable_data()->resize(32 * 2 * 64 * 2);
       },
       StatusCode::kInvalidArgument,
       {"k.shape[0]", "seq_len"}},
      {"v shape differs from k",
       [](v1::AttendRequest& r) {
         SetShape(r.mutable_v(), {64, 1, 64});
         r.mutable_v()->mutable_data()->resize(64 * 1 * 64 * 2);
       },
       StatusCode::kInvalidArgument,
       {"v.shape", "k.shape"}},
      {"k head_dim differs from q",
       [](v1::AttendRequest& r) {
         SetShape(r.mutable_k(), {64, 2, 32});
         r.mutable_k()->mutable_data()->resize(64 * 2 * 32 * 2);
       },
       StatusCode::kInvalidArgument,
       {"k.shape[2]", "head_dim"}},
      {"heads not divisible",
       [](v1::AttendRequest& r) {
         SetShape(r.mutable_k(), {64, 3, 64});
         SetShape(r.mutable_v(), {64, 3, 64});
         r.mutable_k()->mutable_data()->resize(64 * 3 * 64 * 2);
         r.mutable_v()->mutable_data()->resize(64 * 3 * 64 * 2);
       },
       StatusCode::kInvalidArgument,
       {"num_heads", "multiple"}},
      {"unspecified dtype",
       [](v1::AttendRequest& r) { r.mutable_q()->set_dtype(v1::DATA_TYPE_UNSPECIFIED); },
       StatusCode::kInvalidArgument,
       {"q.dtype"}},
      {"unknown dtype value",
       [](v1::AttendRequest& r) { r.mutable_k()->set_dtype(static_cast<v1::DataType>(42)); },
       StatusCode::kInvalidArgument,
       {"k.dtype", "42"}},
      {"dtypes differ",
       [](v1::AttendRequest& r) { r.mutable_v()->set_dtype(v1::DATA_TYPE_FP16); },
       StatusCode::kInvalidArgument,
       {"v.dtype"}},
      {"unknown layout",
       [](v1::AttendRequest& r) { r.mutable_q()->set_layout(static_cast<v1::TensorLayout>(7)); },
       StatusCode::kInvalidArgument,
       {"q.layout"}},
      {"unspecified layout",
       [](v1::AttendRequest& r) { r.mutable_v()->set_layout(v1::TENSOR_LAYOUT_UNSPECIFIED); },
       StatusCode::kInvalidArgument,
       {"v.layout"}},
      {"two-dim shape",
       [](v1::AttendRequest& r) {
         SetShape(r.mutable_q(), {64, 256});
       },
       StatusCode::kInvalidArgument,
       {"q.shape", "3 dims"}},
      {"zero heads",
       [](v1::AttendRequest& r) {
         SetShape(r.mutable_q(), {64, 0, 64});
       },
       StatusCode::kInvalidArgument,
       {"q.shape[1]", "num_heads", "positive"}},
      {"negative seq_len",
       [](v1::AttendRequest& r) {
         SetShape(r.mutable_k(), {-64, 2, 64});
       },
       StatusCode::kInvalidArgument,
       {"k.shape[0]", "positive"}},
      {"zero head_dim",
       [](v1::AttendRequest& r) {
         SetShape(r.mutable_v(), {64, 2, 0});
       },
       StatusCode::kInvalidArgument,
       {"v.shape[2]", "head_dim"}},
      {"head_dim over 256",
       [](v1::AttendRequest& r) {
         SetShape(r.mutable_q(), {64, 4, 512});
       },
       StatusCode::kInvalidArgument,
       {"q.shape[2]", "head_dim"}},
      {"dims whose product overflows int64",
       [](v1::AttendRequest& r) {
         SetShape(r.mutable_q(), {int64_t{1} << 40, int64_t{1} << 22, 128});
       },
       StatusCode::kInvalidArgument,
       {"q.shape", "int64"}},
      {"seq_len over --max_seq_len",
       [](v1::AttendRequest& r) {
         const int64_t n = kMaxSeqLen + 1;
         SetShape(r.mutable_q(), {n, 1, 8});
         SetShape(r.mutable_k(), {n, 1, 8});
         SetShape(r.mutable_v(), {n, 1, 8});
         for (v1::Tensor* t : {r.mutable_q(), r.mutable_k(), r.mutable_v()}) {
           t->mutable_data()->assign(static_cast<size_t>(n * 8 * 2), '\0');
         }
       },
       StatusCode::kResourceExhausted,
       {"seq_len", "--max_seq_len"}},
      {"heads over --max_heads",
       [](v1::AttendRequest& r) {
         SetShape(r.mutable_q(), {8, kMaxHeads * 2, 8});
         SetShape(r.mutable_k(), {8, kMaxHeads * 2, 8});
         SetShape(r.mutable_v(), {8, kMaxHeads * 2, 8});
         for (v1::Tensor* t : {r.mutable_q(), r.mutable_k(), r.mutable_v()}) {
           t->mutable_data()->assign(static_cast<size_t>(8 * kMaxHeads * 2 * 8 * 2), '\0');
         }
       },
       StatusCode::kResourceExhausted,
       {"num_heads", "--max_heads"}},
      {"bytes over --max_request_bytes",
       [](v1::AttendRequest& r) {
         // fp32 [1024, 4, 128] q = 2 MiB alone, over the 1 MiB limit.
         for (v1::Tensor* t : {r.mutable_q(), r.mutable_k(), r.mutable_v()}) {
           SetShape(t, {1024, 4, 128});
           t->set_dtype(v1::DATA_TYPE_FP32);
           t->mutable_data()->assign(size_t{1024} * 4 * 128 * 4, '\0');
         }
       },
       StatusCode::kResourceExhausted,
       {"--max_request_bytes"}},
      {"theta NaN",
       [](v1::AttendRequest& r) {
         r.mutable_config()->set_theta(std::numeric_limits<double>::quiet_NaN());
       },
       StatusCode::kInvalidArgument,
       {"config.theta", "NaN"}},
      {"step zero",
       [](v1::AttendRequest& r) { r.mutable_config()->set_step(0); },
       StatusCode::kInvalidArgument,
       {"config.step"}},
      {"step too large",
       [](v1::AttendRequest& r) { r.mutable_config()->set_step(kMaxStep + 1); },
       StatusCode::kInvalidArgument,
       {"config.step"}},
      {"block_size negative",
       [](v1::AttendRequest& r) { r.mutable_config()->set_block_size(-5); },
       StatusCode::kInvalidArgument,
       {"config.block_size"}},
      {"block_size too large",
       [](v1::AttendRequest& r) { r.mutable_config()->set_block_size(kMaxBlockSize + 1); },
       StatusCode::kInvalidArgument,
       {"config.block_size"}},
      {"local_groups zero",
       [](v1::AttendRequest& r) { r.mutable_config()->set_local_groups(0); },
       StatusCode::kInvalidArgument,
       {"config.local_groups"}},
      {"init_groups negative",
       [](v1::AttendRequest& r) { r.mutable_config()->set_init_groups(-1); },
       StatusCode::kInvalidArgument,
       {"config.init_groups"}},
      {"softmax_scale infinite",
       [](v1::AttendRequest& r) {
         r.mutable_config()->set_softmax_scale(std::numeric_limits<double>::infinity());
       },
       StatusCode::kInvalidArgument,
       {"config.softmax_scale"}},
      {"unknown mode",
       [](v1::AttendRequest& r) {
         r.mutable_config()->set_mode(static_cast<v1::AttentionMode>(9));
       },
       StatusCode::kInvalidArgument,
       {"config.mode"}},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.name);
    v1::AttendRequest request = good_;
    c.mutate(request);
    absl::StatusOr<v1::AttendResponse> response = client_->Attend(request);
    ASSERT_FALSE(response.ok()) << "accepted";
    EXPECT_EQ(response.status().code(), c.code) << response.status();
    for (const std::string& fragment : c.message_fragments) {
      EXPECT_TRUE(absl::StrContains(response.status().message(), fragment))
          << "message lacks '" << fragment << "': " << response.status();
    }
  }
  ExpectStillServes();
}

// Hand-made stream messages, sent with the raw stub so nothing is fixed up on the way.
absl::Status RunRawStream(AttentionClient& client,
                          const std::vector<v1::AttendStreamRequest>& messages) {
  grpc::ClientContext context;
  client.PrepareContext(CallOptions{}, &context);
  auto stream = client.stub().AttendStream(&context);
  for (const v1::AttendStreamRequest& message : messages) {
    if (!stream->Write(message)) break;
  }
  stream->WritesDone();
  v1::AttendStreamResponse response;
  while (stream->Read(&response)) {
  }
  return FromGrpcStatus(stream->Finish(), client.target(), "AttendStream");
}

v1::AttendStreamRequest HeaderOf(const v1::AttendRequest& request) {
  v1::AttendStreamRequest message;
  v1::StreamHeader* header = message.mutable_header();
  for (auto [spec, tensor] :
       {std::pair{header->mutable_q(), &request.q()}, std::pair{header->mutable_k(), &request.k()},
        std::pair{header->mutable_v(), &request.v()}}) {
    spec->set_dtype(tensor->dtype());
    spec->set_layout(tensor->layout());
    *spec->mutable_shape() = tensor->shape();
  }
  *header->mutable_config() = request.config();
  return message;
}

v1::AttendStreamRequest ChunkOf(v1::TensorName name, const std::string& data, int64_t offset,
                                int64_t size) {
  v1::AttendStreamRequest message;
  message.mutable_chunk()->set_tensor(name);
  message.mutable_chunk()->set_offset(offset);
  message.mutable_chunk()->set_data(
      data.substr(static_cast<size_t>(offset), static_cast<size_t>(size)));
  return message;
}

// All of one tensor in chunks of `chunk` bytes.
void AppendChunks(v1::TensorName name, const std::string& data, int64_t chunk,
                  std::vector<v1::AttendStreamRequest>* messages) {
  const int64_t total = static_cast<int64_t>(data.size());
  for (int64_t offset = 0; offset < total; offset += chunk) {
    messages->push_back(ChunkOf(name, data, offset, std::min(chunk, total - offset)));
  }
}

TEST_F(BadInputE2eTest, MalformedStreamsAreRejected) {
  const std::string& q = good_.q().data();
  const std::string& k = good_.k().data();
  const std::string& v = good_.v().data();
  struct StreamCase {
    std::string name;
    std::vector<v1::AttendStreamRequest> messages;
    absl::StatusCode code;
    std::vector<std::string> fragments;
  };
  std::vector<StreamCase> cases;
  {
    StreamCase c{
        "chunk before header", {}, absl::StatusCode::kInvalidArgument, {"must be a header"}};
    c.messages.push_back(ChunkOf(v1::TENSOR_NAME_Q, q, 0, 1024));
    cases.push_back(c);
  }
  {
    StreamCase c{"empty stream", {}, absl::StatusCode::kInvalidArgument, {"before a header"}};
    cases.push_back(c);
  }
  {
    StreamCase c{"chunk out of order",
                 {HeaderOf(good_)},
                 absl::StatusCode::kInvalidArgument,
                 {"chunk.offset of q"}};
    c.messages.push_back(ChunkOf(v1::TENSOR_NAME_Q, q, 0, 1024));
    c.messages.push_back(ChunkOf(v1::TENSOR_NAME_Q, q, 2048, 1024));
    cases.push_back(c);
  }
  {
    StreamCase c{"chunk repeated",
                 {HeaderOf(good_)},
                 absl::StatusCode::kInvalidArgument,
                 {"chunk.offset of k"}};
    c.messages.push_back(ChunkOf(v1::TENSOR_NAME_K, k, 0, 1024));
    c.messages.push_back(ChunkOf(v1::TENSOR_NAME_K, k, 0, 1024));
    cases.push_back(c);
  }
  {
    StreamCase c{"stream half-closed before all bytes",
                 {HeaderOf(good_)},
                 absl::StatusCode::kInvalidArgument,
                 {"v is missing"}};
    AppendChunks(v1::TENSOR_NAME_Q, q, 4096, &c.messages);
    AppendChunks(v1::TENSOR_NAME_K, k, 4096, &c.messages);
    c.messages.push_back(ChunkOf(v1::TENSOR_NAME_V, v, 0, 1000));  // v incomplete
    cases.push_back(c);
  }
  {
    StreamCase c{"bytes beyond the tensor",
                 {HeaderOf(good_)},
                 absl::StatusCode::kInvalidArgument,
                 {"k at chunk.offset", "beyond"}};
    AppendChunks(v1::TENSOR_NAME_K, k, 4096, &c.messages);
    v1::AttendStreamRequest extra = ChunkOf(v1::TENSOR_NAME_K, k, 0, 16);
    extra.mutable_chunk()->set_offset(static_cast<int64_t>(k.size()));
    c.messages.push_back(extra);
    cases.push_back(c);
  }
  {
    StreamCase c{"second header",
                 {HeaderOf(good_), HeaderOf(good_)},
                 absl::StatusCode::kInvalidArgument,
                 {"second header"}};
    cases.push_back(c);
  }
  {
    StreamCase c{"chunk of the output tensor",
                 {HeaderOf(good_)},
                 absl::StatusCode::kInvalidArgument,
                 {"chunk.tensor"}};
    c.messages.push_back(ChunkOf(v1::TENSOR_NAME_OUTPUT, q, 0, 64));
    cases.push_back(c);
  }
  {
    v1::AttendRequest big = good_;
    for (v1::Tensor* t : {big.mutable_q(), big.mutable_k(), big.mutable_v()}) {
      t->set_dtype(v1::DATA_TYPE_FP32);
      SetShape(t, {1024, 4, 128});  // 2 MiB each, over --max_request_bytes
    }
    StreamCase c{"header over --max_request_bytes",
                 {HeaderOf(big)},
                 absl::StatusCode::kResourceExhausted,
                 {"--max_request_bytes"}};
    cases.push_back(c);
  }
  {
    v1::AttendRequest bad_heads = good_;
    SetShape(bad_heads.mutable_k(), {64, 3, 64});
    SetShape(bad_heads.mutable_v(), {64, 3, 64});
    StreamCase c{"header with heads not divisible",
                 {HeaderOf(bad_heads)},
                 absl::StatusCode::kInvalidArgument,
                 {"num_heads"}};
    cases.push_back(c);
  }
  for (const StreamCase& c : cases) {
    SCOPED_TRACE(c.name);
    absl::Status status = RunRawStream(*client_, c.messages);
    ASSERT_FALSE(status.ok()) << "accepted";
    EXPECT_EQ(status.code(), c.code) << status;
    for (const std::string& fragment : c.fragments) {
      EXPECT_TRUE(absl::StrContains(status.message(), fragment))
          << "message lacks '" << fragment << "': " << status;
    }
  }

  // A correct hand-made stream in shuffled tensor order still works, and so does unary.
  std::vector<v1::AttendStreamRequest> good_stream = {HeaderOf(good_)};
  AppendChunks(v1::TENSOR_NAME_V, v, 3000, &good_stream);
  AppendChunks(v1::TENSOR_NAME_Q, q, 5000, &good_stream);
  AppendChunks(v1::TENSOR_NAME_K, k, 7000, &good_stream);
  absl::Status ok = RunRawStream(*client_, good_stream);
  EXPECT_TRUE(ok.ok()) << ok;
  ExpectStillServes();
}

// --- Findings of the outside probe (issue 10) ---

// Bytes that no message parses from: field 1, length-delimited, 5 bytes announced, 2 present.
const char kTruncatedMessage[] =
    "\x0a\x05"
    "ab";

grpc::ByteBuffer BytesOf(absl::string_view bytes) {
  grpc::Slice slice(bytes.data(), bytes.size());
  return grpc::ByteBuffer(&slice, 1);
}

grpc::Status RawUnary(const std::shared_ptr<grpc::Channel>& channel, const char* method,
                      absl::string_view request_bytes) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
  const grpc::ByteBuffer request = BytesOf(request_bytes);
  grpc::ByteBuffer response;
  return grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(
      channel.get(), grpc::internal::RpcMethod(method, grpc::internal::RpcMethod::NORMAL_RPC),
      &context, request, &response);
}

// Writes `messages` as they are (bytes) on a call of a streaming method, reads until the end.
grpc::Status RawStream(const std::shared_ptr<grpc::Channel>& channel, const char* method,
                       grpc::internal::RpcMethod::RpcType type,
                       const std::vector<std::string>& messages) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel.get(), grpc::internal::RpcMethod(method, type), &context));
  for (const std::string& message : messages) {
    if (!stream->Write(BytesOf(message))) break;
  }
  stream->WritesDone();
  grpc::ByteBuffer ignored;
  while (stream->Read(&ignored)) {
  }
  return stream->Finish();
}

void ExpectInvalidArgumentNaming(const grpc::Status& status, absl::string_view fragment) {
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
      << status.error_code() << " " << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), fragment))
      << "message lacks '" << fragment << "': " << status.error_message();
}

// Names of the files in a file_descriptor_response, or the error the server sent.
template <typename Response>
absl::StatusOr<std::vector<std::string>> DescribedFiles(const Response& response) {
  if (response.has_error_response()) {
    return absl::NotFoundError(response.error_response().error_message());
  }
  std::vector<std::string> files;
  for (const std::string& bytes : response.file_descriptor_response().file_descriptor_proto()) {
    google::protobuf::FileDescriptorProto file;
    if (!file.ParseFromString(bytes)) return absl::InternalError("a descriptor does not parse");
    files.push_back(file.name());
  }
  return files;
}

// One file_containing_symbol request on ServerReflectionInfo of reflection v1 or v1alpha.
template <typename Reflection>
absl::StatusOr<std::vector<std::string>> FileContainingSymbol(
    const std::shared_ptr<grpc::Channel>& channel, const std::string& symbol) {
  auto stub = Reflection::ServerReflection::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
  auto stream = stub->ServerReflectionInfo(&context);
  typename Reflection::ServerReflectionRequest request;
  request.set_file_containing_symbol(symbol);
  typename Reflection::ServerReflectionResponse response;
  const bool exchanged = stream->Write(request) && stream->Read(&response);
  stream->WritesDone();
  const grpc::Status status = stream->Finish();
  if (!status.ok()) return absl::UnavailableError(status.error_message());
  if (!exchanged) return absl::InternalError("no response");
  return DescribedFiles(response);
}

struct ReflectionV1Alpha {
  using ServerReflection = grpc::reflection::v1alpha::ServerReflection;
  using ServerReflectionRequest = grpc::reflection::v1alpha::ServerReflectionRequest;
  using ServerReflectionResponse = grpc::reflection::v1alpha::ServerReflectionResponse;
};
struct ReflectionV1 {
  using ServerReflection = grpc::reflection::v1::ServerReflection;
  using ServerReflectionRequest = grpc::reflection::v1::ServerReflectionRequest;
  using ServerReflectionResponse = grpc::reflection::v1::ServerReflectionResponse;
};

// grpcurl's `grpc.health.v1.Health/Check` resolves the service through reflection first.
TEST_F(BadInputE2eTest, ReflectionDescribesTheHealthServiceInBothVersions) {
  for (const std::string symbol : {"grpc.health.v1.Health", "anchorserve.v1.AttentionService",
                                   "anchorserve.v1.PrefillService"}) {
    SCOPED_TRACE(symbol);
    absl::StatusOr<std::vector<std::string>> alpha =
        FileContainingSymbol<ReflectionV1Alpha>(client_->channel(), symbol);
    ASSERT_TRUE(alpha.ok()) << alpha.status();
    ASSERT_FALSE(alpha->empty());
    absl::StatusOr<std::vector<std::string>> v1 =
        FileContainingSymbol<ReflectionV1>(client_->channel(), symbol);
    ASSERT_TRUE(v1.ok()) << v1.status();
    ASSERT_FALSE(v1->empty());
    EXPECT_EQ(alpha->front(), v1->front());
  }
  EXPECT_EQ(
      FileContainingSymbol<ReflectionV1>(client_->channel(), "no.such.Service").status().code(),
      absl::StatusCode::kNotFound);
}

TEST_F(BadInputE2eTest, ReflectionV1ListsTheServices) {
  auto stub = grpc::reflection::v1::ServerReflection::NewStub(client_->channel());
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
  auto stream = stub->ServerReflectionInfo(&context);
  grpc::reflection::v1::ServerReflectionRequest request;
  request.set_list_services("");
  grpc::reflection::v1::ServerReflectionResponse response;
  ASSERT_TRUE(stream->Write(request));
  ASSERT_TRUE(stream->Read(&response));
  stream->WritesDone();
  ASSERT_TRUE(stream->Finish().ok());
  std::vector<std::string> names;
  for (const auto& service : response.list_services_response().service()) {
    names.push_back(service.name());
  }
  for (const char* expected :
       {"anchorserve.v1.AttentionService", "anchorserve.v1.PrefillService", "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), expected), names.end()) << expected;
  }
}

// Bytes that do not parse: INVALID_ARGUMENT naming the message, on every method of both services
// (gRPC's typed handlers said UNIMPLEMENTED, or "stream ended before a header arrived").
TEST_F(BadInputE2eTest, MessagesThatDoNotParseAreInvalidArgument) {
  const std::shared_ptr<grpc::Channel> channel = client_->channel();
  ExpectInvalidArgumentNaming(
      RawUnary(channel, "/anchorserve.v1.AttentionService/GetServerInfo", kTruncatedMessage),
      "does not parse as a anchorserve.v1.GetServerInfoRequest");
  ExpectInvalidArgumentNaming(
      RawUnary(channel, "/anchorserve.v1.AttentionService/Attend", kTruncatedMessage),
      "does not parse");
  ExpectInvalidArgumentNaming(
      RawStream(channel, "/anchorserve.v1.AttentionService/AttendStream",
                grpc::internal::RpcMethod::BIDI_STREAMING, {kTruncatedMessage}),
      "message 1 of the stream does not parse as a anchorserve.v1.AttendStreamRequest");
  // A good header first, the bad message second: the count names which one.
  const v1::AttendStreamRequest header = HeaderOf(good_);
  ExpectInvalidArgumentNaming(RawStream(channel, "/anchorserve.v1.AttentionService/AttendStream",
                                        grpc::internal::RpcMethod::BIDI_STREAMING,
                                        {header.SerializeAsString(), kTruncatedMessage}),
                              "message 2 of the stream does not parse");
  ExpectInvalidArgumentNaming(
      RawUnary(channel, "/anchorserve.v1.PrefillService/GetModelInfo", kTruncatedMessage),
      "does not parse as a anchorserve.v1.GetModelInfoRequest");
  ExpectInvalidArgumentNaming(
      RawStream(channel, "/anchorserve.v1.PrefillService/Prefill",
                grpc::internal::RpcMethod::SERVER_STREAMING, {kTruncatedMessage}),
      "does not parse as a anchorserve.v1.PrefillRequest");
  ExpectStillServes();
}

TEST_F(BadInputE2eTest, NonFiniteInputsAreRejectedNamingTheTensor) {
  struct Case {
    const char* tensor;
    uint16_t bits;  // bf16
  };
  for (const Case& c : {Case{"q", 0x7fc0}, Case{"k", 0x7f80}, Case{"v", 0xff80}}) {
    SCOPED_TRACE(c.tensor);
    v1::AttendRequest request = good_;
    v1::Tensor* tensor = std::string(c.tensor) == "q"   ? request.mutable_q()
                         : std::string(c.tensor) == "k" ? request.mutable_k()
                                                        : request.mutable_v();
    std::memcpy(tensor->mutable_data()->data() + 2 * 7, &c.bits, 2);  // element 7
    absl::StatusOr<v1::AttendResponse> unary = client_->Attend(request);
    ASSERT_FALSE(unary.ok());
    EXPECT_EQ(unary.status().code(), absl::StatusCode::kInvalidArgument) << unary.status();
    EXPECT_TRUE(absl::StrContains(unary.status().message(),
                                  absl::StrCat(c.tensor, " holds a NaN or infinity")))
        << unary.status();
    EXPECT_TRUE(absl::StrContains(unary.status().message(), "element 7")) << unary.status();
    std::vector<v1::AttendStreamRequest> stream = {HeaderOf(request)};
    AppendChunks(v1::TENSOR_NAME_Q, request.q().data(), 4096, &stream);
    AppendChunks(v1::TENSOR_NAME_K, request.k().data(), 4096, &stream);
    AppendChunks(v1::TENSOR_NAME_V, request.v().data(), 4096, &stream);
    absl::Status streamed = RunRawStream(*client_, stream);
    EXPECT_EQ(streamed.code(), absl::StatusCode::kInvalidArgument) << streamed;
    EXPECT_TRUE(absl::StrContains(streamed.message(), absl::StrCat(c.tensor, " holds a NaN")))
        << streamed;
  }
  ExpectStillServes();
}

TEST_F(BadInputE2eTest, LongRequestIdsAreRejected) {
  v1::AttendRequest request = good_;
  request.set_request_id(std::string(kMaxRequestIdBytes, 'r'));
  absl::StatusOr<v1::AttendResponse> at_limit = client_->Attend(request);
  ASSERT_TRUE(at_limit.ok()) << at_limit.status();
  EXPECT_EQ(at_limit->request_id(), request.request_id());

  request.set_request_id(std::string(1 << 20, 'r'));  // what the probe sent
  absl::StatusOr<v1::AttendResponse> unary = client_->Attend(request);
  ASSERT_FALSE(unary.ok());
  EXPECT_EQ(unary.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(unary.status().message(), "request_id")) << unary.status();
  v1::AttendStreamRequest header = HeaderOf(request);
  header.mutable_header()->set_request_id(request.request_id());
  absl::Status streamed = RunRawStream(*client_, {header});
  EXPECT_EQ(streamed.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(streamed.message(), "header.request_id")) << streamed;
  ExpectStillServes();
}

// What GetServerInfo lists is what the backend runs: every listed head_dim is served, and an
// unlisted one is refused (the CPU backend lists 1..kMaxHeadDim).
TEST_F(BadInputE2eTest, SupportedHeadDimsAgreeWithTheBackend) {
  absl::StatusOr<v1::GetServerInfoResponse> info = client_->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  std::vector<int> expected(kMaxHeadDim);
  for (int d = 1; d <= kMaxHeadDim; ++d) expected[d - 1] = d;
  EXPECT_EQ(
      std::vector<int>(info->supported_head_dims().begin(), info->supported_head_dims().end()),
      expected);
  for (int head_dim : {1, 72, 100, kMaxHeadDim}) {
    SCOPED_TRACE(head_dim);
    absl::StatusOr<QkvTensors> qkv =
        MakeQkv(InputKind::kRandom, 16, 2, 1, head_dim, DType::kBf16, Layout::kTokenMajor, 5);
    ASSERT_TRUE(qkv.ok()) << qkv.status();
    absl::StatusOr<v1::AttendRequest> request = BuildAttendRequest(InputsFor(*qkv));
    ASSERT_TRUE(request.ok()) << request.status();
    absl::StatusOr<v1::AttendResponse> response = client_->Attend(*request);
    EXPECT_TRUE(response.ok()) << response.status();
  }
  absl::StatusOr<QkvTensors> too_wide =
      MakeQkv(InputKind::kRandom, 16, 2, 1, kMaxHeadDim + 1, DType::kBf16, Layout::kTokenMajor, 5);
  if (too_wide.ok()) {
    absl::StatusOr<v1::AttendRequest> request = BuildAttendRequest(InputsFor(*too_wide));
    if (request.ok()) {
      EXPECT_EQ(client_->Attend(*request).status().code(), absl::StatusCode::kInvalidArgument);
    }
  }
}

}  // namespace
}  // namespace anchorserve::e2e
