// anchorctl model and anchorctl prefill: the PrefillService subcommands.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "anchorserve/v1/prefill.pb.h"
#include "client/anchorctl_common.h"
#include "client/host_tensor.h"
#include "client/npy.h"
#include "client/prefill_client.h"
#include "client/safetensors.h"
#include "proto/anchorserve/v1/convert.h"

ABSL_FLAG(std::string, ids, "", "prefill: the prompt's token ids, e.g. 1,2,3");
ABSL_FLAG(std::string, ids_file, "",
          "prefill: a text file of token ids separated by whitespace and/or commas");
ABSL_FLAG(int64_t, random_ids, 0,
          "prefill: N token ids drawn uniformly from the model's vocabulary (with --seed)");
ABSL_FLAG(bool, dense, false,
          "prefill: exact dense attention in every layer (not with --theta or --mass_target)");
ABSL_FLAG(std::string, kv_dtype, "bf16", "prefill: dtype of the returned K/V (bf16|fp16|fp32)");
ABSL_FLAG(std::string, kv_layout, "head",
          "prefill: head ([Hkv, N, d]) | token ([N, Hkv, d]) layout of the returned K/V");
ABSL_FLAG(std::string, kv_layers, "all", "prefill: layers whose K/V to return: all | none | B:E");
ABSL_FLAG(std::string, logits, "full", "prefill: full | topk:K | none");
ABSL_FLAG(std::string, expected_fingerprint, "",
          "prefill: fail (FAILED_PRECONDITION) unless the server's model has this fingerprint");
ABSL_FLAG(int64_t, deadline_ms, 0, "prefill: deadline of the call in ms (0: --deadline_s)");
ABSL_FLAG(std::string, kv_out, "",
          "prefill: write K/V to this .safetensors file (layers.{i}.k, layers.{i}.v), streamed");
ABSL_FLAG(std::string, logits_out, "",
          "prefill: write the full logits to this float32 .npy file (needs --logits=full)");

