#include "server/server_config.h"

#include <cmath>
#include <functional>
#include <limits>
#include <string>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

ABSL_DECLARE_FLAG(std::string, backend);
ABSL_DECLARE_FLAG(int32_t, grpc_port);
ABSL_DECLARE_FLAG(double, max_queue_delay_ms);
ABSL_DECLARE_FLAG(bool, pin_host_buffers);
ABSL_DECLARE_FLAG(double, max_queue_time_ms);
ABSL_DECLARE_FLAG(int64_t, max_inflight_bytes);
ABSL_DECLARE_FLAG(double, upload_stall_timeout_s);
ABSL_DECLARE_FLAG(double, default_theta);
ABSL_DECLARE_FLAG(double, default_mass_target);
ABSL_DECLARE_FLAG(double, default_mass_density_cap);
ABSL_DECLARE_FLAG(double, default_mass_min_theta);
ABSL_DECLARE_FLAG(int64_t, max_message_bytes);
ABSL_DECLARE_FLAG(double, drain_timeout_s);
ABSL_DECLARE_FLAG(double, max_connection_age_s);
ABSL_DECLARE_FLAG(double, max_connection_age_grace_s);

namespace anchorserve {
namespace {

using ::testing::HasSubstr;

TEST(ServerConfigTest, DefaultsAreValidAndMatchTheContract) {
  const ServerConfig config;
  EXPECT_TRUE(config.Validate().ok()) << config.Validate();
  EXPECT_EQ(config.grpc_port, 50051);
  EXPECT_EQ(config.metrics_port, 9464);
  EXPECT_EQ(config.max_message_bytes, 268435456);
  EXPECT_EQ(config.max_request_bytes, int64_t{4294967296});
  EXPECT_EQ(config.stream_chunk_bytes, 4194304);
  EXPECT_EQ(config.max_queue_delay, absl::Milliseconds(2));
  EXPECT_EQ(config.max_connection_age, absl::Seconds(300));
  EXPECT_EQ(config.max_connection_age_grace, absl::ZeroDuration());
  EXPECT_TRUE(ValidateAnchorConfig(config.defaults).ok());
  // Plaintext, no tokens, reflection on, metrics where the gRPC port is: local use as before.
  EXPECT_TRUE(config.tls_cert_file.empty());
  EXPECT_TRUE(config.auth_token_file.empty());
  EXPECT_TRUE(config.reflection);
  EXPECT_EQ(config.MetricsHost(), config.host);
  EXPECT_TRUE(config.pin_host_buffers);
}

TEST(ServerConfigTest, EveryBadKnobIsNamed) {
  const struct {
    std::function<void(ServerConfig&)> set;
    const char* flag;
  } cases[] = {
      {[](ServerConfig& c) { c.host = ""; }, "--host"},
      {[](ServerConfig& c) { c.tls_cert_file = "c.pem"; }, "--tls_cert_file and --tls_key_file"},
      {[](ServerConfig& c) { c.tls_key_file = "k.pem"; }, "--tls_cert_file and --tls_key_file"},
      {[](ServerConfig& c) { c.tls_client_ca_file = "ca.pem"; }, "--tls_client_ca_file needs"},
      {[](ServerConfig& c) { c.max_inflight_per_caller = 2; }, "needs --auth_token_file"},
      {[](ServerConfig& c) { c.max_inflight_per_caller = -1; }, "--max_inflight_per_caller"},
      {[](ServerConfig& c) { c.credential_reload_interval = absl::Milliseconds(1500); },
       "--credential_reload_s"},
      {[](ServerConfig& c) { c.metrics_host = "a b"; }, "--metrics_host"},
      {[](ServerConfig& c) { c.grpc_port = -1; }, "--grpc_port"},
      {[](ServerConfig& c) { c.grpc_port = 65536; }, "--grpc_port"},
      {[](ServerConfig& c) { c.metrics_port = 70000; }, "--metrics_port"},
      {[](ServerConfig& c) { c.metrics_port = c.grpc_port; }, "--metrics_port must differ"},
      {[](ServerConfig& c) { c.metrics_port = -2; }, "--metrics_port must be in [-1, 65535]"},
      {[](ServerConfig& c) { c.backend.cpu_threads = -2; }, "--cpu_threads"},
      {[](ServerConfig& c) { c.backend.cuda_device = -1; }, "--cuda_device"},
      {[](ServerConfig& c) { c.max_batch_requests = 0; }, "--max_batch_requests"},
      {[](ServerConfig& c) { c.max_batch_tokens = 0; }, "--max_batch_tokens"},
      {[](ServerConfig& c) { c.max_queue_delay = absl::Milliseconds(-1); }, "--max_queue_delay_ms"},
      {[](ServerConfig& c) { c.max_queue_size = 0; }, "--max_queue_size"},
      {[](ServerConfig& c) { c.max_queue_time = absl::Milliseconds(-1); }, "--max_queue_time_ms"},
      {[](ServerConfig& c) { c.max_inflight_bytes = -1; }, "--max_inflight_bytes"},
      {[](ServerConfig& c) { c.upload_stall_timeout = absl::ZeroDuration(); },
       "--upload_stall_timeout_s"},
      {[](ServerConfig& c) { c.max_message_bytes = int64_t{1} << 31; }, "--max_message_bytes"},
      {[](ServerConfig& c) { c.max_message_bytes = 0; }, "--max_message_bytes"},
      {[](ServerConfig& c) { c.max_request_bytes = 0; }, "--max_request_bytes"},
      {[](ServerConfig& c) { c.max_seq_len = 0; }, "--max_seq_len"},
      {[](ServerConfig& c) { c.max_heads = -4; }, "--max_heads"},
      {[](ServerConfig& c) { c.stream_chunk_bytes = 0; }, "--stream_chunk_bytes"},
      {[](ServerConfig& c) { c.stream_chunk_bytes = c.max_message_bytes; }, "--stream_chunk_bytes"},
      {[](ServerConfig& c) { c.drain_timeout = absl::Seconds(-1); }, "--drain_timeout_s"},
      {[](ServerConfig& c) { c.max_connection_age = absl::Seconds(-1); }, "--max_connection_age_s"},
      {[](ServerConfig& c) { c.max_connection_age = absl::Milliseconds(500); },
       "--max_connection_age_s must be 0 (no limit) or at least 1"},
      {[](ServerConfig& c) { c.max_connection_age = absl::Hours(25); }, "--max_connection_age_s"},
      {[](ServerConfig& c) { c.max_connection_age_grace = absl::Seconds(-1); },
       "--max_connection_age_grace_s"},
      {[](ServerConfig& c) { c.defaults.theta = std::nanf(""); }, "--default_theta"},
      {[](ServerConfig& c) { c.defaults.block_size = 0; }, "--default_block_size"},
      {[](ServerConfig& c) { c.defaults.block_size = kMaxBlockSize + 1; }, "--default_block_size"},
      {[](ServerConfig& c) { c.defaults.step = 0; }, "--default_step"},
      {[](ServerConfig& c) { c.defaults.init_groups = -1; }, "--default_init_groups"},
      {[](ServerConfig& c) { c.defaults.local_groups = 0; }, "--default_local_groups"},
      {[](ServerConfig& c) { c.defaults.mass_target = -0.5f; }, "--default_mass_target"},
      {[](ServerConfig& c) { c.defaults.mass_target = 1.5f; }, "--default_mass_target"},
      {[](ServerConfig& c) { c.defaults.mass_target = std::nanf(""); }, "--default_mass_target"},
      {[](ServerConfig& c) { c.defaults.mass_density_cap = 0.0f; }, "--default_mass_density_cap"},
      {[](ServerConfig& c) { c.defaults.mass_density_cap = 2.0f; }, "--default_mass_density_cap"},
      {[](ServerConfig& c) { c.defaults.mass_density_cap = std::nanf(""); },
       "--default_mass_density_cap"},
      {[](ServerConfig& c) { c.defaults.mass_min_theta = INFINITY; }, "--default_mass_min_theta"},
      {[](ServerConfig& c) { c.defaults.mass_min_theta = std::nanf(""); },
       "--default_mass_min_theta"},
  };
  for (const auto& c : cases) {
    ServerConfig config;
    c.set(config);
    const absl::Status status = config.Validate();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.flag;
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.flag));
  }
}

