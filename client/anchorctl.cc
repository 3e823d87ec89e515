// anchorctl: command-line client of anchorserve.
//
// --target is HOST:PORT, dns:///NAME:PORT or a list IP:PORT,IP:PORT (client/channel_target.h).
//   anchorctl [--target=HOST:PORT] info
//   anchorctl [--target=HOST:PORT] [--service=NAME] health
//   anchorctl [--target=HOST:PORT] attend [shape | --q/--k/--v files] [config] [--verify] ...
//   anchorctl [--target=HOST:PORT] load --requests=N|--duration_s=S --concurrency=C [shape] ...
//   anchorctl [--target=HOST:PORT] model
//   anchorctl [--target=HOST:PORT] prefill --ids=...|--ids_file=F|--random_ids=N [options]
//
// model and prefill (PrefillService) live in anchorctl_prefill.cc; shared flags and helpers in
// anchorctl_common.{h,cc}.
// Exit codes: 0 success, 1 a call or the verification failed, 2 bad command line.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/anchorctl_common.h"
#include "client/attention_client.h"
#include "client/host_tensor.h"
#include "client/local_reference.h"
#include "client/npy.h"
#include "client/qkv_inputs.h"
#include "proto/anchorserve/v1/tensor_wire.h"

// Health.
ABSL_FLAG(std::string, service, "",
          "health: the service to ask about; empty = the server as a whole, or "
          "anchorserve.v1.AttentionService");

// Inputs.
ABSL_FLAG(std::string, inputs, "structured",
          "generated inputs: 'structured' (sink, local, stripe, retrieval and diffuse heads) or "
          "'random' (i.i.d. normal); ignored when --q/--k/--v are given");
ABSL_FLAG(int64_t, seq_len, 4096, "tokens N of the generated sequence");
ABSL_FLAG(int32_t, q_heads, 32, "query heads Hq of the generated inputs");
ABSL_FLAG(int32_t, kv_heads, 8, "key/value heads Hkv of the generated inputs (divides Hq)");
ABSL_FLAG(int32_t, head_dim, 128, "head dim d of the generated inputs");
ABSL_FLAG(std::string, dtype, "bf16", "bf16 | fp16 | fp32 of the generated inputs");
ABSL_FLAG(std::string, layout, "token",
          "token ([N, H, d]) | head ([H, N, d]): layout of generated inputs and of --q/--k/--v");
ABSL_FLAG(std::string, q, "", "Q from a .npy file (3-D, '<f4', '<f2' or '<u2' = bf16 bits)");
ABSL_FLAG(std::string, k, "", "K from a .npy file (with --q and --v)");
ABSL_FLAG(std::string, v, "", "V from a .npy file (with --q and --k)");

// Request options and output.
ABSL_FLAG(bool, recall, false, "ask the server for recall against dense (costs a dense pass)");
ABSL_FLAG(bool, metrics_only, false, "do not send the output back");
ABSL_FLAG(bool, stream, false,
          "use AttendStream (chosen automatically when the request exceeds the server's unary "
          "message limit)");
ABSL_FLAG(bool, per_head, false, "print the per-head metrics table");
ABSL_FLAG(std::string, out, "", "write the output to this .npy file");
ABSL_FLAG(bool, verify, false,
          "recompute the output locally with the CPU backend (same effective config) and compare");
ABSL_FLAG(int32_t, verify_threads, 0, "threads of the local CPU backend (0 = all)");
ABSL_FLAG(double, verify_max_bad_fraction, 1e-5,
          "largest fraction of output elements allowed outside the dtype tolerance");

// Load.
ABSL_FLAG(int64_t, requests, 0, "load: number of requests to send");
ABSL_FLAG(double, duration_s, 0, "load: send for this many seconds (when --requests is 0)");
ABSL_FLAG(int32_t, concurrency, 4, "load: requests in flight at once");

