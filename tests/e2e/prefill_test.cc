// Prefill end to end: the real anchorserve binary with --model on a tiny generated model, driven
// over gRPC. The stream's order and sizes, its KV and logits against the CPU engine run in this
// process on the same model, the bad-input statuses, cancellation mid-stream, and that a slow
// reader holds the prefill back instead of growing server memory.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "anchorserve/v1/prefill.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "model/cpu/cpu_prefill_engine.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "tests/e2e/e2e_util.h"

namespace anchorserve::e2e {
namespace {

constexpr char kPreset[] = "llama3-tiny";

// Writes the tiny model into a fresh folder with the repository's generator.
absl::StatusOr<std::string> MakeTinyModel(const std::string& preset) {
  absl::StatusOr<std::string> dir = MakeTempDir("prefill-model");
  if (!dir.ok()) return dir.status();
  absl::StatusOr<ProcessResult> made =
      RunProcess({ANCHOR_PYTHON, ANCHOR_MAKE_TINY_MODEL, absl::StrCat("--preset=", preset),
                  absl::StrCat("--out=", *dir)},
                 absl::Seconds(120));
  if (!made.ok()) return made.status();
  if (made->exit_code != 0) {
    return absl::InternalError(absl::StrCat("make_tiny_model.py failed: ", made->output));
  }
  return *dir;
}

std::vector<int32_t> PromptIds(int n, int64_t vocab) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) ids[i] = static_cast<int32_t>((i * 7919 + 13) % vocab);
  return ids;
}

// Everything one Prefill stream carried.
struct Received {
  grpc::Status status;
  std::vector<std::string> kinds;  // message kinds in order ("header", "kv", "logits", ...)
  v1::PrefillHeader header;
  std::vector<std::string> k, v;  // per returned layer, bytes
  v1::Logits logits;
  v1::PrefillMetrics metrics;
  std::string order_error;  // set when chunks came out of order
};

Received ReadAll(v1::PrefillService::Stub& stub, const v1::PrefillRequest& request,
                 absl::Duration per_message_delay = absl::ZeroDuration(),
                 const std::function<void()>& while_reading = nullptr) {
  Received got;
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(120)));
  std::unique_ptr<grpc::ClientReader<v1::PrefillResponse>> reader = stub.Prefill(&context, request);
  v1::PrefillResponse message;
  int expect_layer = -1;
  bool expect_v = false;
  while (reader->Read(&message)) {
    if (while_reading) while_reading();
    absl::SleepFor(per_message_delay);
    switch (message.kind_case()) {
      case v1::PrefillResponse::kHeader:
        got.kinds.push_back("header");
        got.header = message.header();
        expect_layer = got.header.kv_layer_begin();
        break;
      case v1::PrefillResponse::kKvChunk: {
        if (got.kinds.empty() || got.kinds.back() != "kv") got.kinds.push_back("kv");
        const v1::KvChunk& chunk = message.kv_chunk();
        const bool is_v = chunk.tensor() == v1::TENSOR_NAME_V;
        // K of layer l in order, then V of layer l, then layer l + 1.
        if (chunk.layer() != expect_layer || is_v != expect_v) {
          got.order_error = absl::StrCat("chunk of layer ", chunk.layer(), is_v ? " V" : " K",
                                         ", expected layer ", expect_layer, expect_v ? " V" : " K");
        }
        std::vector<std::string>& tensors = is_v ? got.v : got.k;
        const size_t index = static_cast<size_t>(chunk.layer() - got.header.kv_layer_begin());
        if (tensors.size() <= index) tensors.resize(index + 1);
        if (chunk.offset() != static_cast<int64_t>(tensors[index].size())) {
          got.order_error =
              absl::StrCat("chunk offset ", chunk.offset(), ", expected ", tensors[index].size());
        }
        tensors[index] += chunk.data();
        if (static_cast<int64_t>(tensors[index].size()) == got.header.bytes_per_layer() / 2) {
          if (expect_v) ++expect_layer;
          expect_v = !expect_v;
        }
        break;
      }
      case v1::PrefillResponse::kLogits:
        got.kinds.push_back("logits");
        got.logits = message.logits();
        break;
      case v1::PrefillResponse::kMetrics:
        got.kinds.push_back("metrics");
        got.metrics = message.metrics();
        break;
      default:
        got.kinds.push_back("unknown");
    }
  }
  got.status = reader->Finish();
  return got;
}

