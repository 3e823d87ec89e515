#include "client/prefill_client.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "google/protobuf/descriptor.h"
#include "grpcpp/client_context.h"
#include "grpcpp/impl/rpc_method.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/sync_stream.h"
#include "kernels/status_macros.h"
#include "proto/anchorserve/v1/convert.h"

namespace anchorserve {
namespace {

constexpr char kPrefillMethod[] = "/anchorserve.v1.PrefillService/Prefill";

// "TENSOR_NAME_K", or "unknown value 9" for a number the enum does not define.
template <typename Enum>
std::string EnumText(int value) {
  const google::protobuf::EnumValueDescriptor* named =
      google::protobuf::GetEnumDescriptor<Enum>()->FindValueByNumber(value);
  return named != nullptr ? named->name() : absl::StrCat("unknown value ", value);
}

absl::string_view KvName(v1::TensorName tensor) { return tensor == v1::TENSOR_NAME_K ? "K" : "V"; }

const char* KindName(v1::PrefillResponse::KindCase kind) {
  switch (kind) {
    case v1::PrefillResponse::kHeader:
      return "header";
    case v1::PrefillResponse::kKvChunk:
      return "kv_chunk";
    case v1::PrefillResponse::kLogits:
      return "logits";
    case v1::PrefillResponse::kMetrics:
      return "metrics";
    case v1::PrefillResponse::KIND_NOT_SET:
      break;
  }
  return "empty message";
}

std::string RangeText(int64_t begin, int64_t end) {
  return absl::StrCat("[", begin, ", ", end, ")");
}

}  // namespace

v1::DataType RequestedKvDType(const v1::PrefillRequest& request) {
  return request.kv_dtype() == v1::DATA_TYPE_UNSPECIFIED ? v1::DATA_TYPE_BF16 : request.kv_dtype();
}

v1::TensorLayout RequestedKvLayout(const v1::PrefillRequest& request) {
  return request.kv_layout() == v1::TENSOR_LAYOUT_UNSPECIFIED ? v1::TENSOR_LAYOUT_HEAD_MAJOR
                                                              : request.kv_layout();
}

v1::LogitsMode RequestedLogitsMode(const v1::PrefillRequest& request) {
  return request.logits_mode() == v1::LOGITS_MODE_UNSPECIFIED ? v1::LOGITS_MODE_FULL
                                                              : request.logits_mode();
}

// ---- PrefillStreamAssembler ---------------------------------------------------------------------

PrefillStreamAssembler::PrefillStreamAssembler(const v1::PrefillRequest& request,
                                               PrefillCallbacks callbacks, absl::Time start,
                                               std::string target)
    : request_(request),
      callbacks_(std::move(callbacks)),
      start_(start),
      target_(std::move(target)) {}

absl::Status PrefillStreamAssembler::Violation(absl::string_view detail) const {
  return absl::InternalError(
      absl::StrCat("Prefill to ", target_, " broke the stream protocol: ", detail));
}

bool PrefillStreamAssembler::LogitsRequired() const {
  return RequestedLogitsMode(request_) != v1::LOGITS_MODE_NONE;
}

std::string PrefillStreamAssembler::Position() const {
  std::string text =
      absl::StrCat(layer_ - layer_begin_, " of ", layer_end_ - layer_begin_, " layers complete");
  if (!KvComplete()) {
    absl::StrAppend(&text, "; next: layer ", layer_, " ", KvName(tensor_), " at byte ", offset_,
                    " of ", tensor_bytes_);
  }
  return text;
}

absl::Status PrefillStreamAssembler::Consume(const v1::PrefillResponse& response) {
  SegmentedBytes kv_data;
  if (response.has_kv_chunk() && !response.kv_chunk().data().empty()) {
    kv_data.pieces.push_back(response.kv_chunk().data());
    kv_data.size = response.kv_chunk().data().size();
  }
  return Consume(response, kv_data);
}

absl::Status PrefillStreamAssembler::Consume(const v1::PrefillResponse& response,
                                             const SegmentedBytes& kv_data) {
  if (failed_) {
    return absl::FailedPreconditionError("the Prefill stream has already failed");
  }
  absl::Status status = Dispatch(response, kv_data);
  if (!status.ok()) failed_ = true;
  return status;
}

absl::Status PrefillStreamAssembler::Dispatch(const v1::PrefillResponse& response,
                                              const SegmentedBytes& kv_data) {
  const std::string& id = response.request_id();
  if (!id.empty()) {
    if (!request_.request_id().empty() && id != request_.request_id()) {
      return Violation(
          absl::StrCat("request_id is '", id, "', the request's is '", request_.request_id(), "'"));
    }
    if (!summary_.request_id.empty() && id != summary_.request_id) {
      return Violation(
          absl::StrCat("request_id changed from '", summary_.request_id, "' to '", id, "'"));
    }
    summary_.request_id = id;
  }
  if (have_metrics_) {
    return Violation(absl::StrCat(KindName(response.kind_case()), " after the final metrics"));
  }
  switch (response.kind_case()) {
    case v1::PrefillResponse::kHeader:
      return ConsumeHeader(response.header());
    case v1::PrefillResponse::kKvChunk:
      return ConsumeChunk(response.kv_chunk(), kv_data);
    case v1::PrefillResponse::kLogits:
      return ConsumeLogits(response.logits());
    case v1::PrefillResponse::kMetrics:
      return ConsumeMetrics(response.metrics());
    case v1::PrefillResponse::KIND_NOT_SET:
      break;
  }
  return Violation("a PrefillResponse with none of header, kv_chunk, logits or metrics");
}

absl::Status PrefillStreamAssembler::CheckHeader(const v1::PrefillHeader& header) const {
  const int64_t num_tokens = request_.token_ids_size();
  if (header.num_tokens() != num_tokens) {
    return Violation(absl::StrCat("header.num_tokens is ", header.num_tokens(),
                                  ", the request has ", num_tokens, " token ids"));
  }
  if (header.num_layers() <= 0) {
    return Violation(absl::StrCat("header.num_layers must be positive, got ", header.num_layers()));
  }
  const int32_t begin = header.kv_layer_begin();
  const int32_t end = header.kv_layer_end();
  if (begin < 0 || begin > end || end > header.num_layers()) {
    return Violation(absl::StrCat("header.kv_layer_begin/kv_layer_end ", RangeText(begin, end),
                                  " is not a range within the model's ", header.num_layers(),
                                  " layers"));
  }
  switch (request_.kv_selection()) {
    case v1::KV_SELECTION_UNSPECIFIED:
    case v1::KV_SELECTION_ALL:
      if (begin != 0 || end != header.num_layers()) {
        return Violation(absl::StrCat("header.kv_layer_begin/kv_layer_end is ",
                                      RangeText(begin, end), ", expected every layer ",
                                      RangeText(0, header.num_layers()), " (KV_SELECTION_ALL)"));
      }
      break;
    case v1::KV_SELECTION_RANGE:
      if (begin != request_.kv_layer_begin() || end != request_.kv_layer_end()) {
        return Violation(absl::StrCat(
            "header.kv_layer_begin/kv_layer_end is ", RangeText(begin, end), ", requested ",
            RangeText(request_.kv_layer_begin(), request_.kv_layer_end())));
      }
      break;
    case v1::KV_SELECTION_NONE:
      if (begin != end) {
        return Violation(absl::StrCat("header.kv_layer_begin/kv_layer_end is ",
                                      RangeText(begin, end),
                                      ", expected no layers (KV_SELECTION_NONE)"));
      }
      break;
    default:
      break;  // the server rejects unknown selections
  }
  if (!request_.expected_fingerprint().empty() &&
      header.model_fingerprint() != request_.expected_fingerprint()) {
    return Violation(absl::StrCat("header.model_fingerprint is '", header.model_fingerprint(),
                                  "', the request expected '", request_.expected_fingerprint(),
                                  "'"));
  }
  if (begin == end) return absl::OkStatus();  // no KV follows; its description does not matter

  if (header.num_kv_heads() <= 0) {
    return Violation(
        absl::StrCat("header.num_kv_heads must be positive, got ", header.num_kv_heads()));
  }
  if (header.head_dim() <= 0) {
    return Violation(absl::StrCat("header.head_dim must be positive, got ", header.head_dim()));
  }
  if (header.kv_dtype() != RequestedKvDType(request_)) {
    return Violation(absl::StrCat("header.kv_dtype is ", EnumText<v1::DataType>(header.kv_dtype()),
                                  ", requested ", v1::DataType_Name(RequestedKvDType(request_))));
  }
  if (header.kv_layout() != RequestedKvLayout(request_)) {
    return Violation(absl::StrCat("header.kv_layout is ",
                                  EnumText<v1::TensorLayout>(header.kv_layout()), ", requested ",
                                  v1::TensorLayout_Name(RequestedKvLayout(request_))));
  }
  if (!header.has_kv_spec()) return Violation("header.kv_spec is missing");
  const v1::TensorSpec& spec = header.kv_spec();
  if (spec.dtype() != header.kv_dtype()) {
    return Violation(absl::StrCat("header.kv_spec.dtype is ", EnumText<v1::DataType>(spec.dtype()),
                                  ", header.kv_dtype is ",
                                  EnumText<v1::DataType>(header.kv_dtype())));
  }
  if (spec.layout() != header.kv_layout()) {
    return Violation(
        absl::StrCat("header.kv_spec.layout is ", EnumText<v1::TensorLayout>(spec.layout()),
                     ", header.kv_layout is ", EnumText<v1::TensorLayout>(header.kv_layout())));
  }
  absl::StatusOr<TensorGeometry> geometry =
      TensorGeometryFromProto("header.kv_spec", spec.dtype(), spec.layout(), spec.shape());
  if (!geometry.ok()) return Violation(geometry.status().message());
  const bool token_major = geometry->layout == Layout::kTokenMajor;
  const std::array<int64_t, 3> expected =
      ShapeFor(geometry->layout, num_tokens, header.num_kv_heads(), header.head_dim());
  if (!std::equal(expected.begin(), expected.end(), geometry->dims.begin())) {
    return Violation(absl::StrCat("header.kv_spec.shape is ", DimsText(geometry->dims),
                                  ", expected ", DimsText(expected),
                                  token_major ? " ([num_tokens, num_kv_heads, head_dim])"
                                              : " ([num_kv_heads, num_tokens, head_dim])"));
  }
  if (header.bytes_per_layer() != 2 * geometry->bytes) {
    return Violation(absl::StrCat("header.bytes_per_layer is ", header.bytes_per_layer(),
                                  ", expected ", 2 * geometry->bytes,
                                  " (K and V of header.kv_spec)"));
  }
  return absl::OkStatus();
}

absl::Status PrefillStreamAssembler::ConsumeHeader(const v1::PrefillHeader& header) {
  if (have_header_) return Violation("a second header");
  ANCHOR_RETURN_IF_ERROR(CheckHeader(header));
  have_header_ = true;
  summary_.header = header;
  summary_.time_to_header = absl::Now() - start_;
  layer_begin_ = header.kv_layer_begin();
  layer_end_ = header.kv_layer_end();
  layer_ = layer_begin_;
  tensor_ = v1::TENSOR_NAME_K;
  offset_ = 0;
  if (layer_begin_ < layer_end_) {
    const v1::TensorSpec& spec = header.kv_spec();
    tensor_bytes_ =
        TensorGeometryFromProto("header.kv_spec", spec.dtype(), spec.layout(), spec.shape())->bytes;
  }
  if (callbacks_.on_header) return callbacks_.on_header(summary_.header, summary_.request_id);
  return absl::OkStatus();
}

absl::Status PrefillStreamAssembler::ConsumeChunk(const v1::KvChunk& chunk,
                                                  const SegmentedBytes& data) {
  if (!have_header_) return Violation("kv_chunk before the header");
  if (have_logits_) return Violation("kv_chunk after the logits");
  if (KvComplete()) {
    return Violation(absl::StrCat("kv_chunk for layer ", chunk.layer(), " after all ",
                                  layer_end_ - layer_begin_, " layers ",
                                  RangeText(layer_begin_, layer_end_), " arrived"));
  }
  if (chunk.tensor() != v1::TENSOR_NAME_K && chunk.tensor() != v1::TENSOR_NAME_V) {
    return Violation(absl::StrCat("kv_chunk.tensor is ", EnumText<v1::TensorName>(chunk.tensor()),
                                  ", expected TENSOR_NAME_K or TENSOR_NAME_V"));
  }
  if (chunk.layer() != layer_ || chunk.tensor() != tensor_) {
    const std::string got = absl::StrCat("layer ", chunk.layer(), " ", KvName(chunk.tensor()));
    if (offset_ > 0) {
      return Violation(absl::StrCat("layer ", layer_, " ", KvName(tensor_), " ended after ",
                                    offset_, " of its ", tensor_bytes_,
                                    " bytes: the next kv_chunk is for ", got));
    }
    if (chunk.layer() != layer_) {
      return Violation(absl::StrCat("kv_chunk.layer is ", chunk.layer(), ", expected ", layer_,
                                    " (layers arrive in increasing order over ",
                                    RangeText(layer_begin_, layer_end_), ")"));
    }
    return Violation(
        absl::StrCat("kv_chunk.tensor is ", v1::TensorName_Name(chunk.tensor()), " for layer ",
                     layer_, ", expected ", v1::TensorName_Name(tensor_),
                     tensor_ == v1::TENSOR_NAME_K ? " (K's chunks come first)" : " (V follows K)"));
  }
  if (chunk.offset() != offset_) {
    return Violation(absl::StrCat("kv_chunk.offset is ", chunk.offset(), " for layer ", layer_, " ",
                                  KvName(tensor_), ", expected ", offset_,
                                  " (chunks are contiguous)"));
  }
  const auto size = static_cast<int64_t>(data.size);
  if (size == 0) {
    return Violation(absl::StrCat("kv_chunk.data is empty (layer ", layer_, " ", KvName(tensor_),
                                  " at byte ", offset_, ")"));
  }
  if (size > tensor_bytes_ - offset_) {
    return Violation(absl::StrCat("kv_chunk.data of layer ", layer_, " ", KvName(tensor_),
                                  " runs to byte ", offset_ + size, ", past the ", tensor_bytes_,
                                  " bytes of header.kv_spec"));
  }
  if (summary_.kv_bytes == 0) summary_.time_to_first_kv_byte = absl::Now() - start_;
  for (absl::string_view piece : data.pieces) {
    if (piece.empty()) continue;
    if (callbacks_.on_kv_data) {
      ANCHOR_RETURN_IF_ERROR(callbacks_.on_kv_data(layer_, tensor_, offset_, piece));
    }
    offset_ += static_cast<int64_t>(piece.size());
    summary_.kv_bytes += static_cast<int64_t>(piece.size());
  }
  if (offset_ < tensor_bytes_) return absl::OkStatus();
  offset_ = 0;
  if (tensor_ == v1::TENSOR_NAME_K) {
    tensor_ = v1::TENSOR_NAME_V;
    return absl::OkStatus();
  }
  PrefillLayerProgress progress;
  progress.layer = layer_;
  progress.layers_done = layer_ + 1 - layer_begin_;
  progress.layers_total = layer_end_ - layer_begin_;
  progress.kv_bytes_received = summary_.kv_bytes;
  progress.elapsed = absl::Now() - start_;
  ++layer_;
  tensor_ = v1::TENSOR_NAME_K;
  if (callbacks_.on_layer_done) return callbacks_.on_layer_done(progress);
  return absl::OkStatus();
}

absl::Status PrefillStreamAssembler::CheckLogits(const v1::Logits& logits) const {
  if (logits.argmax_token_id() < 0) {
    return Violation(
        absl::StrCat("logits.argmax_token_id is negative (", logits.argmax_token_id(), ")"));
  }
  switch (RequestedLogitsMode(request_)) {
    case v1::LOGITS_MODE_FULL:
      if (logits.values_size() == 0) return Violation("logits.values is empty (LOGITS_MODE_FULL)");
      if (logits.argmax_token_id() >= logits.values_size()) {
        return Violation(absl::StrCat("logits.argmax_token_id is ", logits.argmax_token_id(),
                                      ", outside the ", logits.values_size(),
                                      " entries of logits.values"));
      }
      break;
    case v1::LOGITS_MODE_TOP_K:
      if (logits.top_size() != request_.logits_top_k()) {
        return Violation(absl::StrCat(
            "logits.top has ", logits.top_size(),
            " entries, the request asked for logits_top_k = ", request_.logits_top_k()));
      }
      for (int i = 1; i < logits.top_size(); ++i) {
        if (logits.top(i).logit() > logits.top(i - 1).logit()) {
          return Violation(absl::StrCat("logits.top[", i, "].logit (", logits.top(i).logit(),
                                        ") is above logits.top[", i - 1, "].logit (",
                                        logits.top(i - 1).logit(), "); must be decreasing"));
        }
      }
      if (logits.top_size() > 0 && logits.argmax_token_id() != logits.top(0).token_id()) {
        return Violation(absl::StrCat("logits.argmax_token_id is ", logits.argmax_token_id(),
                                      ", logits.top[0].token_id is ", logits.top(0).token_id()));
      }
      break;
    case v1::LOGITS_MODE_NONE:
      if (logits.values_size() > 0 || logits.top_size() > 0) {
        return Violation(absl::StrCat("logits carry ", logits.values_size(), " values and ",
                                      logits.top_size(), " top entries with LOGITS_MODE_NONE"));
      }
      break;
    default:
      break;
  }
  return absl::OkStatus();
}

absl::Status PrefillStreamAssembler::ConsumeLogits(const v1::Logits& logits) {
  if (!have_header_) return Violation("logits before the header");
  if (have_logits_) return Violation("a second logits message");
  if (!KvComplete()) return Violation(absl::StrCat("logits arrived with ", Position()));
  ANCHOR_RETURN_IF_ERROR(CheckLogits(logits));
  have_logits_ = true;
  summary_.logits = logits;
  return absl::OkStatus();
}

absl::Status PrefillStreamAssembler::ConsumeMetrics(const v1::PrefillMetrics& metrics) {
  if (!have_header_) return Violation("metrics before the header");
  if (!KvComplete()) return Violation(absl::StrCat("metrics arrived with ", Position()));
  if (LogitsRequired() && !have_logits_) return Violation("metrics arrived before the logits");
  have_metrics_ = true;
  summary_.metrics = metrics;
  return absl::OkStatus();
}

absl::StatusOr<PrefillSummary> PrefillStreamAssembler::Finish() {
  if (failed_) return absl::FailedPreconditionError("the Prefill stream has already failed");
  failed_ = true;  // Finish() hands the summary out once
  if (!have_header_) return Violation("the stream ended before the header");
  if (!KvComplete()) return Violation(absl::StrCat("the stream ended with ", Position()));
  if (LogitsRequired() && !have_logits_) return Violation("the stream ended without the logits");
  if (!have_metrics_) return Violation("the stream ended without the final metrics");
  summary_.total = absl::Now() - start_;
  return std::move(summary_);
}

// ---- PrefillClient ------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<PrefillClient>> PrefillClient::Create(std::string target,
                                                                     ClientOptions options) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = CreateClientChannel(target, options);
  if (!channel.ok()) return channel.status();
  return std::make_unique<PrefillClient>(*std::move(channel), std::move(target), options);
}

