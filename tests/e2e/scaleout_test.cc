// Several replicas behind one client channel: three servers on 127.0.0.1, 127.0.0.2 and
// 127.0.0.3 (Linux loopback answers on all of 127.0.0.0/8), a list target or a dns:/// name with
// three addresses, requests spread round-robin over all three, and a replica taken away with
// SIGTERM while requests keep coming costs none of them.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "client/channel_target.h"
#include "gmock/gmock.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"

namespace anchorserve::e2e {
namespace {

using ::testing::HasSubstr;

constexpr const char* kReplicaHosts[] = {"127.0.0.1", "127.0.0.2", "127.0.0.3"};

// A small request: milliseconds of work on one CPU thread.
absl::StatusOr<QkvTensors> SmallQkv(uint64_t seed) {
  return MakeQkv(InputKind::kRandom, 256, 4, 2, 64, DType::kBf16, Layout::kTokenMajor, seed);
}

// A DNS server on 127.0.0.1 (UDP, a free port) that answers every A query with `addresses` and
// every other query with no records: one name with several addresses, as a Kubernetes headless
// Service has, without editing /etc/hosts. gRPC's c-ares resolver asks it when the target names
// it as the authority: dns://127.0.0.1:PORT/NAME:PORT.
class FakeDnsServer {
 public:
  static absl::StatusOr<std::unique_ptr<FakeDnsServer>> Start(
      const std::vector<std::string>& addresses) {
    std::unique_ptr<FakeDnsServer> dns(new FakeDnsServer());
    dns->fd_ = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (dns->fd_ < 0) return absl::InternalError("socket");
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof(address);
    if (::bind(dns->fd_, reinterpret_cast<sockaddr*>(&address), length) != 0 ||
        ::getsockname(dns->fd_, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
      return absl::InternalError("bind");
    }
    dns->port_ = ntohs(address.sin_port);
    if (absl::Status set = dns->SetAddresses(addresses); !set.ok()) return set;
    dns->thread_ = std::thread([raw = dns.get()] { raw->Serve(); });
    return dns;
  }
  ~FakeDnsServer() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
    if (fd_ >= 0) ::close(fd_);
  }

  int port() const { return port_; }
  int a_queries() const { return a_queries_.load(); }

  // What A queries get from now on.
  absl::Status SetAddresses(const std::vector<std::string>& addresses) {
    std::vector<in_addr> parsed(addresses.size());
    for (size_t i = 0; i < addresses.size(); ++i) {
      if (::inet_pton(AF_INET, addresses[i].c_str(), &parsed[i]) != 1) {
        return absl::InvalidArgumentError(absl::StrCat("not an IPv4 address: ", addresses[i]));
      }
    }
    absl::MutexLock lock(&mu_);
    addresses_ = std::move(parsed);
    return absl::OkStatus();
  }

 private:
  FakeDnsServer() = default;

  void Serve() {
    while (!stop_.load()) {
      pollfd ready{fd_, POLLIN, 0};
      if (::poll(&ready, 1, 50) <= 0) continue;
      uint8_t query[512];
      sockaddr_in from{};
      socklen_t from_length = sizeof(from);
      const ssize_t size = ::recvfrom(fd_, query, sizeof(query), 0,
                                      reinterpret_cast<sockaddr*>(&from), &from_length);
      if (size < 12) continue;
      const std::string reply = Answer(query, static_cast<size_t>(size));
      if (reply.empty()) continue;
      (void)::sendto(fd_, reply.data(), reply.size(), 0, reinterpret_cast<sockaddr*>(&from),
                     from_length);
    }
  }

  // The response to one query: its header and question echoed, then the A records.
  std::string Answer(const uint8_t* query, size_t size) {
    size_t end = 12;  // past the header: the question's name, then type and class
    while (end < size && query[end] != 0) end += query[end] + 1;
    end += 5;
    if (end > size) return "";
    const int type = query[end - 4] << 8 | query[end - 3];
    constexpr int kTypeA = 1;
    const bool answer = type == kTypeA;
    if (answer) a_queries_.fetch_add(1);
    absl::MutexLock lock(&mu_);
    std::string reply(reinterpret_cast<const char*>(query), end);
    auto put16 = [&reply](size_t at, int value) {
      reply[at] = static_cast<char>(value >> 8);
      reply[at + 1] = static_cast<char>(value & 0xff);
    };
    put16(2, 0x8180);  // a response, recursion desired and available, no error
    put16(4, 1);       // one question
    put16(6, answer ? static_cast<int>(addresses_.size()) : 0);
    put16(8, 0);
    put16(10, 0);  // drops any EDNS record of the query
    if (!answer) return reply;
    for (const in_addr& address : addresses_) {
      // Name: a pointer to the question's name at offset 12; type A, class IN, TTL 1 s, 4 bytes.
      const uint8_t record[] = {0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4};
      reply.append(reinterpret_cast<const char*>(record), sizeof(record));
      reply.append(reinterpret_cast<const char*>(&address.s_addr), 4);
    }
    return reply;
  }

