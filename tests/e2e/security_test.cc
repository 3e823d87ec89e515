// TLS, mTLS, bearer tokens, the per-caller limit and --reflection against the real server, set
// up the way README.md ("Security: TLS and tokens") says: scripts/make_test_certs.sh makes the
// CA and certificates, the server gets --tls_* and --auth_token_file, the clients --tls_ca_file
// and a token.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "anchorserve/v1/anchorserve.grpc.pb.h"
#include "client/attention_client.h"
#include "client/client_credentials.h"
#include "grpcpp/client_context.h"
#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"
#include "tests/test_util/sanitizers.h"

namespace anchorserve::e2e {
namespace {

constexpr char kTokens[] =
    "# name:token, one per line\n"
    "alice:alice-token-0123456789\n"
    "\n"
    "bob:bob-token-9876543210\n";

void WriteFile(const std::string& path, const std::string& contents) {
  // Written beside and renamed into place, as a secret volume or `mv` would.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << contents;
  }
  ASSERT_EQ(std::rename(tmp.c_str(), path.c_str()), 0) << path;
}

// Runs scripts/make_test_certs.sh DIR NAME.
void MakeCerts(const std::string& dir, const std::string& name) {
  absl::StatusOr<ProcessResult> made =
      RunProcess({"/bin/bash", ANCHOR_MAKE_TEST_CERTS, dir, name}, absl::Seconds(60));
  ASSERT_TRUE(made.ok()) << made.status();
  ASSERT_EQ(made->exit_code, 0) << made->output;
}

class SecurityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::string> dir = MakeTempDir("security");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *dir;
    ASSERT_NO_FATAL_FAILURE(MakeCerts(dir_ + "/certs", "first"));
    ASSERT_NO_FATAL_FAILURE(WriteFile(dir_ + "/tokens", kTokens));
  }

  void TearDown() override {
    if (server_ != nullptr && HasFailure()) std::fprintf(stderr, "%s\n", server_->Log().c_str());
    server_.reset();
  }

  std::string Cert(const std::string& file) const { return dir_ + "/certs/" + file; }

  // TLS (+ mTLS when `client_ca`) and tokens, files re-read every second.
  void StartSecureServer(std::vector<std::string> extra = {}, bool client_ca = false) {
    std::vector<std::string> flags = {
        "--tls_cert_file=" + Cert("server.pem"), "--tls_key_file=" + Cert("server.key"),
        "--auth_token_file=" + dir_ + "/tokens", "--credential_reload_s=1"};
    if (client_ca) flags.push_back("--tls_client_ca_file=" + Cert("ca.pem"));
    flags.insert(flags.end(), extra.begin(), extra.end());
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(flags);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }

  // A client of the server with the CA of `certs_dir` ("" = plaintext), an optional client
  // certificate from the same folder and `token` ("" = none).
  std::unique_ptr<AttentionClient> Client(const std::string& token,
                                          const std::string& certs_dir = "certs",
                                          bool client_cert = false) {
    ClientOptions options;
    options.default_deadline = absl::Seconds(20);
    options.bearer_token = token;
    if (!certs_dir.empty()) {
      TlsFiles files;
      const std::string folder = dir_ + "/" + certs_dir + "/";
      files.ca_file = folder + "ca.pem";
      if (client_cert) {
        files.cert_file = folder + "client.pem";
        files.key_file = folder + "client.key";
      }
      absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
          TlsChannelCredentials(files);
      EXPECT_TRUE(credentials.ok()) << credentials.status();
      if (!credentials.ok()) return nullptr;
      options.channel_credentials = *credentials;
    }
    absl::StatusOr<std::unique_ptr<AttentionClient>> client =
        AttentionClient::Create(server_->target(), options);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? *std::move(client) : nullptr;
  }

  // Polls `probe` every 200 ms for up to `limit`.
  static bool Eventually(const std::function<bool()>& probe,
                         absl::Duration limit = absl::Seconds(20)) {
    const absl::Time end = absl::Now() + limit;
    while (absl::Now() < end) {
      if (probe()) return true;
      absl::SleepFor(absl::Milliseconds(200));
    }
    return probe();
  }

  std::string dir_;
  std::unique_ptr<ServerProcess> server_;
};

