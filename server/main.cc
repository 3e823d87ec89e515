// anchorserve: AnchorAttention prefill as a gRPC service.
//
// flags -> ServerConfig -> backend -> metrics exposer -> batcher -> gRPC server (health starts
// NOT_SERVING, SERVING once up) -> --port_file -> wait for SIGTERM/SIGINT -> drain -> exit 0.
// Exit codes: 2 invalid flags, 1 startup failure, 0 after a drain.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "kernels/backend.h"
#include "prometheus/exposer.h"
#include "server/attention_service.h"
#include "server/batcher.h"
#include "server/clock.h"
#include "server/executor.h"
#include "server/logging.h"
#include "server/metrics.h"
#include "server/server_config.h"

namespace anchorserve {
namespace {

// Waits for SIGTERM/SIGINT on its own thread (sigwait), so no work runs in a signal handler.
// The signals must be blocked in every thread: construct this before starting any other thread.
class SignalWaiter {
 public:
  SignalWaiter() {
    sigemptyset(&signals_);
    sigaddset(&signals_, SIGTERM);
    sigaddset(&signals_, SIGINT);
    pthread_sigmask(SIG_BLOCK, &signals_, nullptr);
    thread_ = std::thread([this] { Loop(); });
  }
  ~SignalWaiter() {
    stop_.store(true);
    thread_.join();
  }

  absl::Notification& received() { return received_; }
  int signal_number() const { return signal_number_.load(); }

 private:
  void Loop() {
    const timespec poll = {0, 200 * 1000 * 1000};  // to notice stop_
    while (!stop_.load()) {
      const int signal = sigtimedwait(&signals_, nullptr, &poll);
      if (signal <= 0) continue;
      if (received_.HasBeenNotified()) {
        LogInfo(absl::StrCat("signal ", signal, " received again; already draining"));
        continue;
      }
      signal_number_.store(signal);
      received_.Notify();
    }
  }

  sigset_t signals_;
  std::atomic<bool> stop_{false};
  std::atomic<int> signal_number_{0};
  absl::Notification received_;
  std::thread thread_;
};

// absl::ParseCommandLine exits with 1 on an unknown flag or an unparsable value; the contract asks
// for 2 and a message naming the flag, so "--name=value" arguments are checked here first. (The
// "--name value" form is left to absl.)
absl::Status PrecheckFlags(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--") break;  // the rest are positional
    if (!absl::ConsumePrefix(&arg, "-")) continue;
    absl::ConsumePrefix(&arg, "-");
    const size_t eq = arg.find('=');
    if (eq == absl::string_view::npos) continue;
    const absl::string_view name = arg.substr(0, eq);
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    std::string error;
    if (!flag->ParseFrom(arg.substr(eq + 1), &error)) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": ", error));
    }
  }
  return absl::OkStatus();
}

