#include "tests/client/prefill_test_util.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <utility>
#include <variant>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/host_tensor.h"
#include "client/prefill_client.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/server_context.h"
#include "kernels/dtype.h"
#include "proto/anchorserve/v1/convert.h"

namespace anchorserve::testing {

v1::ModelInfo ModelInfoOf(const FakeModel& model) {
  v1::ModelInfo info;
  info.set_architecture("LlamaForCausalLM");
  info.set_num_layers(model.num_layers);
  info.set_hidden_size(model.num_kv_heads * model.head_dim * 2);
  info.set_num_q_heads(model.num_kv_heads * 2);
  info.set_num_kv_heads(model.num_kv_heads);
  info.set_head_dim(model.head_dim);
  info.set_intermediate_size(64);
  info.set_vocab_size(model.vocab_size);
  info.set_max_position_embeddings(4096);
  info.set_weight_dtype(v1::DATA_TYPE_BF16);
  info.set_num_parameters(12345);
  info.set_fingerprint(model.fingerprint);
  info.set_kv_bytes_per_token(int64_t{2} * 2 * model.num_layers * model.num_kv_heads *
                              model.head_dim);
  info.set_load_seconds(0.25);
  info.mutable_rope()->set_style("rotate_half");
  info.mutable_rope()->set_theta(10000);
  info.mutable_rope()->set_scaling("none");
  info.set_rms_norm_eps(1e-5);
  return info;
}

namespace {

std::string PatternBytes(int64_t size, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string bytes(static_cast<size_t>(size), '\0');
  for (char& c : bytes) c = static_cast<char>(rng() & 0xff);
  return bytes;
}

}  // namespace

FakeOutput MakeFakeOutput(const v1::PrefillRequest& request, const FakeModel& model,
                          uint32_t seed) {
  FakeOutput out;
  out.request_id = request.request_id().empty() ? "fake-request" : request.request_id();
  const int64_t num_tokens = request.token_ids_size();
  int32_t begin = 0;
  int32_t end = model.num_layers;
  if (request.kv_selection() == v1::KV_SELECTION_RANGE) {
    begin = request.kv_layer_begin();
    end = request.kv_layer_end();
  } else if (request.kv_selection() == v1::KV_SELECTION_NONE) {
    end = 0;
  }
  const v1::DataType dtype = RequestedKvDType(request);
  const v1::TensorLayout layout = RequestedKvLayout(request);
  const DType core_dtype = *DTypeFromProto("dtype", dtype);
  const Layout core_layout = *LayoutFromProto("layout", layout);
  const std::array<int64_t, 3> shape =
      ShapeFor(core_layout, num_tokens, model.num_kv_heads, model.head_dim);
  const int64_t tensor_bytes = num_tokens * model.num_kv_heads * model.head_dim *
                               static_cast<int64_t>(ElementSize(core_dtype));

  v1::PrefillHeader& h = out.header;
  h.set_model_fingerprint(model.fingerprint);
  h.set_num_tokens(num_tokens);
  h.set_num_layers(model.num_layers);
  h.set_kv_layer_begin(begin);
  h.set_kv_layer_end(end);
  h.set_num_kv_heads(model.num_kv_heads);
  h.set_head_dim(model.head_dim);
  h.set_kv_dtype(dtype);
  h.set_kv_layout(layout);
  h.mutable_rope()->set_style("rotate_half");
  h.mutable_rope()->set_theta(10000);
  h.mutable_rope()->set_scaling("none");
  h.set_bytes_per_layer(2 * tensor_bytes);
  SetTensorSpec(core_dtype, core_layout, shape, h.mutable_kv_spec());

  for (int32_t layer = begin; layer < end; ++layer) {
    out.k.push_back(PatternBytes(tensor_bytes, seed * 1000 + 2 * layer));
    out.v.push_back(PatternBytes(tensor_bytes, seed * 1000 + 2 * layer + 1));
  }

  std::vector<float> values(static_cast<size_t>(model.vocab_size));
  for (size_t i = 0; i < values.size(); ++i) {
    values[i] = 4.0f * std::sin(0.7f * static_cast<float>(i) + static_cast<float>(seed));
  }
  const auto argmax =
      static_cast<int32_t>(std::max_element(values.begin(), values.end()) - values.begin());
  out.logits.set_argmax_token_id(argmax);
  switch (RequestedLogitsMode(request)) {
    case v1::LOGITS_MODE_FULL:
      out.logits.mutable_values()->Assign(values.begin(), values.end());
      break;
    case v1::LOGITS_MODE_TOP_K: {
      double sum = 0;
      for (float value : values) sum += std::exp(static_cast<double>(value));
      const double log_sum = std::log(sum);
      std::vector<int32_t> order(values.size());
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return values[a] > values[b]; });
      for (int i = 0; i < request.logits_top_k() && i < static_cast<int>(order.size()); ++i) {
        v1::TopLogit* top = out.logits.add_top();
        top->set_token_id(order[i]);
        top->set_logit(values[order[i]]);
        top->set_logprob(static_cast<float>(values[order[i]] - log_sum));
      }
      break;
    }
    default:
      break;
  }

  v1::PrefillMetrics& m = out.metrics;
  double density_sum = 0;
  for (int32_t layer = 0; layer < model.num_layers; ++layer) {
    v1::PrefillLayerMetrics* lm = m.add_layers();
    lm->set_layer(layer);
    lm->set_density(0.5 + 0.125 * layer);
    lm->set_identification_seconds(0.001 * (layer + 1));
    lm->set_attention_seconds(0.002 * (layer + 1));
    lm->set_layer_seconds(0.004 * (layer + 1));
    density_sum += lm->density();
  }
  m.set_density(density_sum / model.num_layers);
  m.set_queue_seconds(0.0005);
  m.set_compute_seconds(0.05);
  m.set_time_to_first_kv_byte_seconds(0.01);
  m.set_time_to_last_byte_seconds(0.06);
  m.set_tokens_per_second(static_cast<double>(num_tokens) / 0.05);
  m.set_backend("fake");
  m.set_kv_bytes(2 * tensor_bytes * (end - begin));
  *m.mutable_effective_config() = request.config();
  return out;
}