TEST(ServerConfigTest, EdgeValuesAreAccepted) {
  ServerConfig config;
  config.grpc_port = 0;
  config.metrics_port = 0;  // both "pick a free port"
  config.max_message_bytes = kMaxGrpcMessageBytes;
  config.max_queue_delay = absl::ZeroDuration();
  config.drain_timeout = absl::ZeroDuration();
  config.max_connection_age = absl::ZeroDuration();  // no limit
  config.max_connection_age_grace = absl::Hours(24);
  config.defaults.theta = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(config.Validate().ok()) << config.Validate();
  config.defaults.theta = -std::numeric_limits<float>::infinity();
  EXPECT_TRUE(config.Validate().ok()) << config.Validate();
}

TEST(ServerConfigTest, FromFlags) {
  absl::FlagSaver saver;  // restores the flags after the test
  absl::SetFlag(&FLAGS_backend, "cpu");
  absl::SetFlag(&FLAGS_grpc_port, 0);
  absl::SetFlag(&FLAGS_max_queue_delay_ms, 0.5);
  absl::SetFlag(&FLAGS_default_theta, std::numeric_limits<double>::infinity());
  absl::SetFlag(&FLAGS_drain_timeout_s, 1.5);
  absl::SetFlag(&FLAGS_max_queue_time_ms, 250.0);
  absl::SetFlag(&FLAGS_max_inflight_bytes, int64_t{1} << 30);
  absl::SetFlag(&FLAGS_upload_stall_timeout_s, 2.5);
  absl::SetFlag(&FLAGS_max_connection_age_s, 60);
  absl::SetFlag(&FLAGS_max_connection_age_grace_s, 0.25);
  absl::SetFlag(&FLAGS_pin_host_buffers, false);
  absl::StatusOr<ServerConfig> config = ServerConfigFromFlags();
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->backend.kind, BackendKind::kCpu);
  EXPECT_EQ(config->grpc_port, 0);
  EXPECT_EQ(config->max_queue_delay, absl::Microseconds(500));
  EXPECT_EQ(config->drain_timeout, absl::Milliseconds(1500));
  EXPECT_EQ(config->max_queue_time, absl::Milliseconds(250));
  EXPECT_EQ(config->max_inflight_bytes, int64_t{1} << 30);
  EXPECT_EQ(config->upload_stall_timeout, absl::Milliseconds(2500));
  EXPECT_EQ(config->max_connection_age, absl::Seconds(60));
  EXPECT_EQ(config->max_connection_age_grace, absl::Milliseconds(250));
  EXPECT_FALSE(config->pin_host_buffers);
  EXPECT_TRUE(std::isinf(config->defaults.theta));
  EXPECT_EQ(config->defaults.mass_target, 0.0f);  // off unless asked for
  EXPECT_EQ(config->defaults.mass_density_cap, 1.0f);
  EXPECT_EQ(config->defaults.mass_min_theta, 0.0f);

  absl::SetFlag(&FLAGS_default_mass_target, 0.95);
  absl::SetFlag(&FLAGS_default_mass_density_cap, 0.5);
  absl::SetFlag(&FLAGS_default_mass_min_theta, -1.5);
  config = ServerConfigFromFlags();
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->defaults.mass_target, 0.95f);
  EXPECT_EQ(config->defaults.mass_density_cap, 0.5f);
  EXPECT_EQ(config->defaults.mass_min_theta, -1.5f);
  absl::SetFlag(&FLAGS_default_mass_target, 1.5);
  EXPECT_THAT(std::string(ServerConfigFromFlags().status().message()),
              HasSubstr("--default_mass_target must be in [0, 1]"));
  absl::SetFlag(&FLAGS_default_mass_target, 0.0);
  absl::SetFlag(&FLAGS_default_mass_density_cap, 0.0);
  EXPECT_THAT(std::string(ServerConfigFromFlags().status().message()),
              HasSubstr("--default_mass_density_cap must be in (0, 1]"));
  absl::SetFlag(&FLAGS_default_mass_density_cap, 1.0);
  absl::SetFlag(&FLAGS_default_mass_min_theta, 1e300);  // beyond float: +inf
  EXPECT_THAT(std::string(ServerConfigFromFlags().status().message()),
              HasSubstr("--default_mass_min_theta must be finite"));
  absl::SetFlag(&FLAGS_default_mass_min_theta, 0.0);

  absl::SetFlag(&FLAGS_backend, "gpu");
  EXPECT_THAT(std::string(ServerConfigFromFlags().status().message()),
              HasSubstr("--backend must be one of auto, cpu, cuda, got 'gpu'"));
  absl::SetFlag(&FLAGS_backend, "auto");
  absl::SetFlag(&FLAGS_max_message_bytes, int64_t{3} << 30);
  EXPECT_THAT(std::string(ServerConfigFromFlags().status().message()),
              HasSubstr("--max_message_bytes"));
  absl::SetFlag(&FLAGS_max_message_bytes, 268435456);
  absl::SetFlag(&FLAGS_default_theta, std::nan(""));
  EXPECT_THAT(std::string(ServerConfigFromFlags().status().message()),
              HasSubstr("--default_theta"));
  absl::SetFlag(&FLAGS_default_theta, 12.0);
  absl::SetFlag(&FLAGS_max_connection_age_grace_s, std::nan(""));
  EXPECT_THAT(std::string(ServerConfigFromFlags().status().message()),
              HasSubstr("--max_connection_age_grace_s must be in [0, 86400]"));
}

TEST(ServerConfigTest, JoinHostPort) {
  EXPECT_EQ(JoinHostPort("127.0.0.1", 80), "127.0.0.1:80");
  EXPECT_EQ(JoinHostPort("::1", 80), "[::1]:80");
  EXPECT_EQ(JoinHostPort("[::]", 80), "[::]:80");
}

}  // namespace
}  // namespace anchorserve