namespace anchorserve::cli {
namespace {

constexpr int64_t kMaxLoadRequests = 10'000'000;
constexpr double kMaxLoadSeconds = 24 * 3600;

constexpr char kUsage[] = R"(command-line client of anchorserve (AnchorAttention as a service)

usage: anchorctl [flags] COMMAND

commands:
  info     print the server's version, backend, device, dtypes, head dims, limits and defaults
  health   grpc.health.v1 Check (--service=NAME, default the whole server); prints SERVING or
           NOT_SERVING; exit 0 only when SERVING (for probes and Docker HEALTHCHECK)
  attend   send one request and print its metrics and end-to-end latency
           inputs: generated (--inputs=structured|random --seq_len --q_heads --kv_heads
           --head_dim --dtype --layout --seed) or --q=Q.npy --k=K.npy --v=V.npy
           config: --mode --theta --block_size --step --init_groups --local_groups
           --mass_target=P (per head and group the smallest theta keeping an estimated P of the
           attention mass; cpu backend) --mass_density_cap --mass_min_theta
           --recall --metrics_only --stream --per_head --out=OUT.npy --verify
  load     send many requests: --requests=N or --duration_s=S, --concurrency=C, shape and
           config flags as for attend; prints throughput, latency percentiles, errors by code
  model    print the model the server loaded (PrefillService.GetModelInfo)
  prefill  token IDs in, every layer's K/V, the last logits and metrics out (PrefillService)
           ids: --ids=1,2,3 | --ids_file=F (whitespace/comma separated) | --random_ids=N --seed=S
           --kv_out=KV.safetensors (layers.{i}.k / layers.{i}.v, streamed to disk)
           --logits_out=LOGITS.npy (float32 [vocab]; needs --logits=full)
           --theta=X | --mass_target=P | --dense (config flags as for attend),
           --kv_dtype=bf16|fp16|fp32, --kv_layout=head|token,
           --kv_layers=all|none|B:E, --logits=full|topk:K|none, --expected_fingerprint=HEX,
           --deadline_ms=MS; prints the header, progress per layer (stderr), per-layer density
           and times, the first generated token (argmax) and throughput

security (servers started with --tls_cert_file / --auth_token_file):
  --tls_ca_file=CA.pem (TLS), --tls_cert_file=C.pem --tls_key_file=K.pem (mTLS),
  --tls_server_name=NAME (when the --target host is not in the certificate),
  --token_file=F or the ANCHOR_TOKEN environment variable (bearer token)
replicas: --target=dns:///NAME:PORT (every address NAME resolves to, e.g. a Kubernetes headless
  Service) or --target=IP:PORT,IP:PORT,... balances requests round-robin over the replicas;
  a request refused with UNAVAILABLE (a replica draining or gone) is sent again to another one
  (gRPC's retry policy for unary calls, --stream_attempts for streamed ones)

examples:
  anchorctl --target=127.0.0.1:50051 info
  anchorctl --target=dns:///anchorserve-headless.default.svc.cluster.local:50051 load --requests=100
  anchorctl --target=10.0.0.11:50051,10.0.0.12:50051,10.0.0.13:50051 attend --seq_len=8192
  anchorctl --deadline_s=4 health
  anchorctl attend --seq_len=16384 --q_heads=32 --kv_heads=8 --head_dim=128 --dtype=bf16 --verify
  anchorctl load --requests=200 --concurrency=8 --seq_len=2048 --metrics_only
  anchorctl prefill --random_ids=8192 --kv_out=kv.safetensors --logits=topk:5

exit codes: 0 success, 1 a call or verification failed (or health is not SERVING), 2 bad command
line)";

// Ascending head dims as runs: "1-256", or "64 128".
std::string HeadDimList(const google::protobuf::RepeatedField<int>& dims) {
  std::vector<std::string> runs;
  for (int i = 0; i < dims.size();) {
    int j = i;
    while (j + 1 < dims.size() && dims[j + 1] == dims[j] + 1) ++j;
    runs.push_back(j - i >= 2 ? absl::StrCat(dims[i], "-", dims[j]) : absl::StrCat(dims[i]));
    if (j - i == 1) runs.push_back(absl::StrCat(dims[j]));
    i = j + 1;
  }
  return absl::StrJoin(runs, " ");
}

std::string DTypeList(const google::protobuf::RepeatedField<int>& dtypes) {
  std::vector<std::string> names;
  for (int dtype : dtypes) {
    absl::StatusOr<DType> parsed = DTypeFromProto("supported_dtypes", dtype);
    names.push_back(parsed.ok() ? std::string(DTypeName(*parsed)) : absl::StrCat("?", dtype));
  }
  return absl::StrJoin(names, " ");
}

// ---- info -------------------------------------------------------------------------------------

int RunInfo() {
  absl::StatusOr<std::unique_ptr<AttentionClient>> client = MakeClient();
  if (!client.ok()) {
    PrintError(client.status());
    return kExitUsage;
  }
  absl::StatusOr<v1::GetServerInfoResponse> info = (*client)->GetServerInfo();
  if (!info.ok()) {
    PrintError(info.status());
    return kExitFailed;
  }
  const v1::ServerLimits& limits = info->limits();
  std::printf("server:     %s\n", (*client)->target().c_str());
  std::printf("version:    %s\n", info->version().c_str());
  std::printf("backend:    %s\n", info->backend().c_str());
  std::printf("device:     %s\n", info->device().c_str());
  std::printf("dtypes:     %s\n", DTypeList(info->supported_dtypes()).c_str());
  std::printf("head dims:  %s\n", HeadDimList(info->supported_head_dims()).c_str());
  std::printf("limits:\n");
  std::printf("  max_message_bytes   %lld (%s, one unary request)\n",
              static_cast<long long>(limits.max_message_bytes()),
              FormatBytes(limits.max_message_bytes()).c_str());
  std::printf("  max_request_bytes   %lld (%s, Q+K+V of one request)\n",
              static_cast<long long>(limits.max_request_bytes()),
              FormatBytes(limits.max_request_bytes()).c_str());
  std::printf("  max_seq_len         %lld\n", static_cast<long long>(limits.max_seq_len()));
  std::printf("  max_heads           %d\n", limits.max_heads());
  std::printf("  max_batch_requests  %d\n", limits.max_batch_requests());
  std::printf("  max_batch_tokens    %lld\n", static_cast<long long>(limits.max_batch_tokens()));
  std::printf("  max_queue_size      %d\n", limits.max_queue_size());
  std::printf("  max_queue_delay     %s\n", FormatMs(limits.max_queue_delay_seconds()).c_str());
  std::printf("  stream_chunk_bytes  %lld (%s)\n",
              static_cast<long long>(limits.stream_chunk_bytes()),
              FormatBytes(limits.stream_chunk_bytes()).c_str());
  std::printf("defaults:   %s\n", DescribeConfig(info->defaults()).c_str());
  return kExitOk;
}

// ---- request construction (attend and load) ---------------------------------------------------

struct LoadedInputs {
  HostTensor q;  // [N, Hq, d] or [Hq, N, d]
  HostTensor k;  // [N, Hkv, d] or [Hkv, N, d]
  HostTensor v;
  std::string description;
};

absl::StatusOr<LoadedInputs> LoadOrGenerateInputs() {
  absl::StatusOr<Layout> layout = ParseLayout(absl::GetFlag(FLAGS_layout));
  if (!layout.ok()) return layout.status();
  const std::string q_path = absl::GetFlag(FLAGS_q);
  const std::string k_path = absl::GetFlag(FLAGS_k);
  const std::string v_path = absl::GetFlag(FLAGS_v);
  LoadedInputs inputs;
  if (!q_path.empty() || !k_path.empty() || !v_path.empty()) {
    if (q_path.empty() || k_path.empty() || v_path.empty()) {
      return absl::InvalidArgumentError("--q, --k and --v must be given together");
    }
    absl::StatusOr<HostTensor> q = ReadTensorNpy(q_path, *layout);
    if (!q.ok()) return q.status();
    absl::StatusOr<HostTensor> k = ReadTensorNpy(k_path, *layout);
    if (!k.ok()) return k.status();
    absl::StatusOr<HostTensor> v = ReadTensorNpy(v_path, *layout);
    if (!v.ok()) return v.status();
    inputs.q = *std::move(q);
    inputs.k = *std::move(k);
    inputs.v = *std::move(v);
    inputs.description = absl::StrCat("files ", q_path, ", ", k_path, ", ", v_path);
  } else {
    GeneratedInputsSpec spec;
    absl::StatusOr<InputKind> kind = ParseInputKind(absl::GetFlag(FLAGS_inputs));
    if (!kind.ok()) return kind.status();
    absl::StatusOr<DType> dtype = ParseDType(absl::GetFlag(FLAGS_dtype));
    if (!dtype.ok()) return dtype.status();
    spec.kind = *kind;
    spec.dtype = *dtype;
    spec.layout = *layout;
    spec.shape.seq_len = absl::GetFlag(FLAGS_seq_len);
    spec.shape.num_q_heads = absl::GetFlag(FLAGS_q_heads);
    spec.shape.num_kv_heads = absl::GetFlag(FLAGS_kv_heads);
    spec.shape.head_dim = absl::GetFlag(FLAGS_head_dim);
    spec.seed = absl::GetFlag(FLAGS_seed);
    absl::StatusOr<QkvTensors> generated = GenerateInputs(spec);
    if (!generated.ok()) return generated.status();
    inputs.q = std::move(generated->q);
    inputs.k = std::move(generated->k);
    inputs.v = std::move(generated->v);
    inputs.description = absl::StrFormat(
        "%s N=%d Hq=%d Hkv=%d d=%d %s %s-major seed=%d", absl::GetFlag(FLAGS_inputs),
        spec.shape.seq_len, spec.shape.num_q_heads, spec.shape.num_kv_heads, spec.shape.head_dim,
        DTypeName(spec.dtype), LayoutName(spec.layout), spec.seed);
  }
  absl::StatusOr<AttentionShape> shape =
      ValidateQkv(inputs.q.View(), inputs.k.View(), inputs.v.View());
  if (!shape.ok()) return shape.status();
  return inputs;
}

AttendInputs MakeAttendInputs(const LoadedInputs& loaded, const v1::AnchorConfig& config) {
  AttendInputs inputs;
  inputs.request_id = absl::GetFlag(FLAGS_request_id);
  inputs.q = loaded.q.View();
  inputs.k = loaded.k.View();
  inputs.v = loaded.v.View();
  inputs.config = config;
  inputs.options.set_metrics_only(absl::GetFlag(FLAGS_metrics_only));
  inputs.options.set_compute_recall(absl::GetFlag(FLAGS_recall));
  return inputs;
}

// What attend and load both send: a client, the server's limits and the request.
struct PreparedRequest {
  std::unique_ptr<AttentionClient> client;
  v1::GetServerInfoResponse info;
  LoadedInputs loaded;  // owns the tensors `inputs` views
  AttendInputs inputs;
  WholeCallRetry stream_retry;
};

// One attend call: streamed calls are retried whole on UNAVAILABLE (the output is only kept
// once complete, so nothing received is lost); gRPC has already retried unary ones.
absl::StatusOr<AttendResult> AttendOnce(PreparedRequest& prepared, bool stream) {
  const int64_t server_limit = prepared.info.limits().max_message_bytes();
  if (!stream) return prepared.client->AttendAuto(prepared.inputs, server_limit);
  return RetryWholeCall(
      prepared.stream_retry,
      [&] {
        return prepared.client->AttendAuto(prepared.inputs, server_limit, /*force_stream=*/true);
      },
      [] { return true; });
}

// Whether AttendAuto streams `inputs`: asked to, or too large for a unary message.
bool WillStream(const PreparedRequest& prepared, bool force_stream) {
  return force_stream ||
         EstimateUnaryRequestBytes(prepared.inputs) > prepared.info.limits().max_message_bytes() ||
         EstimateUnaryRequestBytes(prepared.inputs) > prepared.client->options().max_message_bytes;
}

// Config and inputs from the flags, and the server's info. On failure prints the error and
// returns the exit code (kExitUsage for a bad command line, kExitFailed for a failed call);
// kExitOk otherwise.
int PrepareRequest(PreparedRequest* prepared) {
  absl::StatusOr<v1::AnchorConfig> config = ConfigFromFlags();
  if (!config.ok()) {
    PrintError(config.status());
    return kExitUsage;
  }
  absl::StatusOr<WholeCallRetry> stream_retry = StreamRetryFromFlags();
  if (!stream_retry.ok()) {
    PrintError(stream_retry.status());
    return kExitUsage;
  }
  prepared->stream_retry = *stream_retry;
  absl::StatusOr<std::unique_ptr<AttentionClient>> client = MakeClient();
  if (!client.ok()) {
    PrintError(client.status());
    return kExitUsage;
  }
  prepared->client = *std::move(client);
  absl::StatusOr<v1::GetServerInfoResponse> info = prepared->client->GetServerInfo();
  if (!info.ok()) {
    PrintError(info.status());
    return kExitFailed;
  }
  prepared->info = *std::move(info);
  absl::StatusOr<LoadedInputs> loaded = LoadOrGenerateInputs();
  if (!loaded.ok()) {
    PrintError(loaded.status());
    return kExitUsage;
  }
  prepared->loaded = *std::move(loaded);
  prepared->inputs = MakeAttendInputs(prepared->loaded, *config);
  return kExitOk;
}

// ---- health -----------------------------------------------------------------------------------

int RunHealth() {
  absl::StatusOr<std::unique_ptr<AttentionClient>> client = MakeClient();
  if (!client.ok()) {
    PrintError(client.status());
    return kExitUsage;
  }
  const std::string service = absl::GetFlag(FLAGS_service);
  absl::StatusOr<HealthStatus> health = (*client)->CheckHealth(service);
  if (!health.ok()) {
    PrintError(health.status());
    return kExitFailed;
  }
  const std::string name = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(*health);
  std::printf("%s\n", name.c_str());
  if (*health == grpc::health::v1::HealthCheckResponse::SERVING) return kExitOk;
  std::fflush(stdout);
  PrintError(absl::UnavailableError(
      absl::StrCat("server at ", (*client)->target(), " is ", name,
                   service.empty() ? "" : absl::StrCat(" for service ", service),
                   *health == grpc::health::v1::HealthCheckResponse::NOT_SERVING
                       ? " (it is starting or draining)"
                       : "")));
  return kExitFailed;
}

// ---- attend -----------------------------------------------------------------------------------

void PrintMetrics(const v1::AttentionMetrics& m, bool per_head) {
  std::printf("backend:            %s (batch of %d request%s)\n", m.backend().c_str(),
              m.batch_size(), m.batch_size() == 1 ? "" : "s");
  std::printf("effective config:   %s\n", DescribeConfig(m.effective_config()).c_str());
  if (!m.mode_choice().empty()) std::printf("mode choice:        %s\n", m.mode_choice().c_str());
  std::printf("density:            %.6f   sparsity %.6f   stripe density %.6f\n", m.density(),
              m.sparsity(), m.stripe_density());
  const v1::StripeStats& stripes = m.stripes_per_group();
  std::printf("stripes per group:  min %lld  mean %.2f  max %lld  (over %lld head-groups)\n",
              static_cast<long long>(stripes.min()), stripes.mean(),
              static_cast<long long>(stripes.max()), static_cast<long long>(stripes.groups()));
  std::printf(
      "server times:       queue %s, identification %s, compute %s, transfer %s, "
      "total %s\n",
      FormatMs(m.queue_seconds()).c_str(), FormatMs(m.identification_seconds()).c_str(),
      FormatMs(m.compute_seconds()).c_str(), FormatMs(m.transfer_seconds()).c_str(),
      FormatMs(m.total_seconds()).c_str());
  const bool mass_target = m.effective_config().mass_target() > 0 &&
                           m.effective_config().mode() != v1::ATTENTION_MODE_DENSE;
  if (mass_target) {
    std::printf("mass target:        %.4f, estimated kept mass %.6f (mean over heads)\n",
                m.effective_config().mass_target(), m.estimated_kept_mass());
  }
  if (m.has_recall()) {
    const v1::Recall& r = m.recall();
    std::printf(
        "recall:             output(tau=0.01) %.6f  output(tau=0.005) %.6f  attention "
        "mass mean %.6f min %.6f\n",
        r.output_recall_tau_0_01(), r.output_recall_tau_0_005(), r.attention_mass_mean(),
        r.attention_mass_min());
  }
  if (per_head) {
    std::printf("%6s %10s %10s %14s %8s %10s %8s %8s\n", "head", "density", "sparsity",
                "stripe_dens", "str_min", "str_mean", "str_max", "groups");
    for (const v1::HeadMetrics& head : m.heads()) {
      std::printf("%6d %10.6f %10.6f %14.6f %8lld %10.2f %8lld %8lld\n", head.head(),
                  head.density(), head.sparsity(), head.stripe_density(),
                  static_cast<long long>(head.stripes_per_group().min()),
                  head.stripes_per_group().mean(),
                  static_cast<long long>(head.stripes_per_group().max()),
                  static_cast<long long>(head.stripes_per_group().groups()));
    }
    if (mass_target) {
      // true_kept (dense softmax mass on the kept keys) is measured only with --recall.
      std::printf("%6s %10s %10s %10s %8s %8s %12s %12s\n", "head", "theta_min", "theta_mean",
                  "theta_max", "groups", "full", "est_kept", "true_kept");
      for (const v1::HeadMetrics& head : m.heads()) {
        const v1::MassBudget& mass = head.mass();
        std::printf("%6d %10.3f %10.3f %10.3f %8lld %8lld %12.6f %12s\n", head.head(),
                    mass.theta_min(), mass.theta_mean(), mass.theta_max(),
                    static_cast<long long>(mass.groups()),
                    static_cast<long long>(mass.full_groups()), mass.estimated_kept_mass(),
                    m.has_recall() ? absl::StrFormat("%.6f", mass.true_kept_mass()).c_str() : "-");
      }
    }
  }
}

int RunAttend() {
  const bool verify = absl::GetFlag(FLAGS_verify);
  const bool metrics_only = absl::GetFlag(FLAGS_metrics_only);
  if (verify && metrics_only) {
    PrintError(absl::InvalidArgumentError(
        "--verify compares the output, so it cannot be combined with --metrics_only"));
    return kExitUsage;
  }
  if (!absl::GetFlag(FLAGS_out).empty() && metrics_only) {
    PrintError(absl::InvalidArgumentError("--out needs the output; drop --metrics_only"));
    return kExitUsage;
  }
  PreparedRequest prepared;
  if (const int exit_code = PrepareRequest(&prepared); exit_code != kExitOk) return exit_code;
  const AttendInputs& inputs = prepared.inputs;
  std::printf("inputs:             %s (%s)\n", prepared.loaded.description.c_str(),
              FormatBytes(inputs.PayloadBytes()).c_str());

  const absl::Time start = absl::Now();
  absl::StatusOr<AttendResult> result =
      AttendOnce(prepared, WillStream(prepared, absl::GetFlag(FLAGS_stream)));
  const absl::Duration latency = absl::Now() - start;
  if (!result.ok()) {
    PrintError(result.status());
    return kExitFailed;
  }
  const bool stream = result->streamed;
  std::printf("request id:         %s\n", result->request_id.c_str());
  PrintMetrics(result->metrics, absl::GetFlag(FLAGS_per_head));
  const int64_t seq_len = inputs.q.SeqLen();
  std::printf(
      "end-to-end latency: %s (client-measured, %s, %s sent, %s received; %.0f tokens/s)\n",
      FormatMs(absl::ToDoubleSeconds(latency)).c_str(), stream ? "streamed" : "unary",
      FormatBytes(inputs.PayloadBytes()).c_str(),
      FormatBytes(result->output ? static_cast<int64_t>(result->output->bytes.size()) : 0).c_str(),
      seq_len / absl::ToDoubleSeconds(latency));

  if (result->streamed) {
    const double up_s = absl::ToDoubleSeconds(result->upload_time);
    const double down_s = absl::ToDoubleSeconds(result->download_time);
    const int64_t out_bytes =
        result->output ? static_cast<int64_t>(result->output->bytes.size()) : 0;
    std::printf("wire:               upload %s in %s (%.2f GB/s), download %s in %s (%.2f GB/s)\n",
                FormatBytes(inputs.PayloadBytes()).c_str(), FormatMs(up_s).c_str(),
                up_s > 0 ? static_cast<double>(inputs.PayloadBytes()) / up_s / 1e9 : 0.0,
                FormatBytes(out_bytes).c_str(), FormatMs(down_s).c_str(),
                down_s > 0 ? static_cast<double>(out_bytes) / down_s / 1e9 : 0.0);
  }
  const std::string out_path = absl::GetFlag(FLAGS_out);
  if (!out_path.empty()) {
    absl::Status written = WriteTensorNpy(out_path, *result->output);
    if (!written.ok()) {
      PrintError(written);
      return kExitFailed;
    }
    std::printf("output written to:  %s\n", out_path.c_str());
  }

  if (!verify) return kExitOk;
  const absl::Time local_start = absl::Now();
  absl::StatusOr<CpuVerification> verification =
      VerifyOnCpu(inputs.q, inputs.k, inputs.v, result->metrics.effective_config(), *result->output,
                  absl::GetFlag(FLAGS_verify_threads));
  if (!verification.ok()) {
    PrintError(verification.status());
    return kExitFailed;
  }
  const OutputComparison& comparison = verification->comparison;
  std::printf("local CPU reference: %s, density %.6f (server %.6f)\n",
              FormatMs(absl::ToDoubleSeconds(absl::Now() - local_start)).c_str(),
              verification->local.summary.density, result->metrics.density());
  const double allowed = absl::GetFlag(FLAGS_verify_max_bad_fraction);
  if (comparison.non_finite > 0 || comparison.FractionOverTolerance() > allowed) {
    std::printf("verification FAILED: %s; at most %.3g%% allowed\n", comparison.Describe().c_str(),
                100 * allowed);
    return kExitFailed;
  }
  std::printf("verification passed: %s\n", comparison.Describe().c_str());
  return kExitOk;
}

// ---- load -------------------------------------------------------------------------------------

double Percentile(const std::vector<double>& sorted, double fraction) {
  if (sorted.empty()) return 0;
  const size_t rank = static_cast<size_t>(std::ceil(fraction * sorted.size()));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

struct LoadRecorder {
  absl::Mutex mu;
  std::vector<double> ok_latencies ABSL_GUARDED_BY(mu);
  std::map<absl::StatusCode, int64_t> errors ABSL_GUARDED_BY(mu);
  std::map<absl::StatusCode, std::string> first_error ABSL_GUARDED_BY(mu);
};

int RunLoad() {
  const int64_t requests = absl::GetFlag(FLAGS_requests);
  const double duration_s = absl::GetFlag(FLAGS_duration_s);
  const int concurrency = absl::GetFlag(FLAGS_concurrency);
  if (requests < 0 || requests > kMaxLoadRequests) {
    PrintError(absl::InvalidArgumentError(
        absl::StrCat("--requests must be in [0, ", kMaxLoadRequests, "], got ", requests)));
    return kExitUsage;
  }
  if (requests == 0 && !(duration_s > 0 && duration_s <= kMaxLoadSeconds)) {
    PrintError(absl::InvalidArgumentError(
        absl::StrCat("load needs --requests=N or --duration_s=S with 0 < S <= ", kMaxLoadSeconds)));
    return kExitUsage;
  }
  if (concurrency < 1 || concurrency > 1024) {
    PrintError(absl::InvalidArgumentError(
        absl::StrCat("--concurrency must be in [1, 1024], got ", concurrency)));
    return kExitUsage;
  }
  if (absl::GetFlag(FLAGS_verify)) {
    PrintError(absl::InvalidArgumentError("--verify applies to attend, not load"));
    return kExitUsage;
  }
  PreparedRequest prepared;
  if (const int exit_code = PrepareRequest(&prepared); exit_code != kExitOk) return exit_code;
  AttentionClient& client = *prepared.client;
  const AttendInputs& inputs = prepared.inputs;
  const bool stream = WillStream(prepared, absl::GetFlag(FLAGS_stream));
  // Unary requests are built once and shared read-only by all workers.
  std::optional<v1::AttendRequest> unary_request;
  if (!stream) {
    absl::StatusOr<v1::AttendRequest> built = BuildAttendRequest(inputs);
    if (!built.ok()) {
      PrintError(built.status());
      return kExitUsage;
    }
    unary_request = *std::move(built);
  }
  std::printf("load: %s, %s per request, %s, concurrency %d, %s\n",
              prepared.loaded.description.c_str(), FormatBytes(inputs.PayloadBytes()).c_str(),
              stream ? "streamed" : "unary", concurrency,
              requests > 0 ? absl::StrCat(requests, " requests").c_str()
                           : absl::StrCat(duration_s, " s").c_str());

  LoadRecorder recorder;
  std::atomic<int64_t> next_request{0};
  const absl::Time start = absl::Now();
  const absl::Time stop_at =
      requests > 0 ? absl::InfiniteFuture() : start + absl::Seconds(duration_s);
  auto worker = [&]() {
    while (true) {
      if (requests > 0) {
        if (next_request.fetch_add(1) >= requests) return;
      } else if (absl::Now() >= stop_at) {
        return;
      }
      const absl::Time call_start = absl::Now();
      absl::Status status;
      if (stream) {
        status = AttendOnce(prepared, /*stream=*/true).status();
      } else {
        status = client.Attend(*unary_request).status();
      }
      const double seconds = absl::ToDoubleSeconds(absl::Now() - call_start);
      absl::MutexLock lock(&recorder.mu);
      if (status.ok()) {
        recorder.ok_latencies.push_back(seconds);
      } else {
        ++recorder.errors[status.code()];
        recorder.first_error.emplace(status.code(), std::string(status.message()));
      }
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(concurrency);
  for (int i = 0; i < concurrency; ++i) workers.emplace_back(worker);
  for (std::thread& thread : workers) thread.join();
  const double elapsed = absl::ToDoubleSeconds(absl::Now() - start);

  absl::MutexLock lock(&recorder.mu);
  std::vector<double>& latencies = recorder.ok_latencies;
  std::sort(latencies.begin(), latencies.end());
  int64_t error_count = 0;
  for (const auto& [code, count] : recorder.errors) error_count += count;
  const int64_t ok_count = static_cast<int64_t>(latencies.size());
  std::printf("completed:   %lld ok, %lld failed in %.3f s\n", static_cast<long long>(ok_count),
              static_cast<long long>(error_count), elapsed);
  std::printf("throughput:  %.3f requests/s, %.0f tokens/s (ok requests)\n", ok_count / elapsed,
              ok_count * static_cast<double>(inputs.q.SeqLen()) / elapsed);
  if (ok_count > 0) {
    std::printf("latency:     p50 %s  p90 %s  p99 %s  max %s\n",
                FormatMs(Percentile(latencies, 0.50)).c_str(),
                FormatMs(Percentile(latencies, 0.90)).c_str(),
                FormatMs(Percentile(latencies, 0.99)).c_str(), FormatMs(latencies.back()).c_str());
  }
  for (const auto& [code, count] : recorder.errors) {
    std::printf("errors:      %s x%lld (first: %s)\n", absl::StatusCodeToString(code).c_str(),
                static_cast<long long>(count), recorder.first_error[code].c_str());
  }
  return error_count == 0 ? kExitOk : kExitFailed;
}

}  // namespace
}  // namespace anchorserve::cli

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(anchorserve::cli::kUsage);
  // --help lists the flags of every anchorctl*.cc file (they share the subcommands' flags).
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "client/anchorctl");
  };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  anchorserve::KeepReceiveBuffersResident();
  if (positional.size() != 2) {
    std::fprintf(stderr,
                 "anchorctl: expected exactly one command (info, health, attend, load, model or "
                 "prefill)%s; see "
                 "anchorctl --help\n",
                 positional.size() > 2
                     ? absl::StrCat(", got ", positional.size() - 1, " words").c_str()
                     : "");
    return anchorserve::cli::kExitUsage;
  }
  const std::string command = positional[1];
  if (command == "info") return anchorserve::cli::RunInfo();
  if (command == "health") return anchorserve::cli::RunHealth();
  if (command == "attend") return anchorserve::cli::RunAttend();
  if (command == "load") return anchorserve::cli::RunLoad();
  if (command == "prefill") return anchorserve::cli::RunPrefill();
  if (command == "model") return anchorserve::cli::RunModel();
  std::fprintf(stderr,
               "anchorctl: unknown command '%s' (expected info, health, attend, load, model or "
               "prefill)\n",
               command.c_str());
  return anchorserve::cli::kExitUsage;
}