TEST_F(SecurityTest, TokensGuardEveryRpcButHealthOverTls) {
  ASSERT_NO_FATAL_FAILURE(StartSecureServer());

  // No token, a wrong one, a malformed header: UNAUTHENTICATED before any handler runs.
  absl::StatusOr<v1::GetServerInfoResponse> info = Client("")->GetServerInfo();
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnauthenticated) << info.status();
  EXPECT_NE(info.status().message().find("authorization: Bearer"), std::string::npos)
      << info.status();
  info = Client("alice-token-0123456788")->GetServerInfo();
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnauthenticated) << info.status();
  EXPECT_NE(info.status().message().find("unknown bearer token"), std::string::npos)
      << info.status();

  // The right token is served, unary and streamed.
  std::unique_ptr<AttentionClient> alice = Client("alice-token-0123456789");
  info = alice->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  absl::StatusOr<QkvTensors> qkv =
      MakeQkv(InputKind::kRandom, 128, 2, 1, 64, DType::kFp32, Layout::kTokenMajor, 7);
  ASSERT_TRUE(qkv.ok()) << qkv.status();
  EXPECT_TRUE(alice->Attend(InputsFor(*qkv)).ok());
  EXPECT_TRUE(alice->AttendStreamed(InputsFor(*qkv)).ok());
  EXPECT_EQ(Client("")->Attend(InputsFor(*qkv)).status().code(),
            absl::StatusCode::kUnauthenticated);

  // Health needs no token (probes carry none).
  absl::StatusOr<HealthStatus> health = Client("")->CheckHealth();
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, grpc::health::v1::HealthCheckResponse::SERVING);

  // Reflection is guarded too.
  ClientOptions no_token;
  TlsFiles files;
  files.ca_file = Cert("ca.pem");
  no_token.channel_credentials = *TlsChannelCredentials(files);
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      CreateClientChannel(server_->target(), no_token);
  ASSERT_TRUE(channel.ok());
  absl::StatusOr<std::vector<std::string>> services = ListServices(*channel);
  EXPECT_EQ(services.status().code(), absl::StatusCode::kUnauthenticated) << services.status();
  services = ListServices(alice->channel());
  ASSERT_TRUE(services.ok()) << services.status();
  EXPECT_NE(std::find(services->begin(), services->end(), "anchorserve.v1.AttentionService"),
            services->end());

  // A plaintext client cannot talk to the TLS port, token or not.
  info = Client("alice-token-0123456789", /*certs_dir=*/"")->GetServerInfo();
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnavailable) << info.status();

  // The caller's name is a label of the metrics and the refused calls are counted.
  absl::StatusOr<std::string> metrics = HttpGet(server_->metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  absl::StatusOr<double> served =
      FindMetricValue(*metrics, "anchorserve_caller_requests_total",
                      {"caller=\"alice\"", "rpc=\"GetServerInfo\"", "code=\"OK\""});
  ASSERT_TRUE(served.ok()) << served.status();
  EXPECT_GE(*served, 1);
  absl::StatusOr<double> refused =
      FindMetricValue(*metrics, "anchorserve_unauthenticated_total", {});
  ASSERT_TRUE(refused.ok()) << refused.status();
  EXPECT_GE(*refused, 4);
}