namespace anchorserve::cli {
namespace {

constexpr int64_t kMaxRandomIds = int64_t{1} << 24;

std::string DTypeText(int dtype) {
  absl::StatusOr<DType> parsed = DTypeFromProto("dtype", dtype);
  return parsed.ok() ? std::string(DTypeName(*parsed)) : absl::StrCat("dtype ", dtype);
}

std::string RopeText(const v1::RopeInfo& rope) {
  std::string text = absl::StrCat(rope.style().empty() ? "?" : rope.style(),
                                  " theta=", rope.theta(), " scaling=", rope.scaling());
  if (rope.scaling() == "llama3") {
    absl::StrAppend(&text, " (factor ", rope.factor(), ", low_freq_factor ", rope.low_freq_factor(),
                    ", high_freq_factor ", rope.high_freq_factor(),
                    ", original_max_position_embeddings ", rope.original_max_position_embeddings(),
                    ")");
  }
  return text;
}

std::string LayoutText(int layout) {
  return layout == v1::TENSOR_LAYOUT_TOKEN_MAJOR ? "token-major [N, Hkv, d]"
                                                 : "head-major [Hkv, N, d]";
}

// ---- model --------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<PrefillClient>> MakePrefillClient() {
  absl::StatusOr<ClientOptions> options = ClientOptionsFromFlags();
  if (!options.ok()) return options.status();
  return PrefillClient::Create(absl::GetFlag(FLAGS_target), *options);
}

void PrintModel(const v1::ModelInfo& m) {
  std::printf("architecture:   %s\n", m.architecture().c_str());
  std::printf("fingerprint:    %s\n", m.fingerprint().c_str());
  std::printf("layers:         %d\n", m.num_layers());
  std::printf("hidden size:    %d (intermediate %d)\n", m.hidden_size(), m.intermediate_size());
  std::printf("heads:          %d query, %d key/value, head dim %d\n", m.num_q_heads(),
              m.num_kv_heads(), m.head_dim());
  std::printf("vocabulary:     %lld%s\n", static_cast<long long>(m.vocab_size()),
              m.tied_embeddings() ? " (tied embeddings)" : "");
  std::printf("max positions:  %lld\n", static_cast<long long>(m.max_position_embeddings()));
  std::printf("rope:           %s\n", RopeText(m.rope()).c_str());
  std::printf("rms_norm_eps:   %g\n", m.rms_norm_eps());
  std::printf("weights:        %s, %lld parameters\n", DTypeText(m.weight_dtype()).c_str(),
              static_cast<long long>(m.num_parameters()));
  std::printf("kv per token:   %s (K + V of every layer in bf16)\n",
              FormatBytes(m.kv_bytes_per_token()).c_str());
  std::printf("load time:      %.3f s\n", m.load_seconds());
}

// ---- prefill ------------------------------------------------------------------------------------

// The prompt from --ids, --ids_file or --random_ids (exactly one). `client` answers
// GetModelInfo for --random_ids. `usage_error` tells a bad command line from a failed call.
absl::StatusOr<std::vector<int32_t>> PromptFromFlags(PrefillClient& client, bool* usage_error) {
  *usage_error = true;
  const std::string ids = absl::GetFlag(FLAGS_ids);
  const std::string ids_file = absl::GetFlag(FLAGS_ids_file);
  const int64_t random_ids = absl::GetFlag(FLAGS_random_ids);
  const int sources = !ids.empty() + !ids_file.empty() + (random_ids != 0);
  if (sources != 1) {
    return absl::InvalidArgumentError(
        "prefill needs exactly one of --ids=1,2,3, --ids_file=FILE or --random_ids=N");
  }
  if (!ids.empty()) return ParseTokenIds(ids, "--ids");
  if (!ids_file.empty()) {
    std::ifstream in(ids_file);
    if (!in) {
      return absl::NotFoundError(absl::StrCat("--ids_file: cannot open ", ids_file));
    }
    std::stringstream text;
    text << in.rdbuf();
    return ParseTokenIds(text.str(), ids_file);
  }
  if (random_ids < 1 || random_ids > kMaxRandomIds) {
    return absl::InvalidArgumentError(
        absl::StrCat("--random_ids must be in [1, ", kMaxRandomIds, "], got ", random_ids));
  }
  *usage_error = false;
  absl::StatusOr<v1::ModelInfo> info = client.GetModelInfo();
  if (!info.ok()) return info.status();
  const int64_t vocab = info->vocab_size();
  if (vocab < 1 || vocab > int64_t{1} << 31) {
    return absl::InternalError(
        absl::StrCat("GetModelInfo reports a vocab_size of ", vocab, "; cannot draw token ids"));
  }
  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
  std::uniform_int_distribution<int64_t> uniform(0, vocab - 1);
  std::vector<int32_t> drawn(static_cast<size_t>(random_ids));
  for (int32_t& id : drawn) id = static_cast<int32_t>(uniform(rng));
  return drawn;
}

// The request from the flags, without the token ids.
absl::StatusOr<v1::PrefillRequest> RequestFromFlags() {
  v1::PrefillRequest request;
  request.set_request_id(absl::GetFlag(FLAGS_request_id));
  absl::StatusOr<v1::AnchorConfig> config = ConfigFromFlags();
  if (!config.ok()) return config.status();
  if (absl::GetFlag(FLAGS_dense)) {
    if (config->has_theta()) {
      return absl::InvalidArgumentError("--theta and --dense exclude each other");
    }
    if (config->has_mass_target()) {
      return absl::InvalidArgumentError("--mass_target and --dense exclude each other");
    }
    config->set_mode(v1::ATTENTION_MODE_DENSE);
  }
  *request.mutable_config() = *std::move(config);
  absl::StatusOr<DType> kv_dtype = ParseDType(absl::GetFlag(FLAGS_kv_dtype));
  if (!kv_dtype.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--kv_dtype: ", kv_dtype.status().message()));
  }
  request.set_kv_dtype(DTypeToProto(*kv_dtype));
  absl::StatusOr<Layout> kv_layout = ParseLayout(absl::GetFlag(FLAGS_kv_layout));
  if (!kv_layout.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--kv_layout: ", kv_layout.status().message()));
  }
  request.set_kv_layout(LayoutToProto(*kv_layout));
  if (absl::Status status = SetKvLayers(absl::GetFlag(FLAGS_kv_layers), &request); !status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--kv_layers: ", status.message()));
  }
  if (absl::Status status = SetLogitsMode(absl::GetFlag(FLAGS_logits), &request); !status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--logits: ", status.message()));
  }
  request.set_expected_fingerprint(absl::GetFlag(FLAGS_expected_fingerprint));
  if (!absl::GetFlag(FLAGS_kv_out).empty() && request.kv_selection() == v1::KV_SELECTION_NONE) {
    return absl::InvalidArgumentError("--kv_out needs K/V; drop --kv_layers=none");
  }
  if (!absl::GetFlag(FLAGS_logits_out).empty() && request.logits_mode() != v1::LOGITS_MODE_FULL) {
    return absl::InvalidArgumentError("--logits_out writes the full logits; use --logits=full");
  }
  if (absl::GetFlag(FLAGS_deadline_ms) < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--deadline_ms must be >= 0, got ", absl::GetFlag(FLAGS_deadline_ms)));
  }
  return request;
}

void PrintHeader(const v1::PrefillHeader& h, const std::string& request_id) {
  std::printf("request id:      %s\n", request_id.c_str());
  std::printf("model:           fingerprint %s, %d layers\n", h.model_fingerprint().c_str(),
              h.num_layers());
  std::printf("prompt:          %lld tokens\n", static_cast<long long>(h.num_tokens()));
  std::printf("rope:            %s\n", RopeText(h.rope()).c_str());
  const int32_t layers = h.kv_layer_end() - h.kv_layer_begin();
  if (layers == 0) {
    std::printf("kv:              none requested\n");
  } else {
    std::printf(
        "kv:              layers [%d, %d), each K and V %s %s = %s; %s per layer, %s "
        "in all\n",
        h.kv_layer_begin(), h.kv_layer_end(), DTypeText(h.kv_dtype()).c_str(),
        LayoutText(h.kv_layout()).c_str(), DimsText(h.kv_spec().shape()).c_str(),
        FormatBytes(h.bytes_per_layer()).c_str(),
        FormatBytes(h.bytes_per_layer() * layers).c_str());
  }
  std::fflush(stdout);
}

// The progress line on stderr: rewritten in place on a terminal, one line per layer otherwise.
class ProgressLine {
 public:
  ProgressLine() : tty_(isatty(fileno(stderr)) != 0) {}
  ~ProgressLine() { End(); }

