// PrefillClient and `anchorctl prefill` / `anchorctl model` against an in-process fake
// PrefillService on loopback.
#include "client/prefill_client.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/client/prefill_test_util.h"

namespace anchorserve {
namespace {

using ::anchorserve::testing::FakeModel;
using ::anchorserve::testing::FakeOutput;
using ::anchorserve::testing::FakePrefillServer;
using ::anchorserve::testing::FakeScript;
using ::anchorserve::testing::MakeFakeOutput;
using ::anchorserve::testing::ModelInfoOf;
using ::anchorserve::testing::ParsedSafetensors;
using ::anchorserve::testing::ParseSafetensorsFile;
using ::anchorserve::testing::ProcessOutput;
using ::anchorserve::testing::ReadFileBytes;
using ::anchorserve::testing::RunSubprocess;
using ::anchorserve::testing::StreamOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr int64_t kChunkBytes = 24;

class PrefillFakeServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<FakePrefillServer>> server = FakePrefillServer::Start();
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    server_->service().SetModelInfo(grpc::Status::OK, ModelInfoOf(model_));
    // By default: what a correct server streams for the request.
    server_->service().SetScript([this](const v1::PrefillRequest& request) {
      FakeScript script;
      script.messages = StreamOf(MakeFakeOutput(request, model_), kChunkBytes);
      return script;
    });
    absl::StatusOr<std::unique_ptr<PrefillClient>> client =
        PrefillClient::Create(server_->target());
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
    dir_ = absl::StrCat(::testing::TempDir(), "/anchor_prefill_", getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    ASSERT_EQ(system(absl::StrCat("mkdir -p '", dir_, "'").c_str()), 0);
  }

  void TearDown() override { system(absl::StrCat("rm -rf '", dir_, "'").c_str()); }

  // anchorctl --target=<fake> ARGS...
  ProcessOutput Anchorctl(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {ANCHORCTL_PATH, absl::StrCat("--target=", server_->target())};
    argv.insert(argv.end(), args.begin(), args.end());
    absl::StatusOr<ProcessOutput> result = RunSubprocess(argv, absl::Seconds(60));
    if (!result.ok()) {
      ADD_FAILURE() << result.status();
      return ProcessOutput{};
    }
    return *std::move(result);
  }

  static v1::PrefillRequest Request(int num_tokens) {
    v1::PrefillRequest request;
    for (int i = 0; i < num_tokens; ++i) request.add_token_ids(3 * i + 1);
    return request;
  }

  FakeModel model_;
  std::unique_ptr<FakePrefillServer> server_;
  std::unique_ptr<PrefillClient> client_;
  std::string dir_;
};

TEST_F(PrefillFakeServerTest, AssemblesKvInMemoryWithProgress) {
  for (const v1::TensorLayout layout :
       {v1::TENSOR_LAYOUT_HEAD_MAJOR, v1::TENSOR_LAYOUT_TOKEN_MAJOR}) {
    for (const v1::DataType dtype : {v1::DATA_TYPE_BF16, v1::DATA_TYPE_FP16, v1::DATA_TYPE_FP32}) {
      SCOPED_TRACE(absl::StrCat(v1::TensorLayout_Name(layout), " ", v1::DataType_Name(dtype)));
      v1::PrefillRequest request = Request(6);
      request.set_kv_dtype(dtype);
      request.set_kv_layout(layout);
      const FakeOutput expected = MakeFakeOutput(request, model_);
      std::vector<int32_t> progress;
      absl::StatusOr<PrefillResult> result = client_->Prefill(
          request, {}, [&](const PrefillLayerProgress& p) { progress.push_back(p.layers_done); });
      ASSERT_TRUE(result.ok()) << result.status();
      EXPECT_THAT(progress, ElementsAre(1, 2, 3));
      ASSERT_EQ(result->layers.size(), 3u);
      for (size_t i = 0; i < 3; ++i) {
        const PrefillLayerKv& kv = result->layers[i];
        EXPECT_EQ(kv.layer, static_cast<int32_t>(i));
        EXPECT_EQ(kv.k.layout, layout == v1::TENSOR_LAYOUT_HEAD_MAJOR ? Layout::kHeadMajor
                                                                      : Layout::kTokenMajor);
        EXPECT_EQ(kv.k.shape,
                  (layout == v1::TENSOR_LAYOUT_HEAD_MAJOR ? std::array<int64_t, 3>{2, 6, 4}
                                                          : std::array<int64_t, 3>{6, 2, 4}));
        EXPECT_EQ(std::string(kv.k.bytes.begin(), kv.k.bytes.end()), expected.k[i]);
        EXPECT_EQ(std::string(kv.v.bytes.begin(), kv.v.bytes.end()), expected.v[i]);
      }
      EXPECT_EQ(result->summary.request_id, "fake-request");
      EXPECT_EQ(result->summary.logits->argmax_token_id(), expected.logits.argmax_token_id());
      EXPECT_EQ(result->summary.metrics.backend(), "fake");
    }
  }
  EXPECT_EQ(server_->service().requests().back().token_ids_size(), 6);
}

TEST_F(PrefillFakeServerTest, ServerErrorsKeepTheirCode) {
  server_->service().SetScript([](const v1::PrefillRequest&) {
    FakeScript script;
    script.status =
        grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "model fingerprint differs");
    return script;
  });
  absl::StatusOr<PrefillResult> result = client_->Prefill(Request(3));
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(result.status().message(),
              HasSubstr(absl::StrCat("server at ", server_->target(),
                                     " cannot run Prefill: model fingerprint differs")));

