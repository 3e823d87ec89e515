// Every knob of the server, read from the command-line flags in one place and validated at start.
// The defaults written here are the only ones: the flags, the batcher and the request
// validation take theirs from ServerConfig{}.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "kernels/attention_types.h"
#include "kernels/backend.h"
#include "proto/anchorserve/v1/limits.h"

namespace anchorserve {

// Room a response needs beside tensor bytes (request id, per-head metrics of max_heads heads).
inline constexpr int64_t kMessageOverheadBytes = 64 << 10;

struct ServerConfig {
  std::string host = "0.0.0.0";
  int grpc_port = 50051;    // 0 = pick a free port
  int metrics_port = 9464;  // 0 = pick a free port, -1 = no metrics endpoint
  std::string port_file;    // written with the chosen ports once serving; empty = none
  // Where /metrics listens; empty = --host. 127.0.0.1 keeps it off the network.
  std::string metrics_host;
  bool reflection = true;  // grpc.reflection.v1alpha on the gRPC port

  // Transport security and authentication (security.h). No cert/key: plaintext.
  std::string tls_cert_file;        // PEM chain; with tls_key_file the gRPC port speaks TLS
  std::string tls_key_file;         // PEM private key
  std::string tls_client_ca_file;   // PEM roots; when set, clients must present a cert (mTLS)
  std::string auth_token_file;      // "name:token" lines; when set, every RPC but health needs one
  int max_inflight_per_caller = 0;  // per token name; 0 = unlimited
  // How often the certificate and token files are checked for changes.
  absl::Duration credential_reload_interval = absl::Seconds(10);

  BackendOptions backend;

  // Batching.
  int max_batch_requests = 8;
  int64_t max_batch_tokens = 262144;  // sum of seq_len over a batch
  absl::Duration max_queue_delay = absl::Milliseconds(2);
  int max_queue_size = 64;
  // Longest a request may wait in the queue before it is refused; zero = no bound (its deadline
  // still applies).
  absl::Duration max_queue_time = absl::ZeroDuration();

  // Request limits.
  int64_t max_message_bytes = 268435456;   // one gRPC message (a whole unary Attend)
  int64_t max_request_bytes = 4294967296;  // Q + K + V of one request
  int64_t max_seq_len = 262144;
  int max_heads = 256;
  int64_t stream_chunk_bytes = 4194304;  // output chunks of AttendStream and Prefill

  // Memory admission (server/memory_budget.h). Request bytes received, queued and running plus
  // output bytes waiting to be sent, over all calls; 0 = half of the machine's (or the cgroup's)
  // memory, resolved at start.
  int64_t max_inflight_bytes = 0;
  // A streaming upload (AttendStream) that receives no message for this long is cancelled.
  absl::Duration upload_stall_timeout = absl::Seconds(30);
  // With the CUDA backend, reused request/output buffers (at most a quarter of the budget) are
  // page-locked so that their device copies skip the staging buffers.
  bool pin_host_buffers = true;

  // Prefill.
  std::string model_dir;                     // empty: no model, Prefill answers FAILED_PRECONDITION
  int64_t prefill_buffer_bytes = 268435456;  // KV bytes of one Prefill waiting to be sent
  // Most engine workspace (activations, K/V, scratch beyond the weights) one Prefill may need.
  int64_t prefill_memory_bytes = int64_t{16} << 30;

  absl::Duration drain_timeout = absl::Seconds(30);

  // Connections older than this get GOAWAY (gRPC adds +-10% jitter): clients reconnect and
  // re-resolve, so replicas added since (scale-out, rollouts) get their share of the requests.
  // Zero: no limit.
  absl::Duration max_connection_age = absl::Seconds(300);
  // Calls still running on a connection that got GOAWAY for its age may take this long before
  // they are cancelled. Zero: no limit (a long Prefill is never cut off by a reconnect).
  absl::Duration max_connection_age_grace = absl::ZeroDuration();

  // Applied to unset request config fields. Mode auto: dense for short sequences, where
  // AnchorAttention cannot be cheaper (ResolveMode).
  AnchorConfig defaults = [] {
    AnchorConfig config;
    config.mode = AttentionMode::kAuto;
    return config;
  }();

  // --metrics_host, or --host when that is empty.
  const std::string& MetricsHost() const;

  // Checks every field; the message names the flag, e.g. "--grpc_port must be in [0, 65535]".
  absl::Status Validate() const;
};

inline const ServerConfig kDefaultServerConfig{};

// Reads the --flags (after absl::ParseCommandLine) and validates them.
absl::StatusOr<ServerConfig> ServerConfigFromFlags();

// "cpu", "cuda" or "auto".
absl::string_view BackendKindName(BackendKind kind);

// "host:port", with brackets around an IPv6 literal.
std::string JoinHostPort(absl::string_view host, int port);

}  // namespace anchorserve
