#include "client/attention_client.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "client/channel_target.h"
#include "client/client_credentials.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/channel_arguments.h"
#include "grpcpp/support/slice.h"
#include "kernels/status_macros.h"
#include "proto/anchorserve/v1/tensor_wire.h"

namespace anchorserve {

void CallCanceller::Cancel() {
  absl::MutexLock lock(&mu_);
  cancelled_ = true;
  if (context_ != nullptr) context_->TryCancel();
}

bool CallCanceller::cancelled() const {
  absl::MutexLock lock(&mu_);
  return cancelled_;
}

ScopedCallRegistration::ScopedCallRegistration(CallCanceller* canceller,
                                               grpc::ClientContext* context)
    : canceller_(canceller) {
  if (canceller_ == nullptr) return;
  absl::MutexLock lock(&canceller_->mu_);
  canceller_->context_ = context;
  if (canceller_->cancelled_) context->TryCancel();
}

ScopedCallRegistration::~ScopedCallRegistration() {
  if (canceller_ == nullptr) return;
  absl::MutexLock lock(&canceller_->mu_);
  canceller_->context_ = nullptr;
}

namespace {

// Shortens gRPC's connection errors to what a person needs to know.
std::string DescribeUnavailable(absl::string_view message) {
  std::string lower = absl::AsciiStrToLower(message);
  if (absl::StrContains(lower, "connection refused")) return "connection refused";
  if (absl::StrContains(lower, "connection reset")) return "connection reset";
  if (absl::StrContains(lower, "dns resolution failed") ||
      absl::StrContains(lower, "name or service not known")) {
    return absl::StrCat("its address could not be resolved (", message, ")");
  }
  return std::string(message);
}

// The output must have q's dtype, layout and shape.
absl::Status CheckOutputSpec(const TensorView& q, v1::DataType dtype, v1::TensorLayout layout,
                             absl::Span<const int64_t> shape) {
  const bool same_shape =
      shape.size() == 3 && std::equal(shape.begin(), shape.end(), q.shape.begin());
  if (dtype != DTypeToProto(q.dtype) || layout != LayoutToProto(q.layout) || !same_shape) {
    return absl::InternalError(absl::StrCat(
        "server returned an output of dtype ", v1::DataType_Name(dtype), ", layout ",
        v1::TensorLayout_Name(layout), ", shape [", absl::StrJoin(shape, ", "), "]; expected q's ",
        v1::DataType_Name(DTypeToProto(q.dtype)), ", ",
        v1::TensorLayout_Name(LayoutToProto(q.layout)), ", [", absl::StrJoin(q.shape, ", "), "]"));
  }
  return absl::OkStatus();
}

constexpr char kAttendMethod[] = "/anchorserve.v1.AttentionService/Attend";
// Field numbers of the tensors in AttendRequest and AttendResponse.
constexpr int kRequestQField = v1::AttendRequest::kQFieldNumber;
constexpr int kRequestKField = v1::AttendRequest::kKFieldNumber;
constexpr int kRequestVField = v1::AttendRequest::kVFieldNumber;
constexpr int kResponseOutputField = v1::AttendResponse::kOutputFieldNumber;
// AttendStream over raw bytes: each chunk's data goes out from the caller's tensors and comes in
// copied once from gRPC's slices (tensor_wire.h).
constexpr char kAttendStreamMethod[] = "/anchorserve.v1.AttentionService/AttendStream";
constexpr int kStreamRequestChunkField = v1::AttendStreamRequest::kChunkFieldNumber;
constexpr int kStreamResponseChunkField = v1::AttendStreamResponse::kChunkFieldNumber;
constexpr int kChunkDataField = v1::TensorChunk::kDataFieldNumber;

// gRPC slices over the caller's tensor memory, and a count of the ones gRPC still holds. The
// destructor waits until gRPC has let go of every slice: the caller may free its tensors as soon
// as the call returns. (gRPC releases them when the bytes are written or the stream is closed.)
class BorrowedSlices {
 public:
  BorrowedSlices() = default;
  BorrowedSlices(const BorrowedSlices&) = delete;
  BorrowedSlices& operator=(const BorrowedSlices&) = delete;
  ~BorrowedSlices() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](int* live) { return *live == 0; }, &live_));
  }

  grpc::Slice Borrow(absl::Span<const uint8_t> bytes) {
    {
      absl::MutexLock lock(&mu_);
      ++live_;
    }
    // gRPC only reads the bytes; the slice API takes a non-const pointer.
    return grpc::Slice(const_cast<uint8_t*>(bytes.data()), bytes.size(), &BorrowedSlices::Release,
                       this);
  }

 private:
  static void Release(void* self) {
    auto* slices = static_cast<BorrowedSlices*>(self);
    absl::MutexLock lock(&slices->mu_);
    --slices->live_;
  }

  absl::Mutex mu_;
  int live_ ABSL_GUARDED_BY(mu_) = 0;
};