  // An error after part of the stream: the status wins over the missing rest.
  server_->service().SetScript([this](const v1::PrefillRequest& request) {
    FakeScript script;
    script.messages = StreamOf(MakeFakeOutput(request, model_), kChunkBytes);
    script.messages.resize(4);
    script.status = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "out of device memory");
    return script;
  });
  result = client_->Prefill(Request(3));
  EXPECT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted) << result.status();

  server_->service().SetModelInfo(
      grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "no --model"));
  EXPECT_EQ(client_->GetModelInfo().status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(PrefillFakeServerTest, ProtocolViolationsAreInternalErrors) {
  server_->service().SetScript([this](const v1::PrefillRequest& request) {
    FakeScript script;
    script.messages = StreamOf(MakeFakeOutput(request, model_), kChunkBytes);
    std::swap(script.messages[1], script.messages[2]);  // layer 0 K: offset 24 before 0
    return script;
  });
  absl::StatusOr<PrefillResult> result = client_->Prefill(Request(3));
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(result.status().message(),
              HasSubstr(absl::StrCat("Prefill to ", server_->target(),
                                     " broke the stream protocol: kv_chunk.offset is 24 for "
                                     "layer 0 K, expected 0")));
}

TEST_F(PrefillFakeServerTest, DeadlineApplies) {
  server_->service().SetScript([this](const v1::PrefillRequest& request) {
    FakeScript script;
    script.messages = StreamOf(MakeFakeOutput(request, model_), kChunkBytes);
    script.delay_before_each = absl::Milliseconds(100);
    return script;
  });
  CallOptions call;
  call.timeout = absl::Milliseconds(150);
  absl::StatusOr<PrefillResult> result = client_->Prefill(Request(3), call);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded) << result.status();
}

// Chunks of a MiB reach the client in several gRPC slices, read without a protobuf copy: each
// piece lands at its offset, and an error mid-stream comes back as it is.
TEST_F(PrefillFakeServerTest, LargeChunksAreAssembledFromTheirSlices) {
  model_.num_layers = 3;
  model_.num_kv_heads = 8;
  model_.head_dim = 128;
  constexpr int kTokens = 4096;  // 8 MiB per bf16 tensor
  const v1::PrefillRequest request = Request(kTokens);
  const FakeOutput expected = MakeFakeOutput(request, model_);
  ASSERT_EQ(expected.k[0].size(), size_t{8} << 20);
  const std::vector<v1::PrefillResponse> stream =
      StreamOf(expected, (int64_t{1} << 20) + 5);  // uneven chunks
  server_->service().SetScript([&stream](const v1::PrefillRequest&) {
    FakeScript script;
    script.messages = stream;
    return script;
  });
  absl::StatusOr<PrefillResult> result = client_->Prefill(request);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->layers.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    const PrefillLayerKv& kv = result->layers[i];
    EXPECT_TRUE(std::string(kv.k.bytes.begin(), kv.k.bytes.end()) == expected.k[i]) << i;
    EXPECT_TRUE(std::string(kv.v.bytes.begin(), kv.v.bytes.end()) == expected.v[i]) << i;
  }
  EXPECT_EQ(result->summary.kv_bytes, int64_t{48} << 20);

  // Ended mid-stream by the server, then by a protocol violation.
  server_->service().SetScript([&stream](const v1::PrefillRequest&) {
    FakeScript script;
    script.messages.assign(stream.begin(), stream.begin() + 12);  // header, layer 0 K, part of V
    script.status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "device lost");
    return script;
  });
  result = client_->Prefill(request);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable) << result.status();
  server_->service().SetScript([&stream](const v1::PrefillRequest&) {
    FakeScript script;
    script.messages = stream;
    script.messages.erase(script.messages.begin() + 11);  // a gap in layer 0 V
    return script;
  });
  result = client_->Prefill(request);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal) << result.status();
  EXPECT_THAT(result.status().message(), HasSubstr("chunks are contiguous"));
}