  void Update(const PrefillLayerProgress& p) {
    const double seconds = absl::ToDoubleSeconds(p.elapsed);
    const std::string line = absl::StrFormat(
        "prefill: layer %d received (%d/%d), %s, %.3f s, %s/s", p.layer, p.layers_done,
        p.layers_total, FormatBytes(p.kv_bytes_received), seconds,
        FormatBytes(seconds > 0 ? static_cast<int64_t>(p.kv_bytes_received / seconds) : 0));
    if (tty_) {
      std::fprintf(stderr, "\r%s\033[K", line.c_str());
      open_ = true;
    } else {
      std::fprintf(stderr, "%s\n", line.c_str());
    }
    std::fflush(stderr);
  }

  void End() {
    if (open_) std::fputc('\n', stderr);
    open_ = false;
  }

 private:
  bool tty_;
  bool open_ = false;
};

void PrintResults(const PrefillSummary& s) {
  const v1::PrefillMetrics& m = s.metrics;
  if (m.layers_size() > 0) {
    std::printf("%6s %10s %12s %12s %12s %12s\n", "layer", "density", "ident_ms", "attn_ms",
                "gemm_ms", "layer_ms");
    for (const v1::PrefillLayerMetrics& layer : m.layers()) {
      std::printf("%6d %10.6f %12.3f %12.3f %12.3f %12.3f\n", layer.layer(), layer.density(),
                  layer.identification_seconds() * 1e3, layer.attention_seconds() * 1e3,
                  layer.gemm_seconds() * 1e3, layer.layer_seconds() * 1e3);
    }
  }
  std::printf("density:         %.6f (mean over layers)\n", m.density());
  std::printf("backend:         %s, effective config %s\n", m.backend().c_str(),
              DescribeConfig(m.effective_config()).c_str());
  if (!m.mode_choice().empty()) std::printf("mode choice:     %s\n", m.mode_choice().c_str());
  if (s.logits.has_value()) {
    const v1::Logits& logits = *s.logits;
    std::string detail;
    if (logits.values_size() > logits.argmax_token_id()) {
      detail = absl::StrFormat(" (logit %.4f)", logits.values(logits.argmax_token_id()));
    } else if (logits.top_size() > 0) {
      detail = absl::StrFormat(" (logit %.4f, logprob %.4f)", logits.top(0).logit(),
                               logits.top(0).logprob());
    }
    std::printf("first token:     %d%s, argmax of the last position's logits\n",
                logits.argmax_token_id(), detail.c_str());
    if (logits.top_size() > 0) {
      std::vector<std::string> top;
      for (const v1::TopLogit& entry : logits.top()) {
        top.push_back(absl::StrFormat("%d (%.4f)", entry.token_id(), entry.logprob()));
      }
      std::printf("%-17s%s (token id (logprob))\n",
                  absl::StrCat("top ", logits.top_size(), ":").c_str(),
                  absl::StrJoin(top, ", ").c_str());
    }
  }
  const double tokens = static_cast<double>(s.header.num_tokens());
  const double total = absl::ToDoubleSeconds(s.total);
  std::printf(
      "server times:    queue %s, compute %s, transfer %s, first KV byte %s, last byte %s\n",
      FormatMs(m.queue_seconds()).c_str(), FormatMs(m.compute_seconds()).c_str(),
      FormatMs(m.transfer_seconds()).c_str(), FormatMs(m.time_to_first_kv_byte_seconds()).c_str(),
      FormatMs(m.time_to_last_byte_seconds()).c_str());
  std::printf("throughput:      %.0f tokens/s (server compute), %.0f tokens/s end to end\n",
              m.tokens_per_second(), total > 0 ? tokens / total : 0.0);
  std::printf("client times:    time to first KV byte %s, total %s; %s of K/V received (%s/s)\n",
              s.time_to_first_kv_byte == absl::InfiniteDuration()
                  ? "- (no K/V)"
                  : FormatMs(absl::ToDoubleSeconds(s.time_to_first_kv_byte)).c_str(),
              FormatMs(total).c_str(), FormatBytes(s.kv_bytes).c_str(),
              FormatBytes(total > 0 ? static_cast<int64_t>(s.kv_bytes / total) : 0).c_str());
}

// Safetensors metadata: what a reader needs to use the tensors.
std::map<std::string, std::string> KvMetadata(const v1::PrefillHeader& h,
                                              const std::string& request_id) {
  return {{"anchorserve.model_fingerprint", h.model_fingerprint()},
          {"anchorserve.num_tokens", absl::StrCat(h.num_tokens())},
          {"anchorserve.num_layers", absl::StrCat(h.num_layers())},
          {"anchorserve.kv_layers", absl::StrCat(h.kv_layer_begin(), ":", h.kv_layer_end())},
          {"anchorserve.kv_layout", h.kv_layout() == v1::TENSOR_LAYOUT_TOKEN_MAJOR
                                        ? "token-major [num_tokens, num_kv_heads, head_dim]"
                                        : "head-major [num_kv_heads, num_tokens, head_dim]"},
          {"anchorserve.rope", RopeText(h.rope())},
          {"anchorserve.request_id", request_id}};
}

}  // namespace

