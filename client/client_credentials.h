// What a client needs to reach a server started with TLS (--tls_cert_file), mTLS
// (--tls_client_ca_file) or bearer tokens (--auth_token_file): channel credentials from PEM
// files and an interceptor that puts "authorization: Bearer <token>" on every call.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/client_interceptor.h"

namespace anchorserve {

struct TlsFiles {
  std::string ca_file;    // PEM roots that signed the server's certificate; empty: system roots
  std::string cert_file;  // client certificate chain (mTLS); with key_file
  std::string key_file;   // client private key (mTLS); with cert_file
};

// TLS channel credentials from the files. INVALID_ARGUMENT naming the field (ca_file,
// cert_file, key_file) when a file cannot be read, or when only one of cert/key is set.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> TlsChannelCredentials(
    const TlsFiles& files);

// The token in a token file: its first non-empty line, surrounding whitespace removed.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// INVALID_ARGUMENT unless `token` is non-empty printable ASCII without spaces.
absl::Status CheckBearerToken(absl::string_view token);

// The interceptor factory that adds "authorization: Bearer <token>" to every call of a channel
// (plaintext channels too, where gRPC's call credentials are never sent).
std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface> BearerTokenInterceptor(
    std::string token);

}  // namespace anchorserve