// ---- anchorctl ----------------------------------------------------------------------------------

TEST_F(PrefillFakeServerTest, AnchorctlWritesSafetensorsAndNpy) {
  const std::string kv = dir_ + "/kv.safetensors";
  const std::string logits = dir_ + "/logits.npy";
  const ProcessOutput run =
      Anchorctl({"prefill", "--ids=1, 4,7,10", "--request_id=cli-1", absl::StrCat("--kv_out=", kv),
                 absl::StrCat("--logits_out=", logits), "--theta=9.5"});
  ASSERT_EQ(run.exit_code, 0) << run.stdout_text << run.stderr_text;

  const std::vector<v1::PrefillRequest> requests = server_->service().requests();
  ASSERT_EQ(requests.size(), 1u);
  const v1::PrefillRequest& request = requests[0];
  EXPECT_THAT(request.token_ids(), ElementsAre(1, 4, 7, 10));
  EXPECT_EQ(request.request_id(), "cli-1");
  EXPECT_EQ(request.kv_dtype(), v1::DATA_TYPE_BF16);
  EXPECT_EQ(request.kv_layout(), v1::TENSOR_LAYOUT_HEAD_MAJOR);
  EXPECT_EQ(request.kv_selection(), v1::KV_SELECTION_ALL);
  EXPECT_EQ(request.logits_mode(), v1::LOGITS_MODE_FULL);
  EXPECT_EQ(request.config().mode(), v1::ATTENTION_MODE_UNSPECIFIED);  // the server's default
  EXPECT_DOUBLE_EQ(request.config().theta(), 9.5);

  // stdout: header, per-layer table, first token, throughput; stderr (not a tty): a line per layer.
  const FakeOutput expected = MakeFakeOutput(request, model_);
  EXPECT_THAT(run.stdout_text, HasSubstr("request id:      cli-1"));
  EXPECT_THAT(run.stdout_text, HasSubstr("model:           fingerprint f00dfeed, 3 layers"));
  EXPECT_THAT(run.stdout_text, HasSubstr("prompt:          4 tokens"));
  EXPECT_THAT(
      run.stdout_text,
      HasSubstr("kv:              layers [0, 3), each K and V bf16 head-major [Hkv, N, d] = "
                "[2, 4, 4]"));
  EXPECT_THAT(run.stdout_text, HasSubstr("     2   0.750000"));
  EXPECT_THAT(run.stdout_text,
              HasSubstr(absl::StrCat("first token:     ", expected.logits.argmax_token_id())));
  EXPECT_THAT(run.stdout_text, HasSubstr("tokens/s (server compute)"));
  EXPECT_THAT(run.stdout_text, HasSubstr("time to first KV byte"));
  EXPECT_THAT(run.stderr_text, HasSubstr("prefill: layer 0 received (1/3)"));
  EXPECT_THAT(run.stderr_text, HasSubstr("prefill: layer 2 received (3/3)"));
  EXPECT_THAT(run.stderr_text, Not(HasSubstr("\r")));

  absl::StatusOr<ParsedSafetensors> parsed = ParseSafetensorsFile(ReadFileBytes(kv));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_THAT(parsed->names_by_offset, ElementsAre("layers.0.k", "layers.0.v", "layers.1.k",
                                                   "layers.1.v", "layers.2.k", "layers.2.v"));
  for (int layer = 0; layer < 3; ++layer) {
    for (const char* name : {"k", "v"}) {
      const testing::ParsedTensor& tensor =
          parsed->tensors.at(absl::StrCat("layers.", layer, ".", name));
      EXPECT_EQ(tensor.dtype, "BF16");
      EXPECT_THAT(tensor.shape, ElementsAre(2, 4, 4));
      EXPECT_EQ(tensor.data, (name[0] == 'k' ? expected.k : expected.v)[layer]);
    }
  }
  EXPECT_EQ(parsed->metadata.at("anchorserve.model_fingerprint"), "f00dfeed");
  EXPECT_EQ(parsed->metadata.at("anchorserve.request_id"), "cli-1");

  absl::StatusOr<NpyArray> npy = ReadNpyFile(logits);
  ASSERT_TRUE(npy.ok()) << npy.status();
  EXPECT_EQ(npy->dtype, DType::kFp32);
  EXPECT_THAT(npy->shape, ElementsAre(40));
  std::vector<float> values(40);
  std::memcpy(values.data(), npy->data.data(), npy->data.size());
  EXPECT_THAT(values, ::testing::ElementsAreArray(expected.logits.values().begin(),
                                                  expected.logits.values().end()));
}

