// The gRPC server around AttentionServiceImpl: listening port, message limits, HTTP/2 keepalive
// and connection age policy, the standard health service (which starts NOT_SERVING), and the
// GOAWAY that starts a drain.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "grpcpp/server.h"
#include "server/server_config.h"

struct grpc_completion_queue;

namespace grpc {
class Service;
class ServerCredentials;
}  // namespace grpc

namespace anchorserve {

// HTTP/2 pings. gRPC's defaults answer a client that pings more often than every 5 minutes (every
// 2 hours without calls) with GOAWAY "too_many_pings"; load tools (ghz --keepalive=30s), proxies
// and gRPC clients with keepalive set ping far more often, so the server allows it.
struct KeepaliveOptions {
  // Clients may ping this often, with or without calls in flight.
  absl::Duration min_client_ping_interval = absl::Seconds(10);
  // Pings sooner than that tolerated before GOAWAY (gRPC's default; 0 would tolerate any rate).
  int max_ping_strikes = 2;
  // The server pings each connection after this much silence, calls or not, and closes it when
  // the ack does not come within ping_timeout: dead clients (a vanished pod, a cut network) stop
  // holding connections and streams.
  absl::Duration ping_interval = absl::Seconds(60);
  absl::Duration ping_timeout = absl::Seconds(20);
};

struct StartedGrpcServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;  // the bound port (config.grpc_port, or the one picked for 0)
};

// Builds and starts a server on config.host:config.grpc_port with config.max_message_bytes both
// ways, `keepalive`, `services` registered and the default grpc.health.v1 service enabled. Both
// health names ("" and kAttentionServiceName) are NOT_SERVING when this returns; SetServingHealth
// flips them. The services must outlive the server. UNAVAILABLE (naming --host/--grpc_port) when
// the address cannot be bound. `credentials` (MakeServerCredentials) null: plaintext without a
// token check.
absl::StatusOr<StartedGrpcServer> StartGrpcServer(
    const ServerConfig& config, absl::Span<grpc::Service* const> services,
    const KeepaliveOptions& keepalive = {},
    std::shared_ptr<grpc::ServerCredentials> credentials = nullptr);

// Sets both health names ("" and kAttentionServiceName) to SERVING or NOT_SERVING.
void SetServingHealth(grpc::Server& server, bool serving);

// Starts gRPC's shutdown of `server` without waiting for it: the port stops listening and every
// connection gets GOAWAY, so clients send their next calls to other replicas at once (calls that
// crossed the GOAWAY are retried by the client's gRPC transparently), while the calls in flight
// go on. server.Shutdown() must still be called; it finishes the shutdown, and this object must
// be destroyed after it has returned.
class GoawayNotice {
 public:
  explicit GoawayNotice(grpc::Server& server);
  ~GoawayNotice();
  GoawayNotice(const GoawayNotice&) = delete;
  GoawayNotice& operator=(const GoawayNotice&) = delete;

 private:
  grpc_completion_queue* queue_;  // receives gRPC's "shutdown finished" event
};

}  // namespace anchorserve