// Outputs at least this large are zero-filled on a helper thread while the call runs.
constexpr int64_t kBackgroundFillMinBytes = int64_t{8} << 20;

// A zero-filled buffer, filled on a helper thread while the caller does other work (the upload,
// the server's compute, and for a unary call the download as well). Writing a fresh buffer's pages
// for the first time is what makes the kernel map them; done inside the receive loop it stalls the
// download. A call that ends without taking the buffer stops the fill at the next step.
class BackgroundZeroedBuffer {
 public:
  explicit BackgroundZeroedBuffer(size_t bytes)
      : thread_([this, bytes] {
          constexpr size_t kStep = size_t{8} << 20;
          buffer_.reserve(bytes);
          while (buffer_.size() < bytes && !stop_.load(std::memory_order_relaxed)) {
            buffer_.resize(std::min(bytes, buffer_.size() + kStep));
          }
        }) {}
  ~BackgroundZeroedBuffer() {
    stop_.store(true, std::memory_order_relaxed);
    if (thread_.joinable()) thread_.join();
  }
  BackgroundZeroedBuffer(const BackgroundZeroedBuffer&) = delete;
  BackgroundZeroedBuffer& operator=(const BackgroundZeroedBuffer&) = delete;

  // Waits for the whole fill; call once.
  std::vector<uint8_t> Take() {
    thread_.join();
    return std::move(buffer_);
  }

 private:
  std::vector<uint8_t> buffer_;
  std::atomic<bool> stop_{false};
  std::thread thread_;  // last: starts once buffer_ and stop_ exist
};

// The output of a unary response: its spec from `tensor` (the message without data), its bytes
// from where gRPC received them, copied once into `buffer` when it has their size (pages already
// written), else into a new vector.
absl::StatusOr<HostTensor> HostTensorFromSplit(const v1::Tensor& tensor, const SegmentedBytes* data,
                                               std::vector<uint8_t> buffer) {
  ANCHOR_ASSIGN_OR_RETURN(
      const TensorGeometry geometry,
      TensorGeometryFromProto("output", tensor.dtype(), tensor.layout(), tensor.shape()));
  const int64_t size = data == nullptr ? 0 : static_cast<int64_t>(data->size);
  ANCHOR_RETURN_IF_ERROR(CheckByteCount("output.data", geometry, size));
  HostTensor host;
  host.dtype = geometry.dtype;
  host.layout = geometry.layout;
  std::copy(geometry.dims.begin(), geometry.dims.end(), host.shape.begin());
  if (data == nullptr) return host;
  if (buffer.size() == static_cast<size_t>(size)) {
    host.bytes = std::move(buffer);
    uint8_t* to = host.bytes.data();
    for (absl::string_view piece : data->pieces) {
      std::memcpy(to, piece.data(), piece.size());
      to += piece.size();
    }
    return host;
  }
  // reserve + insert: no zero-fill of a buffer about to be overwritten.
  host.bytes.reserve(static_cast<size_t>(size));
  for (absl::string_view piece : data->pieces) {
    host.bytes.insert(host.bytes.end(), piece.begin(), piece.end());
  }
  return host;
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status, absl::string_view target,
                            absl::string_view rpc) {
  if (status.ok()) return absl::OkStatus();
  const auto code = static_cast<absl::StatusCode>(status.error_code());
  const std::string& message = status.error_message();
  std::string text;
  switch (status.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
      text = absl::StrCat("server at ", target, " is unavailable: ", DescribeUnavailable(message));
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      text =
          absl::StrCat(rpc, " to ", target, " did not finish before its deadline (", message, ")");
      break;
    case grpc::StatusCode::CANCELLED:
      text = absl::StrCat(rpc, " to ", target, " was cancelled (", message, ")");
      break;
    case grpc::StatusCode::INVALID_ARGUMENT:
      text = absl::StrCat("server at ", target, " rejected ", rpc, ": ", message);
      break;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      if (absl::StrContains(message, "larger than max")) {
        text = absl::StrCat(rpc, " to ", target, " hit a gRPC message size limit: ", message,
                            " (use streaming or raise the message size limit)");
      } else {
        text = absl::StrCat("server at ", target, " refused ", rpc,
                            " for lack of resources: ", message);
      }
      break;
    case grpc::StatusCode::FAILED_PRECONDITION:
      text = absl::StrCat("server at ", target, " cannot run ", rpc, ": ", message);
      break;
    case grpc::StatusCode::UNIMPLEMENTED:
      text = absl::StrCat("server at ", target, " does not implement ", rpc,
                          " (is it an anchorserve v1 server?): ", message);
      break;
    default:
      text = absl::StrCat(rpc, " to ", target, " failed with ", absl::StatusCodeToString(code),
                          ": ", message);
      break;
  }
  return absl::Status(code, text);
}