// Writes "grpc_port=N\nmetrics_port=M\n" to a temporary file and renames it into place.
absl::Status WritePortFile(const std::string& path, int grpc_port, int metrics_port) {
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << "grpc_port=" << grpc_port << "\nmetrics_port=" << metrics_port << "\n";
    out.close();
    if (!out) return absl::InternalError(absl::StrCat("cannot write --port_file temp ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat("cannot rename ", tmp, " to --port_file ", path));
  }
  return absl::OkStatus();
}

// After the drain timeout: time for cancelled work to come back before the process gives up.
constexpr absl::Duration kShutdownGrace = absl::Seconds(10);

int Run(const ServerConfig& config) {
  SignalWaiter signals;  // before any other thread starts

  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = CreateBackend(config.backend);
  if (!backend.ok()) {
    LogError(absl::StrCat("cannot create backend --backend=", BackendKindName(config.backend.kind),
                          ": ", backend.status().ToString()));
    return 1;
  }
  const BackendInfo info = (*backend)->Info();

  MetricsRegistry metrics;
  std::unique_ptr<prometheus::Exposer> exposer;
  const std::string metrics_address = JoinHostPort(config.host, config.metrics_port);
  try {
    // civetweb reports bind failures as exceptions; this is the one place they are caught.
    exposer = std::make_unique<prometheus::Exposer>(metrics_address);
  } catch (const std::exception& e) {
    LogError(absl::StrCat("cannot serve metrics on ", metrics_address,
                          " (--host/--metrics_port): ", e.what()));
    return 1;
  }
  exposer->RegisterCollectable(metrics.registry());
  const std::vector<int> metrics_ports = exposer->GetListeningPorts();
  const int metrics_port = metrics_ports.empty() ? config.metrics_port : metrics_ports.front();

  RealClock clock;
  BatchExecutor executor(backend->get());
  DynamicBatcher batcher(
      BatchLimits{config.max_batch_requests, config.max_batch_tokens, config.max_queue_delay},
      config.max_queue_size, &executor, &clock, &metrics);
  AttentionServiceImpl service(config, backend->get(), &batcher, &metrics, &clock);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string grpc_address = JoinHostPort(config.host, config.grpc_port);
  int grpc_port = 0;
  builder.AddListeningPort(grpc_address, grpc::InsecureServerCredentials(), &grpc_port);
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(config.max_message_bytes));
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || grpc_port == 0) {
    LogError(absl::StrCat("cannot serve gRPC on ", grpc_address, " (--host/--grpc_port)"));
    batcher.Stop();
    return 1;
  }
  // The health service exists only from BuildAndStart on, and by then the backend exists and
  // both servers listen: SERVING. (The named service is NOT_FOUND, i.e. not ready, before.)
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus(kAttentionServiceName, true);

  if (!config.port_file.empty()) {
    if (absl::Status status = WritePortFile(config.port_file, grpc_port, metrics_port);
        !status.ok()) {
      LogError(status.ToString());
      health->Shutdown();
      server->Shutdown(absl::ToChronoTime(absl::Now()));
      batcher.Stop();
      return 1;
    }
  }
  LogInfo(absl::StrCat("serving gRPC on ", JoinHostPort(config.host, grpc_port), ", metrics on ",
                       JoinHostPort(config.host, metrics_port), "/metrics, backend=", info.name,
                       " (", info.device, "), version ", ServerVersion()));

  signals.received().WaitForNotification();
  LogInfo(absl::StrCat("signal ", signals.signal_number(), ": draining (up to ",
                       absl::FormatDuration(config.drain_timeout), ")"));
  // Readiness first so that balancers move away, then refuse new calls, let the rest finish.
  health->SetServingStatus("", false);
  health->SetServingStatus(kAttentionServiceName, false);
  service.StartDraining();
  // Should a backend never give cancelled work back, do not hang past the pod's grace period.
  std::thread([limit = config.drain_timeout + 2 * kShutdownGrace] {
    absl::SleepFor(limit);
    LogError("shutdown did not finish in time; exiting without a clean drain");
    std::_Exit(1);
  }).detach();
  if (!service.WaitUntilIdle(absl::Now() + config.drain_timeout)) {
    LogWarning(absl::StrCat("drain timeout: cancelling ", service.InflightRpcs(),
                            " RPCs still in flight"));
    batcher.CancelAll();
  }
  // Waits for what is left (cancelled jobs come back with UNAVAILABLE), then cancels the rest
  // (e.g. uploads that stalled); returns once every call is done.
  server->Shutdown(absl::ToChronoTime(absl::Now() + kShutdownGrace));
  batcher.Stop();
  LogInfo("drained; exiting");
  return 0;
}

}  // namespace
}  // namespace anchorserve

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "AnchorAttention prefill as a gRPC service.\n"
      "  anchorserve --grpc_port=50051 --metrics_port=9464 --backend=auto");
  if (absl::Status status = anchorserve::PrecheckFlags(argc, argv); !status.ok()) {
    anchorserve::LogError(absl::StrCat("invalid flags: ", status.message()));
    return 2;
  }
  absl::ParseCommandLine(argc, argv);
  absl::StatusOr<anchorserve::ServerConfig> config = anchorserve::ServerConfigFromFlags();
  if (!config.ok()) {
    anchorserve::LogError(absl::StrCat("invalid flags: ", config.status().message()));
    return 2;
  }
  return anchorserve::Run(*config);
}
