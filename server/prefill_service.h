// anchorserve.v1.PrefillService on gRPC's callback API: prompt token IDs in; a header, each
// returned layer's K then V in chunks (as soon as the layer is done, while later layers
// compute), the last position's logits, the metrics, then status OK.
//
// Prefill jobs go through their own DynamicBatcher (one prefill at a time on the engine; the
// same queue limit, deadlines, cancellation and drain as attention). Backpressure: the engine
// waits before handing over a layer while more than --prefill_buffer_bytes of KV of this call
// wait to be sent, so a slow reader holds the prefill rather than server memory.
//
// Errors (gRPC status, the field named): INVALID_ARGUMENT for empty token_ids, an id outside
// [0, vocab), a bad layer range, dtype, layout or logits option; OUT_OF_RANGE for more tokens
// than the model's max_position_embeddings or --max_seq_len; FAILED_PRECONDITION without a
// model, when expected_fingerprint differs or when the engine cannot run the config (a mass
// target on the cuda engine); RESOURCE_EXHAUSTED when the queue is full or the
// engine's workspace for N tokens exceeds --prefill_memory_bytes (decided before any work);
// CANCELLED / DEADLINE_EXCEEDED honoured between layers.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "anchorserve/v1/prefill.grpc.pb.h"
#include "kernels/attention_types.h"
#include "model/model.h"
#include "model/prefill_engine.h"
#include "server/attention_service.h"
#include "server/batcher.h"
#include "server/server_config.h"

namespace anchorserve {

enum class LogitsMode { kFull, kTopK, kNone };

// A validated PrefillRequest.
struct PrefillSpec {
  std::vector<int32_t> token_ids;  // [N]
  AnchorConfig config;             // defaults applied, mode resolved (never kAuto)
  std::string mode_choice;         // ResolveMode's reason when the request's mode was auto
  int kv_layer_begin = 0;          // layers [begin, end) are returned
  int kv_layer_end = 0;
  DType kv_dtype = DType::kBf16;
  Layout kv_layout = Layout::kHeadMajor;
  LogitsMode logits_mode = LogitsMode::kFull;
  int logits_top_k = 0;
  int64_t tensor_bytes = 0;  // one K (or V) tensor: N * Hkv * d * element size
};

// Checks `request` against the model and the server's limits; errors name the field.
absl::StatusOr<PrefillSpec> PrefillSpecFromRequest(const v1::PrefillRequest& request,
                                                   const Model& model, const ServerConfig& config);
// The same against a model's config, fingerprint and folder (no weights needed: the fuzz target).
absl::StatusOr<PrefillSpec> PrefillSpecFromRequest(const v1::PrefillRequest& request,
                                                   const ModelConfig& model_config,
                                                   absl::string_view model_fingerprint,
                                                   absl::string_view model_dir,
                                                   const ServerConfig& config);

v1::ModelInfo ModelInfoProto(const Model& model);

// What Prefill needs; published once by SetReady.
struct PrefillServing {
  const Model* model = nullptr;       // null: started without --model
  PrefillEngine* engine = nullptr;    // with a model
  DynamicBatcher* batcher = nullptr;  // with a model
};

// Raw (grpc::ByteBuffer) methods, the same messages on the wire: a request that does not parse is
// INVALID_ARGUMENT naming it rather than gRPC's UNIMPLEMENTED (see AttentionServiceBase).
using PrefillServiceBase = v1::PrefillService::WithRawCallbackMethod_Prefill<
    v1::PrefillService::WithRawCallbackMethod_GetModelInfo<v1::PrefillService::Service>>;

class PrefillServiceImpl final : public PrefillServiceBase {
 public:
  // Shares `host`'s lifecycle: readiness, draining, RPCs in flight, request ids, config,
  // metrics and clock. `host` must outlive this service.
  explicit PrefillServiceImpl(AttentionServiceImpl* host) : host_(host) {}

  // Model, engine and batcher (all null without --model) must outlive the service.
  // FAILED_PRECONDITION when called again.
  absl::Status SetReady(const Model* model, PrefillEngine* engine, DynamicBatcher* batcher);
  const PrefillServing* serving() const { return serving_.load(std::memory_order_acquire); }
  AttentionServiceImpl* host() const { return host_; }

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Prefill(grpc::CallbackServerContext* context,
                                                      const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const grpc::ByteBuffer* request,
                                         grpc::ByteBuffer* response) override;

 private:
  AttentionServiceImpl* const host_;
  absl::Mutex ready_mu_;
  std::unique_ptr<const PrefillServing> owned_serving_ ABSL_GUARDED_BY(ready_mu_);
  std::atomic<const PrefillServing*> serving_{nullptr};
};

}  // namespace anchorserve
