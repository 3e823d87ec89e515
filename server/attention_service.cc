#include "server/attention_service.h"

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <utility>

#include "absl/strings/str_format.h"
#include "server/attend_reactor.h"
#include "server/attend_stream_reactor.h"
#include "server/rpc_support.h"
#include "server/status_convert.h"

#ifndef ANCHOR_VERSION
#define ANCHOR_VERSION "unknown"
#endif

namespace anchorserve {

absl::string_view ServerVersion() { return ANCHOR_VERSION; }

AttentionServiceImpl::AttentionServiceImpl(const ServerConfig& config, MetricsRegistry* metrics,
                                           Clock* clock, CallerGate* callers)
    : config_(config),
      metrics_(metrics),
      clock_(clock),
      callers_(callers),
      request_id_prefix_(std::random_device{}()),
      memory_budget_(ResolveInflightBytesLimit(config.max_inflight_bytes), metrics),
      upload_watchdog_(config.upload_stall_timeout, clock),
      host_buffer_cache_(memory_budget_.limit() / 4, metrics) {}

absl::Status AttentionServiceImpl::SetReady(AttentionBackend* backend, DynamicBatcher* batcher) {
  if (backend == nullptr || batcher == nullptr) {
    return absl::InvalidArgumentError("SetReady needs a backend and a batcher");
  }
  absl::MutexLock lock(&ready_mu_);
  if (owned_serving_ != nullptr) return absl::FailedPreconditionError("SetReady called twice");
  auto state = std::make_unique<ServingState>();
  state->backend = backend;
  state->batcher = batcher;
  state->convert_options = MakeConvertOptions(config_, backend);
  owned_serving_ = std::move(state);
  // Release: a reactor that sees the pointer (acquire) sees the fully built state.
  serving_.store(owned_serving_.get(), std::memory_order_release);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Attend(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request,
                                                       grpc::ByteBuffer* response) {
  return StartAttendReactor(this, context, request, response);
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* AttentionServiceImpl::AttendStream(
    grpc::CallbackServerContext* context) {
  return StartAttendStreamReactor(this, context);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::GetServerInfo(grpc::CallbackServerContext* context,
                                                              const grpc::ByteBuffer* raw_request,
                                                              grpc::ByteBuffer* raw_response) {
  auto* reactor = new TrackedUnaryReactor(this, Rpc::kGetServerInfo);
  if (grpc::Status refused =
          AdmissionStatus(*this, reactor->serving(), *context, reactor->caller_slot());
      !refused.ok()) {
    reactor->FinishOnce(refused);
    return reactor;
  }
  v1::GetServerInfoRequest request;  // no fields yet; parsed to reject garbage
  if (absl::Status parsed = ParseRawMessage(*raw_request, "request", &request); !parsed.ok()) {
    reactor->FinishOnce(ToGrpcStatus(parsed));
    return reactor;
  }
  const BackendInfo& info = reactor->serving()->convert_options.backend_info;
  v1::GetServerInfoResponse response_message;
  v1::GetServerInfoResponse* response = &response_message;
  response->set_version(std::string(ServerVersion()));
  response->set_backend(info.name);
  response->set_device(info.device);
  for (DType dtype : info.dtypes) response->add_supported_dtypes(DTypeToProto(dtype));
  for (int head_dim : info.head_dims) response->add_supported_head_dims(head_dim);
  v1::ServerLimits* limits = response->mutable_limits();
  limits->set_max_message_bytes(config_.max_message_bytes);
  limits->set_max_request_bytes(config_.max_request_bytes);
  limits->set_max_seq_len(config_.max_seq_len);
  limits->set_max_heads(config_.max_heads);
  limits->set_max_batch_requests(config_.max_batch_requests);
  limits->set_max_batch_tokens(config_.max_batch_tokens);
  limits->set_max_queue_size(config_.max_queue_size);
  limits->set_max_queue_delay_seconds(absl::ToDoubleSeconds(config_.max_queue_delay));
  limits->set_stream_chunk_bytes(config_.stream_chunk_bytes);
  *response->mutable_defaults() = AnchorConfigToProto(config_.defaults);
  metrics_->AddSentBytes(static_cast<int64_t>(response->ByteSizeLong()));
  SerializeToByteBuffer(response_message, raw_response);
  reactor->FinishOnce(grpc::Status::OK);
  return reactor;
}

bool AttentionServiceImpl::WaitUntilIdle(absl::Time deadline) {
  absl::MutexLock lock(&inflight_mu_);
  while (inflight_ > 0) {
    if (idle_.WaitWithDeadline(&inflight_mu_, deadline)) return inflight_ == 0;
  }
  return true;
}

int64_t AttentionServiceImpl::InflightRpcs() const {
  absl::MutexLock lock(&inflight_mu_);
  return inflight_;
}

void AttentionServiceImpl::RpcStarted() {
  metrics_->RequestStarted();
  absl::MutexLock lock(&inflight_mu_);
  ++inflight_;
}

void AttentionServiceImpl::RpcDone() {
  metrics_->RequestDone();
  absl::MutexLock lock(&inflight_mu_);
  if (--inflight_ == 0) idle_.SignalAll();
}

std::string AttentionServiceImpl::RequestIdFor(const std::string& requested) {
  if (!requested.empty()) return requested;
  return absl::StrFormat("req-%08x-%d", request_id_prefix_ & 0xffffffffu,
                         next_request_id_.fetch_add(1));
}

}  // namespace anchorserve
