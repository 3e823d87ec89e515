#include "tests/e2e/e2e_util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/list_services.grpc.pb.h"
#include "grpcpp/client_context.h"

namespace anchorserve::e2e {
namespace {

std::string ErrnoText() { return std::strerror(errno); }

std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// fork + exec with stdout/stderr to `log_path`. Only async-signal-safe calls run in the child.
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const std::string& log_path) {
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  const int log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (log_fd < 0) return absl::InternalError(absl::StrCat("open ", log_path, ": ", ErrnoText()));
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(log_fd);
    return absl::InternalError(absl::StrCat("fork: ", ErrnoText()));
  }
  if (pid == 0) {
    // The child dies with the test process, so a crashed test leaves no server behind.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(126);
    ::dup2(log_fd, STDOUT_FILENO);
    ::dup2(log_fd, STDERR_FILENO);
    const int null_fd = ::open("/dev/null", O_RDONLY);
    if (null_fd >= 0) ::dup2(null_fd, STDIN_FILENO);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  ::close(log_fd);
  return pid;
}

// waitpid with a bounded poll. Returns the raw wait status, or DEADLINE_EXCEEDED.
absl::StatusOr<int> WaitPid(pid_t pid, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    int status = 0;
    const pid_t done = ::waitpid(pid, &status, WNOHANG);
    if (done == pid) return status;
    if (done < 0 && errno != EINTR) {
      return absl::InternalError(absl::StrCat("waitpid: ", ErrnoText()));
    }
    if (absl::Now() >= deadline) return absl::DeadlineExceededError("process still running");
    absl::SleepFor(absl::Milliseconds(10));
  }
}

}  // namespace

std::string AnchorserveBinary() { return ANCHORSERVE_PATH; }
std::string AnchorctlBinary() { return ANCHORCTL_PATH; }

absl::StatusOr<std::string> MakeTempDir(absl::string_view prefix) {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string pattern =
      absl::StrCat(base != nullptr && *base != '\0' ? base : "/tmp", "/", prefix, "XXXXXX");
  if (::mkdtemp(pattern.data()) == nullptr) {
    return absl::InternalError(absl::StrCat("mkdtemp ", pattern, ": ", ErrnoText()));
  }
  return pattern;
}

