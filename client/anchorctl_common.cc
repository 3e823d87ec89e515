#include "client/anchorctl_common.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "client/client_credentials.h"

// Connection.
ABSL_FLAG(std::string, target, "127.0.0.1:50051",
          "the server: HOST:PORT, dns:///NAME:PORT (every address of NAME, e.g. a headless "
          "Service) or a list IP:PORT,IP:PORT,... ([IPv6]:PORT); requests are balanced "
          "round-robin over the replicas and retried on another one when refused (UNAVAILABLE)");
ABSL_FLAG(double, deadline_s, 600, "deadline of each call, in seconds");
ABSL_FLAG(int64_t, stream_chunk_bytes, int64_t{4} << 20,
          "bytes of Q/K/V per message when streaming");
ABSL_FLAG(int32_t, stream_attempts, 3,
          "tries of a streamed call (AttendStream, Prefill) that fails with UNAVAILABLE before any "
          "response arrived, e.g. on a replica that began draining (1 = no retry)");

// Security (the server's --tls_* and --auth_token_file).
ABSL_FLAG(std::string, tls_ca_file, "",
          "PEM CA certificates that signed the server's certificate; set (or --tls_cert_file) to "
          "connect with TLS");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM client certificate chain for mTLS (with --tls_key_file)");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file");
ABSL_FLAG(std::string, tls_server_name, "",
          "name the server's certificate must carry when the --target host is not it");
ABSL_FLAG(std::string, token_file, "",
          "file holding the bearer token sent as 'authorization: Bearer <token>'; empty: the "
          "ANCHOR_TOKEN environment variable, if set");

// Config; unset flags take the server's defaults (see `anchorctl info`).
ABSL_FLAG(std::string, mode, "",
          "auto (dense for short sequences, anchor elsewhere) | anchor (sparse AnchorAttention) | "
          "dense (exact); empty = the server's default (auto unless --default_mode says "
          "otherwise)");
ABSL_FLAG(
    std::optional<double>, theta, std::nullopt,
    "difference threshold in nats; inf = dense, -inf = anchor region only (unset: server default)");
ABSL_FLAG(std::optional<int32_t>, block_size, std::nullopt,
          "B: query rows per pooled query (unset: server default)");
ABSL_FLAG(std::optional<int32_t>, step, std::nullopt,
          "s: blocks per group (unset: server default)");
ABSL_FLAG(std::optional<int32_t>, init_groups, std::nullopt,
          "n_init: sink groups (unset: server default)");
ABSL_FLAG(std::optional<int32_t>, local_groups, std::nullopt,
          "n_loc: local groups, own group = 1 (unset: server default)");
ABSL_FLAG(std::optional<double>, softmax_scale, std::nullopt, "softmax scale (unset: 1/sqrt(d))");
ABSL_FLAG(std::optional<double>, mass_target, std::nullopt,
          "p in [0, 1]: per (head, group) the smallest threshold whose estimated kept attention "
          "mass reaches p, instead of a fixed --theta; 0 = off (unset: server default; cpu "
          "backend only)");
ABSL_FLAG(std::optional<double>, mass_density_cap, std::nullopt,
          "(0, 1]: a group that would keep more than this fraction of its candidates keeps all "
          "of them (unset: server default)");
ABSL_FLAG(std::optional<double>, mass_min_theta, std::nullopt,
          "smallest threshold in nats a mass target may choose (unset: server default)");

// Requests.
ABSL_FLAG(uint64_t, seed, 1, "seed of the generated inputs (attend, load) and of --random_ids");
ABSL_FLAG(std::string, request_id, "", "request id (the server makes one up when empty)");