PrefillClient::PrefillClient(std::shared_ptr<grpc::Channel> channel, std::string target,
                             ClientOptions options)
    : target_(std::move(target)),
      options_(options),
      channel_(std::move(channel)),
      stub_(v1::PrefillService::NewStub(channel_)) {}

absl::StatusOr<v1::ModelInfo> PrefillClient::GetModelInfo(const CallOptions& call) {
  grpc::ClientContext context;
  PrepareClientContext(options_, call, &context);
  ScopedCallRegistration registration(call.canceller, &context);
  v1::ModelInfo info;
  grpc::Status status = stub_->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
  if (!status.ok()) return FromGrpcStatus(status, target_, "GetModelInfo");
  return info;
}

absl::StatusOr<PrefillSummary> PrefillClient::PrefillStreamed(const v1::PrefillRequest& request,
                                                              PrefillCallbacks callbacks,
                                                              const CallOptions& call) {
  grpc::ClientContext context;
  PrepareClientContext(options_, call, &context);
  ScopedCallRegistration registration(call.canceller, &context);
  PrefillStreamAssembler assembler(request, std::move(callbacks), absl::Now(), target_);
  // Read raw: each chunk's KV bytes stay in gRPC's slices until the callback takes them, instead
  // of being copied into a protobuf string first (the stub's typed reader).
  const grpc::internal::RpcMethod method(kPrefillMethod,
                                         grpc::internal::RpcMethod::SERVER_STREAMING, channel_);
  std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
      grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(channel_.get(), method,
                                                                    &context, request));
  v1::PrefillResponse response;
  grpc::ByteBuffer buffer;
  absl::Status broken;  // the first protocol violation or callback error
  while (reader->Read(&buffer)) {
    if (!broken.ok()) continue;  // drain what is in flight after cancelling
    absl::StatusOr<SplitMessage> split = SplitTensorData(
        buffer, {v1::PrefillResponse::kKvChunkFieldNumber}, v1::KvChunk::kDataFieldNumber);
    response.Clear();
    if (!split.ok() || !response.ParseFromString(split->rest)) {
      broken = absl::InternalError(absl::StrCat(
          "Prefill to ", target_,
          " broke the stream protocol: a message does not parse as a PrefillResponse"));
    } else {
      const auto found = split->data.find(v1::PrefillResponse::kKvChunkFieldNumber);
      broken = assembler.Consume(response,
                                 found == split->data.end() ? SegmentedBytes{} : found->second);
    }
    if (!broken.ok()) context.TryCancel();
  }
  grpc::Status status = reader->Finish();
  if (!broken.ok()) return broken;
  if (!status.ok()) return FromGrpcStatus(status, target_, "Prefill");
  return assembler.Finish();
}