  int fd_ = -1;
  int port_ = 0;
  absl::Mutex mu_;
  std::vector<in_addr> addresses_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> stop_{false};
  std::atomic<int> a_queries_{0};
  std::thread thread_;
};

class ScaleOutE2eTest : public ::testing::Test {
 protected:
  // One server per host of kReplicaHosts; with `same_port` all on the first one's port (as the
  // pods behind a headless Service are).
  void StartReplicas(const std::vector<std::string>& flags, bool same_port = false) {
    for (const char* host : kReplicaHosts) {
      std::vector<std::string> replica_flags = flags;
      if (same_port && !replicas_.empty()) {
        replica_flags.push_back(absl::StrCat("--grpc_port=", replicas_[0]->grpc_port()));
      }
      absl::StatusOr<std::unique_ptr<ServerProcess>> server =
          ServerProcess::Start(replica_flags, absl::Seconds(60), host);
      ASSERT_TRUE(server.ok()) << host << ": " << server.status();
      replicas_.push_back(*std::move(server));
    }
  }

  // "127.0.0.1:P1,127.0.0.2:P2,127.0.0.3:P3".
  std::string ListTarget() const {
    std::vector<std::string> targets;
    for (const auto& replica : replicas_) targets.push_back(replica->target());
    return absl::StrJoin(targets, ",");
  }

  // Calls of `rpc` the replica answered OK, from its /metrics.
  static absl::StatusOr<double> Served(const ServerProcess& replica,
                                       absl::string_view rpc = "Attend") {
    absl::StatusOr<std::string> page =
        HttpGet(replica.metrics_port(), "/metrics", absl::Seconds(10), replica.host());
    if (!page.ok()) return page.status();
    absl::StatusOr<double> value = FindMetricValue(
        *page, "anchorserve_requests_total", {absl::StrCat("rpc=\"", rpc, "\""), "code=\"OK\""});
    if (value.status().code() == absl::StatusCode::kNotFound) return 0.0;  // none yet
    return value;
  }

  void TearDown() override {
    if (!HasFailure()) return;
    for (const auto& replica : replicas_) {
      std::fprintf(stderr, "---- anchorserve on %s ----\n%s\n", replica->host().c_str(),
                   replica->Log().c_str());
    }
  }

