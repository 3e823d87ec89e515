// Client of anchorserve.v1.AttentionService: unary and chunked-streaming attention calls with
// readable errors (absl::Status values, never exceptions).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "anchorserve/v1/anchorserve.grpc.pb.h"
#include "anchorserve/v1/anchorserve.pb.h"
#include "client/host_tensor.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/health/v1/health.pb.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/status.h"
#include "proto/anchorserve/v1/limits.h"

namespace anchorserve {

using HealthStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

struct ClientOptions {
  // Largest message the channel sends or receives. The server has its own limit
  // (GetServerInfo().limits().max_message_bytes).
  int64_t max_message_bytes = kMaxGrpcMessageBytes;
  // Used by calls whose CallOptions have no deadline.
  absl::Duration default_deadline = absl::Seconds(120);
  // Q/K/V bytes per TensorChunk message that AttendStreamed sends.
  int64_t stream_chunk_bytes = int64_t{4} << 20;
  // Transport security (client_credentials.h: TlsChannelCredentials); null = plaintext.
  std::shared_ptr<grpc::ChannelCredentials> channel_credentials;
  // The name the server's certificate must carry when it is not the target's host (e.g. the
  // target is an IP address); empty = the target's host.
  std::string tls_server_name;
  // Sent as "authorization: Bearer <token>" with every call; empty = none.
  std::string bearer_token;
};

// Cancels a call from another thread. Cancel() before the call starts cancels it as it starts.
class CallCanceller {
 public:
  void Cancel();
  bool cancelled() const;

 private:
  friend class ScopedCallRegistration;
  mutable absl::Mutex mu_;
  grpc::ClientContext* context_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

struct CallOptions {
  // Time the call may take; unset = ClientOptions::default_deadline, InfiniteDuration = none.
  std::optional<absl::Duration> timeout;
  CallCanceller* canceller = nullptr;
  // Wait for the channel to connect instead of failing at once when the server is not up.
  bool wait_for_ready = false;
};

// Makes `canceller` (may be null) reach `context` for the lifetime of one call.
class ScopedCallRegistration {
 public:
  ScopedCallRegistration(CallCanceller* canceller, grpc::ClientContext* context);
  ~ScopedCallRegistration();
  ScopedCallRegistration(const ScopedCallRegistration&) = delete;
  ScopedCallRegistration& operator=(const ScopedCallRegistration&) = delete;

 private:
  CallCanceller* canceller_;
};

// Checks `options` and makes the channel to `target` that the clients of this library use:
// `target` in any form of client/channel_target.h (one server, dns:///name:port, a list of
// addresses), requests balanced round-robin over the replicas and retried on UNAVAILABLE
// (ChannelArgumentsForReplicas); message size limits, credentials, TLS server name and bearer
// token from `options`. No connection is made yet.
absl::StatusOr<std::shared_ptr<grpc::Channel>> CreateClientChannel(const std::string& target,
                                                                   const ClientOptions& options);

// Applies the deadline (`call.timeout`, else `options.default_deadline`) and wait-for-ready of
// `call` to `context`.
void PrepareClientContext(const ClientOptions& options, const CallOptions& call,
                          grpc::ClientContext* context);

// One causal prefill request over host memory the caller owns.
struct AttendInputs {
  std::string request_id;   // empty: the server makes one up
  TensorView q;             // [N, Hq, d] or [Hq, N, d]
  TensorView k;             // [N, Hkv, d] or [Hkv, N, d]
  TensorView v;             // like k
  v1::AnchorConfig config;  // unset fields take the server's defaults
  v1::RequestOptions options;

