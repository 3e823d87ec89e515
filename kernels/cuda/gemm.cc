// GemmRunner: cuBLASLt matmuls with cached plans.
//
// Row-major out[m, n] = a[m, k] . w[n, k]^T is, in cuBLASLt's column-major terms,
// D (n x m, ld n) = op(A) . op(B) with A = w viewed as a k x n column-major matrix (ld k) and
// op(A) = A^T, B = a viewed as a k x m column-major matrix (ld k) and op(B) = B. The bias vector
// has D's row count (n) and is broadcast over its columns (the m tokens).
#include "kernels/cuda/gemm.h"

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/cuda/cublaslt_api.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_check.h"

namespace anchorserve::cuda {
namespace {

// The loaded cuBLASLt; only called once GemmRunner::Create has loaded it.
const CublasLtApi& Lt() { return **LoadCublasLt(); }

// Plans kept before the cache is dropped and rebuilt (prompt lengths vary, so m does).
constexpr size_t kMaxPlans = 1024;
// Algorithms asked of the heuristic; the first (fastest estimate) is used.
constexpr int kHeuristicResults = 8;

std::string CublasStatusString(cublasStatus_t status) {
  return absl::StrCat(Lt().cublasLtGetStatusName(status), ": ",
                      Lt().cublasLtGetStatusString(status));
}

// Largest power of two <= 256 that divides the address (cuBLASLt's alignment preferences).
uint32_t AlignmentOf(const void* pointer) {
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

struct PlanKey {
  int64_t m;
  int64_t n;
  int64_t k;
  bool bias;
  bool f32_out;
  uint32_t align_a;
  uint32_t align_w;
  uint32_t align_out;
  uint32_t align_bias;

  auto Tie() const {
    return std::tie(m, n, k, bias, f32_out, align_a, align_w, align_out, align_bias);
  }
  bool operator<(const PlanKey& other) const { return Tie() < other.Tie(); }
};

std::string ShapeString(const PlanKey& key) {
  return absl::StrCat("m=", key.m, " n=", key.n, " k=", key.k, key.bias ? " +bias" : "",
                      key.f32_out ? " fp32 out" : " bf16 out");
}

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t w_layout = nullptr;    // A: k x n, ld k, op T
  cublasLtMatrixLayout_t a_layout = nullptr;    // B: k x m, ld k, op N
  cublasLtMatrixLayout_t out_layout = nullptr;  // C = D: n x m, ld n
  cublasLtMatmulAlgo_t algo{};

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (out_layout != nullptr) Lt().cublasLtMatrixLayoutDestroy(out_layout);
    if (a_layout != nullptr) Lt().cublasLtMatrixLayoutDestroy(a_layout);
    if (w_layout != nullptr) Lt().cublasLtMatrixLayoutDestroy(w_layout);
    if (desc != nullptr) Lt().cublasLtMatmulDescDestroy(desc);
  }
};

class PreferenceGuard {
 public:
  PreferenceGuard() = default;
  PreferenceGuard(const PreferenceGuard&) = delete;
  PreferenceGuard& operator=(const PreferenceGuard&) = delete;
  ~PreferenceGuard() {
    if (preference != nullptr) Lt().cublasLtMatmulPreferenceDestroy(preference);
  }
  cublasLtMatmulPreference_t preference = nullptr;
};

}  // namespace

struct GemmRunner::State {
  int device = 0;
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  mutable absl::Mutex mu;
  std::map<PlanKey, std::unique_ptr<Plan>> plans ABSL_GUARDED_BY(mu);

  // The cached plan of `key`, created (and the heuristic queried) on first use. `bias` is the
  // bias pointer of this call (the heuristic reads its alignment).
  absl::StatusOr<Plan*> GetPlan(const PlanKey& key, const uint16_t* bias)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
};

namespace {

#define ANCHOR_CUBLAS_RETURN_IF_ERROR(expr, key)                                                  \
  do {                                                                                            \
    const cublasStatus_t anchor_cublas_status_ = (expr);                                          \
    if (anchor_cublas_status_ != CUBLAS_STATUS_SUCCESS) {                                         \
      return absl::InternalError(absl::StrCat("cuBLASLt (", ShapeString(key), "): ", #expr, ": ", \
                                              CublasStatusString(anchor_cublas_status_)));        \
    }                                                                                             \
  } while (false)

}  // namespace