class RecordingSink final : public KvSink {
 public:
  absl::Status OnLayer(int layer, absl::Span<const char> k, absl::Span<const char> v) override {
    k_.emplace_back(k.data(), k.size());
    v_.emplace_back(v.data(), v.size());
    return absl::OkStatus();
  }
  std::vector<std::string> k_, v_;
};

class PrefillE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> dir = MakeTinyModel(kPreset);
    if (!dir.ok()) {
      *setup_error_ = std::string(dir.status().message());
      return;
    }
    *model_dir_ = *dir;
    // Small chunks and KV buffer so that a 2k prompt streams in many pieces and backpressure
    // engages.
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(
        {"--cpu_threads=2", absl::StrCat("--model=", *model_dir_), "--max_seq_len=4096",
         "--stream_chunk_bytes=16384", "--prefill_buffer_bytes=65536"});
    if (!server.ok()) {
      *setup_error_ = std::string(server.status().message());
      return;
    }
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr) << *setup_error_;
    stub_ = v1::PrefillService::NewStub(
        grpc::CreateChannel(server_->target(), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    if (HasFailure() && server_ != nullptr) std::cerr << server_->Log();
  }

  v1::ModelInfo Info() {
    grpc::ClientContext context;
    v1::ModelInfo info;
    const grpc::Status status = stub_->GetModelInfo(&context, {}, &info);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return info;
  }

  static ServerProcess* server_;
  static std::string* model_dir_;
  static std::string* setup_error_;
  std::unique_ptr<v1::PrefillService::Stub> stub_;
};

ServerProcess* PrefillE2eTest::server_ = nullptr;
std::string* PrefillE2eTest::model_dir_ = new std::string;
std::string* PrefillE2eTest::setup_error_ = new std::string("server not started");

TEST_F(PrefillE2eTest, ModelInfoDescribesTheLoadedModel) {
  absl::StatusOr<std::unique_ptr<Model>> model = LoadModel(*model_dir_);
  ASSERT_TRUE(model.ok()) << model.status();
  const v1::ModelInfo info = Info();
  EXPECT_EQ(info.architecture(), "LlamaForCausalLM");
  EXPECT_EQ(info.num_layers(), (*model)->config().num_layers);
  EXPECT_EQ(info.num_kv_heads(), (*model)->config().num_kv_heads);
  EXPECT_EQ(info.vocab_size(), (*model)->config().vocab_size);
  EXPECT_EQ(info.fingerprint(), (*model)->fingerprint());
  EXPECT_EQ(info.num_parameters(), (*model)->num_parameters());
  EXPECT_EQ(info.rope().scaling(), "llama3");
  EXPECT_EQ(info.kv_bytes_per_token(), (*model)->KvBytesPerToken(DType::kBf16));
}