  std::vector<std::unique_ptr<ServerProcess>> replicas_;
};

TEST_F(ScaleOutE2eTest, ListTargetSpreadsRequestsOverEveryReplica) {
  ASSERT_NO_FATAL_FAILURE(StartReplicas({"--cpu_threads=1"}));
  absl::StatusOr<std::unique_ptr<AttentionClient>> client = AttentionClient::Create(ListTarget());
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<QkvTensors> qkv = SmallQkv(1);
  ASSERT_TRUE(qkv.ok()) << qkv.status();

  constexpr int kRequests = 60;
  for (int i = 0; i < kRequests; ++i) {
    absl::StatusOr<AttendResult> result = (*client)->Attend(InputsFor(*qkv, {}, true));
    ASSERT_TRUE(result.ok()) << "request " << i << ": " << result.status();
  }
  double total = 0;
  for (const auto& replica : replicas_) {
    absl::StatusOr<double> served = Served(*replica);
    ASSERT_TRUE(served.ok()) << served.status();
    // round_robin takes the replicas in turn once connected: about 20 each.
    EXPECT_GE(*served, kRequests / 6) << replica->host() << " answered too few requests";
    total += *served;
  }
  EXPECT_EQ(total, kRequests);
}

// dns:///NAME:PORT with NAME resolving to the three addresses, as a headless Service's name does
// (the authority form points gRPC's resolver at the fake DNS server).
TEST_F(ScaleOutE2eTest, DnsTargetSpreadsRequestsOverEveryAddress) {
  ASSERT_NO_FATAL_FAILURE(StartReplicas({"--cpu_threads=1"}, /*same_port=*/true));
  absl::StatusOr<std::unique_ptr<FakeDnsServer>> dns =
      FakeDnsServer::Start({kReplicaHosts[0], kReplicaHosts[1], kReplicaHosts[2]});
  ASSERT_TRUE(dns.ok()) << dns.status();
  const std::string target = absl::StrCat("dns://127.0.0.1:", (*dns)->port(),
                                          "/replicas.anchorserve.test:", replicas_[0]->grpc_port());
  absl::StatusOr<std::unique_ptr<AttentionClient>> client = AttentionClient::Create(target);
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<QkvTensors> qkv = SmallQkv(3);
  ASSERT_TRUE(qkv.ok()) << qkv.status();

  constexpr int kRequests = 60;
  for (int i = 0; i < kRequests; ++i) {
    absl::StatusOr<AttendResult> result = (*client)->Attend(InputsFor(*qkv, {}, true));
    ASSERT_TRUE(result.ok()) << "request " << i << " to " << target << ": " << result.status();
  }
  EXPECT_GE((*dns)->a_queries(), 1);
  for (const auto& replica : replicas_) {
    absl::StatusOr<double> served = Served(*replica);
    ASSERT_TRUE(served.ok()) << served.status();
    EXPECT_GE(*served, kRequests / 6) << replica->host() << " answered too few requests";
  }
}

// A client connected to one replica learns of new ones only when it resolves the name again,
// which gRPC does when a connection ends: the max connection age ends it.
TEST_F(ScaleOutE2eTest, MaxConnectionAgeBringsNewReplicasIn) {
  const std::vector<std::string> flags = {"--cpu_threads=1", "--max_connection_age_s=1"};
  absl::StatusOr<std::unique_ptr<ServerProcess>> first =
      ServerProcess::Start(flags, absl::Seconds(60), kReplicaHosts[0]);
  ASSERT_TRUE(first.ok()) << first.status();
  replicas_.push_back(*std::move(first));
  absl::StatusOr<std::unique_ptr<FakeDnsServer>> dns = FakeDnsServer::Start({kReplicaHosts[0]});
  ASSERT_TRUE(dns.ok()) << dns.status();

  // The library's channel arguments, but DNS may be asked again after 100 ms rather than gRPC's
  // 30 s, so that the test takes seconds.
  grpc::ChannelArguments args = ChannelArgumentsForReplicas(kMaxGrpcMessageBytes);
  args.SetInt(GRPC_ARG_DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS, 100);
  const std::string target = absl::StrCat("dns://127.0.0.1:", (*dns)->port(),
                                          "/replicas.anchorserve.test:", replicas_[0]->grpc_port());
  std::unique_ptr<v1::AttentionService::Stub> stub = v1::AttentionService::NewStub(
      grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args));
  auto get_info = [&stub]() {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    v1::GetServerInfoResponse response;
    return stub->GetServerInfo(&context, v1::GetServerInfoRequest(), &response);
  };
  const grpc::Status warmup = get_info();
  ASSERT_TRUE(warmup.ok()) << warmup.error_message();