absl::StatusOr<PrefillResult> PrefillClient::Prefill(
    const v1::PrefillRequest& request, const CallOptions& call,
    std::function<void(const PrefillLayerProgress&)> on_layer) {
  PrefillResult result;
  int32_t layer_begin = 0;
  PrefillCallbacks callbacks;
  callbacks.on_header = [&](const v1::PrefillHeader& header, absl::string_view) -> absl::Status {
    layer_begin = header.kv_layer_begin();
    if (header.kv_layer_begin() == header.kv_layer_end()) return absl::OkStatus();
    const v1::TensorSpec& spec = header.kv_spec();  // checked by the assembler
    ANCHOR_ASSIGN_OR_RETURN(const DType dtype,
                            DTypeFromProto("header.kv_spec.dtype", spec.dtype()));
    ANCHOR_ASSIGN_OR_RETURN(const Layout layout,
                            LayoutFromProto("header.kv_spec.layout", spec.layout()));
    const std::array<int64_t, 3> shape = {spec.shape(0), spec.shape(1), spec.shape(2)};
    ANCHOR_ASSIGN_OR_RETURN(const TensorGeometry geometry,
                            MakeTensorGeometry("header.kv_spec", dtype, layout, shape));
    for (int32_t layer = header.kv_layer_begin(); layer < header.kv_layer_end(); ++layer) {
      PrefillLayerKv& kv = result.layers.emplace_back();
      kv.layer = layer;
      // Reserved, not zero-filled: each tensor's pieces arrive in order and are appended.
      kv.k = HostTensor{dtype, layout, shape, {}};
      kv.v = HostTensor{dtype, layout, shape, {}};
      kv.k.bytes.reserve(static_cast<size_t>(geometry.bytes));
      kv.v.bytes.reserve(static_cast<size_t>(geometry.bytes));
    }
    return absl::OkStatus();
  };
  callbacks.on_kv_data = [&](int32_t layer, v1::TensorName tensor, int64_t offset,
                             absl::string_view data) -> absl::Status {
    // Offsets and sizes are checked by the assembler before this is called: each tensor's
    // pieces come in order without gaps.
    PrefillLayerKv& kv = result.layers[static_cast<size_t>(layer - layer_begin)];
    HostTensor& target = tensor == v1::TENSOR_NAME_K ? kv.k : kv.v;
    if (offset != static_cast<int64_t>(target.bytes.size())) {
      return absl::InternalError(
          absl::StrCat("KV piece at offset ", offset, " after ", target.bytes.size(), " bytes"));
    }
    target.bytes.insert(target.bytes.end(), data.begin(), data.end());
    return absl::OkStatus();
  };
  if (on_layer) {
    callbacks.on_layer_done = [&on_layer](const PrefillLayerProgress& progress) {
      on_layer(progress);
      return absl::OkStatus();
    };
  }
  ANCHOR_ASSIGN_OR_RETURN(result.summary, PrefillStreamed(request, std::move(callbacks), call));
  return result;
}