// The stream in order, and its bytes equal to the engine run here on the same model.
TEST_F(PrefillE2eTest, StreamMatchesTheEngineRunLocally) {
  absl::StatusOr<std::unique_ptr<Model>> model = LoadModel(*model_dir_);
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& mc = (*model)->config();
  for (const bool dense : {true, false}) {
    SCOPED_TRACE(dense ? "dense" : "anchor");
    v1::PrefillRequest request;
    const std::vector<int32_t> ids = PromptIds(700, mc.vocab_size);
    request.mutable_token_ids()->Assign(ids.begin(), ids.end());
    request.set_kv_dtype(v1::DATA_TYPE_FP32);
    // Small groups so that anchor mode selects stripes on a short prompt.
    request.mutable_config()->set_mode(dense ? v1::ATTENTION_MODE_DENSE
                                             : v1::ATTENTION_MODE_ANCHOR);
    request.mutable_config()->set_block_size(16);
    request.mutable_config()->set_step(4);
    // A random-weight model's scores are nearly flat: only a tight theta drops keys.
    request.mutable_config()->set_theta(0.1);
    const Received got = ReadAll(*stub_, request);
    ASSERT_TRUE(got.status.ok()) << got.status.error_message();
    EXPECT_EQ(got.order_error, "");
    EXPECT_EQ(got.kinds, (std::vector<std::string>{"header", "kv", "logits", "metrics"}));
    ASSERT_EQ(got.header.num_tokens(), 700);
    ASSERT_EQ(static_cast<int>(got.k.size()), mc.num_layers);
    ASSERT_EQ(static_cast<int>(got.v.size()), mc.num_layers);
    const int64_t tensor_bytes = int64_t{700} * mc.KvDim() * 4;
    EXPECT_EQ(got.header.bytes_per_layer(), 2 * tensor_bytes);
    EXPECT_EQ(got.metrics.layers_size(), mc.num_layers);
    EXPECT_EQ(got.metrics.kv_bytes(), 2 * tensor_bytes * mc.num_layers);
    EXPECT_GT(got.metrics.tokens_per_second(), 0);
    if (dense) {
      EXPECT_EQ(got.metrics.density(), 1.0);
    } else {
      EXPECT_LT(got.metrics.density(), 1.0);
    }

    absl::StatusOr<std::unique_ptr<PrefillEngine>> engine = CreateCpuPrefillEngine(**model, 2);
    ASSERT_TRUE(engine.ok()) << engine.status();
    PrefillTask task;
    task.token_ids = ids;
    task.config.mode = dense ? AttentionMode::kDense : AttentionMode::kAnchor;
    task.config.block_size = 16;
    task.config.step = 4;
    task.config.theta = 0.1f;
    task.kv_layer_end = mc.num_layers;
    task.kv_dtype = DType::kFp32;
    RecordingSink sink;
    absl::StatusOr<PrefillResult> local = (*engine)->Run(task, &sink);
    ASSERT_TRUE(local.ok()) << local.status();
    for (int layer = 0; layer < mc.num_layers; ++layer) {
      ASSERT_EQ(got.k[layer].size(), static_cast<size_t>(tensor_bytes));
      ASSERT_EQ(got.v[layer].size(), static_cast<size_t>(tensor_bytes));
      // The same code on the same data: equal up to the BLAS's thread split, a few fp32 ulps.
      for (const auto& [remote, here] :
           {std::pair(&got.k[layer], &sink.k_[layer]), std::pair(&got.v[layer], &sink.v_[layer])}) {
        const float* a = reinterpret_cast<const float*>(remote->data());
        const float* b = reinterpret_cast<const float*>(here->data());
        int64_t off = 0;
        for (int64_t i = 0; i < tensor_bytes / 4; ++i) {
          if (!(std::fabs(a[i] - b[i]) <= 1e-5f * (1.0f + std::fabs(b[i])))) ++off;
        }
        EXPECT_EQ(off, 0) << "layer " << layer;
      }
    }
    ASSERT_EQ(got.logits.values_size(), mc.vocab_size);
    const int64_t argmax = std::max_element(local->last_logits.begin(), local->last_logits.end()) -
                           local->last_logits.begin();
    EXPECT_EQ(got.logits.argmax_token_id(), argmax);
    for (int64_t i = 0; i < mc.vocab_size; ++i) {
      ASSERT_NEAR(got.logits.values(static_cast<int>(i)), local->last_logits[i],
                  1e-4 * (1 + std::fabs(local->last_logits[i])));
    }
  }
}

// A mass target reaches every layer's attention on the CPU engine and is echoed back.
TEST_F(PrefillE2eTest, MassTargetRunsOnTheCpuEngine) {
  const v1::ModelInfo info = Info();
  v1::PrefillRequest request;
  const std::vector<int32_t> ids = PromptIds(700, info.vocab_size());
  request.mutable_token_ids()->Assign(ids.begin(), ids.end());
  request.set_kv_selection(v1::KV_SELECTION_NONE);
  request.mutable_config()->set_block_size(16);
  request.mutable_config()->set_step(4);
  request.mutable_config()->set_mass_target(0.95);
  request.mutable_config()->set_mass_density_cap(0.75);
  const Received got = ReadAll(*stub_, request);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.kinds, (std::vector<std::string>{"header", "logits", "metrics"}));
  EXPECT_EQ(got.metrics.layers_size(), info.num_layers());
  EXPECT_GT(got.metrics.density(), 0.0);
  EXPECT_LE(got.metrics.density(), 1.0);
  for (const v1::PrefillLayerMetrics& layer : got.metrics.layers()) {
    EXPECT_GT(layer.gemm_seconds(), 0.0) << "layer " << layer.layer();
    EXPECT_LT(layer.gemm_seconds(), layer.layer_seconds()) << "layer " << layer.layer();
  }
  const v1::AnchorConfig& effective = got.metrics.effective_config();
  EXPECT_FLOAT_EQ(effective.mass_target(), 0.95f);
  EXPECT_FLOAT_EQ(effective.mass_density_cap(), 0.75f);
  EXPECT_EQ(effective.mass_min_theta(), 0.0);
  EXPECT_EQ(effective.mode(), v1::ATTENTION_MODE_ANCHOR);
}

