// Helpers of the end-to-end tests: the real anchorserve binary as a child process on loopback,
// test fixtures around it, subprocesses (anchorctl), a tiny HTTP client for /metrics, health and
// reflection calls.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "client/attention_client.h"
#include "client/qkv_inputs.h"
#include "grpc/health/v1/health.pb.h"
#include "grpcpp/channel.h"
#include "gtest/gtest.h"

namespace anchorserve::e2e {

// Paths baked in by CMake ($<TARGET_FILE:...>).
std::string AnchorserveBinary();
std::string AnchorctlBinary();

// A fresh directory under $TEST_TMPDIR or /tmp, removed by the caller (or left for debugging).
absl::StatusOr<std::string> MakeTempDir(absl::string_view prefix);

struct ProcessResult {
  int exit_code = -1;   // when the process exited
  int term_signal = 0;  // when a signal ended it
  std::string output;   // stdout and stderr together
};

// Runs argv[0] with the arguments; kills it with SIGKILL after `timeout` (DEADLINE_EXCEEDED).
absl::StatusOr<ProcessResult> RunProcess(const std::vector<std::string>& argv,
                                         absl::Duration timeout);

// `anchorserve --host=HOST --grpc_port=0 --metrics_port=0 --port_file=... --backend=cpu` plus
// `extra_flags` (a later --grpc_port=N overrides the 0). Start() returns once the port file
// appears (the server is serving). `host` is an IPv4 loopback address: Linux answers on all of
// 127.0.0.0/8, so several servers can stand for several replicas.
class ServerProcess {
 public:
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(
      const std::vector<std::string>& extra_flags,
      absl::Duration startup_timeout = absl::Seconds(60), const std::string& host = "127.0.0.1");
  ~ServerProcess();  // Stop()
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }
  const std::string& host() const { return host_; }
  std::string target() const;  // "HOST:PORT"
  pid_t pid() const { return pid_; }

  absl::Status Signal(int signal_number);
  // Exit code once the process has exited; DEADLINE_EXCEEDED if still running after `timeout`,
  // ABORTED (with the signal) if a signal ended it.
  absl::StatusOr<int> WaitForExit(absl::Duration timeout);
  // SIGTERM, then SIGKILL if it has not exited within `grace`. Idempotent.
  void Stop(absl::Duration grace = absl::Seconds(20));
  bool running() const { return pid_ > 0; }

  // Everything the server wrote to stdout/stderr so far.
  std::string Log() const;

 private:
  ServerProcess() = default;

  pid_t pid_ = -1;
  std::string host_;
  int grpc_port_ = 0;
  int metrics_port_ = 0;
  std::string dir_;
  std::string log_path_;
};

// A client of `server` with a short default deadline.
std::unique_ptr<AttentionClient> MakeClient(const ServerProcess& server,
                                            absl::Duration deadline = absl::Seconds(120),
                                            int64_t stream_chunk_bytes = int64_t{4} << 20);

// Base of a test suite whose tests share one server: the suite's SetUpTestSuite calls
// StartSharedServer(flags) and TearDownTestSuite stops it. A test fails at SetUp when the server
// did not start; a failed test prints the server's output.
class SharedServerTest : public ::testing::Test {
 protected:
  static void StartSharedServer(const std::vector<std::string>& flags);
  static void TearDownTestSuite();
  void SetUp() override;
  void TearDown() override;

  static ServerProcess* server_;  // null when it did not start

 private:
  static std::string* start_error_;
};

// Base of tests that each start a server of their own: the test body calls
// ASSERT_NO_FATAL_FAILURE(StartServer(flags)). A failed test prints the server's output.
class OwnServerTest : public ::testing::Test {
 protected:
  void StartServer(const std::vector<std::string>& flags,
                   absl::Duration client_deadline = absl::Seconds(120));
  void TearDown() override;

  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<AttentionClient> client_;  // of server_, made by StartServer
};

// GET http://HOST:port/path (HOST an IPv4 address); returns the whole response (status line,
// headers, body).
absl::StatusOr<std::string> HttpGet(int port, absl::string_view path,
                                    absl::Duration timeout = absl::Seconds(10),
                                    const std::string& host = "127.0.0.1");

// grpc.health.v1.Health/Check.
absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> CheckHealth(
    const std::shared_ptr<grpc::Channel>& channel, absl::string_view service,
    absl::Duration timeout = absl::Seconds(10));

// grpc.reflection.v1alpha ServerReflectionInfo with one list_services request.
absl::StatusOr<std::vector<std::string>> ListServices(const std::shared_ptr<grpc::Channel>& channel,
                                                      absl::Duration timeout = absl::Seconds(10));

// A loopback port nothing listens on (bound, read, closed).
absl::StatusOr<int> UnusedPort();

// Seeded inputs of the client's generator.
absl::StatusOr<QkvTensors> MakeQkv(InputKind kind, int64_t seq_len, int q_heads, int kv_heads,
                                   int head_dim, DType dtype, Layout layout, uint64_t seed);

AttendInputs InputsFor(const QkvTensors& qkv, const v1::AnchorConfig& config = {},
                       bool metrics_only = false);

// Value of the first sample of `metric` whose label set contains all of `label_fragments`
// (e.g. {"rpc=\"Attend\"", "code=\"OK\""}) in a Prometheus text exposition; NOT_FOUND if none.
absl::StatusOr<double> FindMetricValue(absl::string_view exposition, absl::string_view metric,
                                       const std::vector<std::string>& label_fragments);

}  // namespace anchorserve::e2e