std::vector<v1::PrefillResponse> StreamOf(const FakeOutput& output, int64_t chunk_bytes) {
  std::vector<v1::PrefillResponse> messages;
  auto add = [&]() -> v1::PrefillResponse& {
    v1::PrefillResponse& message = messages.emplace_back();
    message.set_request_id(output.request_id);
    return message;
  };
  *add().mutable_header() = output.header;
  for (size_t i = 0; i < output.k.size(); ++i) {
    const int32_t layer = output.header.kv_layer_begin() + static_cast<int32_t>(i);
    for (const auto& [name, bytes] :
         {std::pair{v1::TENSOR_NAME_K, &output.k[i]}, std::pair{v1::TENSOR_NAME_V, &output.v[i]}}) {
      for (int64_t offset = 0; offset < static_cast<int64_t>(bytes->size());
           offset += chunk_bytes) {
        v1::KvChunk* chunk = add().mutable_kv_chunk();
        chunk->set_layer(layer);
        chunk->set_tensor(name);
        chunk->set_offset(offset);
        chunk->set_data(
            bytes->substr(static_cast<size_t>(offset), static_cast<size_t>(chunk_bytes)));
      }
    }
  }
  if (output.send_logits) *add().mutable_logits() = output.logits;
  *add().mutable_metrics() = output.metrics;
  return messages;
}

// ---- fake service -------------------------------------------------------------------------------

void FakePrefillService::SetScript(ScriptFn script) {
  absl::MutexLock lock(&mu_);
  script_ = std::move(script);
}