  // Q + K + V bytes.
  int64_t PayloadBytes() const {
    return static_cast<int64_t>(q.bytes.size() + k.bytes.size() + v.bytes.size());
  }
};

struct AttendResult {
  std::string request_id;
  std::optional<HostTensor> output;  // like q; absent when options.metrics_only
  v1::AttentionMetrics metrics;
  bool streamed = false;  // came over AttendStream
  // AttendStream only, client-measured: call start to the last input chunk handed to gRPC (flow
  // control makes that follow the server's reading), and output_spec to the last output chunk.
  absl::Duration upload_time = absl::ZeroDuration();
  absl::Duration download_time = absl::ZeroDuration();
};

// Builds the unary request; copies the tensor bytes. Validates shapes and byte counts first.
absl::StatusOr<v1::AttendRequest> BuildAttendRequest(const AttendInputs& inputs);

// The client's view of a failed call: same code, and a sentence naming the server and the RPC,
// e.g. "server at 127.0.0.1:50051 is unavailable: connection refused".
absl::Status FromGrpcStatus(const grpc::Status& status, absl::string_view target,
                            absl::string_view rpc);

// Bytes of the unary message `inputs` makes, an upper bound good enough to pick unary vs stream.
int64_t EstimateUnaryRequestBytes(const AttendInputs& inputs);

class AttentionClient {
 public:
  // `target`: "127.0.0.1:50051", "dns:///anchorserve:50051" or "10.0.0.1:50051,10.0.0.2:50051"
  // (see CreateClientChannel; plaintext; no connection is made yet).
  static absl::StatusOr<std::unique_ptr<AttentionClient>> Create(std::string target,
                                                                 ClientOptions options = {});

  absl::StatusOr<v1::GetServerInfoResponse> GetServerInfo(const CallOptions& call = {});

  // grpc.health.v1.Health/Check of `service` ("" = the server as a whole; anchorserve also
  // answers for "anchorserve.v1.AttentionService"). NOT_FOUND, as a sentence, when the server
  // keeps no status for `service`.
  absl::StatusOr<HealthStatus> CheckHealth(absl::string_view service = "",
                                           const CallOptions& call = {});

  // Unary Attend with a ready-made request (also lets tests send malformed requests).
  absl::StatusOr<v1::AttendResponse> Attend(const v1::AttendRequest& request,
                                            const CallOptions& call = {});
  // Unary Attend from host tensors; the output comes back as a HostTensor. The tensors go to the
  // socket straight from the caller's buffers and the output straight from gRPC's receive buffers
  // into the HostTensor (no protobuf copies; see proto/anchorserve/v1/tensor_wire.h). Returns only
  // once gRPC holds no reference to the caller's buffers.
  absl::StatusOr<AttendResult> Attend(const AttendInputs& inputs, const CallOptions& call = {});

  // AttendStream: header, then Q, K and V in chunks of ClientOptions::stream_chunk_bytes read
  // straight from the caller's buffers; reassembles the output chunks and checks the server's
  // output_spec, chunk order and sizes.
  absl::StatusOr<AttendResult> AttendStreamed(const AttendInputs& inputs,
                                              const CallOptions& call = {});

  // Unary when the request fits in `server_max_message_bytes` (the server's limit from
  // GetServerInfo) and in this client's own limit, streamed otherwise (or when `force_stream`).
  // Streamed chunks are kept small enough for the server's limit.
  absl::StatusOr<AttendResult> AttendAuto(const AttendInputs& inputs,
                                          int64_t server_max_message_bytes,
                                          bool force_stream = false, const CallOptions& call = {});

  const std::string& target() const { return target_; }
  const ClientOptions& options() const { return options_; }
  v1::AttentionService::Stub& stub() { return *stub_; }
  std::shared_ptr<grpc::Channel> channel() const { return channel_; }

  // Applies deadline, wait-for-ready and size settings of `call` to `context`.
  void PrepareContext(const CallOptions& call, grpc::ClientContext* context) const;

 private:
  AttentionClient(std::string target, ClientOptions options,
                  std::shared_ptr<grpc::Channel> channel);

  absl::StatusOr<AttendResult> AttendStreamedInChunks(const AttendInputs& inputs,
                                                      const CallOptions& call, int64_t chunk_bytes);

  std::string target_;
  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::AttentionService::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_stub_;
  std::unique_ptr<grpc::GenericStub> generic_stub_;  // Attend over raw bytes
};

}  // namespace anchorserve
