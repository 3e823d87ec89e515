// Helpers of the prefill client tests: well-formed Prefill streams built from a request, an
// in-process fake PrefillService on loopback, a subprocess runner (anchorctl), and a small
// safetensors reader written independently of client/safetensors.cc.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "anchorserve/v1/prefill.grpc.pb.h"
#include "anchorserve/v1/prefill.pb.h"
#include "grpcpp/server.h"

namespace anchorserve::testing {

// The model the fake server pretends to hold.
struct FakeModel {
  int32_t num_layers = 3;
  int32_t num_kv_heads = 2;
  int32_t head_dim = 4;
  int64_t vocab_size = 40;
  std::string fingerprint = "f00dfeed";
};

v1::ModelInfo ModelInfoOf(const FakeModel& model);

// What a correct server answers to a request: per returned layer K and V bytes (a seeded pattern),
// logits of the requested mode, metrics for every layer.
struct FakeOutput {
  std::string request_id;
  v1::PrefillHeader header;
  std::vector<std::string> k;  // [kv_layer_end - kv_layer_begin]
  std::vector<std::string> v;
  v1::Logits logits;
  bool send_logits = true;  // false: no Logits message (allowed only with LOGITS_MODE_NONE)
  v1::PrefillMetrics metrics;
};

FakeOutput MakeFakeOutput(const v1::PrefillRequest& request, const FakeModel& model,
                          uint32_t seed = 1);

// The messages of `output` in protocol order, tensors cut into chunks of `chunk_bytes`.
std::vector<v1::PrefillResponse> StreamOf(const FakeOutput& output, int64_t chunk_bytes);

// What one Prefill call of the fake server does.
struct FakeScript {
  std::vector<v1::PrefillResponse> messages;
  grpc::Status status = grpc::Status::OK;  // ends the call after the messages
  absl::Duration delay_before_each = absl::ZeroDuration();
};

class FakePrefillService final : public v1::PrefillService::Service {
 public:
  using ScriptFn = std::function<FakeScript(const v1::PrefillRequest&)>;

  void SetScript(ScriptFn script) ABSL_LOCKS_EXCLUDED(mu_);
  void SetModelInfo(grpc::Status status, v1::ModelInfo info = {}) ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<v1::PrefillRequest> requests() const ABSL_LOCKS_EXCLUDED(mu_);
  // Metadata of the last Prefill call (key -> value).
  std::multimap<std::string, std::string> last_metadata() const ABSL_LOCKS_EXCLUDED(mu_);

  grpc::Status Prefill(grpc::ServerContext* context, const v1::PrefillRequest* request,
                       grpc::ServerWriter<v1::PrefillResponse>* writer) override;
  grpc::Status GetModelInfo(grpc::ServerContext* context, const v1::GetModelInfoRequest* request,
                            v1::ModelInfo* response) override;

 private:
  mutable absl::Mutex mu_;
  ScriptFn script_ ABSL_GUARDED_BY(mu_);
  grpc::Status info_status_ ABSL_GUARDED_BY(mu_) = grpc::Status::OK;
  v1::ModelInfo info_ ABSL_GUARDED_BY(mu_);
  std::vector<v1::PrefillRequest> requests_ ABSL_GUARDED_BY(mu_);
  std::multimap<std::string, std::string> metadata_ ABSL_GUARDED_BY(mu_);
};

// The fake service on 127.0.0.1 (an unused port), serving until destroyed.
class FakePrefillServer {
 public:
  static absl::StatusOr<std::unique_ptr<FakePrefillServer>> Start();
  ~FakePrefillServer();

  FakePrefillService& service() { return service_; }
  std::string target() const;

 private:
  FakePrefillServer() = default;
  FakePrefillService service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

struct ProcessOutput {
  int exit_code = -1;  // -1 when a signal ended it
  std::string stdout_text;
  std::string stderr_text;
};

// Runs argv (argv[0] a path) with stdout and stderr captured; kills it after `timeout`.
absl::StatusOr<ProcessOutput> RunSubprocess(const std::vector<std::string>& argv,
                                            absl::Duration timeout);

std::string ReadFileBytes(const std::string& path);

// ---- safetensors, read independently of the writer ---------------------------------------------

struct ParsedTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  int64_t begin = 0;
  int64_t end = 0;
  std::string data;
};

struct ParsedSafetensors {
  uint64_t header_length = 0;
  std::string header_json;
  std::map<std::string, std::string> metadata;
  std::map<std::string, ParsedTensor> tensors;
  std::vector<std::string> names_by_offset;
};

// Checks the format (length, JSON, offsets contiguous from 0 covering all data) and splits the
// file into its tensors.
absl::StatusOr<ParsedSafetensors> ParseSafetensorsFile(const std::string& bytes);

}  // namespace anchorserve::testing