void FakePrefillService::SetModelInfo(grpc::Status status, v1::ModelInfo info) {
  absl::MutexLock lock(&mu_);
  info_status_ = std::move(status);
  info_ = std::move(info);
}

std::vector<v1::PrefillRequest> FakePrefillService::requests() const {
  absl::MutexLock lock(&mu_);
  return requests_;
}

std::multimap<std::string, std::string> FakePrefillService::last_metadata() const {
  absl::MutexLock lock(&mu_);
  return metadata_;
}

grpc::Status FakePrefillService::Prefill(grpc::ServerContext* context,
                                         const v1::PrefillRequest* request,
                                         grpc::ServerWriter<v1::PrefillResponse>* writer) {
  FakeScript script;
  {
    absl::MutexLock lock(&mu_);
    requests_.push_back(*request);
    metadata_.clear();
    for (const auto& [key, value] : context->client_metadata()) {
      metadata_.emplace(std::string(key.data(), key.size()),
                        std::string(value.data(), value.size()));
    }
    if (!script_) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no script");
    script = script_(*request);
  }
  for (const v1::PrefillResponse& message : script.messages) {
    if (script.delay_before_each > absl::ZeroDuration()) absl::SleepFor(script.delay_before_each);
    if (context->IsCancelled()) return grpc::Status::CANCELLED;
    if (!writer->Write(message)) return grpc::Status::CANCELLED;
  }
  return script.status;
}

grpc::Status FakePrefillService::GetModelInfo(grpc::ServerContext* context,
                                              const v1::GetModelInfoRequest* request,
                                              v1::ModelInfo* response) {
  absl::MutexLock lock(&mu_);
  if (!info_status_.ok()) return info_status_;
  *response = info_;
  return grpc::Status::OK;
}

absl::StatusOr<std::unique_ptr<FakePrefillServer>> FakePrefillServer::Start() {
  std::unique_ptr<FakePrefillServer> server(new FakePrefillServer());
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &server->port_);
  builder.RegisterService(&server->service_);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError("the fake PrefillService did not start");
  }
  return server;
}

FakePrefillServer::~FakePrefillServer() {
  if (server_ != nullptr) server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
}

std::string FakePrefillServer::target() const { return absl::StrCat("127.0.0.1:", port_); }

// ---- subprocess ---------------------------------------------------------------------------------

std::string ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

absl::StatusOr<ProcessOutput> RunSubprocess(const std::vector<std::string>& argv,
                                            absl::Duration timeout) {
  const char* tmp = std::getenv("TMPDIR");
  std::string out_path = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/anchor_sub_out_XXXXXX");
  std::string err_path = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/anchor_sub_err_XXXXXX");
  const int out_fd = mkstemp(out_path.data());
  const int err_fd = mkstemp(err_path.data());
  if (out_fd < 0 || err_fd < 0) return absl::InternalError("mkstemp failed");
  std::vector<char*> args;
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    const int null_fd = open("/dev/null", O_RDONLY);
    dup2(null_fd, STDIN_FILENO);
    dup2(out_fd, STDOUT_FILENO);
    dup2(err_fd, STDERR_FILENO);
    execv(args[0], args.data());
    _exit(127);
  }
  close(out_fd);
  close(err_fd);
  const absl::Time deadline = absl::Now() + timeout;
  int wait_status = 0;
  bool timed_out = false;
  while (true) {
    const pid_t done = waitpid(pid, &wait_status, WNOHANG);
    if (done == pid) break;
    if (done < 0) return absl::InternalError("waitpid failed");
    if (absl::Now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &wait_status, 0);
      timed_out = true;
      break;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  ProcessOutput output;
  output.stdout_text = ReadFileBytes(out_path);
  output.stderr_text = ReadFileBytes(err_path);
  std::remove(out_path.c_str());
  std::remove(err_path.c_str());
  if (timed_out) {
    return absl::DeadlineExceededError(
        absl::StrCat(argv[0], " did not finish in time; stderr: ", output.stderr_text));
  }
  output.exit_code = WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : -1;
  return output;
}

