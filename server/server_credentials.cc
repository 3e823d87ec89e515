#include "server/server_credentials.h"

#include <fstream>
#include <sstream>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "grpc/grpc.h"
#include "grpc/grpc_security.h"
#include "grpc/slice.h"
#include "server/logging.h"

namespace anchorserve {
namespace {

absl::string_view SliceView(const grpc_slice& slice) {
  return absl::string_view(reinterpret_cast<const char*>(GRPC_SLICE_START_PTR(slice)),
                           GRPC_SLICE_LENGTH(slice));
}

// What the processor needs; lives as long as the core credentials (destroyed by them).
struct TokenCheck {
  const TokenStore* tokens;
  MetricsRegistry* metrics;
  ThrottledLog log{absl::Seconds(1)};
};

// grpc_auth_metadata_processor::process: runs for every call on the port, before the handler.
void ProcessAuthMetadata(void* state, grpc_auth_context* /*context*/, const grpc_metadata* md,
                         size_t num_md, grpc_process_auth_metadata_done_cb done, void* user_data) {
  auto* check = static_cast<TokenCheck*>(state);
  absl::string_view path;
  absl::string_view authorization;
  bool has_authorization = false;
  for (size_t i = 0; i < num_md; ++i) {
    const absl::string_view key = SliceView(md[i].key);
    if (key == ":path") {
      path = SliceView(md[i].value);
    } else if (key == kAuthorizationKey) {
      authorization = SliceView(md[i].value);
      has_authorization = true;
    }
  }
  if (absl::StartsWith(path, kUnauthenticatedPathPrefix)) {
    done(user_data, nullptr, 0, nullptr, 0, GRPC_STATUS_OK, nullptr);
    return;
  }
  absl::StatusOr<std::string> caller =
      check->tokens->Authenticate(has_authorization, authorization);
  if (caller.ok()) {
    done(user_data, nullptr, 0, nullptr, 0, GRPC_STATUS_OK, nullptr);
    return;
  }
  check->metrics->CountUnauthenticated();
  check->log.Write(
      LogLevel::kWarning,
      absl::StrCat("refused ", path, " with UNAUTHENTICATED: ", caller.status().message()));
  const std::string message(caller.status().message());
  done(user_data, nullptr, 0, nullptr, 0, GRPC_STATUS_UNAUTHENTICATED, message.c_str());
}

void DestroyTokenCheck(void* state) { delete static_cast<TokenCheck*>(state); }

// A grpc::ServerCredentials around credentials made with the C API (the C++ factories give no
// access to theirs). Owns one reference.
class CoreServerCredentials final : public grpc::ServerCredentials {
 public:
  explicit CoreServerCredentials(grpc_server_credentials* credentials)
      : credentials_(credentials) {}
  ~CoreServerCredentials() override { grpc_server_credentials_release(credentials_); }
  CoreServerCredentials(const CoreServerCredentials&) = delete;
  CoreServerCredentials& operator=(const CoreServerCredentials&) = delete;

  // The token check is installed on the core credentials when they are made; a C++ processor
  // is never set on them (StartGrpcServer does not call this).
  void SetAuthMetadataProcessor(
      const std::shared_ptr<grpc::AuthMetadataProcessor>& /*processor*/) override {
    LogError("CoreServerCredentials: a C++ AuthMetadataProcessor is not supported; ignored");
  }

 private:
  int AddPortToServer(const std::string& address, grpc_server* server) override {
    return grpc_server_add_http2_port(server, address.c_str(), credentials_);
  }

  grpc_server_credentials* const credentials_;
};

// The file must be readable and hold a PEM block; the watcher would otherwise fail every
// handshake without a word at start.
absl::Status CheckPemFile(absl::string_view flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": cannot open"));
  std::ostringstream contents;
  contents << in.rdbuf();
  if (!absl::StrContains(contents.str(), "-----BEGIN ")) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, "=", path, ": no PEM block (-----BEGIN ...) in the file"));
  }
  return absl::OkStatus();
}

absl::StatusOr<grpc_server_credentials*> MakeTlsCredentials(const ServerConfig& config) {
  if (auto s = CheckPemFile("tls_cert_file", config.tls_cert_file); !s.ok()) return s;
  if (auto s = CheckPemFile("tls_key_file", config.tls_key_file); !s.ok()) return s;
  const bool mutual = !config.tls_client_ca_file.empty();
  if (mutual) {
    if (auto s = CheckPemFile("tls_client_ca_file", config.tls_client_ca_file); !s.ok()) return s;
  }
  // The watcher re-reads the files every interval and switches to a new key/cert pair once
  // both files agree; connections made after that use it, open ones keep theirs.
  grpc_tls_certificate_provider* provider = grpc_tls_certificate_provider_file_watcher_create(
      config.tls_key_file.c_str(), config.tls_cert_file.c_str(),
      mutual ? config.tls_client_ca_file.c_str() : nullptr,
      static_cast<unsigned int>(absl::ToInt64Seconds(config.credential_reload_interval)));
  if (provider == nullptr) {
    return absl::InvalidArgumentError(
        "cannot watch --tls_cert_file/--tls_key_file/--tls_client_ca_file");
  }
  grpc_tls_credentials_options* options = grpc_tls_credentials_options_create();
  grpc_tls_credentials_options_set_certificate_provider(options, provider);  // takes a ref
  grpc_tls_certificate_provider_release(provider);
  grpc_tls_credentials_options_watch_identity_key_cert_pairs(options);
  if (mutual) {
    grpc_tls_credentials_options_watch_root_certs(options);
    grpc_tls_credentials_options_set_cert_request_type(
        options, GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    grpc_tls_credentials_options_set_cert_request_type(options,
                                                       GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  grpc_server_credentials* credentials = grpc_tls_server_credentials_create(options);  // owns it
  if (credentials == nullptr) {
    return absl::InvalidArgumentError("cannot create TLS credentials from --tls_* files");
  }
  return credentials;
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const ServerConfig& config, const TokenStore* tokens, MetricsRegistry* metrics) {
  grpc_server_credentials* credentials = nullptr;
  if (config.tls_cert_file.empty()) {
    credentials = grpc_insecure_server_credentials_create();
  } else {
    absl::StatusOr<grpc_server_credentials*> tls = MakeTlsCredentials(config);
    if (!tls.ok()) return tls.status();
    credentials = *tls;
  }
  if (tokens != nullptr) {
    grpc_auth_metadata_processor processor;
    processor.process = &ProcessAuthMetadata;
    processor.destroy = &DestroyTokenCheck;
    processor.state = new TokenCheck{tokens, metrics};
    grpc_server_credentials_set_auth_metadata_processor(credentials, processor);
  }
  return std::make_shared<CoreServerCredentials>(credentials);
}

}  // namespace anchorserve