namespace anchorserve::cli {

void PrintError(const absl::Status& status) {
  std::fprintf(stderr, "anchorctl: %s\n", std::string(status.message()).c_str());
}

std::string FormatBytes(int64_t bytes) {
  if (bytes >= (int64_t{1} << 30)) return absl::StrFormat("%.2f GiB", bytes / 1073741824.0);
  if (bytes >= (int64_t{1} << 20)) return absl::StrFormat("%.2f MiB", bytes / 1048576.0);
  if (bytes >= (int64_t{1} << 10)) return absl::StrFormat("%.2f KiB", bytes / 1024.0);
  return absl::StrCat(bytes, " B");
}

std::string FormatMs(double seconds) { return absl::StrFormat("%.3f ms", seconds * 1e3); }

std::string DescribeConfig(const v1::AnchorConfig& config) {
  std::vector<std::string> parts;
  switch (config.mode()) {
    case v1::ATTENTION_MODE_ANCHOR:
      parts.push_back("mode=anchor");
      break;
    case v1::ATTENTION_MODE_DENSE:
      parts.push_back("mode=dense");
      break;
    case v1::ATTENTION_MODE_AUTO:
      parts.push_back("mode=auto");
      break;
    default:
      parts.push_back("mode=server default");
      break;
  }
  if (config.has_theta()) parts.push_back(absl::StrCat("theta=", config.theta()));
  if (config.has_block_size()) parts.push_back(absl::StrCat("block_size=", config.block_size()));
  if (config.has_step()) parts.push_back(absl::StrCat("step=", config.step()));
  if (config.has_init_groups()) parts.push_back(absl::StrCat("init_groups=", config.init_groups()));
  if (config.has_local_groups()) {
    parts.push_back(absl::StrCat("local_groups=", config.local_groups()));
  }
  if (config.has_softmax_scale()) {
    parts.push_back(absl::StrCat("softmax_scale=", config.softmax_scale(),
                                 config.softmax_scale() == 0 ? " (1/sqrt(d))" : ""));
  }
  if (config.has_mass_target()) {
    parts.push_back(absl::StrCat("mass_target=", config.mass_target(),
                                 config.mass_target() == 0 ? " (off)" : ""));
  }
  // The cap and the floor mean nothing while the target is off.
  const bool mass_off = config.has_mass_target() && config.mass_target() == 0;
  if (config.has_mass_density_cap() && !mass_off) {
    parts.push_back(absl::StrCat("mass_density_cap=", config.mass_density_cap()));
  }
  if (config.has_mass_min_theta() && !mass_off) {
    parts.push_back(absl::StrCat("mass_min_theta=", config.mass_min_theta()));
  }
  return absl::StrJoin(parts, " ");
}

absl::StatusOr<ClientOptions> ClientOptionsFromFlags() {
  const double deadline_s = absl::GetFlag(FLAGS_deadline_s);
  if (!(deadline_s > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--deadline_s must be positive, got ", deadline_s));
  }
  ClientOptions options;
  options.default_deadline = absl::Seconds(deadline_s);
  options.stream_chunk_bytes = absl::GetFlag(FLAGS_stream_chunk_bytes);
  if (options.stream_chunk_bytes <= 0 || options.stream_chunk_bytes > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--stream_chunk_bytes must be in [1, 1 GiB], got ", options.stream_chunk_bytes));
  }
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      ChannelCredentialsFromFlags();
  if (!credentials.ok()) return credentials.status();
  options.channel_credentials = *std::move(credentials);
  options.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  if (!options.tls_server_name.empty() && options.channel_credentials == nullptr) {
    return absl::InvalidArgumentError("--tls_server_name needs --tls_ca_file (TLS)");
  }
  absl::StatusOr<std::string> token = BearerTokenFromFlags();
  if (!token.ok()) return token.status();
  options.bearer_token = *std::move(token);
  return options;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFromFlags() {
  TlsFiles files;
  files.ca_file = absl::GetFlag(FLAGS_tls_ca_file);
  files.cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  files.key_file = absl::GetFlag(FLAGS_tls_key_file);
  if (files.ca_file.empty() && files.cert_file.empty() && files.key_file.empty()) {
    return std::shared_ptr<grpc::ChannelCredentials>();  // plaintext
  }
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      TlsChannelCredentials(files);
  if (!credentials.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--tls_ca_file/--tls_cert_file/--tls_key_file: ",
                                                   credentials.status().message()));
  }
  return credentials;
}

absl::StatusOr<std::string> BearerTokenFromFlags() {
  const std::string path = absl::GetFlag(FLAGS_token_file);
  if (!path.empty()) {
    absl::StatusOr<std::string> token = ReadTokenFile(path);
    if (!token.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--token_file: ", token.status().message()));
    }
    return token;
  }
  const char* env = std::getenv("ANCHOR_TOKEN");
  if (env == nullptr || *env == '\0') return std::string();
  std::string token(absl::StripAsciiWhitespace(env));
  if (absl::Status status = CheckBearerToken(token); !status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("ANCHOR_TOKEN: ", status.message()));
  }
  return token;
}

absl::StatusOr<std::unique_ptr<AttentionClient>> MakeClient() {
  absl::StatusOr<ClientOptions> options = ClientOptionsFromFlags();
  if (!options.ok()) return options.status();
  return AttentionClient::Create(absl::GetFlag(FLAGS_target), *options);
}

absl::StatusOr<WholeCallRetry> StreamRetryFromFlags() {
  WholeCallRetry retry;
  retry.max_attempts = absl::GetFlag(FLAGS_stream_attempts);
  if (retry.max_attempts < 1 || retry.max_attempts > 100) {
    return absl::InvalidArgumentError(
        absl::StrCat("--stream_attempts must be in [1, 100], got ", retry.max_attempts));
  }
  return retry;
}

absl::StatusOr<v1::AnchorConfig> ConfigFromFlags() {
  v1::AnchorConfig config;
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode == "anchor") {
    config.set_mode(v1::ATTENTION_MODE_ANCHOR);
  } else if (mode == "dense") {
    config.set_mode(v1::ATTENTION_MODE_DENSE);
  } else if (mode == "auto") {
    config.set_mode(v1::ATTENTION_MODE_AUTO);
  } else if (!mode.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--mode must be auto, anchor or dense (or empty), got '", mode, "'"));
  }
  if (auto theta = absl::GetFlag(FLAGS_theta)) config.set_theta(*theta);
  if (auto block_size = absl::GetFlag(FLAGS_block_size)) config.set_block_size(*block_size);
  if (auto step = absl::GetFlag(FLAGS_step)) config.set_step(*step);
  if (auto init_groups = absl::GetFlag(FLAGS_init_groups)) config.set_init_groups(*init_groups);
  if (auto local_groups = absl::GetFlag(FLAGS_local_groups)) {
    config.set_local_groups(*local_groups);
  }
  if (auto scale = absl::GetFlag(FLAGS_softmax_scale)) config.set_softmax_scale(*scale);
  if (auto target = absl::GetFlag(FLAGS_mass_target)) config.set_mass_target(*target);
  if (auto cap = absl::GetFlag(FLAGS_mass_density_cap)) config.set_mass_density_cap(*cap);
  if (auto floor = absl::GetFlag(FLAGS_mass_min_theta)) config.set_mass_min_theta(*floor);
  return config;
}

}  // namespace anchorserve::cli