// ---- safetensors reader -------------------------------------------------------------------------

namespace {

// Just enough JSON for safetensors headers: objects, arrays, strings, non-negative integers.
struct JsonValue {
  std::variant<std::string, int64_t, std::vector<JsonValue>,
               std::vector<std::pair<std::string, JsonValue>>>
      value;
};

class JsonParser {
 public:
  explicit JsonParser(absl::string_view text) : text_(text) {}

  absl::StatusOr<JsonValue> ParseDocument() {
    absl::StatusOr<JsonValue> value = ParseValue();
    if (!value.ok()) return value;
    SkipSpace();
    if (pos_ != text_.size()) return Error("trailing characters");
    return value;
  }

 private:
  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat("JSON: ", what, " at ", pos_));
  }
  void SkipSpace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\n' ||
                                   text_[pos_] == '\t' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }
  bool Take(char c) {
    SkipSpace();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  absl::StatusOr<std::string> ParseString() {
    if (!Take('"')) return Error("expected a string");
    std::string out;
    while (pos_ < text_.size() && text_[pos_] != '"') {
      char c = text_[pos_++];
      if (c != '\\') {
        out.push_back(c);
        continue;
      }
      if (pos_ >= text_.size()) return Error("unterminated escape");
      c = text_[pos_++];
      if (c == 'u') {
        if (pos_ + 4 > text_.size()) return Error("short \\u escape");
        const int code = std::stoi(std::string(text_.substr(pos_, 4)), nullptr, 16);
        pos_ += 4;
        if (code >= 0x80) return Error("non-ASCII \\u escape is not supported here");
        out.push_back(static_cast<char>(code));
      } else if (c == '"' || c == '\\' || c == '/') {
        out.push_back(c);
      } else if (c == 'n') {
        out.push_back('\n');
      } else if (c == 't') {
        out.push_back('\t');
      } else {
        return Error("unknown escape");
      }
    }
    if (pos_ >= text_.size()) return Error("unterminated string");
    ++pos_;
    return out;
  }

  absl::StatusOr<JsonValue> ParseValue() {
    SkipSpace();
    if (pos_ >= text_.size()) return Error("unexpected end");
    const char c = text_[pos_];
    if (c == '"') {
      absl::StatusOr<std::string> s = ParseString();
      if (!s.ok()) return s.status();
      return JsonValue{*std::move(s)};
    }
    if (c == '[') {
      ++pos_;
      std::vector<JsonValue> items;
      if (Take(']')) return JsonValue{std::move(items)};
      do {
        absl::StatusOr<JsonValue> item = ParseValue();
        if (!item.ok()) return item;
        items.push_back(*std::move(item));
      } while (Take(','));
      if (!Take(']')) return Error("expected ]");
      return JsonValue{std::move(items)};
    }
    if (c == '{') {
      ++pos_;
      std::vector<std::pair<std::string, JsonValue>> members;
      if (Take('}')) return JsonValue{std::move(members)};
      do {
        absl::StatusOr<std::string> key = ParseString();
        if (!key.ok()) return key.status();
        if (!Take(':')) return Error("expected :");
        absl::StatusOr<JsonValue> item = ParseValue();
        if (!item.ok()) return item;
        members.emplace_back(*std::move(key), *std::move(item));
      } while (Take(','));
      if (!Take('}')) return Error("expected }");
      return JsonValue{std::move(members)};
    }
    if (c >= '0' && c <= '9') {
      int64_t number = 0;
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
        number = number * 10 + (text_[pos_++] - '0');
      }
      return JsonValue{number};
    }
    return Error("unexpected character");
  }

  absl::string_view text_;
  size_t pos_ = 0;
};

using JsonObject = std::vector<std::pair<std::string, JsonValue>>;
using JsonArray = std::vector<JsonValue>;

