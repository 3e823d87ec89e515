// Between the wire (anchorserve.v1 messages) and the core types, on the server's side: validation
// of everything a client sends against the server's limits and backend, and the response metrics.
// The conversions it builds on are proto/anchorserve/v1/convert.h. Every error message names the
// offending field or limit flag, e.g. "q.shape[1] (num_heads) must be positive, got 0".
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "anchorserve/v1/anchorserve.pb.h"
#include "kernels/attention_types.h"
#include "kernels/backend.h"
#include "proto/anchorserve/v1/convert.h"
#include "server/attention_job.h"
#include "server/server_config.h"

namespace anchorserve {

// What requests are checked against. Limits give RESOURCE_EXHAUSTED naming their flag; their
// defaults are ServerConfig's.
struct ConvertOptions {
  int64_t max_seq_len = kDefaultServerConfig.max_seq_len;
  int max_heads = kDefaultServerConfig.max_heads;
  int64_t max_request_bytes = kDefaultServerConfig.max_request_bytes;  // Q + K + V
  // A unary response must fit one message.
  int64_t max_message_bytes = kDefaultServerConfig.max_message_bytes;
  AnchorConfig defaults = kDefaultServerConfig.defaults;
  // Capabilities; when `backend` is null the backend checks are skipped.
  const AttentionBackend* backend = nullptr;
  BackendInfo backend_info;
};

ConvertOptions MakeConvertOptions(const ServerConfig& config, const AttentionBackend* backend);

// A validated request: everything but the tensor bytes.
struct RequestSpec {
  AttentionShape shape;
  DType dtype = DType::kBf16;
  Layout layout = Layout::kTokenMajor;
  AnchorConfig config;      // defaults applied, mode resolved (never kAuto)
  std::string mode_choice;  // ResolveMode's reason when the request's mode was auto
  bool metrics_only = false;
  bool compute_recall = false;
  int64_t q_bytes = 0;  // also the output's size
  int64_t k_bytes = 0;
  int64_t v_bytes = 0;
  std::vector<int64_t> q_dims;  // q.shape as sent (the output has the same)

  int64_t InputBytes() const { return q_bytes + k_bytes + v_bytes; }
};

// Unary request: tensor specs, limits (including that the output fits one response message
// unless metrics_only), data byte counts, config, backend support.
absl::StatusOr<RequestSpec> SpecFromAttendRequest(const v1::AttendRequest& request,
                                                  const ConvertOptions& options);
// The same for a request whose tensor bytes were taken out of the message on the wire
// (tensor_wire.h): `data_bytes` are the byte counts of q, k and v data.
absl::StatusOr<RequestSpec> SpecFromAttendRequest(const v1::AttendRequest& request,
                                                  const std::array<int64_t, 3>& data_bytes,
                                                  const ConvertOptions& options);

// Streaming header: the same checks without data, done before any buffer is allocated.
absl::StatusOr<RequestSpec> SpecFromStreamHeader(const v1::StreamHeader& header,
                                                 const ConvertOptions& options);

// INVALID_ARGUMENT naming `field` when `request_id` is longer than kMaxRequestIdBytes.
absl::Status CheckRequestId(absl::string_view field, absl::string_view request_id);

// INVALID_ARGUMENT naming the tensor and the element when q, k or v (laid out as `spec`
// describes) holds a NaN or an infinity: attention over them is NaN everywhere it reaches, which
// a client would rather hear about than receive.
absl::Status CheckFiniteInputs(const RequestSpec& spec, const void* q, const void* k,
                               const void* v);

// Shape, dtype, layout and config of `spec` into `task` (buffers are the caller's).
void ApplySpec(const RequestSpec& spec, AttentionTask* task);

// The job of a validated request over buffers its RPC owns and keeps alive until on_done has
// run: q, k and v as the spec describes them, `out` like q. The caller sets on_done.
std::shared_ptr<AttentionJob> MakeAttentionJob(const RequestSpec& spec, const void* q,
                                               const void* k, const void* v, void* out,
                                               absl::Time deadline);

// dtype, shape and layout of the output (those of q).
v1::TensorSpec OutputSpec(const RequestSpec& spec);
void SetOutputTensorSpec(const RequestSpec& spec, v1::Tensor* tensor);

// Density, stripes (overall and per head), timings, batch size, backend, recall and the
// effective config (softmax_scale resolved) of a finished job; with a mass target also each
// head's mass budget (true_kept_mass only with recall) and the request's estimated kept mass.
// total_seconds is the caller's.
void FillAttentionMetrics(const AttentionJob& job, absl::string_view backend_name,
                          v1::AttentionMetrics* metrics);

}  // namespace anchorserve