TEST_F(SecurityTest, AnchorctlWithTokenFileOrEnvironment) {
  ASSERT_NO_FATAL_FAILURE(StartSecureServer());
  ASSERT_NO_FATAL_FAILURE(WriteFile(dir_ + "/alice.token", "alice-token-0123456789\n"));
  const std::vector<std::string> base = {AnchorctlBinary(), "--target=" + server_->target(),
                                         "--tls_ca_file=" + Cert("ca.pem"), "--deadline_s=20"};
  auto run = [&](std::vector<std::string> prefix, std::vector<std::string> extra) {
    prefix.insert(prefix.end(), base.begin(), base.end());
    prefix.insert(prefix.end(), extra.begin(), extra.end());
    absl::StatusOr<ProcessResult> result = RunProcess(prefix, absl::Seconds(60));
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? *result : ProcessResult{};
  };
  ProcessResult with_file = run({}, {"--token_file=" + dir_ + "/alice.token", "info"});
  EXPECT_EQ(with_file.exit_code, 0) << with_file.output;
  ProcessResult with_env = run({"/usr/bin/env", "ANCHOR_TOKEN=bob-token-9876543210"}, {"info"});
  EXPECT_EQ(with_env.exit_code, 0) << with_env.output;
  ProcessResult without = run({"/usr/bin/env", "-u", "ANCHOR_TOKEN"}, {"info"});
  EXPECT_EQ(without.exit_code, 1) << without.output;
  EXPECT_NE(without.output.find("UNAUTHENTICATED"), std::string::npos) << without.output;
  ProcessResult health = run({"/usr/bin/env", "-u", "ANCHOR_TOKEN"}, {"health"});
  EXPECT_EQ(health.exit_code, 0) << health.output;
}

TEST_F(SecurityTest, TokenFileChangesArePickedUpAndABadFileKeepsTheOldTokens) {
  ASSERT_NO_FATAL_FAILURE(StartSecureServer());
  ASSERT_TRUE(Client("bob-token-9876543210")->GetServerInfo().ok());

  ASSERT_NO_FATAL_FAILURE(WriteFile(dir_ + "/tokens",
                                    "alice:alice-token-0123456789\n"
                                    "carol:carol-token-5555555555\n"));
  EXPECT_TRUE(Eventually([&] { return Client("carol-token-5555555555")->GetServerInfo().ok(); }));
  EXPECT_EQ(Client("bob-token-9876543210")->GetServerInfo().status().code(),
            absl::StatusCode::kUnauthenticated);

  // A duplicate name: logged, and the previous table stays.
  ASSERT_NO_FATAL_FAILURE(
      WriteFile(dir_ + "/tokens", "carol:carol-token-5555555555\ncarol:other-token-1\n"));
  EXPECT_TRUE(Eventually(
      [&] { return server_->Log().find("duplicate name 'carol'") != std::string::npos; }));
  EXPECT_TRUE(Client("alice-token-0123456789")->GetServerInfo().ok());
  EXPECT_TRUE(Client("carol-token-5555555555")->GetServerInfo().ok());
}

TEST_F(SecurityTest, MutualTlsRequiresAClientCertificate) {
  ASSERT_NO_FATAL_FAILURE(StartSecureServer({}, /*client_ca=*/true));
  const std::string token = "alice-token-0123456789";
  absl::StatusOr<v1::GetServerInfoResponse> info = Client(token)->GetServerInfo();
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnavailable) << info.status();
  info = Client(token, "certs", /*client_cert=*/true)->GetServerInfo();
  EXPECT_TRUE(info.ok()) << info.status();
  // A client certificate of another CA is refused as well.
  ASSERT_NO_FATAL_FAILURE(MakeCerts(dir_ + "/other", "other"));
  info = Client(token, "other", /*client_cert=*/true)->GetServerInfo();
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnavailable) << info.status();
}