absl::StatusOr<Plan*> GemmRunner::State::GetPlan(const PlanKey& key, const uint16_t* bias) {
  auto found = plans.find(key);
  if (found != plans.end()) return found->second.get();
  if (plans.size() >= kMaxPlans) plans.clear();

  auto plan = std::make_unique<Plan>();
  const cudaDataType_t out_type = key.f32_out ? CUDA_R_32F : CUDA_R_16BF;
  ANCHOR_CUBLAS_RETURN_IF_ERROR(
      Lt().cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), key);
  const int32_t trans_a = CUBLAS_OP_T;
  const int32_t trans_b = CUBLAS_OP_N;
  ANCHOR_CUBLAS_RETURN_IF_ERROR(
      Lt().cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a,
                                          sizeof(trans_a)),
      key);
  ANCHOR_CUBLAS_RETURN_IF_ERROR(
      Lt().cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b,
                                          sizeof(trans_b)),
      key);
  if (key.bias) {
    const uint32_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    const int32_t bias_type = CUDA_R_16BF;
    ANCHOR_CUBLAS_RETURN_IF_ERROR(
        Lt().cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                            sizeof(epilogue)),
        key);
    ANCHOR_CUBLAS_RETURN_IF_ERROR(
        Lt().cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                                            &bias_type, sizeof(bias_type)),
        key);
    const void* bias_pointer = bias;
    ANCHOR_CUBLAS_RETURN_IF_ERROR(
        Lt().cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                            &bias_pointer, sizeof(bias_pointer)),
        key);
  }
  ANCHOR_CUBLAS_RETURN_IF_ERROR(
      Lt().cublasLtMatrixLayoutCreate(&plan->w_layout, CUDA_R_16BF, static_cast<uint64_t>(key.k),
                                      static_cast<uint64_t>(key.n), key.k),
      key);
  ANCHOR_CUBLAS_RETURN_IF_ERROR(
      Lt().cublasLtMatrixLayoutCreate(&plan->a_layout, CUDA_R_16BF, static_cast<uint64_t>(key.k),
                                      static_cast<uint64_t>(key.m), key.k),
      key);
  ANCHOR_CUBLAS_RETURN_IF_ERROR(
      Lt().cublasLtMatrixLayoutCreate(&plan->out_layout, out_type, static_cast<uint64_t>(key.n),
                                      static_cast<uint64_t>(key.m), key.n),
      key);

  PreferenceGuard guard;
  ANCHOR_CUBLAS_RETURN_IF_ERROR(Lt().cublasLtMatmulPreferenceCreate(&guard.preference), key);
  const uint64_t workspace_bytes = kWorkspaceBytes;
  ANCHOR_CUBLAS_RETURN_IF_ERROR(Lt().cublasLtMatmulPreferenceSetAttribute(
                                    guard.preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                    &workspace_bytes, sizeof(workspace_bytes)),
                                key);
  // Split-K partial sums only in fp32 (the compute type): the in-place and output-type schemes
  // would add bf16-rounded partial sums. Plus the pointers' actual alignments (default: 256).
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> uint_preferences[] = {
      {CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_w},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_out},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_out},
  };
  for (const auto& [attribute, value] : uint_preferences) {
    ANCHOR_CUBLAS_RETURN_IF_ERROR(Lt().cublasLtMatmulPreferenceSetAttribute(
                                      guard.preference, attribute, &value, sizeof(value)),
                                  key);
  }
  cublasLtMatmulHeuristicResult_t results[kHeuristicResults] = {};
  int returned = 0;
  ANCHOR_CUBLAS_RETURN_IF_ERROR(
      Lt().cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->w_layout, plan->a_layout,
                                          plan->out_layout, plan->out_layout, guard.preference,
                                          kHeuristicResults, results, &returned),
      key);
  int chosen = -1;
  for (int i = 0; i < returned; ++i) {
    if (results[i].state == CUBLAS_STATUS_SUCCESS && results[i].workspaceSize <= kWorkspaceBytes) {
      chosen = i;
      break;
    }
  }
  if (chosen < 0) {
    return absl::InternalError(absl::StrCat("cuBLASLt (", ShapeString(key),
                                            "): the heuristic found no algorithm (", returned,
                                            " returned)"));
  }
  plan->algo = results[chosen].algo;
  Plan* raw = plan.get();
  plans.emplace(key, std::move(plan));
  return raw;
}

GemmRunner::GemmRunner(std::unique_ptr<State> state) : state_(std::move(state)) {}