absl::StatusOr<v1::AttendRequest> BuildAttendRequest(const AttendInputs& inputs) {
  absl::StatusOr<AttentionShape> shape = ValidateQkv(inputs.q, inputs.k, inputs.v);
  if (!shape.ok()) return shape.status();
  if (inputs.PayloadBytes() > kMaxGrpcMessageBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("q, k and v hold ", inputs.PayloadBytes(),
                     " bytes, more than one gRPC message can carry (2 GiB); use AttendStreamed"));
  }
  v1::AttendRequest request;
  request.set_request_id(inputs.request_id);
  SetTensor(inputs.q, request.mutable_q());
  SetTensor(inputs.k, request.mutable_k());
  SetTensor(inputs.v, request.mutable_v());
  *request.mutable_config() = inputs.config;
  *request.mutable_options() = inputs.options;
  return request;
}

int64_t EstimateUnaryRequestBytes(const AttendInputs& inputs) {
  constexpr int64_t kEnvelopeBytes = 4096;  // ids, shapes, config, field tags
  return inputs.PayloadBytes() + kEnvelopeBytes;
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> CreateClientChannel(const std::string& target,
                                                                   const ClientOptions& options) {
  if (target.empty()) return absl::InvalidArgumentError("target must not be empty");
  if (options.max_message_bytes <= 0 || options.max_message_bytes > kMaxGrpcMessageBytes) {
    return absl::InvalidArgumentError(absl::StrCat("max_message_bytes must be in [1, ",
                                                   kMaxGrpcMessageBytes, "], got ",
                                                   options.max_message_bytes));
  }
  if (options.stream_chunk_bytes <= 0 || options.stream_chunk_bytes > options.max_message_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stream_chunk_bytes must be in [1, max_message_bytes], got ", options.stream_chunk_bytes));
  }
  if (options.default_deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("default_deadline must be positive");
  }
  absl::StatusOr<std::string> grpc_target = NormalizeTarget(target);
  if (!grpc_target.ok()) return grpc_target.status();
  grpc::ChannelArguments args = ChannelArgumentsForReplicas(options.max_message_bytes);
  if (!options.tls_server_name.empty()) {
    if (options.channel_credentials == nullptr) {
      return absl::InvalidArgumentError("tls_server_name needs TLS channel_credentials");
    }
    args.SetSslTargetNameOverride(options.tls_server_name);
  }
  const std::shared_ptr<grpc::ChannelCredentials> credentials =
      options.channel_credentials != nullptr ? options.channel_credentials
                                             : grpc::InsecureChannelCredentials();
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> interceptors;
  if (!options.bearer_token.empty()) {
    if (absl::Status status = CheckBearerToken(options.bearer_token); !status.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("bearer_token: ", status.message()));
    }
    interceptors.push_back(BearerTokenInterceptor(options.bearer_token));
  }
  std::shared_ptr<grpc::Channel> channel = grpc::experimental::CreateCustomChannelWithInterceptors(
      *grpc_target, credentials, args, std::move(interceptors));
  if (channel == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cannot create a channel to '", target, "'"));
  }
  return channel;
}