TEST_F(SecurityTest, RotatedServerCertificateIsServedToNewConnections) {
  ASSERT_NO_FATAL_FAILURE(StartSecureServer());
  const std::string token = "alice-token-0123456789";
  ASSERT_TRUE(Client(token, "certs")->GetServerInfo().ok());
  // A new CA and a server certificate it signed replace the served files.
  ASSERT_NO_FATAL_FAILURE(MakeCerts(dir_ + "/next", "next"));
  ASSERT_EQ(Client(token, "next")->GetServerInfo().status().code(), absl::StatusCode::kUnavailable);
  for (const char* file : {"server.key", "server.pem"}) {
    std::ifstream in(dir_ + "/next/" + file);
    std::string contents((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_NO_FATAL_FAILURE(WriteFile(Cert(file), contents));
  }
  EXPECT_TRUE(Eventually([&] { return Client(token, "next")->GetServerInfo().ok(); }));
  EXPECT_EQ(Client(token, "certs")->GetServerInfo().status().code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(SecurityTest, PerCallerLimitRefusesOnlyThatCaller) {
  ASSERT_NO_FATAL_FAILURE(StartSecureServer({"--max_inflight_per_caller=1"}));
  std::unique_ptr<AttentionClient> alice = Client("alice-token-0123456789");
  // An AttendStream that sends nothing holds alice's one slot.
  auto stub = v1::AttentionService::NewStub(alice->channel());
  grpc::ClientContext held;
  held.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  auto stream = stub->AttendStream(&held);
  // Let the stream reach the server before the first probe: a probe in flight when it arrives
  // would take the slot and get the stream refused instead (the sanitizer builds are slower).
  absl::SleepFor(kUnderSanitizer ? absl::Seconds(3) : absl::Milliseconds(300));
  EXPECT_TRUE(Eventually([&] {
    return alice->GetServerInfo().status().code() == absl::StatusCode::kResourceExhausted;
  }));
  absl::StatusOr<v1::GetServerInfoResponse> info = alice->GetServerInfo();
  EXPECT_NE(info.status().message().find("--max_inflight_per_caller"), std::string::npos)
      << info.status();
  EXPECT_TRUE(Client("bob-token-9876543210")->GetServerInfo().ok());
  held.TryCancel();
  stream->Finish();
  EXPECT_TRUE(Eventually([&] { return alice->GetServerInfo().ok(); }));
}

TEST_F(SecurityTest, PlaintextPortChecksTokensAndReflectionCanBeTurnedOff) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(
      {"--auth_token_file=" + dir_ + "/tokens", "--reflection=false", "--metrics_host=127.0.0.1"});
  ASSERT_TRUE(server.ok()) << server.status();
  server_ = *std::move(server);
  EXPECT_EQ(Client("", "")->GetServerInfo().status().code(), absl::StatusCode::kUnauthenticated);
  std::unique_ptr<AttentionClient> bob = Client("bob-token-9876543210", "");
  EXPECT_TRUE(bob->GetServerInfo().ok());
  absl::StatusOr<std::vector<std::string>> services = ListServices(bob->channel());
  EXPECT_EQ(services.status().code(), absl::StatusCode::kUnimplemented) << services.status();
  EXPECT_TRUE(HttpGet(server_->metrics_port(), "/metrics").ok());
}

TEST_F(SecurityTest, BadTokenFileStopsStartupNamingFileAndLine) {
  ASSERT_NO_FATAL_FAILURE(WriteFile(dir_ + "/bad", "alice:a-token\n# fine\nbob:\n"));
  absl::StatusOr<ProcessResult> run =
      RunProcess({AnchorserveBinary(), "--host=127.0.0.1", "--grpc_port=0", "--metrics_port=-1",
                  "--backend=cpu", "--auth_token_file=" + dir_ + "/bad"},
                 absl::Seconds(30));
  ASSERT_TRUE(run.ok()) << run.status();
  EXPECT_EQ(run->exit_code, 2) << run->output;
  EXPECT_NE(run->output.find(dir_ + "/bad:3: empty token for 'bob'"), std::string::npos)
      << run->output;
}

}  // namespace
}  // namespace anchorserve::e2e