absl::StatusOr<std::unique_ptr<GemmRunner>> GemmRunner::Create(int device) {
  const int count = CudaDeviceCount();
  if (device < 0 || device >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("cuda device ", device, " requested but ", count, " device(s) are visible"));
  }
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  if (absl::StatusOr<const CublasLtApi*> api = LoadCublasLt(); !api.ok()) return api.status();
  auto state = std::make_unique<State>();
  state->device = device;
  const cublasStatus_t status = Lt().cublasLtCreate(&state->handle);
  if (status != CUBLAS_STATUS_SUCCESS) {
    state->handle = nullptr;
    return absl::InternalError(
        absl::StrCat("cublasLtCreate on device ", device, ": ", CublasStatusString(status)));
  }
  // The runner owns the handle from here on (its destructor releases it and the workspace).
  std::unique_ptr<GemmRunner> runner(new GemmRunner(std::move(state)));
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaMalloc(&runner->state_->workspace, kWorkspaceBytes));
  return runner;
}

GemmRunner::~GemmRunner() {
  if (state_ == nullptr) return;
  cudaSetDevice(state_->device);
  {
    absl::MutexLock lock(&state_->mu);
    state_->plans.clear();
  }
  if (state_->workspace != nullptr) cudaFree(state_->workspace);  // waits for pending work
  if (state_->handle != nullptr) Lt().cublasLtDestroy(state_->handle);
}

int GemmRunner::device() const { return state_->device; }

int64_t GemmRunner::CachedPlanCount() const {
  absl::MutexLock lock(&state_->mu);
  return static_cast<int64_t>(state_->plans.size());
}

absl::Status GemmRunner::Linear(const uint16_t* a, int64_t m, int64_t k, const uint16_t* w,
                                int64_t n, const uint16_t* bias, uint16_t* out,
                                cudaStream_t stream) {
  return Run(a, m, k, w, n, bias, /*f32_out=*/false, out, stream);
}

absl::Status GemmRunner::LinearF32(const uint16_t* a, int64_t m, int64_t k, const uint16_t* w,
                                   int64_t n, float* out, cudaStream_t stream) {
  return Run(a, m, k, w, n, /*bias=*/nullptr, /*f32_out=*/true, out, stream);
}

absl::Status GemmRunner::Run(const uint16_t* a, int64_t m, int64_t k, const uint16_t* w, int64_t n,
                             const uint16_t* bias, bool f32_out, void* out, cudaStream_t stream) {
  if (m < 0 || n < 0 || k < 1) {
    return absl::InvalidArgumentError(absl::StrCat("GemmRunner: bad shape m=", m, " n=", n,
                                                   " k=", k, " (need m, n >= 0, k >= 1)"));
  }
  if (m == 0 || n == 0) return absl::OkStatus();
  if (a == nullptr || w == nullptr || out == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("GemmRunner (m=", m, " n=", n, " k=", k, "): a, w and out must not be null"));
  }
  const PlanKey key{m,
                    n,
                    k,
                    bias != nullptr,
                    f32_out,
                    AlignmentOf(a),
                    AlignmentOf(w),
                    AlignmentOf(out),
                    bias != nullptr ? AlignmentOf(bias) : 0};

  int current = -1;
  ANCHOR_CUDA_RETURN_IF_ERROR(cudaGetDevice(&current));
  if (current != state_->device) ANCHOR_CUDA_RETURN_IF_ERROR(cudaSetDevice(state_->device));

  absl::MutexLock lock(&state_->mu);
  absl::StatusOr<Plan*> plan_or = state_->GetPlan(key, bias);
  if (!plan_or.ok()) return plan_or.status();
  Plan* plan = *plan_or;
  if (bias != nullptr) {
    const void* bias_pointer = bias;
    ANCHOR_CUBLAS_RETURN_IF_ERROR(
        Lt().cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                            &bias_pointer, sizeof(bias_pointer)),
        key);
  }
  const float alpha = 1.0f;
  const float beta = 0.0f;
  ANCHOR_CUBLAS_RETURN_IF_ERROR(
      Lt().cublasLtMatmul(state_->handle, plan->desc, &alpha, w, plan->w_layout, a, plan->a_layout,
                          &beta, out, plan->out_layout, out, plan->out_layout, &plan->algo,
                          state_->workspace, kWorkspaceBytes, stream),
      key);
  return absl::OkStatus();
}

}  // namespace anchorserve::cuda