void PrepareClientContext(const ClientOptions& options, const CallOptions& call,
                          grpc::ClientContext* context) {
  const absl::Duration timeout = call.timeout.value_or(options.default_deadline);
  if (timeout != absl::InfiniteDuration()) {
    context->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  }
  context->set_wait_for_ready(call.wait_for_ready);
}

absl::StatusOr<std::unique_ptr<AttentionClient>> AttentionClient::Create(std::string target,
                                                                         ClientOptions options) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = CreateClientChannel(target, options);
  if (!channel.ok()) return channel.status();
  return std::unique_ptr<AttentionClient>(
      new AttentionClient(std::move(target), options, *std::move(channel)));
}

AttentionClient::AttentionClient(std::string target, ClientOptions options,
                                 std::shared_ptr<grpc::Channel> channel)
    : target_(std::move(target)),
      options_(options),
      channel_(std::move(channel)),
      stub_(v1::AttentionService::NewStub(channel_)),
      health_stub_(grpc::health::v1::Health::NewStub(channel_)),
      generic_stub_(std::make_unique<grpc::GenericStub>(channel_)) {}

void AttentionClient::PrepareContext(const CallOptions& call, grpc::ClientContext* context) const {
  PrepareClientContext(options_, call, context);
}

absl::StatusOr<v1::GetServerInfoResponse> AttentionClient::GetServerInfo(const CallOptions& call) {
  grpc::ClientContext context;
  PrepareContext(call, &context);
  ScopedCallRegistration registration(call.canceller, &context);
  v1::GetServerInfoResponse response;
  grpc::Status status = stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status, target_, "GetServerInfo");
  return response;
}

