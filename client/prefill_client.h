// Client of anchorserve.v1.PrefillService: token IDs in, each layer's K and V, the last
// position's logits and the server's metrics out (proto/anchorserve/v1/prefill.proto).
//
// The stream is checked message by message (PrefillStreamAssembler): the header first, then for
// each returned layer in increasing order K's chunks then V's chunks, each tensor's chunks at
// contiguous offsets from 0 to exactly the size of header.kv_spec, then the logits, then the
// metrics. Any other order is an INTERNAL error that names the field that was wrong; the call is
// cancelled at the first violation. Errors are absl::Status values; nothing throws.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "anchorserve/v1/prefill.grpc.pb.h"
#include "anchorserve/v1/prefill.pb.h"
#include "client/attention_client.h"
#include "client/host_tensor.h"
#include "grpcpp/channel.h"
#include "proto/anchorserve/v1/tensor_wire.h"

namespace anchorserve {

// One returned layer is complete (its K and V have arrived).
struct PrefillLayerProgress {
  int32_t layer = 0;              // model layer index
  int32_t layers_done = 0;        // returned layers complete so far, this one included
  int32_t layers_total = 0;       // layers the header announced
  int64_t kv_bytes_received = 0;  // K and V bytes so far, all layers
  absl::Duration elapsed;         // since the call started (client clock)
};

// What a streamed prefill hands to its caller as the messages arrive. Every member is optional.
// A callback that returns an error ends the call (it is cancelled) with that error.
struct PrefillCallbacks {
  // The header, checked against the request, before any KV byte; `request_id` is the one the
  // server echoed or made up.
  std::function<absl::Status(const v1::PrefillHeader& header, absl::string_view request_id)>
      on_header;
  // A piece of layer `layer`'s K or V (TENSOR_NAME_K / _V) at byte `offset`, in stream order
  // (one chunk may come as several pieces). `data` is valid only during the call.
  std::function<absl::Status(int32_t layer, v1::TensorName tensor, int64_t offset,
                             absl::string_view data)>
      on_kv_data;
  // After the last piece of a layer's V.
  std::function<absl::Status(const PrefillLayerProgress& progress)> on_layer_done;
};

// Everything but the KV bytes.
struct PrefillSummary {
  std::string request_id;
  v1::PrefillHeader header;
  // Absent only with LOGITS_MODE_NONE when the server sends no Logits message.
  std::optional<v1::Logits> logits;
  v1::PrefillMetrics metrics;
  int64_t kv_bytes = 0;  // K and V bytes received
  // Client clock, from the start of the call.
  absl::Duration time_to_header;
  absl::Duration time_to_first_kv_byte = absl::InfiniteDuration();  // infinite: no KV
  absl::Duration total;
};

// One returned layer, dtype/layout/shape as in header.kv_spec.
struct PrefillLayerKv {
  int32_t layer = 0;
  HostTensor k;
  HostTensor v;
};

struct PrefillResult {
  PrefillSummary summary;
  std::vector<PrefillLayerKv> layers;  // [kv_layer_begin, kv_layer_end) in order
};

// Checks a Prefill response stream against the request it answers and hands its pieces to
// `callbacks`. Feed every message to Consume(), then call Finish() when the stream ended OK.
class PrefillStreamAssembler {
 public:
  // `request` must outlive the assembler. `start` is when the call began (for the timings);
  // `target` names the server in errors.
  PrefillStreamAssembler(const v1::PrefillRequest& request, PrefillCallbacks callbacks,
                         absl::Time start = absl::Now(), std::string target = "the server");

  // Takes the next message. INTERNAL for a protocol violation ("Prefill to TARGET broke the
  // stream protocol: kv_chunk.offset is 96 for layer 2 K, expected 64 ..."), or a callback's
  // error as it is; after an error the assembler accepts nothing more (FAILED_PRECONDITION).
  absl::Status Consume(const v1::PrefillResponse& response);
  // The same for a message whose kv_chunk.data was split off as received (SplitTensorData):
  // `kv_data` holds it in pieces, each handed to on_kv_data at its own offset.
  absl::Status Consume(const v1::PrefillResponse& response, const SegmentedBytes& kv_data);

