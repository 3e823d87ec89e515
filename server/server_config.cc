#include "server/server_config.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

ABSL_FLAG(std::string, host, anchorserve::kDefaultServerConfig.host,
          "Address the gRPC and metrics servers listen on.");
ABSL_FLAG(int32_t, grpc_port, anchorserve::kDefaultServerConfig.grpc_port,
          "gRPC port; 0 picks a free one (see --port_file).");
ABSL_FLAG(int32_t, metrics_port, anchorserve::kDefaultServerConfig.metrics_port,
          "Prometheus /metrics port; 0 picks a free one (see --port_file).");
ABSL_FLAG(std::string, port_file, "",
          "When set, written atomically with \"grpc_port=N\\nmetrics_port=M\\n\" once serving.");
ABSL_FLAG(std::string, metrics_host, anchorserve::kDefaultServerConfig.metrics_host,
          "Address of the /metrics endpoint; empty = --host (127.0.0.1 keeps it local).");
ABSL_FLAG(bool, reflection, anchorserve::kDefaultServerConfig.reflection,
          "Serve gRPC server reflection (grpc.reflection.v1alpha).");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM certificate chain of the gRPC port; with --tls_key_file the port speaks TLS only. "
          "Re-read when it changes.");
ABSL_FLAG(std::string, tls_key_file, "",
          "PEM private key of --tls_cert_file. Re-read when it changes.");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "PEM CA certificates; when set, clients must present a certificate they signed (mTLS).");
ABSL_FLAG(std::string, auth_token_file, "",
          "File of \"name:token\" lines (# comments); when set, every RPC except "
          "grpc.health.v1.Health needs \"authorization: Bearer <token>\". Re-read when it "
          "changes.");
ABSL_FLAG(int32_t, max_inflight_per_caller,
          anchorserve::kDefaultServerConfig.max_inflight_per_caller,
          "RPCs one token name may have in flight; more get RESOURCE_EXHAUSTED. 0 = unlimited. "
          "Needs --auth_token_file.");
ABSL_FLAG(double, credential_reload_s,
          absl::ToDoubleSeconds(anchorserve::kDefaultServerConfig.credential_reload_interval),
          "How often the TLS and token files are checked for changes, in whole seconds.");
ABSL_FLAG(std::string, backend, "auto",
          "Compute backend: auto (CUDA if a GPU is present), cpu, cuda.");
ABSL_FLAG(int32_t, cpu_threads, anchorserve::kDefaultServerConfig.backend.cpu_threads,
          "Threads of the CPU backend; 0 = all hardware threads.");
ABSL_FLAG(int32_t, cuda_device, anchorserve::kDefaultServerConfig.backend.cuda_device,
          "CUDA device ordinal of the CUDA backend.");
ABSL_FLAG(int32_t, max_batch_requests, anchorserve::kDefaultServerConfig.max_batch_requests,
          "Most requests in one batch.");
ABSL_FLAG(int64_t, max_batch_tokens, anchorserve::kDefaultServerConfig.max_batch_tokens,
          "Most tokens (sum of seq_len) in one batch.");
ABSL_FLAG(double, max_queue_delay_ms,
          absl::ToDoubleMilliseconds(anchorserve::kDefaultServerConfig.max_queue_delay),
          "Longest time the oldest queued request waits for a batch to fill.");
ABSL_FLAG(int32_t, max_queue_size, anchorserve::kDefaultServerConfig.max_queue_size,
          "Requests that may wait in the queue; more are refused with RESOURCE_EXHAUSTED.");
ABSL_FLAG(double, max_queue_time_ms,
          absl::ToDoubleMilliseconds(anchorserve::kDefaultServerConfig.max_queue_time),
          "Longest a request may wait in the queue before RESOURCE_EXHAUSTED; 0 = no bound.");
ABSL_FLAG(int64_t, max_inflight_bytes, anchorserve::kDefaultServerConfig.max_inflight_bytes,
          "Budget for request bytes received, queued and running plus output bytes waiting to be "
          "sent, over all calls; over it a call gets RESOURCE_EXHAUSTED at once. 0 = half of "
          "the machine's (or the container's) memory.");
ABSL_FLAG(double, upload_stall_timeout_s,
          absl::ToDoubleSeconds(anchorserve::kDefaultServerConfig.upload_stall_timeout),
          "A streaming upload that receives no message for this long is cancelled "
          "(DEADLINE_EXCEEDED) and its memory freed.");