  // Two more replicas appear behind the name.
  for (const char* host : {kReplicaHosts[1], kReplicaHosts[2]}) {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(
        {flags[0], flags[1], absl::StrCat("--grpc_port=", replicas_[0]->grpc_port())},
        absl::Seconds(60), host);
    ASSERT_TRUE(server.ok()) << server.status();
    replicas_.push_back(*std::move(server));
  }
  ASSERT_TRUE((*dns)->SetAddresses({kReplicaHosts[0], kReplicaHosts[1], kReplicaHosts[2]}).ok());

  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  bool all_serving = false;
  int failures = 0;
  while (!all_serving && absl::Now() < deadline) {
    for (int i = 0; i < 20; ++i) failures += get_info().ok() ? 0 : 1;
    absl::SleepFor(absl::Milliseconds(50));
    all_serving = Served(*replicas_[1], "GetServerInfo").value_or(0) > 0 &&
                  Served(*replicas_[2], "GetServerInfo").value_or(0) > 0;
  }
  EXPECT_TRUE(all_serving) << "the new replicas got no requests within 20 s";
  EXPECT_EQ(failures, 0) << "calls failed while connections were closed for their age";
}

TEST_F(ScaleOutE2eTest, SigtermOnOneReplicaCostsNoRequest) {
  ASSERT_NO_FATAL_FAILURE(StartReplicas({"--cpu_threads=1", "--drain_timeout_s=30"}));
  ClientOptions options;
  options.default_deadline = absl::Seconds(60);
  absl::StatusOr<std::unique_ptr<AttentionClient>> client =
      AttentionClient::Create(ListTarget(), options);
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<QkvTensors> qkv = SmallQkv(2);
  ASSERT_TRUE(qkv.ok()) << qkv.status();
  const AttendInputs inputs = InputsFor(*qkv, {}, true);

  // Several threads send requests back to back until told to stop.
  constexpr int kThreads = 4;
  std::atomic<bool> stop{false};
  std::atomic<int64_t> ok_count{0};
  absl::Mutex mu;
  std::vector<std::string> failures;  // guarded by mu
  std::vector<std::thread> senders;
  for (int t = 0; t < kThreads; ++t) {
    senders.emplace_back([&] {
      while (!stop.load()) {
        absl::StatusOr<AttendResult> result = (*client)->Attend(inputs);
        if (result.ok()) {
          ok_count.fetch_add(1);
        } else {
          absl::MutexLock lock(&mu);
          failures.push_back(result.status().ToString());
        }
      }
    });
  }
  auto stop_senders = [&] {
    stop.store(true);
    for (std::thread& sender : senders) sender.join();
    senders.clear();
  };

  // Every replica takes part before one goes away.
  const absl::Time warmup_deadline = absl::Now() + absl::Seconds(30);
  bool all_serving = false;
  while (!all_serving && absl::Now() < warmup_deadline) {
    absl::SleepFor(absl::Milliseconds(200));
    all_serving = true;
    for (const auto& replica : replicas_) {
      all_serving = all_serving && Served(*replica).value_or(0) >= 5;
    }
  }
  if (!all_serving) stop_senders();
  ASSERT_TRUE(all_serving) << "not every replica served 5 requests within 30 s";

  ServerProcess& leaving = *replicas_[1];
  ASSERT_TRUE(leaving.Signal(SIGTERM).ok());
  absl::StatusOr<int> exit_code = leaving.WaitForExit(absl::Seconds(60));
  const int64_t ok_at_exit = ok_count.load();
  std::map<std::string, double> served_at_exit;
  for (int i : {0, 2}) {
    served_at_exit[replicas_[i]->host()] = Served(*replicas_[i]).value_or(-1);
  }
  // The others carry on alone for a while.
  absl::SleepFor(absl::Seconds(2));
  stop_senders();

  ASSERT_TRUE(exit_code.ok()) << exit_code.status();
  EXPECT_EQ(*exit_code, 0) << "the leaving replica did not drain cleanly";
  EXPECT_THAT(leaving.Log(), HasSubstr("draining"));
  {
    absl::MutexLock lock(&mu);
    EXPECT_TRUE(failures.empty()) << failures.size() << " requests failed, e.g. "
                                  << failures.front();
  }
  EXPECT_GT(ok_count.load(), ok_at_exit) << "no request succeeded after the replica left";
  for (int i : {0, 2}) {
    absl::StatusOr<double> served = Served(*replicas_[i]);
    ASSERT_TRUE(served.ok()) << served.status();
    EXPECT_GT(*served, served_at_exit[replicas_[i]->host()])
        << replicas_[i]->host() << " took no requests after the replica left";
  }
}

TEST_F(ScaleOutE2eTest, AnchorctlBalancesOverAListTarget) {
  ASSERT_NO_FATAL_FAILURE(StartReplicas({"--cpu_threads=1"}));
  const std::string target_flag = absl::StrCat("--target=", ListTarget());
  absl::StatusOr<ProcessResult> load = RunProcess(
      {AnchorctlBinary(), target_flag, "load", "--requests=30", "--concurrency=3", "--seq_len=256",
       "--q_heads=4", "--kv_heads=2", "--head_dim=64", "--metrics_only"},
      absl::Seconds(120));
  ASSERT_TRUE(load.ok()) << load.status();
  EXPECT_EQ(load->exit_code, 0) << load->output;
  EXPECT_THAT(load->output, HasSubstr("30 ok, 0 failed"));
  for (const auto& replica : replicas_) {
    absl::StatusOr<double> served = Served(*replica);
    ASSERT_TRUE(served.ok()) << served.status();
    EXPECT_GT(*served, 0) << replica->host() << " answered none of anchorctl's requests";
  }

  // Streamed through the list too.
  absl::StatusOr<ProcessResult> stream =
      RunProcess({AnchorctlBinary(), target_flag, "attend", "--stream", "--seq_len=256",
                  "--q_heads=4", "--kv_heads=2", "--head_dim=64", "--verify"},
                 absl::Seconds(120));
  ASSERT_TRUE(stream.ok()) << stream.status();
  EXPECT_EQ(stream->exit_code, 0) << stream->output;
  EXPECT_THAT(stream->output, HasSubstr("verification passed"));

  // A list with a name in it is a usage error that names the element.
  absl::StatusOr<ProcessResult> bad =
      RunProcess({AnchorctlBinary(),
                  absl::StrCat("--target=", replicas_[0]->target(), ",replica-b:50051"), "info"},
                 absl::Seconds(30));
  ASSERT_TRUE(bad.ok()) << bad.status();
  EXPECT_EQ(bad->exit_code, 2) << bad->output;
  EXPECT_THAT(bad->output, HasSubstr("'replica-b:50051' is not an IP address"));
}

}  // namespace
}  // namespace anchorserve::e2e
