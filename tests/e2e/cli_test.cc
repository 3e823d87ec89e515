// Smoke tests of the anchorctl binary against a running server.
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"

namespace anchorserve::e2e {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

class CliE2eTest : public SharedServerTest {
 protected:
  static void SetUpTestSuite() {
    StartSharedServer(
        {"--cpu_threads=2", "--max_message_bytes=1048576", "--stream_chunk_bytes=262144"});
  }

  // anchorctl --target=<server> ARGS...
  static ProcessResult Run(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {AnchorctlBinary(),
                                     absl::StrCat("--target=", server_->target())};
    argv.insert(argv.end(), args.begin(), args.end());
    absl::StatusOr<ProcessResult> result = RunProcess(argv, absl::Seconds(120));
    if (!result.ok()) return ProcessResult{-1, 0, result.status().ToString()};
    return *std::move(result);
  }
};

TEST_F(CliE2eTest, HelpDescribesTheCommands) {
  absl::StatusOr<ProcessResult> help = RunProcess({AnchorctlBinary(), "--help"}, absl::Seconds(30));
  ASSERT_TRUE(help.ok()) << help.status();
  EXPECT_THAT(help->output, HasSubstr("usage: anchorctl"));
  EXPECT_THAT(help->output, HasSubstr("attend"));
  EXPECT_THAT(help->output, HasSubstr("health"));
  EXPECT_THAT(help->output, HasSubstr("--seq_len"));

  absl::StatusOr<ProcessResult> no_command = RunProcess({AnchorctlBinary()}, absl::Seconds(30));
  ASSERT_TRUE(no_command.ok()) << no_command.status();
  EXPECT_EQ(no_command->exit_code, 2);
  EXPECT_THAT(no_command->output, HasSubstr("expected exactly one command"));
}

TEST_F(CliE2eTest, InfoPrintsTheServer) {
  const ProcessResult result = Run({"info"});
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_THAT(result.output, HasSubstr("backend:    cpu"));
  EXPECT_THAT(result.output, HasSubstr("max_message_bytes   1048576"));
  EXPECT_THAT(result.output, HasSubstr("defaults:   mode=auto theta=12"));
}

TEST_F(CliE2eTest, HealthOfAServingServer) {
  const ProcessResult whole = Run({"--deadline_s=10", "health"});
  EXPECT_EQ(whole.exit_code, 0) << whole.output;
  EXPECT_EQ(whole.output, "SERVING\n");
  const ProcessResult service =
      Run({"--deadline_s=10", "--service=anchorserve.v1.AttentionService", "health"});
  EXPECT_EQ(service.exit_code, 0) << service.output;
  EXPECT_EQ(service.output, "SERVING\n");

  const ProcessResult unknown = Run({"--deadline_s=10", "--service=no.such.Service", "health"});
  EXPECT_EQ(unknown.exit_code, 1) << unknown.output;
  EXPECT_THAT(unknown.output,
              HasSubstr(absl::StrCat("server at ", server_->target(),
                                     " keeps no health status for service 'no.such.Service'")));
}

TEST_F(CliE2eTest, AttendVerifiesUnaryAndStreamed) {
  // 256 x (4 + 2 + 2) x 64 bf16 = 256 KiB: unary under the 1 MiB limit.
  const ProcessResult unary =
      Run({"attend", "--seq_len=256", "--q_heads=4", "--kv_heads=2", "--head_dim=64",
           "--block_size=16", "--step=2", "--verify", "--per_head", "--recall"});
  EXPECT_EQ(unary.exit_code, 0) << unary.output;
  EXPECT_THAT(unary.output, HasSubstr("verification passed"));
  EXPECT_THAT(unary.output, HasSubstr("unary"));
  EXPECT_THAT(unary.output, HasSubstr("density:"));
  EXPECT_THAT(unary.output, HasSubstr("recall:"));
  EXPECT_THAT(unary.output, HasSubstr("end-to-end latency:"));

  // 2048 x (4 + 2 + 2) x 64 fp16 = 2 MiB: over the server's 1 MiB limit, so streamed.
  const ProcessResult big = Run({"attend", "--inputs=random", "--seq_len=2048", "--q_heads=4",
                                 "--kv_heads=2", "--head_dim=64", "--dtype=fp16", "--layout=head",
                                 "--block_size=32", "--step=4", "--verify"});
  EXPECT_EQ(big.exit_code, 0) << big.output;
  EXPECT_THAT(big.output, HasSubstr("streamed"));
  EXPECT_THAT(big.output, HasSubstr("verification passed"));
}

TEST_F(CliE2eTest, AttendInAutoModeSaysWhichModeRanAndWhy) {
  // The server default is auto. Groups of 32 rows: at N = 64 the anchor region is everything
  // (dense); at N = 512 it is a small part (anchor).
  const ProcessResult short_run = Run({"attend", "--seq_len=64", "--q_heads=2", "--kv_heads=1",
                                       "--head_dim=64", "--block_size=8", "--step=4", "--verify"});
  EXPECT_EQ(short_run.exit_code, 0) << short_run.output;
  EXPECT_THAT(short_run.output, HasSubstr("effective config:   mode=dense"));
  EXPECT_THAT(short_run.output, HasSubstr("mode choice:        auto: dense, the anchor region is "
                                          "100% of the causal entries at N=64"));
  EXPECT_THAT(short_run.output, HasSubstr("verification passed"));

  const ProcessResult long_run =
      Run({"attend", "--seq_len=512", "--q_heads=2", "--kv_heads=1", "--head_dim=64",
           "--block_size=8", "--step=4", "--mode=auto", "--verify"});
  EXPECT_EQ(long_run.exit_code, 0) << long_run.output;
  EXPECT_THAT(long_run.output, HasSubstr("effective config:   mode=anchor"));
  EXPECT_THAT(long_run.output, HasSubstr("mode choice:        auto: anchor"));
  EXPECT_THAT(long_run.output, HasSubstr("verification passed"));

  // An explicit mode is kept and needs no explanation.
  const ProcessResult explicit_anchor =
      Run({"attend", "--seq_len=64", "--q_heads=2", "--kv_heads=1", "--head_dim=64",
           "--block_size=8", "--step=4", "--mode=anchor"});
  EXPECT_EQ(explicit_anchor.exit_code, 0) << explicit_anchor.output;
  EXPECT_THAT(explicit_anchor.output, HasSubstr("effective config:   mode=anchor"));
  EXPECT_THAT(explicit_anchor.output, Not(HasSubstr("mode choice:")));

  const ProcessResult bad = Run(
      {"attend", "--seq_len=64", "--q_heads=2", "--kv_heads=1", "--head_dim=64", "--mode=fast"});
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  EXPECT_THAT(bad.output, HasSubstr("--mode must be auto, anchor or dense"));
}

TEST_F(CliE2eTest, AttendWithAMassTarget) {
  const ProcessResult run =
      Run({"attend", "--seq_len=256", "--q_heads=2", "--kv_heads=1", "--head_dim=64",
           "--block_size=16", "--step=2", "--mass_target=0.9", "--mass_min_theta=1", "--per_head",
           "--recall", "--metrics_only"});
  EXPECT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("mass_target=0.9 mass_density_cap=1 mass_min_theta=1"));
  EXPECT_THAT(run.output, HasSubstr("mass target:        0.9000, estimated kept mass"));
  EXPECT_THAT(run.output, HasSubstr("theta_min"));
  EXPECT_THAT(run.output, HasSubstr("true_kept"));