absl::StatusOr<HealthStatus> AttentionClient::CheckHealth(absl::string_view service,
                                                          const CallOptions& call) {
  grpc::ClientContext context;
  PrepareContext(call, &context);
  ScopedCallRegistration registration(call.canceller, &context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(std::string(service));
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = health_stub_->Check(&context, request, &response);
  if (status.error_code() == grpc::StatusCode::NOT_FOUND) {
    return absl::NotFoundError(
        absl::StrCat("server at ", target_, " keeps no health status for service '", service, "'"));
  }
  if (!status.ok()) return FromGrpcStatus(status, target_, "Health/Check");
  return response.status();
}

absl::StatusOr<v1::AttendResponse> AttentionClient::Attend(const v1::AttendRequest& request,
                                                           const CallOptions& call) {
  grpc::ClientContext context;
  PrepareContext(call, &context);
  ScopedCallRegistration registration(call.canceller, &context);
  v1::AttendResponse response;
  grpc::Status status = stub_->Attend(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status, target_, "Attend");
  return response;
}

absl::StatusOr<AttendResult> AttentionClient::Attend(const AttendInputs& inputs,
                                                     const CallOptions& call) {
  absl::StatusOr<AttentionShape> shape = ValidateQkv(inputs.q, inputs.k, inputs.v);
  if (!shape.ok()) return shape.status();
  if (inputs.PayloadBytes() > kMaxGrpcMessageBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("q, k and v hold ", inputs.PayloadBytes(),
                     " bytes, more than one gRPC message can carry (2 GiB); use AttendStreamed"));
  }
  // Declared first so it is destroyed last: waits until gRPC has released the caller's bytes.
  BorrowedSlices borrowed;
  const int64_t output_bytes = static_cast<int64_t>(inputs.q.bytes.size());  // like q
  std::optional<BackgroundZeroedBuffer> output_fill;
  if (!inputs.options.metrics_only() && output_bytes >= kBackgroundFillMinBytes) {
    output_fill.emplace(static_cast<size_t>(output_bytes));
  }
  grpc::ByteBuffer response_buffer;
  grpc::Status status;
  {
    // The request: everything but the tensor bytes through protobuf, then each tensor's bytes as
    // one more occurrence of its field, read by gRPC from the caller's buffer.
    v1::AttendRequest head;
    head.set_request_id(inputs.request_id);
    SetTensorSpec(inputs.q.dtype, inputs.q.layout, inputs.q.shape, head.mutable_q());
    SetTensorSpec(inputs.k.dtype, inputs.k.layout, inputs.k.shape, head.mutable_k());
    SetTensorSpec(inputs.v.dtype, inputs.v.layout, inputs.v.shape, head.mutable_v());
    *head.mutable_config() = inputs.config;
    *head.mutable_options() = inputs.options;
    std::vector<grpc::Slice> slices;
    slices.emplace_back(head.SerializeAsString());
    AppendTensorData(kRequestQField, borrowed.Borrow(inputs.q.bytes), &slices);
    AppendTensorData(kRequestKField, borrowed.Borrow(inputs.k.bytes), &slices);
    AppendTensorData(kRequestVField, borrowed.Borrow(inputs.v.bytes), &slices);
    grpc::ByteBuffer request_buffer(slices.data(), slices.size());
    slices.clear();

    grpc::ClientContext context;
    PrepareContext(call, &context);
    ScopedCallRegistration registration(call.canceller, &context);
    absl::Notification done;
    generic_stub_->UnaryCall(&context, kAttendMethod, grpc::StubOptions(), &request_buffer,
                             &response_buffer, [&status, &done](grpc::Status call_status) {
                               status = std::move(call_status);
                               done.Notify();
                             });
    done.WaitForNotification();
  }
  if (!status.ok()) return FromGrpcStatus(status, target_, "Attend");

  absl::StatusOr<SplitMessage> split = SplitTensorData(response_buffer, {kResponseOutputField});
  v1::AttendResponse response;
  if (!split.ok() || !response.ParseFromString(split->rest)) {
    return absl::InternalError(
        absl::StrCat("server returned an AttendResponse that does not parse",
                     split.ok() ? "" : absl::StrCat(": ", split.status().message())));
  }
  response_buffer.Clear();  // the split keeps the output's slices alive
  const auto found = split->data.find(kResponseOutputField);
  const SegmentedBytes* output_data = found == split->data.end() ? nullptr : &found->second;

  AttendResult result;
  result.request_id = response.request_id();
  if (inputs.options.metrics_only()) {
    if (response.has_output() && output_data != nullptr && output_data->size > 0) {
      return absl::InternalError("server returned an output although metrics_only was set");
    }
  } else {
    if (!response.has_output()) return absl::InternalError("server returned no output tensor");
    const v1::Tensor& output = response.output();
    absl::Status spec =
        CheckOutputSpec(inputs.q, output.dtype(), output.layout(),
                        absl::MakeConstSpan(output.shape().data(), output.shape().size()));
    if (!spec.ok()) return spec;
    absl::StatusOr<HostTensor> tensor =
        HostTensorFromSplit(output, output_data,
                            output_fill.has_value() ? output_fill->Take() : std::vector<uint8_t>());
    if (!tensor.ok()) {
      return absl::InternalError(
          absl::StrCat("server returned a malformed output: ", tensor.status().message()));
    }
    result.output = *std::move(tensor);
  }
  result.metrics = std::move(*response.mutable_metrics());
  return result;
}

absl::StatusOr<AttendResult> AttentionClient::AttendStreamed(const AttendInputs& inputs,
                                                             const CallOptions& call) {
  return AttendStreamedInChunks(inputs, call, options_.stream_chunk_bytes);
}