ABSL_FLAG(bool, pin_host_buffers, anchorserve::kDefaultServerConfig.pin_host_buffers,
          "With the CUDA backend, page-lock the reused request and output buffers (at most a "
          "quarter of --max_inflight_bytes) so that device copies skip the staging buffers.");
ABSL_FLAG(
    int64_t, max_message_bytes, anchorserve::kDefaultServerConfig.max_message_bytes,
    "Largest gRPC message received or sent (a whole unary Attend must fit); at most 2 GiB - 1.");
ABSL_FLAG(int64_t, max_request_bytes, anchorserve::kDefaultServerConfig.max_request_bytes,
          "Largest Q + K + V byte count of one request.");
ABSL_FLAG(int64_t, max_seq_len, anchorserve::kDefaultServerConfig.max_seq_len,
          "Longest sequence accepted.");
ABSL_FLAG(int32_t, max_heads, anchorserve::kDefaultServerConfig.max_heads,
          "Most query (or KV) heads accepted.");
ABSL_FLAG(int64_t, stream_chunk_bytes, anchorserve::kDefaultServerConfig.stream_chunk_bytes,
          "Bytes per output chunk of AttendStream and of Prefill's KV stream.");
ABSL_FLAG(double, drain_timeout_s,
          absl::ToDoubleSeconds(anchorserve::kDefaultServerConfig.drain_timeout),
          "On SIGTERM/SIGINT, how long in-flight requests may take before they are cancelled.");
ABSL_FLAG(double, max_connection_age_s,
          absl::ToDoubleSeconds(anchorserve::kDefaultServerConfig.max_connection_age),
          "Connections older than this (+-10% jitter) get GOAWAY so that clients reconnect and "
          "re-resolve (new replicas get traffic); 0 = no limit.");
ABSL_FLAG(double, max_connection_age_grace_s,
          absl::ToDoubleSeconds(anchorserve::kDefaultServerConfig.max_connection_age_grace),
          "How long calls may still run on a connection closed for its age before they are "
          "cancelled; 0 = no limit.");
ABSL_FLAG(std::string, default_mode, "auto",
          "Mode of requests that leave config.mode unset: auto (dense where the anchor region "
          "alone is over half the causal entries, i.e. short sequences; anchor elsewhere), "
          "anchor or dense.");
ABSL_FLAG(double, default_theta, anchorserve::kDefaultServerConfig.defaults.theta,
          "Default difference threshold (nats); inf = dense, -inf = anchor region only.");
ABSL_FLAG(int32_t, default_block_size, anchorserve::kDefaultServerConfig.defaults.block_size,
          "Default pooling block B (query rows).");
ABSL_FLAG(int32_t, default_step, anchorserve::kDefaultServerConfig.defaults.step,
          "Default step s (blocks per group).");
ABSL_FLAG(int32_t, default_init_groups, anchorserve::kDefaultServerConfig.defaults.init_groups,
          "Default sink region n_init, in groups.");
ABSL_FLAG(std::string, model, "",
          "Hugging Face model folder (config.json + safetensors) served by Prefill; empty = Q/K/V "
          "attention only.");
ABSL_FLAG(int64_t, prefill_buffer_bytes, anchorserve::kDefaultServerConfig.prefill_buffer_bytes,
          "KV bytes of one Prefill that may wait to be sent; the prefill pauses above it.");
ABSL_FLAG(int64_t, prefill_memory_bytes, anchorserve::kDefaultServerConfig.prefill_memory_bytes,
          "Most engine workspace (beyond the weights) one Prefill may need; larger prompts get "
          "RESOURCE_EXHAUSTED before any work.");
ABSL_FLAG(int32_t, default_local_groups, anchorserve::kDefaultServerConfig.defaults.local_groups,
          "Default local region n_loc, in groups.");
ABSL_FLAG(double, default_mass_target, anchorserve::kDefaultServerConfig.defaults.mass_target,
          "Default mass target p in [0, 1]: each (head, group) keeps the smallest threshold whose "
          "estimated kept attention mass reaches p; 0 = off (fixed --default_theta). CPU backend "
          "only.");