TEST_F(PrefillE2eTest, LayerRangeTopKAndNoKv) {
  const v1::ModelInfo info = Info();
  v1::PrefillRequest request;
  const std::vector<int32_t> ids = PromptIds(64, info.vocab_size());
  request.mutable_token_ids()->Assign(ids.begin(), ids.end());
  request.set_kv_selection(v1::KV_SELECTION_RANGE);
  request.set_kv_layer_begin(1);
  request.set_kv_layer_end(2);
  request.set_kv_layout(v1::TENSOR_LAYOUT_TOKEN_MAJOR);
  request.set_logits_mode(v1::LOGITS_MODE_TOP_K);
  request.set_logits_top_k(5);
  Received got = ReadAll(*stub_, request);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.order_error, "");
  ASSERT_EQ(got.k.size(), 1u);
  EXPECT_EQ(got.header.kv_spec().shape(0), 64);  // token-major [N, Hkv, d]
  EXPECT_EQ(got.k[0].size(), static_cast<size_t>(64 * info.num_kv_heads() * info.head_dim() * 2));
  ASSERT_EQ(got.logits.top_size(), 5);
  EXPECT_EQ(got.logits.top(0).token_id(), got.logits.argmax_token_id());
  for (int i = 1; i < 5; ++i) EXPECT_LE(got.logits.top(i).logit(), got.logits.top(i - 1).logit());
  EXPECT_LT(got.logits.top(0).logprob(), 1e-6);
  EXPECT_EQ(got.logits.values_size(), 0);

  request.set_kv_selection(v1::KV_SELECTION_NONE);
  request.set_logits_mode(v1::LOGITS_MODE_NONE);
  got = ReadAll(*stub_, request);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.kinds, (std::vector<std::string>{"header", "metrics"}));
  EXPECT_EQ(got.metrics.kv_bytes(), 0);
}

