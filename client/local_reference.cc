#include "client/local_reference.h"

#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "kernels/cpu/cpu_backend.h"

namespace anchorserve {

absl::StatusOr<LocalRun> RunLocally(AttentionBackend& backend, const TensorView& q,
                                    const TensorView& k, const TensorView& v,
                                    const AnchorConfig& config) {
  absl::StatusOr<AttentionShape> shape = ValidateQkv(q, k, v);
  if (!shape.ok()) return shape.status();
  absl::StatusOr<HostTensor> output = AllocateHostTensor(q.dtype, q.layout, q.shape);
  if (!output.ok()) return output.status();
  // Poison the output so elements the backend never writes show up as NaN.
  const size_t elements = static_cast<size_t>(output->NumElements());
  std::vector<float> nan_fill(std::min<size_t>(elements, size_t{1} << 20),
                              std::numeric_limits<float>::quiet_NaN());
  const size_t element_bytes = ElementSize(q.dtype);
  for (size_t done = 0; done < elements; done += nan_fill.size()) {
    const size_t count = std::min(nan_fill.size(), elements - done);
    ConvertFromFloat(nan_fill.data(), count, q.dtype, output->bytes.data() + done * element_bytes);
  }

  AttentionTask task;
  task.shape = *shape;
  task.dtype = q.dtype;
  task.layout = q.layout;
  task.q = q.bytes.data();
  task.k = k.bytes.data();
  task.v = v.bytes.data();
  task.out = output->bytes.data();
  task.config = config;
  absl::Status valid = ValidateTask(task);
  if (!valid.ok()) return valid;
  absl::Status supported = backend.CanRun(ProblemOf(task));
  if (!supported.ok()) return supported;
  AttentionTask* tasks[] = {&task};
  absl::Status run = backend.Run(absl::MakeConstSpan(tasks));
  if (!run.ok()) return run;
  if (!task.status.ok()) return task.status;

  LocalRun result;
  result.output = *std::move(output);
  result.summary = SummarizeHeads(task.shape.seq_len, task.head_stats);
  result.times = task.times;
  return result;
}

absl::StatusOr<LocalRun> RunOnCpu(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const AnchorConfig& config, int cpu_threads) {
  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = CreateCpuBackend(cpu_threads);
  if (!backend.ok()) return backend.status();
  return RunLocally(**backend, q, k, v, config);
}

Tolerance VerificationTolerance(DType dtype) {
  switch (dtype) {
    case DType::kBf16:
      return {0x1p-6, 0x1p-6};  // bf16 has 8 significant bits: 2 ulps at 1.0
    case DType::kFp16:
      return {0x1p-9, 0x1p-9};  // fp16 has 11: 2 ulps at 1.0
    case DType::kFp32:
      return {1e-4, 1e-4};  // fp32 storage, but backends may accumulate in lower precision
  }
  return {};
}

std::string OutputComparison::Describe() const {
  return absl::StrFormat(
      "max abs error %.3g, %d of %d elements (%.3g%%) outside |err| <= %.3g + %.3g*|ref|, %d "
      "non-finite",
      max_abs_error, over_tolerance, elements, 100.0 * FractionOverTolerance(), tolerance.atol,
      tolerance.rtol, non_finite);
}

absl::StatusOr<OutputComparison> CompareOutputs(const HostTensor& actual,
                                                const HostTensor& expected, Tolerance tolerance) {
  if (actual.dtype != expected.dtype || actual.layout != expected.layout ||
      actual.shape != expected.shape || actual.bytes.size() != expected.bytes.size()) {
    return absl::InvalidArgumentError("outputs to compare differ in dtype, layout or shape");
  }
  OutputComparison result;
  result.tolerance = tolerance;
  result.elements = actual.NumElements();
  const size_t element_bytes = ElementSize(actual.dtype);
  constexpr size_t kBlock = size_t{1} << 16;
  std::vector<float> a(kBlock);
  std::vector<float> e(kBlock);
  for (size_t start = 0; start < static_cast<size_t>(result.elements); start += kBlock) {
    const size_t count = std::min(kBlock, static_cast<size_t>(result.elements) - start);
    ConvertToFloat(actual.bytes.data() + start * element_bytes, actual.dtype, count, a.data());
    ConvertToFloat(expected.bytes.data() + start * element_bytes, expected.dtype, count, e.data());
    for (size_t i = 0; i < count; ++i) {
      const double got = a[i];
      const double want = e[i];
      if (!std::isfinite(got) || !std::isfinite(want)) {
        // NaN never passes; infinities pass only when equal.
        if (std::isnan(got) || std::isnan(want) || got != want) {
          ++result.over_tolerance;
          if (std::isfinite(want)) ++result.non_finite;
        }
        continue;
      }
      const double error = std::abs(got - want);
      result.max_abs_error = std::max(result.max_abs_error, error);
      if (error > tolerance.atol + tolerance.rtol * std::abs(want)) ++result.over_tolerance;
    }
  }
  return result;
}

absl::StatusOr<CpuVerification> VerifyOnCpu(const TensorView& q, const TensorView& k,
                                            const TensorView& v,
                                            const v1::AnchorConfig& effective_config,
                                            const HostTensor& output, int cpu_threads) {
  absl::StatusOr<AnchorConfig> config = AnchorConfigFromProto(effective_config);
  if (!config.ok()) {
    return absl::InternalError(
        absl::StrCat("server's effective_config is unusable: ", config.status().message()));
  }
  absl::StatusOr<LocalRun> local = RunOnCpu(q, k, v, *config, cpu_threads);
  if (!local.ok()) {
    return absl::Status(local.status().code(),
                        absl::StrCat("local CPU reference failed: ", local.status().message()));
  }
  absl::StatusOr<OutputComparison> comparison =
      CompareOutputs(output, local->output, VerificationTolerance(q.dtype));
  if (!comparison.ok()) return comparison.status();
  return CpuVerification{*std::move(local), *comparison};
}

}  // namespace anchorserve