ABSL_FLAG(double, default_mass_density_cap,
          anchorserve::kDefaultServerConfig.defaults.mass_density_cap,
          "Default mass density cap in (0, 1]: a group that would keep more than this fraction "
          "of its candidates keeps all of them.");
ABSL_FLAG(double, default_mass_min_theta, anchorserve::kDefaultServerConfig.defaults.mass_min_theta,
          "Default smallest threshold (nats) a mass target may choose; finite.");

namespace anchorserve {
namespace {

absl::Status FlagError(absl::string_view flag, absl::string_view requirement,
                       absl::string_view got) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, " ", requirement, ", got ", got));
}

template <typename T>
absl::Status CheckRange(absl::string_view flag, T value, T lo, T hi) {
  if (value < lo || value > hi) {
    return FlagError(flag, absl::StrCat("must be in [", lo, ", ", hi, "]"), absl::StrCat(value));
  }
  return absl::OkStatus();
}

absl::StatusOr<BackendKind> ParseBackendKind(absl::string_view name) {
  if (name == "auto") return BackendKind::kAuto;
  if (name == "cpu") return BackendKind::kCpu;
  if (name == "cuda") return BackendKind::kCuda;
  return FlagError("backend", "must be one of auto, cpu, cuda", absl::StrCat("'", name, "'"));
}

absl::Status ValidateSecurity(const ServerConfig& config) {
  if (config.tls_cert_file.empty() != config.tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        "--tls_cert_file and --tls_key_file go together: set both (TLS) or neither (plaintext)");
  }
  if (!config.tls_client_ca_file.empty() && config.tls_cert_file.empty()) {
    return absl::InvalidArgumentError(
        "--tls_client_ca_file needs --tls_cert_file and --tls_key_file (mTLS is TLS first)");
  }
  if (auto s = CheckRange("max_inflight_per_caller", config.max_inflight_per_caller, 0, 1 << 20);
      !s.ok()) {
    return s;
  }
  if (config.max_inflight_per_caller > 0 && config.auth_token_file.empty()) {
    return absl::InvalidArgumentError(
        "--max_inflight_per_caller needs --auth_token_file (callers are token names)");
  }
  if (config.credential_reload_interval < absl::Seconds(1) ||
      config.credential_reload_interval > absl::Hours(24) ||
      config.credential_reload_interval !=
          absl::Trunc(config.credential_reload_interval, absl::Seconds(1))) {
    return FlagError("credential_reload_s", "must be a whole number of seconds in [1, 86400]",
                     absl::StrCat(absl::ToDoubleSeconds(config.credential_reload_interval)));
  }
  return absl::OkStatus();
}

// Longest delay or drain that still converts to absl::Duration and int milliseconds safely.
constexpr double kMaxSecondsKnob = 24.0 * 3600.0;

// A --*_s flag of seconds as a duration in [0, kMaxSecondsKnob], to the millisecond.
absl::StatusOr<absl::Duration> SecondsFlag(absl::string_view flag, double seconds) {
  if (!std::isfinite(seconds) || seconds < 0 || seconds > kMaxSecondsKnob) {
    return FlagError(flag, absl::StrCat("must be in [0, ", kMaxSecondsKnob, "]"),
                     absl::StrCat(seconds));
  }
  return absl::Milliseconds(std::llround(seconds * 1e3));
}

// A --*_ms flag of milliseconds as a duration in [0, kMaxSecondsKnob], to the microsecond.
absl::StatusOr<absl::Duration> MillisecondsFlag(absl::string_view flag, double milliseconds) {
  if (!std::isfinite(milliseconds) || milliseconds < 0 || milliseconds > kMaxSecondsKnob * 1e3) {
    return FlagError(flag, absl::StrCat("must be in [0, ", kMaxSecondsKnob * 1e3, "]"),
                     absl::StrCat(milliseconds));
  }
  return absl::Microseconds(std::llround(milliseconds * 1e3));
}

}  // namespace

absl::string_view BackendKindName(BackendKind kind) {
  switch (kind) {
    case BackendKind::kAuto:
      return "auto";
    case BackendKind::kCpu:
      return "cpu";
    case BackendKind::kCuda:
      return "cuda";
  }
  return "unknown";
}

const std::string& ServerConfig::MetricsHost() const {
  return metrics_host.empty() ? host : metrics_host;
}

