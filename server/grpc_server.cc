#include "server/grpc_server.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "grpc/grpc.h"  // GRPC_ARG_*
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/impl/server_builder_option.h"
#include "grpcpp/impl/server_builder_plugin.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "server/attention_service.h"

namespace anchorserve {
namespace {

// Channel arguments are int milliseconds.
int Milliseconds(absl::Duration duration) {
  const int64_t ms = absl::ToInt64Milliseconds(duration);
  return static_cast<int>(std::clamp<int64_t>(ms, 0, std::numeric_limits<int>::max()));
}

void ApplyKeepalive(const KeepaliveOptions& keepalive, grpc::ServerBuilder* builder) {
  // What clients may do.
  builder->AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                              Milliseconds(keepalive.min_client_ping_interval));
  builder->AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, keepalive.max_ping_strikes);
  // Also lets the server's own pings go out on connections without calls.
  builder->AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // What the server does. Without the last one the server would stop pinging an idle connection
  // after 2 pings, so a client that died later would hold it forever.
  builder->AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, Milliseconds(keepalive.ping_interval));
  builder->AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, Milliseconds(keepalive.ping_timeout));
  builder->AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
}

// Takes a builder plugin out by name. Plugins such as reflection register with every
// ServerBuilder of the process, so leaving one out of a server needs an option.
class WithoutPlugin final : public grpc::ServerBuilderOption {
 public:
  explicit WithoutPlugin(std::string name) : name_(std::move(name)) {}
  void UpdateArguments(grpc::ChannelArguments* /*args*/) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [this](const std::unique_ptr<grpc::ServerBuilderPlugin>& plugin) {
                                    return plugin->name() == name_;
                                  }),
                   plugins->end());
  }

 private:
  const std::string name_;
};

// grpc::reflection::ProtoServerReflectionPlugin::name().
constexpr char kReflectionPluginName[] = "proto_server_reflection";

// Clients balance over the addresses they resolved when they connected: a connection that ends
// now and then makes them resolve again and spread over the replicas there are now.
void ApplyConnectionAge(const ServerConfig& config, grpc::ServerBuilder* builder) {
  if (config.max_connection_age > absl::ZeroDuration()) {
    builder->AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS,
                                Milliseconds(config.max_connection_age));
  }
  if (config.max_connection_age_grace > absl::ZeroDuration()) {
    builder->AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                                Milliseconds(config.max_connection_age_grace));
  }
}

}  // namespace

absl::StatusOr<StartedGrpcServer> StartGrpcServer(
    const ServerConfig& config, absl::Span<grpc::Service* const> services,
    const KeepaliveOptions& keepalive, std::shared_ptr<grpc::ServerCredentials> credentials) {
  // Process-wide switch, read by the builder below.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  const std::string address = JoinHostPort(config.host, config.grpc_port);
  StartedGrpcServer started;
  if (credentials == nullptr) credentials = grpc::InsecureServerCredentials();
  builder.AddListeningPort(address, credentials, &started.port);
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(config.max_message_bytes));
  ApplyKeepalive(keepalive, &builder);
  ApplyConnectionAge(config, &builder);
  for (grpc::Service* service : services) builder.RegisterService(service);
  if (!config.reflection) builder.SetOption(std::make_unique<WithoutPlugin>(kReflectionPluginName));
  started.server = builder.BuildAndStart();
  if (started.server == nullptr || started.port == 0) {
    if (started.server != nullptr) started.server->Shutdown(absl::ToChronoTime(absl::Now()));
    return absl::UnavailableError(
        absl::StrCat("cannot serve gRPC on ", address, " (--host/--grpc_port)"));
  }
  // The health service exists from BuildAndStart on, with "" SERVING: turn it off at once.
  // (gRPC gives no hook between creating it and opening the port, so a client that completes a
  // connection within these few microseconds could still see "" SERVING.)
  SetServingHealth(*started.server, false);
  return started;
}

void SetServingHealth(grpc::Server& server, bool serving) {
  grpc::HealthCheckServiceInterface* health = server.GetHealthCheckService();
  if (health == nullptr) return;  // the default service is always on in StartGrpcServer
  health->SetServingStatus("", serving);
  health->SetServingStatus(kAttentionServiceName, serving);
}

GoawayNotice::GoawayNotice(grpc::Server& server)
    : queue_(grpc_completion_queue_create_for_next(nullptr)) {
  grpc_server_shutdown_and_notify(server.c_server(), queue_, this);
}

GoawayNotice::~GoawayNotice() {
  // Server::Shutdown has returned, so gRPC has posted our tag; the loop takes it and then the
  // queue's own shutdown event.
  grpc_completion_queue_shutdown(queue_);
  while (grpc_completion_queue_next(queue_, gpr_inf_future(GPR_CLOCK_REALTIME), nullptr).type !=
         GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(queue_);
}

}  // namespace anchorserve
