// cuBLASLt, loaded with dlopen on first use rather than linked.
//
// libcublasLt carries about 94 KiB of static thread-local storage. Linked into the server it
// would be loaded at start, and glibc carves every new thread's static TLS out of that thread's
// stack: the metrics endpoint's web server threads (100 KiB stacks) then fail to start. Loaded
// when the first GemmRunner is created, its TLS is allocated per thread on demand instead, and a
// server that never runs the CUDA prefill engine never loads it.
#pragma once

#include <cublasLt.h>

#include "absl/status/statusor.h"

namespace anchorserve::cuda {

#define ANCHOR_CUBLASLT_FUNCTIONS(X)      \
  X(cublasLtCreate)                       \
  X(cublasLtDestroy)                      \
  X(cublasLtGetStatusName)                \
  X(cublasLtGetStatusString)              \
  X(cublasLtMatmul)                       \
  X(cublasLtMatmulAlgoGetHeuristic)       \
  X(cublasLtMatmulDescCreate)             \
  X(cublasLtMatmulDescDestroy)            \
  X(cublasLtMatmulDescSetAttribute)       \
  X(cublasLtMatmulPreferenceCreate)       \
  X(cublasLtMatmulPreferenceDestroy)      \
  X(cublasLtMatmulPreferenceSetAttribute) \
  X(cublasLtMatrixLayoutCreate)           \
  X(cublasLtMatrixLayoutDestroy)

// The entry points the GEMM runner uses, with cuBLASLt's own signatures.
struct CublasLtApi {
#define ANCHOR_CUBLASLT_POINTER(name) decltype(&::name) name = nullptr;
  ANCHOR_CUBLASLT_FUNCTIONS(ANCHOR_CUBLASLT_POINTER)
#undef ANCHOR_CUBLASLT_POINTER
};

// Loads libcublasLt.so.13 (the CUDA toolkit's or runtime image's) once; thread-safe.
// FAILED_PRECONDITION naming the library or the missing symbol when it cannot.
absl::StatusOr<const CublasLtApi*> LoadCublasLt();

}  // namespace anchorserve::cuda