  const ProcessResult out_of_range = Run({"attend", "--seq_len=64", "--q_heads=2", "--kv_heads=1",
                                          "--head_dim=64", "--mass_target=1.5"});
  EXPECT_EQ(out_of_range.exit_code, 1) << out_of_range.output;
  EXPECT_THAT(out_of_range.output, HasSubstr("rejected Attend: config.mass_target"));
}

TEST_F(CliE2eTest, AttendReadsAndWritesNpy) {
  absl::StatusOr<std::string> dir = MakeTempDir("anchor_cli_npy_");
  ASSERT_TRUE(dir.ok()) << dir.status();
  absl::StatusOr<QkvTensors> qkv =
      MakeQkv(InputKind::kRandom, 100, 2, 1, 32, DType::kFp32, Layout::kTokenMajor, 17);
  ASSERT_TRUE(qkv.ok()) << qkv.status();
  const std::string q = *dir + "/q.npy", k = *dir + "/k.npy", v = *dir + "/v.npy",
                    out = *dir + "/out.npy";
  ASSERT_TRUE(WriteTensorNpy(q, qkv->q).ok());
  ASSERT_TRUE(WriteTensorNpy(k, qkv->k).ok());
  ASSERT_TRUE(WriteTensorNpy(v, qkv->v).ok());
  const ProcessResult result =
      Run({"attend", absl::StrCat("--q=", q), absl::StrCat("--k=", k), absl::StrCat("--v=", v),
           absl::StrCat("--out=", out), "--mode=dense", "--stream", "--verify"});
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_THAT(result.output, HasSubstr("verification passed"));
  absl::StatusOr<HostTensor> output = ReadTensorNpy(out, Layout::kTokenMajor);
  ASSERT_TRUE(output.ok()) << output.status();
  EXPECT_EQ(output->dtype, DType::kFp32);
  EXPECT_EQ(output->shape, qkv->q.shape);
  for (const std::string& path : {q, k, v, out}) std::remove(path.c_str());
  std::remove(dir->c_str());
}

