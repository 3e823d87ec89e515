// Credentials of the gRPC port: plaintext, TLS (--tls_cert_file/--tls_key_file, certificates
// re-read when the files change) or mTLS (--tls_client_ca_file), with the bearer-token check of
// --auth_token_file installed as the port's auth metadata processor.
//
// Why a processor on the credentials: it runs in gRPC core for every call before any handler,
// so an unauthenticated call to our services or to reflection fails with UNAUTHENTICATED and
// no handler sees it. gRPC C++ only lets a processor onto secure credentials
// (InsecureServerCredentials() aborts on SetAuthMetadataProcessor), and server interceptors
// cannot fail a call with a status of their choice; core's insecure credentials do carry a
// processor, so the credentials here are built with gRPC's C API, for plaintext and TLS alike.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "grpcpp/security/server_credentials.h"
#include "server/auth_tokens.h"
#include "server/metrics.h"
#include "server/server_config.h"

namespace anchorserve {

// The path prefix that needs no token: orchestrator probes carry none.
inline constexpr char kUnauthenticatedPathPrefix[] = "/grpc.health.v1.Health/";

// `tokens` null: no token check. Both pointers must outlive the credentials (and the server
// they listen for). INVALID_ARGUMENT naming the flag when a TLS file cannot be read or holds no
// PEM block.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const ServerConfig& config, const TokenStore* tokens, MetricsRegistry* metrics);

}  // namespace anchorserve