TEST_F(PrefillE2eTest, BadInputsGetTheirStatusAndNameTheField) {
  const v1::ModelInfo info = Info();
  struct Case {
    std::string name;
    std::function<void(v1::PrefillRequest*)> edit;
    grpc::StatusCode code;
    std::string fragment;
  };
  const std::vector<Case> cases = {
      {"empty", [](v1::PrefillRequest* r) { r->clear_token_ids(); },
       grpc::StatusCode::INVALID_ARGUMENT, "token_ids"},
      {"id >= vocab",
       [&](v1::PrefillRequest* r) { r->set_token_ids(3, static_cast<int32_t>(info.vocab_size())); },
       grpc::StatusCode::INVALID_ARGUMENT, "token_ids[3]"},
      {"negative id", [](v1::PrefillRequest* r) { r->set_token_ids(0, -1); },
       grpc::StatusCode::INVALID_ARGUMENT, "token_ids[0]"},
      {"too long",
       [](v1::PrefillRequest* r) {
         for (int i = 0; i < 5000; ++i) r->add_token_ids(1);
       },
       grpc::StatusCode::OUT_OF_RANGE, "--max_seq_len=4096"},
      {"fingerprint", [](v1::PrefillRequest* r) { r->set_expected_fingerprint("abc"); },
       grpc::StatusCode::FAILED_PRECONDITION, "expected_fingerprint"},
      {"layer range",
       [](v1::PrefillRequest* r) {
         r->set_kv_selection(v1::KV_SELECTION_RANGE);
         r->set_kv_layer_begin(2);
         r->set_kv_layer_end(1);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "kv_layer_begin"},
      {"top k", [](v1::PrefillRequest* r) { r->set_logits_mode(v1::LOGITS_MODE_TOP_K); },
       grpc::StatusCode::INVALID_ARGUMENT, "logits_top_k"},
      {"kv dtype", [](v1::PrefillRequest* r) { r->set_kv_dtype(static_cast<v1::DataType>(9)); },
       grpc::StatusCode::INVALID_ARGUMENT, "kv_dtype"},
      {"config", [](v1::PrefillRequest* r) { r->mutable_config()->set_block_size(0); },
       grpc::StatusCode::INVALID_ARGUMENT, "config.block_size"},
      {"mass target", [](v1::PrefillRequest* r) { r->mutable_config()->set_mass_target(1.5); },
       grpc::StatusCode::INVALID_ARGUMENT, "config.mass_target"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::PrefillRequest request;
    const std::vector<int32_t> ids = PromptIds(16, info.vocab_size());
    request.mutable_token_ids()->Assign(ids.begin(), ids.end());
    c.edit(&request);
    const Received got = ReadAll(*stub_, request);
    EXPECT_EQ(got.status.error_code(), c.code) << got.status.error_message();
    EXPECT_NE(got.status.error_message().find(c.fragment), std::string::npos)
        << got.status.error_message();
    EXPECT_TRUE(got.kinds.empty());
  }
}

TEST_F(PrefillE2eTest, CancelMidStreamLeavesTheServerServing) {
  const v1::ModelInfo info = Info();
  v1::PrefillRequest request;
  const std::vector<int32_t> ids = PromptIds(2000, info.vocab_size());
  request.mutable_token_ids()->Assign(ids.begin(), ids.end());
  {
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReader<v1::PrefillResponse>> reader =
        stub_->Prefill(&context, request);
    v1::PrefillResponse message;
    int read = 0;
    while (read < 3 && reader->Read(&message)) ++read;
    ASSERT_EQ(read, 3);
    context.TryCancel();
    while (reader->Read(&message)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // The next prefill runs (the cancelled one left nothing behind in the queue or the engine).
  request.set_kv_selection(v1::KV_SELECTION_NONE);
  const Received got = ReadAll(*stub_, request);
  EXPECT_TRUE(got.status.ok()) << got.status.error_message();
  // Everything computed was either sent or dropped.
  absl::StatusOr<std::string> metrics = HttpGet(server_->metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  absl::StatusOr<double> pending =
      FindMetricValue(*metrics, "anchorserve_prefill_pending_kv_bytes", {});
  ASSERT_TRUE(pending.ok()) << pending.status();
  EXPECT_EQ(*pending, 0);
}

TEST_F(PrefillE2eTest, SlowReaderIsBoundedByTheKvBuffer) {
  const v1::ModelInfo info = Info();
  v1::PrefillRequest request;
  const std::vector<int32_t> ids = PromptIds(4000, info.vocab_size());
  request.mutable_token_ids()->Assign(ids.begin(), ids.end());
  request.set_kv_dtype(v1::DATA_TYPE_FP32);
  const int64_t layer_bytes = int64_t{2} * 4000 * info.num_kv_heads() * info.head_dim() * 4;
  ASSERT_GT(layer_bytes * info.num_layers(), 4 * 65536) << "the prompt must outgrow the buffer";
  // Without BDP probing the client's HTTP/2 window stays small, so a slow reader is felt by
  // the server rather than absorbed by gRPC's buffers.
  grpc::ChannelArguments args;
  args.SetInt("grpc.http2.bdp_probe", 0);
  auto slow_stub = v1::PrefillService::NewStub(
      grpc::CreateCustomChannel(server_->target(), grpc::InsecureChannelCredentials(), args));
  double max_pending = 0;
  int samples = 0;
  const Received got = ReadAll(*slow_stub, request, absl::Milliseconds(5), [&] {
    if (++samples % 4 != 0) return;
    absl::StatusOr<std::string> metrics = HttpGet(server_->metrics_port(), "/metrics");
    if (!metrics.ok()) return;
    absl::StatusOr<double> pending =
        FindMetricValue(*metrics, "anchorserve_prefill_pending_kv_bytes", {});
    if (pending.ok()) max_pending = std::max(max_pending, *pending);
  });
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.order_error, "");
  // --prefill_buffer_bytes plus the one layer that may be handed over into an empty queue.
  EXPECT_GT(max_pending, 0);
  EXPECT_LE(max_pending, static_cast<double>(65536 + layer_bytes));
}

// anchorctl prefill writes the cache as safetensors; its bytes equal a direct gRPC read, and the
// Python client reads the same cache and argmax from the real server.
TEST_F(PrefillE2eTest, AnchorctlAndPythonClientReceiveTheSameCache) {
  const v1::ModelInfo info = Info();
  const std::vector<int32_t> ids = PromptIds(300, info.vocab_size());
  absl::StatusOr<std::string> dir = MakeTempDir("prefill-cli");
  ASSERT_TRUE(dir.ok()) << dir.status();
  const std::string kv_path = absl::StrCat(*dir, "/kv.safetensors");
  const std::string ids_text = absl::StrJoin(ids, ",");
  absl::StatusOr<ProcessResult> cli =
      RunProcess({AnchorctlBinary(), "prefill", absl::StrCat("--target=", server_->target()),
                  absl::StrCat("--ids=", ids_text), "--dense", "--kv_dtype=fp32",
                  absl::StrCat("--kv_out=", kv_path)},
                 absl::Seconds(120));
  ASSERT_TRUE(cli.ok()) << cli.status();
  ASSERT_EQ(cli->exit_code, 0) << cli->output;

  v1::PrefillRequest request;
  request.mutable_token_ids()->Assign(ids.begin(), ids.end());
  request.mutable_config()->set_mode(v1::ATTENTION_MODE_DENSE);
  request.set_kv_dtype(v1::DATA_TYPE_FP32);
  const Received got = ReadAll(*stub_, request);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_NE(cli->output.find(absl::StrCat("first token:     ", got.logits.argmax_token_id())),
            std::string::npos)
      << cli->output;

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(kv_path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(static_cast<int>((*file)->tensors().size()), 2 * info.num_layers());
  for (int layer = 0; layer < info.num_layers(); ++layer) {
    for (const bool is_v : {false, true}) {
      const StoredTensor* tensor =
          (*file)->Find(absl::StrCat("layers.", layer, is_v ? ".v" : ".k"));
      ASSERT_NE(tensor, nullptr);
      EXPECT_EQ(tensor->shape, (std::vector<int64_t>{info.num_kv_heads(), 300, info.head_dim()}));
      const std::string& want = is_v ? got.v[layer] : got.k[layer];
      ASSERT_EQ(tensor->num_bytes, static_cast<int64_t>(want.size()));
      const float* a = reinterpret_cast<const float*>(tensor->data);
      const float* b = reinterpret_cast<const float*>(want.data());
      int64_t off = 0;
      for (int64_t i = 0; i < tensor->num_bytes / 4; ++i) {
        if (!(std::fabs(a[i] - b[i]) <= 1e-5f * (1.0f + std::fabs(b[i])))) ++off;
      }
      EXPECT_EQ(off, 0) << "layer " << layer << (is_v ? " v" : " k");
    }
  }

  absl::StatusOr<ProcessResult> python = RunProcess(
      {"/usr/bin/env", absl::StrCat("ANCHORSERVE_CLIENT_GEN_DIR=", ANCHOR_PYTHON_GEN_DIR),
       ANCHOR_PYTHON, ANCHOR_PYTHON_REAL_SERVER_CHECK, absl::StrCat("--target=", server_->target()),
       absl::StrCat("--ids=", ids_text), absl::StrCat("--compare_to=", kv_path),
       absl::StrCat("--argmax=", got.logits.argmax_token_id())},
      absl::Seconds(120));
  ASSERT_TRUE(python.ok()) << python.status();
  EXPECT_EQ(python->exit_code, 0) << python->output;
  EXPECT_NE(python->output.find("OK:"), std::string::npos) << python->output;
}

TEST(PrefillWithoutModelTest, PrefillIsFailedPrecondition) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start({"--cpu_threads=1"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::PrefillService::NewStub(
      grpc::CreateChannel((*server)->target(), grpc::InsecureChannelCredentials()));
  v1::PrefillRequest request;
  request.add_token_ids(1);
  const Received got = ReadAll(*stub, request);
  EXPECT_EQ(got.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(got.status.error_message().find("--model"), std::string::npos);
  grpc::ClientContext context;
  v1::ModelInfo info;
  EXPECT_EQ(stub->GetModelInfo(&context, {}, &info).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
}

TEST(PrefillStartupTest, BadModelFolderExitsWithCode2NamingTheFile) {
  absl::StatusOr<std::string> dir = MakeTempDir("bad-model");
  ASSERT_TRUE(dir.ok());
  absl::StatusOr<ProcessResult> run =
      RunProcess({AnchorserveBinary(), "--backend=cpu", "--grpc_port=0", "--metrics_port=0",
                  "--host=127.0.0.1", absl::StrCat("--model=", *dir)},
                 absl::Seconds(60));
  ASSERT_TRUE(run.ok()) << run.status();
  EXPECT_EQ(run->exit_code, 2) << run->output;
  EXPECT_NE(run->output.find("config.json"), std::string::npos) << run->output;
}

}  // namespace
}  // namespace anchorserve::e2e
