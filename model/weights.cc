#include "model/weights.h"

#include <cstdlib>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/status_macros.h"

namespace anchorserve {
namespace {

constexpr absl::string_view kLayerPrefix = "model.layers.";

std::string LayerName(int layer, absl::string_view suffix) {
  return absl::StrCat(kLayerPrefix, layer, ".", suffix);
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Elements converted per work item: large enough to amortize scheduling, small enough to balance.
constexpr int64_t kConvertChunk = int64_t{1} << 20;

}  // namespace

std::vector<WeightSpec> ExpectedWeights(const ModelConfig& c) {
  const int64_t h = c.hidden_size, inter = c.intermediate_size;
  const int64_t q = c.QDim(), kv = c.KvDim();
  std::vector<WeightSpec> specs;
  specs.push_back({"model.embed_tokens.weight", {c.vocab_size, h}});
  for (int i = 0; i < c.num_layers; ++i) {
    specs.push_back({LayerName(i, "input_layernorm.weight"), {h}});
    specs.push_back({LayerName(i, "self_attn.q_proj.weight"), {q, h}});
    specs.push_back({LayerName(i, "self_attn.k_proj.weight"), {kv, h}});
    specs.push_back({LayerName(i, "self_attn.v_proj.weight"), {kv, h}});
    if (c.qkv_bias) {
      specs.push_back({LayerName(i, "self_attn.q_proj.bias"), {q}});
      specs.push_back({LayerName(i, "self_attn.k_proj.bias"), {kv}});
      specs.push_back({LayerName(i, "self_attn.v_proj.bias"), {kv}});
    }
    specs.push_back({LayerName(i, "self_attn.o_proj.weight"), {h, q}});
    specs.push_back({LayerName(i, "post_attention_layernorm.weight"), {h}});
    specs.push_back({LayerName(i, "mlp.gate_proj.weight"), {inter, h}});
    specs.push_back({LayerName(i, "mlp.up_proj.weight"), {inter, h}});
    specs.push_back({LayerName(i, "mlp.down_proj.weight"), {h, inter}});
  }
  specs.push_back({"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) specs.push_back({"lm_head.weight", {c.vocab_size, h}});
  return specs;
}

absl::Status CheckWeightTable(const ModelConfig& config, const TensorStore& store) {
  for (const WeightSpec& spec : ExpectedWeights(config)) {
    const StoredTensor* view = store.Find(spec.name);
    if (view == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(store.dir(), ": tensor '", spec.name, "' is missing from the checkpoint"));
    }
    if (view->shape != spec.shape) {
      return absl::InvalidArgumentError(
          absl::StrCat(*view->file, ": tensor '", spec.name, "' has shape ", view->ShapeString(),
                       ", config.json implies ", ShapeString(spec.shape)));
    }
  }
  // A layer beyond the configured count means config and weights disagree.
  for (const auto& [name, view] : store.tensors()) {
    absl::string_view rest = name;
    if (!absl::ConsumePrefix(&rest, kLayerPrefix)) continue;
    const size_t dot = rest.find('.');
    int layer = 0;
    if (dot == absl::string_view::npos || !absl::SimpleAtoi(rest.substr(0, dot), &layer)) {
      continue;
    }
    if (layer < 0 || layer >= config.num_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat(*view->file, ": tensor '", name, "' belongs to layer ", layer,
                       " but config.json has num_hidden_layers = ", config.num_layers));
    }
  }
  return absl::OkStatus();
}

void Weights::FreeDeleter::operator()(float* p) const { std::free(p); }

absl::StatusOr<std::unique_ptr<Weights>> Weights::Load(const ModelConfig& config,
                                                       std::unique_ptr<TensorStore> store,
                                                       int threads) {
  ANCHOR_RETURN_IF_ERROR(CheckWeightTable(config, *store));
  std::unique_ptr<Weights> weights(new Weights());
  Weights& w = *weights;
  w.disk_dtype_ = store->Find("model.embed_tokens.weight")->dtype;
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  cpu::ThreadPool pool(threads);

  // fp32 view of one tensor: in place when possible, else a converted copy.
  auto fp32 = [&](const std::string& name) -> absl::StatusOr<const float*> {
    const StoredTensor& view = *store->Find(name);
    const int64_t count = view.NumElements();
    w.num_parameters_ += count;
    if (view.dtype == DType::kFp32 &&
        reinterpret_cast<uintptr_t>(view.data) % alignof(float) == 0) {
      return reinterpret_cast<const float*>(view.data);
    }
    const size_t bytes = (static_cast<size_t>(count) * sizeof(float) + 63) / 64 * 64;
    float* buffer = static_cast<float*>(std::aligned_alloc(64, std::max<size_t>(bytes, 64)));
    if (buffer == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "cannot allocate ", bytes, " bytes for the fp32 copy of tensor '", name, "'"));
    }
    w.buffers_.emplace_back(buffer);
    w.converted_bytes_ += static_cast<int64_t>(bytes);
    const size_t element_size = ElementSize(view.dtype);
    pool.ParallelFor((count + kConvertChunk - 1) / kConvertChunk, [&](int64_t chunk, int) {
      const int64_t begin = chunk * kConvertChunk;
      const int64_t n = std::min(kConvertChunk, count - begin);
      ConvertToFloat(view.data + begin * static_cast<int64_t>(element_size), view.dtype,
                     static_cast<size_t>(n), buffer + begin);
    });
    store->Release(view);
    return static_cast<const float*>(buffer);
  };

