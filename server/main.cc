// anchorserve: AnchorAttention prefill as a gRPC service.
//
// flags -> ServerConfig -> metrics endpoint -> tokens and port credentials -> gRPC server listening
// (health NOT_SERVING, RPCs UNAVAILABLE "server is starting") -> backend -> batcher -> model and
// prefill engine (with --model) -> SERVING -> --port_file -> wait for SIGTERM/SIGINT -> drain
// (NOT_SERVING, new RPCs UNAVAILABLE, GOAWAY and the port closed, calls in flight finish) ->
// exit 0. Exit codes: 2 invalid flags (a bad token file or TLS file included) or an unusable
// --model, 1 startup failure, 0 after a drain.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpc/grpc.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/server.h"
#include "kernels/backend.h"
#include "model/model.h"
#include "model/prefill_engine_factory.h"
#include "proto/anchorserve/v1/tensor_wire.h"
#include "server/attention_executor.h"
#include "server/attention_service.h"
#include "server/auth_tokens.h"
#include "server/batcher.h"
#include "server/clock.h"
#include "server/grpc_server.h"
#include "server/logging.h"
#include "server/metrics.h"
#include "server/metrics_endpoint.h"
#include "server/prefill_job.h"
#include "server/prefill_service.h"
#include "server/reflection_v1.h"
#include "server/server_config.h"
#include "server/server_credentials.h"

namespace anchorserve {
namespace {

// Waits for SIGTERM/SIGINT on its own thread, so no work runs in a signal handler. The signals
// are blocked before the server starts any thread (every later thread inherits the mask) and
// read from a signalfd; threads that libraries such as OpenBLAS start before main keep them
// unblocked, so a handler that writes the signal number into a pipe covers a signal the kernel
// hands to one of those. (A handler alone is not enough under ThreadSanitizer, which runs it
// only when the receiving thread next enters an intercepted call.)
class SignalWaiter {
 public:
  SignalWaiter() {
    sigset_t drain_signals;
    sigemptyset(&drain_signals);
    sigaddset(&drain_signals, SIGTERM);
    sigaddset(&drain_signals, SIGINT);
    signal_fd_ = signalfd(-1, &drain_signals, SFD_CLOEXEC);
    if (signal_fd_ < 0 || pipe2(pipe_fds_, O_CLOEXEC) != 0) {
      LogError(
          "cannot create the signal descriptors; SIGTERM will end the process without a drain");
      return;
    }
    pthread_sigmask(SIG_BLOCK, &drain_signals, nullptr);
    write_fd_.store(pipe_fds_[1]);
    struct sigaction action {};
    action.sa_handler = &SignalWaiter::OnSignal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &action, nullptr);
    sigaction(SIGINT, &action, nullptr);
    thread_ = std::thread([this] { Loop(); });
  }
  ~SignalWaiter() {
    if (!thread_.joinable()) return;
    const char stop = 0;  // not a signal number: ours, not a request to drain
    while (write(pipe_fds_[1], &stop, 1) < 0 && errno == EINTR) {
    }
    thread_.join();
  }

  absl::Notification& received() { return received_; }
  int signal_number() const { return signal_number_.load(); }

 private:
  // Async-signal-safe: one byte into the pipe.
  static void OnSignal(int signal) {
    const int saved_errno = errno;
    const char byte = static_cast<char>(signal);
    const int fd = write_fd_.load();
    if (fd >= 0) (void)!write(fd, &byte, 1);
    errno = saved_errno;
  }

  // The next signal number, or 0 when the destructor asks the loop to end.
  int NextSignal() {
    while (true) {
      pollfd fds[2] = {{signal_fd_, POLLIN, 0}, {pipe_fds_[0], POLLIN, 0}};
      if (poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return 0;
      }
      if (fds[0].revents & POLLIN) {
        signalfd_siginfo info{};
        if (read(signal_fd_, &info, sizeof(info)) == sizeof(info)) {
          return static_cast<int>(info.ssi_signo);
        }
      }
      if (fds[1].revents & (POLLIN | POLLHUP)) {
        char byte = 0;
        const ssize_t got = read(pipe_fds_[0], &byte, 1);
        if (got < 0 && errno == EINTR) continue;
        return got == 1 ? byte : 0;
      }
    }
  }