const JsonValue* Member(const JsonObject& object, absl::string_view key) {
  for (const auto& [name, value] : object) {
    if (name == key) return &value;
  }
  return nullptr;
}

}  // namespace

absl::StatusOr<ParsedSafetensors> ParseSafetensorsFile(const std::string& bytes) {
  if (bytes.size() < 8) return absl::InvalidArgumentError("shorter than the length prefix");
  ParsedSafetensors parsed;
  for (int i = 0; i < 8; ++i) {
    parsed.header_length |= uint64_t{static_cast<uint8_t>(bytes[i])} << (8 * i);
  }
  if (parsed.header_length > bytes.size() - 8) {
    return absl::InvalidArgumentError("header length past the end of the file");
  }
  parsed.header_json = bytes.substr(8, parsed.header_length);
  absl::StatusOr<JsonValue> root = JsonParser(parsed.header_json).ParseDocument();
  if (!root.ok()) return root.status();
  const auto* object = std::get_if<JsonObject>(&root->value);
  if (object == nullptr) return absl::InvalidArgumentError("header is not a JSON object");
  const std::string data = bytes.substr(8 + parsed.header_length);
  std::vector<std::pair<int64_t, std::string>> by_offset;
  for (const auto& [name, value] : *object) {
    const auto* entry = std::get_if<JsonObject>(&value.value);
    if (entry == nullptr) return absl::InvalidArgumentError(absl::StrCat(name, " not an object"));
    if (name == "__metadata__") {
      for (const auto& [key, item] : *entry) {
        const auto* text = std::get_if<std::string>(&item.value);
        if (text == nullptr) return absl::InvalidArgumentError("metadata value not a string");
        parsed.metadata[key] = *text;
      }
      continue;
    }
    ParsedTensor tensor;
    const JsonValue* dtype = Member(*entry, "dtype");
    const JsonValue* shape = Member(*entry, "shape");
    const JsonValue* offsets = Member(*entry, "data_offsets");
    if (dtype == nullptr || shape == nullptr || offsets == nullptr ||
        !std::holds_alternative<std::string>(dtype->value) ||
        !std::holds_alternative<JsonArray>(shape->value) ||
        !std::holds_alternative<JsonArray>(offsets->value)) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": missing or mistyped fields"));
    }
    tensor.dtype = std::get<std::string>(dtype->value);
    for (const JsonValue& dim : std::get<JsonArray>(shape->value)) {
      tensor.shape.push_back(std::get<int64_t>(dim.value));
    }
    const JsonArray& pair = std::get<JsonArray>(offsets->value);
    if (pair.size() != 2) return absl::InvalidArgumentError(absl::StrCat(name, ": bad offsets"));
    tensor.begin = std::get<int64_t>(pair[0].value);
    tensor.end = std::get<int64_t>(pair[1].value);
    if (tensor.begin > tensor.end || tensor.end > static_cast<int64_t>(data.size())) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": offsets outside the data"));
    }
    int64_t elements = 1;
    for (int64_t dim : tensor.shape) elements *= dim;
    const int64_t element_size = tensor.dtype == "F32" ? 4 : 2;
    if (elements * element_size != tensor.end - tensor.begin) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": size does not match the shape"));
    }
    tensor.data = data.substr(static_cast<size_t>(tensor.begin),
                              static_cast<size_t>(tensor.end - tensor.begin));
    by_offset.emplace_back(tensor.begin, name);
    parsed.tensors.emplace(name, std::move(tensor));
  }
  std::sort(by_offset.begin(), by_offset.end());
  int64_t expected = 0;
  for (const auto& [begin, name] : by_offset) {
    if (begin != expected) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": data is not contiguous"));
    }
    expected = parsed.tensors[name].end;
    parsed.names_by_offset.push_back(name);
  }
  if (expected != static_cast<int64_t>(data.size())) {
    return absl::InvalidArgumentError("bytes after the last tensor");
  }
  return parsed;
}

}  // namespace anchorserve::testing
