// Target forms, the replica service config and whole-call retries of the client library (label
// cpu: no anchorserve process; one in-process gRPC server for the service config).
#include "client/channel_target.h"

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/attention_client.h"
#include "gmock/gmock.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"

namespace anchorserve {
namespace {

using ::testing::HasSubstr;

TEST(NormalizeTargetTest, SingleTargetsAndUrisPassThrough) {
  for (const char* target : {"127.0.0.1:50051", "localhost:50051", "anchorserve.default.svc:50051",
                             "dns:///anchorserve-headless:50051",
                             "dns://10.0.0.10:53/anchorserve:50051", "ipv4:10.0.0.1:1,10.0.0.2:2",
                             "IPV6:[::1]:1,[::1]:2", "unix:/tmp/anchorserve.sock", "[::1]:50051"}) {
    absl::StatusOr<std::string> normalized = NormalizeTarget(target);
    ASSERT_TRUE(normalized.ok()) << target << ": " << normalized.status();
    EXPECT_EQ(*normalized, target);
  }
}

TEST(NormalizeTargetTest, ListsBecomeOneFamilyUri) {
  EXPECT_EQ(NormalizeTarget("10.0.0.1:50051,10.0.0.2:50052").value_or("?"),
            "ipv4:10.0.0.1:50051,10.0.0.2:50052");
  EXPECT_EQ(NormalizeTarget(" 127.0.0.1:1 , 127.0.0.2:2,127.0.0.3:3 ").value_or("?"),
            "ipv4:127.0.0.1:1,127.0.0.2:2,127.0.0.3:3");
  EXPECT_EQ(NormalizeTarget("[::1]:1,[fd00::2]:65535").value_or("?"),
            "ipv6:[::1]:1,[fd00::2]:65535");
}

TEST(NormalizeTargetTest, BadListsNameTheElement) {
  const struct {
    const char* target;
    const char* message;
  } cases[] = {
      {"", "target must not be empty"},
      {"pod-a:50051,pod-b:50051", "'pod-a:50051' is not an IP address"},
      {"10.0.0.1:1,,10.0.0.2:2", "list element '' is empty"},
      {"10.0.0.1:1,", "list element '' is empty"},
      {"10.0.0.1,10.0.0.2:1", "'10.0.0.1' has no port"},
      {"10.0.0.1:0,10.0.0.2:1", "'10.0.0.1:0' has no port in [1, 65535]"},
      {"10.0.0.1:65536,10.0.0.2:1", "'10.0.0.1:65536' has no port in [1, 65535]"},
      {"10.0.0.1:+80,10.0.0.2:1", "'10.0.0.1:+80' has no port"},
      {"::1:5,::2:5", "'::1:5' is an IPv6 address without brackets"},
      {"[::1]5,[::2]:5", "'[::1]5' has no ']:port'"},
      {"[10.0.0.1]:5,[::2]:5", "'[10.0.0.1]:5' is not an IPv6 address"},
      {"[::1]:1,10.0.0.1:2", "mixes IPv4 and IPv6"},
  };
  for (const auto& c : cases) {
    absl::StatusOr<std::string> normalized = NormalizeTarget(c.target);
    EXPECT_EQ(normalized.status().code(), absl::StatusCode::kInvalidArgument) << c.target;
    EXPECT_THAT(std::string(normalized.status().message()), HasSubstr(c.message)) << c.target;
  }
}

TEST(NormalizeTargetTest, ClientCreationRejectsABadList) {
  absl::StatusOr<std::unique_ptr<AttentionClient>> client =
      AttentionClient::Create("10.0.0.1:1,pod-b:2");
  EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(client.status().message()), HasSubstr("'pod-b:2'"));
}

// The channel accepts the service config (a malformed one would leave it failing every call) and
// balances with round_robin.
TEST(ReplicaServiceConfigTest, ChannelBalancesRoundRobinWithRetries) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  // Every method UNIMPLEMENTED; registered so that the server polls its callback queue.
  v1::AttentionService::CallbackService attention;
  builder.RegisterService(&attention);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(port, 0);

  const std::string target = absl::StrCat("127.0.0.1:", port, ",127.0.0.1:", port);
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      CreateClientChannel(target, ClientOptions{});
  ASSERT_TRUE(channel.ok()) << channel.status();
  ASSERT_TRUE((*channel)->WaitForConnected(absl::ToChronoTime(absl::Now() + absl::Seconds(10))));
  EXPECT_EQ((*channel)->GetLoadBalancingPolicyName(), "round_robin");
  const std::string config = (*channel)->GetServiceConfigJSON();
  EXPECT_THAT(config, HasSubstr("retryPolicy"));
  EXPECT_THAT(config, HasSubstr("\"method\": \"Attend\""));

  // A call works through it (the health service answers "" with SERVING).
  absl::StatusOr<std::unique_ptr<AttentionClient>> client = AttentionClient::Create(target);
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<HealthStatus> health = (*client)->CheckHealth("");
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, grpc::health::v1::HealthCheckResponse::SERVING);
  server->Shutdown(absl::ToChronoTime(absl::Now()));
}

WholeCallRetry FastRetry(int attempts) {
  WholeCallRetry retry;
  retry.max_attempts = attempts;
  retry.first_backoff = absl::Milliseconds(1);
  retry.max_backoff = absl::Milliseconds(2);
  return retry;
}

TEST(RetryWholeCallTest, RetriesUnavailableUpToTheBound) {
  int calls = 0;
  absl::StatusOr<int> result = RetryWholeCall(
      FastRetry(3),
      [&]() -> absl::StatusOr<int> {
        ++calls;
        return absl::UnavailableError("server is draining");
      },
      [] { return true; });
  EXPECT_EQ(calls, 3);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(result.status().message()),
              HasSubstr("server is draining (3 attempts, every one UNAVAILABLE)"));
}

TEST(RetryWholeCallTest, StopsAtSuccessOtherCodesOrWhenTheCallerSaysSo) {
  int calls = 0;
  absl::StatusOr<int> ok = RetryWholeCall(
      FastRetry(5),
      [&]() -> absl::StatusOr<int> {
        if (++calls < 3) return absl::UnavailableError("gone");
        return 7;
      },
      [] { return true; });
  EXPECT_EQ(calls, 3);
  EXPECT_EQ(ok.value_or(0), 7);

  calls = 0;
  absl::Status invalid = RetryWholeCall(
      FastRetry(5),
      [&] {
        ++calls;
        return absl::InvalidArgumentError("q.shape");
      },
      [] { return true; });
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(invalid.code(), absl::StatusCode::kInvalidArgument);

  calls = 0;
  absl::Status after_response = RetryWholeCall(
      FastRetry(5),
      [&] {
        ++calls;
        return absl::UnavailableError("connection reset");
      },
      [] { return false; });
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(after_response.message(), "connection reset");

  calls = 0;
  absl::Status single = RetryWholeCall(
      FastRetry(1),
      [&] {
        ++calls;
        return absl::UnavailableError("gone");
      },
      [] { return true; });
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(single.message(), "gone");
}

}  // namespace
}  // namespace anchorserve