  void Loop() {
    while (const int signal = NextSignal()) {
      if (received_.HasBeenNotified()) {
        LogInfo(absl::StrCat("signal ", signal, " received again; already draining"));
        continue;
      }
      signal_number_.store(signal);
      received_.Notify();
    }
  }

  static inline std::atomic<int> write_fd_{-1};
  int signal_fd_ = -1;
  int pipe_fds_[2] = {-1, -1};
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
  // One reference to gRPC's globals that is never given back: when the last server goes away the
  // process is about to exit, and gRPC 1.51's global teardown could wait up to 10 s for the TCP
  // backup poller (started when a large response filled a socket buffer) to finish its poll.
  grpc_init();

  MetricsRegistry metrics;
  // --metrics_port=-1: no endpoint (the registry still counts, nobody scrapes it).
  std::unique_ptr<MetricsEndpoint> metrics_endpoint;
  if (config.metrics_port >= 0) {
    absl::StatusOr<std::unique_ptr<MetricsEndpoint>> started =
        MetricsEndpoint::Start(config.MetricsHost(), config.metrics_port, metrics.registry());
    if (!started.ok()) {
      LogError(std::string(started.status().message()));
      return 1;
    }
    metrics_endpoint = *std::move(started);
  }
  const int metrics_port = metrics_endpoint != nullptr ? metrics_endpoint->port() : -1;

  // Tokens and credentials before the service and the server, which use them.
  std::unique_ptr<TokenStore> tokens;
  if (!config.auth_token_file.empty()) {
    absl::StatusOr<std::unique_ptr<TokenStore>> opened =
        TokenStore::Open(config.auth_token_file, config.credential_reload_interval);
    if (!opened.ok()) {
      LogError(absl::StrCat("invalid flags: ", opened.status().message()));
      return 2;
    }
    tokens = *std::move(opened);
  }
  CallerGate callers(tokens.get(), config.max_inflight_per_caller);
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      MakeServerCredentials(config, tokens.get(), &metrics);
  if (!credentials.ok()) {
    LogError(absl::StrCat("invalid flags: ", credentials.status().message()));
    return 2;
  }

  // Created once the port listens; declared before the service and the server, which use them,
  // so that they outlive both.
  std::unique_ptr<AttentionBackend> backend;
  std::unique_ptr<AttentionExecutor> executor;
  std::unique_ptr<DynamicBatcher> batcher;
  std::unique_ptr<Model> model;
  std::unique_ptr<PrefillEngine> prefill_engine;
  std::unique_ptr<PrefillRunner> prefill_runner;
  std::unique_ptr<DynamicBatcher> prefill_batcher;
  RealClock clock;
  AttentionServiceImpl service(config, &metrics, &clock, &callers);
  PrefillServiceImpl prefill_service(&service);
  auto stop_batchers = [&] {
    if (batcher != nullptr) batcher->Stop();
    if (prefill_batcher != nullptr) prefill_batcher->Stop();
  };

  // Reflection in both versions: v1alpha from gRPC's plugin (registered with every ServerBuilder of
  // the process, as linking the library alone does too; StartGrpcServer takes it out again for
  // --reflection=false), v1 our own over the same descriptors.
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  ReflectionV1Service reflection_v1({kAttentionServiceName, v1::PrefillService::service_full_name(),
                                     kHealthServiceName, kReflectionV1ServiceName,
                                     kReflectionV1AlphaServiceName});

  // Listen first, NOT_SERVING: probes and clients get answers (UNAVAILABLE "server is starting")
  // rather than a closed port while the backend comes up, which may take seconds on a GPU.
  std::vector<grpc::Service*> grpc_services = {&service, &prefill_service};
  if (config.reflection) grpc_services.push_back(&reflection_v1);
  absl::StatusOr<StartedGrpcServer> grpc_server =
      StartGrpcServer(config, grpc_services, KeepaliveOptions{}, *credentials);
  if (!grpc_server.ok()) {
    LogError(std::string(grpc_server.status().message()));
    return 1;
  }
  grpc::Server& server = *grpc_server->server;
  const std::string grpc_address = JoinHostPort(config.host, grpc_server->port);
  LogInfo(absl::StrCat(
      "listening on ", grpc_address, " (",
      config.tls_cert_file.empty()        ? "plaintext"
      : config.tls_client_ca_file.empty() ? "TLS"
                                          : "mTLS: client certificates required",
      config.auth_token_file.empty() ? ", no token check" : ", bearer tokens required",
      config.reflection ? "" : ", no reflection", "; NOT_SERVING until ready); creating the ",
      BackendKindName(config.backend.kind), " backend; memory budget ",
      service.memory_budget().limit(), " bytes (--max_inflight_bytes)"));