int RunModel() {
  absl::StatusOr<std::unique_ptr<PrefillClient>> client = MakePrefillClient();
  if (!client.ok()) {
    PrintError(client.status());
    return kExitUsage;
  }
  absl::StatusOr<v1::ModelInfo> info = (*client)->GetModelInfo();
  if (!info.ok()) {
    PrintError(info.status());
    return kExitFailed;
  }
  std::printf("server:         %s\n", (*client)->target().c_str());
  PrintModel(*info);
  return kExitOk;
}

int RunPrefill() {
  absl::StatusOr<v1::PrefillRequest> request = RequestFromFlags();
  if (!request.ok()) {
    PrintError(request.status());
    return kExitUsage;
  }
  absl::StatusOr<std::unique_ptr<PrefillClient>> client = MakePrefillClient();
  if (!client.ok()) {
    PrintError(client.status());
    return kExitUsage;
  }
  absl::StatusOr<WholeCallRetry> stream_retry = StreamRetryFromFlags();
  if (!stream_retry.ok()) {
    PrintError(stream_retry.status());
    return kExitUsage;
  }
  bool usage_error = false;
  absl::StatusOr<std::vector<int32_t>> ids = PromptFromFlags(**client, &usage_error);
  if (!ids.ok()) {
    PrintError(ids.status());
    return usage_error ? kExitUsage : kExitFailed;
  }
  request->mutable_token_ids()->Assign(ids->begin(), ids->end());
  CallOptions call;
  if (const int64_t ms = absl::GetFlag(FLAGS_deadline_ms); ms > 0) {
    call.timeout = absl::Milliseconds(ms);
  }

  const std::string kv_out = absl::GetFlag(FLAGS_kv_out);
  std::unique_ptr<SafetensorsWriter> writer;
  int32_t layer_begin = 0;
  ProgressLine progress;
  PrefillCallbacks callbacks;
  callbacks.on_header = [&](const v1::PrefillHeader& header,
                            absl::string_view request_id) -> absl::Status {
    PrintHeader(header, std::string(request_id));
    layer_begin = header.kv_layer_begin();
    if (kv_out.empty()) return absl::OkStatus();
    absl::StatusOr<DType> dtype = DTypeFromProto("header.kv_spec.dtype", header.kv_spec().dtype());
    if (!dtype.ok()) return dtype.status();
    std::vector<SafetensorsEntry> entries;
    const std::vector<int64_t> shape(header.kv_spec().shape().begin(),
                                     header.kv_spec().shape().end());
    for (int32_t layer = header.kv_layer_begin(); layer < header.kv_layer_end(); ++layer) {
      entries.push_back({absl::StrCat("layers.", layer, ".k"), *dtype, shape});
      entries.push_back({absl::StrCat("layers.", layer, ".v"), *dtype, shape});
    }
    absl::StatusOr<std::unique_ptr<SafetensorsWriter>> created = SafetensorsWriter::Create(
        kv_out, std::move(entries), KvMetadata(header, std::string(request_id)));
    if (!created.ok()) return created.status();
    writer = *std::move(created);
    return absl::OkStatus();
  };
  callbacks.on_kv_data = [&](int32_t layer, v1::TensorName tensor, int64_t offset,
                             absl::string_view data) -> absl::Status {
    if (writer == nullptr) return absl::OkStatus();
    const size_t index =
        2 * static_cast<size_t>(layer - layer_begin) + (tensor == v1::TENSOR_NAME_V ? 1 : 0);
    return writer->Write(index, offset, data);
  };
  callbacks.on_layer_done = [&](const PrefillLayerProgress& p) -> absl::Status {
    progress.Update(p);
    return absl::OkStatus();
  };

  std::printf("sending:         %d token ids to %s\n", request->token_ids_size(),
              (*client)->target().c_str());
  std::fflush(stdout);
  // Retried whole only while no header has arrived: after it, output went to the terminal and
  // to --kv_out. (gRPC's retry policy covers most of these; this also covers requests too large
  // for its retry buffer.)
  bool header_seen = false;
  PrefillCallbacks counted = callbacks;
  counted.on_header = [&](const v1::PrefillHeader& header, absl::string_view request_id) {
    header_seen = true;
    return callbacks.on_header(header, request_id);
  };
  absl::StatusOr<PrefillSummary> summary = RetryWholeCall(
      *stream_retry, [&] { return (*client)->PrefillStreamed(*request, counted, call); },
      [&] { return !header_seen; });
  progress.End();
  if (!summary.ok()) {
    PrintError(summary.status());
    return kExitFailed;
  }
  PrintResults(*summary);
  if (writer != nullptr) {
    if (absl::Status finished = writer->Finish(); !finished.ok()) {
      PrintError(finished);
      return kExitFailed;
    }
    std::printf("kv written to:   %s (%s)\n", kv_out.c_str(),
                FormatBytes(writer->file_bytes()).c_str());
  }
  const std::string logits_out = absl::GetFlag(FLAGS_logits_out);
  if (!logits_out.empty()) {
    const v1::Logits& logits = *summary->logits;  // required by LOGITS_MODE_FULL
    const std::vector<int64_t> shape = {logits.values_size()};
    absl::Status written = WriteNpyFile(
        logits_out, DType::kFp32, shape,
        absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(logits.values().data()),
                            sizeof(float) * static_cast<size_t>(logits.values_size())));
    if (!written.ok()) {
      PrintError(written);
      return kExitFailed;
    }
    std::printf("logits written:  %s (float32 [%d])\n", logits_out.c_str(), logits.values_size());
  }
  return kExitOk;
}

}  // namespace anchorserve::cli
