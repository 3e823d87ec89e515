// Generated Q/K/V for anchorctl and the end-to-end tests, as owned host tensors (the generators
// themselves live in kernels/structured_inputs.h).
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/host_tensor.h"
#include "kernels/attention_types.h"

namespace anchorserve {

enum class InputKind {
  kStructured,  // sink, local, stripe, retrieval and diffuse heads (realistic sparsity)
  kRandom,      // i.i.d. normal entries
};

// "structured" | "random".
absl::StatusOr<InputKind> ParseInputKind(absl::string_view name);

struct GeneratedInputsSpec {
  InputKind kind = InputKind::kStructured;
  AttentionShape shape;
  DType dtype = DType::kBf16;
  Layout layout = Layout::kTokenMajor;
  uint64_t seed = 1;
};

struct QkvTensors {
  HostTensor q;  // [N, Hq, d] or [Hq, N, d]
  HostTensor k;  // [N, Hkv, d] or [Hkv, N, d]
  HostTensor v;  // like k
};

// Checks the shape (positive dims, Hq % Hkv, head_dim range) and generates.
absl::StatusOr<QkvTensors> GenerateInputs(const GeneratedInputsSpec& spec);

}  // namespace anchorserve