TEST_F(PrefillFakeServerTest, AnchorctlRequestFlags) {
  const std::string ids_file = dir_ + "/ids.txt";
  std::ofstream(ids_file) << "5 6\n7,8\t9\n";
  const ProcessOutput run = Anchorctl(
      {"prefill", absl::StrCat("--ids_file=", ids_file), "--dense", "--kv_dtype=fp16",
       "--kv_layout=token", "--kv_layers=1:3", "--logits=topk:3", "--expected_fingerprint=f00dfeed",
       "--deadline_ms=20000", absl::StrCat("--kv_out=", dir_, "/range.safetensors")});
  ASSERT_EQ(run.exit_code, 0) << run.stdout_text << run.stderr_text;
  const v1::PrefillRequest request = server_->service().requests().back();
  EXPECT_THAT(request.token_ids(), ElementsAre(5, 6, 7, 8, 9));
  EXPECT_EQ(request.config().mode(), v1::ATTENTION_MODE_DENSE);
  EXPECT_FALSE(request.config().has_theta());
  EXPECT_EQ(request.kv_dtype(), v1::DATA_TYPE_FP16);
  EXPECT_EQ(request.kv_layout(), v1::TENSOR_LAYOUT_TOKEN_MAJOR);
  EXPECT_EQ(request.kv_selection(), v1::KV_SELECTION_RANGE);
  EXPECT_EQ(request.kv_layer_begin(), 1);
  EXPECT_EQ(request.kv_layer_end(), 3);
  EXPECT_EQ(request.logits_mode(), v1::LOGITS_MODE_TOP_K);
  EXPECT_EQ(request.logits_top_k(), 3);
  EXPECT_EQ(request.expected_fingerprint(), "f00dfeed");
  EXPECT_THAT(run.stdout_text, HasSubstr("top 3:"));
  absl::StatusOr<ParsedSafetensors> parsed =
      ParseSafetensorsFile(ReadFileBytes(dir_ + "/range.safetensors"));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_THAT(parsed->names_by_offset,
              ElementsAre("layers.1.k", "layers.1.v", "layers.2.k", "layers.2.v"));
  EXPECT_EQ(parsed->tensors.at("layers.2.v").dtype, "F16");
  EXPECT_THAT(parsed->tensors.at("layers.2.v").shape, ElementsAre(5, 2, 4));
}

TEST_F(PrefillFakeServerTest, AnchorctlMassTargetFlags) {
  const ProcessOutput run =
      Anchorctl({"prefill", "--ids=1,2,3", "--mass_target=0.95", "--mass_density_cap=0.5",
                 "--mass_min_theta=1.5", "--kv_layers=none", "--logits=none"});
  ASSERT_EQ(run.exit_code, 0) << run.stdout_text << run.stderr_text;
  const v1::PrefillRequest request = server_->service().requests().back();
  EXPECT_EQ(request.config().mode(), v1::ATTENTION_MODE_UNSPECIFIED);
  EXPECT_FALSE(request.config().has_theta());
  EXPECT_DOUBLE_EQ(request.config().mass_target(), 0.95);
  EXPECT_DOUBLE_EQ(request.config().mass_density_cap(), 0.5);
  EXPECT_DOUBLE_EQ(request.config().mass_min_theta(), 1.5);
  // The fake echoes the request's config as the effective one.
  EXPECT_THAT(run.stdout_text,
              HasSubstr("mass_target=0.95 mass_density_cap=0.5 mass_min_theta=1.5"));

  // Unset flags leave the fields to the server's defaults.
  const ProcessOutput plain = Anchorctl({"prefill", "--ids=1", "--kv_layers=none"});
  ASSERT_EQ(plain.exit_code, 0) << plain.stdout_text << plain.stderr_text;
  const v1::PrefillRequest unset = server_->service().requests().back();
  EXPECT_FALSE(unset.config().has_mass_target());
  EXPECT_FALSE(unset.config().has_mass_density_cap());
  EXPECT_FALSE(unset.config().has_mass_min_theta());

  const ProcessOutput both = Anchorctl({"prefill", "--ids=1", "--dense", "--mass_target=0.9"});
  EXPECT_EQ(both.exit_code, 2);
  EXPECT_THAT(both.stderr_text, HasSubstr("--mass_target and --dense exclude each other"));
}