std::string JoinHostPort(absl::string_view host, int port) {
  if (absl::StrContains(host, ':') && !absl::StartsWith(host, "[")) {
    return absl::StrCat("[", host, "]:", port);
  }
  return absl::StrCat(host, ":", port);
}

absl::Status ServerConfig::Validate() const {
  if (host.empty()) return FlagError("host", "must not be empty", "''");
  if (metrics_host.find_first_of(" \t/") != std::string::npos) {
    return FlagError("metrics_host", "must be an address or host name",
                     absl::StrCat("'", metrics_host, "'"));
  }
  if (auto s = CheckRange("grpc_port", grpc_port, 0, 65535); !s.ok()) return s;
  if (auto s = CheckRange("metrics_port", metrics_port, -1, 65535); !s.ok()) return s;
  if (grpc_port != 0 && grpc_port == metrics_port) {
    return FlagError("metrics_port", "must differ from --grpc_port", absl::StrCat(metrics_port));
  }
  if (auto s = ValidateSecurity(*this); !s.ok()) return s;
  if (auto s = CheckRange("cpu_threads", backend.cpu_threads, 0, 4096); !s.ok()) return s;
  if (auto s = CheckRange("cuda_device", backend.cuda_device, 0, 1023); !s.ok()) return s;

  if (auto s = CheckRange("max_batch_requests", max_batch_requests, 1, 65536); !s.ok()) return s;
  if (auto s = CheckRange<int64_t>("max_batch_tokens", max_batch_tokens, 1,
                                   std::numeric_limits<int32_t>::max());
      !s.ok()) {
    return s;
  }
  if (max_queue_delay < absl::ZeroDuration() || max_queue_delay > absl::Seconds(kMaxSecondsKnob)) {
    return FlagError("max_queue_delay_ms",
                     absl::StrCat("must be in [0, ", kMaxSecondsKnob * 1e3, "]"),
                     absl::StrCat(absl::ToDoubleMilliseconds(max_queue_delay)));
  }
  if (auto s = CheckRange("max_queue_size", max_queue_size, 1, 1 << 20); !s.ok()) return s;
  if (max_queue_time < absl::ZeroDuration() || max_queue_time > absl::Seconds(kMaxSecondsKnob)) {
    return FlagError("max_queue_time_ms",
                     absl::StrCat("must be in [0, ", kMaxSecondsKnob * 1e3, "]"),
                     absl::StrCat(absl::ToDoubleMilliseconds(max_queue_time)));
  }
  if (auto s = CheckRange<int64_t>("max_inflight_bytes", max_inflight_bytes, 0, int64_t{1} << 50);
      !s.ok()) {
    return s;
  }
  if (upload_stall_timeout <= absl::ZeroDuration() ||
      upload_stall_timeout > absl::Seconds(kMaxSecondsKnob)) {
    return FlagError("upload_stall_timeout_s",
                     absl::StrCat("must be in (0, ", kMaxSecondsKnob, "]"),
                     absl::StrCat(absl::ToDoubleSeconds(upload_stall_timeout)));
  }

  // The stream chunk, the header and the metrics message must each fit one message.
  if (auto s = CheckRange<int64_t>("max_message_bytes", max_message_bytes,
                                   4 * kMessageOverheadBytes, kMaxGrpcMessageBytes);
      !s.ok()) {
    return s;
  }
  if (auto s = CheckRange<int64_t>("max_request_bytes", max_request_bytes, 1,
                                   std::numeric_limits<int64_t>::max() / 4);
      !s.ok()) {
    return s;
  }
  if (auto s = CheckRange<int64_t>("max_seq_len", max_seq_len, 1, int64_t{1} << 32); !s.ok()) {
    return s;
  }
  if (auto s = CheckRange("max_heads", max_heads, 1, 1 << 16); !s.ok()) return s;
  if (auto s = CheckRange<int64_t>("stream_chunk_bytes", stream_chunk_bytes, 1,
                                   max_message_bytes - kMessageOverheadBytes);
      !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        s.message(), " (a chunk plus its framing must fit --max_message_bytes=", max_message_bytes,
        ")"));
  }
  if (auto s =
          CheckRange<int64_t>("prefill_buffer_bytes", prefill_buffer_bytes, 1, int64_t{1} << 40);
      !s.ok()) {
    return s;
  }
  if (auto s =
          CheckRange<int64_t>("prefill_memory_bytes", prefill_memory_bytes, 1, int64_t{1} << 50);
      !s.ok()) {
    return s;
  }
  if (drain_timeout < absl::ZeroDuration() || drain_timeout > absl::Seconds(kMaxSecondsKnob)) {
    return FlagError("drain_timeout_s", absl::StrCat("must be in [0, ", kMaxSecondsKnob, "]"),
                     absl::StrCat(absl::ToDoubleSeconds(drain_timeout)));
  }

  if (max_connection_age < absl::ZeroDuration() ||
      max_connection_age > absl::Seconds(kMaxSecondsKnob)) {
    return FlagError("max_connection_age_s", absl::StrCat("must be in [0, ", kMaxSecondsKnob, "]"),
                     absl::StrCat(absl::ToDoubleSeconds(max_connection_age)));
  }
  if (max_connection_age > absl::ZeroDuration() && max_connection_age < absl::Seconds(1)) {
    return FlagError("max_connection_age_s", "must be 0 (no limit) or at least 1",
                     absl::StrCat(absl::ToDoubleSeconds(max_connection_age)));
  }
  if (max_connection_age_grace < absl::ZeroDuration() ||
      max_connection_age_grace > absl::Seconds(kMaxSecondsKnob)) {
    return FlagError("max_connection_age_grace_s",
                     absl::StrCat("must be in [0, ", kMaxSecondsKnob, "]"),
                     absl::StrCat(absl::ToDoubleSeconds(max_connection_age_grace)));
  }

  // The defaults, named by their flags; ValidateAnchorConfig below stays the backstop.
  if (std::isnan(defaults.theta)) return FlagError("default_theta", "must not be NaN", "nan");
  if (auto s = CheckRange("default_block_size", defaults.block_size, 1, kMaxBlockSize); !s.ok()) {
    return s;
  }
  if (auto s = CheckRange("default_step", defaults.step, 1, kMaxStep); !s.ok()) return s;
  if (auto s = CheckRange("default_init_groups", defaults.init_groups, 0, kMaxRegionGroups);
      !s.ok()) {
    return s;
  }
  if (auto s = CheckRange("default_local_groups", defaults.local_groups, 1, kMaxRegionGroups);
      !s.ok()) {
    return s;
  }
  // Written so that NaN fails too.
  if (!(defaults.mass_target >= 0.0f && defaults.mass_target <= 1.0f)) {
    return FlagError("default_mass_target", "must be in [0, 1] (0 = off)",
                     absl::StrCat(defaults.mass_target));
  }
  if (!(defaults.mass_density_cap > 0.0f && defaults.mass_density_cap <= 1.0f)) {
    return FlagError("default_mass_density_cap", "must be in (0, 1]",
                     absl::StrCat(defaults.mass_density_cap));
  }
  if (!std::isfinite(defaults.mass_min_theta)) {
    return FlagError("default_mass_min_theta", "must be finite",
                     absl::StrCat(defaults.mass_min_theta));
  }
  if (absl::Status s = ValidateAnchorConfig(defaults); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--default_* flags: ", s.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<ServerConfig> ServerConfigFromFlags() {
  ServerConfig config;
  config.host = absl::GetFlag(FLAGS_host);
  config.grpc_port = absl::GetFlag(FLAGS_grpc_port);
  config.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  config.port_file = absl::GetFlag(FLAGS_port_file);
  config.metrics_host = absl::GetFlag(FLAGS_metrics_host);
  config.reflection = absl::GetFlag(FLAGS_reflection);
  config.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  config.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  config.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca_file);
  config.auth_token_file = absl::GetFlag(FLAGS_auth_token_file);
  config.max_inflight_per_caller = absl::GetFlag(FLAGS_max_inflight_per_caller);
  const double reload_s = absl::GetFlag(FLAGS_credential_reload_s);
  if (!std::isfinite(reload_s) || reload_s < 1 || reload_s > 86400 ||
      reload_s != std::floor(reload_s)) {
    return FlagError("credential_reload_s", "must be a whole number of seconds in [1, 86400]",
                     absl::StrCat(reload_s));
  }
  config.credential_reload_interval = absl::Seconds(static_cast<int64_t>(reload_s));

  absl::StatusOr<BackendKind> kind = ParseBackendKind(absl::GetFlag(FLAGS_backend));
  if (!kind.ok()) return kind.status();
  config.backend.kind = *kind;
  config.backend.cpu_threads = absl::GetFlag(FLAGS_cpu_threads);
  config.backend.cuda_device = absl::GetFlag(FLAGS_cuda_device);

  config.max_batch_requests = absl::GetFlag(FLAGS_max_batch_requests);
  config.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  absl::StatusOr<absl::Duration> delay =
      MillisecondsFlag("max_queue_delay_ms", absl::GetFlag(FLAGS_max_queue_delay_ms));
  if (!delay.ok()) return delay.status();
  config.max_queue_delay = *delay;
  config.max_queue_size = absl::GetFlag(FLAGS_max_queue_size);
  absl::StatusOr<absl::Duration> queue_time =
      MillisecondsFlag("max_queue_time_ms", absl::GetFlag(FLAGS_max_queue_time_ms));
  if (!queue_time.ok()) return queue_time.status();
  config.max_queue_time = *queue_time;
  config.max_inflight_bytes = absl::GetFlag(FLAGS_max_inflight_bytes);
  // Zero passes here and is refused by Validate (a stall timeout must be positive).
  absl::StatusOr<absl::Duration> stall =
      SecondsFlag("upload_stall_timeout_s", absl::GetFlag(FLAGS_upload_stall_timeout_s));
  if (!stall.ok()) return stall.status();
  config.upload_stall_timeout = *stall;
  config.pin_host_buffers = absl::GetFlag(FLAGS_pin_host_buffers);

  config.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  config.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  config.max_seq_len = absl::GetFlag(FLAGS_max_seq_len);
  config.max_heads = absl::GetFlag(FLAGS_max_heads);
  config.stream_chunk_bytes = absl::GetFlag(FLAGS_stream_chunk_bytes);
  config.model_dir = absl::GetFlag(FLAGS_model);
  config.prefill_buffer_bytes = absl::GetFlag(FLAGS_prefill_buffer_bytes);
  config.prefill_memory_bytes = absl::GetFlag(FLAGS_prefill_memory_bytes);

  absl::StatusOr<absl::Duration> drain =
      SecondsFlag("drain_timeout_s", absl::GetFlag(FLAGS_drain_timeout_s));
  if (!drain.ok()) return drain.status();
  config.drain_timeout = *drain;
  absl::StatusOr<absl::Duration> age =
      SecondsFlag("max_connection_age_s", absl::GetFlag(FLAGS_max_connection_age_s));
  if (!age.ok()) return age.status();
  config.max_connection_age = *age;
  absl::StatusOr<absl::Duration> age_grace =
      SecondsFlag("max_connection_age_grace_s", absl::GetFlag(FLAGS_max_connection_age_grace_s));
  if (!age_grace.ok()) return age_grace.status();
  config.max_connection_age_grace = *age_grace;

  const std::string mode = absl::GetFlag(FLAGS_default_mode);
  if (mode == "auto") {
    config.defaults.mode = AttentionMode::kAuto;
  } else if (mode == "anchor") {
    config.defaults.mode = AttentionMode::kAnchor;
  } else if (mode == "dense") {
    config.defaults.mode = AttentionMode::kDense;
  } else {
    return FlagError("default_mode", "must be auto, anchor or dense", mode);
  }
  const double theta = absl::GetFlag(FLAGS_default_theta);
  if (std::isnan(theta)) return FlagError("default_theta", "must not be NaN", "nan");
  config.defaults.theta = static_cast<float>(theta);  // +-inf stay infinite
  config.defaults.block_size = absl::GetFlag(FLAGS_default_block_size);
  config.defaults.step = absl::GetFlag(FLAGS_default_step);
  config.defaults.init_groups = absl::GetFlag(FLAGS_default_init_groups);
  config.defaults.local_groups = absl::GetFlag(FLAGS_default_local_groups);
  // Narrowed to float; out-of-range values (NaN, +-inf, beyond float) fail in Validate.
  config.defaults.mass_target = static_cast<float>(absl::GetFlag(FLAGS_default_mass_target));
  config.defaults.mass_density_cap =
      static_cast<float>(absl::GetFlag(FLAGS_default_mass_density_cap));
  config.defaults.mass_min_theta = static_cast<float>(absl::GetFlag(FLAGS_default_mass_min_theta));

  if (absl::Status status = config.Validate(); !status.ok()) return status;
  return config;
}

}  // namespace anchorserve
