// What the anchorctl subcommands share: the connection and config flags, exit codes, output
// formatting, and the subcommands defined outside anchorctl.cc.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/flags/declare.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "anchorserve/v1/anchorserve.pb.h"
#include "client/attention_client.h"
#include "client/channel_target.h"
#include "grpcpp/security/credentials.h"

// Connection.
ABSL_DECLARE_FLAG(std::string, target);
ABSL_DECLARE_FLAG(double, deadline_s);
ABSL_DECLARE_FLAG(int64_t, stream_chunk_bytes);
// Security.
ABSL_DECLARE_FLAG(std::string, tls_ca_file);
ABSL_DECLARE_FLAG(std::string, tls_cert_file);
ABSL_DECLARE_FLAG(std::string, tls_key_file);
ABSL_DECLARE_FLAG(std::string, tls_server_name);
ABSL_DECLARE_FLAG(std::string, token_file);
ABSL_DECLARE_FLAG(int32_t, stream_attempts);
// Config (unset flags take the server's defaults).
ABSL_DECLARE_FLAG(std::string, mode);
ABSL_DECLARE_FLAG(std::optional<double>, theta);
ABSL_DECLARE_FLAG(std::optional<int32_t>, block_size);
ABSL_DECLARE_FLAG(std::optional<int32_t>, step);
ABSL_DECLARE_FLAG(std::optional<int32_t>, init_groups);
ABSL_DECLARE_FLAG(std::optional<int32_t>, local_groups);
ABSL_DECLARE_FLAG(std::optional<double>, softmax_scale);
ABSL_DECLARE_FLAG(std::optional<double>, mass_target);
ABSL_DECLARE_FLAG(std::optional<double>, mass_density_cap);
ABSL_DECLARE_FLAG(std::optional<double>, mass_min_theta);
// Requests.
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(std::string, request_id);

namespace anchorserve::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;
inline constexpr int kExitUsage = 2;

// "anchorctl: MESSAGE" on stderr.
void PrintError(const absl::Status& status);

std::string FormatBytes(int64_t bytes);  // "1.50 MiB"
std::string FormatMs(double seconds);    // "12.345 ms"

// "mode=anchor theta=12 block_size=64 ...": the fields that are set (mass_density_cap and
// mass_min_theta left out when mass_target is set to 0, i.e. off).
std::string DescribeConfig(const v1::AnchorConfig& config);

// Client options from --deadline_s, --stream_chunk_bytes and the security flags below.
absl::StatusOr<ClientOptions> ClientOptionsFromFlags();

// TLS credentials from --tls_ca_file, --tls_cert_file and --tls_key_file; null (plaintext) when
// none is set.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFromFlags();

// The bearer token of --token_file, else of the ANCHOR_TOKEN environment variable; empty when
// neither is set.
absl::StatusOr<std::string> BearerTokenFromFlags();
absl::StatusOr<std::unique_ptr<AttentionClient>> MakeClient();

// --stream_attempts: whole-call retries of streamed calls (AttendStream, Prefill) that failed
// with UNAVAILABLE before a response reached anchorctl. gRPC retries the unary calls itself.
absl::StatusOr<WholeCallRetry> StreamRetryFromFlags();

// --mode, --theta, --block_size, --step, --init_groups, --local_groups, --softmax_scale,
// --mass_target, --mass_density_cap, --mass_min_theta (the server checks the values).
absl::StatusOr<v1::AnchorConfig> ConfigFromFlags();

// Subcommands of anchorctl_prefill.cc; each returns the exit code.
int RunPrefill();
int RunModel();

}  // namespace anchorserve::cli
