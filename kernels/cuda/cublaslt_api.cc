#include "kernels/cuda/cublaslt_api.h"

#include <dlfcn.h>

#include "absl/strings/str_cat.h"

namespace anchorserve::cuda {
namespace {

// The major version this build's headers describe.
constexpr char kLibrary[] = "libcublasLt.so.13";

absl::StatusOr<CublasLtApi> Load() {
  void* library = dlopen(kLibrary, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    const char* why = dlerror();
    return absl::FailedPreconditionError(
        absl::StrCat("cannot load ", kLibrary,
                     " (cuBLASLt, for the GPU prefill engine's GEMMs; it comes with "
                     "the CUDA toolkit or runtime, e.g. /usr/local/cuda/lib64): ",
                     why != nullptr ? why : ""));
  }
  CublasLtApi api;
#define ANCHOR_CUBLASLT_RESOLVE(name)                                                         \
  api.name = reinterpret_cast<decltype(api.name)>(dlsym(library, #name));                     \
  if (api.name == nullptr) {                                                                  \
    return absl::FailedPreconditionError(absl::StrCat(kLibrary, " lacks the symbol " #name)); \
  }
  ANCHOR_CUBLASLT_FUNCTIONS(ANCHOR_CUBLASLT_RESOLVE)
#undef ANCHOR_CUBLASLT_RESOLVE
  return api;  // the library stays loaded for the process's lifetime
}

}  // namespace

absl::StatusOr<const CublasLtApi*> LoadCublasLt() {
  static const auto* const loaded = new absl::StatusOr<CublasLtApi>(Load());
  if (!loaded->ok()) return loaded->status();
  return &**loaded;
}

}  // namespace anchorserve::cuda