  BackendOptions backend_options = config.backend;
  std::string fallback_reason;
  backend_options.maybe_fallback_reason = &fallback_reason;
  absl::StatusOr<std::unique_ptr<AttentionBackend>> created = CreateBackend(backend_options);
  if (!fallback_reason.empty()) {
    LogWarning(absl::StrCat("--backend=auto chose the CPU backend: ", fallback_reason));
  }
  if (!created.ok()) {
    LogError(absl::StrCat("cannot create backend --backend=", BackendKindName(config.backend.kind),
                          ": ", created.status().ToString()));
    server.Shutdown(absl::ToChronoTime(absl::Now()));
    return 1;
  }
  backend = *std::move(created);
  const BackendInfo info = backend->Info();
  // A sticky device error: the process cannot compute any more. Health goes NOT_SERVING so that
  // the orchestrator's probes restart the pod; calls in flight fail with INTERNAL.
  auto on_device_unusable = [&server](const absl::Status& status) {
    LogError(absl::StrCat("the device is unusable, reporting NOT_SERVING: ", status.message()));
    SetServingHealth(server, false);
  };
  if (config.pin_host_buffers && backend->host_memory_pinner() != nullptr) {
    // The backend outlives the service and so the cache, which unpins through it.
    service.host_buffer_cache().SetPinner(backend->host_memory_pinner());
    LogInfo(absl::StrCat("reused host buffers are page-locked for the device's copies, up to ",
                         service.host_buffer_cache().capacity_bytes(),
                         " bytes (--pin_host_buffers; anchorserve_pinned_host_bytes)"));
  }
  executor = std::make_unique<AttentionExecutor>(backend.get(), &metrics);
  batcher = std::make_unique<DynamicBatcher>(
      BatchLimits{config.max_batch_requests, config.max_batch_tokens, config.max_queue_delay,
                  config.max_queue_time},
      config.max_queue_size, executor.get(), &clock, &metrics, Queue::kAttention,
      on_device_unusable);
  if (!config.model_dir.empty()) {
    absl::StatusOr<std::unique_ptr<Model>> loaded =
        LoadModel(config.model_dir, config.backend.cpu_threads);
    if (!loaded.ok()) {
      LogError(
          absl::StrCat("cannot load --model=", config.model_dir, ": ", loaded.status().message()));
      server.Shutdown(absl::ToChronoTime(absl::Now()));
      stop_batchers();
      return 2;
    }
    model = *std::move(loaded);
    // Prefill runs where attention runs: the CUDA engine with the CUDA backend.
    PrefillEngineOptions engine_options;
    engine_options.use_cuda = info.name == "cuda";
    engine_options.cuda_device = config.backend.cuda_device;
    engine_options.cpu_threads = config.backend.cpu_threads;
    absl::StatusOr<std::unique_ptr<PrefillEngine>> engine =
        CreatePrefillEngine(*model, engine_options);
    if (!engine.ok() && engine_options.use_cuda && config.backend.kind == BackendKind::kAuto &&
        engine.status().code() == absl::StatusCode::kFailedPrecondition) {
      // A shape the CUDA kernels do not serve (e.g. a head_dim other than 64/128): the CPU
      // engine still serves it, slowly, rather than no Prefill at all. Not with --backend=cuda,
      // which promises the GPU: the server stops instead of serving from the CPU.
      LogWarning(absl::StrCat("prefill falls back to the cpu engine: ", engine.status().message()));
      engine_options.use_cuda = false;
      engine = CreatePrefillEngine(*model, engine_options);
    }
    if (!engine.ok()) {
      LogError(absl::StrCat("cannot create the prefill engine: ", engine.status().ToString()));
      server.Shutdown(absl::ToChronoTime(absl::Now()));
      stop_batchers();
      return 1;
    }
    prefill_engine = *std::move(engine);
    prefill_runner = std::make_unique<PrefillRunner>(prefill_engine.get(), &metrics);
    // One prefill at a time: each one already uses every core (or the whole GPU).
    prefill_batcher = std::make_unique<DynamicBatcher>(
        BatchLimits{1, config.max_seq_len, absl::ZeroDuration(), config.max_queue_time},
        config.max_queue_size, prefill_runner.get(), &clock, &metrics, Queue::kPrefill,
        on_device_unusable);
    const ModelConfig& mc = model->config();
    LogInfo(absl::StrCat("model ", config.model_dir, " loaded in ", model->load_seconds(), " s: ",
                         ArchitectureName(mc.architecture), ", ", mc.num_layers, " layers, ",
                         model->num_parameters(), " parameters, fingerprint ", model->fingerprint(),
                         "; prefill on the ", prefill_engine->name(), " engine"));
  }
  if (absl::Status ready = service.SetReady(backend.get(), batcher.get()); !ready.ok()) {
    LogError(ready.ToString());
    server.Shutdown(absl::ToChronoTime(absl::Now()));
    stop_batchers();
    return 1;
  }
  if (absl::Status ready =
          prefill_service.SetReady(model.get(), prefill_engine.get(), prefill_batcher.get());
      !ready.ok()) {
    LogError(ready.ToString());
    server.Shutdown(absl::ToChronoTime(absl::Now()));
    stop_batchers();
    return 1;
  }