TEST_F(CliE2eTest, LoadReportsThroughputAndLatency) {
  const ProcessResult result =
      Run({"load", "--requests=12", "--concurrency=3", "--seq_len=128", "--q_heads=2",
           "--kv_heads=1", "--head_dim=64", "--metrics_only"});
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_THAT(result.output, HasSubstr("completed:   12 ok, 0 failed"));
  EXPECT_THAT(result.output, HasSubstr("requests/s"));
  EXPECT_THAT(result.output, HasSubstr("p99"));
}

TEST_F(CliE2eTest, ErrorsAreSentences) {
  absl::StatusOr<int> port = UnusedPort();
  ASSERT_TRUE(port.ok()) << port.status();
  absl::StatusOr<ProcessResult> refused = RunProcess(
      {AnchorctlBinary(), absl::StrCat("--target=127.0.0.1:", *port), "info"}, absl::Seconds(30));
  ASSERT_TRUE(refused.ok()) << refused.status();
  EXPECT_EQ(refused->exit_code, 1) << refused->output;
  EXPECT_THAT(refused->output, HasSubstr(absl::StrCat("server at 127.0.0.1:", *port,
                                                      " is unavailable: connection refused")));
  absl::StatusOr<ProcessResult> absent_health = RunProcess(
      {AnchorctlBinary(), absl::StrCat("--target=127.0.0.1:", *port), "health"}, absl::Seconds(30));
  ASSERT_TRUE(absent_health.ok()) << absent_health.status();
  EXPECT_EQ(absent_health->exit_code, 1) << absent_health->output;
  EXPECT_THAT(absent_health->output,
              HasSubstr(absl::StrCat("server at 127.0.0.1:", *port,
                                     " is unavailable: connection refused")));

  const ProcessResult bad_heads =
      Run({"attend", "--seq_len=64", "--q_heads=3", "--kv_heads=2", "--head_dim=64"});
  EXPECT_EQ(bad_heads.exit_code, 2) << bad_heads.output;
  EXPECT_THAT(bad_heads.output, HasSubstr("multiple"));

  const ProcessResult bad_theta = Run(
      {"attend", "--seq_len=64", "--q_heads=2", "--kv_heads=1", "--head_dim=64", "--theta=nan"});
  EXPECT_EQ(bad_theta.exit_code, 1) << bad_theta.output;
  EXPECT_THAT(bad_theta.output, HasSubstr("rejected Attend: config.theta"));
}

}  // namespace
}  // namespace anchorserve::e2e