  // The stream ended with OK: INTERNAL unless the header, every announced layer, the logits
  // (unless LOGITS_MODE_NONE) and the metrics have arrived.
  absl::StatusOr<PrefillSummary> Finish();

 private:
  absl::Status Dispatch(const v1::PrefillResponse& response, const SegmentedBytes& kv_data);
  absl::Status ConsumeHeader(const v1::PrefillHeader& header);
  absl::Status ConsumeChunk(const v1::KvChunk& chunk, const SegmentedBytes& data);
  absl::Status ConsumeLogits(const v1::Logits& logits);
  absl::Status ConsumeMetrics(const v1::PrefillMetrics& metrics);
  absl::Status CheckHeader(const v1::PrefillHeader& header) const;
  absl::Status CheckLogits(const v1::Logits& logits) const;
  absl::Status Violation(absl::string_view detail) const;
  // Where the stream stands, for errors: "1 of 4 layers complete; next: layer 3 V at byte 64 of
  // 128".
  std::string Position() const;
  bool KvComplete() const { return layer_ == layer_end_; }
  bool LogitsRequired() const;

  const v1::PrefillRequest& request_;
  PrefillCallbacks callbacks_;
  absl::Time start_;
  std::string target_;
  bool failed_ = false;
  bool have_header_ = false;
  bool have_logits_ = false;
  bool have_metrics_ = false;
  PrefillSummary summary_;
  int32_t layer_begin_ = 0;
  int32_t layer_end_ = 0;
  int64_t tensor_bytes_ = 0;  // of each K and each V
  // The next expected piece: layer, tensor, byte offset.
  int32_t layer_ = 0;
  v1::TensorName tensor_ = v1::TENSOR_NAME_K;
  int64_t offset_ = 0;
};

class PrefillClient {
 public:
  // `target` is a gRPC target such as "127.0.0.1:50051" (plaintext; no connection is made yet).
  static absl::StatusOr<std::unique_ptr<PrefillClient>> Create(std::string target,
                                                               ClientOptions options = {});
  // Over an existing channel, e.g. AttentionClient::channel(); `target` names it in errors.
  PrefillClient(std::shared_ptr<grpc::Channel> channel, std::string target,
                ClientOptions options = {});

  // The loaded model; FAILED_PRECONDITION when the server runs without a model.
  absl::StatusOr<v1::ModelInfo> GetModelInfo(const CallOptions& call = {});

  // Prefill with the KV bytes handed to `callbacks` as they arrive (nothing is kept): for
  // writing the cache to disk or into a decoder's own buffers.
  absl::StatusOr<PrefillSummary> PrefillStreamed(const v1::PrefillRequest& request,
                                                 PrefillCallbacks callbacks,
                                                 const CallOptions& call = {});

  // Prefill with every returned layer's K and V assembled in memory; `on_layer` (optional) is
  // called as each layer completes.
  absl::StatusOr<PrefillResult> Prefill(
      const v1::PrefillRequest& request, const CallOptions& call = {},
      std::function<void(const PrefillLayerProgress&)> on_layer = nullptr);

  const std::string& target() const { return target_; }
  v1::PrefillService::Stub& stub() { return *stub_; }

 private:
  std::string target_;
  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::PrefillService::Stub> stub_;
};

// ---- request helpers (shared by anchorctl and tests) --------------------------------------------

// Token IDs separated by commas and/or whitespace, each in [0, 2^31); `source` names the text in
// errors (e.g. "--ids" or a file name). At least one ID.
absl::StatusOr<std::vector<int32_t>> ParseTokenIds(absl::string_view text,
                                                   absl::string_view source);

// "all" | "none" | "B:E" (layers [B, E)) into kv_selection and the layer range.
absl::Status SetKvLayers(absl::string_view text, v1::PrefillRequest* request);

// "full" | "none" | "topk:K" into logits_mode and logits_top_k.
absl::Status SetLogitsMode(absl::string_view text, v1::PrefillRequest* request);

// The request's kv_dtype / kv_layout / logits_mode with UNSPECIFIED resolved to the default.
v1::DataType RequestedKvDType(const v1::PrefillRequest& request);
v1::TensorLayout RequestedKvLayout(const v1::PrefillRequest& request);
v1::LogitsMode RequestedLogitsMode(const v1::PrefillRequest& request);

}  // namespace anchorserve