  // A signal during startup: never report SERVING, go straight to the (empty) drain.
  if (!signals.received().HasBeenNotified()) {
    SetServingHealth(server, true);
    if (!config.port_file.empty()) {
      if (absl::Status status = WritePortFile(config.port_file, grpc_server->port, metrics_port);
          !status.ok()) {
        LogError(status.ToString());
        SetServingHealth(server, false);
        server.Shutdown(absl::ToChronoTime(absl::Now()));
        stop_batchers();
        return 1;
      }
    }
    LogInfo(absl::StrCat(
        "serving gRPC on ", grpc_address, ", metrics ",
        metrics_port >= 0
            ? absl::StrCat("on ", JoinHostPort(config.MetricsHost(), metrics_port), "/metrics")
            : std::string("off (--metrics_port=-1)"),
        ", backend=", info.name, " (", info.device, "), version ", ServerVersion()));
  }

  signals.received().WaitForNotification();
  LogInfo(absl::StrCat("signal ", signals.signal_number(), ": draining (up to ",
                       absl::FormatDuration(config.drain_timeout), ")"));
  // Readiness first so that balancers move away, then refuse new calls (UNAVAILABLE, which the
  // clients retry on another replica), then GOAWAY: clients stop sending here at once rather
  // than when the drain is over. The calls in flight go on.
  SetServingHealth(server, false);
  service.StartDraining();
  GoawayNotice goaway(server);
  // Should a backend never give cancelled work back, do not hang past the pod's grace period.
  std::thread([limit = config.drain_timeout + 2 * kShutdownGrace] {
    absl::SleepFor(limit);
    LogError("shutdown did not finish in time; exiting without a clean drain");
    std::_Exit(1);
  }).detach();
  if (!service.WaitUntilIdle(absl::Now() + config.drain_timeout)) {
    LogWarning(absl::StrCat("drain timeout: cancelling ", service.InflightRpcs(),
                            " RPCs still in flight"));
    batcher->CancelAll();
    if (prefill_batcher != nullptr) prefill_batcher->CancelAll();
    // Cancelled jobs come back at once (UNAVAILABLE); uploads that stalled do not.
    if (!service.WaitUntilIdle(absl::Now() + kShutdownGrace)) {
      LogWarning(absl::StrCat("cancelling ", service.InflightRpcs(),
                              " RPCs that are still in flight (stalled uploads?)"));
    }
  }
  // No work is left: the calls that remain (health Watch streams of proxies and client-side
  // health checking, reflection streams, stalled uploads) are cancelled, not waited for; returns
  // once every call is done.
  server.Shutdown(absl::ToChronoTime(absl::Now()));
  stop_batchers();
  if (metrics_endpoint != nullptr) metrics_endpoint->Stop();
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
  anchorserve::KeepReceiveBuffersResident();
  absl::StatusOr<anchorserve::ServerConfig> config = anchorserve::ServerConfigFromFlags();
  if (!config.ok()) {
    anchorserve::LogError(absl::StrCat("invalid flags: ", config.status().message()));
    return 2;
  }
  return anchorserve::Run(*config);
}
