#include "server/attend_stream_assembler.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/rpc_support.h"

namespace anchorserve {
namespace {

absl::string_view ChunkTensorName(int tensor) {
  switch (tensor) {
    case v1::TENSOR_NAME_Q:
      return "q";
    case v1::TENSOR_NAME_K:
      return "k";
    case v1::TENSOR_NAME_V:
      return "v";
    case v1::TENSOR_NAME_OUTPUT:
      return "output";
    default:
      return "an unknown tensor";
  }
}

}  // namespace

absl::Status AttendStreamAssembler::Add(const v1::AttendStreamRequest& message,
                                        const SegmentedBytes* chunk_data) {
  switch (message.kind_case()) {
    case v1::AttendStreamRequest::kHeader:
      if (header_received_) {
        return absl::InvalidArgumentError(
            "second header: a stream carries exactly one request, its header first");
      }
      return AddHeader(message.header());
    case v1::AttendStreamRequest::kChunk:
      if (!header_received_) {
        return absl::InvalidArgumentError(
            "first message must be a header (got a chunk before any header)");
      }
      if (complete()) {
        return absl::InvalidArgumentError(
            absl::StrCat("chunk of ", ChunkTensorName(message.chunk().tensor()),
                         " after all tensor data arrived: bytes beyond the sizes the header "
                         "declared"));
      }
      if (chunk_data == nullptr) {
        const std::string& bytes = message.chunk().data();
        return AddChunk(message.chunk(), SegmentedBytes{{absl::string_view(bytes)}, bytes.size()});
      }
      return AddChunk(message.chunk(), *chunk_data);
    case v1::AttendStreamRequest::KIND_NOT_SET:
      break;
  }
  if (!header_received_) {
    return absl::InvalidArgumentError(
        "first message must be a header (got a message with neither header nor chunk)");
  }
  return absl::InvalidArgumentError("message sets neither header nor chunk");
}

absl::Status AttendStreamAssembler::AddHeader(const v1::StreamHeader& header) {
  absl::StatusOr<RequestSpec> spec = SpecFromStreamHeader(header, *options_);
  if (!spec.ok()) return spec.status();
  spec_ = *std::move(spec);
  if (budget_ != nullptr) {
    if (absl::Status fits =
            budget_->CheckFits(spec_.q_bytes + spec_.k_bytes + spec_.v_bytes + spec_.q_bytes,
                               "AttendStream request (q, k, v and output)");
        !fits.ok()) {
      return fits;
    }
    charge_ = budget_->EmptyCharge();
  }
  requested_id_ = header.request_id();
  const int64_t sizes[3] = {spec_.q_bytes, spec_.k_bytes, spec_.v_bytes};
  const absl::string_view names[3] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i) {
    inputs_[i].name = names[i];
    inputs_[i].size = sizes[i];
    inputs_[i].received = 0;
    inputs_[i].data = AllocateBytes(sizes[i], cache_);
    if (inputs_[i].data == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", sizes[i], " bytes for ", names[i]));
    }
  }
  header_received_ = true;
  return absl::OkStatus();
}

absl::Status AttendStreamAssembler::AddChunk(const v1::TensorChunk& chunk,
                                             const SegmentedBytes& data) {
  int index = -1;
  switch (chunk.tensor()) {
    case v1::TENSOR_NAME_Q:
      index = 0;
      break;
    case v1::TENSOR_NAME_K:
      index = 1;
      break;
    case v1::TENSOR_NAME_V:
      index = 2;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("chunk.tensor must be TENSOR_NAME_Q, TENSOR_NAME_K or TENSOR_NAME_V, got ",
                       v1::TensorName_IsValid(chunk.tensor())
                           ? v1::TensorName_Name(chunk.tensor())
                           : absl::StrCat("unknown value ", static_cast<int>(chunk.tensor()))));
  }
  Input& input = inputs_[index];
  if (chunk.offset() != input.received) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk.offset of ", input.name, " is ", chunk.offset(), ", expected ",
                     input.received, ": each tensor's chunks must arrive in order without gaps"));
  }
  const int64_t bytes = static_cast<int64_t>(data.size);
  if (bytes > input.size - input.received) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk of ", input.name, " at chunk.offset ", chunk.offset(), " carries ",
                     bytes, " bytes, beyond the ", input.size, " bytes its header spec declares"));
  }
  if (input.data == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("the buffer of ", input.name, " is gone"));
  }
  if (budget_ != nullptr) {
    if (absl::Status charged = charge_.Grow(bytes, absl::StrCat("chunk of ", input.name));
        !charged.ok()) {
      return charged;
    }
  }
  if (bytes > 0) data.CopyTo(input.data.get() + input.received);
  input.received += bytes;
  return absl::OkStatus();
}

bool AttendStreamAssembler::complete() const {
  return header_received_ && std::all_of(std::begin(inputs_), std::end(inputs_),
                                         [](const Input& in) { return in.received == in.size; });
}

std::string AttendStreamAssembler::EndedEarlyMessage() const {
  if (!header_received_) return "stream ended before a header arrived";
  std::vector<std::string> missing;
  for (const Input& in : inputs_) {
    if (in.received < in.size) {
      missing.push_back(
          absl::StrCat(in.name, " is missing ", in.size - in.received, " of ", in.size, " bytes"));
    }
  }
  return absl::StrCat("stream ended before all tensor data arrived: ",
                      absl::StrJoin(missing, "; "));
}

void AttendStreamAssembler::ReleaseData() {
  for (Input& in : inputs_) in.data.reset();
  charge_.Release();
}

}  // namespace anchorserve