  ModelWeights& m = w.weights_;
  ANCHOR_ASSIGN_OR_RETURN(m.embed_tokens, fp32("model.embed_tokens.weight"));
  m.layers.resize(config.num_layers);
  for (int i = 0; i < config.num_layers; ++i) {
    LayerWeights& l = m.layers[i];
    ANCHOR_ASSIGN_OR_RETURN(l.input_norm, fp32(LayerName(i, "input_layernorm.weight")));
    ANCHOR_ASSIGN_OR_RETURN(l.q_proj, fp32(LayerName(i, "self_attn.q_proj.weight")));
    ANCHOR_ASSIGN_OR_RETURN(l.k_proj, fp32(LayerName(i, "self_attn.k_proj.weight")));
    ANCHOR_ASSIGN_OR_RETURN(l.v_proj, fp32(LayerName(i, "self_attn.v_proj.weight")));
    if (config.qkv_bias) {
      ANCHOR_ASSIGN_OR_RETURN(l.q_bias, fp32(LayerName(i, "self_attn.q_proj.bias")));
      ANCHOR_ASSIGN_OR_RETURN(l.k_bias, fp32(LayerName(i, "self_attn.k_proj.bias")));
      ANCHOR_ASSIGN_OR_RETURN(l.v_bias, fp32(LayerName(i, "self_attn.v_proj.bias")));
    }
    ANCHOR_ASSIGN_OR_RETURN(l.o_proj, fp32(LayerName(i, "self_attn.o_proj.weight")));
    ANCHOR_ASSIGN_OR_RETURN(l.post_attention_norm,
                            fp32(LayerName(i, "post_attention_layernorm.weight")));
    ANCHOR_ASSIGN_OR_RETURN(l.gate_proj, fp32(LayerName(i, "mlp.gate_proj.weight")));
    ANCHOR_ASSIGN_OR_RETURN(l.up_proj, fp32(LayerName(i, "mlp.up_proj.weight")));
    ANCHOR_ASSIGN_OR_RETURN(l.down_proj, fp32(LayerName(i, "mlp.down_proj.weight")));
  }
  ANCHOR_ASSIGN_OR_RETURN(m.final_norm, fp32("model.norm.weight"));
  if (config.tie_word_embeddings) {
    m.lm_head = m.embed_tokens;
  } else {
    ANCHOR_ASSIGN_OR_RETURN(m.lm_head, fp32("lm_head.weight"));
  }
  w.store_ = std::move(store);
  return weights;
}

}  // namespace anchorserve