absl::StatusOr<ProcessResult> RunProcess(const std::vector<std::string>& argv,
                                         absl::Duration timeout) {
  absl::StatusOr<std::string> dir = MakeTempDir("anchor_e2e_proc_");
  if (!dir.ok()) return dir.status();
  const std::string log_path = *dir + "/output.txt";
  absl::StatusOr<pid_t> pid = Spawn(argv, log_path);
  if (!pid.ok()) return pid.status();
  absl::StatusOr<int> status = WaitPid(*pid, timeout);
  if (!status.ok()) {
    ::kill(*pid, SIGKILL);
    (void)WaitPid(*pid, absl::Seconds(10));
    return absl::DeadlineExceededError(absl::StrCat(argv[0], " did not finish within ",
                                                    absl::FormatDuration(timeout), "; output:\n",
                                                    ReadWholeFile(log_path)));
  }
  ProcessResult result;
  result.output = ReadWholeFile(log_path);
  if (WIFEXITED(*status)) result.exit_code = WEXITSTATUS(*status);
  if (WIFSIGNALED(*status)) result.term_signal = WTERMSIG(*status);
  ::unlink(log_path.c_str());
  ::rmdir(dir->c_str());
  return result;
}

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(
    const std::vector<std::string>& extra_flags, absl::Duration startup_timeout,
    const std::string& host) {
  absl::StatusOr<std::string> dir = MakeTempDir("anchor_e2e_server_");
  if (!dir.ok()) return dir.status();
  std::unique_ptr<ServerProcess> server(new ServerProcess());
  server->dir_ = *dir;
  server->log_path_ = *dir + "/server.log";
  server->host_ = host;
  const std::string port_file = *dir + "/ports";
  std::vector<std::string> argv = {
      AnchorserveBinary(), absl::StrCat("--host=", host),           "--grpc_port=0",
      "--metrics_port=0",  absl::StrCat("--port_file=", port_file), "--backend=cpu"};
  argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
  absl::StatusOr<pid_t> pid = Spawn(argv, server->log_path_);
  if (!pid.ok()) return pid.status();
  server->pid_ = *pid;

  const absl::Time deadline = absl::Now() + startup_timeout;
  while (true) {
    int status = 0;
    if (::waitpid(server->pid_, &status, WNOHANG) == server->pid_) {
      server->pid_ = -1;
      return absl::InternalError(absl::StrCat("anchorserve exited during startup (",
                                              WIFEXITED(status)
                                                  ? absl::StrCat("exit code ", WEXITSTATUS(status))
                                                  : absl::StrCat("signal ", WTERMSIG(status)),
                                              "); its output:\n", server->Log()));
    }
    const std::string ports = ReadWholeFile(port_file);
    if (absl::StrContains(ports, "metrics_port=") && absl::EndsWith(ports, "\n")) {
      for (absl::string_view line : absl::StrSplit(ports, '\n', absl::SkipEmpty())) {
        absl::string_view value = line;
        if (absl::ConsumePrefix(&value, "grpc_port=")) {
          (void)absl::SimpleAtoi(value, &server->grpc_port_);
        } else if (absl::ConsumePrefix(&value, "metrics_port=")) {
          (void)absl::SimpleAtoi(value, &server->metrics_port_);
        }
      }
      if (server->grpc_port_ <= 0 || server->metrics_port_ <= 0) {
        return absl::InternalError(absl::StrCat("malformed port file: '", ports, "'"));
      }
      return server;
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("anchorserve wrote no port file within ",
                                                      absl::FormatDuration(startup_timeout),
                                                      "; its output:\n", server->Log()));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
}

ServerProcess::~ServerProcess() {
  Stop();
  ::unlink(log_path_.c_str());
  ::unlink((dir_ + "/ports").c_str());
  ::rmdir(dir_.c_str());
}

std::string ServerProcess::target() const { return absl::StrCat(host_, ":", grpc_port_); }

absl::Status ServerProcess::Signal(int signal_number) {
  if (pid_ <= 0) return absl::FailedPreconditionError("server is not running");
  if (::kill(pid_, signal_number) != 0) {
    return absl::InternalError(absl::StrCat("kill: ", ErrnoText()));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> ServerProcess::WaitForExit(absl::Duration timeout) {
  if (pid_ <= 0) return absl::FailedPreconditionError("server is not running");
  absl::StatusOr<int> status = WaitPid(pid_, timeout);
  if (!status.ok()) return status.status();
  pid_ = -1;
  if (WIFSIGNALED(*status)) {
    return absl::AbortedError(absl::StrCat("anchorserve was ended by signal ", WTERMSIG(*status)));
  }
  return WEXITSTATUS(*status);
}

void ServerProcess::Stop(absl::Duration grace) {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGTERM);
  if (WaitPid(pid_, grace).ok()) {
    pid_ = -1;
    return;
  }
  ::kill(pid_, SIGKILL);
  (void)WaitPid(pid_, absl::Seconds(10));
  pid_ = -1;
}

std::string ServerProcess::Log() const { return ReadWholeFile(log_path_); }

std::unique_ptr<AttentionClient> MakeClient(const ServerProcess& server, absl::Duration deadline,
                                            int64_t stream_chunk_bytes) {
  ClientOptions options;
  options.default_deadline = deadline;
  options.stream_chunk_bytes = stream_chunk_bytes;
  absl::StatusOr<std::unique_ptr<AttentionClient>> client =
      AttentionClient::Create(server.target(), options);
  return client.ok() ? *std::move(client) : nullptr;
}

namespace {
void PrintLogIfFailed(const ServerProcess* server) {
  if (::testing::Test::HasFailure() && server != nullptr) {
    std::fprintf(stderr, "---- anchorserve output ----\n%s\n", server->Log().c_str());
  }
}
}  // namespace

ServerProcess* SharedServerTest::server_ = nullptr;
std::string* SharedServerTest::start_error_ = nullptr;

void SharedServerTest::StartSharedServer(const std::vector<std::string>& flags) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(flags);
  if (!server.ok()) {
    start_error_ = new std::string(server.status().ToString());
    return;
  }
  server_ = server->release();
}

void SharedServerTest::TearDownTestSuite() {
  delete server_;
  server_ = nullptr;
  delete start_error_;
  start_error_ = nullptr;
}

void SharedServerTest::SetUp() {
  ASSERT_NE(server_, nullptr) << (start_error_ != nullptr ? *start_error_ : "no server started");
}

void SharedServerTest::TearDown() { PrintLogIfFailed(server_); }

void OwnServerTest::StartServer(const std::vector<std::string>& flags,
                                absl::Duration client_deadline) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(flags);
  ASSERT_TRUE(server.ok()) << server.status();
  server_ = *std::move(server);
  client_ = MakeClient(*server_, client_deadline);
  ASSERT_NE(client_, nullptr);
}

void OwnServerTest::TearDown() { PrintLogIfFailed(server_.get()); }