TEST_F(PrefillFakeServerTest, AnchorctlRandomIdsFromTheModelVocabulary) {
  const ProcessOutput first =
      Anchorctl({"prefill", "--random_ids=64", "--seed=9", "--logits=none", "--kv_layers=none"});
  ASSERT_EQ(first.exit_code, 0) << first.stdout_text << first.stderr_text;
  const ProcessOutput again =
      Anchorctl({"prefill", "--random_ids=64", "--seed=9", "--logits=none", "--kv_layers=none"});
  ASSERT_EQ(again.exit_code, 0) << again.stdout_text << again.stderr_text;
  const std::vector<v1::PrefillRequest> requests = server_->service().requests();
  ASSERT_EQ(requests.size(), 2u);
  EXPECT_EQ(requests[0].token_ids_size(), 64);
  for (int32_t id : requests[0].token_ids()) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, model_.vocab_size);
  }
  EXPECT_THAT(requests[1].token_ids(), ::testing::ElementsAreArray(requests[0].token_ids()));
  EXPECT_THAT(first.stdout_text, HasSubstr("kv:              none requested"));
}

TEST_F(PrefillFakeServerTest, AnchorctlFailuresLeaveNoFiles) {
  server_->service().SetScript([this](const v1::PrefillRequest& request) {
    FakeScript script;
    script.messages = StreamOf(MakeFakeOutput(request, model_), kChunkBytes);
    script.messages.erase(script.messages.begin() + 3);  // a gap in layer 0
    return script;
  });
  const std::string kv = dir_ + "/broken.safetensors";
  const ProcessOutput broken = Anchorctl({"prefill", "--ids=1,2,3", absl::StrCat("--kv_out=", kv)});
  EXPECT_EQ(broken.exit_code, 1);
  EXPECT_THAT(broken.stderr_text, HasSubstr("broke the stream protocol: kv_chunk.offset"));
  EXPECT_NE(access(kv.c_str(), F_OK), 0);
  EXPECT_NE(access((kv + ".partial").c_str(), F_OK), 0);

  const ProcessOutput no_ids = Anchorctl({"prefill"});
  EXPECT_EQ(no_ids.exit_code, 2);
  EXPECT_THAT(no_ids.stderr_text, HasSubstr("exactly one of --ids"));
  const ProcessOutput both = Anchorctl({"prefill", "--ids=1", "--dense", "--theta=3"});
  EXPECT_EQ(both.exit_code, 2);
  EXPECT_THAT(both.stderr_text, HasSubstr("--theta and --dense exclude each other"));
  const ProcessOutput bad_layers = Anchorctl({"prefill", "--ids=1", "--kv_layers=3:1"});
  EXPECT_EQ(bad_layers.exit_code, 2);
  EXPECT_THAT(bad_layers.stderr_text, HasSubstr("--kv_layers: kv layers must be"));
  const ProcessOutput top_out =
      Anchorctl({"prefill", "--ids=1", "--logits=topk:2", "--logits_out=x.npy"});
  EXPECT_EQ(top_out.exit_code, 2);
  EXPECT_THAT(top_out.stderr_text, HasSubstr("--logits_out writes the full logits"));
}

TEST_F(PrefillFakeServerTest, AnchorctlModel) {
  const ProcessOutput run = Anchorctl({"model"});
  ASSERT_EQ(run.exit_code, 0) << run.stdout_text << run.stderr_text;
  EXPECT_THAT(run.stdout_text, HasSubstr("architecture:   LlamaForCausalLM"));
  EXPECT_THAT(run.stdout_text, HasSubstr("fingerprint:    f00dfeed"));
  EXPECT_THAT(run.stdout_text, HasSubstr("heads:          4 query, 2 key/value, head dim 4"));
  EXPECT_THAT(run.stdout_text, HasSubstr("vocabulary:     40"));
  EXPECT_THAT(run.stdout_text, HasSubstr("rope:           rotate_half theta=10000 scaling=none"));

  server_->service().SetModelInfo(
      grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "the server runs without --model"));
  const ProcessOutput absent = Anchorctl({"model"});
  EXPECT_EQ(absent.exit_code, 1);
  EXPECT_THAT(absent.stderr_text, HasSubstr("cannot run GetModelInfo: the server runs without"));
}

}  // namespace
}  // namespace anchorserve