// ---- request helpers ----------------------------------------------------------------------------

absl::StatusOr<std::vector<int32_t>> ParseTokenIds(absl::string_view text,
                                                   absl::string_view source) {
  std::vector<int32_t> ids;
  int item = 0;
  for (absl::string_view word : absl::StrSplit(text, absl::ByAnyChar(", \t\r\n"))) {
    if (word.empty()) continue;
    ++item;
    int64_t id = 0;
    if (!absl::SimpleAtoi(word, &id)) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": '", word, "' (item ", item, ") is not a token id"));
    }
    if (id < 0 || id > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": token id ", id, " (item ", item, ") is outside [0, 2^31)"));
    }
    ids.push_back(static_cast<int32_t>(id));
  }
  if (ids.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(source, " holds no token ids"));
  }
  return ids;
}

absl::Status SetKvLayers(absl::string_view text, v1::PrefillRequest* request) {
  request->clear_kv_layer_begin();
  request->clear_kv_layer_end();
  if (text == "all") {
    request->set_kv_selection(v1::KV_SELECTION_ALL);
    return absl::OkStatus();
  }
  if (text == "none") {
    request->set_kv_selection(v1::KV_SELECTION_NONE);
    return absl::OkStatus();
  }
  const std::vector<absl::string_view> parts = absl::StrSplit(text, ':');
  int32_t begin = 0;
  int32_t end = 0;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &begin) ||
      !absl::SimpleAtoi(parts[1], &end) || begin < 0 || end <= begin) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv layers must be 'all', 'none' or 'B:E' (layers B..E-1, 0 <= B < E), got '", text, "'"));
  }
  request->set_kv_selection(v1::KV_SELECTION_RANGE);
  request->set_kv_layer_begin(begin);
  request->set_kv_layer_end(end);
  return absl::OkStatus();
}

absl::Status SetLogitsMode(absl::string_view text, v1::PrefillRequest* request) {
  request->clear_logits_top_k();
  if (text == "full") {
    request->set_logits_mode(v1::LOGITS_MODE_FULL);
    return absl::OkStatus();
  }
  if (text == "none") {
    request->set_logits_mode(v1::LOGITS_MODE_NONE);
    return absl::OkStatus();
  }
  absl::string_view rest = text;
  int32_t k = 0;
  if (!absl::ConsumePrefix(&rest, "topk:") || !absl::SimpleAtoi(rest, &k) || k < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits must be 'full', 'none' or 'topk:K' with K >= 1, got '", text, "'"));
  }
  request->set_logits_mode(v1::LOGITS_MODE_TOP_K);
  request->set_logits_top_k(k);
  return absl::OkStatus();
}

}  // namespace anchorserve
