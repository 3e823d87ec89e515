// anchor_prefill_wire_bench: how fast PrefillClient takes a KV cache off the wire, without an
// engine in the way. An in-process server streams a synthetic cache over loopback the way
// anchorserve's Prefill does (a header, each layer's K then V in chunks whose bytes are gRPC
// slices over the server's buffer, then the metrics); the client receives it with
// PrefillClient::PrefillStreamed, discarding the bytes (what `anchorctl prefill` does without
// --kv_out) and with PrefillClient::Prefill, assembling every layer in memory (what a decoder
// embedding the client does).
//
//   anchor_prefill_wire_bench [--tokens=16384] [--layers=32] [--kv_heads=8] [--head_dim=128]
//                             [--chunk_bytes=4194304] [--repeats=5] [--serve_seconds=0]
//
// --serve_seconds=S only serves the synthetic cache for S seconds (any request gets the cache of
// the flags' shape) and prints "listening on 127.0.0.1:PORT": for measuring other clients, such
// as the Python one (bench/serving/prefill_wire_python.py).
//
// The bytes are bf16 K/V, head-major, of the shape given (the defaults are Llama-3.1-8B's at
// 16k: 32 MiB per tensor, 2 GiB per call). Server and client share the machine's cores.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "anchorserve/v1/prefill.grpc.pb.h"
#include "client/prefill_client.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "proto/anchorserve/v1/tensor_wire.h"

ABSL_FLAG(int, tokens, 16384, "prompt tokens N");
ABSL_FLAG(int, layers, 32, "layers returned");
ABSL_FLAG(int, kv_heads, 8, "KV heads");
ABSL_FLAG(int, head_dim, 128, "head dim");
ABSL_FLAG(int64_t, chunk_bytes, int64_t{4} << 20, "KV bytes per message (anchorserve's default)");
ABSL_FLAG(int, repeats, 5, "calls per client mode");
ABSL_FLAG(int, serve_seconds, 0, "only serve the synthetic cache for this long (0: measure)");

namespace anchorserve {
namespace {

struct CacheShape {
  int tokens = 0;
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int64_t chunk_bytes = 0;
  int64_t TensorBytes() const { return int64_t{tokens} * kv_heads * head_dim * 2; }  // bf16
};

grpc::ByteBuffer Serialized(const v1::PrefillResponse& message) {
  grpc::Slice slice(message.SerializeAsString());
  return grpc::ByteBuffer(&slice, 1);
}

// Writes one call's messages, one in flight at a time, as anchorserve's PrefillReactor does.
class SyntheticCacheWriter final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  SyntheticCacheWriter(const CacheShape& shape, const std::vector<char>& tensor)
      : shape_(shape), tensor_(tensor) {
    v1::PrefillResponse header;
    v1::PrefillHeader* h = header.mutable_header();
    h->set_num_tokens(shape.tokens);
    h->set_num_layers(shape.layers);
    h->set_kv_layer_begin(0);
    h->set_kv_layer_end(shape.layers);
    h->set_num_kv_heads(shape.kv_heads);
    h->set_head_dim(shape.head_dim);
    h->set_kv_dtype(v1::DATA_TYPE_BF16);
    h->set_kv_layout(v1::TENSOR_LAYOUT_HEAD_MAJOR);
    v1::TensorSpec* spec = h->mutable_kv_spec();
    spec->set_dtype(v1::DATA_TYPE_BF16);
    spec->set_layout(v1::TENSOR_LAYOUT_HEAD_MAJOR);
    spec->add_shape(shape.kv_heads);
    spec->add_shape(shape.tokens);
    spec->add_shape(shape.head_dim);
    h->set_bytes_per_layer(2 * shape.TensorBytes());
    buffer_ = Serialized(header);
    StartWrite(&buffer_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) return Finish(grpc::Status(grpc::StatusCode::CANCELLED, "write failed"));
    if (layer_ == shape_.layers) {
      if (sent_metrics_) return Finish(grpc::Status::OK);
      v1::PrefillResponse metrics;
      metrics.mutable_metrics()->set_backend("synthetic");
      buffer_ = Serialized(metrics);
      sent_metrics_ = true;
      return StartWrite(&buffer_);
    }
    const int64_t size = std::min(shape_.chunk_bytes, shape_.TensorBytes() - offset_);
    v1::PrefillResponse chunk;
    chunk.mutable_kv_chunk()->set_layer(layer_);
    chunk.mutable_kv_chunk()->set_tensor(is_v_ ? v1::TENSOR_NAME_V : v1::TENSOR_NAME_K);
    chunk.mutable_kv_chunk()->set_offset(offset_);
    std::vector<grpc::Slice> slices;
    slices.emplace_back(chunk.SerializeAsString());
    AppendTensorData(
        v1::PrefillResponse::kKvChunkFieldNumber,
        grpc::Slice(tensor_.data() + offset_, static_cast<size_t>(size), grpc::Slice::STATIC_SLICE),
        &slices, v1::KvChunk::kDataFieldNumber);
    buffer_ = grpc::ByteBuffer(slices.data(), slices.size());
    offset_ += size;
    if (offset_ == shape_.TensorBytes()) {
      offset_ = 0;
      if (is_v_) ++layer_;
      is_v_ = !is_v_;
    }
    StartWrite(&buffer_);
  }