absl::StatusOr<AttendResult> AttentionClient::AttendStreamedInChunks(const AttendInputs& inputs,
                                                                     const CallOptions& call,
                                                                     int64_t chunk_bytes) {
  if (chunk_bytes <= 0) return absl::InvalidArgumentError("stream chunk size must be positive");
  absl::StatusOr<AttentionShape> shape = ValidateQkv(inputs.q, inputs.k, inputs.v);
  if (!shape.ok()) return shape.status();

  // Declared before the call: destroyed after it (an unfinished call is cancelled with its
  // context), it waits until gRPC has let go of the tensors' slices before the caller may free
  // them.
  BorrowedSlices borrowed;
  grpc::ClientContext context;
  PrepareContext(call, &context);
  ScopedCallRegistration registration(call.canceller, &context);
  const absl::Time call_start = absl::Now();
  const bool want_output = !inputs.options.metrics_only();
  const int64_t output_bytes = static_cast<int64_t>(inputs.q.bytes.size());  // like q
  std::optional<BackgroundZeroedBuffer> output_fill;
  if (want_output && output_bytes >= kBackgroundFillMinBytes) {
    output_fill.emplace(static_cast<size_t>(output_bytes));
  }
  // The stub's typed stream would copy every chunk into and out of protobuf strings; the raw
  // stream is what generated stubs build, with ByteBuffer messages.
  const grpc::internal::RpcMethod method(kAttendStreamMethod,
                                         grpc::internal::RpcMethod::BIDI_STREAMING, channel_);
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel_.get(), method, &context));

  // Send: header, then each tensor's chunks in increasing contiguous order. A failed write means
  // the server has ended the call; its status (read below) says why.
  bool writes_ok = true;
  {
    v1::AttendStreamRequest message;
    v1::StreamHeader* header = message.mutable_header();
    header->set_request_id(inputs.request_id);
    SetSpec(inputs.q, header->mutable_q());
    SetSpec(inputs.k, header->mutable_k());
    SetSpec(inputs.v, header->mutable_v());
    *header->mutable_config() = inputs.config;
    *header->mutable_options() = inputs.options;
    grpc::Slice serialized(message.SerializeAsString());
    grpc::ByteBuffer buffer(&serialized, 1);
    writes_ok = stream->Write(buffer);
  }
  const std::array<std::pair<v1::TensorName, const TensorView*>, 3> tensors = {
      {{v1::TENSOR_NAME_Q, &inputs.q},
       {v1::TENSOR_NAME_K, &inputs.k},
       {v1::TENSOR_NAME_V, &inputs.v}}};
  for (const auto& [name, view] : tensors) {
    const int64_t total = static_cast<int64_t>(view->bytes.size());
    for (int64_t offset = 0; writes_ok && offset < total; offset += chunk_bytes) {
      const int64_t size = std::min(chunk_bytes, total - offset);
      v1::AttendStreamRequest message;
      v1::TensorChunk* chunk = message.mutable_chunk();
      chunk->set_tensor(name);
      chunk->set_offset(offset);
      std::vector<grpc::Slice> slices;
      slices.emplace_back(message.SerializeAsString());
      AppendTensorData(kStreamRequestChunkField,
                       borrowed.Borrow(view->bytes.subspan(static_cast<size_t>(offset),
                                                           static_cast<size_t>(size))),
                       &slices, kChunkDataField);
      grpc::ByteBuffer buffer(slices.data(), slices.size());
      writes_ok = stream->Write(buffer);
    }
  }
  if (writes_ok) stream->WritesDone();
  const absl::Time upload_end = absl::Now();

  // Receive: output_spec, output chunks in order, metrics last.
  AttendResult result;
  result.streamed = true;
  result.upload_time = upload_end - call_start;
  absl::Time download_start = absl::InfiniteFuture();
  std::optional<HostTensor> output;  // taken at output_spec when the output is wanted
  bool have_spec = false;
  int64_t received = 0;
  bool have_metrics = false;
  std::string protocol_error;  // first violation of the stream protocol by the server
  v1::AttendStreamResponse response;
  grpc::ByteBuffer response_buffer;
  while (stream->Read(&response_buffer)) {
    if (!protocol_error.empty()) continue;  // drain after cancelling
    // A chunk's data stays where gRPC received it until it is copied into the output.
    absl::StatusOr<SplitMessage> split =
        SplitTensorData(response_buffer, {kStreamResponseChunkField}, kChunkDataField);
    response.Clear();
    if (!split.ok() || !response.ParseFromString(split->rest)) {
      protocol_error = "server sent a message that does not parse as an AttendStreamResponse";
      context.TryCancel();
      continue;
    }
    const auto found = split->data.find(kStreamResponseChunkField);
    const SegmentedBytes chunk_data = found == split->data.end() ? SegmentedBytes{} : found->second;
    if (!response.request_id().empty()) result.request_id = response.request_id();
    if (have_metrics) {
      protocol_error = "server sent a message after the final metrics";
    } else if (response.has_output_spec()) {
      const v1::TensorSpec& spec = response.output_spec();
      absl::Status status =
          CheckOutputSpec(inputs.q, spec.dtype(), spec.layout(),
                          absl::MakeConstSpan(spec.shape().data(), spec.shape().size()));
      if (have_spec) {
        protocol_error = "server sent output_spec twice";
      } else if (!status.ok()) {
        protocol_error = std::string(status.message());
      } else if (want_output) {
        have_spec = true;
        download_start = absl::Now();
        output = HostTensor{inputs.q.dtype, inputs.q.layout, inputs.q.shape,
                            output_fill.has_value()
                                ? output_fill->Take()
                                : std::vector<uint8_t>(static_cast<size_t>(output_bytes))};
      } else {
        have_spec = true;
      }
    } else if (response.has_chunk()) {
      const v1::TensorChunk& chunk = response.chunk();
      const int64_t size = static_cast<int64_t>(chunk_data.size);
      if (!want_output) {
        protocol_error = "server sent output chunks although metrics_only was set";
      } else if (!output.has_value()) {
        protocol_error = "server sent an output chunk before output_spec";
      } else if (chunk.tensor() != v1::TENSOR_NAME_OUTPUT) {
        protocol_error = absl::StrCat("server sent a chunk of tensor ",
                                      v1::TensorName_Name(chunk.tensor()), ", expected OUTPUT");
      } else if (chunk.offset() != received) {
        protocol_error = absl::StrCat("server sent an output chunk at offset ", chunk.offset(),
                                      ", expected ", received);
      } else if (size > output_bytes - received) {
        protocol_error =
            absl::StrCat("server sent ", received + size, " output bytes, more than the ",
                         output_bytes, " its output_spec implies");
      } else {
        uint8_t* to = output->bytes.data() + received;
        for (absl::string_view piece : chunk_data.pieces) {
          std::memcpy(to, piece.data(), piece.size());
          to += piece.size();
        }
        received += size;
        result.download_time = absl::Now() - download_start;
      }
    } else if (response.has_metrics()) {
      if (want_output && !output.has_value()) {
        protocol_error = "server sent metrics without output_spec";
      } else if (want_output && received != output_bytes) {
        protocol_error = absl::StrCat("server sent metrics after ", received, " of ", output_bytes,
                                      " output bytes");
      } else {
        result.metrics = std::move(*response.mutable_metrics());
        have_metrics = true;
      }
    } else {
      protocol_error = "server sent an empty stream message";
    }
    if (!protocol_error.empty()) context.TryCancel();
  }
  grpc::Status status = stream->Finish();
  if (!protocol_error.empty()) {
    return absl::InternalError(
        absl::StrCat("AttendStream to ", target_, " broke the stream protocol: ", protocol_error));
  }
  if (!status.ok()) return FromGrpcStatus(status, target_, "AttendStream");
  if (!writes_ok) {
    return absl::InternalError(
        absl::StrCat("AttendStream to ", target_, " stopped accepting input but ended with OK"));
  }
  if (!have_metrics) {
    return absl::InternalError(
        absl::StrCat("AttendStream to ", target_, " ended without final metrics"));
  }
  if (want_output) result.output = std::move(output);
  return result;
}

absl::StatusOr<AttendResult> AttentionClient::AttendAuto(const AttendInputs& inputs,
                                                         int64_t server_max_message_bytes,
                                                         bool force_stream,
                                                         const CallOptions& call) {
  const int64_t limit = std::min(server_max_message_bytes, options_.max_message_bytes);
  if (!force_stream && EstimateUnaryRequestBytes(inputs) <= limit) return Attend(inputs, call);
  // A chunk message carries a few bytes of tags and offset beside its data.
  constexpr int64_t kChunkEnvelopeBytes = 1024;
  const int64_t chunk = std::min(options_.stream_chunk_bytes, limit - kChunkEnvelopeBytes);
  if (chunk <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("the message limit of ", limit, " bytes leaves no room for stream chunks"));
  }
  return AttendStreamedInChunks(inputs, call, chunk);
}

}  // namespace anchorserve
