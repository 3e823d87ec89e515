#include "client/qkv_inputs.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/structured_inputs.h"

namespace anchorserve {

absl::StatusOr<InputKind> ParseInputKind(absl::string_view name) {
  if (name == "structured") return InputKind::kStructured;
  if (name == "random") return InputKind::kRandom;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown input kind '", name, "' (expected structured or random)"));
}

absl::StatusOr<QkvTensors> GenerateInputs(const GeneratedInputsSpec& spec) {
  absl::StatusOr<HostQkv> generated;
  if (spec.kind == InputKind::kStructured) {
    StructuredInputOptions options;
    options.seed = spec.seed;
    generated = GenerateStructuredQkv(spec.shape, spec.dtype, spec.layout, options);
  } else {
    generated = GenerateRandomQkv(spec.shape, spec.dtype, spec.layout, spec.seed);
  }
  if (!generated.ok()) return generated.status();

  const AttentionShape& shape = spec.shape;
  QkvTensors tensors;
  auto fill = [&](HostTensor& tensor, int heads, std::vector<uint8_t>& bytes) {
    tensor.dtype = spec.dtype;
    tensor.layout = spec.layout;
    tensor.shape = ShapeFor(spec.layout, shape.seq_len, heads, shape.head_dim);
    tensor.bytes = std::move(bytes);
  };
  fill(tensors.q, shape.num_q_heads, generated->q);
  fill(tensors.k, shape.num_kv_heads, generated->k);
  fill(tensors.v, shape.num_kv_heads, generated->v);
  // The generator's contract says these sizes hold; check rather than trust across libraries.
  absl::StatusOr<AttentionShape> checked =
      ValidateQkv(tensors.q.View(), tensors.k.View(), tensors.v.View());
  if (!checked.ok()) {
    return absl::InternalError(
        absl::StrCat("generated inputs are inconsistent: ", checked.status().message()));
  }
  return tensors;
}

}  // namespace anchorserve