  void OnDone() override { delete this; }

 private:
  const CacheShape shape_;
  const std::vector<char>& tensor_;  // every layer's K and V: the same bytes
  grpc::ByteBuffer buffer_;          // the message in flight
  int layer_ = 0;
  bool is_v_ = false;
  int64_t offset_ = 0;
  bool sent_metrics_ = false;
};

class SyntheticPrefillService final
    : public v1::PrefillService::WithRawCallbackMethod_Prefill<v1::PrefillService::Service> {
 public:
  explicit SyntheticPrefillService(const CacheShape& shape)
      : shape_(shape), tensor_(static_cast<size_t>(shape.TensorBytes())) {
    for (size_t i = 0; i < tensor_.size(); ++i) tensor_[i] = static_cast<char>(i * 131 + 7);
  }

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Prefill(grpc::CallbackServerContext*,
                                                      const grpc::ByteBuffer*) override {
    return new SyntheticCacheWriter(shape_, tensor_);
  }

 private:
  const CacheShape shape_;
  std::vector<char> tensor_;
};

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

int Run() {
  CacheShape shape;
  shape.tokens = absl::GetFlag(FLAGS_tokens);
  shape.layers = absl::GetFlag(FLAGS_layers);
  shape.kv_heads = absl::GetFlag(FLAGS_kv_heads);
  shape.head_dim = absl::GetFlag(FLAGS_head_dim);
  shape.chunk_bytes = absl::GetFlag(FLAGS_chunk_bytes);
  const int repeats = absl::GetFlag(FLAGS_repeats);
  if (shape.tokens <= 0 || shape.layers <= 0 || shape.kv_heads <= 0 || shape.head_dim <= 0 ||
      shape.chunk_bytes <= 0 || repeats <= 0) {
    std::fprintf(stderr,
                 "--tokens, --layers, --kv_heads, --head_dim, --chunk_bytes and "
                 "--repeats must be positive\n");
    return 2;
  }
  SyntheticPrefillService service(shape);
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.SetMaxSendMessageSize(-1);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::fprintf(stderr, "cannot start the in-process server on 127.0.0.1\n");
    return 1;
  }
  if (absl::GetFlag(FLAGS_serve_seconds) > 0) {
    std::printf("listening on 127.0.0.1:%d\n", port);
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::seconds(absl::GetFlag(FLAGS_serve_seconds)));
    server->Shutdown();
    return 0;
  }
  absl::StatusOr<std::unique_ptr<PrefillClient>> client =
      PrefillClient::Create(absl::StrCat("127.0.0.1:", port));
  if (!client.ok()) {
    std::fprintf(stderr, "%s\n", client.status().ToString().c_str());
    return 1;
  }
  v1::PrefillRequest request;
  for (int i = 0; i < shape.tokens; ++i) request.add_token_ids(i);
  request.set_logits_mode(v1::LOGITS_MODE_NONE);
  const double bytes = 2.0 * static_cast<double>(shape.TensorBytes()) * shape.layers;
  std::printf("# KV %.0f MiB per call (%d layers x K,V x [%d, %d, %d] bf16), %lld-byte chunks\n",
              bytes / (1 << 20), shape.layers, shape.kv_heads, shape.tokens, shape.head_dim,
              static_cast<long long>(shape.chunk_bytes));
  std::printf(
      "| client | calls | GB/s median | GB/s min-max | s median |\n|---|---|---|---|---|\n");
  for (const bool in_memory : {false, true}) {
    std::vector<double> seconds;
    for (int r = 0; r < repeats; ++r) {
      const auto start = std::chrono::steady_clock::now();
      absl::Status status;
      if (in_memory) {
        absl::StatusOr<PrefillResult> result = (*client)->Prefill(request);
        status = result.status();
      } else {
        PrefillCallbacks discard;
        status = (*client)->PrefillStreamed(request, discard).status();
      }
      const double s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (!status.ok()) {
        std::fprintf(stderr, "%s\n", status.ToString().c_str());
        return 1;
      }
      seconds.push_back(s);
    }
    const auto [fastest, slowest] = std::minmax_element(seconds.begin(), seconds.end());
    std::printf("| %s | %d | %.2f | %.2f-%.2f | %.3f |\n",
                in_memory ? "Prefill (in memory)" : "PrefillStreamed (discard)", repeats,
                bytes / Median(seconds) / 1e9, bytes / *slowest / 1e9, bytes / *fastest / 1e9,
                Median(seconds));
  }
  server->Shutdown();
  return 0;
}

}  // namespace
}  // namespace anchorserve

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return anchorserve::Run();
}