absl::StatusOr<std::string> HttpGet(int port, absl::string_view path, absl::Duration timeout,
                                    const std::string& host) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", ErrnoText()));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(absl::ToInt64Seconds(timeout));
  tv.tv_usec = 0;
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  if (::inet_pton(AF_INET, host.c_str(), &address.sin_addr) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("HttpGet: '", host, "' is not an IPv4 address"));
  }
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    return absl::UnavailableError(absl::StrCat("connect ", host, ":", port, ": ", ErrnoText()));
  }
  const std::string request =
      absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ", host, "\r\nConnection: close\r\n\r\n");
  if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) !=
      static_cast<ssize_t>(request.size())) {
    return absl::InternalError(absl::StrCat("send: ", ErrnoText()));
  }
  std::string response;
  char buffer[16384];
  constexpr size_t kMaxResponseBytes = 64 << 20;
  while (response.size() < kMaxResponseBytes) {
    const ssize_t n = ::recv(fd, buffer, sizeof(buffer), 0);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat("recv: ", ErrnoText()));
    }
    response.append(buffer, static_cast<size_t>(n));
  }
  return response;
}

absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> CheckHealth(
    const std::shared_ptr<grpc::Channel>& channel, absl::string_view service,
    absl::Duration timeout) {
  std::unique_ptr<grpc::health::v1::Health::Stub> stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(std::string(service));
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status, "health", "Health/Check");
  return response.status();
}

absl::StatusOr<std::vector<std::string>> ListServices(const std::shared_ptr<grpc::Channel>& channel,
                                                      absl::Duration timeout) {
  namespace reflection = grpc::reflection::v1alpha;
  std::unique_ptr<reflection::ServerReflection::Stub> stub =
      reflection::ServerReflection::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  auto stream = stub->ServerReflectionInfo(&context);
  reflection::ServerReflectionRequest request;
  request.set_list_services("*");
  if (!stream->Write(request)) {
    return FromGrpcStatus(stream->Finish(), "reflection", "ServerReflectionInfo");
  }
  stream->WritesDone();
  std::vector<std::string> services;
  std::string error;
  reflection::ServerReflectionResponse response;
  while (stream->Read(&response)) {
    if (response.has_error_response()) error = response.error_response().error_message();
    for (const auto& service : response.list_services_response().service()) {
      services.push_back(service.name());
    }
  }
  grpc::Status status = stream->Finish();
  if (!status.ok()) return FromGrpcStatus(status, "reflection", "ServerReflectionInfo");
  if (!error.empty()) return absl::InternalError(absl::StrCat("reflection error: ", error));
  return services;
}

absl::StatusOr<int> UnusedPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", ErrnoText()));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = 0;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    ::close(fd);
    return absl::InternalError(absl::StrCat("bind: ", ErrnoText()));
  }
  ::close(fd);
  return static_cast<int>(ntohs(address.sin_port));
}

absl::StatusOr<QkvTensors> MakeQkv(InputKind kind, int64_t seq_len, int q_heads, int kv_heads,
                                   int head_dim, DType dtype, Layout layout, uint64_t seed) {
  GeneratedInputsSpec spec;
  spec.kind = kind;
  spec.shape.seq_len = seq_len;
  spec.shape.num_q_heads = q_heads;
  spec.shape.num_kv_heads = kv_heads;
  spec.shape.head_dim = head_dim;
  spec.dtype = dtype;
  spec.layout = layout;
  spec.seed = seed;
  return GenerateInputs(spec);
}

AttendInputs InputsFor(const QkvTensors& qkv, const v1::AnchorConfig& config, bool metrics_only) {
  AttendInputs inputs;
  inputs.q = qkv.q.View();
  inputs.k = qkv.k.View();
  inputs.v = qkv.v.View();
  inputs.config = config;
  inputs.options.set_metrics_only(metrics_only);
  return inputs;
}

absl::StatusOr<double> FindMetricValue(absl::string_view exposition, absl::string_view metric,
                                       const std::vector<std::string>& label_fragments) {
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    if (!absl::ConsumePrefix(&line, metric)) continue;
    if (line.empty() || (line[0] != '{' && line[0] != ' ')) continue;  // a longer metric name
    const size_t value_at = line.rfind(' ');
    if (value_at == absl::string_view::npos) continue;
    const absl::string_view labels = line.substr(0, value_at);
    bool all = true;
    for (const std::string& fragment : label_fragments) all &= absl::StrContains(labels, fragment);
    if (!all) continue;
    double value = 0;
    if (absl::SimpleAtod(line.substr(value_at + 1), &value)) return value;
  }
  return absl::NotFoundError(absl::StrCat("no sample of ", metric, " with the given labels"));
}

}  // namespace anchorserve::e2e
